"""ONNX export of decoders with a KV cache, checked against PyTorch."""
