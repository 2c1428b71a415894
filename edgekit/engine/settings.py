"""The exact TensorRT build settings for one bundle and one target, as data (no TensorRT here).

Everything a TensorRT build depends on is decided here, once: which ONNX graph, the
optimization profiles (prefill and decode), typing, workspace, optimization level, timing
cache, compatibility flags. The Python-API builder (:mod:`edgekit.engine.builder`), the
``trtexec`` script (:mod:`edgekit.engine.trtexec`) and ONNX Runtime's TensorRT execution
provider (:mod:`edgekit.engine.ort_providers`) all render the same :class:`BuildSettings`,
so an engine built on a Jetson with only JetPack matches one built through the Python API.

Profiles of an optimum-exported decoder (inputs ``input_ids``, ``attention_mask``,
``position_ids``, ``past_key_values.N.key/value``; symbolic dims ``batch_size``,
``sequence_length``, ``past_sequence_length`` and ``past_sequence_length + sequence_length``):

* ``prefill``: batch 1..B, prompt 1..S tokens, no past (an empty KV input: TensorRT supports
  zero-length dimensions);
* ``decode``: batch 1..B, one token, past 1..context-1.

Two profiles instead of one range: TensorRT tunes kernels at the profile's *opt* shape, and
the per-token decode step (sequence 1) is the latency that matters on the device.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgekit.engine.options import BuildOptions
from edgekit.errors import EngineError

GIB = 1024**3
ENGINE_DIR = "engine"
BUILD_SCRIPT = "build_engine.sh"
SETTINGS_FORMAT = "edgekit.engine-settings/1"

# The symbolic dims optimum-onnx writes for text-generation-with-past.
BATCH, SEQUENCE, PAST = "batch_size", "sequence_length", "past_sequence_length"
TOTAL = "past_sequence_length + sequence_length"
_ONNX_FLOAT_TYPES = {1: "float32", 10: "float16", 16: "bfloat16"}

Shape = tuple[int, ...]


@dataclass(frozen=True)
class InputSpec:
    """One graph input: name, element type and dims (an int, or a symbolic name)."""

    name: str
    dtype: str
    dims: tuple[int | str, ...]


@dataclass(frozen=True)
class Profile:
    name: str
    #: input name -> (min, opt, max) full shapes
    shapes: dict[str, tuple[Shape, Shape, Shape]]


@dataclass(frozen=True)
class GraphInfo:
    """What the settings need to know about the ONNX graph (read by :func:`read_graph`)."""

    inputs: tuple[InputSpec, ...]
    opset: int
    #: "int4_weight_only", "int8_weight_only", "fp8", or None for a float graph
    quantization: str | None
    #: the element type the graph computes in (its float inputs' type)
    float_dtype: str


@dataclass(frozen=True)
class BuildSettings:
    """Everything a TensorRT build of this bundle for this target depends on."""

    target: str
    compute_capability: str
    tensorrt_version: str  # what the target profile plans against (the builder records the real one)
    onnx: str  # graph path relative to the bundle root
    graph: dict[str, Any]  # opset, quantization, float dtype of the graph
    context_length: int
    max_batch: int
    max_prefill: int
    profiles: tuple[Profile, ...]
    #: True: the graph's types are the engine's types (Q/DQ graphs; the only mode in TensorRT 11).
    #: False: TensorRT 10 "weak" typing with the FP16 flag (float graphs built in half precision).
    strongly_typed: bool
    fp16: bool
    workspace_bytes: int
    optimization_level: int
    hardware_compatibility: str
    version_compatible: bool
    timing_cache: str | None  # path relative to the bundle root ("../x" = beside the bundle)
    engine: str  # engine/<target>.plan
    layer_info: str
    build_log: str
    record: str
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["format"] = SETTINGS_FORMAT
        data["profiles"] = [
            {"name": p.name, "shapes": {k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])} for k, v in p.shapes.items()}}
            for p in self.profiles
        ]
        data["notes"] = list(self.notes)
        return data

    @property
    def tensorrt_major(self) -> int:
        return int(self.tensorrt_version.split(".")[0])


def engine_paths(target: str, bundle_name: str) -> dict[str, str]:
    """Where a target's engine files live, relative to the bundle root. Both names become
    file names: checked here (a manifest or a CLI option may have supplied them)."""
    from edgekit.errors import EngineError
    from edgekit.names import check_name

    check_name(target, what="target name", error_cls=EngineError)
    check_name(bundle_name, what="bundle name", error_cls=EngineError, where="manifest.json: name")
    return {
        "engine": f"{ENGINE_DIR}/{target}.plan",
        "layer_info": f"{ENGINE_DIR}/{target}.layers.json",
        "build_log": f"{ENGINE_DIR}/{target}.build.log",
        "record": f"{ENGINE_DIR}/{target}.engine.json",
        "settings": f"{ENGINE_DIR}/{target}.settings.json",
        "script": f"{ENGINE_DIR}/{target}.trtexec.sh",
        # Beside the bundle, not in it: kept across bundle versions, so a rebuild reuses the
        # kernels timed before (a timing cache only speeds up builds; it never changes results).
        "timing_cache": f"../{bundle_name}.{target}.timing.cache",
    }


def read_graph(onnx_path: Path) -> GraphInfo:
    """Inputs, opset and quantization of an ONNX graph, without loading its weights."""
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # onnx raises several types for a damaged file
        raise EngineError(
            f"cannot read the ONNX graph: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
            where=str(onnx_path),
            how="point at an exported model.onnx (edgekit compress writes one into the bundle)",
        ) from None
    initializers = {i.name for i in model.graph.initializer}
    inputs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dims = tuple(d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else "?") for d in tensor.shape.dim)
        inputs.append(InputSpec(value.name, onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name, dims))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    float_inputs = [v.type.tensor_type.elem_type for v in model.graph.input if v.type.tensor_type.elem_type in _ONNX_FLOAT_TYPES]
    float_dtype = _ONNX_FLOAT_TYPES[float_inputs[0]] if float_inputs else "float32"
    return GraphInfo(tuple(inputs), opset, _quantization(model, initializers), float_dtype)


def _quantization(model: Any, initializers: set[str]) -> str | None:
    import onnx

    types = {i.name: i.data_type for i in model.graph.initializer}
    found = set()
    for node in model.graph.node:
        if node.op_type not in ("DequantizeLinear", "QuantizeLinear"):
            continue
        dtype = types.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if node.op_type == "QuantizeLinear" and len(node.input) > 2:
            dtype = types.get(node.input[2])
        if dtype in (onnx.TensorProto.FLOAT8E4M3FN,):
            found.add("fp8")
        elif dtype in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
            found.add("int4_weight_only")
        elif dtype in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
            found.add("int8_weight_only" if node.input[0] in initializers else "int8")
    for name in ("fp8", "int4_weight_only", "int8", "int8_weight_only"):
        if name in found:
            return name
    return None


def _dim(dim: int | str, input_name: str, axis: int, ranges: dict[str, tuple[int, int, int]]) -> tuple[int, int, int]:
    if isinstance(dim, int) and dim > 0:
        return dim, dim, dim
    if isinstance(dim, str) and dim in ranges:
        return ranges[dim]
    if isinstance(dim, str):
        # optimum writes sums of dims as one symbolic name: "a + b"
        parts = [p.strip() for p in dim.split("+")]
        if len(parts) > 1 and all(p in ranges for p in parts):
            lo, opt, hi = (sum(ranges[p][i] for p in parts) for i in range(3))
            return lo, opt, hi
    raise EngineError(
        f"input '{input_name}' has a dynamic dimension {axis} ({dim!r}) that edgekit cannot size",
        where=f"ONNX input {input_name}",
        how="export the decoder with edgekit's export_onnx stage (optimum's text-generation-with-past dims: "
        "batch_size, sequence_length, past_sequence_length)",
    )


def make_profiles(inputs: tuple[InputSpec, ...], *, context_length: int, max_batch: int, max_prefill: int,
                  opt_prefill: int | None = None) -> tuple[Profile, ...]:
    """Prefill and decode profiles for every input of an optimum-exported decoder."""
    if max_prefill > context_length:
        raise EngineError(
            f"max_prefill {max_prefill} exceeds the context length {context_length}",
            where="build_engine.max_prefill",
            how=f"set max_prefill to at most {context_length} (or raise the recipe's context_length)",
        )
    if context_length < 2:
        raise EngineError("context_length must be at least 2 for a decode profile", where="context_length",
                          how="raise the recipe's context_length")
    opt_prefill = min(opt_prefill or 128, max_prefill)
    half = max(1, context_length // 2)
    regimes = {
        # name: {dim: (min, opt, max)}
        "prefill": {BATCH: (1, 1, max_batch), SEQUENCE: (1, opt_prefill, max_prefill), PAST: (0, 0, 0)},
        "decode": {BATCH: (1, 1, max_batch), SEQUENCE: (1, 1, 1), PAST: (1, half, context_length - 1)},
    }
    profiles = []
    for name, ranges in regimes.items():
        shapes = {}
        for spec in inputs:
            per_axis = [_dim(d, spec.name, axis, ranges) for axis, d in enumerate(spec.dims)]
            shapes[spec.name] = tuple(tuple(axis[i] for axis in per_axis) for i in range(3))
        profiles.append(Profile(name, shapes))
    return tuple(profiles)


def resolve_typing(options: BuildOptions, graph: GraphInfo, tensorrt_major: int) -> tuple[bool, bool, list[str]]:
    """(strongly_typed, fp16 flag, notes) for this graph and TensorRT major version."""
    notes = []
    if tensorrt_major >= 11:
        # TensorRT 11 removed weak typing and every precision flag: the graph's types rule.
        if options.typing == "weak":
            raise EngineError(
                "typing 'weak' does not exist in TensorRT 11 (every network is strongly typed)",
                where="build_engine.typing",
                how="use typing: auto or strong; convert the ONNX to fp16 first (ModelOpt AutoCast) for half precision",
            )
        strong, fp16 = True, False
    elif options.typing == "strong" or (options.typing == "auto" and graph.quantization is not None):
        # Q/DQ graphs: the quantized types are explicit, so strong typing keeps exactly them.
        strong, fp16 = True, False
    else:
        strong, fp16 = False, True
    if strong and graph.float_dtype == "float32":
        notes.append(
            "strongly typed build of a float32 graph: non-quantized layers and activations run in fp32 "
            "(export it with export_onnx tensorrt_dtype: auto/float16/bfloat16, or convert it to fp16 with ModelOpt "
            "AutoCast, for half-precision activations)"
        )
    return strong, fp16, notes


def build_settings(graph: GraphInfo, *, onnx_rel: str, target: Any, bundle_name: str, context_length: int,
                   options: BuildOptions, tensorrt_version: str | None = None, strict: bool = True) -> BuildSettings:
    """The build settings for ``target`` (a :class:`edgekit.targets.Target`). ``strict=False``
    (``edgekit check``) leaves graph/target mismatches to the readiness findings."""
    version = tensorrt_version or target.software.tensorrt
    major = int(version.split(".")[0])
    if options.hardware_compatibility != "none" and target.kind == "jetson":
        raise EngineError(
            f"hardware_compatibility {options.hardware_compatibility} is not available on Jetson ({target.name})",
            where="build_engine.hardware_compatibility",
            how="set hardware_compatibility: none (Jetson engines are built on the device they run on)",
        )
    if options.hardware_compatibility == "ampere_plus" and target.compute_capability_tuple < (8, 0):
        raise EngineError(
            f"hardware_compatibility ampere_plus needs compute capability >= 8.0, {target.name} has {target.compute_capability}",
            where="build_engine.hardware_compatibility", how="set hardware_compatibility: none",
        )
    if strict and graph.quantization == "fp8" and target.compute_capability_tuple < (8, 9):
        raise EngineError(
            f"the graph is FP8 but {target.name} has compute capability {target.compute_capability} (FP8 needs >= 8.9)",
            where=onnx_rel, how="quantize with gptq (INT4/INT8 weight-only) for this target",
        )
    strong, fp16, notes = resolve_typing(options, graph, major)
    paths = engine_paths(target.name, bundle_name)
    profiles = make_profiles(graph.inputs, context_length=context_length, max_batch=options.max_batch,
                             max_prefill=options.max_prefill, opt_prefill=options.opt_prefill)
    return BuildSettings(
        target=target.name,
        compute_capability=target.compute_capability,
        tensorrt_version=version,
        onnx=onnx_rel,
        graph={"opset": graph.opset, "quantization": graph.quantization, "float_dtype": graph.float_dtype},
        context_length=context_length,
        max_batch=options.max_batch,
        max_prefill=options.max_prefill,
        profiles=profiles,
        strongly_typed=strong,
        fp16=fp16,
        workspace_bytes=int(options.workspace_gb * GIB),
        optimization_level=options.optimization_level,
        hardware_compatibility=options.hardware_compatibility,
        version_compatible=options.version_compatible,
        timing_cache=paths["timing_cache"] if options.timing_cache else None,
        engine=paths["engine"],
        layer_info=paths["layer_info"],
        build_log=paths["build_log"],
        record=paths["record"],
        notes=tuple(notes),
    )


def shape_string(shape: Shape) -> str:
    return "x".join(str(d) for d in shape)


def load_settings(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def check_input_names(settings: BuildSettings) -> None:
    """trtexec's shape flags are ``name:AxBxC`` lists separated by commas: names with ',' or ':'
    would be misread, and the script quotes nothing else."""
    for profile in settings.profiles:
        for name in profile.shapes:
            if not _SAFE_NAME.match(name):
                raise EngineError(
                    f"input name {name!r} cannot be written in a trtexec shape flag",
                    where=settings.onnx,
                    how="rename the graph input to letters, digits, '_', '.', '-' (optimum's names are)",
                )
