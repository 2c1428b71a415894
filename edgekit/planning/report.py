"""The plan as data: one JSON-ready dict for a model on one or more targets.

Layout (``format: edgekit.plan/1``): ``model`` and ``inputs`` say what was planned for (not
predictions); per target, ``hardware`` and ``calibration`` say which figures were used, and
every number that is a prediction sits under a key starting with ``predicted``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from edgekit.planning import roofline as rf
from edgekit.planning.calibration import Fit, fitted
from edgekit.planning.hardware import hardware
from edgekit.sizing import ModelShape

FORMAT = "edgekit.plan/1"
NOTE = (
    "Every number under a 'predicted...' key is a prediction: a roofline model (bytes moved / memory bandwidth, "
    "FLOPs / peak compute) scaled by an efficiency and a per-call overhead fitted to published TensorRT-class "
    "measurements (docs/planning.md). Nothing was measured on the target."
)


@dataclass(frozen=True)
class PlanRequest:
    """What to plan: the model's deployed shape and weight format, the workload, budgets."""

    model: dict[str, Any]
    shape: ModelShape
    fmt: rf.WeightFormat
    workload: rf.Workload
    #: latency budget per generated token (ms), p99 in the recipe; compared to the mean prediction
    latency_budget_ms: float | None = None
    ttft_budget_ms: float | None = None
    memory_budget_gb: float | None = None
    power_mode: str | None = None


def shape_dict(shape: ModelShape) -> dict[str, Any]:
    from edgekit.prune.shapes import shape_dict as pruned_shape_dict

    data = pruned_shape_dict(shape)
    data["vocab_size"] = shape.vocab_size
    data["tie_word_embeddings"] = shape.tie_word_embeddings
    return data


def inputs_dict(request: PlanRequest) -> dict[str, Any]:
    w, f = request.workload, request.fmt
    return {
        "precision": f.precision,
        "weight_format": {
            "linear_bits_per_weight": round(f.linear_bits, 4), "lm_head_bits_per_weight": f.lm_head_bits,
            "embedding_bits_per_weight": f.embedding_bits, "group_size": f.group_size, "compute_precision": f.compute,
        },
        "context_length": w.context_length,
        "batch": w.batch,
        "kv_cache_bytes_per_value": w.kv_bytes,
        "kv_fill": w.kv_fill,
        "decode_kv_tokens": w.decode_kv_tokens,
        "prompt_tokens": w.prompt_tokens,
        "prefill_chunk": min(w.prefill_chunk, w.context_length),
        "prompt_logits": w.logits,
        "runtime_overhead_gb": rf.RUNTIME_ALLOWANCE_GB,
        "memory_unit": "GB = 10^9 bytes (as target profiles state memory); budgets.memory_gb is GiB (as validate "
                       "measures it) and is converted",
        "budgets": {
            "latency_p99_ms": request.latency_budget_ms,
            "ttft_p99_ms": request.ttft_budget_ms,
            "memory_gb": request.memory_budget_gb,
        },
        "power_mode": request.power_mode,
    }


def _round(value: float, digits: int = 3) -> float:
    return round(value, digits)


#: A prediction whose roofline time lies more than this factor outside the roofline times
#: of the measurements its efficiency was fitted on is flagged ``extrapolated``.
EXTRAPOLATION_FACTOR = 2.0


def _extrapolated(roofline_ms: float, fit: Fit) -> bool:
    low, high = fit.span_ms
    return not (low / EXTRAPOLATION_FACTOR <= roofline_ms <= high * EXTRAPOLATION_FACTOR)


def plan_target(request: PlanRequest, target: Any) -> dict[str, Any]:
    """The predictions for one target (see the module docstring for the layout)."""
    shape, fmt, workload = request.shape, request.fmt, request.workload
    entry: dict[str, Any] = {"target": target.name, "kind": target.kind}
    wanted = rf.TARGET_PRECISION[fmt.precision]
    if not target.supports(wanted):
        entry["supported"] = False
        entry["unsupported_reason"] = (
            f"{target.name} does not support {fmt.precision} (supported: {', '.join(target.supported_precisions)})")
        return entry
    entry["supported"] = True
    hw, peak = hardware(target, fmt.compute, request.power_mode)
    mode = target.power_mode(request.power_mode).name
    usable = target.memory.usable_gb
    entry["hardware"] = {
        "power_mode": mode,
        "memory_bandwidth_gbps": hw.bandwidth_gbps,
        "peak_tflops": peak.tflops,
        "peak_precision": fmt.compute,
        "peak_derivation": peak.derivation,
        "usable_memory_gb": usable,
        "memory_shared_with_cpu": target.memory.shared,
    }
    decode_fit, prefill_fit = fitted(target.kind, "decode"), fitted(target.kind, "prefill")
    entry["calibration"] = {"decode": decode_fit.to_dict(), "prefill": prefill_fit.to_dict()}

    memory = rf.memory_breakdown(shape, fmt, workload)
    # the recipe's memory budget is GiB (edgekit validate measures peak memory in GiB)
    budget_gb = request.memory_budget_gb * rf.GIB / rf.GB if request.memory_budget_gb else None
    cap = min(usable, budget_gb) if budget_gb else usable
    entry["predicted_memory_gb"] = {k.removesuffix("_gb"): _round(v) for k, v in memory.items()}
    entry["predicted_fits"] = rf.fits(memory["total_gb"], usable)
    entry["predicted_headroom_gb"] = _round(usable - memory["total_gb"])

    step_bytes = rf.decode_step_bytes(shape, fmt, workload)
    step_flops = rf.decode_step_flops(shape, workload)
    decode_roof = rf.decode_roofline_ms(shape, fmt, workload, hw)
    decode_ms = decode_fit.efficiency.time_ms(decode_roof)
    memory_bound = step_bytes["total"] / (hw.bandwidth_gbps * 1e9) >= step_flops / (hw.peak_tflops * 1e12)
    entry["predicted_decode"] = {
        "bytes_per_step": {k: int(v) for k, v in step_bytes.items()},
        "flops_per_step": int(step_flops),
        "bound": "memory bandwidth" if memory_bound else "compute",
        "roofline_ms": _round(decode_roof, 4),
        "ms_per_token": _round(decode_ms),
        "tokens_per_s": _round(1000.0 / decode_ms, 2),
        "tokens_per_s_all_sequences": _round(workload.batch * 1000.0 / decode_ms, 2),
        "extrapolated": _extrapolated(decode_roof, decode_fit),
    }
    # the roofline of the whole prompt (every prefill call), before efficiency and overhead
    prefill_roof = rf.prefill_ms(shape, fmt, workload, hw, rf.Efficiency(slope=1.0, overhead_ms=0.0))
    ttft = rf.prefill_ms(shape, fmt, workload, hw, prefill_fit.efficiency)
    entry["predicted_prefill"] = {
        "roofline_ms": _round(prefill_roof, 4),
        "ttft_ms": _round(ttft),
        "extrapolated": _extrapolated(prefill_roof, prefill_fit),
    }

    budgets: dict[str, Any] = {}
    if request.latency_budget_ms:
        budgets["latency_p99_ms"] = {"budget": request.latency_budget_ms, "predicted": _round(decode_ms),
                                     "meets": decode_ms <= request.latency_budget_ms}
    if request.ttft_budget_ms:
        budgets["ttft_p99_ms"] = {"budget": request.ttft_budget_ms, "predicted": _round(ttft),
                                  "meets": ttft <= request.ttft_budget_ms}
    if request.memory_budget_gb:
        budgets["memory_gb"] = {"budget": request.memory_budget_gb, "budget_unit": "GiB",
                                "predicted": _round(memory["total_gb"] * rf.GB / rf.GIB),
                                "meets": memory["total_gb"] <= budget_gb}
    entry["predicted_within_budgets"] = budgets
    entry["predicted_largest_shape"] = (
        largest_shape(request, hw, decode_fit, cap) if request.latency_budget_ms else None)
    return entry


def largest_shape(request: PlanRequest, hw: rf.Hardware, decode_fit: Fit, memory_cap_gb: float) -> dict[str, Any]:
    """The deepest model of the same width (hidden, MLP, heads, vocabulary kept; layers
    varied) whose predicted decode step meets the latency budget and whose predicted memory
    fits ``memory_cap_gb``.

    Depth is the axis varied because every per-layer matmul keeps the shape of the planned
    model: the calibrated efficiency stays as valid as it is for the model itself, and time
    and memory grow monotonically (affinely) with depth. Scaling width would change the GEMM
    shapes and the head layout the efficiency was fitted on."""
    budget = request.latency_budget_ms
    fmt, workload = request.fmt, request.workload

    def step_ms(shape: ModelShape) -> float:
        return decode_fit.efficiency.time_ms(rf.decode_roofline_ms(shape, fmt, workload, hw))

    def memory_gb(shape: ModelShape) -> float:
        return rf.memory_breakdown(shape, fmt, workload)["total_gb"]

    def ok(shape: ModelShape) -> bool:
        return step_ms(shape) <= budget and memory_gb(shape) <= memory_cap_gb

    depth = rf.largest_depth(request.shape, ok)
    result: dict[str, Any] = {"axis": "num_layers", "budget_ms": budget, "memory_cap_gb": _round(memory_cap_gb)}
    if depth is None:
        one = replace(request.shape, num_layers=1)
        result.update(num_layers=None, reason=(
            f"even 1 layer is predicted at {step_ms(one):.3g} ms/token and {memory_gb(one):.3g} GB: "
            "the lm_head, embeddings and the per-token overhead alone miss the budget"))
        return result
    best = replace(request.shape, num_layers=depth)
    deeper = replace(request.shape, num_layers=depth + 1)
    limits = [name for name, failed in (("latency", step_ms(deeper) > budget),
                                        ("memory", memory_gb(deeper) > memory_cap_gb)) if failed]
    from edgekit.prune.shapes import total_parameters

    result.update(
        num_layers=depth,
        shape=shape_dict(best),
        parameters=total_parameters(best),
        ms_per_token=_round(step_ms(best)),
        memory_gb=_round(memory_gb(best)),
        one_layer_more={"ms_per_token": _round(step_ms(deeper)), "memory_gb": _round(memory_gb(deeper))},
        limited_by=limits or ["search limit"],
    )
    return result


def build_plan(request: PlanRequest, targets: list[Any]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "note": NOTE,
        "model": request.model,
        "inputs": inputs_dict(request),
        "targets": [plan_target(request, target) for target in targets],
    }


__all__ = ["FORMAT", "NOTE", "PlanRequest", "build_plan", "largest_shape", "plan_target", "shape_dict"]
