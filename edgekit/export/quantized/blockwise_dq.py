"""The TensorRT weight-only form: integer codes [in, out] -> ``DequantizeLinear(axis=0, block_size)``
-> MatMul (opset 21; signed INT4/INT8 for symmetric weights, UINT4/UINT8 with a zero point otherwise)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgekit.errors import StageError
from edgekit.export.quantized.codes import pack_nibbles, require_contiguous, to_numpy, zeros_equal
from edgekit.export.quantized.match import WeightGraph, dequantized_getters
from edgekit.export.quantized.onnx_edit import float_type, raw_tensor, unique_name
from edgekit.export.quantized.report import bits_field
from edgekit.export.quantized.rewrite import Rewrite


def blockwise_dq_node(
    g: WeightGraph, init: str, transposed: bool, qw: Any, taken: set[str], new_inits: list[Any]
) -> tuple[Any, str, str]:
    """A DequantizeLinear(axis=0, block_size) node giving W_hat^T [in, out] from codes.

    Returns (node, output name, form) where form is e.g. 'INT4 symmetric'."""
    import numpy as np
    from onnx import TensorProto, helper

    data_type, fdt = float_type(g, init)
    container = 4 if qw.bits <= 4 else 8
    if qw.bits > 8:
        raise StageError(
            f"{qw.bits}-bit weights cannot be stored in ONNX INT4/INT8 DequantizeLinear", how="quantize to 8 bits or fewer"
        )
    mid = 1 << (qw.bits - 1)
    # zero == the grid's centre everywhere: signed codes q - mid (in [-mid, mid - 1], which fits
    # INT4/INT8 for any bits <= the container) and no zero point
    signed = zeros_equal(qw, mid)
    q = to_numpy(qw.qweight).astype(np.int32).T  # [in, out]
    n_in, n_out = q.shape
    base = f"{init}_{'T_' if transposed else ''}Q{qw.bits}"
    codes_name = unique_name(g, base, taken)
    if container == 4:
        qtype = TensorProto.INT4 if signed else TensorProto.UINT4
        raw = pack_nibbles(q - mid if signed else q)
    else:
        qtype = TensorProto.INT8 if signed else TensorProto.UINT8
        raw = ((q - mid).astype(np.int8) if signed else q.astype(np.uint8)).tobytes()
    del q
    new_inits.append(raw_tensor(codes_name, qtype, [n_in, n_out], raw))
    scales = np.ascontiguousarray(to_numpy(qw.scales).astype(np.float32).T.astype(fdt))  # [n_blocks, out]
    scale_name = unique_name(g, f"{base}_scale", taken)
    new_inits.append(raw_tensor(scale_name, data_type, list(scales.shape), scales.tobytes()))
    inputs = [codes_name, scale_name]
    if not signed:
        z = np.ascontiguousarray(to_numpy(qw.zeros).astype(np.int32).T)
        zp_name = unique_name(g, f"{base}_zero_point", taken)
        zraw = pack_nibbles(z) if container == 4 else z.astype(np.uint8).tobytes()
        new_inits.append(raw_tensor(zp_name, qtype, list(z.shape), zraw))
        inputs.append(zp_name)
    out = unique_name(g, f"{base}_dq", taken)
    name = unique_name(g, f"{base}_DequantizeLinear", taken)
    node = helper.make_node("DequantizeLinear", inputs, [out], name=name, axis=0, block_size=int(qw.group_size))
    form = f"{TensorProto.DataType.Name(qtype)} {'symmetric' if signed else 'asymmetric (zero point)'}"
    return node, out, form


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
    for module, qw in weights.items():
        require_contiguous(module, qw, "DequantizeLinear with block_size")
    rw = Rewrite.open(src, {name: dequantized_getters(qw) for name, qw in weights.items()}, opset=opset)
    for (init, transposed), (module, nodes) in rw.per_init.items():
        qw = weights[module]
        rw.bits_used.add(qw.bits)
        rw.take(init, transposed, nodes)
        dq, out, form = blockwise_dq_node(rw.g, init, transposed, qw, rw.taken, rw.new_inits)
        rw.feed(nodes, dq, out, form)
    asymmetric = sorted({"INT4" if "UINT4" in form else "INT8" for form in rw.forms if "asymmetric" in form})
    notes = rw.notes
    notes += [f"{count} MatMul <- DequantizeLinear {form}, block_size = group_size" for form, count in sorted(rw.forms.items())]
    scale_types = sorted({TensorProto.DataType.Name(t.data_type) for t in rw.new_inits if t.name.endswith("_scale")})
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
    return rw.finish(dst, "qdq-blockwise", opset=opset, bits=bits_field(rw.bits_used), check=check,
                     tensorrt_compatible=not asymmetric, scale_dtypes=scale_types)
