"""Opset and operator checks: the graph's opset against the newest one the target's TensorRT
parser documents, operators the parser does not import (and ONNX Runtime contrib operators),
and element types against the parser's documented types."""

from __future__ import annotations

import functools
from collections import Counter
from typing import Any

from edgekit.engine import trt_onnx_support as support_data
from edgekit.engine.readiness.findings import Finding, Tally, label, more
from edgekit.engine.readiness.graph import DEFAULT_DOMAINS, Graph, elem_type_name

_MS_DOMAIN = "com.microsoft"
_TRT_DOMAIN = "trt"


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


def check_opset(g: Graph, support: support_data.ParserSupport) -> list[Finding]:
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
        if node.domain in DEFAULT_DOMAINS:
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
                f"node {label(node)}{more(counts[op_type])} uses {op_type}-{breaking[-1]} (graph opset {g.opset}); "
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


def _has_int4(g: Graph) -> bool:
    import onnx

    return any(t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) for t in g.inits.values())


def check_operators(g: Graph, support: support_data.ParserSupport) -> list[Finding]:
    trt = f"TensorRT {support.version}"
    unsupported, ort_only, custom = Tally(), Tally(), Tally()
    for node in g.nodes():
        domain = node.domain or ""
        if domain in DEFAULT_DOMAINS:
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
            f"node {label(node)}{more(count)}: {trt}'s ONNX parser has no importer for {op_type}"
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
            f"node {label(node)}{more(count)} is an ONNX Runtime contrib operator ({domain}); TensorRT's parser "
            "cannot import it",
            "use the tensorrt variant (export_onnx format: tensorrt or both)",
            node.name,
        ))
    for (domain, op_type), node, count, _ in custom.items():
        findings.append(Finding(
            "error",
            "unsupported-op",
            f"node {label(node)}{more(count)} is in the custom domain '{domain}', which {trt}'s parser only "
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


def check_operator_types(g: Graph, support: support_data.ParserSupport) -> list[Finding]:
    """Element types against the parser's documented "Supported Types" (a warning: the tables
    are documentation, so a mismatch is likely but not certain to fail)."""
    tally = Tally()
    for node in g.graph.node:
        if node.domain not in DEFAULT_DOMAINS or node.op_type in _NOT_TYPE_CHECKED:
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
            type_name = elem_type_name(elem_type)
            # DOUBLE is cast down to FLOAT by the parser (limited support, documented as such)
            if type_name not in documented and type_name != "DOUBLE":
                tally.add((node.op_type, type_name), node, name, documented)
    findings = []
    for (op_type, type_name), node, count, (tensor, documented) in tally.items():
        findings.append(Finding(
            "warning",
            "op-type",
            f"node {label(node)}{more(count)} works on {type_name} ('{tensor}'); TensorRT {support.version}'s "
            f"parser documents {op_type} for {', '.join(documented)}",
            f"insert a Cast to one of {', '.join(documented)} around {op_type}, or re-export so the graph computes "
            "it in a supported type",
            node.name,
        ))
    return findings
