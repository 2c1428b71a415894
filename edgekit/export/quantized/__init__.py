"""Rewrite a float ONNX export so its Linear MatMuls consume quantized weights.

Input: an optimum export (``model.onnx`` + ``model.onnx_data``) of a model whose Linear
weights are the *dequantized* weights ``W_hat``, plus the quantized form of each Linear
(:class:`edgekit.weights.grid.QuantizedWeight`, or FP8 weights + scales). Each weight's
MatMul is found by value (:mod:`.match`); the graph is then rewritten into one of three
forms, each written as ``dst`` + one ``model.onnx_data`` next to it (:mod:`.onnx_file`):

- :func:`~.matmulnbits.to_matmulnbits` — ONNX Runtime: ``com.microsoft.MatMulNBits`` (4- or
  8-bit codes, block = group).
- :func:`~.blockwise_dq.to_blockwise_dq` — TensorRT weight-only: ``DequantizeLinear(axis=0,
  block_size)`` on an [in, out] INT4/UINT4/INT8/UINT8 code initializer feeding the MatMul
  (opset >= 21); the scales take the graph's float type (float16/bfloat16 in a half-precision
  export: opset 21's DequantizeLinear outputs its scale's type, so the MatMul stays half).
- :func:`~.fp8.to_fp8_qdq` — TensorRT FP8: FLOAT8E4M3FN weight + per-output-channel
  ``DequantizeLinear``, optionally a per-tensor FP8 ``QuantizeLinear``/``DequantizeLinear``
  pair on the activation.

The rewrite they share (load, match, take the float weights, write, report) is
:class:`.rewrite.Rewrite`; the graph edits are in :mod:`.onnx_edit`, the code conversions in
:mod:`.codes`, the report in :mod:`.report`. Heavy imports (onnx, numpy, torch) happen inside
the functions.
"""

from edgekit.export.quantized.blockwise_dq import to_blockwise_dq
from edgekit.export.quantized.fp8 import to_fp8_qdq
from edgekit.export.quantized.match import LinearMatch, match_quantized_linears
from edgekit.export.quantized.matmulnbits import (
    MatMulNBitsWeight, matmulnbits_weight, ort_supports_matmulnbits, to_matmulnbits,
)

__all__ = [
    "LinearMatch", "MatMulNBitsWeight", "match_quantized_linears", "matmulnbits_weight", "ort_supports_matmulnbits",
    "to_blockwise_dq", "to_fp8_qdq", "to_matmulnbits",
]
