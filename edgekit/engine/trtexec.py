"""The ``trtexec`` command line equivalent to a :class:`BuildSettings`, as a shell script.

On a Jetson the engine must be built on the device (an engine only runs on the GPU and
TensorRT version it was built with), and a device may have JetPack's ``trtexec`` but no
Python TensorRT bindings or edgekit. The bundle therefore carries, per target,
``engine/<target>.trtexec.sh`` and a top-level ``build_engine.sh`` that runs it: same
graph, profiles, typing, workspace, optimization level, timing cache and compatibility
flags as the Python builder, output written to a temporary name and renamed when
complete, build log and layer information next to the engine, and a small JSON record of
the TensorRT version and GPU it was built with (what ``edgekit`` checks before loading).

Flags (trtexec of TensorRT 10.x; 11.x dropped the precision flags and made ``--stronglyTyped``
a no-op because every network is strongly typed there): ``--profile=N`` followed directly by
that profile's ``--minShapes/--optShapes/--maxShapes`` (the multi-profile syntax trtexec has
had since 10.0; see ``getOptimizationProfiles`` in TensorRT's samples/common/sampleOptions.cpp),
``--memPoolSize=workspace:<MiB>M``,
``--builderOptimizationLevel``, ``--timingCacheFile``, ``--hardwareCompatibilityLevel``,
``--versionCompatible``, ``--profilingVerbosity=detailed``, ``--exportLayerInfo``,
``--skipInference``.
"""

from __future__ import annotations

import shlex

from edgekit.engine.settings import BUILD_SCRIPT, BuildSettings, check_input_names, shape_string

_HWCOMPAT = {"ampere_plus": "ampere+", "same_compute_capability": "sameComputeCapability"}


def trtexec_args(settings: BuildSettings, *, engine_path: str, major: int | None = None) -> list[str]:
    """trtexec's arguments (paths relative to the bundle root) for TensorRT ``major`` (default:
    the target's planned version)."""
    check_input_names(settings)
    major = major or settings.tensorrt_major
    args = [f"--onnx={settings.onnx}", f"--saveEngine={engine_path}"]
    for number, profile in enumerate(settings.profiles):
        if len(settings.profiles) > 1:
            # trtexec >= 10.0: each profile is "--profile=N" followed directly by its three
            # shape flags; repeated shape flags without --profile are refused.
            args.append(f"--profile={number}")
        for flag, index in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
            args.append(f"{flag}=" + ",".join(f"{name}:{shape_string(shapes[index])}" for name, shapes in profile.shapes.items()))
    if major < 11:
        if settings.strongly_typed:
            args.append("--stronglyTyped")
        elif settings.fp16:
            args.append("--fp16")
    args.append(f"--memPoolSize=workspace:{max(1, settings.workspace_bytes // (1024 * 1024))}M")
    args.append(f"--builderOptimizationLevel={settings.optimization_level}")
    if settings.timing_cache:
        args.append(f"--timingCacheFile={settings.timing_cache}")
    if settings.hardware_compatibility != "none":
        args.append(f"--hardwareCompatibilityLevel={_HWCOMPAT[settings.hardware_compatibility]}")
    if settings.version_compatible:
        args.append("--versionCompatible")
    args += ["--profilingVerbosity=detailed", f"--exportLayerInfo={settings.layer_info}", "--skipInference"]
    return args


def render_script(settings: BuildSettings) -> str:
    """``engine/<target>.trtexec.sh``: run from anywhere; works relative to the bundle root."""
    tmp_engine = settings.engine + ".partial"
    args = trtexec_args(settings, engine_path=tmp_engine)
    arg_lines = " \\\n    ".join(shlex.quote(a) for a in args)
    expected = settings.tensorrt_version
    return f"""#!/usr/bin/env bash
# Build the TensorRT engine for target {settings.target} with trtexec (JetPack's, or any TensorRT
# {expected}.x install). Written by edgekit from {settings.record.replace('.engine.json', '.settings.json')};
# the same settings as `edgekit build-engine BUNDLE --target {settings.target}`.
# An engine only runs on the TensorRT version and GPU it was built with: run this on the device.
set -euo pipefail
cd "$(dirname "$0")/.."          # the bundle root
TRTEXEC="${{TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}}"
if [ ! -x "$TRTEXEC" ]; then
    echo "error: trtexec not found (install TensorRT, or on Jetson: sudo apt install nvidia-jetpack). To resolve, set TRTEXEC=/path/to/trtexec." >&2
    exit 2
fi
mkdir -p engine
rm -f {shlex.quote(tmp_engine)}
echo "building {settings.engine} (log: {settings.build_log}); this takes minutes"
if ! "$TRTEXEC" \\
    {arg_lines} \\
    > {shlex.quote(settings.build_log)} 2>&1; then
    tail -n 20 {shlex.quote(settings.build_log)} >&2
    echo "error: trtexec failed ({settings.build_log}). To resolve, read the log; 'edgekit check' names unsupported nodes." >&2
    rm -f {shlex.quote(tmp_engine)}
    exit 1
fi
# What edgekit checks before loading the engine: TensorRT version and GPU, from trtexec's log.
VERSION=$(sed -n 's/.*TensorRT version: *\\([0-9.]*\\).*/\\1/p' {shlex.quote(settings.build_log)} | head -n1)
if [ -z "$VERSION" ]; then  # "[TensorRT v100300]" = 10.3.0
    VNUM=$(sed -n 's/.*\\[TensorRT v\\([0-9]*\\)\\].*/\\1/p' {shlex.quote(settings.build_log)} | head -n1)
    [ -z "$VNUM" ] || VERSION="$((VNUM / 10000)).$((VNUM / 100 % 100)).$((VNUM % 100))"
fi
DEVICE=$(sed -n 's/.*Selected Device: *\\(.*\\)$/\\1/p' {shlex.quote(settings.build_log)} | head -n1)
CC=$(sed -n 's/.*Compute Capability: *\\([0-9.]*\\).*/\\1/p' {shlex.quote(settings.build_log)} | head -n1)
SHA=$(sha256sum {shlex.quote(tmp_engine)} | cut -d' ' -f1)
cat > {shlex.quote(settings.record)}.partial <<JSON
{{"format": "edgekit.engine/1", "built_with": "trtexec", "target": "{settings.target}",
 "tensorrt_version": "$VERSION", "device": "$DEVICE", "compute_capability": "$CC",
 "engine": "{settings.engine}", "sha256": "$SHA",
 "hardware_compatibility": "{settings.hardware_compatibility}", "version_compatible": {str(settings.version_compatible).lower()},
 "settings": "{settings.record.replace('.engine.json', '.settings.json')}"}}
JSON
mv {shlex.quote(tmp_engine)} {shlex.quote(settings.engine)}
mv {shlex.quote(settings.record)}.partial {shlex.quote(settings.record)}
echo "wrote {settings.engine} (TensorRT $VERSION, $DEVICE, compute capability $CC)"
"""


def render_dispatch_script(default_target: str) -> str:
    """The bundle's top-level ``build_engine.sh [TARGET]``."""
    return f"""#!/usr/bin/env bash
# Build this bundle's TensorRT engine on the device: ./{BUILD_SCRIPT} [TARGET] (default {default_target}).
# Each target's exact trtexec command line is in engine/<target>.trtexec.sh.
set -euo pipefail
TARGET="${{1:-{default_target}}}"
SCRIPT="$(dirname "$0")/engine/$TARGET.trtexec.sh"
if [ ! -f "$SCRIPT" ]; then
    echo "error: no build script for target $TARGET ($SCRIPT). To resolve, run: edgekit build-engine <bundle> --target $TARGET --build never" >&2
    exit 2
fi
exec bash "$SCRIPT"
"""
