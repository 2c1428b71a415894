"""Optimization profiles: the fallback prefill/decode profiles of an optimum-exported decoder,
and the check that every dynamic input is covered by every profile with consistent ranges."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from edgekit.engine.readiness.findings import Finding, more
from edgekit.engine.readiness.graph import Graph, GraphInput

Shape = tuple[int, ...]
ProfileShapes = dict[str, tuple[Shape, Shape, Shape]]

# The symbolic dims optimum-onnx writes for text-generation-with-past.
BATCH, SEQUENCE, PAST = "batch_size", "sequence_length", "past_sequence_length"


def normalize_profiles(profiles: Any) -> tuple[dict[str, ProfileShapes], list[Finding]]:
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


def default_profiles_for(inputs: Iterable[GraphInput], *, context_length: int, max_batch: int,
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
            per_axis = [dim_range(d, ranges) for d in spec.dims]
            if any(r is None for r in per_axis):
                continue  # a dim we cannot size: left for the check to report
            shapes[spec.name] = tuple(tuple(r[i] for r in per_axis) for i in range(3))  # type: ignore[index]
        profiles[name] = shapes
    return profiles


def dim_range(dim: int | str | None, ranges: Mapping[str, tuple[int, int, int]]) -> tuple[int, int, int] | None:
    """(min, opt, max) of one dim given symbol ranges; sums like "a + b" add up."""
    if isinstance(dim, int) and dim > 0:
        return dim, dim, dim
    if isinstance(dim, str):
        parts = expression_parts(dim)
        if parts and all(p in ranges for p in parts):
            return tuple(sum(ranges[p][i] for p in parts) for i in range(3))  # type: ignore[return-value]
    return None


_SYMBOL = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


def expression_parts(dim: str) -> list[str]:
    """The symbols of a dim name: ["batch_size"], or ["past_sequence_length", "sequence_length"]
    for optimum's "past_sequence_length + sequence_length"; [] for anything else."""
    parts = [p.strip() for p in dim.split("+")]
    return parts if all(_SYMBOL.match(p) for p in parts) else []


def check_profiles(g: Graph, profiles: dict[str, ProfileShapes], context_length: int) -> list[Finding]:
    findings: list[Finding] = []
    inputs = {spec.name: spec for spec in g.inputs}
    if not profiles and any(spec.dynamic for spec in g.inputs):
        dynamic = [spec.name for spec in g.inputs if spec.dynamic]
        return [Finding(
            "error", "dynamic-axis-without-profile",
            f"input '{dynamic[0]}'{more(len(dynamic), 'input')} has dynamic dims but no optimization profile is given",
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
                f"input '{name}' (dynamic dims: {dims}){more(len(missing), 'input')} has no shapes in profile "
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


def _check_profile_entry(profile: str, spec: GraphInput, triple: tuple[Shape, Shape, Shape],
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
        if isinstance(dim, str) and len(expression_parts(dim)) == 1:
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


def _check_expression_dims(profile: str, inputs: Iterable[GraphInput], shapes: ProfileShapes,
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
            parts = expression_parts(dim)
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
