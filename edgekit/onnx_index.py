"""Name indexes over an ONNX graph, shared by the ONNX export (rewriting weight MatMuls) and the
TensorRT readiness checks (walking Q/DQ patterns). Pure onnx-protobuf bookkeeping, no onnx import."""

from __future__ import annotations

from typing import Any


class GraphIndex:
    """A loaded ModelProto's main graph: initializers by name, the node producing each value,
    the nodes consuming it (in graph order)."""

    def __init__(self, model: Any):
        self.model = model
        self.graph = model.graph
        self.inits: dict[str, Any] = {t.name: t for t in self.graph.initializer}
        self.producer: dict[str, Any] = {}
        self.consumers: dict[str, list[Any]] = {}
        for node in self.graph.node:
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
