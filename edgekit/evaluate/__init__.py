"""Held-out perplexity of a checkpoint (PyTorch) or an exported model (ONNX Runtime)."""
