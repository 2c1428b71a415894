"""One graph rewrite in progress, as the three converters share it.

    rw = Rewrite.open(src, getters, opset=21)       # load, index, name nodes, match weights
    for (init, transposed), (module, nodes) in rw.per_init.items():
        rw.take(init, transposed, nodes)           # the float initializer (and its Transpose) may go
        ...                                        # build the replacement; rw.feed(nodes, dq, out)
    return rw.finish(dst, "qdq-blockwise", opset=21, check=True, ...)

``finish`` adds the new initializers, drops what nothing reads any more, sets the opsets,
writes ``dst`` (+ its external data) and returns the report (:mod:`.report`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekit.export.quantized.match import LinearMatch, PerInit, WeightGraph, plan_matches
from edgekit.export.quantized.onnx_edit import check_opset_change, drop_unused, ensure_node_names, insert_before, set_opsets
from edgekit.export.quantized.onnx_file import check_onnx, load_onnx, save_onnx
from edgekit.export.quantized.report import matches_json, rewrite_report, shared_notes


@dataclass
class Rewrite:
    src: Path
    model: Any
    g: WeightGraph
    public: dict[str, list[LinearMatch]]
    per_init: PerInit
    notes: list[str] = field(default_factory=list)
    taken: set[str] = field(default_factory=set)  # node/tensor names handed out in this rewrite
    new_inits: list[Any] = field(default_factory=list)
    before: dict[str, list[Any]] = field(default_factory=dict)  # node name -> nodes to insert before it
    touched: set[str] = field(default_factory=set)  # float initializers replaced (dropped if unread)
    bypassed: set[str] = field(default_factory=set)  # Transposes no longer on a weight's path
    forms: dict[str, int] = field(default_factory=dict)  # what each MatMul became -> count
    bits_used: set[int] = field(default_factory=set)
    replaced: int = 0

    @classmethod
    def open(cls, src: Path, arrays: dict[str, Any], *, opset: int | None = None) -> Rewrite:
        """Load ``src``, name its nodes, check the opset move (if ``opset``), and match each of
        ``arrays`` (module -> getters of the dequantized weight) to the MatMuls reading it."""
        src = Path(src)
        model = load_onnx(src)
        g = WeightGraph(model)
        ensure_node_names(g)
        if opset is not None:
            check_opset_change(model, opset, str(src))
        public, per_init = plan_matches(g, arrays, str(src))
        return cls(src=src, model=model, g=g, public=public, per_init=per_init)

    def take(self, init: str, transposed: bool, nodes: list[Any]) -> None:
        """The float initializer ``init`` (and the Transpose it reached the MatMuls through) is replaced."""
        self.touched.add(init)
        if transposed:
            self.bypassed.add(self.g.producer[nodes[0].input[1]].name)

    def feed(self, nodes: list[Any], producer: Any, out: str, form: str | None = None) -> None:
        """``producer`` (inserted before the first of ``nodes``) now feeds every MatMul of ``nodes`` its weight ``out``."""
        self.before.setdefault(nodes[0].name, []).append(producer)
        for node in nodes:
            node.input[1] = out
        self.replaced += len(nodes)
        if form is not None:
            self.count(form, len(nodes))

    def count(self, form: str, n: int) -> None:
        self.forms[form] = self.forms.get(form, 0) + n

    def finish(self, dst: Path, fmt: str, *, opset: int | None, bits: Any, check: bool, ms: bool = False,
               replace: dict[str, list[Any]] | None = None, **extra: Any) -> dict[str, Any]:
        """Put the new nodes in place (``replace``: node name -> the nodes standing for it), write
        ``dst`` and return the report; ``extra`` goes into the report as is."""
        graph = self.model.graph
        if replace:
            nodes = list(graph.node)
            del graph.node[:]
            for node in nodes:
                graph.node.extend(self.before.get(node.name, []))
                graph.node.extend(replace.get(node.name, [node]))
        else:
            insert_before(graph, self.before)
        graph.initializer.extend(self.new_inits)
        drop_unused(self.g, self.touched, self.bypassed)
        final_opset = set_opsets(self.model, opset, ms=ms)
        self.notes += shared_notes(self.public)
        nbytes = save_onnx(self.model, Path(dst))
        if check:
            check_onnx(Path(dst), self.notes)
        return rewrite_report(fmt, self.replaced, final_opset, bits, nbytes, self.notes, **extra,
                              matches=matches_json(self.public))
