"""The ``evaluate`` stage: held-out perplexity of the latest model, recorded in the manifest.

Place it after any stage that produces a model: after ``load`` it scores the checkpoint in
PyTorch, after ``export_onnx`` it scores the exported graph in ONNX Runtime, so the
manifest shows quality stage by stage.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from edgekit.pipeline.registry import CHECKPOINT, ONNX, StageConfig, register_stage


class EvaluateConfig(StageConfig):
    backend: Literal["auto", "pytorch", "onnxruntime"] = Field(
        "auto", description="auto = the latest model artifact: a checkpoint in PyTorch, an ONNX export in ONNX Runtime"
    )
    max_windows: int | None = Field(None, ge=1, description="score only the first N windows (quick checks)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="pytorch backend: where the checkpoint is scored (auto: a CUDA GPU if torch sees one; EDGEKIT_DEVICE overrides auto)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="pytorch backend: auto = float32 on the CPU; on a GPU the checkpoint's own half dtype (bf16 for most 7B checkpoints) or bf16/fp16, log-probabilities in float32"
    )


def run_evaluate(ctx) -> dict:
    import json

    from edgekit.weights.checkpoint import load_tokenizer
    from edgekit.models.text import read_token_splits

    wanted = {"auto": (CHECKPOINT, ONNX), "pytorch": (CHECKPOINT,), "onnxruntime": (ONNX,)}[ctx.config.backend]
    try:
        kind, model_dir = ctx.input(*wanted)
    except LookupError:
        from edgekit.errors import StageError

        raise StageError(
            f"evaluate with backend {ctx.config.backend} needs a {' or '.join(wanted)} from an earlier stage",
            where=f"stage {ctx.name}",
            how="move it after the stage that produces one, or use backend: auto",
        ) from None
    data = ctx.recipe.data
    tokenizer = load_tokenizer(model_dir, trust_remote_code=ctx.recipe.trust_remote_code)
    splits = read_token_splits(data, tokenizer, base_dir=ctx.recipe_dir, cache_dir=ctx.cache_dir, log=ctx.log)
    windows = min(splits.eval_windows, ctx.config.max_windows or splits.eval_windows)
    with ctx.progress(windows, f"perplexity ({'PyTorch' if kind == CHECKPOINT else 'ONNX Runtime'})") as bar:
        if kind == CHECKPOINT:
            from edgekit.measure.perplexity import perplexity_torch

            model, device, dtype = load_for_scoring(model_dir, ctx.config, stage=ctx.name, trust_remote_code=ctx.recipe.trust_remote_code)
            bar.update(description=f"{ctx.name}: perplexity (PyTorch, {device}, {dtype})")
            result = perplexity_torch(model, splits.evaluation, window=data.window, max_windows=windows, advance=bar.advance)
            result.update(device=device, dtype=dtype)
        else:
            from edgekit.measure.perplexity import perplexity_onnx

            variants = _onnx_variants(model_dir)
            scores = {}
            for fmt, rel in variants.items():
                bar.update(description=f"{ctx.name}: perplexity (ONNX Runtime, {fmt} graph)", completed=0)
                scores[fmt] = perplexity_onnx(model_dir / rel, splits.evaluation, window=data.window, max_windows=windows, advance=bar.advance)
            primary = next(iter(variants))
            result = dict(scores[primary])
            if len(variants) > 1 or primary != "float":
                result["graph"] = primary
                for fmt, score in scores.items():
                    if fmt != primary:
                        result[f"perplexity_{fmt}"] = round(score["perplexity"], 6)
    result = {"perplexity": round(result["perplexity"], 6), **{k: v for k, v in result.items() if k != "perplexity"}}
    result["backend"] = "pytorch" if kind == CHECKPOINT else "onnxruntime"
    result["evaluated"] = kind
    (ctx.output_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def load_for_scoring(model_dir, config, *, stage: str, trust_remote_code: bool = False):
    """(model on its device, device, dtype) for ``config.device`` / ``config.dtype``: float32
    on the CPU as before; on a GPU in half precision (see :mod:`edgekit.devices`)."""
    import json

    from edgekit.devices import check_dtype_on_device, compute_dtype, resolve_device
    from edgekit.weights.checkpoint import load_checkpoint

    device = resolve_device(config.device, stage=stage)
    saved = json.loads((model_dir / "config.json").read_text())
    checkpoint_dtype = saved.get("dtype") or saved.get("torch_dtype") or "float32"
    dtype = compute_dtype(config.dtype, device=device, checkpoint_dtype=checkpoint_dtype)
    check_dtype_on_device(dtype, device=device, stage=stage)
    model, _ = load_checkpoint(model_dir, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.to(device), device, dtype


def _onnx_variants(model_dir) -> dict:
    """{format: relative path}, primary first (export.json from export_onnx; else model.onnx)."""
    import json

    record = model_dir / "export.json"
    if not record.is_file():
        return {"float": "model.onnx"}
    data = json.loads(record.read_text())
    variants = data["variants"]
    primary = data.get("primary", next(iter(variants)))
    return {primary: variants[primary], **{k: v for k, v in variants.items() if k != primary}}


register_stage(
    "evaluate",
    config=EvaluateConfig,
    summary="held-out perplexity of the latest model (PyTorch or ONNX Runtime), into the manifest",
    run="edgekit.evaluate.stage:run_evaluate",
    requires=((CHECKPOINT, ONNX),),
    uses=("data",),
)
