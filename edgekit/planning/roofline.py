"""Roofline arithmetic for one decoder on one accelerator: pure functions, no I/O.

Everything here is a *prediction* from a model's shape (:class:`edgekit.sizing.ModelShape`),
a weight format, a workload and two hardware figures (memory bandwidth, peak matmul rate).
The formulas, and why each term is there, are written out in ``docs/planning.md``.

Units: bytes and FLOPs as plain numbers; bandwidth in decimal GB/s and peak compute in
TFLOPS (as datasheets quote them); memory results in decimal GB (``GB`` = 10^9 bytes), like
the target profiles and the rest of edgekit (:mod:`edgekit.sizing`); times in milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

from edgekit.sizing import GB, GIB, RUNTIME_ALLOWANCE_GB, ModelShape

#: Weight precisions ``edgekit plan`` predicts for. int8 and int4 are *weight-only* (what
#: edgekit's GPTQ/RTN/AWQ export writes: integer weights dequantized in front of an fp16
#: matmul), fp8 is W8A8 (weights and activations in fp8, Ada/Hopper only).
PRECISIONS: tuple[str, ...] = ("fp16", "bf16", "fp8", "int8", "int4")
#: The precision the matmuls run in, per weight precision.
COMPUTE_PRECISION = {"fp16": "fp16", "bf16": "bf16", "fp8": "fp8", "int8": "fp16", "int4": "fp16"}
#: The name a target profile's ``supported_precisions`` uses for each weight precision.
TARGET_PRECISION = {"fp16": "fp16", "bf16": "bf16", "fp8": "fp8", "int8": "int8", "int4": "int4_weight_only"}
_INTEGER_BITS = {"int8": 8, "int4": 4}

#: Bytes of one activation element in the engine (fp16/bf16 activations; fp8 engines keep
#: fp16 between the quantized matmuls).
ACTIVATION_BYTES = 2
#: Logits leave the engine as float32 (the ONNX graph's output type).
LOGIT_BYTES = 4


def group_quant_bits(bits: int, group_size: int, *, zero_point: bool = True) -> float:
    """Stored bits per weight of a group-quantized matrix: the integer codes plus, per group,
    an fp16 scale and (edgekit's GPTQ layout) a ``bits``-wide zero point. ``zero_point=False``
    is the scale-only layout (TensorRT-LLM/ModelOpt AWQ)."""
    return bits + ((16 + bits) if zero_point else 16) / group_size


@dataclass(frozen=True)
class WeightFormat:
    """How the weights are stored: bits per linear weight (codes + scales), per lm_head
    weight and per embedding weight, and the precision the matmuls compute in."""

    precision: str
    linear_bits: float
    lm_head_bits: float
    embedding_bits: float
    compute: str
    group_size: int | None = None

    @property
    def separate_lm_head(self) -> bool:
        """True when a tied lm_head is stored apart from the embedding (it was quantized)."""
        return self.lm_head_bits != self.embedding_bits


def weight_format(precision: str, *, group_size: int | None = 128, quantize_lm_head: bool = False,
                  zero_point: bool = True, hidden_size: int | None = None) -> WeightFormat:
    """The storage of ``precision`` as edgekit exports it.

    Our quantized exports quantize the decoder's linear layers only: the embedding stays
    16-bit, and so does lm_head unless ``quantize_lm_head`` (the quantize stage's option).
    ``group_size=None`` means one scale per output channel (a group spans the input size,
    ``hidden_size``), as the quantize stage's ``group_size: null`` does.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if precision in _INTEGER_BITS:
        group = group_size or hidden_size
        if not group:
            raise ValueError("a per-channel integer format needs hidden_size")
        linear = group_quant_bits(_INTEGER_BITS[precision], group, zero_point=zero_point)
    elif precision == "fp8":
        linear = 8.0  # per-channel scales add 32/in_features bits: under 0.02 bits, left out
    else:
        linear = 16.0
    return WeightFormat(
        precision=precision,
        linear_bits=linear,
        lm_head_bits=linear if quantize_lm_head else 16.0,
        embedding_bits=16.0,
        compute=COMPUTE_PRECISION[precision],
        group_size=group_size if precision in _INTEGER_BITS else None,
    )


@dataclass(frozen=True)
class Workload:
    """What the deployment runs: context window, concurrent sequences, KV cache dtype, how full
    the cache is during an average decode step, the prompt a TTFT is quoted for, the longest
    prompt one prefill call takes (the engine's ``max_prefill``) and which positions' logits
    the engine returns for a prompt (edgekit's ONNX export returns all of them)."""

    context_length: int
    batch: int = 1
    kv_bytes: float = 2.0
    kv_fill: float = 0.5
    prompt_tokens: int = 128
    prefill_chunk: int = 512
    logits: Literal["all", "last"] = "all"

    @property
    def decode_kv_tokens(self) -> float:
        """Tokens in each sequence's KV cache at the decode step the prediction is for."""
        return self.kv_fill * self.context_length


# --- parameters and bytes ---------------------------------------------------------------


def norm_parameters(shape: ModelShape) -> int:
    """RMSNorm weights: two per layer and the final one."""
    return shape.hidden_size * (2 * shape.num_layers + 1)


def lm_head_parameters(shape: ModelShape) -> int:
    return shape.vocab_size * shape.hidden_size


def weight_bytes(shape: ModelShape, fmt: WeightFormat) -> dict[str, float]:
    """Bytes of each stored weight group. A tied lm_head shares the embedding table unless it
    was quantized (then it is stored separately, as the quantize stage unties it)."""
    table = lm_head_parameters(shape)
    linear = shape.linear_parameters * fmt.linear_bits / 8
    embedding = table * fmt.embedding_bits / 8
    lm_head = 0.0 if shape.tie_word_embeddings and not fmt.separate_lm_head else table * fmt.lm_head_bits / 8
    norms = norm_parameters(shape) * 2
    return {"linear": linear, "embedding": embedding, "lm_head": lm_head, "norms": norms,
            "total": linear + embedding + lm_head + norms}


def kv_bytes_per_token(shape: ModelShape, kv_bytes: float = 2.0) -> float:
    """K and V of every layer for one token: 2 x layers x kv_heads x head_dim x bytes."""
    return 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * kv_bytes


def activation_bytes(shape: ModelShape, workload: Workload) -> dict[str, float]:
    """Peak activation memory of the largest prefill call (``prefill_chunk`` tokens x batch):

    * the live tensors of one layer, whichever phase is larger: attention (residual + normed
      input + q + k + v + attention output) or MLP (residual + normed input + gate + up + their
      product), in fp16 (TensorRT reuses these buffers layer after layer);
    * the attention score matrix heads x chunk x chunk (fp16), as an unfused attention
      computes it (a fused flash-attention kernel needs none: an upper bound);
    * the logits, float32, for every prompt position (edgekit's export) or the last one.
    """
    chunk, batch = min(workload.prefill_chunk, workload.context_length), workload.batch
    h, q = shape.hidden_size, shape.num_heads * shape.head_dim
    kv = shape.num_kv_heads * shape.head_dim
    per_token = max(2 * h + 2 * q + 2 * kv, 2 * h + 3 * shape.intermediate_size) * ACTIVATION_BYTES
    layer = batch * chunk * per_token
    scores = batch * shape.num_heads * chunk * chunk * ACTIVATION_BYTES
    logit_rows = chunk if workload.logits == "all" else 1
    logits = batch * logit_rows * shape.vocab_size * LOGIT_BYTES
    return {"layer": layer, "attention_scores": scores, "logits": logits, "total": layer + scores + logits}


def memory_breakdown(shape: ModelShape, fmt: WeightFormat, workload: Workload,
                     *, runtime_overhead_gb: float = RUNTIME_ALLOWANCE_GB, workspace_gb: float = 0.0) -> dict[str, float]:
    """Predicted device memory in decimal GB: weights + KV cache for the full context of
    every sequence + activations of the largest prefill + the TensorRT workspace pool
    (``workspace_gb``, in GB; 0 unless an engine's is known) + the runtime allowance.
    Recipe validation, ``edgekit plan`` and the readiness check all count memory this way."""
    weights = weight_bytes(shape, fmt)["total"] / GB
    kv = kv_bytes_per_token(shape, workload.kv_bytes) * workload.context_length * workload.batch / GB
    activations = activation_bytes(shape, workload)["total"] / GB
    return {
        "weights_gb": weights,
        "kv_cache_gb": kv,
        "activations_gb": activations,
        "workspace_gb": workspace_gb,
        "runtime_overhead_gb": runtime_overhead_gb,
        "total_gb": weights + kv + activations + workspace_gb + runtime_overhead_gb,
    }


def fits(total_gb: float, usable_gb: float) -> bool:
    return total_gb <= usable_gb


# --- decode and prefill -----------------------------------------------------------------


def decode_step_bytes(shape: ModelShape, fmt: WeightFormat, workload: Workload) -> dict[str, float]:
    """DRAM bytes one decode step reads (and writes): every linear weight and the whole
    lm_head once per step whatever the batch, one embedding row and the KV cache (at the
    ``kv_fill`` point) per sequence, and the new token's K/V written back."""
    batch = workload.batch
    linear = shape.linear_parameters * fmt.linear_bits / 8
    lm_head = lm_head_parameters(shape) * fmt.lm_head_bits / 8
    embedding_rows = batch * shape.hidden_size * fmt.embedding_bits / 8
    norms = norm_parameters(shape) * 2
    per_token = kv_bytes_per_token(shape, workload.kv_bytes)
    kv_read = batch * per_token * workload.decode_kv_tokens
    kv_write = batch * per_token
    total = linear + lm_head + embedding_rows + norms + kv_read + kv_write
    return {"linear": linear, "lm_head": lm_head, "embedding_rows": embedding_rows, "norms": norms,
            "kv_read": kv_read, "kv_write": kv_write, "total": total}


def decode_step_flops(shape: ModelShape, workload: Workload) -> float:
    """Matmul FLOPs of one decode step: 2 per weight per sequence, plus attention over the
    cached tokens (q.K and p.V: 4 x heads x head_dim per cached token per layer)."""
    weights = shape.linear_parameters + lm_head_parameters(shape)
    attention = 4 * shape.num_layers * shape.num_heads * shape.head_dim * workload.decode_kv_tokens
    return workload.batch * (2 * weights + attention)


def prefill_call(shape: ModelShape, fmt: WeightFormat, tokens: int, *, past: int = 0, batch: int = 1,
                 kv_bytes: float = 2.0, logits: str = "all") -> tuple[float, float]:
    """(DRAM bytes, matmul FLOPs) of one prefill call of ``tokens`` new tokens after ``past``
    cached ones.

    FLOPs: 2 per linear weight per token; the lm_head for every position (edgekit's export)
    or only the last; causal attention, where new token i (counted from 0 at the start of
    the sequence) attends to i + 1 keys: q.K and p.V are a multiply-add per key per head
    dimension, so 4 x layers x heads x head_dim x (tokens x past + tokens(tokens+1)/2).
    Bytes: every weight once (the call streams all of them), the cached K/V read and the
    new tokens' K/V written."""
    pairs = tokens * past + tokens * (tokens + 1) / 2
    flops = batch * (2 * shape.linear_parameters * tokens
                     + 2 * lm_head_parameters(shape) * (tokens if logits == "all" else 1)
                     + 4 * shape.num_layers * shape.num_heads * shape.head_dim * pairs)
    weights = (shape.linear_parameters * fmt.linear_bits / 8 + lm_head_parameters(shape) * fmt.lm_head_bits / 8
               + norm_parameters(shape) * 2)
    moved = weights + batch * (past + tokens) * kv_bytes_per_token(shape, kv_bytes)
    return moved, flops


def prefill_flops(shape: ModelShape, tokens: int, *, batch: int = 1, logits: str = "all") -> float:
    """Matmul FLOPs of a ``tokens``-long prompt in one call (see :func:`prefill_call`)."""
    return prefill_call(shape, weight_format("fp16"), tokens, batch=batch, logits=logits)[1]


def roofline_ms(bytes_moved: float, flops: float, bandwidth_gbps: float, peak_tflops: float) -> float:
    """The roofline lower bound: the slower of moving the bytes at peak bandwidth and doing
    the FLOPs at peak matmul rate."""
    return max(bytes_moved / (bandwidth_gbps * 1e9), flops / (peak_tflops * 1e12)) * 1e3


@dataclass(frozen=True)
class Efficiency:
    """How real runtimes relate to the roofline: ``time = slope x roofline + overhead_ms``.

    ``1/slope`` is the fraction of peak the runtime sustains on the bandwidth- (or compute-)
    bound part; ``overhead_ms`` is the per-call time that does not shrink with the model
    (kernel launches, synchronisation, sampling), which dominates small models.
    """

    slope: float
    overhead_ms: float

    @property
    def efficiency(self) -> float:
        return 1.0 / self.slope

    def time_ms(self, roofline: float) -> float:
        return self.slope * roofline + self.overhead_ms


@dataclass(frozen=True)
class Hardware:
    """The two figures the roofline needs, for one target in one power mode."""

    bandwidth_gbps: float
    peak_tflops: float


def decode_roofline_ms(shape: ModelShape, fmt: WeightFormat, workload: Workload, hw: Hardware) -> float:
    return roofline_ms(decode_step_bytes(shape, fmt, workload)["total"], decode_step_flops(shape, workload),
                       hw.bandwidth_gbps, hw.peak_tflops)


def prefill_roofline_ms(shape: ModelShape, fmt: WeightFormat, workload: Workload, hw: Hardware,
                        *, tokens: int | None = None, past: int = 0) -> float:
    tokens = workload.prompt_tokens if tokens is None else tokens
    moved, flops = prefill_call(shape, fmt, tokens, past=past, batch=workload.batch, kv_bytes=workload.kv_bytes,
                                logits=workload.logits)
    return roofline_ms(moved, flops, hw.bandwidth_gbps, hw.peak_tflops)


def decode_ms(shape: ModelShape, fmt: WeightFormat, workload: Workload, hw: Hardware, eff: Efficiency) -> float:
    """Predicted time of one decode step (each sequence of the batch gains one token)."""
    return eff.time_ms(decode_roofline_ms(shape, fmt, workload, hw))


def prefill_ms(shape: ModelShape, fmt: WeightFormat, workload: Workload, hw: Hardware, eff: Efficiency) -> float:
    """Predicted time to first token for a ``prompt_tokens`` prompt, run as calls of at most
    ``prefill_chunk`` tokens (the engine's largest prefill shape); each call pays the
    calibrated per-call overhead."""
    chunk = max(1, min(workload.prefill_chunk, workload.context_length))
    total, done = 0.0, 0
    while done < workload.prompt_tokens:
        n = min(chunk, workload.prompt_tokens - done)
        total += eff.time_ms(prefill_roofline_ms(shape, fmt, workload, hw, tokens=n, past=done))
        done += n
    return total


# --- the largest model that meets a latency budget --------------------------------------


def largest_depth(shape: ModelShape, ok: Callable[[ModelShape], bool], *, limit: int = 1 << 14) -> int | None:
    """The largest ``num_layers`` (other sizes kept) for which ``ok(shape)`` holds, or None
    when even one layer fails. ``ok`` must be monotone: true up to some depth, false after
    (decode time and memory both grow with depth)."""
    if not ok(replace(shape, num_layers=1)):
        return None
    low, high = 1, 2
    while high <= limit and ok(replace(shape, num_layers=high)):
        low, high = high, high * 2
    if high > limit:
        return low  # ok up to the search limit
    while high - low > 1:  # ok(low) and not ok(high)
        middle = (low + high) // 2
        if ok(replace(shape, num_layers=middle)):
            low = middle
        else:
            high = middle
    return low


__all__ = [
    "ACTIVATION_BYTES", "COMPUTE_PRECISION", "GB", "GIB", "RUNTIME_ALLOWANCE_GB", "LOGIT_BYTES", "PRECISIONS", "TARGET_PRECISION",
    "Efficiency", "Hardware", "WeightFormat", "Workload",
    "activation_bytes", "decode_ms", "decode_roofline_ms", "decode_step_bytes", "decode_step_flops", "fits",
    "group_quant_bits", "kv_bytes_per_token", "largest_depth", "lm_head_parameters", "memory_breakdown",
    "norm_parameters", "prefill_call", "prefill_flops", "prefill_ms", "prefill_roofline_ms", "roofline_ms",
    "weight_bytes", "weight_format",
]
