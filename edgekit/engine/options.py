"""The TensorRT engine build options: one strict model, the single source of every build knob.

:class:`BuildOptions` holds what decides the build settings (profiles, typing, workspace,
compatibility); :class:`BuildEngineOptions` adds what the ``build_engine`` step does with them
(build here or only plan, check first). The recipe's ``build_engine`` stage config
(:mod:`edgekit.engine.stage`) is a :class:`BuildEngineOptions`, the ``edgekit build-engine`` and
``edgekit check`` options are made from these fields (type, bounds, choices, default, help), and
:func:`edgekit.api.build_engine` / :func:`edgekit.api.check_tensorrt` take a :class:`BuildOptions`.
Light on purpose (pydantic only): the CLI imports it to declare its options.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

#: upper bounds: far above any engine a device holds, low enough that a typo is refused up front
MAX_BATCH = 4096
MAX_PREFILL = 1 << 20
MAX_WORKSPACE_GB = 1024

HardwareCompatibility = Literal["none", "ampere_plus", "same_compute_capability"]
Typing = Literal["auto", "strong", "weak"]
BuildMode = Literal["auto", "always", "never"]


class BuildOptions(BaseModel):
    """The knobs a TensorRT build of a bundle depends on, besides the graph and the target."""

    # strict: an unknown key (a typo) or a non-finite number is an error, never ignored
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    max_batch: int = Field(1, ge=1, le=MAX_BATCH, description="largest batch the engine accepts")
    max_prefill: int = Field(512, ge=1, le=MAX_PREFILL,
                             description="longest prompt one prefill call takes (<= context_length)")
    opt_prefill: int | None = Field(None, ge=1, le=MAX_PREFILL,
                                    description="prompt length TensorRT tunes prefill for (default min(128, max_prefill))")
    workspace_gb: float = Field(4.0, gt=0, le=MAX_WORKSPACE_GB, description="TensorRT workspace memory pool limit")
    optimization_level: int = Field(3, ge=0, le=5,
                                    description="builder optimization level (higher: longer build, maybe faster engine)")
    timing_cache: bool = Field(True, description="keep a timing cache beside the bundle and reuse it on rebuilds")
    hardware_compatibility: HardwareCompatibility = Field(
        "none", description="engines that run on other GPUs (workstations only; slower)")
    version_compatible: bool = Field(False, description="engine runs on later TensorRT releases of the same major version")
    typing: Typing = Field(
        "auto", description="auto: strongly typed for Q/DQ graphs and on TensorRT 11, FP16 weak typing for float graphs on 10.x")


class BuildEngineOptions(BuildOptions):
    """:class:`BuildOptions` plus what the build step does: build here or only plan, check first."""

    build: BuildMode = Field(
        "auto", description="auto: build when TensorRT and the target's GPU are here, else write the device build script; "
        "always: fail when it cannot build here; never: settings and scripts only")
    check: bool = Field(True, description="run the TensorRT readiness checks (edgekit check) first; an error stops the build")

    def build_options(self) -> BuildOptions:
        """The :class:`BuildOptions` part (what the build settings are made from)."""
        return BuildOptions(**self.model_dump(include=set(BuildOptions.model_fields)))
