"""The ``distill`` stage's settings (the recipe's ``distill:`` section), read by the stage and
by the training processes it launches."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from edgekit.pipeline.registry import StageConfig


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
