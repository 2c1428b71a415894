"""Measurements several stages take of a model: perplexity (PyTorch or an exported ONNX graph:
the evaluate stage, distill's evaluations), the ONNX Runtime decoder session (evaluate's
perplexity, export's parity check) and decode speed (the benchmarks, PyTorch or ONNX Runtime).
Shared, so no stage imports another's internals."""
