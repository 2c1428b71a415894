"""Write docs/recipe_reference.md from the recipe's pydantic models: every key, its type, its
default and its description, for the recipe's top level and every registered stage.

    python scripts/gen_recipe_reference.py            # rewrite docs/recipe_reference.md
    python scripts/gen_recipe_reference.py --check    # exit 1 if the file is out of date

The descriptions are the ``Field(description=...)`` strings in edgekit/recipe.py,
edgekit/runtime/config.py (the ``runtime:`` section) and each stage's config class, so the
reference cannot drift from the code (tests/test_recipe.py runs --check).
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "recipe_reference.md"


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in args)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (list, tuple):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping of {_type_name(args[1])}" if len(args) == 2 else "mapping"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type):
        if hasattr(annotation, "model_fields"):
            return f"[{annotation.__name__}](#{annotation.__name__.lower()})"
        return annotation.__name__
    return str(annotation)


def _default(field: Any) -> str:
    from pydantic_core import PydanticUndefined

    if field.is_required():
        return "**required**"
    if field.default_factory is not None:
        value = field.default_factory()
        value = value.model_dump(mode="json") if hasattr(value, "model_dump") else value
    elif field.default is PydanticUndefined:
        return ""
    else:
        value = field.default
    return f"`{json.dumps(value, default=str)}`"


def _constraints(field: Any) -> list[Any]:
    """The field's constraints, with those of a shared ``Annotated`` type inside ``X | None``
    (pydantic keeps those on the union's member, not on the field)."""
    found, stack = list(field.metadata), list(typing.get_args(field.annotation))
    while stack:
        annotation = stack.pop(0)
        if typing.get_origin(annotation) is typing.Annotated:
            for item in typing.get_args(annotation)[1:]:
                found += getattr(item, "metadata", [item])
        stack.extend(typing.get_args(annotation))
    return found


def _bounds(field: Any) -> str:
    parts = []
    for item in _constraints(field):
        for name, symbol in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"), ("min_length", "min length"),
                             ("max_length", "max length")):
            value = getattr(item, name, None)
            if value is not None:
                parts.append(f"{symbol} {value}")
    return f" ({', '.join(parts)})" if parts else ""


def _model_of(annotation: Any) -> Any:
    if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
        return annotation
    return None


def _table(model: Any) -> list[str]:
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for name, field in model.model_fields.items():
        key = field.alias or name
        nested = _model_of(field.annotation)
        description = field.description or (nested.__doc__ or "").strip().split("\n")[0] if nested else field.description or ""
        description = description.replace("|", "\\|").replace("\n", " ")
        default = "see below" if nested is not None and not field.is_required() else _default(field)
        lines.append(f"| `{key}` | {_type_name(field.annotation)}{_bounds(field)} | {default} | {description} |")
    return lines


def _nested(model: Any, seen: set[str]) -> list[Any]:
    found = []
    for field in model.model_fields.values():
        stack = [field.annotation]
        while stack:
            annotation = stack.pop()
            stack.extend(typing.get_args(annotation))
            if isinstance(annotation, type) and hasattr(annotation, "model_fields") and annotation.__name__ not in seen:
                seen.add(annotation.__name__)
                found.append(annotation)
                found.extend(_nested(annotation, seen))
    return found


def render() -> str:
    from edgekit.pipeline.registry import all_stages
    from edgekit.recipe import Recipe

    out = [
        "# Recipe reference",
        "",
        "Generated from the recipe's pydantic models by `python scripts/gen_recipe_reference.py`; do not edit by",
        "hand. Every model is strict: an unknown key is an error naming the file, line and the closest valid key.",
        "Numbers must be finite. Names that become paths follow the one name rule (docs/security.md).",
        "",
        "## Recipe",
        "",
        *_table(Recipe),
    ]
    for model in _nested(Recipe, {"Recipe", "StageSpec"}):
        if model.__name__ == "StageSpec":
            continue
        out += ["", f"## {model.__name__}", "", (model.__doc__ or "").strip().splitlines()[0] if model.__doc__ else "", "",
                *_table(model)]
    out += ["", "## Stages", "",
            "Each entry of `stages:` is `type:` plus an optional unique `name:` (default: the type, then `type-2`, …)",
            "and the stage's own keys below. `- load` is shorthand for `- type: load`.", ""]
    documented: set[str] = set()  # a sub-section shared by stages (generation:) is written once; the others link to it
    for stage in sorted(all_stages(), key=lambda s: s.type):
        out += [f"### `{stage.type}`", "", stage.summary, ""]
        if stage.config.model_fields:
            out += _table(stage.config)
        else:
            out.append("(no parameters)")
        out.append("")
        for model in _nested(stage.config, {stage.config.__name__} | documented):  # a stage's own sub-sections (e.g. distill's generation:)
            documented.add(model.__name__)
            out += [f"#### {model.__name__}", "", (model.__doc__ or "").strip().splitlines()[0] if model.__doc__ else "", "",
                    *_table(model), ""]
    return "\n".join(line.rstrip() for line in out).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/recipe_reference.md is out of date")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT.relative_to(REPO)} is out of date: run python scripts/gen_recipe_reference.py", file=sys.stderr)
            return 1
        return 0
    from edgekit.yamlio import atomic_write_text

    atomic_write_text(OUT, text)
    print(f"wrote {OUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
