"""The nodes of an ONNX graph, read straight from the protobuf wire format.

The runtime needs one fact about a bundle's graph before it opens it in ONNX Runtime: which op
makes each ``present.*`` output (:func:`edgekit.runtime.backends.ort.appends_in_place`). Importing
the ``onnx`` package for that costs ~0.5 s (ml_dtypes, protobuf), more than the rest of a
start-up; reading the few fields involved costs milliseconds. Only the main graph's nodes are
read (``ModelProto.graph`` = field 7, ``GraphProto.node`` = 1, ``NodeProto.output`` = 2 and
``op_type`` = 4, from onnx.proto3); every other field, the initializers included, is skipped
by its length without being decoded.
"""

from __future__ import annotations

from pathlib import Path

_MODEL_GRAPH, _GRAPH_NODE, _NODE_OUTPUT, _NODE_OP_TYPE = 7, 1, 2, 4


class MalformedGraph(ValueError):
    """The bytes are not a well-formed ONNX ModelProto (as far as the fields read here go)."""


def _varint(data: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise MalformedGraph("truncated or oversized varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(data: memoryview, start: int, end: int):
    """(field number, wire type, value) of one message's fields; value is the (start, end) of
    a length-delimited field, else None (the field is skipped)."""
    pos = start
    while pos < end:
        key, pos = _varint(data, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(data, pos, end)
            yield number, wire, None
        elif wire == 1:
            pos += 8
            yield number, wire, None
        elif wire == 2:
            length, pos = _varint(data, pos, end)
            if pos + length > end:
                raise MalformedGraph("a field runs past the end of its message")
            yield number, wire, (pos, pos + length)
            pos += length
        elif wire == 5:
            pos += 4
            yield number, wire, None
        else:  # groups (3, 4) are not used by onnx.proto; anything else is not protobuf
            raise MalformedGraph(f"unexpected wire type {wire}")
    if pos != end:
        raise MalformedGraph("a fixed-size field runs past the end of its message")


def graph_nodes(data: bytes | memoryview) -> list[tuple[str, list[str]]]:
    """``(op_type, outputs)`` of every node of the main graph of a serialized ModelProto."""
    view = memoryview(data)
    nodes: list[tuple[str, list[str]]] = []
    for number, wire, span in _fields(view, 0, len(view)):
        if number != _MODEL_GRAPH or wire != 2:
            continue
        for g_number, g_wire, g_span in _fields(view, *span):
            if g_number != _GRAPH_NODE or g_wire != 2:
                continue
            op_type, outputs = "", []
            for n_number, n_wire, n_span in _fields(view, *g_span):
                if n_wire != 2:
                    continue
                if n_number == _NODE_OUTPUT:
                    outputs.append(bytes(view[n_span[0] : n_span[1]]).decode("utf-8", "replace"))
                elif n_number == _NODE_OP_TYPE:
                    op_type = bytes(view[n_span[0] : n_span[1]]).decode("utf-8", "replace")
            nodes.append((op_type, outputs))
    return nodes


def read_graph_nodes(path: str | Path) -> list[tuple[str, list[str]]]:
    """:func:`graph_nodes` of an ``.onnx`` file (its external data is not read)."""
    return graph_nodes(Path(path).read_bytes())


_GRAPH_INPUT, _GRAPH_OUTPUT = 11, 12  # GraphProto.input / .output (ValueInfoProto)
_VALUE_NAME, _VALUE_TYPE = 1, 2  # ValueInfoProto.name / .type (TypeProto)
_TYPE_TENSOR, _TENSOR_ELEM_TYPE = 1, 1  # TypeProto.tensor_type / TypeProto.Tensor.elem_type
FLOAT_TYPES = {1: ("float32", 4), 10: ("float16", 2), 16: ("bfloat16", 2), 11: ("float64", 8)}


def graph_io_types(data: bytes | memoryview) -> tuple[dict[str, int], dict[str, int]]:
    """``({input name: elem_type}, {output name: elem_type})`` of the main graph (TensorProto
    data-type codes: 1 float32, 10 float16, 16 bfloat16, ...); 0 where a value has no tensor type."""
    view = memoryview(data)
    inputs: dict[str, int] = {}
    outputs: dict[str, int] = {}
    for number, wire, span in _fields(view, 0, len(view)):
        if number != _MODEL_GRAPH or wire != 2:
            continue
        for g_number, g_wire, g_span in _fields(view, *span):
            if g_wire != 2 or g_number not in (_GRAPH_INPUT, _GRAPH_OUTPUT):
                continue
            name, elem_type = "", 0
            for v_number, v_wire, v_span in _fields(view, *g_span):
                if v_wire != 2:
                    continue
                if v_number == _VALUE_NAME:
                    name = bytes(view[v_span[0] : v_span[1]]).decode("utf-8", "replace")
                elif v_number == _VALUE_TYPE:
                    for t_number, t_wire, t_span in _fields(view, *v_span):
                        if t_number == _TYPE_TENSOR and t_wire == 2:
                            elem_type = _elem_type(view, t_span)
            (inputs if g_number == _GRAPH_INPUT else outputs)[name] = elem_type
    return inputs, outputs


def _elem_type(view: memoryview, span: tuple[int, int]) -> int:
    pos, end = span
    while pos < end:
        key, pos = _varint(view, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(view, pos, end)
            if number == _TENSOR_ELEM_TYPE:
                return value
        elif wire == 2:
            length, pos = _varint(view, pos, end)
            pos += length
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise MalformedGraph(f"unexpected wire type {wire}")
    return 0


def kv_cache_dtype(path: str | Path) -> tuple[str, int] | None:
    """(type name, bytes per value) of a decoder graph's KV cache, from its ``past_key_values.*``
    inputs (else ``present.*`` outputs), without the onnx package or the weights; None when the
    graph has no float KV cache."""
    inputs, outputs = graph_io_types(Path(path).read_bytes())
    codes = [t for n, t in inputs.items() if n.startswith("past_key_values")] or \
        [t for n, t in outputs.items() if n.startswith("present")]
    found = {FLOAT_TYPES.get(code) for code in codes} - {None}
    return max(found, key=lambda item: item[1]) if found else None


__all__ = ["FLOAT_TYPES", "MalformedGraph", "graph_io_types", "graph_nodes", "kv_cache_dtype", "read_graph_nodes"]
