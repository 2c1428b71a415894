"""Target profiles: what an edge device (or workstation GPU) can run, as data.

A target profile is a YAML file describing one device: CPU/GPU, compute capability,
memory (total, realistically usable, shared or dedicated), memory bandwidth per power
mode, the precisions TensorRT can build for it, and the software stack we plan against.
The built-in profiles live in the repository's ``targets/`` directory, which is shipped
as the package ``edgekit._targets``; a user can also point at their own YAML file.

Public API (other modules depend on these names)::

    Target, list_targets(), load_target(name_or_path), target_names(), target_table(targets)

Only stdlib, pydantic and PyYAML are imported here: ``import edgekit.targets`` must stay
cheap and must never pull in torch.
"""

from __future__ import annotations

import difflib
import importlib.resources
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, cast

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from edgekit.errors import TargetError
from edgekit.yamlio import LineMap, load_yaml, pydantic_error

if TYPE_CHECKING:  # importlib.resources.abc is 3.11+; only the annotation needs it
    from importlib.resources.abc import Traversable

__all__ = [
    "PRECISIONS",
    "Cpu",
    "Gpu",
    "Memory",
    "PeakCompute",
    "PowerMode",
    "Software",
    "Target",
    "list_targets",
    "load_target",
    "target_names",
    "target_table",
]

#: Precisions a target may list in ``supported_precisions`` (the names recipes use).
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8", "int4_weight_only", "fp8")
Precision = Literal["fp32", "fp16", "bf16", "int8", "int4_weight_only", "fp8"]

#: FP8 tensor cores arrived with Ada (8.9) and Hopper (9.0); Ampere/Orin (8.x < 8.9) lack them.
FP8_MIN_COMPUTE_CAPABILITY = (8, 9)

_YAML_SUFFIXES = (".yaml", ".yml")


class _Inconsistency(ValueError):
    """A cross-field check failed; carries the ``how`` for the one-line TargetError.

    pydantic keeps the raised exception in the error's ``ctx``, so the loader can turn it
    into ``TargetError(what, where=<file line>, how=...)`` instead of a generic message.
    """

    def __init__(self, what: str, how: str):
        super().__init__(what)
        self.what = what
        self.how = how


def _no_bare_number(value: Any) -> Any:
    # YAML reads `cuda: 12.6` as a float (and `12.10` as 12.1): demand a quoted string.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        raise _Inconsistency(
            f"version {value!r} must be a quoted string",
            f'quote it, e.g. "{value}" (YAML would read 12.10 as the number 12.1)',
        )
    return value


#: "8.7", "10.3", "6.2": dotted numeric versions, always written as quoted YAML strings.
VersionStr = Annotated[
    str,
    BeforeValidator(_no_bare_number),
    StringConstraints(pattern=r"^\d+(\.\d+)*$"),
]
#: Profile names: lower-case letters, digits and '-' (the built-in file name without .yaml).
ProfileName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]*$", max_length=64)]


class _Strict(BaseModel):
    # Every profile model refuses unknown keys: a typo must fail loudly, never be ignored;
    # and non-finite numbers (a budget or a bandwidth of .inf means nothing).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Cpu(_Strict):
    model: str = Field(min_length=1)
    #: None where the CPU is not part of the profile (a workstation's host CPU varies).
    cores: int | None = Field(default=None, gt=0)


class Gpu(_Strict):
    name: str = Field(min_length=1)
    #: Lower-case architecture name, e.g. "ampere", "ada-lovelace", "hopper".
    architecture: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9-]*$")]
    cuda_cores: int = Field(gt=0)
    tensor_cores: int = Field(ge=0)


class Memory(_Strict):
    #: Capacity as the vendor states it (decimal "GB" as printed on datasheets).
    total_gb: float = Field(gt=0)
    #: e.g. LPDDR5, GDDR6X, HBM3.
    type: str = Field(min_length=1)
    bus_width_bits: int | None = Field(default=None, gt=0)
    #: True for Jetson unified memory (CPU and GPU share one DRAM), False for dedicated VRAM.
    shared: bool
    #: What one application can realistically allocate for weights + KV cache + activations.
    usable_gb: float = Field(gt=0)

    @field_validator("usable_gb")
    @classmethod
    def _usable_within_total(cls, usable: float, info: ValidationInfo) -> float:
        total = info.data.get("total_gb")
        if total is not None and usable > total:
            raise _Inconsistency(
                f"usable_gb {usable:g} exceeds total_gb {total:g}",
                "make usable_gb at most total_gb (it is total minus the OS/runtime reserve)",
            )
        return usable


class PowerMode(_Strict):
    #: For Jetson: the nvpmodel NAME (as `nvpmodel -q` prints it); for a workstation: "default".
    name: str = Field(min_length=1)
    #: `sudo nvpmodel -m <id>`; None on workstations.
    nvpmodel_id: int | None = Field(default=None, ge=0)
    #: Power budget; None for MAXN-style modes, which set no budget.
    watts: float | None = Field(default=None, gt=0)
    #: Peak DRAM bandwidth in this mode: nvpmodel caps the memory clock (EMC) in low-power
    #: modes, and JetPack 6.2's "super" modes raise it on Orin Nano, so it varies per mode.
    memory_bandwidth_gbps: float = Field(gt=0)
    #: JetPack version that introduced this mode (e.g. "6.2" for the super modes), if any.
    requires_jetpack: VersionStr | None = None
    note: str | None = None


class PeakCompute(_Strict):
    """One peak-throughput figure exactly as a datasheet states it."""

    precision: Literal["fp32", "tf32", "fp16", "bf16", "fp8", "int8", "int4"]
    #: Datasheets mix 2:4-structured-sparse and dense figures: always say which.
    sparsity: Literal["dense", "sparse"]
    #: Which engines the figure counts: the GPU alone, or GPU + DLAs (Jetson "AI TOPS").
    engines: Literal["gpu", "gpu+dla"]
    #: Accumulator precision where the vendor quotes it (GeForce FP16 rates differ by it).
    accumulate: Literal["fp16", "fp32"] | None = None
    value: float = Field(gt=0)
    unit: Literal["TFLOPS", "TOPS"]
    #: The power mode the figure is quoted for (None: the target's reference mode).
    power_mode: str | None = None


class Software(_Strict):
    #: JetPack release for Jetson targets (None for workstations).
    jetpack: VersionStr | None = None
    tensorrt: VersionStr
    cuda: VersionStr


class Target(_Strict):
    """One validated target profile.

    Field order matters: cross-field checks read earlier fields through ``info.data``,
    so each error points at the line of the field that is wrong.
    """

    name: ProfileName
    description: str = Field(min_length=1)
    kind: Literal["jetson", "workstation"]
    cpu_arch: Literal["aarch64", "x86_64"]
    cpu: Cpu
    gpu: Gpu
    #: CUDA compute capability "major.minor", e.g. "8.7" (Orin), "8.9" (Ada), "9.0" (Hopper).
    compute_capability: Annotated[VersionStr, StringConstraints(pattern=r"^\d+\.\d+$")]
    memory: Memory
    power_modes: list[PowerMode] = Field(min_length=1)
    #: Peak DRAM bandwidth of the device: the highest over its power modes.
    memory_bandwidth_gbps: float = Field(gt=0)
    #: The power mode the top-level figures (bandwidth, peak compute) refer to.
    reference_power_mode: str
    peak_compute: list[PeakCompute] = Field(default_factory=list)
    supported_precisions: list[Precision] = Field(min_length=1)
    software: Software

    # --- cross-field checks ---------------------------------------------------------

    @field_validator("cpu_arch")
    @classmethod
    def _jetson_is_aarch64(cls, arch: str, info: ValidationInfo) -> str:
        if info.data.get("kind") == "jetson" and arch != "aarch64":
            raise _Inconsistency(
                f"a jetson target has cpu_arch 'aarch64', not '{arch}'",
                "set cpu_arch: aarch64 (every Jetson module has Arm CPU cores)",
            )
        return arch

    @field_validator("memory")
    @classmethod
    def _jetson_memory_is_shared(cls, memory: Memory, info: ValidationInfo) -> Memory:
        kind = info.data.get("kind")
        if kind == "jetson" and not memory.shared:
            raise _Inconsistency(
                "a jetson target has unified memory, but memory.shared is false",
                "set memory.shared: true (CPU and GPU share one DRAM on Jetson)",
            )
        if kind == "workstation" and memory.shared:
            raise _Inconsistency(
                "a workstation target has dedicated GPU memory, but memory.shared is true",
                "set memory.shared: false",
            )
        return memory

    @field_validator("power_modes")
    @classmethod
    def _unique_power_modes(cls, modes: list[PowerMode]) -> list[PowerMode]:
        names = [mode.name for mode in modes]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise _Inconsistency(
                f"power mode {', '.join(duplicates)} is listed twice",
                "give each power mode a distinct name",
            )
        return modes

    @field_validator("memory_bandwidth_gbps")
    @classmethod
    def _bandwidth_is_peak_over_modes(cls, bandwidth: float, info: ValidationInfo) -> float:
        modes: list[PowerMode] | None = info.data.get("power_modes")
        if modes:
            peak = max(mode.memory_bandwidth_gbps for mode in modes)
            if bandwidth != peak:
                raise _Inconsistency(
                    f"memory_bandwidth_gbps {bandwidth:g} is not the peak over power_modes ({peak:g})",
                    f"set it to {peak:g} or correct the per-mode memory_bandwidth_gbps values",
                )
        return bandwidth

    @field_validator("reference_power_mode")
    @classmethod
    def _reference_mode_exists(cls, name: str, info: ValidationInfo) -> str:
        modes: list[PowerMode] | None = info.data.get("power_modes")
        if modes is None:
            return name
        by_name = {mode.name: mode for mode in modes}
        if name not in by_name:
            raise _Inconsistency(
                f"reference_power_mode '{name}' is not one of power_modes",
                f"use one of: {', '.join(by_name)}",
            )
        bandwidth = info.data.get("memory_bandwidth_gbps")
        if bandwidth is not None and by_name[name].memory_bandwidth_gbps != bandwidth:
            raise _Inconsistency(
                f"reference_power_mode '{name}' does not reach the peak memory_bandwidth_gbps {bandwidth:g}",
                "pick the mode whose memory_bandwidth_gbps equals the top-level one",
            )
        return name

    @field_validator("peak_compute")
    @classmethod
    def _peak_modes_exist(cls, figures: list[PeakCompute], info: ValidationInfo) -> list[PeakCompute]:
        modes: list[PowerMode] | None = info.data.get("power_modes")
        if modes is None:
            return figures
        names = [mode.name for mode in modes]
        for figure in figures:
            if figure.power_mode is not None and figure.power_mode not in names:
                raise _Inconsistency(
                    f"peak_compute refers to power mode '{figure.power_mode}', which is not in power_modes",
                    f"use one of: {', '.join(names)}",
                )
        return figures

    @field_validator("supported_precisions")
    @classmethod
    def _precisions_fit_hardware(cls, precisions: list[str], info: ValidationInfo) -> list[str]:
        duplicates = sorted({p for p in precisions if precisions.count(p) > 1})
        if duplicates:
            raise _Inconsistency(f"precision {', '.join(duplicates)} is listed twice", "list each precision once")
        cc = info.data.get("compute_capability")
        if cc is not None and "fp8" in precisions and _cc_tuple(cc) < FP8_MIN_COMPUTE_CAPABILITY:
            need = ".".join(map(str, FP8_MIN_COMPUTE_CAPABILITY))
            raise _Inconsistency(
                f"fp8 needs compute capability >= {need}, but this target has {cc}",
                "remove fp8 from supported_precisions (FP8 tensor cores start with Ada 8.9 / Hopper 9.0)",
            )
        return precisions

    @field_validator("software")
    @classmethod
    def _jetpack_only_on_jetson(cls, software: Software, info: ValidationInfo) -> Software:
        kind = info.data.get("kind")
        if kind == "jetson" and software.jetpack is None:
            raise _Inconsistency(
                "a jetson target needs software.jetpack",
                'add jetpack: "6.2" (or the JetPack release you flash) under software',
            )
        if kind == "workstation" and software.jetpack is not None:
            raise _Inconsistency(
                "software.jetpack is set on a workstation target", "remove jetpack (it is Jetson-only)"
            )
        return software

    # --- convenience --------------------------------------------------------------

    @property
    def tensorrt_version(self) -> str:
        return self.software.tensorrt

    @property
    def cuda_version(self) -> str:
        return self.software.cuda

    @property
    def jetpack_version(self) -> str | None:
        return self.software.jetpack

    @property
    def compute_capability_tuple(self) -> tuple[int, int]:
        return _cc_tuple(self.compute_capability)

    def supports(self, precision: str) -> bool:
        """True if ``precision`` (one of :data:`PRECISIONS`, any case) can be built for this target."""
        return precision.strip().lower() in self.supported_precisions

    def power_mode(self, name: str | None = None) -> PowerMode:
        """The named power mode (default: the reference mode); TargetError if unknown."""
        name = self.reference_power_mode if name is None else name
        for mode in self.power_modes:
            if mode.name == name:
                return mode
        names = [mode.name for mode in self.power_modes]
        close = _suggest(name, names)
        hint = f"did you mean '{close}'? Otherwise " if close else ""
        raise TargetError(
            f"target '{self.name}' has no power mode '{name}'",
            where=f"target {self.name}",
            how=f"{hint}use one of: {', '.join(names)}",
        )

    def bandwidth_gbps(self, power_mode: str | None = None) -> float:
        """Peak memory bandwidth in ``power_mode`` (default: the reference mode, i.e. the peak)."""
        return self.power_mode(power_mode).memory_bandwidth_gbps


def _suggest(name: str, choices: list[str]) -> str | None:
    """The choice ``name`` most likely meant: a close spelling, else the one it is part of."""
    folded = {choice.lower(): choice for choice in choices}
    close = difflib.get_close_matches(name.lower(), list(folded), n=1, cutoff=0.5)
    if close:
        return folded[close[0]]
    # "h100", "orin-nano" or "MAXN" are fragments of a name rather than misspellings.
    fragments = [choice for lowered, choice in folded.items() if name and name.lower() in lowered]
    return fragments[0] if len(fragments) == 1 else None


def _cc_tuple(cc: str) -> tuple[int, int]:
    major, minor = cc.split(".")
    return int(major), int(minor)


# --- loading ----------------------------------------------------------------------------


def _builtin_dir() -> Traversable:
    """Where the built-in profiles are: package data if installed, else the source tree."""
    try:
        packaged = importlib.resources.files("edgekit._targets")
    except ModuleNotFoundError:
        packaged = None
    if packaged is not None and any(_is_profile(entry) for entry in packaged.iterdir()):
        return packaged
    # Source checkout without install: edgekit/ and targets/ are siblings at the repo root.
    return Path(__file__).resolve().parent.parent / "targets"


def _is_profile(entry: Traversable) -> bool:
    return entry.is_file() and entry.name.endswith(_YAML_SUFFIXES)


def _builtin_files() -> dict[str, Traversable]:
    directory = _builtin_dir()
    if not directory.is_dir():
        return {}
    files: dict[str, Traversable] = {}
    for entry in directory.iterdir():
        if _is_profile(entry):
            files[entry.name.rsplit(".", 1)[0]] = entry
    return dict(sorted(files.items()))


def target_names() -> list[str]:
    """Names of the built-in target profiles, sorted."""
    return list(_builtin_files())


def list_targets() -> list[Target]:
    """All built-in target profiles, validated, sorted by name."""
    return sorted((_load_builtin(name, entry) for name, entry in _builtin_files().items()), key=lambda t: t.name)


def load_target(name_or_path: str | Path, *, where: str | None = None) -> Target:
    """A built-in profile by name, or a custom profile from a ``.yaml``/``.yml`` path.

    ``where`` names the place the name came from (e.g. a recipe line) for the error.
    Raises :class:`TargetError` for an unknown name or an invalid file.
    """
    text = str(name_or_path).strip()
    if _looks_like_path(name_or_path, text):
        return _load_file(Path(text).expanduser())
    builtins = _builtin_files()
    if text in builtins:
        return _load_builtin(text, builtins[text])
    raise _unknown_target(text, list(builtins), where=where)


def _looks_like_path(original: str | Path, text: str) -> bool:
    if isinstance(original, Path):
        return True
    return text.lower().endswith(_YAML_SUFFIXES) or "/" in text or "\\" in text or Path(text).is_file()


def _load_builtin(name: str, entry: Traversable) -> Target:
    # as_file gives a real path even when the package data sits inside a zip.
    with importlib.resources.as_file(entry) as path:
        target = _load_file(path)
    if target.name != name:
        raise TargetError(
            f"built-in target file '{entry.name}' declares name '{target.name}'",
            where=str(entry),
            how=f"set name: {name} (a built-in profile's name must match its file name)",
        )
    return target


def _load_file(path: Path) -> Target:
    data, lines = load_yaml(path, error_cls=TargetError, what="target file")
    if not isinstance(data, dict):
        raise TargetError(
            "a target file must be a YAML mapping (name:, kind:, gpu:, ...)",
            where=str(path),
            how="start from one of the built-in profiles in targets/ and edit it",
        )
    try:
        return Target.model_validate(data)
    except ValidationError as exc:
        raise _to_target_error(exc, path, lines) from exc


class _Reordered:
    """A ValidationError stand-in whose ``errors()`` puts unknown-key errors first.

    A misspelled key yields both "missing 'x'" and "unknown key 'y'"; the unknown-key one
    names the line of the typo and suggests the right spelling, so report it first.
    """

    def __init__(self, errors: list[Any]):
        self._errors = errors

    def errors(self) -> list[Any]:
        return self._errors


def _to_target_error(exc: ValidationError, path: Path, lines: LineMap) -> TargetError:
    errors = sorted(exc.errors(), key=lambda err: err["type"] != "extra_forbidden")
    first = errors[0]
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, _Inconsistency):
        loc = tuple(first["loc"])
        return TargetError(cause.what, where=lines.where(path, loc), how=cause.how)
    return cast(
        TargetError,
        pydantic_error(_Reordered(errors), path=path, lines=lines, model_cls=Target, error_cls=TargetError),
    )


def _unknown_target(name: str, names: list[str], *, where: str | None) -> TargetError:
    close = _suggest(name, names)
    hint = f"did you mean '{close}'? Otherwise " if close else ""
    return TargetError(
        f"unknown target '{name}'",
        where=where or "target name",
        how=f"{hint}use one of: {', '.join(names)} (see `edgekit targets list`), or give a path to a target YAML file",
    )


# --- presentation -----------------------------------------------------------------------


def target_table(targets: Iterable[Target]) -> list[dict[str, str]]:
    """One row per target for the CLI table; keys are the column headings."""
    rows = []
    for target in targets:
        mem = target.memory
        kind = "shared" if mem.shared else "dedicated"
        bandwidths = [mode.memory_bandwidth_gbps for mode in target.power_modes]
        low, high = min(bandwidths), max(bandwidths)
        # Jetson bandwidth depends on the nvpmodel mode: show the range rather than hide it.
        bandwidth = f"{high:g} GB/s" if low == high else f"{low:g}-{high:g} GB/s"
        trt = target.tensorrt_version
        if target.jetpack_version:
            trt += f" (JetPack {target.jetpack_version})"
        rows.append(
            {
                "name": target.name,
                "gpu": f"{target.gpu.name}, {target.gpu.cuda_cores} CUDA cores",
                "cc": target.compute_capability,
                "memory": f"{mem.total_gb:g} GB {mem.type} {kind} (~{mem.usable_gb:g} GB usable)",
                "bandwidth": bandwidth,
                "precisions": ", ".join(target.supported_precisions),
                "TensorRT": trt,
            }
        )
    return rows
