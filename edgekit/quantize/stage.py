"""The ``quantize`` stage: checkpoint -> quantized checkpoint (GPTQ format, or FP8).

Methods: ``gptq`` (ours, layer by layer), ``rtn`` (round to nearest on the same grid: the
baseline), ``awq`` (NNCF AWQ + scale estimation, converted into the same GPTQ layout) and
``fp8`` (E4M3 weights per channel + static or dynamic activation scales, simulated in
PyTorch for evaluation). The output is a standard checkpoint directory: config.json with
``quantization_config``, model.safetensors, tokenizer, plus ``quantization.json`` with
what was done and measured.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from edgekit.models.generated import GeneratedCalibration
from edgekit.pipeline.registry import CHECKPOINT, register_stage


class QuantizeConfig(GeneratedCalibration):
    method: Literal["gptq", "rtn", "awq", "fp8"] = Field("gptq", description="gptq | rtn | awq (NNCF) | fp8")
    bits: Literal[4, 8] = Field(4, description="weight bits (integer methods)")
    group_size: Literal[32, 64, 128] | None = Field(
        64, description="input channels per scale (null = one scale per output channel); must divide every layer's input size"
    )
    symmetric: bool = Field(False, description="symmetric grid (zero point fixed at the centre): what TensorRT's INT4 path needs")
    act_order: bool = Field(True, description="GPTQ: quantize columns by decreasing Hessian diagonal (groups stay contiguous)")
    damp: float = Field(0.01, gt=0, lt=1, description="GPTQ: dampening, as a fraction of the mean Hessian diagonal")
    clip_search: bool = Field(True, description="search a clipped range per group that minimises the squared error (GPTQ, RTN)")
    float_target: float = Field(
        0.25, ge=0, le=1,
        description="GPTQ: how far each layer aims at the float model's output rather than at its own (already "
        "quantized) input's product, 0..1 (GPTAQ's asymmetric calibration; 0 = plain GPTQ). Runs the float layer "
        "beside the quantized one: about 2x the calibration time",
    )
    scale_estimation: bool = Field(True, description="awq: NNCF scale estimation on top of AWQ")
    calibration_samples: int = Field(128, ge=1, description="calibration windows (from the text before the held-out split)")
    sequence_length: int = Field(512, ge=16, description="tokens per calibration window")
    quantize_lm_head: bool = Field(False, description="also quantize lm_head (never the embeddings)")
    fp8_activations: Literal["static", "dynamic"] = Field("static", description="fp8: per-tensor scales from calibration, or per-token at run time")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where GPTQ calibrates each layer (auto: a CUDA GPU if torch sees one; EDGEKIT_DEVICE overrides auto); the model stays in CPU memory, one decoder layer at a time visits the GPU")

    @model_validator(mode="after")
    def _consistent(self):
        if self.method == "awq" and self.bits != 4:
            raise ValueError("method awq supports bits 4 (NNCF's AWQ works on INT4 weights)")
        if self.quantize_lm_head and self.method in ("awq", "fp8"):
            raise ValueError(f"quantize_lm_head is supported for gptq and rtn, not {self.method}")
        if self.method == "rtn" and self.generated_ratio > 0:
            raise ValueError("method rtn reads no calibration data: remove generated_ratio, or use gptq/awq/fp8")
        return self


def run_quantize(ctx) -> dict:
    import json
    import resource
    import time

    from edgekit.errors import StageError
    from edgekit.weights.checkpoint import load_checkpoint
    from edgekit.models.text import data_record, read_token_splits
    from edgekit.models.generated import calibration_with_generated

    from edgekit.devices import resolve_device

    config = ctx.config
    source = ctx.inputs[CHECKPOINT]
    # Before anything is loaded: device cuda without a GPU is a one-line error. Only GPTQ has a
    # GPU path (RTN needs none; AWQ runs in NNCF on the CPU; fp8 simulates on the CPU).
    device = resolve_device(config.device, stage=ctx.name) if config.method == "gptq" else "cpu"
    # Keep the checkpoint's own dtype (bfloat16 for a 7B): GPTQ's math runs in float32 per layer.
    saved = json.loads((source / "config.json").read_text())
    dtype = saved.get("dtype") or saved.get("torch_dtype") or "float32"
    model, tokenizer = load_checkpoint(source, dtype=dtype if dtype in ("float32", "float16", "bfloat16") else "float32",
                                       trust_remote_code=ctx.recipe.trust_remote_code)
    if getattr(model.config, "quantization_config", None):
        raise StageError(
            "the input checkpoint is already quantized",
            where=f"stage {ctx.name}",
            how="quantize a float checkpoint: put quantize right after load/prune/distill, once",
        )
    started = time.perf_counter()
    samples = []
    calibration_data = None  # rtn reads no data
    if config.method != "rtn":
        data = ctx.recipe.data
        splits = read_token_splits(data, tokenizer, base_dir=ctx.recipe_dir, cache_dir=ctx.cache_dir, log=ctx.log)
        samples, generated = calibration_with_generated(ctx, splits.calibration, config, source)
        calibration_data = _calibration_record(data_record(data, base_dir=ctx.recipe_dir, splits=splits), samples)
        if generated is not None:  # say so: part of the calibration is the input model's own samples
            calibration_data["generated"] = generated
    try:
        if config.method == "fp8":
            from edgekit.quantize.fp8 import fp8_quantize
            from edgekit.weights.fp8 import save_fp8_checkpoint

            with ctx.progress(None, f"fp8 (activations {config.fp8_activations}) on {len(samples)} samples"):
                fp8_quantize(model, samples, activations=config.fp8_activations)
            save_fp8_checkpoint(model, ctx.output_dir, activations=config.fp8_activations)
            quantized_count, bits_per_weight = _count_fp8(model), 8.0 + 32.0 / model.config.hidden_size
        else:
            quantized = _integer_method(ctx, model, samples, device)
            from edgekit.weights.loader import save_quantized_checkpoint
            from edgekit.weights.packing import gptq_quantization_config

            qconfig = gptq_quantization_config(
                bits=config.bits,
                group_size=config.group_size,
                symmetric=config.symmetric,
                act_order=config.act_order and config.method == "gptq",
                damp=config.damp,
                method=config.method,
                float_target=config.float_target if config.method == "gptq" else 0.0,
            )
            save_quantized_checkpoint(model, quantized, ctx.output_dir, quantization_config=qconfig)
            quantized_count = len(quantized)
            bits_per_weight = _bits_per_weight(quantized)
    except ValueError as exc:  # e.g. a group size that does not divide a layer's width
        message = str(exc).splitlines()[0]
        if "group_size" not in message:
            raise
        raise StageError(
            message,
            where=f"stage {ctx.name}",
            how="pick a group_size that divides every layer's input size (SmolLM2-135M: 32 or 64; 576 is not a multiple of 128)",
        ) from exc
    tokenizer.save_pretrained(ctx.output_dir)
    seconds = time.perf_counter() - started
    report = {
        "method": config.method,
        "bits": 8 if config.method == "fp8" else config.bits,
        "group_size": None if config.method == "fp8" else config.group_size,
        "symmetric": config.symmetric,
        "act_order": config.act_order if config.method == "gptq" else None,
        "float_target": config.float_target if config.method == "gptq" else None,
        "calibration_samples": len(samples),
        "calibration_tokens": sum(int(s.numel()) for s in samples),
        # which text calibrated GPTQ/AWQ/FP8: the source, its sha256 (or files / snapshot), and
        # the sha256 of the exact token windows used
        "calibration_data": calibration_data,
        "quantized_linears": quantized_count,
        "bits_per_weight": round(bits_per_weight, 4),
        "quantize_seconds": round(seconds, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "device": device,
        "checkpoint_bytes": sum(p.stat().st_size for p in ctx.output_dir.glob("*.safetensors")),
    }
    # The artifact file holds only what the checkpoint is (deterministic, so a rerun hashes the
    # same); wall time and memory go to the manifest's metrics.
    if device == "cuda":
        import torch

        report["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    measured = ("quantize_seconds", "peak_rss_mb", "device", "peak_gpu_mb")
    (ctx.output_dir / "quantization.json").write_text(
        json.dumps({k: v for k, v in report.items() if k not in measured}, indent=2) + "\n"
    )
    return report


def _calibration_record(record: dict, samples: list) -> dict:
    """The data record of the text the samples came from (edgekit.models.text.data_record),
    with what was taken from it: windows, tokens and the sha256 of those token ids."""
    import hashlib

    import numpy as np

    digest = hashlib.sha256()
    for window in samples:
        digest.update(np.ascontiguousarray(window.numpy(), dtype="<i8").tobytes())
    return {**record, "split": "calibration (the text before the held-out eval_tokens)", "samples": len(samples),
            "sequence_length": int(samples[0].shape[-1]) if samples else 0,
            "tokens": sum(int(s.numel()) for s in samples), "tokens_sha256": digest.hexdigest()}


def _integer_method(ctx, model, samples, device: str = "cpu") -> dict:
    config = ctx.config
    if config.method == "awq":
        from edgekit.quantize.awq import awq_quantize

        with ctx.progress(None, f"NNCF AWQ{' + scale estimation' if config.scale_estimation else ''} on {len(samples)} samples"):
            return awq_quantize(
                model, samples, bits=config.bits, group_size=config.group_size or 0, symmetric=config.symmetric,
                awq=True, scale_estimation=config.scale_estimation,
            )
    from edgekit.quantize.driver import quantize_layer_by_layer
    from edgekit.weights.layers import decoder_layers, decoder_linears
    from edgekit.weights.grid import rtn_quantize

    layers = decoder_layers(model)
    grid = {"bits": config.bits, "group_size": config.group_size, "symmetric": config.symmetric}
    quantized: dict = {}
    if config.method == "rtn":
        import torch

        linears = decoder_linears(model)
        with ctx.progress(len(linears), "RTN") as bar, torch.inference_mode():
            for name, module in linears:
                qw = rtn_quantize(module.weight, mse=config.clip_search, **grid)
                module.weight.data = qw.dequantize(module.weight.dtype)
                quantized[name] = qw
                bar.advance()
    else:
        import torch

        from edgekit.quantize.gptq import float_target, gptq_quantize, split_rows

        def gptq(_names, modules, hessian, cross=None):
            # One solve for the whole group: GPTQ treats rows independently given H.
            weight = torch.cat([m.weight.data for m in modules], dim=0)
            if cross is not None:  # aim at the float model's output (float_target)
                weight = float_target(weight, hessian, cross, damp=config.damp, alpha=config.float_target)
            qw, _stats = gptq_quantize(weight, hessian, act_order=config.act_order, damp=config.damp, mse=config.clip_search, **grid)
            return split_rows(qw, [m.weight.shape[0] for m in modules])

        aim = f", float target {config.float_target:g}" if config.float_target else ""
        with ctx.progress(len(layers), f"GPTQ layer by layer on {len(samples)}×{config.sequence_length} tokens ({device}{aim})") as bar:
            quantized = quantize_layer_by_layer(model, samples, gptq, device=device, advance=bar.advance,
                                                float_targets=config.float_target > 0)
    if config.quantize_lm_head:
        quantized.update(_quantize_lm_head(model, samples, config, grid))
    return quantized


def _quantize_lm_head(model, samples, config, grid) -> dict:
    """lm_head on the final-norm output. A tied head is untied first: the embedding stays float."""
    import torch

    from edgekit.weights.grid import rtn_quantize

    head = model.get_output_embeddings()
    if model.config.tie_word_embeddings:
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    if config.method == "rtn":
        qw = rtn_quantize(head.weight, mse=config.clip_search, **grid)
    else:
        from edgekit.quantize.gptq import accumulate_hessian, gptq_quantize

        state = [None, 0]

        def hook(_module, args):
            state[0], state[1] = accumulate_hessian(state[0], args[0], state[1])

        handle = head.register_forward_pre_hook(hook)
        try:
            with torch.inference_mode():
                for ids in samples:
                    model(input_ids=ids, use_cache=False)
        finally:
            handle.remove()
        qw, _ = gptq_quantize(head.weight.data, state[0], act_order=config.act_order, damp=config.damp, mse=config.clip_search, **grid)
    head.weight.data = qw.dequantize(head.weight.dtype)
    name = next(n for n, m in model.named_modules() if m is head)
    return {name: qw}


def _bits_per_weight(quantized: dict) -> float:
    """Stored bits per quantized weight: codes + fp16 scale (+ packed zero) per group."""
    total_weights = sum(qw.out_features * qw.in_features for qw in quantized.values())
    total_bits = 0
    for qw in quantized.values():
        groups = qw.out_features * qw.n_groups
        total_bits += qw.out_features * qw.in_features * qw.bits + groups * (16 + qw.bits)
    return total_bits / total_weights


def _count_fp8(model) -> int:
    from edgekit.weights.fp8 import Fp8Linear

    return sum(1 for m in model.modules() if isinstance(m, Fp8Linear))


register_stage(
    "quantize",
    config=QuantizeConfig,
    summary="GPTQ (ours) / RTN / AWQ (NNCF) / FP8 weight quantization -> GPTQ-format (or FP8) checkpoint",
    run="edgekit.quantize.stage:run_quantize",
    requires=(CHECKPOINT,),
    produces=CHECKPOINT,
    uses=("data",),
)
