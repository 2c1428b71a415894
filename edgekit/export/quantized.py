"""Rewrite a float ONNX export so its Linear MatMuls consume quantized weights.

Input: an optimum export (``model.onnx`` + ``model.onnx_data``) of a model whose Linear
weights are the *dequantized* weights ``W_hat``, plus the quantized form of each Linear
(:class:`edgekit.weights.grid.QuantizedWeight`, or FP8 weights + scales). In that graph a
Linear is ``MatMul(X, B)`` where ``B`` is an initializer holding ``W_hat^T`` ([in, out]) or
``Transpose(W_hat)`` of an [out, in] initializer (how a tied ``lm_head`` appears: the
embedding matrix, also read by the embedding ``Gather``, goes through a ``Transpose``).

Weights are found by **value**, not by name (torch/optimum rename initializers to
``onnx::MatMul_123`` and de-duplicate identical ones): a SHA-256 of the initializer's bytes
against the bytes of ``W_hat^T`` (direct) and ``W_hat`` (through a Transpose).

Three rewrites, each written as ``dst`` + one ``model.onnx_data`` next to it:

- :func:`to_matmulnbits` — ONNX Runtime: ``com.microsoft.MatMulNBits`` (4- or 8-bit codes,
  block = group).
- :func:`to_blockwise_dq` — TensorRT weight-only: ``DequantizeLinear(axis=0, block_size)``
  on an [in, out] INT4/UINT4/INT8/UINT8 code initializer feeding the MatMul (opset >= 21);
  the scales take the graph's float type (float16/bfloat16 in a half-precision export:
  opset 21's DequantizeLinear outputs its scale's type, so the MatMul stays half).
- :func:`to_fp8_qdq` — TensorRT FP8: FLOAT8E4M3FN weight + per-output-channel
  ``DequantizeLinear``, optionally a per-tensor FP8 ``QuantizeLinear``/``DequantizeLinear``
  pair on the activation.

Heavy imports (onnx, numpy, torch) happen inside the functions.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
from pathlib import Path
from typing import Any, NamedTuple

from edgekit.errors import StageError
from edgekit.onnx_index import GraphIndex

DATA_FILE = "model.onnx_data"
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


# --------------------------------------------------------------------------- matching


class _Graph(GraphIndex):
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


def _np_dtype(data_type: int) -> Any:
    import ml_dtypes
    import numpy as np
    from onnx import TensorProto

    return {
        TensorProto.FLOAT: np.dtype(np.float32),
        TensorProto.FLOAT16: np.dtype(np.float16),
        TensorProto.BFLOAT16: np.dtype(ml_dtypes.bfloat16),
        TensorProto.DOUBLE: np.dtype(np.float64),
    }.get(data_type)


def _to_numpy(x: Any) -> Any:
    """A torch tensor or array-like as a numpy array (on CPU)."""
    import numpy as np

    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _match(g: _Graph, arrays: dict[str, Any], where: str) -> dict[str, list[tuple[str, bool, list[Any]]]]:
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
        if _np_dtype(t.data_type) is None:
            continue
        present.add((t.data_type, tuple(t.dims), transposed))
        key = (t.data_type, tuple(t.dims), transposed, _digest(t))
        index.setdefault(key, []).append((init_name, transposed))

    def lookup(w: Any) -> list[tuple[str, bool]]:
        hits: list[tuple[str, bool]] = []
        for data_type in sorted({p[0] for p in present}):
            wd = w.astype(_np_dtype(data_type), copy=False)
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


_PerInit = dict[tuple[str, bool], tuple[str, list[Any]]]  # (initializer, transposed) -> (module, MatMul nodes)


def _plan(g: _Graph, arrays: dict[str, Any], where: str) -> tuple[dict[str, list[LinearMatch]], _PerInit]:
    """The public match table and, per (initializer, transposed), the module that encodes it."""
    found = _match(g, arrays, where)
    public: dict[str, list[LinearMatch]] = {}
    per_init: _PerInit = {}
    for module in sorted(found):
        public[module] = [LinearMatch(tuple(n.name for n in nodes), name, tr) for name, tr, nodes in found[module]]
        for name, tr, nodes in found[module]:
            per_init.setdefault((name, tr), (module, nodes))
    return public, per_init


def _qw_dequantized(qw: Any) -> list[Any]:
    """W_hat getters for a QuantizedWeight: first a fast path for contiguous groups (the same
    float32 subtract-then-multiply per element as ``dequantize()``, on a [out, groups, size]
    view instead of a gather over g_idx: bit-identical, about 2x faster), then
    ``qw.dequantize()`` itself, the contract, in case the two ever disagree."""

    def fast() -> Any:
        import torch

        out, n_in, groups = qw.out_features, qw.in_features, qw.n_groups
        q = qw.qweight.detach().float().reshape(out, groups, n_in // groups)
        w = (q - qw.zeros.detach().float()[:, :, None]) * qw.scales.detach().float()[:, :, None]
        return _to_numpy(w.reshape(out, n_in).to(torch.float32))

    exact = [lambda: _to_numpy(qw.dequantize())]
    return ([fast] if qw.contiguous_groups else []) + exact


def match_quantized_linears(model: Any, weights: dict[str, Any]) -> dict[str, list[LinearMatch]]:
    """Find every QuantizedWeight's MatMul(s) in ``model`` (an onnx.ModelProto with its
    weights loaded) by exact value.

    Returns ``module -> [LinearMatch(nodes, initializer, transposed)]``: normally one entry;
    an initializer read by several MatMuls (tied/shared weights) lists all of them in
    ``nodes``, and equal values stored in several initializers give several entries.
    Raises :class:`StageError` naming the first module whose values are nowhere in the graph.
    """
    g = _Graph(model)
    public, _ = _plan(g, {name: _qw_dequantized(qw) for name, qw in weights.items()}, "ONNX model")
    return public


# --------------------------------------------------------------------------- helpers


def _load(src: Path) -> Any:
    import onnx

    if not Path(src).is_file():
        raise StageError(f"ONNX model not found: {src}", how="point to the model.onnx written by the export_onnx stage")
    return onnx.load(str(src), load_external_data=True)


def _unique(g: _Graph, base: str, taken: set[str]) -> str:
    name, i = base, 1
    while name in taken or name in g.inits or name in g.producer:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def _tensor(name: str, data_type: int, dims: list[int], raw: bytes) -> Any:
    from onnx import TensorProto

    t = TensorProto()
    t.name = name
    t.data_type = data_type
    t.dims.extend(int(d) for d in dims)
    t.raw_data = raw
    return t


def _pack_nibbles(values: Any) -> bytes:
    """4-bit values (flattened row-major), two per byte, first in the low nibble (ONNX INT4/
    UINT4 and MatMulNBits both use this order); an odd count pads the last high nibble."""
    import numpy as np

    v = (np.asarray(values).reshape(-1).astype(np.int16) & 0xF).astype(np.uint8)
    if v.size % 2:
        v = np.concatenate([v, np.zeros(1, np.uint8)])
    return (v[0::2] | (v[1::2] << 4)).astype(np.uint8).tobytes()


def _float_type(g: _Graph, init_name: str) -> tuple[int, Any]:
    t = g.inits[init_name]
    return t.data_type, _np_dtype(t.data_type)


def _finish(g: _Graph, touched_inits: set[str], bypassed_transposes: set[str]) -> None:
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


def _check_opset_change(model: Any, opset: int, where: str) -> None:
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


def _set_opsets(model: Any, default: int | None, *, ms: bool = False) -> int:
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


def _save(model: Any, dst: Path) -> int:
    """model -> dst + dst.parent/model.onnx_data (all initializers over 1 KiB); returns bytes."""
    import onnx

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = dst.parent / f".tmp-quantized-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        for t in model.graph.initializer:  # saved fresh: no stale references to the source file
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
        onnx.save_model(
            model,
            str(staging / dst.name),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=DATA_FILE,
            size_threshold=1024,
            convert_attribute=False,
        )
        os.replace(staging / dst.name, dst)
        if (staging / DATA_FILE).exists():
            os.replace(staging / DATA_FILE, dst.parent / DATA_FILE)
        elif (dst.parent / DATA_FILE).exists():
            (dst.parent / DATA_FILE).unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    data = dst.parent / DATA_FILE
    return dst.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _check(dst: Path, notes: list[str]) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(dst), full_check=True)
    except Exception as exc:  # onnx raises ValidationError / InferenceError
        raise StageError(
            f"the rewritten ONNX model fails onnx.checker: {str(exc).splitlines()[0]}",
            where=str(dst),
            how="report this as an edgekit bug with the model name; the float export itself is unchanged",
        ) from exc
    notes.append("onnx.checker.check_model(full_check=True) passed")


def _report(fmt: str, replaced: int, opset: int, bits: Any, nbytes: int, notes: list[str], **extra: Any) -> dict[str, Any]:
    out = {"replaced": replaced, "format": fmt, "opset": opset, "bits": bits, "bytes": nbytes, "notes": notes}
    out.update(extra)
    return out


def _bits_field(bits: set[int]) -> Any:
    return next(iter(bits)) if len(bits) == 1 else sorted(bits)


def _require_contiguous(module: str, qw: Any, fmt: str) -> None:
    if not qw.contiguous_groups:
        raise StageError(
            f"quantized weight '{module}' uses act-order groups (g_idx is not arange(in) // group_size), "
            f"which {fmt} cannot express",
            how="quantize without act-order (GPTQ desc_act/act_order: false), or with static groups so that g_idx "
            "is contiguous",
        )


def _zeros_equal(qw: Any, value: int) -> bool:
    import numpy as np

    return bool(np.all(_to_numpy(qw.zeros) == value))


# --------------------------------------------------------------------------- DQ nodes


def _blockwise_dq(
    g: _Graph, init: str, transposed: bool, qw: Any, taken: set[str], new_inits: list[Any]
) -> tuple[Any, str, str]:
    """A DequantizeLinear(axis=0, block_size) node giving W_hat^T [in, out] from codes.

    Returns (node, output name, form) where form is e.g. 'INT4 symmetric'."""
    import numpy as np
    from onnx import TensorProto, helper

    data_type, fdt = _float_type(g, init)
    container = 4 if qw.bits <= 4 else 8
    if qw.bits > 8:
        raise StageError(
            f"{qw.bits}-bit weights cannot be stored in ONNX INT4/INT8 DequantizeLinear", how="quantize to 8 bits or fewer"
        )
    mid = 1 << (qw.bits - 1)
    # zero == the grid's centre everywhere: signed codes q - mid (in [-mid, mid - 1], which fits
    # INT4/INT8 for any bits <= the container) and no zero point
    signed = _zeros_equal(qw, mid)
    q = _to_numpy(qw.qweight).astype(np.int32).T  # [in, out]
    n_in, n_out = q.shape
    base = f"{init}_{'T_' if transposed else ''}Q{qw.bits}"
    codes_name = _unique(g, base, taken)
    if container == 4:
        qtype = TensorProto.INT4 if signed else TensorProto.UINT4
        raw = _pack_nibbles(q - mid if signed else q)
    else:
        qtype = TensorProto.INT8 if signed else TensorProto.UINT8
        raw = ((q - mid).astype(np.int8) if signed else q.astype(np.uint8)).tobytes()
    del q
    new_inits.append(_tensor(codes_name, qtype, [n_in, n_out], raw))
    scales = np.ascontiguousarray(_to_numpy(qw.scales).astype(np.float32).T.astype(fdt))  # [n_blocks, out]
    scale_name = _unique(g, f"{base}_scale", taken)
    new_inits.append(_tensor(scale_name, data_type, list(scales.shape), scales.tobytes()))
    inputs = [codes_name, scale_name]
    if not signed:
        z = np.ascontiguousarray(_to_numpy(qw.zeros).astype(np.int32).T)
        zp_name = _unique(g, f"{base}_zero_point", taken)
        zraw = _pack_nibbles(z) if container == 4 else z.astype(np.uint8).tobytes()
        new_inits.append(_tensor(zp_name, qtype, list(z.shape), zraw))
        inputs.append(zp_name)
    out = _unique(g, f"{base}_dq", taken)
    name = _unique(g, f"{base}_DequantizeLinear", taken)
    node = helper.make_node("DequantizeLinear", inputs, [out], name=name, axis=0, block_size=int(qw.group_size))
    form = f"{TensorProto.DataType.Name(qtype)} {'symmetric' if signed else 'asymmetric (zero point)'}"
    return node, out, form


def _insert_before(graph: Any, first_consumer: dict[str, list[Any]]) -> None:
    """Re-emit graph.node with each list of new nodes placed before the named node."""
    nodes = list(graph.node)
    del graph.node[:]
    for node in nodes:
        for extra in first_consumer.get(node.name, []):
            graph.node.append(extra)
        graph.node.append(node)


def _ensure_node_names(g: _Graph) -> None:
    seen: set[str] = set()
    for i, node in enumerate(g.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.name or node.op_type}_edgekit_{i}"
        seen.add(node.name)


# --------------------------------------------------------------------------- MatMulNBits


@functools.lru_cache(maxsize=None)
def ort_supports_matmulnbits(bits: int) -> bool:
    """Does this onnxruntime's CPU provider run MatMulNBits with ``bits`` correctly?
    (Runs a 2x32 @ 32x8 product with zero points against numpy.)"""
    try:
        import numpy as np
        import onnxruntime as ort
        from onnx import TensorProto, helper

        k, n, block = 32, 8, 32
        rng = np.random.default_rng(0)
        q = rng.integers(0, 1 << bits, (n, k)).astype(np.uint8)
        z = rng.integers(0, 1 << bits, (n, 1)).astype(np.uint8)
        s = rng.random((n, 1)).astype(np.float32)
        packed = _pack_nibbles(q) if bits == 4 else q.tobytes()
        zraw = z.tobytes()  # one block per row: one byte per row (4 bits: the low nibble)
        a = rng.standard_normal((2, k)).astype(np.float32)
        inits = [
            _tensor("B", TensorProto.UINT8, [n, 1, block * bits // 8], packed),
            _tensor("S", TensorProto.FLOAT, [n], s.tobytes()),
            _tensor("Z", TensorProto.UINT8, [n], zraw),
        ]
        node = helper.make_node(
            "MatMulNBits", ["A", "B", "S", "Z"], ["Y"], domain=MS_DOMAIN, K=k, N=n, bits=bits, block_size=block
        )
        graph = helper.make_graph(
            [node], "probe", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [2, k])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, n])], inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS_DOMAIN, 1)])
        model.ir_version = 10
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        y = session.run(None, {"A": a})[0]
        ref = a @ ((q.astype(np.float32) - z) * s).T
        return bool(np.allclose(y, ref, atol=1e-3, rtol=1e-4))
    except Exception:
        return False


class MatMulNBitsWeight(NamedTuple):
    """One weight in ``com.microsoft.MatMulNBits`` form (raw bytes, ready for initializers)."""

    b: tuple[list[int], bytes]  # packed codes, uint8 [N, k_blocks, blob_size]
    scales: tuple[list[int], bytes]  # float [N * k_blocks], in the graph's float type
    zero_points: tuple[list[int], bytes] | None  # packed uint8, or None for the default zero point
    attrs: dict[str, int]  # K, N, bits, block_size
    form: str  # e.g. '4-bit, block 64, default zero point 8'


def matmulnbits_weight(qw: Any, float_dtype: Any = None) -> MatMulNBitsWeight:
    """Pack a :class:`~edgekit.weights.grid.QuantizedWeight` (contiguous groups) for MatMulNBits.

    Codes of up to 4 bits use the 4-bit container and 5..8 bits the 8-bit one; a group size
    that is not a power of two becomes several power-of-two blocks with repeated scale and
    zero point (exact). The zero points are omitted when every one equals the container's
    default (``2**(bits-1)``). ``float_dtype`` (numpy) is the type of the scales (float32)."""
    import numpy as np

    fdt = np.dtype(float_dtype or np.float32)
    container = 4 if qw.bits <= 4 else 8
    if qw.bits > 8:
        raise StageError(f"MatMulNBits has no {qw.bits}-bit form", how="quantize to 4 or 8 bits")
    # block_size must be a power of two >= 16: a group of 96 is exact as 3 blocks of 32 with
    # repeated scale and zero.
    block = qw.group_size & -qw.group_size  # largest power of two dividing the group
    if block < 16:
        raise StageError(
            f"group_size {qw.group_size} has no power-of-two block >= 16 dividing it, which MatMulNBits needs",
            how="quantize with group_size 32, 64 or 128 (or a multiple of 16 with a power-of-two factor >= 16)",
        )
    repeat = qw.group_size // block
    q = _to_numpy(qw.qweight).astype(np.uint8)  # [N, K]
    n, k = q.shape
    n_blocks = k // block
    blob = block * container // 8
    raw = _pack_nibbles(q) if container == 4 else q.tobytes()  # K % block == 0: rows pack independently
    del q
    scales = np.repeat(_to_numpy(qw.scales).astype(np.float32), repeat, axis=1).astype(fdt)  # [N, n_blocks]
    default_zero = 1 << (container - 1)
    form = f"{container}-bit, block {block}"
    zero_points = None
    if not _zeros_equal(qw, default_zero):
        z = np.repeat(_to_numpy(qw.zeros).astype(np.uint8), repeat, axis=1)  # [N, n_blocks]
        if container == 4:  # per row, two blocks per byte (low nibble first), rows padded to a byte
            if n_blocks % 2:
                z = np.concatenate([z, np.zeros((n, 1), np.uint8)], axis=1)
            zraw = (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8).tobytes()
            zlen = n * ((n_blocks + 1) // 2)
        else:
            zraw, zlen = z.tobytes(), n * n_blocks
        zero_points = ([zlen], zraw)
        form += ", zero points"
    else:
        form += f", default zero point {default_zero}"
    attrs = {"K": k, "N": n, "bits": container, "block_size": block}
    return MatMulNBitsWeight(([n, n_blocks, blob], raw), ([n * n_blocks], np.ascontiguousarray(scales).tobytes()),
                             zero_points, attrs, form)


def _matmulnbits_inputs(
    g: _Graph, init: str, qw: Any, taken: set[str], new_inits: list[Any]
) -> tuple[list[str], dict[str, int], str]:
    """B / scales / zero_points initializers and attributes for one weight."""
    from onnx import TensorProto

    data_type, fdt = _float_type(g, init)
    packed = matmulnbits_weight(qw, fdt)
    base = f"{init}_Q{qw.bits}"
    b_name = _unique(g, base, taken)
    new_inits.append(_tensor(b_name, TensorProto.UINT8, *packed.b))
    s_name = _unique(g, f"{base}_scales", taken)
    new_inits.append(_tensor(s_name, data_type, *packed.scales))
    inputs = ["", b_name, s_name]
    if packed.zero_points is not None:
        z_name = _unique(g, f"{base}_zero_points", taken)
        new_inits.append(_tensor(z_name, TensorProto.UINT8, *packed.zero_points))
        inputs.append(z_name)
    return inputs, dict(packed.attrs), packed.form


def to_matmulnbits(
    src: Path, dst: Path, weights: dict[str, Any], *, accuracy_level: int | None = None, check: bool = True
) -> dict[str, Any]:
    """ONNX Runtime form: each matched MatMul -> com.microsoft.MatMulNBits.

    ``accuracy_level`` (MatMulNBits attribute; None = omitted = 0): 0/1 compute in float32,
    4 quantizes the activations to int8 on CPU (faster, less exact). Codes of up to 4 bits
    use the 4-bit kernel and 5..8 bits the 8-bit one (zero points make any code range exact).
    If this onnxruntime cannot run 8-bit MatMulNBits on CPU, those weights fall back to the
    DequantizeLinear form (opset 21), and the report says so.
    """
    from onnx import helper

    src, dst = Path(src), Path(dst)
    model = _load(src)
    g = _Graph(model)
    _ensure_node_names(g)
    for module, qw in weights.items():
        _require_contiguous(module, qw, "MatMulNBits")
    public, per_init = _plan(g, {name: _qw_dequantized(qw) for name, qw in weights.items()}, str(src))
    notes: list[str] = []
    taken: set[str] = set()
    new_inits: list[Any] = []
    replace: dict[str, list[Any]] = {}  # MatMul name -> replacement nodes
    before: dict[str, list[Any]] = {}  # node name -> nodes to insert before it (DQ fallback)
    touched: set[str] = set()
    bypassed: set[str] = set()
    forms: dict[str, int] = {}
    bits_used: set[int] = set()
    fallback = False
    replaced = 0
    for (init, transposed), (module, nodes) in per_init.items():
        qw = weights[module]
        bits_used.add(qw.bits)
        touched.add(init)
        if transposed:
            bypassed.add(g.producer[nodes[0].input[1]].name)
        container = 4 if qw.bits <= 4 else 8
        if not ort_supports_matmulnbits(container):
            dq, out, form = _blockwise_dq(g, init, transposed, qw, taken, new_inits)
            before.setdefault(nodes[0].name, []).append(dq)
            for node in nodes:
                node.input[1] = out
            fallback = True
            forms[f"DequantizeLinear {form} (fallback)"] = forms.get(f"DequantizeLinear {form} (fallback)", 0) + len(nodes)
            replaced += len(nodes)
            continue
        inputs, attrs, form = _matmulnbits_inputs(g, init, qw, taken, new_inits)
        if accuracy_level is not None:
            attrs["accuracy_level"] = int(accuracy_level)
        for node in nodes:
            name = _unique(g, f"{node.name}_Q{qw.bits}", taken)
            new = helper.make_node(
                "MatMulNBits", [node.input[0]] + inputs[1:], list(node.output), name=name, domain=MS_DOMAIN, **attrs
            )
            replace[node.name] = [new]
            replaced += 1
        forms[f"MatMulNBits {form}"] = forms.get(f"MatMulNBits {form}", 0) + len(nodes)
    nodes = list(model.graph.node)
    del model.graph.node[:]
    for node in nodes:
        model.graph.node.extend(before.get(node.name, []))
        model.graph.node.extend(replace.get(node.name, [node]))
    model.graph.initializer.extend(new_inits)
    _finish(g, touched, bypassed)
    if fallback:
        _check_opset_change(model, 21, str(src))
        notes.append(
            "this onnxruntime cannot run 8-bit MatMulNBits on CPU: 8-bit weights use DequantizeLinear (opset 21) instead"
        )
    opset = _set_opsets(model, 21 if fallback else None, ms=bool(replace))
    notes += [f"{count} MatMul -> {form}" for form, count in sorted(forms.items())]
    notes += _shared_notes(public)
    nbytes = _save(model, dst)
    if check:
        _check(dst, notes)
    return _report("matmulnbits", replaced, opset, _bits_field(bits_used), nbytes, notes, matches=_matches_json(public))


# --------------------------------------------------------------------------- blockwise DQ


def to_blockwise_dq(src: Path, dst: Path, weights: dict[str, Any], *, opset: int = 21, check: bool = True) -> dict[str, Any]:
    """TensorRT weight-only form: codes [in, out] -> DequantizeLinear(axis=0, block_size) -> MatMul.

    Weights whose zero point is the grid's centre (2**(bits-1), symmetric) become signed
    INT4/INT8 codes ``q - 2**(bits-1)`` with no zero point input, the only form TensorRT
    accepts; other weights become UINT4/UINT8 codes with a zero point tensor (valid ONNX,
    run by ONNX Runtime, rejected by TensorRT). Codes of 1-3 bits use the 4-bit types.
    A weight that reached the MatMul through a Transpose is stored pre-transposed; the
    Transpose is dropped when nothing else reads it.
    """
    from onnx import TensorProto

    src, dst = Path(src), Path(dst)
    if opset < 21:
        raise StageError(
            f"DequantizeLinear with block_size and INT4/UINT4 needs opset 21, got opset {opset}", how="use opset 21 or newer"
        )
    model = _load(src)
    g = _Graph(model)
    _ensure_node_names(g)
    _check_opset_change(model, opset, str(src))
    for module, qw in weights.items():
        _require_contiguous(module, qw, "DequantizeLinear with block_size")
    public, per_init = _plan(g, {name: _qw_dequantized(qw) for name, qw in weights.items()}, str(src))
    notes: list[str] = []
    taken: set[str] = set()
    new_inits: list[Any] = []
    before: dict[str, list[Any]] = {}
    touched: set[str] = set()
    bypassed: set[str] = set()
    forms: dict[str, int] = {}
    bits_used: set[int] = set()
    replaced = 0
    for (init, transposed), (module, nodes) in per_init.items():
        qw = weights[module]
        bits_used.add(qw.bits)
        touched.add(init)
        if transposed:
            bypassed.add(g.producer[nodes[0].input[1]].name)
        dq, out, form = _blockwise_dq(g, init, transposed, qw, taken, new_inits)
        before.setdefault(nodes[0].name, []).append(dq)
        for node in nodes:
            node.input[1] = out
        replaced += len(nodes)
        forms[form] = forms.get(form, 0) + len(nodes)
    _insert_before(model.graph, before)
    model.graph.initializer.extend(new_inits)
    _finish(g, touched, bypassed)
    opset = _set_opsets(model, opset)
    asymmetric = sorted({"INT4" if "UINT4" in form else "INT8" for form in forms if "asymmetric" in form})
    tensorrt_ok = not asymmetric
    notes += [f"{count} MatMul <- DequantizeLinear {form}, block_size = group_size" for form, count in sorted(forms.items())]
    scale_types = sorted({TensorProto.DataType.Name(t.data_type) for t in new_inits if t.name.endswith("_scale")})
    notes.append(f"scales: {', '.join(scale_types)} (the graph's float type: DequantizeLinear outputs its scale's type)")
    for kind in asymmetric:
        notes.append(
            f"TensorRT will reject this model: asymmetric {kind} needs zero points, which TensorRT's DequantizeLinear "
            "does not accept (quantize symmetric for TensorRT; ONNX Runtime runs it as is)"
        )
    notes.append(
        "ONNX Runtime's CPU provider fuses DequantizeLinear+MatMul into MatMulNBits with accuracy_level 4 "
        "(int8 activations) by default; set session config 'session.qdq_matmulnbits_accuracy_level' = '0' "
        "for float32-exact results"
    )
    notes += _shared_notes(public)
    nbytes = _save(model, dst)
    if check:
        _check(dst, notes)
    return _report(
        "qdq-blockwise", replaced, opset, _bits_field(bits_used), nbytes, notes,
        tensorrt_compatible=tensorrt_ok, scale_dtypes=scale_types, matches=_matches_json(public),
    )


# --------------------------------------------------------------------------- FP8


def _fp8_codes(module: str, entry: dict[str, Any]) -> tuple[Any, Any]:
    """(w8 as float8_e4m3fn [out, in], per-channel scale float32 [out] or [1])."""
    import ml_dtypes
    import numpy as np

    w = _to_numpy(entry["weight"]).astype(np.float32)
    scale = _to_numpy(entry["weight_scale"]).astype(np.float32).reshape(-1)
    if w.ndim != 2 or scale.size not in (1, w.shape[0]) or not np.all(scale > 0):
        raise StageError(
            f"FP8 entry '{module}' needs weight [out, in] and weight_scale [out] (or a scalar) of positive values, "
            f"got {list(w.shape)} and {list(scale.shape)}",
            how="pass weight_scale with one positive scale per output channel",
        )
    col = scale[:, None] if scale.size > 1 else scale.reshape(1, 1)
    w8 = np.clip(w / col, -448.0, 448.0).astype(ml_dtypes.float8_e4m3fn)
    back = w8.astype(np.float32) * col
    err = float(np.abs(back - w).max()) if w.size else 0.0
    if err > 1e-6 * max(float(np.abs(w).max()), 1e-30):
        raise StageError(
            f"FP8 weight '{module}' is not float8_e4m3fn values times weight_scale (max error {err:.3g})",
            how="pass weight = w8.float() * weight_scale[:, None] where w8 is the float8_e4m3fn tensor",
        )
    return w8, scale


def to_fp8_qdq(
    src: Path, dst: Path, fp8: dict[str, dict[str, Any]], *, opset: int = 21, check: bool = True
) -> dict[str, Any]:
    """TensorRT FP8 form. ``fp8[module] = {"weight": W [out, in] float32 (= w8 * scale[:, None]),
    "weight_scale": [out] float32, "input_scale": scalar float32 or None}``.

    The weight is stored as FLOAT8E4M3FN [in, out] (pre-transposed) and dequantized per
    output channel (axis=1) into the MatMul. With an ``input_scale`` the MatMul's input A goes
    through a per-tensor FP8 QuantizeLinear -> DequantizeLinear first (shared by MatMuls that
    read the same tensor with the same scale, e.g. q/k/v).
    """
    import numpy as np
    from onnx import TensorProto, helper

    src, dst = Path(src), Path(dst)
    if opset < 19:
        raise StageError(f"FLOAT8E4M3FN Q/DQ needs opset 19, got opset {opset}", how="use opset 21")
    model = _load(src)
    g = _Graph(model)
    _ensure_node_names(g)
    _check_opset_change(model, opset, str(src))
    arrays = {name: [lambda e=entry: _to_numpy(e["weight"]).astype(np.float32)] for name, entry in fp8.items()}
    public, per_init = _plan(g, arrays, str(src))
    notes: list[str] = []
    taken: set[str] = set()
    new_inits: list[Any] = []
    before: dict[str, list[Any]] = {}
    touched: set[str] = set()
    bypassed: set[str] = set()
    act_qdq: dict[tuple[str, bytes], str] = {}
    act_nodes: dict[tuple[str, bytes], list[Any]] = {}
    act_users: dict[tuple[str, bytes], list[str]] = {}
    position = {node.name: i for i, node in enumerate(model.graph.node)}
    replaced = act = 0
    for (init, transposed), (module, nodes) in per_init.items():
        entry = fp8[module]
        touched.add(init)
        if transposed:
            bypassed.add(g.producer[nodes[0].input[1]].name)
        data_type, fdt = _float_type(g, init)
        w8, scale = _fp8_codes(module, entry)
        base = f"{init}_{'T_' if transposed else ''}F8"
        w_name = _unique(g, base, taken)
        w8t = np.ascontiguousarray(w8.T)  # [in, out]
        new_inits.append(_tensor(w_name, TensorProto.FLOAT8E4M3FN, list(w8t.shape), w8t.view(np.uint8).tobytes()))
        del w8, w8t
        s_name = _unique(g, f"{base}_scale", taken)
        per_tensor = scale.size == 1
        sdims = [] if per_tensor else [scale.size]
        new_inits.append(_tensor(s_name, data_type, sdims, scale.astype(fdt).tobytes()))
        out = _unique(g, f"{base}_dq", taken)
        attrs = {} if per_tensor else {"axis": 1}
        name = _unique(g, f"{base}_DequantizeLinear", taken)
        dq = helper.make_node("DequantizeLinear", [w_name, s_name], [out], name=name, **attrs)
        before.setdefault(nodes[0].name, []).append(dq)
        for node in nodes:
            node.input[1] = out
        replaced += len(nodes)
        input_scale = entry.get("input_scale")
        if input_scale is None:
            continue
        s_in = np.asarray(_to_numpy(input_scale), dtype=np.float32).reshape(-1)
        if s_in.size != 1 or not s_in[0] > 0:
            raise StageError(
                f"FP8 entry '{module}' has input_scale {s_in.tolist()}", how="pass one positive float (per-tensor) or None"
            )
        for node in nodes:
            a = node.input[0]
            key = (a, s_in.astype(fdt).tobytes())
            if key not in act_qdq:
                abase = f"{a.strip('/').replace('/', '_')}_F8"
                sc = _unique(g, f"{abase}_scale", taken)
                zp = _unique(g, f"{abase}_zero_point", taken)
                new_inits.append(_tensor(sc, data_type, [], s_in.astype(fdt).tobytes()))
                new_inits.append(_tensor(zp, TensorProto.FLOAT8E4M3FN, [], b"\x00"))
                qout, dout = _unique(g, f"{abase}_q", taken), _unique(g, f"{abase}_dq", taken)
                q_name, d_name = _unique(g, f"{abase}_QuantizeLinear", taken), _unique(g, f"{abase}_DequantizeLinear", taken)
                q_node = helper.make_node("QuantizeLinear", [a, sc, zp], [qout], name=q_name, saturate=1)
                d_node = helper.make_node("DequantizeLinear", [qout, sc, zp], [dout], name=d_name)
                act_nodes[key] = [q_node, d_node]
                act_qdq[key] = dout
                act += 1
            act_users.setdefault(key, []).append(node.name)
            node.input[0] = act_qdq[key]
    for key, pair in act_nodes.items():  # before the first reader in graph order
        before.setdefault(min(act_users[key], key=position.__getitem__), []).extend(pair)
    _insert_before(model.graph, before)
    model.graph.initializer.extend(new_inits)
    _finish(g, touched, bypassed)
    opset = _set_opsets(model, opset)
    notes.append(
        f"{replaced} MatMul <- DequantizeLinear FLOAT8E4M3FN weight, per-output-channel scale (axis=1 on [in, out])"
    )
    if act:
        notes.append(f"{act} per-tensor FLOAT8E4M3FN QuantizeLinear/DequantizeLinear pairs on MatMul inputs (saturate=1)")
    notes.append("FP8 needs compute capability >= 8.9 in TensorRT (no Jetson Orin)")
    notes += _shared_notes(public)
    nbytes = _save(model, dst)
    if check:
        _check(dst, notes)
    return _report("fp8-qdq", replaced, opset, 8, nbytes, notes, activation_qdq=act, matches=_matches_json(public))


# --------------------------------------------------------------------------- report bits


def _shared_notes(public: dict[str, list[LinearMatch]]) -> list[str]:
    notes = []
    by_init: dict[str, list[str]] = {}
    for module, matches in public.items():
        for m in matches:
            by_init.setdefault(m.initializer, []).append(module)
            if len(m.nodes) > 1:
                notes.append(f"'{module}': initializer {m.initializer} is read by {len(m.nodes)} MatMuls; all replaced")
            if m.transposed:
                notes.append(f"'{module}': found as Transpose({m.initializer}) (a tied weight); stored pre-transposed")
    for init, modules in sorted(by_init.items()):
        if len(modules) > 1:
            names = sorted(modules)
            notes.append(f"modules {', '.join(names)} have identical values (one initializer {init}); encoded from '{names[0]}'")
    return notes


def _matches_json(public: dict[str, list[LinearMatch]]) -> dict[str, list[dict[str, Any]]]:
    return {module: [m._asdict() | {"nodes": list(m.nodes)} for m in matches] for module, matches in public.items()}
