"""The two hardware figures the roofline needs, read from a target profile (no I/O here).

Bandwidth: the chosen power mode's ``memory_bandwidth_gbps`` (nvpmodel caps the memory clock
in low-power modes, so it is per mode).

Peak matmul rate at the compute precision — datasheets mix dense and 2:4-sparse figures,
GPU-only and GPU+DLA figures, and quote different precisions, so it is picked by rules:

1. only figures for the chosen power mode (a figure with no ``power_mode`` belongs to the
   reference mode); when the mode has none, the reference mode's figures, flagged — they are
   then an upper bound for a lower-power mode;
2. the compute precision itself, else one derived from another precision: on Ampere, Ada and
   Hopper tensor cores INT8 runs at twice the FP16/BF16 rate and FP8 at the INT8 rate, so
   fp16 = bf16 = int8 / 2 and fp8 = int8 (weight-only int8/int4 compute in fp16);
3. GPU-only figures before GPU+DLA ones (a decoder runs on the GPU; Jetson "AI TOPS" add the
   deep-learning accelerators). A profile with only a GPU+DLA figure (AGX Orin 32GB, Orin NX)
   gets that figure, flagged as an upper bound;
4. dense before 2:4-sparse, a sparse figure being halved (dense weights do not use sparsity);
5. FP32 accumulation before FP16 accumulation (TensorRT accumulates LLM matmuls in FP32;
   GeForce cards run FP16-accumulate at twice the rate).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgekit.planning.roofline import Hardware

#: (precision quoted, multiplier) ways to obtain each compute precision, best first.
_DERIVATIONS: dict[str, tuple[tuple[str, float, str], ...]] = {
    "fp16": (("fp16", 1.0, ""), ("bf16", 1.0, "bf16 rate = fp16 rate"), ("int8", 0.5, "fp16 = int8 / 2")),
    "bf16": (("bf16", 1.0, ""), ("fp16", 1.0, "bf16 rate = fp16 rate"), ("int8", 0.5, "bf16 = int8 / 2")),
    "fp8": (("fp8", 1.0, ""), ("int8", 1.0, "fp8 rate = int8 rate")),
    "fp32": (("fp32", 1.0, ""),),
}


@dataclass(frozen=True)
class PeakFigure:
    tflops: float
    #: how it was obtained from the profile, e.g. "int8 sparse gpu 67 TOPS (MAXN_SUPER) / 2 (dense) / 2 (fp16 = int8 / 2)"
    derivation: str
    #: True when the figure is an upper bound (includes DLAs, or borrowed from another power mode)
    upper_bound: bool


def _mode_of(figure: Any, target: Any) -> str:
    return figure.power_mode or target.reference_power_mode


def peak_tflops(target: Any, compute: str, power_mode: str | None = None) -> PeakFigure:
    """The dense GPU peak at ``compute`` precision in ``power_mode`` (see the module rules).
    Raises ValueError when the profile quotes nothing usable."""
    mode = target.power_mode(power_mode).name
    borrowed = False
    figures = [f for f in target.peak_compute if _mode_of(f, target) == mode]
    if not figures:
        figures = [f for f in target.peak_compute if _mode_of(f, target) == target.reference_power_mode]
        borrowed = mode != target.reference_power_mode
    best: tuple[tuple, PeakFigure] | None = None
    for rank, (precision, factor, why) in enumerate(_DERIVATIONS[compute]):
        for figure in figures:
            if figure.precision != precision:
                continue
            dense = figure.value * factor * (0.5 if figure.sparsity == "sparse" else 1.0)
            key = (
                figure.engines != "gpu",  # GPU-only first
                rank,  # the precision itself before a derived one
                figure.sparsity != "dense",
                figure.accumulate == "fp16",
            )
            steps = [f"{figure.precision} {figure.sparsity} {figure.engines} {figure.value:g} {figure.unit}"
                     f"{f' accumulate {figure.accumulate}' if figure.accumulate else ''} ({_mode_of(figure, target)})"]
            if figure.sparsity == "sparse":
                steps.append("/ 2 (dense)")
            if why:
                steps.append(f"x {factor:g} ({why})")
            upper = figure.engines != "gpu" or borrowed
            notes = []
            if figure.engines != "gpu":
                notes.append("includes the DLAs: upper bound")
            if borrowed:
                notes.append(f"quoted for {target.reference_power_mode}, not {mode}: upper bound")
            text = " ".join(steps) + (f" [{'; '.join(notes)}]" if notes else "")
            candidate = PeakFigure(round(dense, 3), text, upper)
            if best is None or key < best[0]:
                best = (key, candidate)
    if best is None:
        raise ValueError(f"target {target.name} quotes no peak compute usable for {compute}")
    return best[1]


def hardware(target: Any, compute: str, power_mode: str | None = None) -> tuple[Hardware, PeakFigure]:
    """Bandwidth of the power mode and the dense GPU peak at ``compute`` precision."""
    mode = target.power_mode(power_mode)
    peak = peak_tflops(target, compute, mode.name)
    return Hardware(bandwidth_gbps=mode.memory_bandwidth_gbps, peak_tflops=peak.tflops), peak


__all__ = ["PeakFigure", "hardware", "peak_tflops"]
