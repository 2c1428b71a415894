"""Static TensorRT readiness checks of an exported ONNX graph (``edgekit check``); runs anywhere.

Before anyone spends an hour building an engine on a device, :func:`check_onnx` reads the
graph's metadata (never its weights) and reports what would stop or hurt a TensorRT build
for a target:

* ``opset``: the graph's opset against the newest one the target's TensorRT parser documents
  (operators whose definition changed after it), and the minimum Q/DQ needs;
* ``unsupported-op`` / ``ort-only-op`` / ``op-type``: operators the parser does not import at
  that version, ONNX Runtime contrib operators (``MatMulNBits``), documented element types;
* ``dynamic-axis-without-profile`` / ``profile``: every dynamic input covered by every
  optimization profile, with consistent ranges;
* ``int4-not-weight-only`` / ``int4-consumer`` / ``block-size`` / ``zero-point`` /
  ``qdq-dtype`` / ``qdq-scale`` / ``precision`` / ``fp8-needs-sm89`` / ``fp4-needs-sm100``:
  the Q/DQ patterns TensorRT fuses (INT4 only as block-quantized weights of a MatMul/Gemm,
  symmetric, supported types and block sizes, FP8 only on compute capability >= 8.9);
* ``external-data``: the weight files are inside the model's directory and complete;
* ``engine-memory``: weights + I/O buffers (KV cache, logits) + workspace + a runtime allowance
  against the target's usable memory;
* ``fp32-activations`` / ``half-precision`` / ``quantization``: information about typing (the
  graph's real float types: KV cache, logits, initializers) and the Q/DQ found.

Findings are data (:class:`Finding`); only an unreadable input raises
:class:`~edgekit.errors.EngineError`. What the parser supports per version lives in
:mod:`edgekit.engine.trt_onnx_support`.
"""

from __future__ import annotations

import functools
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from edgekit.engine import trt_onnx_support as support_data
from edgekit.errors import EngineError
from edgekit.onnx_index import GraphIndex

__all__ = [
    "Finding",
    "RUNTIME_ALLOWANCE_GB",
    "check_bundle",
    "check_onnx",
    "default_profiles",
]

Severity = Literal["error", "warning", "info"]
Shape = tuple[int, ...]
ProfileShapes = dict[str, tuple[Shape, Shape, Shape]]

# One memory model (edgekit.sizing): decimal GB as target profiles state memory, GiB only for
# TensorRT's workspace pool limit; RUNTIME_ALLOWANCE_GB is the execution context's own
# allocations beyond weights, I/O buffers and workspace (the targets' usable_gb already
# excludes the CUDA context and the OS), the same allowance plan and recipe validation use.
from edgekit.sizing import GB, GIB, RUNTIME_ALLOWANCE_GB  # noqa: E402

#: protobuf refuses messages of 2 GiB or more: bigger models must keep weights in external data
PROTOBUF_LIMIT = 2**31
#: warn when the estimate passes this fraction of the target's usable memory
MEMORY_WARNING_FRACTION = 0.9

_DEFAULT_DOMAINS = ("", "ai.onnx")
_MS_DOMAIN = "com.microsoft"
_TRT_DOMAIN = "trt"
# The symbolic dims optimum-onnx writes for text-generation-with-past.
BATCH, SEQUENCE, PAST = "batch_size", "sequence_length", "past_sequence_length"
#: ops a dequantized weight may pass through on its way to the MatMul/Gemm that consumes it
_WEIGHT_PASS_THROUGH = frozenset({"Transpose", "Reshape", "Cast", "Identity", "Squeeze", "Unsqueeze", "Flatten"})
_WEIGHT_CONSUMERS = frozenset({"MatMul", "Gemm"})
_SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}


@dataclass(frozen=True)
class Finding:
    """One readiness result: what is wrong (or worth knowing) and how to fix it."""

    severity: Severity
    #: stable id: "unsupported-op", "opset", "dynamic-axis-without-profile", "fp8-needs-sm89", ...
    code: str
    #: names the node (name + op type), input or file
    message: str
    #: how to fix it, one sentence
    fix: str
    node: str | None = None


# =========================================================================== public API


def check_bundle(
    bundle_dir: Any,
    *,
    target: Any,
    profiles: Any = None,
    max_batch: int = 1,
    workspace_gb: float = 0.0,
    context_length: int | None = None,
) -> dict[str, Any]:
    """Check a bundle's TensorRT graph for ``target`` (a :class:`~edgekit.targets.Target` or a
    target name).

    The graph is the manifest's ``onnx.variants["tensorrt"]``, else ``["float"]``; a bundle with
    only an ONNX Runtime graph is checked as it is, so its ``MatMulNBits`` show up as
    ``ort-only-op`` errors. ``context_length`` defaults to the manifest's."""
    from edgekit.bundle.manifest import Bundle

    bundle = Bundle.open(bundle_dir, error_cls=EngineError)
    bundle_dir, manifest_path = bundle.dir, bundle.manifest_path
    target = _resolve_target(target)
    # tensorrt, else float; a bundle with only an ONNX Runtime graph: that graph, checked as it
    # is (its contrib ops reported); no variants: the primary graph
    variant, _ = bundle.graph_variant("check", error_cls=EngineError)
    model_path = bundle.graph("check", error_cls=EngineError)
    rel = model_path.relative_to(bundle_dir).as_posix()
    if context_length is None:
        context_length = bundle.context_length
    if not isinstance(context_length, int) or context_length < 2:
        raise EngineError(
            f"no usable context_length for the readiness check (manifest says {context_length!r})",
            where=str(manifest_path),
            how="pass --context-length or rebuild the bundle from a recipe with context_length",
        )
    findings = check_onnx(
        model_path,
        target=target,
        profiles=profiles,
        context_length=context_length,
        max_batch=max_batch,
        workspace_gb=workspace_gb,
    )
    counts = Counter(finding.severity for finding in findings)
    return {
        "bundle": str(bundle_dir),
        "onnx": Path(rel).as_posix(),
        "variant": variant,
        "target": target.name,
        "tensorrt": target.software.tensorrt,
        "findings": [asdict(finding) for finding in findings],
        "errors": counts["error"],
        "warnings": counts["warning"],
        "infos": counts["info"],
        "passed": counts["error"] == 0,
    }


def check_onnx(
    model_path: Path,
    *,
    target: Any,
    profiles: Any,
    context_length: int,
    max_batch: int = 1,
    workspace_gb: float = 0.0,
) -> list[Finding]:
    """Every readiness finding for ``model_path`` on ``target``, errors first.

    ``profiles`` maps profile name -> input name -> (min, opt, max) full shapes (or is a
    sequence of objects with ``.name`` and ``.shapes``, as :mod:`edgekit.engine.settings`
    builds them); None falls back to :func:`default_profiles` (prefill up to
    min(512, context_length) tokens). Only the graph's metadata is read: external weight files
    are checked by size, never loaded (zero points, a few bytes each, are the exception)."""
    model_path = Path(model_path)
    target = _resolve_target(target)
    if context_length < 2:
        raise EngineError(f"context_length {context_length} is too small to check", where="context_length",
                          how="use the recipe's context_length (at least 2: a prompt token and a generated one)")
    try:
        support = support_data.parser_support(target.software.tensorrt)
    except ValueError as exc:
        raise EngineError(
            str(exc), where=f"target {target.name}", how="plan for TensorRT 10.0 or newer (software.tensorrt)"
        ) from None
    if not model_path.is_file():
        raise EngineError(
            "ONNX model not found",
            where=str(model_path),
            how="export the model first (edgekit compress writes model.onnx, and tensorrt/model.onnx with "
            "export_onnx format: tensorrt or both)",
        )
    if model_path.stat().st_size >= PROTOBUF_LIMIT:
        # Nothing else can be read: protobuf (and TensorRT's parser) refuse the file outright.
        return [
            Finding(
                "error",
                "external-data",
                f"{model_path.name} is {model_path.stat().st_size / GB:.2f} GB with its weights inside: protobuf "
                "cannot parse a model of 2 GiB or more",
                "save the weights as external data (onnx.save_model(..., save_as_external_data=True, "
                "all_tensors_to_one_file=True)); edgekit's export_onnx does this",
            )
        ]
    graph = _Graph(_load(model_path), model_path)
    max_prefill = min(512, context_length)
    if profiles is None:
        normalized = _default_profiles_for(graph.inputs, context_length=context_length, max_batch=max_batch,
                                           max_prefill=max_prefill)
        profile_findings: list[Finding] = []
    else:
        normalized, profile_findings = _normalize_profiles(profiles)
    quant = _Quantization()
    findings = [
        *_check_opset(graph, support),
        *_check_operators(graph, support),
        *_check_operator_types(graph, support),
        *profile_findings,
        *_check_profiles(graph, normalized, context_length),
        *_check_quantization(graph, support, target, quant),
        *_check_external_data(graph),
        *_check_memory(graph, support, target, normalized, quant, context_length=context_length,
                       max_batch=max_batch, workspace_gb=workspace_gb),
        *_typing_notes(graph, support, quant),
    ]
    return sorted(findings, key=lambda f: _SEVERITY_ORDER[f.severity])


def default_profiles(model_path: Path, *, context_length: int, max_batch: int, max_prefill: int) -> dict[str, ProfileShapes]:
    """Fallback optimization profiles for an optimum-exported decoder (the build settings
    provide the real ones): ``prefill`` (batch 1..B, sequence 1..S, no past) and ``decode``
    (sequence 1, past 1..context-1). Inputs with dynamic dims other than optimum's are left
    out, so the readiness check reports them."""
    if context_length < 2:
        raise EngineError("context_length must be at least 2 for a decode profile", where="context_length",
                          how="raise the recipe's context_length")
    if not 1 <= max_prefill <= context_length or max_batch < 1:
        raise EngineError(
            f"max_prefill {max_prefill} / max_batch {max_batch} do not fit the context length {context_length}",
            where="build_engine", how=f"use 1 <= max_prefill <= {context_length} and max_batch >= 1",
        )
    graph = _Graph(_load(Path(model_path)), Path(model_path))
    return _default_profiles_for(graph.inputs, context_length=context_length, max_batch=max_batch,
                                 max_prefill=max_prefill)


# =========================================================================== graph access


@dataclass(frozen=True)
class _Input:
    name: str
    elem_type: int
    #: int (static), str (symbolic name or "a + b" expression) or None (unknown) per axis
    dims: tuple[int | str | None, ...]

    @property
    def dynamic(self) -> bool:
        return any(not isinstance(d, int) or d <= 0 for d in self.dims)


class _Graph(GraphIndex):
    """Name indexes over a ModelProto loaded without its external data."""

    def __init__(self, model: Any, path: Path):
        import onnx

        super().__init__(model)
        self.path = path
        self.opsets = {o.domain or "": o.version for o in model.opset_import}
        self.opset = next((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), 0)
        self.constants: dict[str, Any] = {}  # Constant node output -> its tensor
        for node in self.graph.node:
            if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS:
                value = next((a.t for a in node.attribute if a.name == "value" and a.HasField("t")), None)
                if value is not None:
                    self.constants[node.output[0]] = value
        self.graph_outputs = {o.name for o in self.graph.output}
        self.inputs = tuple(
            _Input(v.name, v.type.tensor_type.elem_type, _dims(v)) for v in self.graph.input if v.name not in self.inits
        )
        self.outputs = tuple(_Input(v.name, v.type.tensor_type.elem_type, _dims(v)) for v in self.graph.output)
        # Element types of every tensor: ONNX shape inference over the metadata (~50 ms for a
        # 7,400-node decoder; it never needs the weights' values).
        self.types: dict[str, int] = {}
        self.shapes: dict[str, tuple[int | str | None, ...]] = {}
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=False)
            for value in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
                if value.type.HasField("tensor_type"):
                    self.types[value.name] = value.type.tensor_type.elem_type
                    self.shapes[value.name] = _dims(value)
        except Exception:  # inference is a help for type checks, never a requirement
            pass
        for name, tensor in list(self.inits.items()) + list(self.constants.items()):
            self.types[name] = tensor.data_type
            self.shapes[name] = tuple(int(d) for d in tensor.dims)
        self.local_functions = {(f.domain, f.name) for f in model.functions}

    def nodes(self) -> Iterator[Any]:
        """Every node, including those of If/Loop/Scan bodies and local functions."""
        stack = [self.graph]
        while stack:
            graph = stack.pop()
            for node in graph.node:
                yield node
                for attr in node.attribute:
                    if attr.HasField("g"):
                        stack.append(attr.g)
                    stack.extend(attr.graphs)
        for function in self.model.functions:
            yield from function.node

    def constant_tensor(self, name: str) -> Any | None:
        """The build-time constant behind ``name`` (an initializer or a Constant node), if any."""
        tensor = self.inits.get(name)
        return tensor if tensor is not None else self.constants.get(name)


def _dims(value: Any) -> tuple[int | str | None, ...]:
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return ()
    out: list[int | str | None] = []
    for d in tensor.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.dim_param:
            out.append(d.dim_param)
        else:
            out.append(None)
    return tuple(out)


def _load(path: Path) -> Any:
    import onnx

    if not path.is_file():
        raise EngineError("ONNX model not found", where=str(path), how="export the model first (edgekit compress)")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises several types for a damaged file
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EngineError(
            f"cannot read the ONNX graph: {first}",
            where=str(path),
            how="re-export the model (edgekit compress writes model.onnx into the bundle)",
        ) from None


def _resolve_target(target: Any) -> Any:
    if isinstance(target, str):
        from edgekit.targets import load_target

        return load_target(target)
    return target


def _is_within(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def _label(node: Any) -> str:
    return f"{node.name or '<unnamed>'} ({node.op_type})"


class _Tally:
    """Groups repeated findings (one per op type or problem) into one line with a count, so a
    graph with 210 identical problems reports one finding naming the first node."""

    def __init__(self) -> None:
        self._groups: dict[tuple[str, str], list[Any]] = {}
        self._order: list[tuple[str, str]] = []

    def add(self, key: tuple[str, str], node: Any, *details: Any) -> None:
        if key not in self._groups:
            self._groups[key] = [node, 0, details]
            self._order.append(key)
        self._groups[key][1] += 1

    def items(self) -> Iterator[tuple[tuple[str, str], Any, int, tuple[Any, ...]]]:
        for key in self._order:
            node, count, details = self._groups[key]
            yield key, node, count, details


def _more(count: int, what: str = "node") -> str:
    """" (and 2 more nodes like it)" after the first of ``count`` grouped items."""
    return f" (and {count - 1} more {what}{'s' if count > 2 else ''} like it)" if count > 1 else ""


# =========================================================================== element types


def _type_name(elem_type: int) -> str:
    import onnx

    names = {
        onnx.TensorProto.FLOAT: "FP32",
        onnx.TensorProto.FLOAT16: "FP16",
        onnx.TensorProto.BFLOAT16: "BF16",
        onnx.TensorProto.FLOAT8E4M3FN: "FP8",
        getattr(onnx.TensorProto, "FLOAT4E2M1", -1): "FP4",
    }
    if elem_type in names:
        return names[elem_type]
    try:
        return onnx.TensorProto.DataType.Name(elem_type)
    except ValueError:
        return f"type {elem_type}"


def _bits(elem_type: int) -> int:
    import onnx

    tp = onnx.TensorProto
    four = {tp.INT4, tp.UINT4, getattr(tp, "FLOAT4E2M1", -1)}
    eight = {tp.INT8, tp.UINT8, tp.BOOL, tp.FLOAT8E4M3FN, tp.FLOAT8E4M3FNUZ, tp.FLOAT8E5M2, tp.FLOAT8E5M2FNUZ,
             getattr(tp, "FLOAT8E8M0", -1)}
    sixteen = {tp.FLOAT16, tp.BFLOAT16, tp.INT16, tp.UINT16}
    thirty_two = {tp.FLOAT, tp.INT32, tp.UINT32}
    sixty_four = {tp.DOUBLE, tp.INT64, tp.UINT64, tp.COMPLEX64}
    if elem_type in four:
        return 4
    if elem_type in eight:
        return 8
    if elem_type in sixteen:
        return 16
    if elem_type in thirty_two:
        return 32
    if elem_type in sixty_four:
        return 64
    if elem_type == tp.COMPLEX128:
        return 128
    return 0  # strings and unknown types: no fixed size


def _tensor_nbytes(tensor: Any) -> int:
    """Bytes of a tensor's values from its dims and type (4-bit types packed two per byte)."""
    numel = 1
    for d in tensor.dims:
        numel *= int(d)
    return (numel * _bits(tensor.data_type) + 7) // 8


def _shape_nbytes(shape: Iterable[int], elem_type: int) -> int:
    numel = 1
    for d in shape:
        numel *= max(int(d), 0)
    return (numel * _bits(elem_type) + 7) // 8


# =========================================================================== opset


@functools.lru_cache(maxsize=1)
def _all_revisions() -> dict[str, tuple[int, ...]]:
    """Default-domain operator -> the opsets in which its definition changed (onnx.defs)."""
    import onnx.defs

    revisions: dict[str, list[int]] = {}
    for schema in onnx.defs.get_all_schemas_with_history():
        if schema.domain == "":
            revisions.setdefault(schema.name, []).append(schema.since_version)
    return {name: tuple(sorted(versions)) for name, versions in revisions.items()}


def _op_revisions(op_type: str) -> tuple[int, ...]:
    return _all_revisions().get(op_type, ())


def _check_opset(g: _Graph, support: support_data.ParserSupport) -> list[Finding]:
    import onnx.defs

    trt = f"TensorRT {support.version}"
    if g.opset == 0:
        return [Finding("error", "opset", f"{g.path.name} imports no default-domain ONNX opset",
                        "re-export the model with a standard ONNX opset (export_onnx opset: 18 or 21)")]
    if g.opset < 9:
        return [Finding("error", "opset", f"{g.path.name} uses opset {g.opset}; {trt}'s parser supports opset 9 and newer",
                        "re-export at opset 18 or newer (export_onnx opset)")]
    findings: list[Finding] = []
    newest = onnx.defs.onnx_opset_version()
    if g.opset > newest:
        findings.append(Finding("warning", "opset", f"{g.path.name} uses opset {g.opset}, newer than this onnx package "
                                f"knows ({newest}): operator revisions cannot be compared",
                                "upgrade the onnx package, or re-export at an opset it knows"))
        return findings
    documented = support.max_opset
    if g.opset <= documented:
        return findings
    bound = "" if support.opset_verified else (
        f" (its own operator table was not available: {documented} is what TensorRT "
        f"{support.opset_documented_by}'s documents, a lower bound)"
    )
    first_node: dict[str, Any] = {}
    counts: Counter[str] = Counter()
    for node in g.nodes():
        if node.domain in _DEFAULT_DOMAINS:
            first_node.setdefault(node.op_type, node)
            counts[node.op_type] += 1
    changed_ok: list[str] = []
    for op_type in sorted(first_node):
        history = _op_revisions(op_type)
        revisions = [r for r in history if documented < r <= g.opset]
        if not revisions or not any(r <= documented for r in history):
            continue  # unchanged since the documented opset, or a new operator (reported as unsupported-op)
        breaking = [r for r in revisions if not support_data.revision_is_compatible(op_type, r, support)]
        node = first_node[op_type]
        if breaking:
            newer = support_data.first_version_handling(op_type, breaking[-1])
            upgrade = f"build with TensorRT {newer} or newer (it imports {op_type}-{breaking[-1]}), or " if newer else ""
            # block-quantized INT4 needs opset 21, so a lower opset is no way out for such graphs
            lower = (f"re-export at opset {documented} (export_onnx opset: {documented})"
                     if not _has_int4(g) else f"convert {op_type} to its opset-{documented} form with onnx.version_converter")
            findings.append(Finding(
                "error",
                "opset",
                f"node {_label(node)}{_more(counts[op_type])} uses {op_type}-{breaking[-1]} (graph opset {g.opset}); "
                f"{trt}'s parser documents opsets up to {documented}{bound}, and {op_type} changed meaning in "
                f"opset {', '.join(map(str, breaking))}",
                f"{upgrade}{lower}",
                node.name,
            ))
        else:
            changed_ok.append(f"{op_type}-{revisions[-1]}")
    if changed_ok:
        findings.append(Finding(
            "info",
            "opset",
            f"graph opset {g.opset} is newer than {documented}, the newest {trt}'s parser documents{bound}; the parser "
            f"picks importers by operator name and does not refuse newer opsets, and the operators that changed "
            f"after opset {documented} changed only in ways it reads: {', '.join(changed_ok)} (added element types, "
            "or Q/DQ block quantization, which it infers from the scale's shape since TensorRT 10.0)",
            "none needed",
        ))
    return findings


def _has_int4(g: _Graph) -> bool:
    import onnx

    return any(t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) for t in g.inits.values())


# =========================================================================== operators


def _check_operators(g: _Graph, support: support_data.ParserSupport) -> list[Finding]:
    trt = f"TensorRT {support.version}"
    unsupported, ort_only, custom = _Tally(), _Tally(), _Tally()
    for node in g.nodes():
        domain = node.domain or ""
        if domain in _DEFAULT_DOMAINS:
            if not support.supports(node.op_type):
                unsupported.add(("", node.op_type), node)
        elif domain == _MS_DOMAIN:
            ort_only.add((domain, node.op_type), node)
        elif (domain, node.op_type) in g.local_functions:
            continue  # the parser imports model-local functions by expanding their bodies (checked as nodes)
        elif not (domain == _TRT_DOMAIN and node.op_type in support.custom_operators):
            custom.add((domain, node.op_type), node)
    findings = []
    for (_, op_type), node, count, _ in unsupported.items():
        since = support_data.first_version_supporting(op_type)
        later = since is not None and support_data.version_tuple(since) > support_data.version_tuple(support.version)
        findings.append(Finding(
            "error",
            "unsupported-op",
            f"node {_label(node)}{_more(count)}: {trt}'s ONNX parser has no importer for {op_type}"
            + (f" (TensorRT {since} added one)" if later else ""),
            (f"build with TensorRT {since} or newer, or " if later else "")
            + f"re-export without {op_type} (rewrite it with supported ONNX operators), or register a TensorRT "
            f"plugin named {op_type} (the parser falls back to a plugin of the same name)",
            node.name,
        ))
    for (domain, op_type), node, count, _ in ort_only.items():
        findings.append(Finding(
            "error",
            "ort-only-op",
            f"node {_label(node)}{_more(count)} is an ONNX Runtime contrib operator ({domain}); TensorRT's parser "
            "cannot import it",
            "use the tensorrt variant (export_onnx format: tensorrt or both)",
            node.name,
        ))
    for (domain, op_type), node, count, _ in custom.items():
        findings.append(Finding(
            "error",
            "unsupported-op",
            f"node {_label(node)}{_more(count)} is in the custom domain '{domain}', which {trt}'s parser only "
            "imports through a TensorRT plugin of the same name",
            f"re-export with standard ONNX operators, or provide a TensorRT plugin named {op_type}",
            node.name,
        ))
    return findings


#: ops whose documented types describe the tensor they produce, not their first input
_TYPED_BY_OUTPUT = frozenset({"Constant", "ConstantOfShape", "RandomNormal", "RandomUniform", "EyeLike"})
#: ops whose documented types describe a later input (Where's condition is always BOOL)
_TYPED_BY_INPUT = {"Where": 1}
#: checked by the quantization rules instead
_NOT_TYPE_CHECKED = frozenset({"DequantizeLinear", "QuantizeLinear"})


def _check_operator_types(g: _Graph, support: support_data.ParserSupport) -> list[Finding]:
    """Element types against the parser's documented "Supported Types" (a warning: the tables
    are documentation, so a mismatch is likely but not certain to fail)."""
    tally = _Tally()
    for node in g.graph.node:
        if node.domain not in _DEFAULT_DOMAINS or node.op_type in _NOT_TYPE_CHECKED:
            continue
        documented = support.operators.get(node.op_type)
        if not documented:
            continue
        if node.op_type in _TYPED_BY_OUTPUT:
            names = [node.output[0]] if node.output else []
        elif node.op_type in ("Cast", "CastLike"):
            names = [node.input[0], node.output[0]] if node.input and node.output else []
        else:
            index = _TYPED_BY_INPUT.get(node.op_type, 0)
            names = [node.input[index]] if len(node.input) > index and node.input[index] else []
        for name in names:
            elem_type = g.types.get(name)
            if not elem_type:
                continue
            type_name = _type_name(elem_type)
            # DOUBLE is cast down to FLOAT by the parser (limited support, documented as such)
            if type_name not in documented and type_name != "DOUBLE":
                tally.add((node.op_type, type_name), node, name, documented)
    findings = []
    for (op_type, type_name), node, count, (tensor, documented) in tally.items():
        findings.append(Finding(
            "warning",
            "op-type",
            f"node {_label(node)}{_more(count)} works on {type_name} ('{tensor}'); TensorRT {support.version}'s "
            f"parser documents {op_type} for {', '.join(documented)}",
            f"insert a Cast to one of {', '.join(documented)} around {op_type}, or re-export so the graph computes "
            "it in a supported type",
            node.name,
        ))
    return findings


# =========================================================================== profiles


def _normalize_profiles(profiles: Any) -> tuple[dict[str, ProfileShapes], list[Finding]]:
    """profile name -> input -> (min, opt, max) tuples of ints, from a mapping or from
    objects with .name/.shapes; malformed entries become findings."""
    if isinstance(profiles, Mapping):
        items = list(profiles.items())
    else:
        items = [(getattr(p, "name", f"profile{i}"), getattr(p, "shapes", None)) for i, p in enumerate(profiles)]
    out: dict[str, ProfileShapes] = {}
    findings: list[Finding] = []
    for name, shapes in items:
        out[str(name)] = {}
        if not isinstance(shapes, Mapping):
            findings.append(Finding("error", "profile", f"profile '{name}' is not a mapping of input -> (min, opt, max)",
                                    "give each profile {input: (min_shape, opt_shape, max_shape)}"))
            continue
        for input_name, triple in shapes.items():
            try:
                mn, opt, mx = (tuple(int(d) for d in shape) for shape in triple)
            except (TypeError, ValueError):
                findings.append(Finding(
                    "error", "profile",
                    f"profile '{name}' input '{input_name}': expected (min, opt, max) shapes, got {triple!r}",
                    "give three full shapes (lists of ints) per input", input_name,
                ))
                continue
            out[str(name)][str(input_name)] = (mn, opt, mx)
    return out, findings


def _default_profiles_for(inputs: Iterable[_Input], *, context_length: int, max_batch: int,
                          max_prefill: int) -> dict[str, ProfileShapes]:
    opt_prefill = min(128, max_prefill)
    half = max(1, context_length // 2)
    regimes = {
        "prefill": {BATCH: (1, 1, max_batch), SEQUENCE: (1, opt_prefill, max_prefill), PAST: (0, 0, 0)},
        "decode": {BATCH: (1, 1, max_batch), SEQUENCE: (1, 1, 1), PAST: (1, half, context_length - 1)},
    }
    profiles: dict[str, ProfileShapes] = {}
    for name, ranges in regimes.items():
        shapes: ProfileShapes = {}
        for spec in inputs:
            per_axis = [_dim_range(d, ranges) for d in spec.dims]
            if any(r is None for r in per_axis):
                continue  # a dim we cannot size: left for the check to report
            shapes[spec.name] = tuple(tuple(r[i] for r in per_axis) for i in range(3))  # type: ignore[index]
        profiles[name] = shapes
    return profiles


def _dim_range(dim: int | str | None, ranges: Mapping[str, tuple[int, int, int]]) -> tuple[int, int, int] | None:
    """(min, opt, max) of one dim given symbol ranges; sums like "a + b" add up."""
    if isinstance(dim, int) and dim > 0:
        return dim, dim, dim
    if isinstance(dim, str):
        parts = _expression_parts(dim)
        if parts and all(p in ranges for p in parts):
            return tuple(sum(ranges[p][i] for p in parts) for i in range(3))  # type: ignore[return-value]
    return None


_SYMBOL = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


def _expression_parts(dim: str) -> list[str]:
    """The symbols of a dim name: ["batch_size"], or ["past_sequence_length", "sequence_length"]
    for optimum's "past_sequence_length + sequence_length"; [] for anything else."""
    parts = [p.strip() for p in dim.split("+")]
    return parts if all(_SYMBOL.match(p) for p in parts) else []


def _check_profiles(g: _Graph, profiles: dict[str, ProfileShapes], context_length: int) -> list[Finding]:
    findings: list[Finding] = []
    inputs = {spec.name: spec for spec in g.inputs}
    if not profiles and any(spec.dynamic for spec in g.inputs):
        dynamic = [spec.name for spec in g.inputs if spec.dynamic]
        return [Finding(
            "error", "dynamic-axis-without-profile",
            f"input '{dynamic[0]}'{_more(len(dynamic), 'input')} has dynamic dims but no optimization profile is given",
            "pass optimization profiles (edgekit's build settings make prefill and decode profiles)", dynamic[0],
        )]
    for profile, shapes in profiles.items():
        missing: list[tuple[str, str]] = []
        symbols: dict[str, tuple[tuple[int, int, int], str]] = {}
        for spec in g.inputs:
            if spec.name not in shapes:
                if spec.dynamic:
                    dims = ", ".join(str(d) for d in spec.dims if not (isinstance(d, int) and d > 0))
                    missing.append((spec.name, dims))
                continue
            findings += _check_profile_entry(profile, spec, shapes[spec.name], symbols)
        if missing:
            name, dims = missing[0]
            findings.append(Finding(
                "error", "dynamic-axis-without-profile",
                f"input '{name}' (dynamic dims: {dims}){_more(len(missing), 'input')} has no shapes in profile "
                f"'{profile}': TensorRT needs min/opt/max for every dynamic input in every profile",
                f"add '{name}' to profile '{profile}' with min/opt/max shapes (edgekit sizes optimum's batch_size, "
                "sequence_length and past_sequence_length dims; re-export if the graph uses other dynamic dims)",
                name,
            ))
        for name in shapes:
            if name not in inputs:
                what = "an initializer, not an input" if name in g.inits else "not an input of the graph"
                findings.append(Finding(
                    "error", "profile",
                    f"profile '{profile}' gives shapes for '{name}', which is {what}",
                    f"remove '{name}' from profile '{profile}' (inputs: {', '.join(sorted(inputs)) or 'none'})", name,
                ))
        findings += _check_expression_dims(profile, g.inputs, shapes, symbols, context_length)
    return findings


def _check_profile_entry(profile: str, spec: _Input, triple: tuple[Shape, Shape, Shape],
                         symbols: dict[str, tuple[tuple[int, int, int], str]]) -> list[Finding]:
    mn, opt, mx = triple
    where = f"profile '{profile}' input '{spec.name}'"
    if spec.dims and not len(mn) == len(opt) == len(mx) == len(spec.dims):
        return [Finding(
            "error", "profile",
            f"{where}: shapes {list(mn)}/{list(opt)}/{list(mx)} do not have the input's rank {len(spec.dims)} "
            f"({', '.join(str(d) for d in spec.dims)})",
            f"give {len(spec.dims)}-D min/opt/max shapes for '{spec.name}'", spec.name,
        )]
    findings = []
    for axis, dim in enumerate(spec.dims):
        lo, mid, hi = mn[axis], opt[axis], mx[axis]
        if isinstance(dim, int) and dim > 0 and (lo, mid, hi) != (dim, dim, dim):
            findings.append(Finding(
                "error", "profile",
                f"{where}: axis {axis} is static ({dim}) in the graph but the profile gives {lo}/{mid}/{hi}",
                f"use {dim} for axis {axis} of '{spec.name}' in min, opt and max", spec.name,
            ))
            continue
        if not 0 <= lo <= mid <= hi:
            findings.append(Finding(
                "error", "profile",
                f"{where}: axis {axis} ({dim}) has min/opt/max {lo}/{mid}/{hi}, not 0 <= min <= opt <= max",
                f"order the profile's shapes for '{spec.name}' so that min <= opt <= max", spec.name,
            ))
            continue
        if isinstance(dim, str) and len(_expression_parts(dim)) == 1:
            seen = symbols.get(dim)
            if seen is None:
                symbols[dim] = ((lo, mid, hi), spec.name)
            elif seen[0] != (lo, mid, hi):
                findings.append(Finding(
                    "error", "profile",
                    f"{where}: dim '{dim}' is {lo}/{mid}/{hi} here but {'/'.join(map(str, seen[0]))} for "
                    f"'{seen[1]}'; inputs sharing a symbolic dim always have the same size at runtime",
                    f"give '{dim}' one min/opt/max in profile '{profile}' for every input that uses it", spec.name,
                ))
    return findings


def _check_expression_dims(profile: str, inputs: Iterable[_Input], shapes: ProfileShapes,
                           symbols: dict[str, tuple[tuple[int, int, int], str]], context_length: int) -> list[Finding]:
    """Sum dims (optimum's "past_sequence_length + sequence_length" on attention_mask) must cover
    every combination of their parts' ranges, and token dims should fit the context length."""
    findings = []
    ranges = {name: value for name, (value, _) in symbols.items()}
    for spec in inputs:
        if spec.name not in shapes or len(shapes[spec.name][0]) != len(spec.dims):
            continue
        mn, opt, mx = shapes[spec.name]
        for axis, dim in enumerate(spec.dims):
            if not isinstance(dim, str):
                continue
            parts = _expression_parts(dim)
            actual = (mn[axis], opt[axis], mx[axis])
            if "sequence_length" in dim and actual[2] > context_length:
                findings.append(Finding(
                    "warning", "profile",
                    f"profile '{profile}' input '{spec.name}': {dim} reaches {actual[2]} tokens, more than the "
                    f"context length {context_length}",
                    f"cap the profile at {context_length} tokens (past + sequence), or raise context_length", spec.name,
                ))
            if len(parts) < 2 or not all(p in ranges for p in parts):
                continue
            lo = sum(ranges[p][0] for p in parts)
            mid = sum(ranges[p][1] for p in parts)
            hi = sum(ranges[p][2] for p in parts)
            if actual[0] > lo or actual[2] < hi:
                findings.append(Finding(
                    "error", "profile",
                    f"profile '{profile}' input '{spec.name}': axis {axis} ({dim}) allows {actual[0]}..{actual[2]}, but "
                    f"{' + '.join(parts)} ranges over {lo}..{hi}: valid combinations would be rejected at runtime",
                    f"set axis {axis} of '{spec.name}' to min {lo}, opt {mid}, max {hi} in profile '{profile}'",
                    spec.name,
                ))
            elif actual[1] != mid:
                findings.append(Finding(
                    "warning", "profile",
                    f"profile '{profile}' input '{spec.name}': axis {axis} ({dim}) has opt {actual[1]}, but the opt "
                    f"sizes of {' + '.join(parts)} add up to {mid}: TensorRT tunes kernels for a shape that never occurs",
                    f"set the opt size of axis {axis} of '{spec.name}' to {mid}", spec.name,
                ))
    return findings


# =========================================================================== quantization


class _Quantization:
    """What the Q/DQ scan found (the memory and typing checks read it)."""

    def __init__(self) -> None:
        self.kinds: set[str] = set()  # "int4", "int8", "fp8", "fp4"
        self.forms: Counter[str] = Counter()

    @property
    def quantized(self) -> bool:
        return bool(self.kinds)


def _attr(node: Any, name: str, default: Any) -> Any:
    import onnx

    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _read_values(g: _Graph, tensor: Any) -> Any | None:
    """A small tensor's values (zero points), reading only its own bytes of an external file."""
    import onnx
    from onnx import numpy_helper

    try:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            return numpy_helper.to_array(tensor)
        info = {e.key: e.value for e in tensor.external_data}
        path = g.path.parent / info["location"]
        offset, length = int(info.get("offset", 0)), int(info.get("length", _tensor_nbytes(tensor)))
        if length > 64 * 1024 * 1024 or not _is_within(path.resolve(), g.path.parent.resolve()):
            return None
        with open(path, "rb") as handle:
            handle.seek(offset)
            raw = handle.read(length)
        copy = onnx.TensorProto()
        copy.CopyFrom(tensor)
        del copy.external_data[:]
        copy.data_location = onnx.TensorProto.DEFAULT
        copy.raw_data = raw
        return numpy_helper.to_array(copy)
    except Exception:
        return None


def _check_quantization(g: _Graph, support: support_data.ParserSupport, target: Any,
                        quant: _Quantization) -> list[Finding]:
    import onnx

    tp = onnx.TensorProto
    cc = target.compute_capability_tuple
    tallies: dict[str, _Tally] = {}

    def flag(code: str, key: str, node: Any, *details: Any) -> None:
        tallies.setdefault(code, _Tally()).add((code, key), node, *details)

    fp8_nodes: list[Any] = []
    fp4_nodes: list[Any] = []
    for node in g.graph.node:
        if node.domain not in _DEFAULT_DOMAINS or node.op_type not in ("DequantizeLinear", "QuantizeLinear"):
            continue
        is_dq = node.op_type == "DequantizeLinear"
        data = node.input[0]
        zero_point = node.input[2] if len(node.input) > 2 and node.input[2] else None
        zp_type = g.types.get(zero_point) if zero_point else None
        if is_dq:
            q_type = g.types.get(data)
        else:
            # QuantizeLinear's output type: its zero point's, else output_dtype, else ONNX's UINT8 default
            q_type = zp_type or _attr(node, "output_dtype", 0) or tp.UINT8
        if not q_type:
            continue
        type_name = _type_name(q_type)
        is_weight = g.constant_tensor(data) is not None
        kind = {tp.INT4: "int4", tp.INT8: "int8", tp.FLOAT8E4M3FN: "fp8",
                getattr(tp, "FLOAT4E2M1", -1): "fp4"}.get(q_type)

        # --- types TensorRT quantizes to at all
        if q_type in (tp.UINT4, tp.UINT8):
            if zero_point is None and not is_dq and q_type == tp.UINT8:
                # no zero point and no output_dtype: ONNX means UINT8, TensorRT's importer quantizes to INT8
                kind, type_name = "int8", "INT8"
            elif zero_point is not None and _nonzero(g, zero_point):
                flag("zero-point", type_name, node, type_name)
                continue
            else:
                flag("qdq-dtype", type_name, node, type_name)
                continue
        if kind is None:
            flag("qdq-dtype", type_name, node, type_name)
            continue
        if type_name not in support.quantized_types:
            flag("qdq-dtype-version", type_name, node, type_name)
            continue
        quant.kinds.add(kind)
        if kind == "fp8":
            fp8_nodes.append(node)
        if kind == "fp4":
            fp4_nodes.append(node)

        # --- INT4 is weight-only: a constant dequantized into a MatMul/Gemm
        if kind == "int4" and not is_dq:
            flag("int4-not-weight-only", "Q", node, data)
            continue
        if kind == "int4" and not is_weight:
            flag("int4-not-weight-only", "DQ", node, data)
            continue
        if kind == "int4":
            bad = _non_gemm_consumer(g, node.output[0])
            if bad is not None:
                flag("int4-consumer", bad, node, bad)
            if g.opset < 21:
                flag("opset-int4", "", node)

        # --- symmetric only: any zero point must be all zeros
        if zero_point is not None and _nonzero(g, zero_point):
            flag("zero-point", type_name, node, type_name)

        # --- scales and blocks
        form = _check_scale_and_blocks(g, node, kind, is_weight, flag)
        if form is not None:
            role = "weight-only" if is_weight and is_dq else ("weights" if is_weight else "activations")
            consumer = _first_consumer_op(g, node.output[0]) if is_dq else "DequantizeLinear"
            symmetric = "symmetric (no zero point)" if zero_point is None else "zero point 0"
            quant.forms[f"{node.op_type} {type_name} {role}, {form}, {symmetric} -> {consumer}"] += 1

    # FP8 also hides in initializers (pre-quantized weights read without a DQ we recognize)
    fp8_inits = [t.name for t in g.inits.values() if t.data_type == tp.FLOAT8E4M3FN]
    if fp8_inits:
        quant.kinds.add("fp8")
    findings = _quantization_findings(tallies, support, g, target)
    if (fp8_nodes or fp8_inits) and cc < (8, 9):
        first = fp8_nodes[0].name if fp8_nodes else fp8_inits[0]
        what = f"node {_label(fp8_nodes[0])}" if fp8_nodes else f"initializer '{fp8_inits[0]}'"
        findings.append(Finding(
            "error", "fp8-needs-sm89",
            f"{what} is FP8 (FLOAT8E4M3FN; {len(fp8_nodes)} Q/DQ nodes, {len(fp8_inits)} FP8 initializers), but "
            f"{target.name} has compute capability {target.compute_capability}: TensorRT runs FP8 only on 8.9 "
            "(Ada) and newer",
            "quantize with gptq (INT4/INT8 weight-only) for this target, or choose a target with compute "
            "capability >= 8.9",
            first,
        ))
    elif (fp8_nodes or fp8_inits) and not target.supports("fp8"):
        findings.append(_precision_finding(target, "fp8", fp8_nodes[0] if fp8_nodes else None))
    if fp4_nodes and cc < support_data.FP4_MIN_COMPUTE_CAPABILITY:
        findings.append(Finding(
            "error", "fp4-needs-sm100",
            f"node {_label(fp4_nodes[0])}{_more(len(fp4_nodes))} is FP4 (FLOAT4E2M1), but {target.name} has compute "
            f"capability {target.compute_capability}: FP4 GEMMs need 10.0 (Blackwell) or newer",
            "quantize with gptq (INT4 weight-only) or to FP8/INT8 for this target",
            fp4_nodes[0].name,
        ))
    for kind, precision in (("int4", "int4_weight_only"), ("int8", "int8")):
        if kind in quant.kinds and not target.supports(precision):
            findings.append(_precision_finding(target, precision, None))
    if quant.forms:
        listed = "; ".join(f"{count} x {form}" for form, count in quant.forms.most_common())
        findings.append(Finding("info", "quantization", f"Q/DQ found: {listed}", "none needed"))
    return findings


def _precision_finding(target: Any, precision: str, node: Any | None) -> Finding:
    return Finding(
        "error", "precision",
        f"the graph uses {precision}"
        + (f" (node {_label(node)})" if node is not None else "")
        + f", which {target.name} does not list in supported_precisions ({', '.join(target.supported_precisions)})",
        f"quantize to one of {', '.join(target.supported_precisions)} for {target.name}",
        node.name if node is not None else None,
    )


def _nonzero(g: _Graph, name: str) -> bool:
    """True if the zero point tensor has a non-zero value (or cannot be read as a constant)."""
    import numpy as np

    tensor = g.constant_tensor(name)
    if tensor is None:
        return True  # a computed zero point: TensorRT needs a build-time constant of zeros
    values = _read_values(g, tensor)
    if values is None:
        return False  # unreadable here: the parser checks it; do not invent a finding
    return bool(np.any(values.astype(np.float32) != 0))


def _non_gemm_consumer(g: _Graph, output: str) -> str | None:
    """The first op (or graph output) a dequantized weight reaches that is not a MatMul/Gemm,
    following Transpose/Reshape/Cast/... chains; None if every path ends in a MatMul/Gemm."""
    stack, seen = [output], set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in g.graph_outputs:
            return f"graph output '{name}'"
        consumers = g.consumers.get(name, [])
        if not consumers:
            return f"nothing (the tensor '{name}' is unused)"
        for consumer in consumers:
            if consumer.op_type in _WEIGHT_CONSUMERS:
                continue
            if consumer.op_type in _WEIGHT_PASS_THROUGH:
                stack.extend(consumer.output)
                continue
            return _label(consumer)
    return None


def _first_consumer_op(g: _Graph, output: str) -> str:
    consumers = g.consumers.get(output, [])
    while consumers and consumers[0].op_type in _WEIGHT_PASS_THROUGH and consumers[0].output:
        consumers = g.consumers.get(consumers[0].output[0], [])
    return consumers[0].op_type if consumers else "graph output"


def _check_scale_and_blocks(g: _Graph, node: Any, kind: str, is_weight: bool, flag: Any) -> str | None:
    """Scale/block rules of TensorRT's Q/DQ; returns a description of the form, or None when
    a finding was raised for it."""
    import onnx

    scale_name = node.input[1] if len(node.input) > 1 else ""
    scale = g.constant_tensor(scale_name)
    if scale is None:
        flag("qdq-scale", "not-constant", node, scale_name)
        return None
    if scale.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
        flag("qdq-scale", "dtype", node, scale_name, _type_name(scale.data_type))
        return None
    data_shape = g.shapes.get(node.input[0]) or ()
    scale_shape = tuple(int(d) for d in scale.dims)
    scale_size = 1
    for d in scale_shape:
        scale_size *= d
    rank = len(data_shape)
    axis = int(_attr(node, "axis", 1))
    axis = axis + rank if axis < 0 and rank else axis
    block_size = int(_attr(node, "block_size", 0))
    if scale_size == 1 and block_size == 0:
        if kind == "int4":
            flag("block-size", "int4-per-tensor", node, "per-tensor")
            return None
        return "per-tensor scale"
    if len(scale_shape) == 1 and block_size == 0:
        if kind == "int4":
            flag("block-size", "int4-per-channel", node, f"per-channel on axis {axis}")
            return None
        if rank and 0 <= axis < rank and isinstance(data_shape[axis], int) and data_shape[axis] != scale_shape[0]:
            flag("qdq-scale", "per-channel", node, scale_name, f"{scale_shape[0]} scales for axis {axis} of size "
                 f"{data_shape[axis]}")
            return None
        return f"per-channel on axis {axis}"
    # blocked: scale has the data's rank, one axis divided into blocks
    if len(scale_shape) > 2:
        flag("block-size", "scale-rank", node, f"scale of rank {len(scale_shape)} (TensorRT takes rank <= 2)")
        return None
    if not rank or not all(isinstance(d, int) for d in data_shape) or len(scale_shape) != rank:
        flag("block-size", "shape", node, f"scale {list(scale_shape)} does not match the data's rank "
             f"({list(data_shape) or 'unknown shape'})")
        return None
    if block_size <= 0:
        flag("block-size", "no-attr", node, f"scale {list(scale_shape)} is blocked but the node has no block_size")
        return None
    if not 0 <= axis < rank:
        flag("block-size", "axis", node, f"axis {axis} outside rank {rank}")
        return None
    dims: list[int] = [int(d) for d in data_shape]  # type: ignore[arg-type]
    if axis not in (rank - 1, rank - 2):
        flag("block-size", "axis", node, f"blocks on axis {axis}; TensorRT blocks one of the last two axes")
        return None
    if dims[axis] % block_size:
        flag("block-size", "divide", node, f"block_size {block_size} does not divide axis {axis} of size {dims[axis]}")
        return None
    expected = tuple(d // block_size if i == axis else d for i, d in enumerate(dims))
    if scale_shape != expected:
        flag("block-size", "scale-shape", node, f"scale {list(scale_shape)} is not {list(expected)} (data "
             f"{dims}, block_size {block_size} on axis {axis}): TensorRT allows exactly one blocked axis")
        return None
    if kind == "int4" and block_size not in support_data.INT4_BLOCK_SIZES:
        flag("block-size", "int4-size", node, f"block_size {block_size}")
        return None
    if kind == "int4" and dims[-1] % 2:
        flag("block-size", "odd", node, f"last dimension {dims[-1]} is odd (INT4 packs two values per byte)")
        return None
    if kind in ("int8", "fp8"):
        flag("block-size", f"{kind}-blocked", node, f"block_size {block_size}")
    return f"block {block_size} on axis {axis}"


_QUANT_TEXT = {
    # code: (severity, what (detail) -> message tail, fix)
    "zero-point": ("error", "has {0} codes with a non-zero zero point (asymmetric quantization); TensorRT quantizes "
                   "symmetrically and takes only all-zero zero points",
                   "quantize with symmetric: true (signed codes, no zero point)"),
    "qdq-dtype": ("error", "uses {0}, which TensorRT does not quantize to (it takes INT8, FP8, INT4 weights and FP4; "
                  "UINT8 only as network I/O)",
                  "quantize to signed INT8/INT4 (symmetric: true) or FP8"),
    "qdq-dtype-version": ("error", "uses {0}, which TensorRT {version}'s parser does not take in Q/DQ ({types})",
                          "quantize to one of {types}, or build with a newer TensorRT"),
    "int4-not-weight-only": ("error", "quantizes '{0}' to INT4 at runtime; TensorRT supports INT4 only for "
                             "weights (weight-only: a constant INT4 initializer dequantized into a MatMul/Gemm)",
                             "quantize only the weights to INT4 (gptq/awq weight-only) and keep activations in "
                             "float, or use INT8/FP8 Q/DQ for activations"),
    "int4-consumer": ("error", "dequantizes INT4 weights into {0}; TensorRT fuses INT4 weights only into MatMul/Gemm "
                      "(optionally through Transpose/Reshape)",
                      "keep that weight in float (do not quantize it) or restructure so the INT4 weight feeds a "
                      "MatMul/Gemm"),
    "opset-int4": ("error", "dequantizes INT4 with block quantization, which ONNX defines only from opset 21 (graph "
                   "opset {opset})", "export the TensorRT variant at opset 21 (edgekit's tensorrt format does)"),
    "qdq-scale": ("error", "has scale '{0}' that TensorRT cannot use: {1}",
                  "use a constant FP32/FP16/BF16 scale initializer shaped like the quantization granularity"),
    "block-size": ("error", "{0}", "quantize with group_size 64 or 128 dividing the input features (block_size = "
                   "group_size on axis 0 of the [in, out] weight), symmetric, as edgekit's tensorrt export writes it"),
}


def _quantization_findings(tallies: dict[str, _Tally], support: support_data.ParserSupport, g: _Graph,
                           target: Any) -> list[Finding]:
    findings = []
    types = ", ".join(sorted(support.quantized_types))
    for code, tally in tallies.items():
        for (_, key), node, count, details in tally.items():
            severity, what, fix = _QUANT_TEXT[code]
            message = what.format(*details, version=support.version, types=types, opset=g.opset)
            if code == "block-size":
                severity, message = _block_text(key, message)
            findings.append(Finding(
                severity,  # type: ignore[arg-type]
                "opset" if code == "opset-int4" else ("qdq-dtype" if code == "qdq-dtype-version" else code),
                f"node {_label(node)}{_more(count)} {message}",
                fix.format(version=support.version, types=types),
                node.name,
            ))
    return findings


def _block_text(key: str, detail: str) -> tuple[str, str]:
    if key == "int4-size":
        return "error", f"uses INT4 {detail}; TensorRT's INT4 weight-only GEMMs take block sizes " + \
            " or ".join(map(str, support_data.INT4_BLOCK_SIZES))
    if key in ("int4-per-tensor", "int4-per-channel"):
        return "error", f"dequantizes INT4 {detail}; TensorRT's INT4 needs per-block scales"
    if key in ("int8-blocked", "fp8-blocked"):
        return "warning", (f"uses block quantization ({detail}) for {key.split('-')[0].upper()}; TensorRT documents "
                           "blocked scales for INT4 (and FP4) weights, INT8/FP8 use per-tensor or per-channel scales")
    return "error", f"has a block layout TensorRT rejects: {detail}"


# =========================================================================== external data


def _check_external_data(g: _Graph) -> list[Finding]:
    import onnx

    model_dir = g.path.parent
    root = model_dir.resolve()
    problems = _Tally()
    files: dict[str, int] = {}
    sizes: dict[str, int | None] = {}
    total = 0
    for tensor in g.inits.values():
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        expected = _tensor_nbytes(tensor)
        if not location:
            problems.add(("no-location", ""), tensor, "has external data without a location")
            continue
        pure = location.replace("\\", "/")
        if os.path.isabs(location) or pure.startswith("/") or re.match(r"^[A-Za-z]:", pure):
            problems.add(("absolute", location), tensor, f"points at the absolute path '{location}'")
            continue
        if ".." in pure.split("/"):
            problems.add(("parent", location), tensor, f"points at '{location}', outside the model's directory")
            continue
        path = model_dir / pure
        if not _is_within(path.resolve(), root):
            problems.add(("escape", location), tensor, f"points at '{location}', which resolves (through a symlink) "
                         f"outside the model's directory")
            continue
        if location not in sizes:
            sizes[location] = path.stat().st_size if path.is_file() else None
        size = sizes[location]
        if size is None:
            problems.add(("missing", location), tensor, f"needs '{location}', which does not exist next to the model")
            continue
        try:
            offset = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else size - offset
        except ValueError:
            problems.add(("bad-number", location), tensor, f"has a non-integer offset/length for '{location}'")
            continue
        if offset < 0 or length < 0 or offset + length > size:
            problems.add(("range", location), tensor, f"reads bytes {offset}..{offset + length} of '{location}', "
                         f"which has {size} bytes (the file is truncated or from another export)")
            continue
        if "length" in info and length != expected:
            problems.add(("length", location), tensor, f"stores {length} bytes in '{location}' but its dims and type "
                         f"need {expected}")
            continue
        files[location] = files.get(location, 0) + 1
        total += length
    findings = []
    for (_, _), tensor, count, (detail,) in problems.items():
        findings.append(Finding(
            "error", "external-data",
            f"initializer '{tensor.name}'{_more(count, 'initializer')} {detail}",
            "re-export so the weights are saved next to model.onnx with a relative location (edgekit writes "
            "model.onnx_data), and copy the model and its data file together",
            tensor.name,
        ))
    if files:
        listed = ", ".join(f"{name} ({count} tensors)" for name, count in files.items())
        findings.append(Finding("info", "external-data", f"{sum(files.values())} initializers ({total / GB:.3f} GB) "
                                f"read from {len(files)} external file{'s' if len(files) > 1 else ''} inside the model's "
                                f"directory: {listed}", "none needed"))
    return findings


# =========================================================================== memory


def _weights_bytes(g: _Graph, *, half_float: bool) -> int:
    """Bytes the engine keeps for constants: initializers (external ones by their dims, 4-bit
    types packed) and Constant node values. With the FP16 flag (TensorRT 10 weak typing of a
    float graph) FP32 weights are counted at half size, as TensorRT converts them."""
    import onnx

    total = 0
    for tensor in list(g.inits.values()) + list(g.constants.values()):
        nbytes = _tensor_nbytes(tensor)
        if half_float and tensor.data_type == onnx.TensorProto.FLOAT:
            nbytes //= 2
        total += nbytes
    return total


def _evaluated_shape(dims: Iterable[int | str | None], ranges: Mapping[str, tuple[int, int, int]]) -> Shape | None:
    out = []
    for dim in dims:
        value = _dim_range(dim, ranges)
        if value is None:
            return None
        out.append(value[2])
    return tuple(out)


def _io_bytes(g: _Graph, shapes: ProfileShapes) -> tuple[dict[str, int], int]:
    """Bytes of the engine's I/O buffers at a profile's max shapes, by role, and how many
    outputs could not be sized."""
    ranges: dict[str, tuple[int, int, int]] = {}
    for spec in g.inputs:
        if spec.name in shapes and len(shapes[spec.name][2]) == len(spec.dims):
            for axis, dim in enumerate(spec.dims):
                if isinstance(dim, str) and len(_expression_parts(dim)) == 1:
                    ranges.setdefault(dim, tuple(s[axis] for s in shapes[spec.name]))  # type: ignore[arg-type]
    roles = {"kv_in": 0, "kv_out": 0, "logits": 0, "other": 0}
    unsized = 0
    for spec in g.inputs:
        shape = shapes[spec.name][2] if spec.name in shapes else _evaluated_shape(spec.dims, ranges)
        if shape is None:
            unsized += 1
            continue
        role = "kv_in" if spec.name.startswith("past_key_values") else "other"
        roles[role] += _shape_nbytes(shape, spec.elem_type)
    for spec in g.outputs:
        shape = _evaluated_shape(spec.dims, ranges)
        if shape is None:
            unsized += 1
            continue
        role = "kv_out" if spec.name.startswith("present") else ("logits" if spec.name == "logits" else "other")
        roles[role] += _shape_nbytes(shape, spec.elem_type)
    return roles, unsized


def _check_memory(g: _Graph, support: support_data.ParserSupport, target: Any, profiles: dict[str, ProfileShapes],
                  quant: _Quantization, *, context_length: int, max_batch: int, workspace_gb: float) -> list[Finding]:
    half_float = support.major < 11 and not quant.quantized  # the FP16 flag edgekit sets for float graphs on 10.x
    weights = _weights_bytes(g, half_float=half_float)
    # I/O buffers: the largest profile (one profile is active per execution context)
    io_by_profile = {name: _io_bytes(g, shapes) for name, shapes in profiles.items()} or {"static": _io_bytes(g, {})}
    profile, (roles, unsized) = max(io_by_profile.items(), key=lambda item: sum(item[1][0].values()))
    io_total = sum(roles.values())
    workspace = int(workspace_gb * GIB)
    allowance = int(RUNTIME_ALLOWANCE_GB * GB)
    total = weights + io_total + workspace + allowance
    usable = target.memory.usable_gb * GB
    weight_note = "FP32 counted at FP16: FP16 flag" if half_float else "as stored; INT4 packed 2 per byte"
    breakdown = (
        f"weights {weights / GB:.3f} GB ({weight_note}) + I/O buffers {io_total / GB:.3f} GB at profile '{profile}' "
        f"max shapes (KV cache: past inputs {roles['kv_in'] / GB:.3f} GB + present outputs {roles['kv_out'] / GB:.3f} "
        f"GB; logits {roles['logits'] / GB:.3f} GB; other {roles['other'] / GB:.3f} GB"
        + (f"; {unsized} tensors not sized" if unsized else "")
        + f") + workspace {workspace / GB:.3f} GB + TensorRT runtime allowance {allowance / GB:.3f} GB"
    )
    kind = "shared with the CPU" if target.memory.shared else "dedicated"
    head = (f"engine memory estimate {total / GB:.2f} GB of {target.memory.usable_gb:g} GB usable ({kind}) on "
            f"{target.name}, max batch {max_batch}, context {context_length}: {breakdown}")
    if total > usable:
        return [Finding("error", "engine-memory", head,
                        "lower max_batch, context_length or max_prefill (smaller KV cache and logits), the workspace, or "
                        "quantize the weights further (INT4 weight-only), or pick a target with more memory")]
    if total > MEMORY_WARNING_FRACTION * usable:
        return [Finding("warning", "engine-memory", head + f" — over {MEMORY_WARNING_FRACTION:.0%} of usable memory",
                        "leave headroom: lower max_batch, context_length, max_prefill or the workspace")]
    return [Finding("info", "engine-memory", head, "none needed")]


# =========================================================================== typing


def _typing_notes(g: _Graph, support: support_data.ParserSupport, quant: _Quantization) -> list[Finding]:
    import onnx

    float_io = [spec for spec in (*g.inputs, *g.outputs) if spec.elem_type == onnx.TensorProto.FLOAT]
    if not float_io:
        return _half_notes(g)
    trt = f"TensorRT {support.version}"
    example = float_io[0].name
    if support.major >= 11:
        message = (f"the graph computes in float32 ('{example}' is FP32): {trt} builds every network strongly typed "
                   "(TensorRT 11 removed the FP16 builder flag), so non-quantized layers and activations run in FP32")
        fix = "none needed; for half-precision activations convert the graph to FP16 with ModelOpt AutoCast first"
    elif quant.quantized:
        message = (f"the graph computes in float32 ('{example}' is FP32) with Q/DQ: edgekit builds Q/DQ graphs strongly "
                   f"typed on {trt}, which keeps the non-quantized layers and activations in FP32")
        fix = ("none needed; for half-precision activations and KV cache re-export with export_onnx tensorrt_dtype: auto "
               "(float16) or bfloat16")
    else:
        message = (f"the graph computes in float32 ('{example}' is FP32): on {trt} edgekit builds it weakly typed with "
                   "the FP16 flag, so TensorRT may run layers in FP16; TensorRT 11 removed that flag (strong typing only)")
        fix = "none needed on TensorRT 10; for TensorRT 11 convert the graph to FP16 with ModelOpt AutoCast first"
    return [Finding("info", "fp32-activations", message, fix)]


def graph_float_types(g: _Graph) -> dict[str, Any]:
    """The float types the graph really has: KV cache (past/present), logits, initializers (by
    type), and the Casts to FLOAT inside a half-precision graph (the float32 islands PyTorch
    keeps: RMSNorm's variance, softmax, the rotary tables)."""
    import onnx

    def names(specs: Iterable[_Input]) -> list[str]:
        return sorted({_type_name(s.elem_type) for s in specs})

    kv = [s for s in (*g.inputs, *g.outputs) if s.name.startswith(("past_key_values", "present"))]
    inits = Counter(_type_name(t.data_type) for t in g.inits.values())
    casts = sum(1 for node in g.graph.node if node.op_type == "Cast"
                and _attr(node, "to", 0) == onnx.TensorProto.FLOAT)
    return {"kv_cache": names(kv), "logits": names(s for s in g.outputs if s.name == "logits"),
            "initializers": dict(sorted(inits.items())), "casts_to_fp32": casts}


def _half_notes(g: _Graph) -> list[Finding]:
    import onnx

    half = {onnx.TensorProto.FLOAT16: "FP16", onnx.TensorProto.BFLOAT16: "BF16"}
    io = [half[s.elem_type] for s in (*g.inputs, *g.outputs) if s.elem_type in half]
    if not io:
        return []
    types = graph_float_types(g)
    fp32_inits = types["initializers"].get("FP32", 0)
    message = (f"the graph computes in {'/'.join(sorted(set(io)))}: KV cache {'/'.join(types['kv_cache']) or '-'}, logits "
               f"{'/'.join(types['logits']) or '-'}, initializers {types['initializers']}; {types['casts_to_fp32']} Cast "
               "to FP32 inside (norm variance, softmax, rotary tables, as PyTorch computes them), which a strongly typed "
               "engine keeps")
    fix = "none needed" if not fp32_inits else (
        f"{fp32_inits} FP32 initializer(s) remain: check that no weight MatMul runs in FP32 (edgekit check --json lists them)")
    return [Finding("info", "half-precision", message, fix)]
