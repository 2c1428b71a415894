"""Which shape a pruned model gets: explicit sizes checked, or a parameter budget solved.

Pure arithmetic on :class:`edgekit.sizing.ModelShape` (no torch), so recipe validation can
refuse an impossible shape, with the nearest valid ones, before any work starts.

Rules that keep the result a standard Hugging Face checkpoint:
- width is uniform across layers (one ``intermediate_size``, one head layout);
- query heads stay grouped by key/value head (GQA): ``num_attention_heads`` must be a
  multiple of ``num_key_value_heads``, no more key/value heads than the teacher, and no
  more query heads per group than the teacher's groups hold;
- ``head_dim`` (and so the rotary dimensions) never changes: heads are removed whole.

A budget (``params``: fraction of the teacher's parameters, embeddings included, tied
weights counted once) is met by shrinking the chosen axes (``axes``; the default follows
Minitron's width recipe: MLP and hidden size together) as evenly as the sizes' granularity
allows: among shapes within 3% under the budget, the one whose most-shrunk axis loses least.

Granularity: widths stay multiples of :data:`WIDTH_MULTIPLE` (64) where the teacher's are.
A prune stage's ``width_multiple`` (read by :func:`plan_shape` when its config has one) asks
for a coarser multiple: every width the solver picks — hidden size, MLP width and the
attention width (query heads x head_dim) — is then a multiple of it, so a later quantize
stage whose ``group_size`` divides it (and TensorRT's INT4 block sizes 32/64/128) divides
every quantized layer's input. Recipe validation refuses a group size that would not.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

from edgekit.sizing import ModelShape

AXES = ("mlp", "hidden", "heads", "depth")
# Sizes are kept multiples of this (when the teacher's size is): matmul-friendly widths, and
# every GPTQ group size up to 64 still divides every layer's input size afterwards.
WIDTH_MULTIPLE = 64


class ShapeError(ValueError):
    """An impossible pruned shape; ``how`` names the nearest valid choices."""

    def __init__(self, what: str, how: str, field: str | None = None):
        super().__init__(what)
        self.how, self.field = how, field


def total_parameters(shape: ModelShape) -> int:
    """Weights of a Llama-style decoder: linears + embeddings (+ untied head) + norms (+ the
    attention biases of Qwen2-style models)."""
    norms = shape.hidden_size * (2 * shape.num_layers + 1)
    return shape.linear_parameters + shape.embedding_parameters + norms + shape.bias_parameters


def describe(shape: ModelShape) -> str:
    return (
        f"hidden {shape.hidden_size}, intermediate {shape.intermediate_size}, layers {shape.num_layers}, "
        f"heads {shape.num_heads}/{shape.num_kv_heads} kv"
    )


def shape_dict(shape: ModelShape) -> dict[str, int]:
    return {
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "parameters": total_parameters(shape),
    }


def valid_head_layouts(teacher: ModelShape, multiple: int | None = None) -> list[tuple[int, int]]:
    """(query heads, key/value heads) layouts reachable from the teacher by removing heads
    (with ``multiple``: only those whose attention width, heads x head_dim, it divides)."""
    per_group = teacher.num_heads // teacher.num_kv_heads
    layouts = {(kv * q, kv) for kv in range(1, teacher.num_kv_heads + 1) for q in range(1, per_group + 1)}
    if multiple:
        layouts = {(h, k) for h, k in layouts if (h * teacher.head_dim) % multiple == 0}
    return sorted(layouts)


def _size_choices(full: int, minimum: int = 1, multiple: int | None = None) -> list[int]:
    if multiple:
        # an explicit multiple: every choice is one (none when the teacher's size is under it)
        return list(range(max(multiple, (minimum + multiple - 1) // multiple * multiple), full + 1, multiple))
    # Small widths (test models) would have too few choices at 64: use 8 there.
    step = next((m for m in (WIDTH_MULTIPLE, 8) if full % m == 0 and full >= 8 * m), 1)
    return list(range(max(step, minimum), full + 1, step))


def _nearest(value: int, choices: list[int], count: int = 2) -> list[int]:
    return sorted(sorted(choices, key=lambda c: (abs(c - value), c))[:count])


def check_explicit(teacher: ModelShape, *, hidden_size=None, intermediate_size=None, num_layers=None,
                   num_attention_heads=None, num_key_value_heads=None) -> ModelShape:
    """The student shape for explicit sizes (unset ones keep the teacher's), or ShapeError."""
    for field, value, full in (
        ("hidden_size", hidden_size, teacher.hidden_size),
        ("intermediate_size", intermediate_size, teacher.intermediate_size),
        ("num_layers", num_layers, teacher.num_layers),
    ):
        if value is not None and value > full:
            raise ShapeError(
                f"{field} {value} is larger than the teacher's {full}: pruning only removes",
                how=f"pick {field} <= {full} (e.g. {', '.join(map(str, _nearest(value, _size_choices(full), 2)))})",
                field=field,
            )
    heads, kv = num_attention_heads, num_key_value_heads
    layouts = valid_head_layouts(teacher)
    if heads is not None or kv is not None:
        if heads is None:  # keep as many query heads per group as the teacher
            heads = (kv or teacher.num_kv_heads) * (teacher.num_heads // teacher.num_kv_heads)
        if kv is None:  # keep all groups if they still divide, else the most groups that do
            kv = max((k for h, k in layouts if h == heads), default=None)
        if kv is None or (heads, kv) not in layouts:
            asked = f"num_attention_heads {heads}" + (f" with num_key_value_heads {kv}" if kv else "")
            below = max((h for h, _ in layouts if h <= heads), default=None)
            above = min((h for h, _ in layouts if h >= heads), default=None)
            near = [hk for hk in layouts if hk[0] in (below, above)]
            raise ShapeError(
                f"{asked} is not a valid head layout for a teacher with {teacher.num_heads} heads in "
                f"{teacher.num_kv_heads} key/value groups (query heads must fill whole groups evenly)",
                how="use one of these (heads/kv): " + ", ".join(f"{h}/{k}" for h, k in sorted(near)),
                field="num_attention_heads" if num_attention_heads is not None else "num_key_value_heads",
            )
    return replace(
        teacher,
        hidden_size=hidden_size or teacher.hidden_size,
        intermediate_size=intermediate_size or teacher.intermediate_size,
        num_layers=num_layers or teacher.num_layers,
        num_heads=heads or teacher.num_heads,
        num_kv_heads=kv or teacher.num_kv_heads,
    )


def _axis_choices(teacher: ModelShape, axes: tuple[str, ...], multiple: int | None = None) -> dict[str, list]:
    return {
        "hidden": _size_choices(teacher.hidden_size, multiple=multiple) if "hidden" in axes else [teacher.hidden_size],
        "mlp": _size_choices(teacher.intermediate_size, multiple=multiple) if "mlp" in axes else [teacher.intermediate_size],
        "depth": list(range(1, teacher.num_layers + 1)) if "depth" in axes else [teacher.num_layers],
        "heads": valid_head_layouts(teacher, multiple) if "heads" in axes else [(teacher.num_heads, teacher.num_kv_heads)],
    }


def _build(teacher: ModelShape, hidden: int, mlp: int, depth: int, heads: tuple[int, int]) -> ModelShape:
    return replace(teacher, hidden_size=hidden, intermediate_size=mlp, num_layers=depth, num_heads=heads[0], num_kv_heads=heads[1])


def smallest_shape(teacher: ModelShape, axes: tuple[str, ...], multiple: int | None = None) -> ModelShape:
    choices = _axis_choices(teacher, axes, multiple)
    return _build(teacher, choices["hidden"][0], choices["mlp"][0], choices["depth"][0], min(choices["heads"]))


def _shrink(teacher: ModelShape, shape: ModelShape, axes: tuple[str, ...]) -> float:
    """How much the most-shrunk chosen axis loses (0 = nothing, 1 = everything)."""
    keep = {
        "hidden": shape.hidden_size / teacher.hidden_size,
        "mlp": shape.intermediate_size / teacher.intermediate_size,
        "depth": shape.num_layers / teacher.num_layers,
        "heads": shape.num_heads / teacher.num_heads,
    }
    return max(1 - keep[a] for a in axes)


def solve_budget(teacher: ModelShape, fraction: float, axes: tuple[str, ...], multiple: int | None = None) -> ModelShape:
    """The most even shrink of the chosen axes whose parameter count lands within 3% (of
    the teacher) under ``fraction`` of the teacher's parameters; with ``multiple``, every
    width the chosen axes get is a multiple of it (see the module docstring)."""
    unknown = [a for a in axes if a not in AXES]
    if unknown or not axes:
        raise ShapeError(f"unknown pruning axes {unknown}" if unknown else "no pruning axes given",
                         how=f"choose from {', '.join(AXES)}", field="axes")
    if multiple:
        _check_multiple(teacher, axes, multiple)
    full = total_parameters(teacher)
    budget = fraction * full
    floor = smallest_shape(teacher, axes, multiple)
    if total_parameters(floor) > budget:
        reachable = total_parameters(floor) / full
        more = [a for a in AXES if a not in axes]
        raise ShapeError(
            f"params {fraction:g} is unreachable by shrinking {', '.join(axes)}: the smallest such shape "
            f"({describe(floor)}) keeps {reachable:.3f} of the teacher's {full / 1e6:.1f}M parameters",
            how=f"ask for params >= {math.ceil(reachable * 1000) / 1000:g}"
            + (f", or also prune {' / '.join(more)} (axes)" if more else ""),
            field="params",
        )
    choices = _axis_choices(teacher, axes, multiple)
    candidates = []
    for hidden, depth, heads in itertools.product(choices["hidden"], choices["depth"], choices["heads"]):
        # Parameters grow linearly with intermediate_size: take the largest that fits.
        fitting = [m for m in choices["mlp"] if total_parameters(_build(teacher, hidden, m, depth, heads)) <= budget]
        if fitting:
            candidates.append(_build(teacher, hidden, fitting[-1], depth, heads))
    tolerance = 0.03 * full
    close = [c for c in candidates if total_parameters(c) >= budget - tolerance]
    if not close:
        return max(candidates, key=total_parameters)
    return min(close, key=lambda c: (round(_shrink(teacher, c, axes), 6), -total_parameters(c)))


def _check_multiple(teacher: ModelShape, axes: tuple[str, ...], multiple: int) -> None:
    """A width multiple the teacher's own widths on the pruned axes allow (else no width of
    that axis could be one)."""
    widths = {"hidden": ("hidden_size", teacher.hidden_size), "mlp": ("intermediate_size", teacher.intermediate_size),
              "heads": ("query heads x head_dim", teacher.num_heads * teacher.head_dim)}
    for axis in axes:
        if axis in widths:
            name, full = widths[axis]
            if full < multiple or (axis == "heads" and not valid_head_layouts(teacher, multiple)):
                raise ShapeError(
                    f"width_multiple {multiple} leaves no choice for the {axis} axis: the teacher's {name} is {full}",
                    how=f"use a width_multiple of at most {full} that divides it (e.g. 32 or 64), or drop '{axis}' from axes",
                    field="width_multiple",
                )


def plan_shape(teacher: ModelShape, config, multiple: int | None = None) -> ModelShape:
    """The student shape a PruneConfig asks for (ShapeError when impossible). ``multiple``
    (default: the config's ``width_multiple`` when it has that field) rounds the widths a
    ``params`` budget solves to multiples of it; explicit sizes are taken as written (recipe
    validation checks them against the quantize stage's group size)."""
    if multiple is None:
        multiple = getattr(config, "width_multiple", None)
    if config.params is not None:
        return solve_budget(teacher, config.params, tuple(config.axes), multiple)
    return check_explicit(
        teacher,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
    )
