"""ONNX Runtime's TensorRT and CUDA execution providers as backends (``onnxruntime-gpu``).

For a user without the TensorRT Python package: ONNX Runtime's TensorRT execution provider
builds TensorRT engines itself (from the same Q/DQ graph, with the same profiles, workspace,
optimization level and typing as :class:`BuildSettings`) and caches them, with their timing
cache, under ``engine/ort-<target>/`` in the bundle, so only the first session pays the build.
Nodes TensorRT cannot take fall back to the CUDA provider, then the CPU.

Which graph: TensorRT's EP reads the Q/DQ graph (``tensorrt/model.onnx``); the CUDA EP alone
reads the ONNX Runtime graph (``model.onnx``: ``MatMulNBits`` has CUDA kernels).
Profiles are given like trtexec's: ``name:AxB`` per input, an input repeated once per profile.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgekit.bundle.manifest import Bundle
from edgekit.errors import EngineError
from edgekit.engine.settings import BuildSettings, shape_string

BACKENDS = ("ort-tensorrt", "ort-cuda", "ort-cpu")
_PROVIDER = {"ort-tensorrt": "TensorrtExecutionProvider", "ort-cuda": "CUDAExecutionProvider", "ort-cpu": "CPUExecutionProvider"}


def available_backends() -> list[str]:
    """The ONNX Runtime backends this installation can run (``onnxruntime-gpu`` adds TensorRT/CUDA)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    have = set(ort.get_available_providers())
    return [name for name in BACKENDS if _PROVIDER[name] in have]


def ort_cache_dir(target: str) -> str:
    return f"engine/ort-{target}"


def tensorrt_provider_options(settings: BuildSettings, bundle_dir: Path, *, device_id: int = 0) -> dict[str, str]:
    """TensorrtExecutionProvider options equivalent to ``settings`` (all values as strings)."""
    cache = bundle_dir / ort_cache_dir(settings.target)
    options = {
        "device_id": str(device_id),
        "trt_max_workspace_size": str(settings.workspace_bytes),
        "trt_builder_optimization_level": str(settings.optimization_level),
        "trt_fp16_enable": "True" if settings.fp16 else "False",
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(cache),
        "trt_detailed_build_log": "True",
    }
    for key, index in (("trt_profile_min_shapes", 0), ("trt_profile_opt_shapes", 1), ("trt_profile_max_shapes", 2)):
        options[key] = ",".join(
            f"{name}:{shape_string(shapes[index])}" for profile in settings.profiles for name, shapes in profile.shapes.items()
        )
    if settings.hardware_compatibility == "ampere_plus":
        options["trt_engine_hw_compatible"] = "True"
    return options


def session_providers(backend: str, settings: BuildSettings | None, bundle_dir: Path) -> list[Any]:
    """The ``providers=`` list for an InferenceSession on ``backend`` (with fallbacks)."""
    if backend not in BACKENDS:
        raise EngineError(f"unknown backend {backend!r}", where="--backend", how=f"use one of: {', '.join(BACKENDS)}")
    if backend == "ort-tensorrt":
        if settings is None:
            raise EngineError("the TensorRT execution provider needs build settings", where="ort-tensorrt",
                              how="pass the bundle's target so profiles can be derived")
        return [("TensorrtExecutionProvider", tensorrt_provider_options(settings, bundle_dir)),
                "CUDAExecutionProvider", "CPUExecutionProvider"]
    if backend == "ort-cuda":
        return [("CUDAExecutionProvider", {"device_id": "0"}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def backend_graph(backend: str, bundle: Bundle | Path) -> Path:
    """The bundle's graph for ``backend``: the TensorRT one for TensorRT's EP, else the ONNX
    Runtime one (edgekit.bundle.manifest.graph_variant), checked to lie inside the bundle."""
    bundle = Bundle.open(bundle, error_cls=EngineError)
    return bundle.graph("tensorrt" if backend == "ort-tensorrt" else "onnxruntime", error_cls=EngineError)


def create_session(bundle_dir: Path | Bundle, backend: str, *, settings: BuildSettings | None = None) -> Any:
    """An ONNX Runtime session on the bundle's graph for ``backend``; refuses when the provider
    is not installed instead of silently running on the CPU."""
    import onnxruntime as ort

    if backend not in available_backends():
        raise EngineError(
            f"backend {backend} is not available in this onnxruntime ({', '.join(ort.get_available_providers())})",
            where="--backend",
            how="pip install 'edgekit[gpu]' (onnxruntime-gpu + tensorrt) on an x86-64 CUDA machine; on Jetson use "
            "JetPack's onnxruntime-gpu wheel",
        )
    bundle = Bundle.open(bundle_dir, error_cls=EngineError)
    bundle_dir = bundle.dir
    graph = backend_graph(backend, bundle)
    if settings is not None:
        (bundle_dir / ort_cache_dir(settings.target)).mkdir(parents=True, exist_ok=True)
    options = ort.SessionOptions()
    # DequantizeLinear -> MatMul must stay exact (see edgekit.measure.onnx_session).
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    session = ort.InferenceSession(str(graph), sess_options=options, providers=session_providers(backend, settings, bundle_dir))
    wanted = _PROVIDER[backend]
    if wanted not in session.get_providers():
        raise EngineError(f"onnxruntime did not register {wanted} for this graph", where=str(graph),
                          how="check the CUDA/TensorRT libraries onnxruntime-gpu needs (see its logs with --debug)")
    return session


def warm_engine_cache(bundle_dir: Path | Bundle, settings: BuildSettings, *, echo: Any = None) -> dict[str, Any]:
    """Build ONNX Runtime's TensorRT engines for both profiles into ``engine/ort-<target>/`` by
    running one prefill and one decode step (the EP builds lazily, on first run)."""
    import time

    import numpy as np

    echo = echo or (lambda message: None)
    started = time.time()
    bundle = Bundle.open(bundle_dir, error_cls=EngineError)
    bundle_dir = bundle.dir
    session = create_session(bundle, "ort-tensorrt", settings=settings)
    echo(f"ONNX Runtime TensorRT EP: building engines into {ort_cache_dir(settings.target)}/ (minutes)")
    for profile in settings.profiles:
        feeds = {}
        for value in session.get_inputs():
            shape = profile.shapes[value.name][1]  # the opt shape
            dtype = np.int64 if "int64" in value.type else (np.float16 if "float16" in value.type else np.float32)
            feeds[value.name] = np.ones(shape, dtype=dtype) if dtype == np.int64 else np.zeros(shape, dtype=dtype)
        session.run(None, feeds)
    cache = bundle_dir / ort_cache_dir(settings.target)
    files = sorted(p.name for p in cache.iterdir()) if cache.is_dir() else []
    if not files:
        raise EngineError("ONNX Runtime wrote no TensorRT engine cache", where=str(cache),
                          how="check that TensorrtExecutionProvider took the graph (run with --debug for its log)")
    return {"target": settings.target, "status": "built", "backend": "ort-tensorrt", "cache": ort_cache_dir(settings.target),
            "files": files, "build_seconds": round(time.time() - started, 1)}
