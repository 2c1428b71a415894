"""Graph edits shared by the quantized rewrites: fresh names, raw initializers, node order, dropping
what the rewrite left unread, and the opset / IR version the new nodes need."""

from __future__ import annotations

from typing import Any

from edgekit.errors import StageError
from edgekit.export.quantized.codes import np_dtype
from edgekit.onnx_index import GraphIndex

MS_DOMAIN = "com.microsoft"


# Default-domain ops whose newer versions (19..21) only add types (float8, int4, ...) or
# attributes whose defaults keep the old behaviour: bumping the opset import is enough.
# Ops outside this list that changed (GroupNormalization-21, DFT-20, GridSample-20, ...)
# change meaning or signature and are refused.
_OPSET_COMPATIBLE = frozenset(
    {
        "AveragePool", "Cast", "CastLike", "Constant", "ConstantOfShape", "DequantizeLinear",
        "Equal", "Flatten", "Identity", "If", "IsInf", "IsNaN", "Loop", "Pad", "QLinearMatMul",
        "QuantizeLinear", "ReduceMax", "ReduceMin", "Reshape", "Resize", "Scan", "Shape", "Size",
        "Squeeze", "Transpose", "Unsqueeze",
    }
)


def unique_name(g: GraphIndex, base: str, taken: set[str]) -> str:
    name, i = base, 1
    while name in taken or name in g.inits or name in g.producer:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def raw_tensor(name: str, data_type: int, dims: list[int], raw: bytes) -> Any:
    from onnx import TensorProto

    t = TensorProto()
    t.name = name
    t.data_type = data_type
    t.dims.extend(int(d) for d in dims)
    t.raw_data = raw
    return t


def float_type(g: GraphIndex, init_name: str) -> tuple[int, Any]:
    t = g.inits[init_name]
    return t.data_type, np_dtype(t.data_type)


def drop_unused(g: GraphIndex, touched_inits: set[str], bypassed_transposes: set[str]) -> None:
    """Drop Transposes nobody reads any more, then float initializers nobody reads."""
    graph = g.graph
    used: set[str] = set()

    def collect_used() -> None:
        used.clear()
        for node in graph.node:
            used.update(node.input)
            for attr in node.attribute:  # names captured by subgraphs
                for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                    for sn in sub.node:
                        used.update(sn.input)
        used.update(o.name for o in graph.output)

    collect_used()
    keep, removed_outputs = [], set()
    for n in graph.node:
        if n.name in bypassed_transposes and not any(o in used for o in n.output):
            removed_outputs.update(n.output)
        else:
            keep.append(n)
    if removed_outputs:
        del graph.node[:]
        graph.node.extend(keep)
        collect_used()
    dead = {name for name in touched_inits if name not in used} | removed_outputs
    kept_inits = [t for t in graph.initializer if t.name not in dead]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)
    for field in (graph.value_info, graph.input):
        kept = [v for v in field if v.name not in dead]
        del field[:]
        field.extend(kept)


def check_opset_change(model: Any, opset: int, where: str) -> None:
    import onnx.defs

    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if current is None or current >= opset:
        return
    ops: set[str] = set()

    def walk(graph: Any) -> None:
        for node in graph.node:
            if node.domain in ("", "ai.onnx"):
                ops.add(node.op_type)
            for attr in node.attribute:
                for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                    walk(sub)

    walk(model.graph)
    changed = []
    for op in sorted(ops):
        try:
            old = onnx.defs.get_schema(op, current).since_version
            new = onnx.defs.get_schema(op, opset).since_version
        except onnx.defs.SchemaError:
            continue
        if old != new and op not in _OPSET_COMPATIBLE:
            changed.append(f"{op}-{old}->{new}")
    if changed:
        raise StageError(
            f"raising the graph's opset from {current} to {opset} changes the meaning of {', '.join(changed)}",
            where=where,
            how=f"export the float model at opset {opset} (export_onnx opset: {opset}) or convert it with "
            "onnx.version_converter first",
        )


def set_opsets(model: Any, default: int | None, *, ms: bool = False) -> int:
    import onnx.helper

    out = None
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            if default is not None and o.version < default:
                o.version = default
            out = o.version
    if ms and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    known = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    needed = onnx.helper.find_min_ir_version_for(known, ignore_unknown=True)
    model.ir_version = max(model.ir_version, needed, 10 if (out or 0) >= 21 else 0)  # INT4/UINT4 need IR 10
    return int(out or 0)


def insert_before(graph: Any, first_consumer: dict[str, list[Any]]) -> None:
    """Re-emit graph.node with each list of new nodes placed before the named node."""
    nodes = list(graph.node)
    del graph.node[:]
    for node in nodes:
        for extra in first_consumer.get(node.name, []):
            graph.node.append(extra)
        graph.node.append(node)


def ensure_node_names(g: GraphIndex) -> None:
    seen: set[str] = set()
    for i, node in enumerate(g.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.name or node.op_type}_edgekit_{i}"
        seen.add(node.name)
