#!/usr/bin/env bash
# Run the tests that need a CUDA GPU and/or TensorRT (skipped, with the reason, on CPU-only
# machines such as our dev and CI hosts). Run it on a workstation GPU or a Jetson:
#
#   pip install -e '.[test,gpu]'     # x86-64; on Jetson, JetPack provides tensorrt + onnxruntime-gpu
#   scripts/gpu_check.sh [BUNDLE]    # BUNDLE: also build that bundle's engine here
#                                    # (TARGET=name picks the profile; default: the bundle's)
#
# Exit code: pytest's (0 = every GPU/TensorRT test passed), 2 when this machine has neither.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"

echo "== environment"
"$PY" - <<'PY'
import importlib.util, sys
try:
    import torch
    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__}, CUDA available: {cuda}" + (f", {torch.cuda.get_device_name(0)} (compute capability "
          f"{'.'.join(map(str, torch.cuda.get_device_capability(0)))})" if cuda else ""))
except Exception as exc:
    cuda = False
    print(f"torch: {exc}")
trt = importlib.util.find_spec("tensorrt") is not None
if trt:
    import tensorrt
    print(f"tensorrt {tensorrt.__version__}")
else:
    print("tensorrt: not installed")
try:
    import onnxruntime as ort
    print(f"onnxruntime {ort.__version__}: {', '.join(ort.get_available_providers())}")
except Exception as exc:
    print(f"onnxruntime: {exc}")
sys.exit(0 if (cuda or trt) else 2)
PY

echo "== tests marked gpu / tensorrt"
"$PY" -m pytest -q -ra -m "gpu or tensorrt" tests

if [ $# -ge 1 ]; then
    echo "== engine for $1 on this GPU"
    "$PY" -m edgekit build-engine "$1" ${TARGET:+--target "$TARGET"} --build always
fi
