"""Stages designed for later issues but not built yet.

Their parameters are fixed here so recipes that use them (``recipes/7b_to_orin.yaml``)
validate today with strict checking; ``edgekit compress`` refuses them before any work
starts, naming the issue they land with. When a stage is built, its config moves into its
own folder (``edgekit/prune/stage.py``, ...) together with its ``run`` function, and the
registration here is deleted.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from edgekit.pipeline.registry import BUNDLE, StageConfig, register_stage


class BuildEngineConfig(StageConfig):
    max_batch: int = Field(1, ge=1)
    max_prefill: int = Field(512, ge=1)
    workspace_gb: float = Field(4.0, gt=0)
    optimization_level: int = Field(3, ge=0, le=5)
    timing_cache: bool = True
    hardware_compatibility: Literal["none", "ampere_plus", "same_compute_capability"] = "none"
    version_compatible: bool = False


register_stage("build_engine", config=BuildEngineConfig, summary="TensorRT engine for the target (+ trtexec script)",
               requires=(BUNDLE,), produces="engine", planned_in="issue #5")
