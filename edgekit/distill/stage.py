"""The ``distill`` stage: pruned student checkpoint + teacher checkpoint -> distilled student.

Teacher = the model before pruning (the checkpoint the most recent ``prune`` stage read),
or any earlier checkpoint stage named by ``teacher:``. Training runs on the calibration part
of the recipe's text (never the held-out split) with accelerate, in this process or under
``accelerate launch`` when ``processes`` > 1 or an accelerate config file is given.
"""

from __future__ import annotations

from typing import Literal, Sequence

from pydantic import Field, model_validator

from edgekit.pipeline.registry import CHECKPOINT, EarlierStage, ReferenceProblem, StageConfig, register_stage


class DistillConfig(StageConfig):
    teacher: str = Field("auto", description="'auto' (the checkpoint the last prune stage read) or an earlier stage's name")
    steps: int = Field(1000, ge=1, description="optimizer steps")
    max_minutes: float | None = Field(None, gt=0, description="also stop after this much training time, evaluations and checkpoints included (then the run is not step-reproducible)")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of the KL term (loss scaled by T^2)")
    kl_weight: float = Field(1.0, ge=0, description="forward KL(teacher || student) on logits")
    ce_weight: float = Field(0.0, ge=0, description="cross-entropy on the next token")
    hidden_weight: float = Field(0.0, ge=0, description="MSE between student and mapped teacher hidden states (heavy depth pruning)")
    learning_rate: float = Field(1e-4, gt=0, description="AdamW peak learning rate")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decay ends at learning_rate x this")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (matrices only: never norms or biases)")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the gradient norm to this (null: no clipping)")
    warmup_steps: int = Field(50, ge=0, description="linear warmup before the cosine decay")
    batch_size: int = Field(8, ge=1, description="sequences per micro-batch (per process)")
    gradient_accumulation: int = Field(1, ge=1, description="micro-batches per optimizer step")
    sequence_length: int = Field(512, ge=16, description="tokens per training sequence")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto: bf16 on a GPU that has it, else fp16 on GPU; on CPU bf16 where oneDNN has native bf16 (AVX512-BF16/AMX), else fp32")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass (less memory, more compute)")
    freeze_embeddings: bool = Field(False, description="keep embeddings / lm_head fixed (faster, fewer optimizer states)")
    checkpoint_every: int = Field(100, ge=1, description="save resumable state every N steps (under FSDP: one shard per process; resume with the same process count)")
    eval_every: int = Field(100, ge=1, description="held-out perplexity every K steps (into the manifest and the curve)")
    eval_windows: int | None = Field(None, ge=1, description="held-out windows per periodic evaluation (null: all); the first (step 0) and the last use all")
    seed: int = Field(0, description="seeds the order of the training windows (permuted per epoch)")
    processes: int = Field(1, ge=1, description=">1: run under `accelerate launch --num_processes N` (DDP; gloo on CPU, one GPU each on CUDA)")
    accelerate_config: str | None = Field(None, description="an accelerate config file (FSDP, multi-node; relative to the recipe): run under `accelerate launch --config_file`")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when torch sees a GPU, else the CPU")
    gpu_memory_gb: float = Field(80.0, gt=0, le=4096, description="memory of each GPU the distillation runs on (GB): "
                                 "recipe validation checks the predicted memory per GPU against it (docs/validation.md)")

    @model_validator(mode="after")
    def _some_loss(self):
        if self.kl_weight == 0 and self.ce_weight == 0 and self.hidden_weight == 0:
            raise ValueError("kl_weight, ce_weight and hidden_weight are all 0: give at least one a positive weight")
        return self


def resolve_teacher(config: DistillConfig, earlier: Sequence[EarlierStage]) -> dict[str, int]:
    """Index of the teacher's stage among the earlier ones (pure: used at validation and run)."""
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
    from edgekit.models.checkpoint import load_tokenizer
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
    from edgekit.distill.train import TrainSpec, check_checkpoints, launch, train

    config = ctx.config
    data = ctx.recipe.data
    spec = TrainSpec(
        student=str(ctx.inputs[CHECKPOINT]),
        teacher=str(ctx.references["teacher"]),
        output_dir=str(ctx.output_dir),
        work_dir=str(ctx.work_dir),
        config=config.model_dump(mode="json"),
        data={**data.model_dump(mode="json"), "token_file": _token_file(ctx)},
        recipe_dir=str(ctx.recipe_dir),
        trust_remote_code=bool(ctx.recipe.trust_remote_code),
        stage=ctx.name,
    )
    check_checkpoints(spec)  # before any process starts: a clear error for a quantized input
    if config.processes == 1 and config.accelerate_config is None:
        return train(spec, reporter=ctx)
    return launch(spec, ctx)


register_stage(
    "distill",
    config=DistillConfig,
    summary="knowledge distillation from the model before pruning (accelerate; resumable)",
    run="edgekit.distill.stage:run_distill",
    requires=(CHECKPOINT,),
    produces=CHECKPOINT,
    uses=("data",),
    references=resolve_teacher,
)
