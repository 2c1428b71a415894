"""Measurements several stages take of a model: perplexity (PyTorch or an exported ONNX graph:
the evaluate stage, distill's evaluations) and the ONNX Runtime decoder session (evaluate's
perplexity and speed, export's parity check). Shared, so no stage imports another's internals."""
