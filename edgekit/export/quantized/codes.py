"""Quantized codes as numpy: tensor conversion, the float types a graph may hold, 4-bit packing,
and the properties of a :class:`~edgekit.weights.grid.QuantizedWeight` the ONNX forms depend on."""

from __future__ import annotations

from typing import Any

from edgekit.errors import StageError


def np_dtype(data_type: int) -> Any:
    import ml_dtypes
    import numpy as np
    from onnx import TensorProto

    return {
        TensorProto.FLOAT: np.dtype(np.float32),
        TensorProto.FLOAT16: np.dtype(np.float16),
        TensorProto.BFLOAT16: np.dtype(ml_dtypes.bfloat16),
        TensorProto.DOUBLE: np.dtype(np.float64),
    }.get(data_type)


def to_numpy(x: Any) -> Any:
    """A torch tensor or array-like as a numpy array (on CPU)."""
    import numpy as np

    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def pack_nibbles(values: Any) -> bytes:
    """4-bit values (flattened row-major), two per byte, first in the low nibble (ONNX INT4/
    UINT4 and MatMulNBits both use this order); an odd count pads the last high nibble."""
    import numpy as np

    v = (np.asarray(values).reshape(-1).astype(np.int16) & 0xF).astype(np.uint8)
    if v.size % 2:
        v = np.concatenate([v, np.zeros(1, np.uint8)])
    return (v[0::2] | (v[1::2] << 4)).astype(np.uint8).tobytes()


def require_contiguous(module: str, qw: Any, fmt: str) -> None:
    if not qw.contiguous_groups:
        raise StageError(
            f"quantized weight '{module}' uses act-order groups (g_idx is not arange(in) // group_size), "
            f"which {fmt} cannot express",
            how="quantize without act-order (GPTQ desc_act/act_order: false), or with static groups so that g_idx "
            "is contiguous",
        )


def zeros_equal(qw: Any, value: int) -> bool:
    import numpy as np

    return bool(np.all(to_numpy(qw.zeros) == value))
