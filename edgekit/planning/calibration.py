"""Published measurements of TensorRT-class runtimes, and the efficiency fitted to them.

The roofline (:mod:`edgekit.planning.roofline`) is a lower bound; real runtimes reach a
fraction of peak bandwidth and add a per-call cost (kernel launches, synchronisation,
sampling) that does not shrink with the model. Both are fitted here, per target class
(``jetson`` / ``workstation``) and phase (``decode`` / ``prefill``), from the table below:

    measured_ms = slope x roofline_ms + overhead_ms        (efficiency = 1 / slope)

with a Theil-Sen fit (slope: the median of the slopes between every pair of measurements;
overhead: the median residual), so one odd figure cannot drag the line. Only rows whose
runtime is TensorRT-class (TensorRT Edge-LLM, TensorRT-LLM) enter the fit; the MLC rows are
cross-checks, printed next to their prediction but not fitted.

Every figure is quoted as its source states it, with the URL next to it. Model shapes are the
public ``config.json`` values of the named checkpoints. Assumptions a source leaves open
(power mode, output length, quantization details) are written next to the row.
``scripts/plan_calibration.py`` prints the table with predictions; docs/planning.md has it.
"""

from __future__ import annotations

import functools
import statistics
from dataclasses import dataclass
from typing import Any, Literal

from edgekit.planning.roofline import (
    Efficiency,
    Hardware,
    WeightFormat,
    Workload,
    decode_roofline_ms,
    group_quant_bits,
    prefill_roofline_ms,
    weight_format,
)
from edgekit.sizing import ModelShape

# --- model shapes (config.json of the published checkpoints) ------------------------------

LLAMA_2_7B = ModelShape(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                        num_kv_heads=32, head_dim=128, tie_word_embeddings=False)  # meta-llama/Llama-2-7b-hf
MISTRAL_7B_V0_2 = ModelShape(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                             num_kv_heads=8, head_dim=128, tie_word_embeddings=False)  # mistralai/Mistral-7B-Instruct-v0.2
LLAMA_3_1_8B = ModelShape(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                          num_kv_heads=8, head_dim=128, tie_word_embeddings=False)  # meta-llama/Llama-3.1-8B
LLAMA_3_2_3B = ModelShape(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_layers=28, num_heads=24,
                          num_kv_heads=8, head_dim=128, tie_word_embeddings=True)  # meta-llama/Llama-3.2-3B
QWEN2_5_7B = ModelShape(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                        num_kv_heads=4, head_dim=128, tie_word_embeddings=False)  # Qwen/Qwen2.5-7B-Instruct
QWEN3_0_6B = ModelShape(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_layers=28, num_heads=16,
                        num_kv_heads=8, head_dim=128, tie_word_embeddings=True)  # Qwen/Qwen3-0.6B
QWEN3_1_7B = ModelShape(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_layers=28, num_heads=16,
                        num_kv_heads=8, head_dim=128, tie_word_embeddings=True)  # Qwen/Qwen3-1.7B
QWEN3_4B = ModelShape(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_layers=36, num_heads=32,
                      num_kv_heads=8, head_dim=128, tie_word_embeddings=True)  # Qwen/Qwen3-4B-Instruct-2507
QWEN3_8B = ModelShape(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=36, num_heads=32,
                      num_kv_heads=8, head_dim=128, tie_word_embeddings=False)  # Qwen/Qwen3-8B

# --- weight formats of the measured runtimes ----------------------------------------------

#: TensorRT Edge-LLM / TensorRT-LLM INT4 AWQ (ModelOpt): 4-bit codes, an fp16 scale per
#: 128 input channels, no zero point; lm_head and embeddings stay fp16.
INT4_AWQ = WeightFormat("int4", group_quant_bits(4, 128, zero_point=False), 16.0, 16.0, "fp16", 128)
#: TensorRT-LLM FP8 (W8A8): fp8 linear weights; lm_head left in fp16 (assumed).
FP8 = weight_format("fp8")
#: MLC ``q4f16_ft`` (the jetson-containers MLC benchmark's default quantization): 4-bit codes
#: with one fp16 scale per output channel; lm_head assumed fp16.
MLC_Q4F16_FT = WeightFormat("int4", 4.0, 16.0, 16.0, "fp16", None)

# --- sources -------------------------------------------------------------------------------

EDGE_LLM = "https://nvidia.github.io/TensorRT-Edge-LLM/0.9.1/user_guide/performance/performance-benchmarks.html"
EDGE_LLM_WHAT = ("TensorRT Edge-LLM 0.9.0 release results, JetPack 7.2, 'Runtime Performance Dashboard' "
                 "(llm_inference on MTBench prompts, warmup 10)")
EDGE_LLM_DATE = "2026 (TensorRT Edge-LLM 0.9.x documentation)"
JAN = "https://jan.ai/post/benchmarking-nvidia-tensorrt-llm"
JAN_DATE = "2024-04-29"
TRTLLM_V05 = "https://github.com/NVIDIA/TensorRT-LLM/blob/release/0.5.0/docs/source/performance.md"
TRTLLM_V05_DATE = "2023-10 (TensorRT-LLM v0.5.0)"
JETSON_AI_LAB = "https://www.jetson-ai-lab.com/benchmarks.html"
JETSON_AI_LAB_ALSO = "https://developer.nvidia.com/blog/nvidia-jetson-orin-nano-developer-kit-gets-a-super-boost/"
JETSON_AI_LAB_DATE = "2024-12 (Jetson Orin Nano Super launch)"

Phase = Literal["decode", "prefill"]


@dataclass(frozen=True)
class Measurement:
    """One published figure: what ran where, and the number exactly as quoted."""

    key: str
    device: str
    kind: Literal["jetson", "workstation"]
    runtime: str
    #: TensorRT-class runtimes are fitted; others (MLC) are cross-checks
    tensorrt_class: bool
    model: str
    shape: ModelShape
    fmt: WeightFormat
    phase: Phase
    #: decode: tokens/s (batch 1); prefill: ms for ``tokens`` prompt tokens
    value: float
    quoted: str
    source: str
    date: str
    #: decode: tokens in the KV cache at an average step; prefill: prompt tokens
    tokens: int
    #: the edgekit target profile the device is (None: a workstation GPU without a profile)
    target: str | None = None
    #: the profile's power mode the figure is for (None: the reference mode)
    power_mode: str | None = None
    #: only for devices without a profile: the cited datasheet figures
    bandwidth_gbps: float | None = None
    peak_tflops: float | None = None
    kv_bytes: float = 2.0
    notes: str = ""

    @property
    def measured_ms(self) -> float:
        return 1000.0 / self.value if self.phase == "decode" else self.value


def _edge_llm(key: str, device: str, target: str, model: str, shape: ModelShape, prefill_tokens: int,
              prefill_ms: float, decode_tps: float) -> list[Measurement]:
    quoted = (f"{device}: {model} | LLM | Vanilla | INT4 AWQ | batch 1 | Prefill Seq Len {prefill_tokens} | "
              f"Prefill Time {prefill_ms} ms | Decode {decode_tps} tok/s")
    common = dict(device=device, kind="jetson", runtime="TensorRT Edge-LLM 0.9.0", tensorrt_class=True, model=model,
                  shape=shape, fmt=INT4_AWQ, quoted=quoted, source=EDGE_LLM, date=EDGE_LLM_DATE, target=target)
    assumed = ("power mode not stated: taken as the profile's reference mode (MAXN / MAXN SUPER)")
    return [
        Measurement(key=f"{key}-decode", phase="decode", value=decode_tps, tokens=prefill_tokens + 128,
                    notes=f"{EDGE_LLM_WHAT}; {assumed}; output length not stated: KV cache taken at "
                          f"prompt + 128 tokens", **common),
        Measurement(key=f"{key}-prefill", phase="prefill", value=prefill_ms, tokens=prefill_tokens,
                    notes=f"{EDGE_LLM_WHAT}; {assumed}; logits for the last position only", **common),
    ]


def _jan(key: str, device: str, target: str | None, tps: float, **hardware: float) -> Measurement:
    return Measurement(
        key=key, device=device, kind="workstation", runtime="TensorRT-LLM 0.7.1 (Windows)", tensorrt_class=True,
        model="Mistral 7B v0.2 AWQ", shape=MISTRAL_7B_V0_2, fmt=INT4_AWQ, phase="decode", value=tps,
        quoted=f"{device}: TensorRT-LLM Throughput (token/s) {tps} (Mistral 7B v0.2 AWQ, batch_size 1, "
               f"input_len 2048, output_len 512)",
        source=JAN, date=JAN_DATE, tokens=2048 + 256, target=target,
        notes="Jan's built-in tokens/s; KV cache taken at mid-generation (2048 + 256 tokens)", **hardware)


def _trtllm_h100_ttft(tokens: int, ms: float) -> Measurement:
    return Measurement(
        key=f"h100-llama2-7b-fp8-ttft-{tokens}", device="H100 SXM 80GB", kind="workstation",
        runtime="TensorRT-LLM 0.5.0", tensorrt_class=True, model="LLaMA 7B (Llama-2-7b) FP8", shape=LLAMA_2_7B,
        fmt=FP8, phase="prefill", value=ms,
        quoted=f"H100 GPUs (FP8), Low Latency: LLaMA 7B | Batch Size 1 | TP 1 | Input Length {tokens} | "
               f"1st Token Latency {ms:g} ms",
        source=TRTLLM_V05, date=TRTLLM_V05_DATE, tokens=tokens, target="workstation-h100", kv_bytes=1.0,
        notes="fp8 KV cache (the documented build uses --fp8_kv_cache); logits for the last position only")


def _mlc_orin_nano(key: str, model: str, shape: ModelShape, original: float, super_: float) -> list[Measurement]:
    quoted = (f"{model} | Jetson Orin Nano (original) {original:g} | Jetson Orin Nano Super {super_:g} "
              f"(tokens/s, MLC, INT4)")
    notes = ("MLC LLM, not TensorRT: a cross-check, not fitted; quantization taken as q4f16_ft (the linked MLC "
             "benchmark script's default); prompt/output lengths not stated: KV cache taken at 128 tokens; "
             "'original' = JetPack 6.1 15 W mode (68 GB/s), 'Super' = MAXN SUPER (102.4 GB/s)")
    common = dict(device="Jetson Orin Nano 8GB", kind="jetson", runtime="MLC LLM", tensorrt_class=False, model=model,
                  shape=shape, fmt=MLC_Q4F16_FT, phase="decode", quoted=quoted, source=JETSON_AI_LAB,
                  date=JETSON_AI_LAB_DATE, tokens=128, target="jetson-orin-nano-8gb",
                  notes=notes + f"; also {JETSON_AI_LAB_ALSO}")
    return [
        Measurement(key=f"{key}-15w", value=original, power_mode="15W", **common),
        Measurement(key=f"{key}-super", value=super_, power_mode="MAXN_SUPER", **common),
    ]


MEASUREMENTS: tuple[Measurement, ...] = (
    # TensorRT Edge-LLM 0.9.0 on the three Orin modules (EDGE_LLM, "v0.9.0 Results").
    *_edge_llm("agx-orin-qwen3-0.6b", "Jetson AGX Orin (64GB)", "jetson-orin-agx-64gb", "Qwen3-0.6B", QWEN3_0_6B, 61, 14.8, 186.4),
    *_edge_llm("agx-orin-qwen3-1.7b", "Jetson AGX Orin (64GB)", "jetson-orin-agx-64gb", "Qwen3-1.7B", QWEN3_1_7B, 61, 20.4, 98.6),
    *_edge_llm("agx-orin-qwen3-4b", "Jetson AGX Orin (64GB)", "jetson-orin-agx-64gb", "Qwen3-4B-Instruct-2507", QWEN3_4B, 57, 42.6, 53.1),
    *_edge_llm("agx-orin-qwen3-8b", "Jetson AGX Orin (64GB)", "jetson-orin-agx-64gb", "Qwen3-8B", QWEN3_8B, 61, 65.7, 32.5),
    *_edge_llm("orin-nx-qwen3-0.6b", "Jetson Orin NX (16GB)", "jetson-orin-nx-16gb", "Qwen3-0.6B", QWEN3_0_6B, 61, 18.9, 117.4),
    *_edge_llm("orin-nx-qwen3-1.7b", "Jetson Orin NX (16GB)", "jetson-orin-nx-16gb", "Qwen3-1.7B", QWEN3_1_7B, 61, 35.4, 60.4),
    *_edge_llm("orin-nx-qwen3-4b", "Jetson Orin NX (16GB)", "jetson-orin-nx-16gb", "Qwen3-4B-Instruct-2507", QWEN3_4B, 57, 74.9, 31.6),
    *_edge_llm("orin-nx-qwen3-8b", "Jetson Orin NX (16GB)", "jetson-orin-nx-16gb", "Qwen3-8B", QWEN3_8B, 61, 127.2, 19.0),
    *_edge_llm("orin-nano-qwen3-0.6b", "Jetson Orin Nano (8GB)", "jetson-orin-nano-8gb", "Qwen3-0.6B", QWEN3_0_6B, 61, 28.7, 72.8),
    *_edge_llm("orin-nano-qwen3-1.7b", "Jetson Orin Nano (8GB)", "jetson-orin-nano-8gb", "Qwen3-1.7B", QWEN3_1_7B, 61, 63.1, 37.4),
    # TensorRT-LLM on workstation GPUs (JAN: batch 1 decode; TRTLLM_V05: batch-1 first-token latency).
    _jan("rtx4090-mistral-7b-awq", "GeForce RTX 4090", "workstation-rtx4090", 170.63),
    # RTX 3090: 936 GB/s and 71 dense FP16 tensor TFLOPS (FP32 accumulate) per NVIDIA's GA102
    # whitepaper (NVIDIA Ampere GA102 GPU Architecture, RTX 3090 column); Jan's table: 935.8 GB/s.
    _jan("rtx3090-mistral-7b-awq", "GeForce RTX 3090", None, 144.19, bandwidth_gbps=935.8, peak_tflops=71.0),
    _trtllm_h100_ttft(128, 7),
    _trtllm_h100_ttft(2048, 36),
    # MLC on Orin Nano, NVIDIA's Orin Nano Super launch figures (cross-checks).
    *_mlc_orin_nano("orin-nano-mlc-llama-3.1-8b", "Llama 3.1 8B", LLAMA_3_1_8B, 14, 19.14),
    *_mlc_orin_nano("orin-nano-mlc-llama-3.2-3b", "Llama 3.2 3B", LLAMA_3_2_3B, 27.7, 43.07),
    *_mlc_orin_nano("orin-nano-mlc-qwen2.5-7b", "Qwen2.5 7B", QWEN2_5_7B, 14.2, 21.75),
)


# --- roofline of a measurement and the fit ----------------------------------------------


def _hardware(m: Measurement, targets: dict[str, Any]) -> Hardware:
    if m.target is None:
        assert m.bandwidth_gbps and m.peak_tflops, m.key
        return Hardware(m.bandwidth_gbps, m.peak_tflops)
    from edgekit.planning.hardware import hardware

    return hardware(targets[m.target], m.fmt.compute, m.power_mode)[0]


def roofline_of(m: Measurement, targets: dict[str, Any]) -> float:
    """The roofline time (ms) of a measurement's workload on its device."""
    hw = _hardware(m, targets)
    if m.phase == "decode":
        workload = Workload(context_length=m.tokens, kv_fill=1.0, kv_bytes=m.kv_bytes, logits="last")
        return decode_roofline_ms(m.shape, m.fmt, workload, hw)
    workload = Workload(context_length=m.tokens, prompt_tokens=m.tokens, prefill_chunk=m.tokens,
                        kv_bytes=m.kv_bytes, logits="last")
    return prefill_roofline_ms(m.shape, m.fmt, workload, hw)


def theil_sen(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(slope, intercept) of the Theil-Sen line: median pairwise slope, median residual."""
    slopes = [(y2 - y1) / (x2 - x1) for i, (x1, y1) in enumerate(points) for (x2, y2) in points[i + 1:]
              if abs(x2 - x1) > 1e-9 * max(abs(x1), abs(x2), 1.0)]
    if not slopes:
        raise ValueError("a fit needs two measurements with different roofline times")
    slope = statistics.median(slopes)
    intercept = statistics.median(y - slope * x for x, y in points)
    return slope, intercept


#: A fixed per-call overhead is only fitted when the measurements' roofline times span at
#: least this ratio; closer together, slope and overhead cannot be told apart.
MIN_SPAN_FOR_OVERHEAD = 2.0


@dataclass(frozen=True)
class Fit:
    kind: str
    phase: Phase
    efficiency: Efficiency
    #: how slope and overhead were obtained (see :func:`fit`)
    method: str
    #: the measurements fitted (keys)
    measurements: tuple[str, ...]
    #: roofline times (ms) the fitted measurements span: predictions outside are extrapolated
    span_ms: tuple[float, float]
    #: the one-parameter alternative: median of roofline / measured time (no fixed overhead)
    proportional_efficiency: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "phase": self.phase, "method": self.method,
            "efficiency": round(self.efficiency.efficiency, 4), "slope": round(self.efficiency.slope, 4),
            "overhead_ms": round(self.efficiency.overhead_ms, 3),
            "calibrated_roofline_span_ms": [round(self.span_ms[0], 3), round(self.span_ms[1], 3)],
            "fitted_on": list(self.measurements),
            "source": "edgekit/planning/calibration.py: published TensorRT-class figures (docs/planning.md)",
        }


def _load_targets() -> dict[str, Any]:
    from edgekit.targets import list_targets

    return {t.name: t for t in list_targets()}


def fit(kind: str, phase: Phase, targets: dict[str, Any] | None = None, *, borrow: bool = True) -> Fit:
    """Fit ``time = slope x roofline + overhead`` to the TensorRT-class rows of a kind and phase.

    When the rows span too narrow a range of roofline times to separate the two (the
    workstation decode figures are all ~7B models, 4.1-4.5 ms of roofline), the slope is
    taken from the other kind's fit of the same phase when that one could separate them (it
    measures TensorRT's weight-streaming kernels on many model sizes) and only the overhead is
    fitted, as the median residual; failing that, the fit is proportional (overhead 0)."""
    targets = targets if targets is not None else _load_targets()
    rows = [m for m in MEASUREMENTS if m.kind == kind and m.phase == phase and m.tensorrt_class]
    points = [(roofline_of(m, targets), m.measured_ms) for m in rows]
    if not points:
        raise ValueError(f"no TensorRT-class {phase} measurement for {kind} targets")
    low, high = min(x for x, _ in points), max(x for x, _ in points)
    proportional = statistics.median(x / y for x, y in points)
    if high / low >= MIN_SPAN_FOR_OVERHEAD:
        slope, intercept = theil_sen(points)
        method = "theil-sen"
    else:
        other = fit("workstation" if kind == "jetson" else "jetson", phase, targets, borrow=False) if borrow else None
        if other is not None and other.method == "theil-sen":
            slope = other.efficiency.slope
            intercept = statistics.median(y - slope * x for x, y in points)
            method = f"slope of the {other.kind} {phase} fit, overhead fitted (too narrow a span to fit both)"
        else:
            slope, intercept, method = 1.0 / proportional, 0.0, "proportional"
    return Fit(kind, phase, Efficiency(slope=slope, overhead_ms=intercept), method, tuple(m.key for m in rows),
               (low, high), proportional)


@functools.lru_cache(maxsize=None)
def _cached_fits() -> dict[tuple[str, str], Fit]:
    targets = _load_targets()
    return {(k, p): fit(k, p, targets) for k in ("jetson", "workstation") for p in ("decode", "prefill")}


def fitted(kind: str, phase: Phase) -> Fit:
    """The calibrated efficiency for a target kind ('jetson'/'workstation') and phase."""
    return _cached_fits()[(kind, phase)]


def calibration_rows(targets: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every measurement next to its prediction (the fitted line of its kind and phase)."""
    targets = targets if targets is not None else _load_targets()
    fits = {(k, p): fit(k, p, targets) for k in ("jetson", "workstation") for p in ("decode", "prefill")}
    rows = []
    for m in MEASUREMENTS:
        roof = roofline_of(m, targets)
        line = fits[(m.kind, m.phase)]
        predicted_ms = line.efficiency.time_ms(roof)
        predicted = 1000.0 / predicted_ms if m.phase == "decode" else predicted_ms
        rows.append({
            "key": m.key, "kind": m.kind, "device": m.device, "target": m.target, "power_mode": m.power_mode,
            "power_mode_used": (m.power_mode or targets[m.target].reference_power_mode) if m.target else None,
            "runtime": m.runtime,
            "fitted": m.tensorrt_class, "model": m.model, "precision": m.fmt.precision, "phase": m.phase,
            "tokens": m.tokens, "unit": "tokens/s" if m.phase == "decode" else "ms",
            "published": m.value, "predicted": round(predicted, 2), "ratio": round(predicted / m.value, 3),
            "roofline_ms": round(roof, 3), "quoted": m.quoted, "source": m.source, "date": m.date, "notes": m.notes,
        })
    return rows


__all__ = ["MEASUREMENTS", "MIN_SPAN_FOR_OVERHEAD", "Fit", "Measurement", "calibration_rows", "fit", "fitted", "roofline_of", "theil_sen"]
