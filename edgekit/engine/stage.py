"""The ``build_engine`` stage: the pipeline's bundle + this target's TensorRT engine (or everything
needed to build it on the device).

The stage copies the bundle into its own directory (stages never modify another stage's
output) and runs :func:`edgekit.engine.prepare.prepare_engine` on the copy: readiness checks
(an error fails the stage before anyone spends an hour on a device), the exact settings,
``build_engine.sh`` + ``engine/<target>.trtexec.sh``, and the engine itself when this machine
has TensorRT and the target's GPU. For a Jetson target built elsewhere the stage succeeds
with ``engine: planned`` and the reason; ``build: always`` makes that an error instead.
"""

from __future__ import annotations

from edgekit.engine.options import BuildEngineOptions
from edgekit.pipeline.registry import BUNDLE, StageConfig, register_stage


class BuildEngineConfig(StageConfig, BuildEngineOptions):
    """The stage's parameters: exactly the engine build options (:mod:`edgekit.engine.options`)."""


def run_build_engine(ctx) -> dict:
    import json
    import shutil

    from edgekit.bundle.manifest import write_tar
    from edgekit.engine.prepare import prepare_engine

    source = ctx.inputs[BUNDLE]
    manifest_path = next(iter(sorted(source.glob("*/manifest.json"))), None)
    if manifest_path is None:
        from edgekit.errors import StageError

        raise StageError("the bundle stage's output has no bundle directory", where=str(source), how="rerun the bundle stage")
    name = manifest_path.parent.name
    bundle_dir = ctx.output_dir / name
    with ctx.progress(None, f"copying bundle {name}"):
        # A copy, not links: the bundle stage's files stay as it wrote them (and onnx refuses
        # hard-linked external data).
        shutil.copytree(manifest_path.parent, bundle_dir)
    with ctx.progress(None, f"TensorRT readiness + build settings for {ctx.target.name}"):
        summary = prepare_engine(bundle_dir, ctx.target, ctx.config.build_options(), build=ctx.config.build,
                                 check=ctx.config.check, echo=ctx.reporter.log)
    had_tar = (source / f"{name}.tar").is_file()
    if had_tar:
        with ctx.progress(None, f"writing {name}.tar"):
            write_tar(bundle_dir, ctx.output_dir / f"{name}.tar")
    if summary["status"] == "planned":
        ctx.reporter.log(f"  engine for {ctx.target.name} not built here ({summary['reason']}); on the device: "
                         f"cd {name} && {summary['build_on_device']}")
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    return {
        "bundle": name,
        "engine": summary["status"],
        "reason": summary.get("reason"),
        "tensorrt": ctx.target.software.tensorrt,
        "check_errors": summary.get("check_errors"),
        "check_warnings": summary.get("check_warnings"),
        "bundle_bytes": sum(meta["size"] for meta in manifest["files"].values()),
        "tar": had_tar,
    }


register_stage(
    "build_engine",
    config=BuildEngineConfig,
    summary="TensorRT engine for the target (readiness checks, exact settings, trtexec script; built where TensorRT + the GPU are)",
    run="edgekit.engine.stage:run_build_engine",
    requires=(BUNDLE,),
    produces=BUNDLE,
    uses=("target",),  # context length etc. come with the bundle (an input)
    host="edgekit.engine.builder:build_host",  # planned on a CPU box != built on the target's GPU
)
