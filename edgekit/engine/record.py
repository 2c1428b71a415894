"""What an engine was built with, and the refusal to load it anywhere else.

A serialized TensorRT engine runs only on the TensorRT version that built it and on the GPU
(compute capability) it was tuned for, unless it was built version-compatible (runs on the
same major version, that release or newer) or hardware-compatible (Ampere and newer, or any
GPU of the same compute capability). TensorRT's own failure for a mismatch is a terse
deserialization error after reading the whole file; :func:`check_compatible` says what
differs, from ``engine/<target>.engine.json``, before anything is read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgekit.errors import EngineError

RECORD_FORMAT = "edgekit.engine/1"


def _version_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split(".") if p != "")
    except ValueError:
        return ()


def _cc_tuple(text: str) -> tuple[int, int]:
    major, _, minor = str(text).partition(".")
    return int(major), int(minor or 0)


def read_record(bundle_dir: Path, target: str) -> dict[str, Any]:
    path = bundle_dir / "engine" / f"{target}.engine.json"
    if not path.is_file():
        raise EngineError(
            f"no TensorRT engine for target {target} in this bundle",
            where=str(path),
            how=f"build it on the device: edgekit build-engine {bundle_dir} --target {target} (or ./build_engine.sh {target})",
        )
    try:
        record = json.loads(path.read_text())
    except ValueError:
        raise EngineError("the engine record is not valid JSON", where=str(path), how="rebuild the engine") from None
    for key in ("tensorrt_version", "compute_capability", "engine"):
        if not record.get(key):
            raise EngineError(f"the engine record lacks '{key}'", where=str(path),
                              how="rebuild the engine (the trtexec log did not say it; check engine/<target>.build.log)")
    return record


def check_compatible(record: dict[str, Any], *, tensorrt_version: str, compute_capability: str, device: str | None = None) -> None:
    """Raise EngineError when this TensorRT/GPU cannot run the engine ``record`` describes."""
    built, here = _version_tuple(record["tensorrt_version"]), _version_tuple(tensorrt_version)
    engine = record["engine"]
    if record.get("version_compatible"):
        # Version-compatible engines run on the same major version, on that release or later.
        ok = bool(built) and bool(here) and here[0] == built[0] and here[:3] >= built[:3]
        rule = f"a version-compatible engine needs TensorRT {built[0] if built else '?'}.x at or after {record['tensorrt_version']}"
    else:
        ok = built[:3] == here[:3]
        rule = "an engine runs only on the TensorRT version that built it"
    if not ok:
        raise EngineError(
            f"{engine} was built with TensorRT {record['tensorrt_version']} but this is TensorRT {tensorrt_version} ({rule})",
            where=engine,
            how="rebuild the engine here (edgekit build-engine / build_engine.sh) or install the TensorRT it was built with",
        )
    built_cc, here_cc = _cc_tuple(record["compute_capability"]), _cc_tuple(compute_capability)
    level = record.get("hardware_compatibility", "none")
    if level == "ampere_plus":
        ok, rule = here_cc >= (8, 0), "an ampere+ hardware-compatible engine needs compute capability >= 8.0"
    else:
        ok, rule = here_cc == built_cc, "an engine runs only on GPUs of the compute capability it was built for"
    if not ok:
        raise EngineError(
            f"{engine} was built for compute capability {record['compute_capability']}"
            f"{' (' + record['device'] + ')' if record.get('device') else ''} but this GPU has {compute_capability}"
            f"{' (' + device + ')' if device else ''} ({rule})",
            where=engine,
            how="rebuild the engine on this GPU, or build with hardware_compatibility: ampere_plus on a workstation",
        )


def load_engine(bundle_dir: Path, target: str, *, logger: Any = None) -> Any:
    """Deserialize the bundle's engine for ``target`` after checking version, GPU and sha256."""
    import tensorrt as trt

    from edgekit.engine.gpu import cuda_device
    from edgekit.hashing import sha256_file
    from edgekit.names import path_inside

    record = read_record(bundle_dir, target)
    device, cc = cuda_device()
    check_compatible(record, tensorrt_version=trt.__version__, compute_capability=cc, device=device)
    path = path_inside(bundle_dir, record.get("engine"), what="engine file in the engine record",
                       where=str(bundle_dir / "engine" / f"{target}.engine.json"), error_cls=EngineError,
                       how="rebuild the engine (edgekit build-engine)")
    if not path.is_file():
        raise EngineError("the engine file is missing", where=str(path), how="rebuild the engine")
    if record.get("sha256") and sha256_file(path) != record["sha256"]:
        raise EngineError("the engine file does not match its recorded sha256", where=str(path),
                          how="rebuild the engine; do not edit engine files by hand")
    runtime = trt.Runtime(logger or trt.Logger(trt.Logger.WARNING))
    if record.get("version_compatible"):
        runtime.engine_host_code_allowed = True  # version-compatible engines embed a lean runtime
    engine = runtime.deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise EngineError("TensorRT could not deserialize the engine", where=str(path),
                          how="rebuild the engine with this TensorRT on this GPU")
    return engine
