"""The ``export_onnx`` stage: checkpoint -> ONNX with KV cache, parity-checked.

A float checkpoint gives one graph that both runtimes read. A quantized checkpoint is
exported through its dequantized float twin, then the graph's weight MatMuls are rewritten
per runtime from *our* integer weights (not re-derived by another quantizer):

* ``onnxruntime``: INT4/INT8 ``MatMulNBits`` (ONNX Runtime's fast weight-only kernels);
* ``tensorrt``: block-wise ``DequantizeLinear`` (opset 21) feeding the MatMul, the pattern
  TensorRT 10 fuses for weight-only quantization; FP8 as FLOAT8E4M3FN Q/DQ. Integer graphs are
  traced in half precision (``tensorrt_dtype``: float16 by default, bfloat16 when the model
  overflows float16, float32 on request) with half scales, and checked against the PyTorch
  model in that precision with a measured tolerance (docs/quantization.md).

The primary variant (onnxruntime when asked for, else tensorrt) is ``model.onnx``; the
other lives in ``<format>/model.onnx``; ``export.json`` lists them. Every variant is run in
ONNX Runtime (CPU) against the PyTorch model with the same quantized weights, and its max
abs diff per output is recorded; over tolerance fails the stage.

``onnxruntime_graph: fused`` (opt-in, Llama family) replaces the ONNX Runtime graph by one
written directly with ONNX Runtime's fused operators (:mod:`edgekit.export.ort_fused`:
GroupQueryAttention, MatMulNBits, SkipSimplifiedLayerNormalization), same inputs and outputs,
same parity check. A float model then gets an ``onnxruntime`` variant
(``onnxruntime/model.onnx``) next to the traced ``float`` graph, which stays primary (TensorRT
reads it). See docs/export_fused.md.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from edgekit.graph_variants import DRAFT_VARIANT
from edgekit.pipeline.registry import CHECKPOINT, ONNX, StageConfig, register_stage

EXPORT_RECORD = "export.json"


class ExportOnnxConfig(StageConfig):
    format: Literal["onnxruntime", "tensorrt", "both"] = Field(
        "onnxruntime", description="graphs for ONNX Runtime (MatMulNBits), TensorRT (Q/DQ), or both (quantized models)"
    )
    opset: int = Field(18, ge=14, le=23, description="ONNX opset of the float graph (Q/DQ variants use at least 21)")
    parity_tolerance: float = Field(
        1e-3, gt=0, description="max |logits_onnx - logits_pytorch| allowed for a float graph; over it the stage fails"
    )
    quantized_parity_tolerance: float = Field(
        2e-2, gt=0, description="the same for quantized graphs (different accumulation order in the INT4 kernels)"
    )
    parity_prompts: list[str] | None = Field(None, description="prompts for the parity check (default: three fixed prompts)")
    accuracy_level: Literal[0, 1, 2, 3, 4] = Field(
        0, description="MatMulNBits compute type on CPU: 0 = float32 (exact); 4 = int8 activations (faster, "
        "less exact: the parity check and the following evaluate measure the cost)"
    )
    onnxruntime_graph: Literal["optimum", "fused"] = Field(
        "optimum", description="the ONNX Runtime graph: optimum's traced export, or 'fused': written with ONNX Runtime's "
        "fused operators (GroupQueryAttention, MatMulNBits, SkipSimplifiedLayerNormalization; Llama family; "
        "docs/export_fused.md)"
    )
    fused_lm_head_bits: Literal[4, 8] | None = Field(
        None, description="fused graph only: lm_head as MatMulNBits of this many bits (round-to-nearest, symmetric) instead "
        "of float32; parity is checked against the model with that lm_head, and the next evaluate measures the cost"
    )
    fused_lm_head_group_size: Literal[16, 32, 64, 128] = Field(32, description="group size of fused_lm_head_bits")
    draft_graph: bool = Field(
        False, description="fused graph only: also write the variant onnxruntime_draft (onnxruntime-draft/model.onnx), the "
        "same model with int8 activations (accuracy_level 4) and an 8-bit lm_head: about twice as fast, less exact. The "
        "runtime drafts with it in speculative decoding, whose output stays the large branch's; docs/export_fused.md"
    )
    draft_parity_tolerance: float = Field(
        3.0, gt=0, description="max |logits - PyTorch| of the draft graph (int8 activations move single logits by ~1)"
    )
    tensorrt_dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="float type of the tensorrt graph of a quantized model (activations, KV cache, logits, "
        "embeddings, norms' weights, lm_head and the Q/DQ scales): auto = float16 where the target supports it, "
        "bfloat16 (where supported) when the model overflows float16 on the parity prompts, else float32; "
        "docs/quantization.md"
    )
    half_parity_tolerance: float | None = Field(
        None, gt=0, description="max |logits - PyTorch in the same half precision| of a float16/bfloat16 tensorrt graph; "
        "default: measured, max(quantized_parity_tolerance, 2 x |PyTorch half - PyTorch float32| + half a unit in the "
        "last place of the largest logit) on the parity prompts"
    )

    @model_validator(mode="after")
    def _fused_options(self):
        if self.fused_lm_head_bits is not None and self.onnxruntime_graph != "fused":
            raise ValueError("fused_lm_head_bits needs onnxruntime_graph: fused")
        if self.onnxruntime_graph == "fused" and self.format == "tensorrt":
            raise ValueError("onnxruntime_graph: fused writes the ONNX Runtime graph; use format onnxruntime or both")
        if self.draft_graph and self.onnxruntime_graph != "fused":
            raise ValueError("draft_graph needs onnxruntime_graph: fused")
        return self


def run_export_onnx(ctx) -> dict:
    import json
    import shutil

    from edgekit.export.onnx_export import MODEL_FILE, describe, export_decoder
    from edgekit.export.parity import DEFAULT_PROMPTS
    from edgekit.weights.checkpoint import load_checkpoint

    config = ctx.config
    checkpoint = ctx.inputs[CHECKPOINT]
    trust = ctx.recipe.trust_remote_code
    prompts = tuple(config.parity_prompts or DEFAULT_PROMPTS)
    method = _quant_method(checkpoint)
    model, tokenizer = load_checkpoint(checkpoint, dtype="float32", trust_remote_code=trust)
    record: dict = {"quantization": method, "variants": {}, "parity": {}}
    fused = config.onnxruntime_graph == "fused"
    references: dict = {}  # variant -> the parity reference when it is not `model` itself
    models: dict = {}  # variant -> its parity reference model when it is another model (half precision)
    if fused:
        record["onnxruntime_graph"] = "fused"
        if method not in (None, "gptq"):
            from edgekit.errors import StageError

            raise StageError(
                f"onnxruntime_graph: fused reads float or GPTQ/RTN-quantized checkpoints, not {method}",
                where=f"stage {ctx.name}", how="use onnxruntime_graph: optimum for this checkpoint",
            )
    if method is None:
        with ctx.progress(None, "optimum-onnx export (text-generation-with-past)"):
            export_decoder(checkpoint, ctx.output_dir, opset=config.opset, trust_remote_code=trust)
        record["variants"]["float"] = MODEL_FILE
        record["primary"] = "float"
        tolerances = {"float": config.parity_tolerance}
        if fused:  # the traced float graph stays primary (TensorRT reads it); ONNX Runtime gets its own
            target_dir = ctx.output_dir / "onnxruntime"
            target_dir.mkdir(exist_ok=True)
            record.setdefault("rewrites", {})["onnxruntime"] = _build_fused(ctx, config, model, target_dir, references)
            record["variants"]["onnxruntime"] = f"onnxruntime/{MODEL_FILE}"
            tolerances["onnxruntime"] = config.parity_tolerance
    else:
        formats = ["onnxruntime", "tensorrt"] if config.format == "both" else [config.format]
        traced = [fmt for fmt in formats if not (fused and fmt == "onnxruntime")]
        staging: dict[str, object] = {}  # float dtype of a traced graph -> its optimum export
        float_dir = None
        dtypes = {fmt: "float32" for fmt in traced}
        tolerances = {fmt: config.quantized_parity_tolerance for fmt in formats}
        if traced:
            weights = _quantized_weights(model, method)
            if method == "fp8" and any(w["input_scale"] is None for w in weights.values()):
                from edgekit.errors import StageError

                raise StageError(
                    "fp8 with dynamic (per-token) activation scales has no standard ONNX Q/DQ form",
                    where=f"stage {ctx.name}",
                    how="quantize with fp8_activations: static for an ONNX/TensorRT export (dynamic stays a PyTorch evaluation)",
                )
            float_dir = ctx.output_dir / ".float-checkpoint"
            _write_float_twin(model, tokenizer, float_dir)  # turns `model` into the float twin...
            # ...so reload the quantized model as the parity reference: for FP8 with static
            # activation scales it quantizes activations, as the exported graph does.
            model, tokenizer = load_checkpoint(checkpoint, dtype="float32", trust_remote_code=trust)
            if "tensorrt" in traced and method != "fp8":
                half = _half_reference(ctx, config, checkpoint, model, tokenizer, prompts, trust)
                if half is not None:
                    dtypes["tensorrt"] = half["dtype"]
                    models["tensorrt"] = half.pop("model")
                    tolerances["tensorrt"] = half["tolerance"]
                    record["tensorrt_precision"] = half
            for dtype in sorted(set(dtypes.values())):
                staging[dtype] = ctx.output_dir / f".{dtype}-onnx"
                with ctx.progress(None, f"optimum-onnx export of the dequantized twin ({dtype})"):
                    export_decoder(float_dir, staging[dtype], opset=config.opset, trust_remote_code=trust, dtype=dtype)
        for index, fmt in enumerate(formats):
            target_dir = ctx.output_dir if index == 0 else ctx.output_dir / fmt
            target_dir.mkdir(exist_ok=True)
            if fmt in traced:
                with ctx.progress(None, f"{fmt} graph ({method}, {dtypes[fmt]})"):
                    src = staging[dtypes[fmt]] / MODEL_FILE
                    report = _rewrite(fmt, method, src, target_dir / MODEL_FILE, weights, config.accuracy_level)
                report["float_dtype"] = dtypes[fmt]
            else:
                report = _build_fused(ctx, config, model, target_dir, references)
            record["variants"][fmt] = (target_dir / MODEL_FILE).relative_to(ctx.output_dir).as_posix()
            record.setdefault("rewrites", {})[fmt] = report
        record["primary"] = formats[0]
        if staging:
            # tokenizer + configs next to the primary graph (float32's when there is one: its
            # config.json describes the float twin as the other exports do)
            side = staging[dtypes[formats[0]]] if formats[0] in dtypes else staging[min(staging)]
            for path in sorted(side.iterdir()):
                if path.is_file() and not path.name.startswith("model.onnx"):
                    shutil.move(str(path), ctx.output_dir / path.name)
            for path in staging.values():
                shutil.rmtree(path)
            shutil.rmtree(float_dir)
        else:  # no traced graph: the configs and tokenizer optimum would have written
            _write_side_files(model, tokenizer, ctx.output_dir)
        # transformers would refuse the quantization_config without its GPTQ backends; the
        # ONNX graphs carry the quantization, so configs next to them describe the float twin.
    if config.draft_graph:
        target_dir = ctx.output_dir / "onnxruntime-draft"
        target_dir.mkdir(exist_ok=True)
        record.setdefault("rewrites", {})[DRAFT_VARIANT] = _build_draft(ctx, model, target_dir, references)
        record["variants"][DRAFT_VARIANT] = f"onnxruntime-draft/{MODEL_FILE}"
        tolerances[DRAFT_VARIANT] = config.draft_parity_tolerance
    metrics = _check_variants(ctx, model, tokenizer, record, tolerances, prompts, references, models)
    (ctx.output_dir / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    # optimum and the quantized loader write transformers' default generation config: keep the
    # model's own (its sampling settings become the bundle's runtime defaults)
    if (checkpoint / "generation_config.json").is_file():
        import shutil

        shutil.copyfile(checkpoint / "generation_config.json", ctx.output_dir / "generation_config.json")
    info = describe(ctx.output_dir / MODEL_FILE)
    metrics.update({
        "quantization": method,
        "primary": record["primary"],
        "opset": info["opset"],
        "nodes": info["nodes"],
        "onnx_bytes": sum(p.stat().st_size for p in ctx.output_dir.glob("model.onnx*")),
    })
    return metrics


#: target precision names of the half float types
_TARGET_PRECISION = {"float16": "fp16", "bfloat16": "bf16"}
#: mantissa bits of the half float types (for half a unit in the last place of a logit)
_MANTISSA_BITS = {"float16": 10, "bfloat16": 7}


def half_ulp(value: float, dtype: str) -> float:
    """Half a unit in the last place of ``value`` in ``dtype``: the rounding error of storing
    it (logits leave a half-precision graph in that type)."""
    import math

    value = abs(value)
    if value == 0 or not math.isfinite(value):
        return 0.0
    return 2.0 ** (math.floor(math.log2(value)) - _MANTISSA_BITS[dtype]) / 2


def _half_reference(ctx, config, checkpoint, model, tokenizer, prompts, trust) -> dict | None:
    """The tensorrt graph's half float type, its parity reference (the quantized model loaded in
    that type) and the tolerance, or None for a float32 graph.

    ``auto``: float16 where the target supports it, unless PyTorch itself overflows float16 on
    the parity prompts (non-finite logits), then bfloat16 where supported; float32 otherwise.
    The measured tolerance is max(quantized_parity_tolerance, 2 x the logits' max |PyTorch half -
    PyTorch float32| + half an ulp of the largest logit): two implementations of the model in
    the same half precision differ by about as much as either differs from float32 (ONNX Runtime
    on CPU runs most half ops in float32, docs/quantization.md), plus the logits' own rounding."""
    from edgekit.errors import StageError
    from edgekit.export.parity import precision_gap
    from edgekit.weights.checkpoint import load_checkpoint

    setting, target = config.tensorrt_dtype, ctx.target
    if setting == "float32":
        return None
    if setting == "auto":
        candidates = [d for d in ("float16", "bfloat16") if target.supports(_TARGET_PRECISION[d])]
        if not candidates:
            return None
    else:
        if not target.supports(_TARGET_PRECISION[setting]):
            raise StageError(
                f"export_onnx.tensorrt_dtype {setting}: {target.name} does not list {_TARGET_PRECISION[setting]} "
                f"(supported: {', '.join(target.supported_precisions)})",
                where=f"stage {ctx.name}", how="set tensorrt_dtype: auto (the target's half type, else float32) or float32",
            )
        candidates = [setting]
    overflowed: dict = {}
    for dtype in candidates:
        with ctx.progress(None, f"PyTorch reference in {dtype} (parity of the {dtype} TensorRT graph)"):
            half_model, _ = load_checkpoint(checkpoint, dtype=dtype, trust_remote_code=trust)
            gap = precision_gap(model, half_model, tokenizer, prompts=prompts)
        if gap["finite"]:
            break
        overflowed[dtype] = gap
        del half_model
    else:
        others = [d for d in ("bfloat16", "float32") if d not in overflowed]
        raise StageError(
            f"the model overflows {' and '.join(overflowed)} on the parity prompts (PyTorch's own logits are not finite), "
            "so a TensorRT graph in that precision would produce garbage",
            where=f"stage {ctx.name}", how=f"set export_onnx.tensorrt_dtype: {' or '.join(others)}",
        )
    measured = max(config.quantized_parity_tolerance,
                   2 * gap["logits_max_abs_diff"] + half_ulp(gap["max_abs_logit"], dtype))
    tolerance = config.half_parity_tolerance or measured
    basis = ("configured (half_parity_tolerance)" if config.half_parity_tolerance else
             f"measured: max(quantized_parity_tolerance {config.quantized_parity_tolerance:g}, 2 x |PyTorch {dtype} - "
             f"PyTorch float32| {gap['logits_max_abs_diff']:.4g} + half an ulp of the largest logit "
             f"{gap['max_abs_logit']:.4g} in {dtype})")
    return {"dtype": dtype, "setting": setting, "target": target.name, "model": half_model, "tolerance": tolerance,
            "tolerance_basis": basis, "pytorch_half_vs_float32": gap,
            "overflowed": sorted(overflowed) or None}


def _quant_method(checkpoint) -> str | None:
    import json

    config = json.loads((checkpoint / "config.json").read_text())
    return (config.get("quantization_config") or {}).get("quant_method")


def _quantized_weights(model, method: str) -> dict:
    """What the graph rewriters consume, read from the loaded quantized modules."""
    if method == "fp8":
        from edgekit.weights.fp8 import Fp8Linear

        out = {}
        for name, module in model.named_modules():
            if isinstance(module, Fp8Linear):
                scale = module.weight_scale.float()
                out[name] = {
                    "weight": (module.weight.float() * scale[:, None]).numpy(),
                    "weight_scale": scale.numpy(),
                    "input_scale": float(module.input_scale) if getattr(module, "input_scale", None) is not None else None,
                }
        return out
    from edgekit.weights.loader import QuantLinear

    return {name: module.quantized_weight() for name, module in model.named_modules() if isinstance(module, QuantLinear)}


def _write_float_twin(model, tokenizer, out_dir) -> None:
    """Replace quantized modules by float Linears holding the dequantized weights, and save
    that model: its ONNX export has exactly the weights the rewriters look for."""
    import torch

    from edgekit.weights.fp8 import Fp8Linear
    from edgekit.weights.loader import dequantize_model

    dequantize_model(model)
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, Fp8Linear):
                linear = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                linear.weight.data = child.weight.float() * child.weight_scale.float()[:, None]
                if child.bias is not None:
                    linear.bias.data = child.bias.data.float()
                setattr(parent, child_name, linear)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _build_fused(ctx, config, model, target_dir, references: dict) -> dict:
    """The fused ONNX Runtime graph of ``model`` into ``target_dir``; with a quantized lm_head
    its parity reference (``model`` with that lm_head) goes into ``references``."""
    from edgekit.export.ort_fused import build_fused_decoder, lm_head_reference

    with ctx.progress(None, "fused ONNX Runtime graph (GroupQueryAttention, MatMulNBits)"):
        report = build_fused_decoder(
            model, target_dir, lm_head_bits=config.fused_lm_head_bits, lm_head_group_size=config.fused_lm_head_group_size,
            accuracy_level=config.accuracy_level,
        )
    if config.fused_lm_head_bits is not None:
        references["onnxruntime"] = lm_head_reference(model, config.fused_lm_head_bits, config.fused_lm_head_group_size)
    return report


def _build_draft(ctx, model, target_dir, references: dict) -> dict:
    """The speculative-decoding draft of ``model``: the fused graph with int8 activations and,
    unless the checkpoint quantized its lm_head itself, an 8-bit lm_head (the largest matrix a
    small model reads per token). Its numbers differ from the model's (parity is checked with
    draft_parity_tolerance); a draft only proposes tokens, the large branch decides them."""
    from edgekit.export.ort_fused import build_fused_decoder, lm_head_reference
    from edgekit.weights.loader import QuantLinear

    head = model.get_output_embeddings()
    lm_head_bits = None if isinstance(head, QuantLinear) else 8
    with ctx.progress(None, "draft graph (int8 activations, 8-bit lm_head)"):
        report = build_fused_decoder(model, target_dir, lm_head_bits=lm_head_bits, lm_head_group_size=32, accuracy_level=4)
    if lm_head_bits is not None:
        references[DRAFT_VARIANT] = lm_head_reference(model, lm_head_bits, 32)
    return report


def _write_side_files(model, tokenizer, out_dir) -> None:
    """config.json (without quantization_config, as for the float twin), generation_config.json
    and the tokenizer files, as optimum writes them next to a graph."""
    import json

    config = json.loads(model.config.to_json_string(use_diff=True))
    config.pop("quantization_config", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _rewrite(fmt: str, method: str, src, dst, weights, accuracy_level: int) -> dict:
    from edgekit.export import quantized

    if method == "fp8":
        return quantized.to_fp8_qdq(src, dst, weights)
    if fmt == "onnxruntime":
        return quantized.to_matmulnbits(src, dst, weights, accuracy_level=accuracy_level or None)
    return quantized.to_blockwise_dq(src, dst, weights, opset=21)


def _check_variants(ctx, model, tokenizer, record, tolerances, prompts, references: dict | None = None,
                    models: dict | None = None) -> dict:
    """``references``: variant -> a context manager that makes ``model`` that variant's
    reference for the duration of its check (the fused graph's quantized lm_head); ``models``:
    variant -> another reference model (the model in the half precision of that graph)."""
    import contextlib
    import json

    from edgekit.errors import ParityError
    from edgekit.export.parity import check_parity

    metrics: dict = {}
    for fmt, rel in record["variants"].items():
        with ctx.progress(None, f"parity of the {fmt} graph vs PyTorch on {len(prompts)} prompts"):
            with (references or {}).get(fmt) or contextlib.nullcontext():
                parity = check_parity((models or {}).get(fmt, model), tokenizer, ctx.output_dir / rel, prompts=prompts)
        parity["tolerance"] = tolerances[fmt]
        record["parity"][fmt] = {k: parity[k] for k in ("logits_max_abs_diff", "present_max_abs_diff", "greedy_agreement", "tolerance")}
        if "ran_as" in parity:
            record["parity"][fmt]["ran_as"] = parity["ran_as"]
        name = "parity.json" if fmt == record["primary"] else f"parity-{fmt}.json"
        (ctx.output_dir / name).write_text(json.dumps(parity, indent=2) + "\n")
        suffix = "" if fmt == record["primary"] else f"_{fmt}"
        metrics[f"logits_max_abs_diff{suffix}"] = parity["logits_max_abs_diff"]
        metrics[f"present_max_abs_diff{suffix}"] = parity["present_max_abs_diff"]
        metrics[f"greedy_agreement{suffix}"] = parity["greedy_agreement"]
        if parity["logits_max_abs_diff"] > tolerances[fmt]:
            raise ParityError(
                f"the {fmt} ONNX graph's logits differ from PyTorch by {parity['logits_max_abs_diff']:.3g} "
                f"(tolerance {tolerances[fmt]:g}; per-output diffs in {name})",
                where=f"stage {ctx.name}",
                how="raise export_onnx.parity_tolerance (float), quantized_parity_tolerance or half_parity_tolerance "
                "(a float16/bfloat16 tensorrt graph; or tensorrt_dtype: float32) if the difference is expected, or report "
                "the model's architecture as an export bug",
            )
    metrics["parity_tolerance"] = tolerances[record["primary"]]
    return metrics


register_stage(
    "export_onnx",
    config=ExportOnnxConfig,
    summary="checkpoint -> ONNX decoder with KV cache (optimum-onnx; MatMulNBits / Q-DQ for quantized models), parity-checked",
    run="edgekit.export.stage:run_export_onnx",
    requires=(CHECKPOINT,),
    produces=ONNX,
    uses=("model",),  # trust_remote_code changes what optimum may execute
)
