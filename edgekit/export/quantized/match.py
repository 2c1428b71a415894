"""Find each quantized Linear's MatMul in a float ONNX graph by the exact value of its weight.

A Linear is ``MatMul(X, B)`` with ``B`` an initializer holding ``W_hat^T`` ([in, out]) or
``Transpose(W_hat)`` of an [out, in] initializer (a tied ``lm_head``). Weights are found by
**value**, not by name (torch/optimum rename initializers and de-duplicate identical ones): a
SHA-256 of the initializer's bytes against the bytes of the dequantized weight ``W_hat``.
"""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple

from edgekit.errors import StageError
from edgekit.export.quantized.codes import np_dtype, to_numpy
from edgekit.onnx_index import GraphIndex


_SOLVE_MATCH = (
    "export the ONNX model from a checkpoint whose Linear weights are exactly the dequantized weights "
    "(module.weight = QuantizedWeight.dequantize(), same dtype, no further rounding), and pass the same "
    "quantized weights that were written into that checkpoint"
)


class LinearMatch(NamedTuple):
    """Where one Linear's weight lives in the graph."""

    nodes: tuple[str, ...]  # every MatMul that consumes it (several for shared/tied weights)
    initializer: str  # the float initializer holding W_hat^T, or W_hat when transposed
    transposed: bool  # True: MatMul(X, Transpose(initializer[out, in]))


class WeightGraph(GraphIndex):
    """The graph's name indexes plus the weight MatMuls to rewrite."""

    def candidates(self) -> dict[tuple[str, bool], list[Any]]:
        """(initializer, transposed) -> MatMul nodes reading it as their B input."""
        out: dict[tuple[str, bool], list[Any]] = {}
        for node in self.graph.node:
            if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
                continue
            b = node.input[1]
            if b in self.inits and len(self.inits[b].dims) == 2:
                out.setdefault((b, False), []).append(node)
                continue
            src = self.producer.get(b)
            if src is None or src.op_type != "Transpose" or src.input[0] not in self.inits:
                continue
            init = self.inits[src.input[0]]
            perm = next((list(a.ints) for a in src.attribute if a.name == "perm"), [1, 0])
            if len(init.dims) == 2 and perm == [1, 0]:
                out.setdefault((init.name, True), []).append(node)
        return out


def _digest(tensor: Any) -> str:
    from onnx import numpy_helper

    if tensor.HasField("raw_data") and tensor.raw_data:
        return hashlib.sha256(tensor.raw_data).hexdigest()
    return hashlib.sha256(numpy_helper.to_array(tensor).tobytes()).hexdigest()


def _match(g: WeightGraph, arrays: dict[str, Any], where: str) -> dict[str, list[tuple[str, bool, list[Any]]]]:
    """module -> [(initializer, transposed, MatMul nodes)], by exact value.

    ``arrays`` maps module name -> zero-argument callables, each giving W_hat [out, in]
    (numpy, float32); they are tried in order until one matches, one at a time so only
    one dense copy is alive.
    """
    import numpy as np

    cands = g.candidates()
    index: dict[tuple[int, tuple[int, ...], bool, str], list[tuple[str, bool]]] = {}
    present: set[tuple[int, tuple[int, ...], bool]] = set()  # worth hashing a W_hat for
    for (init_name, transposed), _nodes in cands.items():
        t = g.inits[init_name]
        if np_dtype(t.data_type) is None:
            continue
        present.add((t.data_type, tuple(t.dims), transposed))
        key = (t.data_type, tuple(t.dims), transposed, _digest(t))
        index.setdefault(key, []).append((init_name, transposed))

    def lookup(w: Any) -> list[tuple[str, bool]]:
        hits: list[tuple[str, bool]] = []
        for data_type in sorted({p[0] for p in present}):
            wd = w.astype(np_dtype(data_type), copy=False)
            for transposed, view in ((False, wd.T), (True, wd)):
                if (data_type, tuple(view.shape), transposed) not in present:
                    continue
                digest = hashlib.sha256(np.ascontiguousarray(view).tobytes()).hexdigest()
                hits += index.get((data_type, tuple(view.shape), transposed, digest), [])
        return hits

    found: dict[str, list[tuple[str, bool, list[Any]]]] = {}
    missing = []
    for module, getters in arrays.items():
        hits: list[tuple[str, bool]] = []
        for get_w in getters:
            w = np.asarray(get_w(), dtype=np.float32)
            shape = w.shape
            hits = lookup(w)
            del w
            if hits:
                break
        if not hits:
            missing.append((module, shape))
        found[module] = [(name, tr, cands[(name, tr)]) for name, tr in hits]
    if missing:
        module, shape = missing[0]
        more = ""
        if len(missing) > 1:
            listed = ", ".join(m for m, _ in missing[1:4]) + (", ..." if len(missing) > 4 else "")
            more = f" and {len(missing) - 1} more ({listed})"
        raise StageError(
            f"quantized weight '{module}' [{shape[0]}x{shape[1]}]{more} matches no MatMul weight in the ONNX graph "
            f"(looked for its dequantized values, bit-exact, as a [in, out] initializer or a transposed [out, in] one)",
            where=where,
            how=_SOLVE_MATCH,
        )
    return found


PerInit = dict[tuple[str, bool], tuple[str, list[Any]]]  # (initializer, transposed) -> (module, MatMul nodes)


def plan_matches(g: WeightGraph, arrays: dict[str, Any], where: str) -> tuple[dict[str, list[LinearMatch]], PerInit]:
    """The public match table and, per (initializer, transposed), the module that encodes it."""
    found = _match(g, arrays, where)
    public: dict[str, list[LinearMatch]] = {}
    per_init: PerInit = {}
    for module in sorted(found):
        public[module] = [LinearMatch(tuple(n.name for n in nodes), name, tr) for name, tr, nodes in found[module]]
        for name, tr, nodes in found[module]:
            per_init.setdefault((name, tr), (module, nodes))
    return public, per_init


def dequantized_getters(qw: Any) -> list[Any]:
    """W_hat getters for a QuantizedWeight: first a fast path for contiguous groups (the same
    float32 subtract-then-multiply per element as ``dequantize()``, on a [out, groups, size]
    view instead of a gather over g_idx: bit-identical, about 2x faster), then
    ``qw.dequantize()`` itself, the contract, in case the two ever disagree."""

    def fast() -> Any:
        import torch

        out, n_in, groups = qw.out_features, qw.in_features, qw.n_groups
        q = qw.qweight.detach().float().reshape(out, groups, n_in // groups)
        w = (q - qw.zeros.detach().float()[:, :, None]) * qw.scales.detach().float()[:, :, None]
        return to_numpy(w.reshape(out, n_in).to(torch.float32))

    exact = [lambda: to_numpy(qw.dequantize())]
    return ([fast] if qw.contiguous_groups else []) + exact


def match_quantized_linears(model: Any, weights: dict[str, Any]) -> dict[str, list[LinearMatch]]:
    """Find every QuantizedWeight's MatMul(s) in ``model`` (an onnx.ModelProto with its
    weights loaded) by exact value.

    Returns ``module -> [LinearMatch(nodes, initializer, transposed)]``: normally one entry;
    an initializer read by several MatMuls (tied/shared weights) lists all of them in
    ``nodes``, and equal values stored in several initializers give several entries.
    Raises :class:`StageError` naming the first module whose values are nowhere in the graph.
    """
    g = WeightGraph(model)
    public, _ = plan_matches(g, {name: dequantized_getters(qw) for name, qw in weights.items()}, "ONNX model")
    return public
