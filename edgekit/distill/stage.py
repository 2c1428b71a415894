"""The ``distill`` stage: pruned student checkpoint + teacher checkpoint -> distilled student.

Teacher = the model before pruning (the checkpoint the most recent ``prune`` stage read),
or any earlier checkpoint stage named by ``teacher:``. With ``mode: qad`` the student is an
integer-quantized checkpoint trained on its own grid (:mod:`edgekit.distill.qad`) and the
output is a quantized checkpoint again; ``teacher: auto`` is then the checkpoint the most
recent ``quantize`` stage read. Training runs on the calibration part
of the recipe's text (never the held-out split), mixed with sequences the teacher samples itself
when ``generated_ratio`` > 0 (:mod:`edgekit.models.generated`), with accelerate, in this process or under
``accelerate launch`` when ``processes`` > 1 or an accelerate config file is given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from edgekit.distill.config import DistillConfig
from edgekit.pipeline.registry import CHECKPOINT, EarlierStage, ReferenceProblem, register_stage


def _check_mode(config: DistillConfig, earlier: Sequence[EarlierStage]) -> list[int]:
    """The indices of the quantize stages before this one, after checking that the mode fits
    the input: a checkpoint stays quantized once a quantize stage has run (a standard distill
    refuses it, a qad distill keeps it quantized), so the input is quantized exactly when a
    quantize stage comes earlier. Whether that quantization is an integer one (not fp8) is in
    the quantize stage's settings: planning/chain.py checks it at validation, the run again."""
    quantizes = [i for i, s in enumerate(earlier) if s.type == "quantize"]
    if config.mode == "qad" and not quantizes:
        raise ReferenceProblem(
            "distill mode qad trains a quantized checkpoint, but no quantize stage comes before it",
            how="put a quantize stage (gptq, rtn or awq) before this distill, or use mode: standard",
            field="mode",
        )
    if config.mode == "standard" and quantizes:
        raise ReferenceProblem(
            f"distill's input is quantized (by stage '{earlier[quantizes[-1]].name}'), and standard distillation trains float weights",
            how="set 'mode: qad' to distil the quantized weights on their grid (quantization-aware), or put distill before quantize",
            field="mode",
        )
    return quantizes


def resolve_teacher(config: DistillConfig, earlier: Sequence[EarlierStage]) -> dict[str, int]:
    """Index of the teacher's stage among the earlier ones (pure: used at validation and run)."""
    quantizes = _check_mode(config, earlier)
    if config.teacher != "auto":
        for index in range(len(earlier) - 1, -1, -1):
            if earlier[index].name == config.teacher:
                if earlier[index].produces != CHECKPOINT:
                    raise ReferenceProblem(
                        f"teacher '{config.teacher}' is a {earlier[index].type} stage, which produces no checkpoint",
                        how="name a stage that produces a checkpoint (load, prune, distill, ...)",
                        field="teacher",
                    )
                return {"teacher": index}
        names = [s.name for s in earlier if s.produces == CHECKPOINT]
        raise ReferenceProblem(
            f"teacher '{config.teacher}' is not an earlier stage",
            how=f"use 'auto' or one of: {', '.join(names) or '(none)'}",
            field="teacher",
        )
    if config.mode == "qad":  # the unquantized parent: what the quantized model is measured against
        before = [i for i in range(quantizes[-1]) if earlier[i].produces == CHECKPOINT]
        if before:
            return {"teacher": before[-1]}
        raise ReferenceProblem(
            "distill mode qad has no teacher: 'auto' means the checkpoint the last quantize stage read, and none comes before it",
            how="set 'teacher:' to an earlier checkpoint stage's name",
            field="teacher",
        )
    prunes = [i for i, s in enumerate(earlier) if s.type == "prune"]
    if prunes:
        before = [i for i in range(prunes[-1]) if earlier[i].produces == CHECKPOINT]
        if before:
            return {"teacher": before[-1]}
    raise ReferenceProblem(
        "distill has no teacher: 'auto' means the checkpoint the last prune stage read, and there is no prune stage before it",
        how="put a prune stage before distill, or set 'teacher:' to an earlier checkpoint stage's name",
        field="teacher",
    )


def _token_file(ctx) -> str | None:
    """A large corpus's token file, made once in the run cache by this process (shared with the
    other stages; every training process memory-maps it): edgekit.models.text.token_file."""
    from edgekit.weights.checkpoint import load_tokenizer
    from edgekit.models.text import TOKEN_FILE_ABOVE, token_file

    data = ctx.recipe.data
    if not data.token_budget or data.token_budget <= TOKEN_FILE_ABOVE:
        return None
    tokenizer = load_tokenizer(ctx.inputs[CHECKPOINT], trust_remote_code=bool(ctx.recipe.trust_remote_code))
    path = token_file(data, tokenizer, base_dir=ctx.recipe_dir, cache_dir=ctx.cache_dir, log=ctx.log)
    return str(path) if path is not None else None


def run_distill(ctx) -> dict:
    """Distil the input checkpoint from the teacher; resumable from ``ctx.work_dir``.

    Writes the distilled checkpoint (the input's dtype), ``distill.json`` (config, evaluations,
    per-step losses: no timings, so a rerun hashes the same), ``distill_curve.png`` and the
    input's ``pruning.json`` into ``ctx.output_dir``; returns the metrics for the manifest.
    """
    from edgekit.distill.launch import launch
    from edgekit.distill.loop import train
    from edgekit.distill.spec import TrainSpec, check_checkpoints

    config = ctx.config
    data = ctx.recipe.data
    spec = TrainSpec(
        student=str(ctx.inputs[CHECKPOINT]),
        teacher=str(ctx.references["teacher"]),
        output_dir=str(ctx.output_dir),
        work_dir=str(ctx.work_dir),
        config=config.model_dump(mode="json"),
        # data.source only: the evaluation sets (data.eval_sets) never reach training.
        data={**data.model_dump(mode="json", exclude={"eval_sets"}), "token_file": _token_file(ctx)},
        recipe_dir=str(ctx.recipe_dir),
        trust_remote_code=bool(ctx.recipe.trust_remote_code),
        stage=ctx.name,
    )
    check_checkpoints(spec)  # before any process starts: a clear error for a quantized input
    if config.generated_ratio > 0:  # sampled once, here, before any training process starts
        from edgekit.models.generated import generated_data

        spec.generated = generated_data(ctx, Path(ctx.references["teacher"]), config.generation,
                                        length=config.sequence_length, role="teacher")
    if config.processes == 1 and config.accelerate_config is None:
        return train(spec, reporter=ctx)
    return launch(spec, ctx)


register_stage(
    "distill",
    config=DistillConfig,
    summary="knowledge distillation from the model before pruning, or quantization-aware (mode qad) from the model before quantize (accelerate; resumable)",
    run="edgekit.distill.stage:run_distill",
    requires=(CHECKPOINT,),
    produces=CHECKPOINT,
    uses=("data",),
    references=resolve_teacher,
)
