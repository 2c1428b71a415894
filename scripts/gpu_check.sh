#!/usr/bin/env bash
# The GPU check: one prepared script (under 10 minutes on one GPU) that runs what CPU-only
# dev/CI machines cannot, and records what ran and what did not in a JSON file.
#
#   pip install -e '.[test,gpu]'       # x86-64; on Jetson, JetPack provides tensorrt + onnxruntime-gpu
#   scripts/gpu_check.sh [BUNDLE]      # BUNDLE: also build that bundle's TensorRT engine here
#
# Steps (each with its own time limit, so one hang cannot eat the budget):
#   1. environment: torch / CUDA / GPU / bf16 / TensorRT / ONNX Runtime providers
#   2. pytest -m "gpu or tensorrt": GPTQ layer by layer with offload, the GPTQ stage, prune and
#      evaluate in half precision, distillation in bf16 and under FSDP with a resume (tests/)
#   3. the 7B recipe's proxy on the GPU: `edgekit compress recipes/7b_to_orin.yaml --proxy` with
#      EDGEKIT_DEVICE=cuda (every stage whose device is `auto` runs on the GPU; the proxy maps an
#      explicit `device: cuda` to auto, and the 8-GPU FSDP distillation to as many processes as
#      there are GPUs, up to 2); the manifest must show each GPU stage's device as cuda
#   4. (with BUNDLE) build that bundle's engine with TensorRT
#
# Environment: PYTHON (default python), GPU_CHECK_OUT (default results/gpu_check: the JSON,
# pytest's junit XML and each step's log), GPU_CHECK_RECIPE (default recipes/7b_to_orin.yaml),
# TARGET (engine build: a target profile name).
# Exit code: 0 when every step that ran passed, 1 when one failed, 2 when this machine has
# neither a CUDA GPU nor TensorRT (nothing to check; the JSON says so).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
OUT="${GPU_CHECK_OUT:-results/gpu_check}"
RECIPE="${GPU_CHECK_RECIPE:-recipes/7b_to_orin.yaml}"
BUNDLE="${1:-}"
mkdir -p "$OUT"
STEPS="$OUT/steps.jsonl"
: > "$STEPS"

# step NAME STATUS SECONDS DETAIL-JSON: one line of steps.jsonl (assembled into gpu_check.json)
step() {
    "$PY" - "$STEPS" "$1" "$2" "$3" "$4" <<'PY'
import json, sys
path, name, status, seconds, detail = sys.argv[1:6]
with open(path, "a") as f:
    f.write(json.dumps({"step": name, "status": status, "seconds": float(seconds), **json.loads(detail or "{}")}) + "\n")
PY
}

echo "== environment"
"$PY" - "$OUT/environment.json" <<'PY'
import importlib.util, json, os, sys
info = {"python": sys.version.split()[0]}
try:
    import torch
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda=torch.cuda.is_available())
    if info["cuda"]:
        info.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(),
                    capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    bf16=torch.cuda.is_bf16_supported(including_emulation=False),
                    memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
except Exception as exc:  # noqa: BLE001
    info.update(torch=f"unavailable: {exc}", cuda=False)
info["tensorrt"] = None
if importlib.util.find_spec("tensorrt") is not None:
    import tensorrt
    info["tensorrt"] = tensorrt.__version__
try:
    import onnxruntime as ort
    info.update(onnxruntime=ort.__version__, ort_providers=ort.get_available_providers())
except Exception as exc:  # noqa: BLE001
    info["onnxruntime"] = f"unavailable: {exc}"
for key in ("accelerate", "transformers"):
    try:
        info[key] = __import__(key).__version__
    except Exception:  # noqa: BLE001
        info[key] = None
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info, indent=1))
sys.exit(0 if (info.get("cuda") or info["tensorrt"]) else 2)
PY
HAVE=$?
if [ "$HAVE" -eq 2 ]; then
    step environment "no_gpu" 0 '{"reason": "torch sees no CUDA GPU and TensorRT is not installed: nothing to check here"}'
fi

run_timed() {  # run_timed LIMIT LOG CMD...: the command's exit code; 124 on timeout
    local limit="$1" log="$2"; shift 2
    timeout --signal=TERM --kill-after=20 "$limit" "$@" > "$log" 2>&1
}

if [ "$HAVE" -ne 2 ]; then
    echo "== tests marked gpu / tensorrt (limit 300 s)"
    start=$(date +%s)
    run_timed 300 "$OUT/pytest.log" "$PY" -m pytest -q -ra -m "gpu or tensorrt" --junitxml "$OUT/pytest.xml" tests
    rc=$?
    tail -n 30 "$OUT/pytest.log"
    detail=$("$PY" - "$OUT/pytest.xml" "$rc" <<'PY'
import json, sys, xml.etree.ElementTree as ET
path, rc = sys.argv[1], int(sys.argv[2])
ran, skipped, failed = [], [], []
try:
    root = ET.parse(path).getroot()
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        skip = case.find("skipped")
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if skip is not None:
            skipped.append({"test": name, "reason": (skip.get("message") or "")[:300]})
        elif bad is not None:
            failed.append({"test": name, "message": (bad.get("message") or "")[:500]})
        else:
            ran.append(name)
except (OSError, ET.ParseError) as exc:
    failed.append({"test": "(no junit report)", "message": str(exc)})
print(json.dumps({"exit_code": rc, "timed_out": rc == 124, "passed": ran, "failed": failed, "skipped": skipped}))
PY
)
    status=$([ "$rc" -eq 0 ] && echo passed || ([ "$rc" -eq 124 ] && echo timed_out || echo failed))
    # pytest exits 5 when every selected test was deselected/skipped: nothing failed
    [ "$rc" -eq 5 ] && status=passed
    step pytest_gpu "$status" $(( $(date +%s) - start )) "$detail"
fi

CUDA=$("$PY" -c "import json,sys; print(int(bool(json.load(open(sys.argv[1])).get('cuda'))))" "$OUT/environment.json")
if [ "$CUDA" = "1" ]; then
    echo "== $RECIPE --proxy on the GPU (EDGEKIT_DEVICE=cuda, limit 240 s)"
    if ! "$PY" -m edgekit compress --help 2>/dev/null | grep -q -- "--proxy"; then
        step proxy_on_gpu not_run 0 '{"reason": "this edgekit has no compress --proxy"}'
    else
        start=$(date +%s)
        run_timed 240 "$OUT/proxy.log" env EDGEKIT_DEVICE=cuda "$PY" -m edgekit compress "$RECIPE" --proxy \
            --output "$OUT/proxy-run" --force -q
        rc=$?
        tail -n 20 "$OUT/proxy.log"
        detail=$("$PY" - "$OUT/proxy-run/manifest.json" "$rc" <<'PY'
import json, sys
path, rc = sys.argv[1], int(sys.argv[2])
result = {"exit_code": rc, "timed_out": rc == 124, "stages": []}
gpu_stages = ("prune", "distill", "quantize", "evaluate")
try:
    manifest = json.load(open(path))
except (OSError, ValueError) as exc:
    result["manifest"] = f"unreadable: {exc}"
    print(json.dumps(result)); sys.exit(0)
problems = []
for stage in manifest.get("stages", []):
    metrics = stage.get("metrics") or {}
    entry = {"name": stage.get("name"), "type": stage.get("type"), "status": stage.get("status"),
             "seconds": stage.get("seconds")}
    for key in ("device", "dtype", "precision", "processes", "peak_gpu_mb", "perplexity", "graph"):
        if key in metrics:
            entry[key] = metrics[key]
    if stage.get("type") in gpu_stages and metrics.get("backend") != "onnxruntime" and entry.get("device") not in (None, "cuda") \
            and not (stage.get("type") == "quantize" and metrics.get("method") != "gptq"):
        problems.append(f"{entry['name']} ran on {entry.get('device')}")
    result["stages"].append(entry)
result["not_on_gpu"] = problems
print(json.dumps(result))
PY
)
        status=$([ "$rc" -eq 0 ] && echo passed || ([ "$rc" -eq 124 ] && echo timed_out || echo failed))
        if [ "$rc" -eq 0 ] && echo "$detail" | "$PY" -c "import json,sys; sys.exit(0 if json.load(sys.stdin)['not_on_gpu'] else 1)"; then
            status=failed  # a stage meant for the GPU ran elsewhere
        fi
        step proxy_on_gpu "$status" $(( $(date +%s) - start )) "$detail"
    fi
else
    step proxy_on_gpu not_run 0 '{"reason": "no CUDA GPU"}'
fi

if [ -n "$BUNDLE" ]; then
    echo "== engine for $BUNDLE on this GPU (limit 300 s)"
    start=$(date +%s)
    run_timed 300 "$OUT/engine.log" "$PY" -m edgekit build-engine "$BUNDLE" ${TARGET:+--target "$TARGET"} --build always
    rc=$?
    tail -n 20 "$OUT/engine.log"
    step build_engine "$([ "$rc" -eq 0 ] && echo passed || echo failed)" $(( $(date +%s) - start )) "{\"exit_code\": $rc}"
else
    step build_engine not_run 0 '{"reason": "no BUNDLE argument"}'
fi

"$PY" - "$OUT" "$HAVE" <<'PY'
import json, os, sys, time
out, have = sys.argv[1], int(sys.argv[2])
steps = [json.loads(line) for line in open(os.path.join(out, "steps.jsonl")) if line.strip()]
record = {
    "format": "edgekit.gpu_check/1",
    "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "environment": json.load(open(os.path.join(out, "environment.json"))),
    "steps": steps,
    "ran": [s["step"] for s in steps if s["status"] not in ("not_run", "no_gpu")],
    "not_run": {s["step"]: s.get("reason") for s in steps if s["status"] in ("not_run", "no_gpu")},
    "failed": [s["step"] for s in steps if s["status"] in ("failed", "timed_out")],
}
tmp = os.path.join(out, f".gpu_check.json.{os.getpid()}")
with open(tmp, "w") as f:
    json.dump(record, f, indent=1)
    f.write("\n")
os.replace(tmp, os.path.join(out, "gpu_check.json"))
print(f"== recorded in {os.path.join(out, 'gpu_check.json')}: ran {record['ran']}, failed {record['failed']}, "
      f"not run {list(record['not_run'])}")
sys.exit(2 if have == 2 else (1 if record["failed"] else 0))
PY
