"""Stages designed for later issues but not built yet.

Their parameters are fixed here so recipes that use them (``recipes/7b_to_orin.yaml``)
validate today with strict checking; ``edgekit compress`` refuses them before any work
starts, naming the issue they land with. When a stage is built, its config moves into its
own folder (``edgekit/prune/stage.py``, ...) together with its ``run`` function, and the
registration here is deleted.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from edgekit.pipeline.registry import BUNDLE, CHECKPOINT, StageConfig, register_stage


class PruneConfig(StageConfig):
    importance: Literal["activation", "magnitude"] = "activation"
    depth_metric: Literal["block_importance", "perplexity_drop"] = "block_importance"
    params: float | None = Field(None, gt=0, lt=1, description="parameter budget as a fraction of the teacher")
    hidden_size: int | None = Field(None, ge=1)
    intermediate_size: int | None = Field(None, ge=1)
    num_layers: int | None = Field(None, ge=1)
    num_attention_heads: int | None = Field(None, ge=1)
    num_key_value_heads: int | None = Field(None, ge=1)
    calibration_samples: int = Field(64, ge=1)
    sequence_length: int = Field(512, ge=16)

    @model_validator(mode="after")
    def _one_way(self):
        explicit = [self.hidden_size, self.intermediate_size, self.num_layers, self.num_attention_heads, self.num_key_value_heads]
        if self.params is None and all(v is None for v in explicit):
            raise ValueError("give a parameter budget ('params') or at least one explicit size")
        if self.params is not None and any(v is not None for v in explicit):
            raise ValueError("give either 'params' or explicit sizes, not both")
        return self


class DistillConfig(StageConfig):
    steps: int = Field(1000, ge=1)
    max_minutes: float | None = Field(None, gt=0)
    temperature: float = Field(1.0, gt=0)
    ce_weight: float = Field(0.0, ge=0)
    hidden_weight: float = Field(0.0, ge=0)
    learning_rate: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(50, ge=0)
    batch_size: int = Field(8, ge=1)
    gradient_accumulation: int = Field(1, ge=1)
    sequence_length: int = Field(512, ge=16)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    checkpoint_every: int = Field(100, ge=1)
    eval_every: int = Field(100, ge=1)


class BuildEngineConfig(StageConfig):
    max_batch: int = Field(1, ge=1)
    max_prefill: int = Field(512, ge=1)
    workspace_gb: float = Field(4.0, gt=0)
    optimization_level: int = Field(3, ge=0, le=5)
    timing_cache: bool = True
    hardware_compatibility: Literal["none", "ampere_plus", "same_compute_capability"] = "none"
    version_compatible: bool = False


register_stage("prune", config=PruneConfig, summary="structured width/depth pruning by activation importance",
               requires=(CHECKPOINT,), produces=CHECKPOINT, planned_in="issue #4")
register_stage("distill", config=DistillConfig, summary="knowledge distillation from the model before pruning",
               requires=(CHECKPOINT,), produces=CHECKPOINT, planned_in="issue #4")
register_stage("build_engine", config=BuildEngineConfig, summary="TensorRT engine for the target (+ trtexec script)",
               requires=(BUNDLE,), produces="engine", planned_in="issue #5")
