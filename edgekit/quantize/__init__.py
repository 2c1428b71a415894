"""Weight quantization: GPTQ (our own), RTN, NNCF AWQ, FP8 — one module per method.

Every integer method produces :class:`edgekit.weights.grid.QuantizedWeight` per linear
layer; packing (GPTQ checkpoint), the PyTorch loader and the ONNX exporters all consume
that one structure.
"""
