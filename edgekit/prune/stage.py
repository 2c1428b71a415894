"""The ``prune`` stage: checkpoint -> smaller checkpoint (a standard Hugging Face directory).

Importance comes from the teacher's activations on calibration text (or from weight
magnitudes, the baseline); the shape from explicit sizes or a parameter budget (see
:mod:`edgekit.prune.shapes`, checked when the recipe is validated). The output holds the
pruned model, the tokenizer and ``pruning.json``: both shapes, parameter counts and every
kept unit (teacher indices), which ``distill`` uses to map hidden states onto the teacher.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from edgekit.models.generated import GeneratedCalibration
from edgekit.pipeline.registry import CHECKPOINT, register_stage


class PruneConfig(GeneratedCalibration):
    importance: Literal["activation", "magnitude"] = Field("activation", description="activation (calibration forward passes) or magnitude (weights only: the baseline)")
    depth_metric: Literal["block_importance", "perplexity_drop"] = Field(
        "block_importance", description="which layers go: lowest 1 - cos(input, output), or smallest calibration-loss increase when skipped"
    )
    params: float | None = Field(None, gt=0, lt=1, description="parameter budget as a fraction of the teacher (embeddings included)")
    axes: list[Literal["mlp", "hidden", "heads", "depth"]] = Field(
        ["mlp", "hidden"], min_length=1, description="what a 'params' budget may shrink (default: Minitron's width recipe)"
    )
    hidden_size: int | None = Field(None, ge=1)
    intermediate_size: int | None = Field(None, ge=1)
    num_layers: int | None = Field(None, ge=1)
    num_attention_heads: int | None = Field(None, ge=1)
    num_key_value_heads: int | None = Field(None, ge=1)
    width_multiple: int | None = Field(
        None, ge=16, le=8192, description="round every width a 'params' budget solves (hidden, MLP, query heads x head_dim) to a multiple of this: the later quantize group_size (e.g. 128) then divides every layer"
    )
    calibration_samples: int = Field(64, ge=1, description="calibration windows (from the text before the held-out split)")
    sequence_length: int = Field(512, ge=16, description="tokens per calibration window")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where importance is measured (auto: a CUDA GPU if torch sees one; EDGEKIT_DEVICE overrides auto)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="the teacher's forward passes: auto = float32 on the CPU, half precision on a GPU (bf16 where native); statistics always accumulate in float32"
    )
    reconstruct: bool = Field(
        False, description="refit each layer's kept mlp.down_proj / self_attn.o_proj columns by least squares on the calibration "
        "windows, so they take over what the removed MLP channels / heads wrote (one more pass; docs/pruning.md)"
    )
    reconstruct_ridge: float = Field(1e-3, gt=0, le=1, description="ridge of that fit, times the kept units' mean squared activation")

    OPTIONAL_WHEN_DEFAULT = GeneratedCalibration.OPTIONAL_WHEN_DEFAULT + ("reconstruct", "reconstruct_ridge")

    @model_validator(mode="after")
    def _one_way(self):
        explicit = [self.hidden_size, self.intermediate_size, self.num_layers, self.num_attention_heads, self.num_key_value_heads]
        if self.params is None and all(v is None for v in explicit):
            raise ValueError("give a parameter budget ('params') or at least one explicit size")
        if self.params is not None and any(v is not None for v in explicit):
            raise ValueError("give either 'params' or explicit sizes, not both")
        if self.generated_ratio > 0 and self.importance == "magnitude" and self.depth_metric != "perplexity_drop" and not self.reconstruct:
            raise ValueError("importance magnitude reads no calibration data: remove generated_ratio, or use importance activation")
        if self.reconstruct:
            removes = (any(a in self.axes for a in ("mlp", "heads")) if self.params is not None
                       else self.intermediate_size is not None or self.num_attention_heads is not None)
            if not removes:
                raise ValueError("reconstruct refits what removed MLP channels or attention heads wrote, and this prune removes "
                                 "neither: add mlp or heads to axes (or give intermediate_size / num_attention_heads), or drop reconstruct")
        if self.width_multiple is not None and self.width_multiple % 16:
            raise ValueError(f"width_multiple {self.width_multiple} is not a multiple of 16 (use the quantize group_size: 32, 64 or 128)")
        return self


def run_prune(ctx) -> dict:
    import json
    import time

    import torch

    import shutil
    from pathlib import Path

    from edgekit.devices import check_dtype_on_device, compute_dtype, resolve_device
    from edgekit.errors import StageError
    from edgekit.weights.checkpoint import load_checkpoint
    from edgekit.models.text import read_token_splits
    from edgekit.prune.apply import prune_model, select_units
    from edgekit.prune.importance import activation_importance, magnitude_importance, perplexity_drop
    from edgekit.weights.layers import decoder_parts
    from edgekit.prune.shapes import ShapeError, describe, plan_shape, shape_dict, total_parameters
    from edgekit.sizing import shape_from_config

    config = ctx.config
    source = ctx.inputs[CHECKPOINT]
    saved = json.loads((source / "config.json").read_text())
    if saved.get("quantization_config"):
        raise StageError("the input checkpoint is quantized", where=f"stage {ctx.name}",
                         how="prune a float checkpoint: put prune before quantize")
    teacher_shape = shape_from_config(saved)
    try:
        shape = plan_shape(teacher_shape, config)
    except ShapeError as exc:
        raise StageError(str(exc), where=f"stage {ctx.name}", how=exc.how) from None
    dtype = saved.get("dtype") or saved.get("torch_dtype") or "float32"
    # Importance is measured in float32 on the CPU, in half precision on a GPU (the hooks
    # accumulate in float32 either way); the pruned weights keep the checkpoint's dtype.
    device = resolve_device(config.device, stage=ctx.name)
    run_dtype = compute_dtype(config.dtype, device=device, checkpoint_dtype=dtype)
    check_dtype_on_device(run_dtype, device=device, stage=ctx.name)
    model, tokenizer = load_checkpoint(source, dtype=run_dtype, trust_remote_code=ctx.recipe.trust_remote_code)
    try:
        decoder_parts(model)
    except ValueError as exc:
        raise StageError(str(exc), where=f"stage {ctx.name}", how="prune a Llama/Qwen/Mistral-style checkpoint, or drop the prune stage") from None
    started = time.perf_counter()
    # Skipping each layer in turn costs a pass over the calibration windows per layer: only
    # worth it when layers are actually removed.
    measure_drop = config.depth_metric == "perplexity_drop" and shape.num_layers < teacher_shape.num_layers
    samples, generated = [], None
    if config.importance == "activation" or measure_drop or config.reconstruct:
        from edgekit.models.generated import calibration_with_generated

        data = ctx.recipe.data
        splits = read_token_splits(data, tokenizer, base_dir=ctx.recipe_dir, cache_dir=ctx.cache_dir, log=ctx.log)
        samples, generated = calibration_with_generated(ctx, splits.calibration, config, source)
    # Onto the device only now: sampling generated windows loads a second copy of the model there.
    model.to(device)
    if config.importance == "activation":
        with ctx.progress(len(samples), f"activation importance on {len(samples)}×{config.sequence_length} tokens ({device}, {run_dtype})") as bar:
            importance = activation_importance(model, samples, advance=bar.advance)
    else:
        importance = magnitude_importance(model)
    if measure_drop:
        with ctx.progress(None, f"calibration loss with each of {teacher_shape.num_layers} layers skipped"):
            importance.layers = perplexity_drop(model, samples).float()
    kept = select_units(model, importance, shape)
    reconstruction = None
    if config.reconstruct:
        from edgekit.prune.reconstruct import reconstruct_outputs, reconstruction_passes

        passes = reconstruction_passes(model, kept)
        with ctx.progress(passes * len(samples), f"refitting output projections on {len(samples)}×{config.sequence_length} "
                          f"tokens ({passes} pass{'es' if passes != 1 else ''})") as bar:
            reconstruction = reconstruct_outputs(model, kept, samples, ridge=config.reconstruct_ridge, advance=bar.advance)
    # Slice on the CPU from weights in the checkpoint's own dtype: a float32 checkpoint measured
    # in half precision on a GPU must not be saved rounded to half.
    if device != "cpu":
        model.to("cpu")
        torch.cuda.empty_cache()
    if run_dtype != "float32" and run_dtype != dtype:
        del model
        model, _ = load_checkpoint(source, dtype="float32", trust_remote_code=ctx.recipe.trust_remote_code)
    student = prune_model(model, kept)
    if reconstruction is not None:
        from edgekit.prune.reconstruct import apply_reconstruction

        apply_reconstruction(student, kept, reconstruction)
    if dtype in ("float16", "bfloat16"):
        student = student.to(getattr(torch, dtype))
    student.save_pretrained(ctx.output_dir, safe_serialization=True)
    tokenizer.save_pretrained(ctx.output_dir)
    # The pruned model is built anew, with transformers' default generation config: keep the
    # model's own (its sampling settings reach the bundle's runtime.json).
    if (Path(source) / "generation_config.json").is_file():
        shutil.copyfile(Path(source) / "generation_config.json", ctx.output_dir / "generation_config.json")
    before, after = total_parameters(teacher_shape), total_parameters(shape)
    counted = sum(p.numel() for p in student.parameters())  # tied weights appear once
    if counted != after:
        raise StageError(f"pruned model has {counted} parameters, the shape arithmetic says {after}",
                         where=f"stage {ctx.name}", how="report this as a bug (unsupported layer layout?)")
    record = {
        "importance": config.importance,
        "depth_metric": config.depth_metric if shape.num_layers < teacher_shape.num_layers else None,
        "calibration_samples": len(samples),
        "importance_dtype": run_dtype,
        "teacher": shape_dict(teacher_shape),
        "student": shape_dict(shape),
        "parameter_fraction": round(after / before, 4),
        "kept": kept.as_json(),
        "layer_scores": [round(float(s), 6) for s in importance.layers],
    }
    if generated is not None:  # part of the importance came from the input model's own samples
        record["generated_calibration"] = generated
    if reconstruction is not None:
        record["reconstruction"] = {"ridge": config.reconstruct_ridge, **reconstruction.summary()}
    (ctx.output_dir / "pruning.json").write_text(json.dumps(record, indent=1) + "\n")
    ctx.log(f"{describe(teacher_shape)} -> {describe(shape)}: {before / 1e6:.1f}M -> {after / 1e6:.1f}M parameters ({after / before:.1%})")
    return {
        "parameters_before": before,
        "parameters_after": after,
        "parameter_fraction": round(after / before, 4),
        "shape": describe(shape),
        "importance_seconds": round(time.perf_counter() - started, 2),
        **(reconstruction.mean_errors() if reconstruction is not None else {}),
        "device": device,
        "dtype": run_dtype,
    }


register_stage(
    "prune",
    config=PruneConfig,
    summary="structured width/depth pruning by activation importance -> smaller HF checkpoint",
    run="edgekit.prune.stage:run_prune",
    requires=(CHECKPOINT,),
    produces=CHECKPOINT,
    uses=("data",),
)
