"""The nodes of an ONNX graph, read straight from the protobuf wire format.

The runtime needs one fact about a bundle's graph before it opens it in ONNX Runtime: which op
makes each ``present.*`` output (:func:`edgekit.runtime.backends._appends_in_place`). Importing
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


__all__ = ["MalformedGraph", "graph_nodes", "read_graph_nodes"]
