"""The ``evaluate`` stage: held-out quality of the latest model, recorded in the manifest.

Place it after any stage that produces a model: after ``load`` it scores the checkpoint in
PyTorch, after ``export_onnx`` it scores the exported graph in ONNX Runtime, so the
manifest shows quality stage by stage.

Every evaluate stage scores more than one held-out text (docs/data.md, "What each number
means"): ``in_domain``, the end of ``data.source`` (the text the other stages calibrate and
distil on, before that end), and each of ``data.eval_sets`` (by default ``ood``, the READMEs
of edgekit's installed dependencies: a source no stage calibrates or trains on). On each it
reports perplexity, and, against the teacher (the run's first checkpoint: the model the
recipe loaded), the top-1 agreement and KL(teacher || student).
"""

from __future__ import annotations

from typing import Literal, Sequence

from pydantic import Field

from edgekit.pipeline.registry import CHECKPOINT, ONNX, EarlierStage, ReferenceProblem, StageConfig, register_stage


class EvaluateConfig(StageConfig):
    backend: Literal["auto", "pytorch", "onnxruntime"] = Field(
        "auto", description="auto = the latest model artifact: a checkpoint in PyTorch, an ONNX export in ONNX Runtime"
    )
    max_windows: int | None = Field(None, ge=1, description="score only the first N windows of each set (quick checks)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="pytorch backend (and the teacher): where the checkpoint is scored (auto: a CUDA GPU if torch sees one; EDGEKIT_DEVICE overrides auto)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="pytorch backend (and the teacher): auto = float32 on the CPU; on a GPU the checkpoint's own half dtype (bf16 for most 7B checkpoints) or bf16/fp16, log-probabilities in float32"
    )
    teacher: str = Field(
        "auto", min_length=1, max_length=128,
        description="the model the scored one is compared with (top-1 agreement, KL(teacher || student), on every "
        "set): auto = the run's first checkpoint (the load stage's: the model the recipe starts from), an earlier "
        "checkpoint stage's name, or none (perplexity only; the teacher costs one more model in memory). Not "
        "compared when the scored model is the teacher itself",
    )


def resolve_teacher(config: EvaluateConfig, earlier: Sequence[EarlierStage]) -> dict[str, int]:
    """``{"teacher": index of the earlier stage}`` or ``{}`` (none). Pure: validation and run."""
    if config.teacher == "none":
        return {}
    if config.teacher == "auto":
        first = next((i for i, s in enumerate(earlier) if s.produces == CHECKPOINT), None)
        return {} if first is None else {"teacher": first}
    for index in range(len(earlier) - 1, -1, -1):
        if earlier[index].name == config.teacher:
            if earlier[index].produces != CHECKPOINT:
                raise ReferenceProblem(f"teacher '{config.teacher}' is a {earlier[index].type} stage, which produces no checkpoint",
                                       how="name a stage that produces a checkpoint (load, prune, distill, ...), or use auto or none",
                                       field="teacher")
            return {"teacher": index}
    names = [s.name for s in earlier if s.produces == CHECKPOINT]
    raise ReferenceProblem(f"teacher '{config.teacher}' is not an earlier stage",
                           how=f"use auto, none or one of: {', '.join(names) or '(none)'}", field="teacher")


def _rounded(score: dict) -> dict:
    return {k: round(v, 6) if k in ("perplexity", "agreement", "kl") else v for k, v in score.items()}


def run_evaluate(ctx) -> dict:
    import json

    from edgekit.weights.checkpoint import load_tokenizer
    from edgekit.models.text import IN_DOMAIN, data_record, read_eval_set, read_token_splits, resolve_eval_sets

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
    trust = ctx.recipe.trust_remote_code
    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust)
    splits = read_token_splits(data, tokenizer, base_dir=ctx.recipe_dir, cache_dir=ctx.cache_dir, log=ctx.log)
    # (label, token ids, what the text is): data.source's held-out end, then each other set.
    # The in-domain record says which text it is (sha256; builtin:mixed: each kind's share of the held-out end).
    sets = [(IN_DOMAIN, splits.evaluation, data_record(data, base_dir=ctx.recipe_dir, splits=splits, part="evaluation"))]
    for entry in resolve_eval_sets(data):
        ids, info = read_eval_set(entry, tokenizer, window=data.window, base_dir=ctx.recipe_dir)
        sets.append((entry.label, ids, info))

    def windows_of(ids) -> int:
        return min(len(ids) // data.window, ctx.config.max_windows or len(ids) // data.window)

    teacher, teacher_name = _teacher(ctx, model_dir)
    variants = _onnx_variants(model_dir) if kind == ONNX else {}
    # ONNX: every graph on the in-domain split (as before), the primary graph on the other sets.
    total = sum(windows_of(ids) for _, ids, _ in sets) + max(0, len(variants) - 1) * windows_of(splits.evaluation)
    scores: dict[str, dict] = {}
    extra_graphs: dict[str, dict] = {}
    with ctx.progress(total, f"held-out sets ({'PyTorch' if kind == CHECKPOINT else 'ONNX Runtime'})") as bar:
        if kind == CHECKPOINT:
            from edgekit.measure.perplexity import perplexity_torch

            model, device, dtype = load_for_scoring(model_dir, ctx.config, stage=ctx.name, trust_remote_code=trust)
            for label, ids, _ in sets:
                bar.update(description=f"{ctx.name}: {label} (PyTorch, {device}, {dtype})")
                scores[label] = perplexity_torch(model, ids, window=data.window, max_windows=windows_of(ids),
                                                 advance=bar.advance, teacher=teacher)
            extra = {"device": device, "dtype": dtype}
        else:
            from edgekit.measure.perplexity import perplexity_onnx

            primary = next(iter(variants))
            for label, ids, _ in sets:
                bar.update(description=f"{ctx.name}: {label} (ONNX Runtime, {primary} graph)")
                scores[label] = perplexity_onnx(model_dir / variants[primary], ids, window=data.window,
                                                max_windows=windows_of(ids), advance=bar.advance, teacher=teacher)
            for fmt, rel in list(variants.items())[1:]:
                bar.update(description=f"{ctx.name}: {IN_DOMAIN} (ONNX Runtime, {fmt} graph)")
                extra_graphs[fmt] = perplexity_onnx(model_dir / rel, splits.evaluation, window=data.window,
                                                    max_windows=windows_of(splits.evaluation), advance=bar.advance)
            extra = {}
            if len(variants) > 1 or primary != "float":
                extra["graph"] = primary
                for fmt, score in extra_graphs.items():
                    extra[f"perplexity_{fmt}"] = round(score["perplexity"], 6)
    # The in-domain keys stay where they always were (perplexity, nll, windows, window, tokens).
    result = _rounded(scores[IN_DOMAIN])
    result.update(extra)
    result["backend"] = "pytorch" if kind == CHECKPOINT else "onnxruntime"
    result["evaluated"] = kind
    result["teacher"] = teacher_name
    result["sets"] = {label: {**info, **_rounded(scores[label])} for label, _, info in sets}
    (ctx.output_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _teacher(ctx, model_dir):
    """(the teacher loaded for scoring or None, what the manifest says about it)."""
    teacher_dir = ctx.references.get("teacher")
    if teacher_dir is None:
        return None, "none"
    if teacher_dir.resolve() == model_dir.resolve():
        return None, "self"  # the scored model is the teacher: nothing to compare
    name = next((r.name for r in ctx.history if r.dir == teacher_dir), str(teacher_dir))
    model, _, _ = load_for_scoring(teacher_dir, ctx.config, stage=ctx.name, trust_remote_code=ctx.recipe.trust_remote_code)
    return model.eval(), name


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
    summary="held-out perplexity (in-domain and other sets) of the latest model, with top-1 agreement and KL to "
    "the teacher (PyTorch or ONNX Runtime), into the manifest",
    run="edgekit.evaluate.stage:run_evaluate",
    requires=((CHECKPOINT, ONNX),),
    uses=("data", "eval_sets"),
    references=resolve_teacher,
)
