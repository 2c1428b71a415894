"""External data and engine memory: the weight files are inside the model's directory and
complete, and weights + I/O buffers (KV cache, logits) + workspace + a runtime allowance fit
the target's usable memory.

One memory model (:mod:`edgekit.sizing`): decimal GB as target profiles state memory, GiB only
for TensorRT's workspace pool limit; ``RUNTIME_ALLOWANCE_GB`` is the execution context's own
allocations beyond weights, I/O buffers and workspace (the targets' usable_gb already excludes
the CUDA context and the OS), the same allowance plan and recipe validation use."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from edgekit.engine import trt_onnx_support as support_data
from edgekit.engine.readiness.findings import Finding, Tally, more
from edgekit.engine.readiness.graph import Graph, is_within, shape_nbytes, tensor_nbytes
from edgekit.engine.readiness.profiles import ProfileShapes, Shape, dim_range, expression_parts
from edgekit.engine.readiness.quantization import Quantization
from edgekit.sizing import GB, GIB, RUNTIME_ALLOWANCE_GB

#: protobuf refuses messages of 2 GiB or more: bigger models must keep weights in external data
PROTOBUF_LIMIT = 2**31
#: warn when the estimate passes this fraction of the target's usable memory
MEMORY_WARNING_FRACTION = 0.9


def check_external_data(g: Graph) -> list[Finding]:
    import onnx

    model_dir = g.path.parent
    root = model_dir.resolve()
    problems = Tally()
    files: dict[str, int] = {}
    sizes: dict[str, int | None] = {}
    total = 0
    for tensor in g.inits.values():
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        expected = tensor_nbytes(tensor)
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
        if not is_within(path.resolve(), root):
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
            f"initializer '{tensor.name}'{more(count, 'initializer')} {detail}",
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


def _weights_bytes(g: Graph, *, half_float: bool) -> int:
    """Bytes the engine keeps for constants: initializers (external ones by their dims, 4-bit
    types packed) and Constant node values. With the FP16 flag (TensorRT 10 weak typing of a
    float graph) FP32 weights are counted at half size, as TensorRT converts them."""
    import onnx

    total = 0
    for tensor in list(g.inits.values()) + list(g.constants.values()):
        nbytes = tensor_nbytes(tensor)
        if half_float and tensor.data_type == onnx.TensorProto.FLOAT:
            nbytes //= 2
        total += nbytes
    return total


def _evaluated_shape(dims: Iterable[int | str | None], ranges: Mapping[str, tuple[int, int, int]]) -> Shape | None:
    out = []
    for dim in dims:
        value = dim_range(dim, ranges)
        if value is None:
            return None
        out.append(value[2])
    return tuple(out)


def _io_bytes(g: Graph, shapes: ProfileShapes) -> tuple[dict[str, int], int]:
    """Bytes of the engine's I/O buffers at a profile's max shapes, by role, and how many
    outputs could not be sized."""
    ranges: dict[str, tuple[int, int, int]] = {}
    for spec in g.inputs:
        if spec.name in shapes and len(shapes[spec.name][2]) == len(spec.dims):
            for axis, dim in enumerate(spec.dims):
                if isinstance(dim, str) and len(expression_parts(dim)) == 1:
                    ranges.setdefault(dim, tuple(s[axis] for s in shapes[spec.name]))  # type: ignore[arg-type]
    roles = {"kv_in": 0, "kv_out": 0, "logits": 0, "other": 0}
    unsized = 0
    for spec in g.inputs:
        shape = shapes[spec.name][2] if spec.name in shapes else _evaluated_shape(spec.dims, ranges)
        if shape is None:
            unsized += 1
            continue
        role = "kv_in" if spec.name.startswith("past_key_values") else "other"
        roles[role] += shape_nbytes(shape, spec.elem_type)
    for spec in g.outputs:
        shape = _evaluated_shape(spec.dims, ranges)
        if shape is None:
            unsized += 1
            continue
        role = "kv_out" if spec.name.startswith("present") else ("logits" if spec.name == "logits" else "other")
        roles[role] += shape_nbytes(shape, spec.elem_type)
    return roles, unsized


def check_memory(g: Graph, support: support_data.ParserSupport, target: Any, profiles: dict[str, ProfileShapes],
                 quant: Quantization, *, context_length: int, max_batch: int, workspace_gb: float) -> list[Finding]:
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
