"""The ONNX Runtime form: each matched MatMul becomes ``com.microsoft.MatMulNBits`` (4- or 8-bit
codes, block = group), with a DequantizeLinear fallback where this onnxruntime cannot run 8 bits."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, NamedTuple

from edgekit.errors import StageError
from edgekit.export.quantized.blockwise_dq import blockwise_dq_node
from edgekit.export.quantized.codes import pack_nibbles, require_contiguous, to_numpy, zeros_equal
from edgekit.export.quantized.match import WeightGraph, dequantized_getters
from edgekit.export.quantized.onnx_edit import MS_DOMAIN, check_opset_change, float_type, raw_tensor, unique_name
from edgekit.export.quantized.report import bits_field
from edgekit.export.quantized.rewrite import Rewrite


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
        packed = pack_nibbles(q) if bits == 4 else q.tobytes()
        zraw = z.tobytes()  # one block per row: one byte per row (4 bits: the low nibble)
        a = rng.standard_normal((2, k)).astype(np.float32)
        inits = [
            raw_tensor("B", TensorProto.UINT8, [n, 1, block * bits // 8], packed),
            raw_tensor("S", TensorProto.FLOAT, [n], s.tobytes()),
            raw_tensor("Z", TensorProto.UINT8, [n], zraw),
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
    q = to_numpy(qw.qweight).astype(np.uint8)  # [N, K]
    n, k = q.shape
    n_blocks = k // block
    blob = block * container // 8
    raw = pack_nibbles(q) if container == 4 else q.tobytes()  # K % block == 0: rows pack independently
    del q
    scales = np.repeat(to_numpy(qw.scales).astype(np.float32), repeat, axis=1).astype(fdt)  # [N, n_blocks]
    default_zero = 1 << (container - 1)
    form = f"{container}-bit, block {block}"
    zero_points = None
    if not zeros_equal(qw, default_zero):
        z = np.repeat(to_numpy(qw.zeros).astype(np.uint8), repeat, axis=1)  # [N, n_blocks]
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
    g: WeightGraph, init: str, qw: Any, taken: set[str], new_inits: list[Any]
) -> tuple[list[str], dict[str, int], str]:
    """B / scales / zero_points initializers and attributes for one weight."""
    from onnx import TensorProto

    data_type, fdt = float_type(g, init)
    packed = matmulnbits_weight(qw, fdt)
    base = f"{init}_Q{qw.bits}"
    b_name = unique_name(g, base, taken)
    new_inits.append(raw_tensor(b_name, TensorProto.UINT8, *packed.b))
    s_name = unique_name(g, f"{base}_scales", taken)
    new_inits.append(raw_tensor(s_name, data_type, *packed.scales))
    inputs = ["", b_name, s_name]
    if packed.zero_points is not None:
        z_name = unique_name(g, f"{base}_zero_points", taken)
        new_inits.append(raw_tensor(z_name, TensorProto.UINT8, *packed.zero_points))
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
    for module, qw in weights.items():
        require_contiguous(module, qw, "MatMulNBits")
    rw = Rewrite.open(src, {name: dequantized_getters(qw) for name, qw in weights.items()})
    replace: dict[str, list[Any]] = {}  # MatMul name -> replacement nodes
    fallback = False
    for (init, transposed), (module, nodes) in rw.per_init.items():
        qw = weights[module]
        rw.bits_used.add(qw.bits)
        rw.take(init, transposed, nodes)
        container = 4 if qw.bits <= 4 else 8
        if not ort_supports_matmulnbits(container):
            dq, out, form = blockwise_dq_node(rw.g, init, transposed, qw, rw.taken, rw.new_inits)
            rw.feed(nodes, dq, out, f"DequantizeLinear {form} (fallback)")
            fallback = True
            continue
        inputs, attrs, form = _matmulnbits_inputs(rw.g, init, qw, rw.taken, rw.new_inits)
        if accuracy_level is not None:
            attrs["accuracy_level"] = int(accuracy_level)
        for node in nodes:
            name = unique_name(rw.g, f"{node.name}_Q{qw.bits}", rw.taken)
            new = helper.make_node(
                "MatMulNBits", [node.input[0]] + inputs[1:], list(node.output), name=name, domain=MS_DOMAIN, **attrs
            )
            replace[node.name] = [new]
            rw.replaced += 1
        rw.count(f"MatMulNBits {form}", len(nodes))
    if fallback:
        check_opset_change(rw.model, 21, str(src))
        rw.notes.append(
            "this onnxruntime cannot run 8-bit MatMulNBits on CPU: 8-bit weights use DequantizeLinear (opset 21) instead"
        )
    rw.notes += [f"{count} MatMul -> {form}" for form, count in sorted(rw.forms.items())]
    return rw.finish(dst, "matmulnbits", opset=21 if fallback else None, bits=bits_field(rw.bits_used), check=check,
                     ms=bool(replace), replace=replace)
