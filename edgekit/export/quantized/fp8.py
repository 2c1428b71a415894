"""The TensorRT FP8 form: FLOAT8E4M3FN weights with a per-output-channel ``DequantizeLinear``, and
optionally a per-tensor FP8 ``QuantizeLinear``/``DequantizeLinear`` pair on the activation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgekit.errors import StageError
from edgekit.export.quantized.codes import to_numpy
from edgekit.export.quantized.onnx_edit import float_type, raw_tensor, unique_name
from edgekit.export.quantized.rewrite import Rewrite


def _fp8_codes(module: str, entry: dict[str, Any]) -> tuple[Any, Any]:
    """(w8 as float8_e4m3fn [out, in], per-channel scale float32 [out] or [1])."""
    import ml_dtypes
    import numpy as np

    w = to_numpy(entry["weight"]).astype(np.float32)
    scale = to_numpy(entry["weight_scale"]).astype(np.float32).reshape(-1)
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
    arrays = {name: [lambda e=entry: to_numpy(e["weight"]).astype(np.float32)] for name, entry in fp8.items()}
    rw = Rewrite.open(src, arrays, opset=opset)
    g, taken, new_inits = rw.g, rw.taken, rw.new_inits
    act_qdq: dict[tuple[str, bytes], str] = {}
    act_nodes: dict[tuple[str, bytes], list[Any]] = {}
    act_users: dict[tuple[str, bytes], list[str]] = {}
    position = {node.name: i for i, node in enumerate(rw.model.graph.node)}
    act = 0
    for (init, transposed), (module, nodes) in rw.per_init.items():
        entry = fp8[module]
        rw.take(init, transposed, nodes)
        data_type, fdt = float_type(g, init)
        w8, scale = _fp8_codes(module, entry)
        base = f"{init}_{'T_' if transposed else ''}F8"
        w_name = unique_name(g, base, taken)
        w8t = np.ascontiguousarray(w8.T)  # [in, out]
        new_inits.append(raw_tensor(w_name, TensorProto.FLOAT8E4M3FN, list(w8t.shape), w8t.view(np.uint8).tobytes()))
        del w8, w8t
        s_name = unique_name(g, f"{base}_scale", taken)
        per_tensor = scale.size == 1
        sdims = [] if per_tensor else [scale.size]
        new_inits.append(raw_tensor(s_name, data_type, sdims, scale.astype(fdt).tobytes()))
        out = unique_name(g, f"{base}_dq", taken)
        attrs = {} if per_tensor else {"axis": 1}
        name = unique_name(g, f"{base}_DequantizeLinear", taken)
        dq = helper.make_node("DequantizeLinear", [w_name, s_name], [out], name=name, **attrs)
        rw.feed(nodes, dq, out)
        input_scale = entry.get("input_scale")
        if input_scale is None:
            continue
        s_in = np.asarray(to_numpy(input_scale), dtype=np.float32).reshape(-1)
        if s_in.size != 1 or not s_in[0] > 0:
            raise StageError(
                f"FP8 entry '{module}' has input_scale {s_in.tolist()}", how="pass one positive float (per-tensor) or None"
            )
        for node in nodes:
            a = node.input[0]
            key = (a, s_in.astype(fdt).tobytes())
            if key not in act_qdq:
                abase = f"{a.strip('/').replace('/', '_')}_F8"
                sc = unique_name(g, f"{abase}_scale", taken)
                zp = unique_name(g, f"{abase}_zero_point", taken)
                new_inits.append(raw_tensor(sc, data_type, [], s_in.astype(fdt).tobytes()))
                new_inits.append(raw_tensor(zp, TensorProto.FLOAT8E4M3FN, [], b"\x00"))
                qout, dout = unique_name(g, f"{abase}_q", taken), unique_name(g, f"{abase}_dq", taken)
                q_name, d_name = unique_name(g, f"{abase}_QuantizeLinear", taken), unique_name(g, f"{abase}_DequantizeLinear", taken)
                q_node = helper.make_node("QuantizeLinear", [a, sc, zp], [qout], name=q_name, saturate=1)
                d_node = helper.make_node("DequantizeLinear", [qout, sc, zp], [dout], name=d_name)
                act_nodes[key] = [q_node, d_node]
                act_qdq[key] = dout
                act += 1
            act_users.setdefault(key, []).append(node.name)
            node.input[0] = act_qdq[key]
    for key, pair in act_nodes.items():  # before the first reader in graph order
        rw.before.setdefault(min(act_users[key], key=position.__getitem__), []).extend(pair)
    rw.notes.append(
        f"{rw.replaced} MatMul <- DequantizeLinear FLOAT8E4M3FN weight, per-output-channel scale (axis=1 on [in, out])"
    )
    if act:
        rw.notes.append(f"{act} per-tensor FLOAT8E4M3FN QuantizeLinear/DequantizeLinear pairs on MatMul inputs (saturate=1)")
    rw.notes.append("FP8 needs compute capability >= 8.9 in TensorRT (no Jetson Orin)")
    return rw.finish(dst, "fp8-qdq", opset=opset, bits=8, check=check, activation_qdq=act)
