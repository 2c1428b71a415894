"""The ``distill`` stage's settings (the recipe's ``distill:`` section), read by the stage and
by the training processes it launches."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from edgekit.models.generated import GenerationSettings, check_generated_size  # shared with prune and quantize
from edgekit.pipeline.registry import StageConfig

class DistillConfig(StageConfig):
    # settings whose defaults reproduce the distillation that existed before them (StageConfig)
    OPTIONAL_WHEN_DEFAULT = ("loss", "generated_ratio", "generation", "on_policy_ratio", "mode", "qad_scales",
                             "qad_weight_learning_rate", "qad_scale_learning_rate")
    teacher: str = Field("auto", description="'auto' (standard: the checkpoint the last prune stage read; qad: the checkpoint "
                         "the last quantize stage read, the unquantized parent) or an earlier checkpoint stage's name")
    mode: Literal["standard", "qad"] = Field("standard", description="standard: train a float student (its input must be a float "
                                             "checkpoint); qad: quantization-aware distillation of an integer-quantized input "
                                             "(gptq/rtn/awq; not fp8): trains the weights on their own GPTQ grid and writes "
                                             "the same GPTQ checkpoint format again (docs/distill.md)")
    qad_scales: Literal["frozen", "trainable"] = Field("frozen", description="qad: keep the checkpoint's per-group scales "
                                                       "(frozen) or train them with the weights (trainable, LSQ gradient); "
                                                       "zero points always stay the checkpoint's integers")
    qad_weight_learning_rate: float | None = Field(None, gt=0, le=1, description="qad: peak learning rate of the quantized "
                                                   "linears' latent weights (null: learning_rate, which then trains norms, "
                                                   "biases and every other parameter); same schedule")
    qad_scale_learning_rate: float | None = Field(None, gt=0, le=1, description="qad with trainable scales: peak learning "
                                                  "rate of the per-group scales (null: learning_rate); same schedule")
    steps: int = Field(1000, ge=1, description="optimizer steps")
    max_minutes: float | None = Field(None, gt=0, description="also stop after this much training time, evaluations and checkpoints included (then the run is not step-reproducible)")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of the KL term (loss scaled by T^2)")
    kl_weight: float = Field(1.0, ge=0, description="the distribution loss on logits (`loss`; default forward KL(teacher || student))")
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = Field("forward_kl", description="the distribution loss kl_weight weighs: forward_kl = "
                                                            "KL(teacher || student), reverse_kl = KL(student || teacher) (mode-seeking), "
                                                            "jsd = Jensen-Shannon divergence with beta 0.5; each times T^2")
    generated_ratio: float = Field(0.0, ge=0, le=1, description="share of training windows sampled by the teacher itself (`generation:`); "
                                   "the rest are the recipe's text. 0: the recipe's text only")
    generation: GenerationSettings = Field(default_factory=GenerationSettings, description="how the teacher samples the generated "
                                           "windows (used when generated_ratio > 0)")
    on_policy_ratio: float = Field(0.0, ge=0, le=1, description="share of optimizer steps trained on-policy (GKD): the student samples "
                                   "continuations of its windows' first tokens and the teacher scores every position (docs/distill.md: its cost)")
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

    @model_validator(mode="after")
    def _generation_fits(self):
        if self.generated_ratio > 0:
            check_generated_size(self.generation, sequence_length=self.sequence_length, window="training window")
        if self.on_policy_ratio > 0 and self.kl_weight == 0:
            raise ValueError("on_policy_ratio needs kl_weight > 0: on-policy steps train the distribution loss only")
        return self

    @model_validator(mode="after")
    def _qad_settings(self):
        for name in ("qad_scales", "qad_weight_learning_rate", "qad_scale_learning_rate"):
            if name in self.model_fields_set and self.mode != "qad":
                raise ValueError(f"{name} applies to mode qad only: set 'mode: qad' or remove {name}")
        if self.qad_scale_learning_rate is not None and self.qad_scales != "trainable":
            raise ValueError("qad_scale_learning_rate trains the scales: set 'qad_scales: trainable' or remove qad_scale_learning_rate")
        return self
