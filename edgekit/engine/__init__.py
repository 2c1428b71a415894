"""TensorRT engines: build plans, trtexec scripts, the TensorRT Python builder, readiness checks and
ONNX Runtime GPU execution providers. Nothing here imports TensorRT until an engine is built."""
