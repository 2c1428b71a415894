"""Build a TensorRT engine with the TensorRT Python API (10.x and 11.x) from a BuildSettings.

TensorRT is imported only inside these functions. What differs between the majors:

* 10.x: networks are weakly typed unless created with ``STRONGLY_TYPED``; precision flags
  (``BuilderFlag.FP16``) let weak networks use half precision.
* 11.x: every network is strongly typed and the precision flags are gone, so neither the
  creation flag nor ``FP16`` is set (the graph's own types decide).

The ONNX is parsed with ``parse_from_file`` so its external data (``model.onnx_data``) is
found next to it. Outputs (under the bundle): the engine, the build log, the engine
inspector's layer JSON (detailed profiling verbosity), the updated timing cache beside the
bundle, and ``engine/<target>.engine.json`` with the TensorRT version and GPU.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from edgekit.errors import EngineError
from edgekit.devices import tensorrt_available  # noqa: F401 (edgekit.engine.builder.tensorrt_available stays)
from edgekit.engine.gpu import cuda_device
from edgekit.engine.record import RECORD_FORMAT
from edgekit.engine.settings import BuildSettings


def build_host() -> dict[str, str | None]:
    """What this machine brings to an engine build (the build_engine stage's cache key): the
    TensorRT version and the GPU's compute capability, None where absent."""
    version = tensorrt_available()
    capability = None
    if version is not None:
        try:
            capability = cuda_device()[1]
        except EngineError:
            pass
    return {"tensorrt": version, "compute_capability": capability}


def _file_logger(trt: Any, path: Path, echo: Any = None) -> Any:
    """A trt.ILogger that writes every message to the build log and forwards warnings on."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.handle = open(path, "w")
            self.errors: list[str] = []

        def log(self, severity, msg):
            self.handle.write(f"[{severity.name}] {msg}\n")
            if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                self.errors.append(msg)
            if echo is not None and severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR, trt.ILogger.WARNING):
                echo(f"tensorrt: {msg}")

        def close(self):
            self.handle.close()

    return Logger()


def build_engine(settings: BuildSettings, bundle_dir: Path, *, echo: Any = None) -> dict[str, Any]:
    """Build ``settings.engine`` inside ``bundle_dir``; returns the engine record."""
    import tensorrt as trt

    major = int(trt.__version__.split(".")[0])
    onnx_path = bundle_dir / settings.onnx
    engine_path = bundle_dir / settings.engine
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    logger = _file_logger(trt, bundle_dir / settings.build_log, echo)
    started = time.time()
    try:
        builder = trt.Builder(logger)
        flags = 0
        if settings.strongly_typed and major < 11:
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            problems = []
            for i in range(parser.num_errors):
                error = parser.get_error(i)
                problems.append(f"{error.node_name() or '?'} ({error.node_operator() or '?'}): {error.desc()}")
            raise EngineError(
                f"TensorRT's ONNX parser refused the graph: {'; '.join(problems[:3]) or 'no details'}",
                where=str(onnx_path),
                how="run `edgekit check` on the bundle for the unsupported nodes and their fixes",
            )
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
        config.builder_optimization_level = settings.optimization_level
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        if settings.fp16 and major < 11:
            config.set_flag(trt.BuilderFlag.FP16)
        if settings.version_compatible:
            config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        if settings.hardware_compatibility == "ampere_plus":
            config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
        elif settings.hardware_compatibility == "same_compute_capability":
            level = getattr(trt.HardwareCompatibilityLevel, "SAME_COMPUTE_CAPABILITY", None)
            if level is None:
                raise EngineError(
                    f"TensorRT {trt.__version__} has no same_compute_capability hardware compatibility",
                    where="build_engine.hardware_compatibility",
                    how="use a newer TensorRT 10.x, or hardware_compatibility: ampere_plus / none",
                )
            config.hardware_compatibility_level = level
        cache_path = (bundle_dir / settings.timing_cache).resolve() if settings.timing_cache else None
        if cache_path is not None:
            cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
            config.set_timing_cache(cache, ignore_mismatch=False)
        for profile in settings.profiles:
            trt_profile = builder.create_optimization_profile()
            for name, (low, opt, high) in profile.shapes.items():
                trt_profile.set_shape(name, low, opt, high)
            config.add_optimization_profile(trt_profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise EngineError(
                f"TensorRT failed to build the engine: {'; '.join(logger.errors[-3:]) or 'see the build log'}",
                where=str(bundle_dir / settings.build_log),
                how="read the build log; raise workspace_gb or lower max_prefill / max_batch if it ran out of memory",
            )
        data = bytes(serialized)
        _atomic_write_bytes(engine_path, data)
        if cache_path is not None:
            _atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(data)
        inspector = engine.create_engine_inspector()
        layers = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
        _atomic_write_bytes(bundle_dir / settings.layer_info, layers.encode())
    finally:
        logger.close()
    from edgekit.hashing import sha256_file

    device, cc = cuda_device()
    record = {
        "format": RECORD_FORMAT,
        "built_with": "python-api",
        "target": settings.target,
        "tensorrt_version": trt.__version__,
        "device": device,
        "compute_capability": cc,
        "engine": settings.engine,
        "sha256": sha256_file(engine_path),
        "bytes": engine_path.stat().st_size,
        "hardware_compatibility": settings.hardware_compatibility,
        "version_compatible": settings.version_compatible,
        "build_seconds": round(time.time() - started, 1),
        "precisions": layer_precisions(json.loads(layers)),
        "settings": settings.engine.replace(".plan", ".settings.json"),
    }
    _atomic_write_bytes(bundle_dir / settings.record, (json.dumps(record, indent=2) + "\n").encode())
    return record


def layer_precisions(info: dict[str, Any]) -> dict[str, int]:
    """How many engine layers run at each precision, from the inspector's JSON: the check that
    the INT4/FP8 weights were really used (a build can silently fall back to fp32)."""
    counts: dict[str, int] = {}
    for layer in info.get("Layers", []):
        if not isinstance(layer, dict):
            continue
        for tensor in layer.get("Outputs", []) + layer.get("Inputs", []):
            fmt = tensor.get("Format/Datatype") or tensor.get("Datatype") or ""
            for name in ("Int4", "Int8", "FP8", "Half", "BF16", "Float"):
                if name.lower() in fmt.lower().replace(" ", ""):
                    counts[name] = counts.get(name, 0) + 1
                    break
    return counts


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
