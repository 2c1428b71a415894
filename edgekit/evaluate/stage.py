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


def run_evaluate(ctx) -> dict:
    import json

    from edgekit.models.checkpoint import load_tokenizer
    from edgekit.models.text import resolve_text_source, tokenize_splits

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
    text = resolve_text_source(data.source, base_dir=ctx.recipe_dir).read(data.text_field)
    splits = tokenize_splits(text, tokenizer, eval_tokens=data.eval_tokens, window=data.window)
    windows = min(splits.eval_windows, ctx.config.max_windows or splits.eval_windows)
    with ctx.progress(windows, f"perplexity ({'PyTorch' if kind == CHECKPOINT else 'ONNX Runtime'})") as bar:
        if kind == CHECKPOINT:
            from edgekit.models.checkpoint import load_checkpoint
            from edgekit.evaluate.perplexity import perplexity_torch

            model, _ = load_checkpoint(model_dir, trust_remote_code=ctx.recipe.trust_remote_code)
            result = perplexity_torch(model, splits.evaluation, window=data.window, max_windows=windows, advance=bar.advance)
        else:
            from edgekit.evaluate.perplexity import perplexity_onnx

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
