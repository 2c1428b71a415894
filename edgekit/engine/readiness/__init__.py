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
:mod:`edgekit.engine.trt_onnx_support`. One module per check family (``operators``,
``profiles``, ``quantization``, ``memory``, ``precision``) over the loaded graph (``graph``)
and the findings (``findings``); this module runs them in order.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from edgekit.engine import trt_onnx_support as support_data
from edgekit.engine.readiness.findings import SEVERITY_ORDER, Finding
from edgekit.engine.readiness.graph import Graph, load_graph
from edgekit.engine.readiness.memory import PROTOBUF_LIMIT, check_external_data, check_memory
from edgekit.engine.readiness.operators import check_operator_types, check_operators, check_opset
from edgekit.engine.readiness.precision import typing_notes
from edgekit.engine.readiness.profiles import ProfileShapes, check_profiles, default_profiles_for, normalize_profiles
from edgekit.engine.readiness.quantization import Quantization, check_quantization
from edgekit.errors import EngineError
from edgekit.sizing import GB, RUNTIME_ALLOWANCE_GB

__all__ = [
    "Finding",
    "RUNTIME_ALLOWANCE_GB",
    "check_bundle",
    "check_onnx",
    "default_profiles",
]


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
    graph = Graph(load_graph(model_path), model_path)
    max_prefill = min(512, context_length)
    if profiles is None:
        normalized = default_profiles_for(graph.inputs, context_length=context_length, max_batch=max_batch,
                                          max_prefill=max_prefill)
        profile_findings: list[Finding] = []
    else:
        normalized, profile_findings = normalize_profiles(profiles)
    quant = Quantization()
    findings = [
        *check_opset(graph, support),
        *check_operators(graph, support),
        *check_operator_types(graph, support),
        *profile_findings,
        *check_profiles(graph, normalized, context_length),
        *check_quantization(graph, support, target, quant),
        *check_external_data(graph),
        *check_memory(graph, support, target, normalized, quant, context_length=context_length,
                      max_batch=max_batch, workspace_gb=workspace_gb),
        *typing_notes(graph, support, quant),
    ]
    return sorted(findings, key=lambda f: SEVERITY_ORDER[f.severity])


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
    graph = Graph(load_graph(Path(model_path)), Path(model_path))
    return default_profiles_for(graph.inputs, context_length=context_length, max_batch=max_batch,
                                max_prefill=max_prefill)


def _resolve_target(target: Any) -> Any:
    if isinstance(target, str):
        from edgekit.targets import load_target

        return load_target(target)
    return target
