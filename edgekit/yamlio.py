"""YAML in and out, with line numbers for error messages, and atomic writes.

Only ``yaml.safe_load``/``SafeLoader`` are used: a recipe is data, never code.
"""

from __future__ import annotations

import difflib
import json
import os
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from edgekit.errors import EdgekitError

Loc = tuple[Union[str, int], ...]


def format_loc(loc: Loc) -> str:
    """``('stages', 2, 'opset')`` -> ``stages[2].opset``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "<top level>"


class LineMap:
    """Maps a YAML path (tuple of keys/indices) to the 1-based line where it starts."""

    def __init__(self, lines: dict[Loc, int]):
        self._lines = lines

    def line_for(self, loc: Loc) -> int | None:
        # The deepest existing prefix: a missing key reports its parent's line.
        for end in range(len(loc), -1, -1):
            line = self._lines.get(tuple(loc[:end]))
            if line is not None:
                return line
        return None

    def where(self, path: Path | str, loc: Loc) -> str:
        line = self.line_for(loc)
        at = f" line {line}" if line else ""
        return f"{path}{at}: {format_loc(loc)}"


def _walk(node: yaml.Node, loc: Loc, lines: dict[Loc, int]) -> None:
    lines.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            lines[loc + (key,)] = key_node.start_mark.line + 1
            _walk(value_node, loc + (key,), lines)
            lines[loc + (key,)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _walk(item, loc + (index,), lines)


def load_yaml(path: Path | str, *, error_cls: type[EdgekitError], what: str = "file") -> tuple[Any, LineMap]:
    """Read a YAML file safely, returning the data and a :class:`LineMap`.

    Raises ``error_cls`` (one line, with the line number) for a missing or malformed file.
    """
    path = Path(path)
    if not path.is_file():
        raise error_cls(
            f"{what} not found",
            where=str(path),
            how="check the path (it is resolved relative to the current directory)",
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise error_cls(f"cannot read {what}: {exc}", where=str(path), how="make it a readable UTF-8 text file") from exc
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = exc.problem or exc.context or "invalid YAML"
        raise error_cls(
            f"malformed YAML: {problem}",
            where=f"{path}{line}",
            how="fix the YAML syntax there (indentation, a missing ':' or an unclosed quote)",
        ) from exc
    except yaml.YAMLError as exc:
        raise error_cls(f"malformed YAML: {exc}", where=str(path), how="fix the YAML syntax") from exc
    lines: dict[Loc, int] = {}
    if node is not None:
        _walk(node, (), lines)
    return data, LineMap(lines)


# --- pydantic errors -> one line -------------------------------------------------------


def _unwrap(annotation: Any) -> Any:
    """The pydantic model class that a field annotation leads to, if any."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _unwrap(arg)
            if found is not None:
                return found
        return None
    if origin in (list, tuple, typing.Annotated):
        args = typing.get_args(annotation)
        return _unwrap(args[0]) if args else None
    if origin is dict:
        args = typing.get_args(annotation)
        return _unwrap(args[1]) if len(args) == 2 else None
    if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
        return annotation
    return None


def valid_keys(model_cls: Any, loc: Loc) -> list[str] | None:
    """The field names allowed at ``loc`` inside ``model_cls`` (None if unknown)."""
    current = model_cls
    for part in loc:
        if current is None:
            return None
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part)
        if field is None:
            return None
        current = _unwrap(field.annotation)
    if current is None:
        return None
    return [field.alias or name for name, field in current.model_fields.items()]


def pydantic_error(
    exc: Any,
    *,
    path: Path | str,
    lines: LineMap,
    model_cls: Any,
    error_cls: type[EdgekitError],
    loc_prefix: Loc = (),
) -> EdgekitError:
    """Turn the first error of a ``pydantic.ValidationError`` into one actionable line."""
    err = exc.errors()[0]
    # Union members add their type name to the location: drop those tags.
    loc = loc_prefix + tuple(p for p in err["loc"] if not (isinstance(p, str) and p[:1].isupper() or "[" in str(p)))
    kind = err["type"]
    where = lines.where(path, loc)
    if kind == "extra_forbidden":
        key = str(loc[-1])
        keys = valid_keys(model_cls, loc[len(loc_prefix) : -1]) or []
        close = difflib.get_close_matches(key, keys, n=1)
        action = f"rename it to '{close[0]}'" if close else "remove it"
        valid = f" (valid keys here: {', '.join(keys)})" if keys else ""
        return error_cls(f"unknown key '{key}'", where=where, how=action + valid)
    if kind == "missing":
        return error_cls(f"missing required key '{loc[-1]}'", where=where, how=f"add '{loc[-1]}:' there")
    message = err["msg"]
    value = err.get("input")
    shown = json.dumps(value, default=str) if not isinstance(value, dict) else "a mapping"
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return error_cls(f"invalid value {shown}: {message}", where=where, how=f"correct '{format_loc(loc)}'")


# --- atomic writes -----------------------------------------------------------------------


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file + rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates 0600; give the file the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: Path | str, write: Any) -> None:
    """``write(tmp_path)`` then rename over ``path``: a reader never sees a partial file
    (for writers that want a path, e.g. safetensors' ``save_file``)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: Path | str, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)
