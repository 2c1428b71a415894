"""Put a target's engine into a bundle: check the graph, write the exact settings and the trtexec
script, build the engine when this machine can, and record it all in the manifest.

Used by ``edgekit build-engine`` (on a bundle in place, e.g. on the device) and by the
``build_engine`` stage (on a copy of the pipeline's bundle). Whether to build here:

* ``build="auto"``: when the TensorRT Python package is installed and the local GPU has the
  target's compute capability (an engine is tied to the GPU it was built on); otherwise the
  bundle gets everything needed to build on the device and says why it did not build;
* ``build="always"``: build or fail with the reason; ``build="never"``: settings + script only.

Files per target (relative to the bundle root)::

    engine/<target>.settings.json   the exact build settings (profiles, typing, workspace, ...)
    engine/<target>.trtexec.sh      the same build as a trtexec command line (JetPack-only devices)
    engine/<target>.check.json      the readiness findings (edgekit check)
    engine/<target>.plan            the engine            } when built
    engine/<target>.engine.json     TensorRT version, GPU } (here, or on the device by
    engine/<target>.layers.json     inspector layer info  }  build_engine.sh)
    engine/<target>.build.log       builder log           }
    build_engine.sh                 ./build_engine.sh [TARGET]
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from edgekit.bundle.manifest import MANIFEST_NAME, Bundle, Manifest
from edgekit.engine.options import BuildMode, BuildOptions
from edgekit.engine.settings import BUILD_SCRIPT, BuildSettings, build_settings, engine_paths, read_graph
from edgekit.errors import EngineError
from edgekit.yamlio import atomic_write_json, atomic_write_text

MANIFEST = MANIFEST_NAME


def settings_for(bundle_dir: Path, target: Any, options: BuildOptions, *, manifest: Manifest | None,
                 context_length: int | None = None, onnx_rel: str | None = None, strict: bool = True) -> BuildSettings:
    bundle_dir = Path(bundle_dir)
    onnx_rel = onnx_rel or (Bundle(bundle_dir, manifest).graph_rel("tensorrt", error_cls=EngineError) if manifest else "model.onnx")
    onnx_path = bundle_dir / onnx_rel
    if not onnx_path.is_file():
        raise EngineError("the ONNX graph is missing", where=str(onnx_path), how="rebuild the bundle")
    context = context_length or (manifest.context_length if manifest else None)
    if not context:
        raise EngineError("the context length is unknown for a bare ONNX file", where=str(onnx_path),
                          how="pass --context-length N (the longest prompt + generation the engine must hold)")
    name = (manifest.name if manifest else None) or bundle_dir.name
    return build_settings(read_graph(onnx_path), onnx_rel=onnx_rel, target=target, bundle_name=name,
                          context_length=int(context), options=options, strict=strict)


def run_checks(bundle_dir: Path, settings: BuildSettings, target: Any, options: BuildOptions) -> dict[str, Any]:
    from edgekit.engine.readiness import check_onnx

    profiles = {p.name: dict(p.shapes) for p in settings.profiles}
    findings = check_onnx(bundle_dir / settings.onnx, target=target, profiles=profiles, context_length=settings.context_length,
                          max_batch=settings.max_batch, workspace_gb=options.workspace_gb)
    rows = [asdict(f) for f in findings]
    errors = [f for f in rows if f["severity"] == "error"]
    return {
        "onnx": settings.onnx,
        "target": target.name,
        "tensorrt": settings.tensorrt_version,
        "findings": rows,
        "errors": len(errors),
        "warnings": sum(1 for f in rows if f["severity"] == "warning"),
        "passed": not errors,
    }


def why_not_build_here(target: Any) -> str | None:
    """None when this machine can build ``target``'s engine; else the reason."""
    from edgekit.engine.builder import cuda_device, tensorrt_available

    version = tensorrt_available()
    if version is None:
        return "the TensorRT Python package is not installed here"
    try:
        device, cc = cuda_device()
    except EngineError:
        return "no CUDA GPU here"
    if cc != target.compute_capability:
        return f"this GPU ({device}, compute capability {cc}) is not the target's ({target.compute_capability})"
    return None


def prepare_engine(
    bundle_dir: Path | Bundle,
    target: Any,
    options: BuildOptions,
    *,
    build: BuildMode = "auto",
    check: bool = True,
    context_length: int | None = None,
    onnx_rel: str | None = None,
    echo: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write the target's engine files into ``bundle_dir`` (a path, or a :class:`Bundle` already
    opened; and build when possible); returns a summary."""
    echo = echo or (lambda message: None)
    if isinstance(bundle_dir, Bundle):
        bundle: Bundle | None = bundle_dir
    elif (Path(bundle_dir) / MANIFEST).is_file() or onnx_rel is None:
        bundle = Bundle.open(bundle_dir, error_cls=EngineError)
    else:
        bundle = None
    bundle_dir = Path(bundle_dir)
    manifest = bundle.manifest if bundle else None
    settings = settings_for(bundle_dir, target, options, manifest=manifest, context_length=context_length, onnx_rel=onnx_rel)
    paths = engine_paths(target.name, (manifest.name if manifest else None) or bundle_dir.name)
    (bundle_dir / "engine").mkdir(exist_ok=True)
    summary: dict[str, Any] = {"target": target.name, "onnx": settings.onnx, "settings": paths["settings"], "script": paths["script"]}
    if check:
        report = run_checks(bundle_dir, settings, target, options)
        atomic_write_json(bundle_dir / f"engine/{target.name}.check.json", report)
        summary.update(check_errors=report["errors"], check_warnings=report["warnings"])
        if report["errors"]:
            first = next(f for f in report["findings"] if f["severity"] == "error")
            raise EngineError(
                f"the graph is not ready for TensorRT {settings.tensorrt_version} on {target.name}: {report['errors']} error(s), "
                f"first: {first['message']}",
                where=str(bundle_dir / settings.onnx),
                how=f"{first['fix'].rstrip('.')} (all findings: edgekit check {bundle_dir} --target {target.name})",
            )
    atomic_write_json(bundle_dir / paths["settings"], settings.to_json())
    from edgekit.engine.trtexec import render_dispatch_script, render_script

    _write_script(bundle_dir / paths["script"], render_script(settings))
    default_target = (bundle.target(error_cls=EngineError) if bundle else None) or target.name
    if not (bundle_dir / f"engine/{default_target}.trtexec.sh").is_file():
        default_target = target.name
    _write_script(bundle_dir / BUILD_SCRIPT, render_dispatch_script(default_target))
    reason = "build: never" if build == "never" else why_not_build_here(target)
    if reason is None:
        from edgekit.engine.builder import build_engine

        echo(f"building the TensorRT engine for {target.name} (minutes)")
        record = build_engine(settings, bundle_dir, echo=echo)
        summary.update(status="built", engine=record["engine"], tensorrt_version=record["tensorrt_version"],
                       device=record["device"], engine_bytes=record["bytes"], build_seconds=record["build_seconds"])
    elif build == "always":
        raise EngineError(f"cannot build the engine here: {reason}", where=str(bundle_dir),
                          how=f"run on a machine with TensorRT and the target's GPU, or on the device: ./{BUILD_SCRIPT} {target.name}")
    else:
        summary.update(status="planned", reason=reason, build_on_device=f"./{BUILD_SCRIPT} {target.name}")
    summary["notes"] = list(settings.notes)
    if manifest is not None:
        record_engine(bundle_dir, manifest, target.name, summary)
    return summary


def _write_script(path: Path, text: str) -> None:
    atomic_write_text(path, text)
    os.chmod(path, 0o755)


def record_engine(bundle_dir: Path, manifest: Manifest | dict[str, Any], target: str, summary: dict[str, Any]) -> None:
    """The manifest always describes the bundle as it is: its engines and every file's sha256."""
    from edgekit.bundle.manifest import bundle_files

    if isinstance(manifest, Manifest):
        manifest = manifest.raw
    manifest.setdefault("engines", {})[target] = summary
    manifest["files"] = bundle_files(bundle_dir)
    atomic_write_json(bundle_dir / MANIFEST, manifest)
