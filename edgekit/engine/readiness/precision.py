"""Typing notes: the graph's real float types (KV cache, logits, initializers, the Casts to
FP32 inside a half-precision graph) and how TensorRT will type the engine (weak typing with the
FP16 flag on 10.x, strongly typed for Q/DQ graphs and on TensorRT 11)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from edgekit.engine import trt_onnx_support as support_data
from edgekit.engine.readiness.findings import Finding
from edgekit.engine.readiness.graph import Graph, GraphInput, elem_type_name, node_attr
from edgekit.engine.readiness.quantization import Quantization


def typing_notes(g: Graph, support: support_data.ParserSupport, quant: Quantization) -> list[Finding]:
    import onnx

    float_io = [spec for spec in (*g.inputs, *g.outputs) if spec.elem_type == onnx.TensorProto.FLOAT]
    if not float_io:
        return _half_notes(g)
    trt = f"TensorRT {support.version}"
    example = float_io[0].name
    if support.major >= 11:
        message = (f"the graph computes in float32 ('{example}' is FP32): {trt} builds every network strongly typed "
                   "(TensorRT 11 removed the FP16 builder flag), so non-quantized layers and activations run in FP32")
        fix = "none needed; for half-precision activations convert the graph to FP16 with ModelOpt AutoCast first"
    elif quant.quantized:
        message = (f"the graph computes in float32 ('{example}' is FP32) with Q/DQ: edgekit builds Q/DQ graphs strongly "
                   f"typed on {trt}, which keeps the non-quantized layers and activations in FP32")
        fix = ("none needed; for half-precision activations and KV cache re-export with export_onnx tensorrt_dtype: auto "
               "(float16) or bfloat16")
    else:
        message = (f"the graph computes in float32 ('{example}' is FP32): on {trt} edgekit builds it weakly typed with "
                   "the FP16 flag, so TensorRT may run layers in FP16; TensorRT 11 removed that flag (strong typing only)")
        fix = "none needed on TensorRT 10; for TensorRT 11 convert the graph to FP16 with ModelOpt AutoCast first"
    return [Finding("info", "fp32-activations", message, fix)]


def graph_float_types(g: Graph) -> dict[str, Any]:
    """The float types the graph really has: KV cache (past/present), logits, initializers (by
    type), and the Casts to FLOAT inside a half-precision graph (the float32 islands PyTorch
    keeps: RMSNorm's variance, softmax, the rotary tables)."""
    import onnx

    def names(specs: Iterable[GraphInput]) -> list[str]:
        return sorted({elem_type_name(s.elem_type) for s in specs})

    kv = [s for s in (*g.inputs, *g.outputs) if s.name.startswith(("past_key_values", "present"))]
    inits = Counter(elem_type_name(t.data_type) for t in g.inits.values())
    casts = sum(1 for node in g.graph.node if node.op_type == "Cast"
                and node_attr(node, "to", 0) == onnx.TensorProto.FLOAT)
    return {"kv_cache": names(kv), "logits": names(s for s in g.outputs if s.name == "logits"),
            "initializers": dict(sorted(inits.items())), "casts_to_fp32": casts}


def _half_notes(g: Graph) -> list[Finding]:
    import onnx

    half = {onnx.TensorProto.FLOAT16: "FP16", onnx.TensorProto.BFLOAT16: "BF16"}
    io = [half[s.elem_type] for s in (*g.inputs, *g.outputs) if s.elem_type in half]
    if not io:
        return []
    types = graph_float_types(g)
    fp32_inits = types["initializers"].get("FP32", 0)
    message = (f"the graph computes in {'/'.join(sorted(set(io)))}: KV cache {'/'.join(types['kv_cache']) or '-'}, logits "
               f"{'/'.join(types['logits']) or '-'}, initializers {types['initializers']}; {types['casts_to_fp32']} Cast "
               "to FP32 inside (norm variance, softmax, rotary tables, as PyTorch computes them), which a strongly typed "
               "engine keeps")
    fix = "none needed" if not fp32_inits else (
        f"{fp32_inits} FP32 initializer(s) remain: check that no weight MatMul runs in FP32 (edgekit check --json lists them)")
    return [Finding("info", "half-precision", message, fix)]
