"""Q/DQ checks: the patterns TensorRT fuses (INT4 only as block-quantized weights of a
MatMul/Gemm, symmetric, supported types and block sizes), scales, and the precisions the target
runs (FP8 from compute capability 8.9, FP4 from 10.0, the target's supported_precisions)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from edgekit.engine import trt_onnx_support as support_data
from edgekit.engine.readiness.findings import Finding, Tally, label, more
from edgekit.engine.readiness.graph import DEFAULT_DOMAINS, Graph, elem_type_name, is_within, node_attr, tensor_nbytes

#: ops a dequantized weight may pass through on its way to the MatMul/Gemm that consumes it
_WEIGHT_PASS_THROUGH = frozenset({"Transpose", "Reshape", "Cast", "Identity", "Squeeze", "Unsqueeze", "Flatten"})
_WEIGHT_CONSUMERS = frozenset({"MatMul", "Gemm"})


class Quantization:
    """What the Q/DQ scan found (the memory and typing checks read it)."""

    def __init__(self) -> None:
        self.kinds: set[str] = set()  # "int4", "int8", "fp8", "fp4"
        self.forms: Counter[str] = Counter()

    @property
    def quantized(self) -> bool:
        return bool(self.kinds)


def _read_values(g: Graph, tensor: Any) -> Any | None:
    """A small tensor's values (zero points), reading only its own bytes of an external file."""
    import onnx
    from onnx import numpy_helper

    try:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            return numpy_helper.to_array(tensor)
        info = {e.key: e.value for e in tensor.external_data}
        path = g.path.parent / info["location"]
        offset, length = int(info.get("offset", 0)), int(info.get("length", tensor_nbytes(tensor)))
        if length > 64 * 1024 * 1024 or not is_within(path.resolve(), g.path.parent.resolve()):
            return None
        with open(path, "rb") as handle:
            handle.seek(offset)
            raw = handle.read(length)
        copy = onnx.TensorProto()
        copy.CopyFrom(tensor)
        del copy.external_data[:]
        copy.data_location = onnx.TensorProto.DEFAULT
        copy.raw_data = raw
        return numpy_helper.to_array(copy)
    except Exception:
        return None


def check_quantization(g: Graph, support: support_data.ParserSupport, target: Any,
                       quant: Quantization) -> list[Finding]:
    import onnx

    tp = onnx.TensorProto
    cc = target.compute_capability_tuple
    tallies: dict[str, Tally] = {}

    def flag(code: str, key: str, node: Any, *details: Any) -> None:
        tallies.setdefault(code, Tally()).add((code, key), node, *details)

    fp8_nodes: list[Any] = []
    fp4_nodes: list[Any] = []
    for node in g.graph.node:
        if node.domain not in DEFAULT_DOMAINS or node.op_type not in ("DequantizeLinear", "QuantizeLinear"):
            continue
        is_dq = node.op_type == "DequantizeLinear"
        data = node.input[0]
        zero_point = node.input[2] if len(node.input) > 2 and node.input[2] else None
        zp_type = g.types.get(zero_point) if zero_point else None
        if is_dq:
            q_type = g.types.get(data)
        else:
            # QuantizeLinear's output type: its zero point's, else output_dtype, else ONNX's UINT8 default
            q_type = zp_type or node_attr(node, "output_dtype", 0) or tp.UINT8
        if not q_type:
            continue
        type_name = elem_type_name(q_type)
        is_weight = g.constant_tensor(data) is not None
        kind = {tp.INT4: "int4", tp.INT8: "int8", tp.FLOAT8E4M3FN: "fp8",
                getattr(tp, "FLOAT4E2M1", -1): "fp4"}.get(q_type)

        # --- types TensorRT quantizes to at all
        if q_type in (tp.UINT4, tp.UINT8):
            if zero_point is None and not is_dq and q_type == tp.UINT8:
                # no zero point and no output_dtype: ONNX means UINT8, TensorRT's importer quantizes to INT8
                kind, type_name = "int8", "INT8"
            elif zero_point is not None and _nonzero(g, zero_point):
                flag("zero-point", type_name, node, type_name)
                continue
            else:
                flag("qdq-dtype", type_name, node, type_name)
                continue
        if kind is None:
            flag("qdq-dtype", type_name, node, type_name)
            continue
        if type_name not in support.quantized_types:
            flag("qdq-dtype-version", type_name, node, type_name)
            continue
        quant.kinds.add(kind)
        if kind == "fp8":
            fp8_nodes.append(node)
        if kind == "fp4":
            fp4_nodes.append(node)

        # --- INT4 is weight-only: a constant dequantized into a MatMul/Gemm
        if kind == "int4" and not is_dq:
            flag("int4-not-weight-only", "Q", node, data)
            continue
        if kind == "int4" and not is_weight:
            flag("int4-not-weight-only", "DQ", node, data)
            continue
        if kind == "int4":
            bad = _non_gemm_consumer(g, node.output[0])
            if bad is not None:
                flag("int4-consumer", bad, node, bad)
            if g.opset < 21:
                flag("opset-int4", "", node)

        # --- symmetric only: any zero point must be all zeros
        if zero_point is not None and _nonzero(g, zero_point):
            flag("zero-point", type_name, node, type_name)

        # --- scales and blocks
        form = _check_scale_and_blocks(g, node, kind, is_weight, flag)
        if form is not None:
            role = "weight-only" if is_weight and is_dq else ("weights" if is_weight else "activations")
            consumer = _first_consumer_op(g, node.output[0]) if is_dq else "DequantizeLinear"
            symmetric = "symmetric (no zero point)" if zero_point is None else "zero point 0"
            quant.forms[f"{node.op_type} {type_name} {role}, {form}, {symmetric} -> {consumer}"] += 1

    # FP8 also hides in initializers (pre-quantized weights read without a DQ we recognize)
    fp8_inits = [t.name for t in g.inits.values() if t.data_type == tp.FLOAT8E4M3FN]
    if fp8_inits:
        quant.kinds.add("fp8")
    findings = _quantization_findings(tallies, support, g, target)
    if (fp8_nodes or fp8_inits) and cc < (8, 9):
        first = fp8_nodes[0].name if fp8_nodes else fp8_inits[0]
        what = f"node {label(fp8_nodes[0])}" if fp8_nodes else f"initializer '{fp8_inits[0]}'"
        findings.append(Finding(
            "error", "fp8-needs-sm89",
            f"{what} is FP8 (FLOAT8E4M3FN; {len(fp8_nodes)} Q/DQ nodes, {len(fp8_inits)} FP8 initializers), but "
            f"{target.name} has compute capability {target.compute_capability}: TensorRT runs FP8 only on 8.9 "
            "(Ada) and newer",
            "quantize with gptq (INT4/INT8 weight-only) for this target, or choose a target with compute "
            "capability >= 8.9",
            first,
        ))
    elif (fp8_nodes or fp8_inits) and not target.supports("fp8"):
        findings.append(_precision_finding(target, "fp8", fp8_nodes[0] if fp8_nodes else None))
    if fp4_nodes and cc < support_data.FP4_MIN_COMPUTE_CAPABILITY:
        findings.append(Finding(
            "error", "fp4-needs-sm100",
            f"node {label(fp4_nodes[0])}{more(len(fp4_nodes))} is FP4 (FLOAT4E2M1), but {target.name} has compute "
            f"capability {target.compute_capability}: FP4 GEMMs need 10.0 (Blackwell) or newer",
            "quantize with gptq (INT4 weight-only) or to FP8/INT8 for this target",
            fp4_nodes[0].name,
        ))
    for kind, precision in (("int4", "int4_weight_only"), ("int8", "int8")):
        if kind in quant.kinds and not target.supports(precision):
            findings.append(_precision_finding(target, precision, None))
    if quant.forms:
        listed = "; ".join(f"{count} x {form}" for form, count in quant.forms.most_common())
        findings.append(Finding("info", "quantization", f"Q/DQ found: {listed}", "none needed"))
    return findings


def _precision_finding(target: Any, precision: str, node: Any | None) -> Finding:
    return Finding(
        "error", "precision",
        f"the graph uses {precision}"
        + (f" (node {label(node)})" if node is not None else "")
        + f", which {target.name} does not list in supported_precisions ({', '.join(target.supported_precisions)})",
        f"quantize to one of {', '.join(target.supported_precisions)} for {target.name}",
        node.name if node is not None else None,
    )


def _nonzero(g: Graph, name: str) -> bool:
    """True if the zero point tensor has a non-zero value (or cannot be read as a constant)."""
    import numpy as np

    tensor = g.constant_tensor(name)
    if tensor is None:
        return True  # a computed zero point: TensorRT needs a build-time constant of zeros
    values = _read_values(g, tensor)
    if values is None:
        return False  # unreadable here: the parser checks it; do not invent a finding
    return bool(np.any(values.astype(np.float32) != 0))


def _non_gemm_consumer(g: Graph, output: str) -> str | None:
    """The first op (or graph output) a dequantized weight reaches that is not a MatMul/Gemm,
    following Transpose/Reshape/Cast/... chains; None if every path ends in a MatMul/Gemm."""
    stack, seen = [output], set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in g.graph_outputs:
            return f"graph output '{name}'"
        consumers = g.consumers.get(name, [])
        if not consumers:
            return f"nothing (the tensor '{name}' is unused)"
        for consumer in consumers:
            if consumer.op_type in _WEIGHT_CONSUMERS:
                continue
            if consumer.op_type in _WEIGHT_PASS_THROUGH:
                stack.extend(consumer.output)
                continue
            return label(consumer)
    return None


def _first_consumer_op(g: Graph, output: str) -> str:
    consumers = g.consumers.get(output, [])
    while consumers and consumers[0].op_type in _WEIGHT_PASS_THROUGH and consumers[0].output:
        consumers = g.consumers.get(consumers[0].output[0], [])
    return consumers[0].op_type if consumers else "graph output"


def _check_scale_and_blocks(g: Graph, node: Any, kind: str, is_weight: bool, flag: Any) -> str | None:
    """Scale/block rules of TensorRT's Q/DQ; returns a description of the form, or None when
    a finding was raised for it."""
    import onnx

    scale_name = node.input[1] if len(node.input) > 1 else ""
    scale = g.constant_tensor(scale_name)
    if scale is None:
        flag("qdq-scale", "not-constant", node, scale_name)
        return None
    if scale.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
        flag("qdq-scale", "dtype", node, scale_name, elem_type_name(scale.data_type))
        return None
    data_shape = g.shapes.get(node.input[0]) or ()
    scale_shape = tuple(int(d) for d in scale.dims)
    scale_size = 1
    for d in scale_shape:
        scale_size *= d
    rank = len(data_shape)
    axis = int(node_attr(node, "axis", 1))
    axis = axis + rank if axis < 0 and rank else axis
    block_size = int(node_attr(node, "block_size", 0))
    if scale_size == 1 and block_size == 0:
        if kind == "int4":
            flag("block-size", "int4-per-tensor", node, "per-tensor")
            return None
        return "per-tensor scale"
    if len(scale_shape) == 1 and block_size == 0:
        if kind == "int4":
            flag("block-size", "int4-per-channel", node, f"per-channel on axis {axis}")
            return None
        if rank and 0 <= axis < rank and isinstance(data_shape[axis], int) and data_shape[axis] != scale_shape[0]:
            flag("qdq-scale", "per-channel", node, scale_name, f"{scale_shape[0]} scales for axis {axis} of size "
                 f"{data_shape[axis]}")
            return None
        return f"per-channel on axis {axis}"
    # blocked: scale has the data's rank, one axis divided into blocks
    if len(scale_shape) > 2:
        flag("block-size", "scale-rank", node, f"scale of rank {len(scale_shape)} (TensorRT takes rank <= 2)")
        return None
    if not rank or not all(isinstance(d, int) for d in data_shape) or len(scale_shape) != rank:
        flag("block-size", "shape", node, f"scale {list(scale_shape)} does not match the data's rank "
             f"({list(data_shape) or 'unknown shape'})")
        return None
    if block_size <= 0:
        flag("block-size", "no-attr", node, f"scale {list(scale_shape)} is blocked but the node has no block_size")
        return None
    if not 0 <= axis < rank:
        flag("block-size", "axis", node, f"axis {axis} outside rank {rank}")
        return None
    dims: list[int] = [int(d) for d in data_shape]  # type: ignore[arg-type]
    if axis not in (rank - 1, rank - 2):
        flag("block-size", "axis", node, f"blocks on axis {axis}; TensorRT blocks one of the last two axes")
        return None
    if dims[axis] % block_size:
        flag("block-size", "divide", node, f"block_size {block_size} does not divide axis {axis} of size {dims[axis]}")
        return None
    expected = tuple(d // block_size if i == axis else d for i, d in enumerate(dims))
    if scale_shape != expected:
        flag("block-size", "scale-shape", node, f"scale {list(scale_shape)} is not {list(expected)} (data "
             f"{dims}, block_size {block_size} on axis {axis}): TensorRT allows exactly one blocked axis")
        return None
    if kind == "int4" and block_size not in support_data.INT4_BLOCK_SIZES:
        flag("block-size", "int4-size", node, f"block_size {block_size}")
        return None
    if kind == "int4" and dims[-1] % 2:
        flag("block-size", "odd", node, f"last dimension {dims[-1]} is odd (INT4 packs two values per byte)")
        return None
    if kind in ("int8", "fp8"):
        flag("block-size", f"{kind}-blocked", node, f"block_size {block_size}")
    return f"block {block_size} on axis {axis}"


_QUANT_TEXT = {
    # code: (severity, what (detail) -> message tail, fix)
    "zero-point": ("error", "has {0} codes with a non-zero zero point (asymmetric quantization); TensorRT quantizes "
                   "symmetrically and takes only all-zero zero points",
                   "quantize with symmetric: true (signed codes, no zero point)"),
    "qdq-dtype": ("error", "uses {0}, which TensorRT does not quantize to (it takes INT8, FP8, INT4 weights and FP4; "
                  "UINT8 only as network I/O)",
                  "quantize to signed INT8/INT4 (symmetric: true) or FP8"),
    "qdq-dtype-version": ("error", "uses {0}, which TensorRT {version}'s parser does not take in Q/DQ ({types})",
                          "quantize to one of {types}, or build with a newer TensorRT"),
    "int4-not-weight-only": ("error", "quantizes '{0}' to INT4 at runtime; TensorRT supports INT4 only for "
                             "weights (weight-only: a constant INT4 initializer dequantized into a MatMul/Gemm)",
                             "quantize only the weights to INT4 (gptq/awq weight-only) and keep activations in "
                             "float, or use INT8/FP8 Q/DQ for activations"),
    "int4-consumer": ("error", "dequantizes INT4 weights into {0}; TensorRT fuses INT4 weights only into MatMul/Gemm "
                      "(optionally through Transpose/Reshape)",
                      "keep that weight in float (do not quantize it) or restructure so the INT4 weight feeds a "
                      "MatMul/Gemm"),
    "opset-int4": ("error", "dequantizes INT4 with block quantization, which ONNX defines only from opset 21 (graph "
                   "opset {opset})", "export the TensorRT variant at opset 21 (edgekit's tensorrt format does)"),
    "qdq-scale": ("error", "has scale '{0}' that TensorRT cannot use: {1}",
                  "use a constant FP32/FP16/BF16 scale initializer shaped like the quantization granularity"),
    "block-size": ("error", "{0}", "quantize with group_size 64 or 128 dividing the input features (block_size = "
                   "group_size on axis 0 of the [in, out] weight), symmetric, as edgekit's tensorrt export writes it"),
}


def _quantization_findings(tallies: dict[str, Tally], support: support_data.ParserSupport, g: Graph,
                           target: Any) -> list[Finding]:
    findings = []
    types = ", ".join(sorted(support.quantized_types))
    for code, tally in tallies.items():
        for (_, key), node, count, details in tally.items():
            severity, what, fix = _QUANT_TEXT[code]
            message = what.format(*details, version=support.version, types=types, opset=g.opset)
            if code == "block-size":
                severity, message = _block_text(key, message)
            findings.append(Finding(
                severity,  # type: ignore[arg-type]
                "opset" if code == "opset-int4" else ("qdq-dtype" if code == "qdq-dtype-version" else code),
                f"node {label(node)}{more(count)} {message}",
                fix.format(version=support.version, types=types),
                node.name,
            ))
    return findings


def _block_text(key: str, detail: str) -> tuple[str, str]:
    if key == "int4-size":
        return "error", f"uses INT4 {detail}; TensorRT's INT4 weight-only GEMMs take block sizes " + \
            " or ".join(map(str, support_data.INT4_BLOCK_SIZES))
    if key in ("int4-per-tensor", "int4-per-channel"):
        return "error", f"dequantizes INT4 {detail}; TensorRT's INT4 needs per-block scales"
    if key in ("int8-blocked", "fp8-blocked"):
        return "warning", (f"uses block quantization ({detail}) for {key.split('-')[0].upper()}; TensorRT documents "
                           "blocked scales for INT4 (and FP4) weights, INT8/FP8 use per-tensor or per-channel scales")
    return "error", f"has a block layout TensorRT rejects: {detail}"
