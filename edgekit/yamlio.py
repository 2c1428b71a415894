"""YAML in and out, with line numbers for error messages, and atomic writes.

Only ``yaml.safe_load``/``SafeLoader`` are used: a recipe is data, never code.
"""

from __future__ import annotations

import difflib
import json
import math
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


# Bounds on every input file edgekit parses (recipes, targets, JSON configs): a file within
# them is accepted or refused in well under 2 s and 300 MB; past them, a one-line error says
# which bound and by how much.
MAX_INPUT_BYTES = 1 << 20  # 1 MiB
MAX_DEPTH = 64  # nesting of mappings/lists, aliases followed
MAX_NODES = 100_000  # values after alias expansion
MAX_ALIASES = 1_000
MAX_INT_DIGITS = 24  # |n| < 10**24: any size, count or budget a recipe means


class InputLimitError(ValueError):
    """An input file is over one of the bounds above (raised inside the parsers)."""


def read_input_text(path: Path | str, *, error_cls: type[EdgekitError], what: str = "file",
                    max_bytes: int = MAX_INPUT_BYTES) -> str:
    """The text of a small UTF-8 input file, refused with one line when it is missing, not a
    regular file (a FIFO, a device or a directory is never opened for reading: no hang), over
    ``max_bytes``, not UTF-8, or holds a NUL byte."""
    import stat

    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise error_cls(f"{what} not found", where=str(path),
                        how="check the path (it is resolved relative to the current directory)") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path itself
        raise error_cls(f"cannot read {what}: {exc}", where=ascii(str(path)), how="give the path of a readable file") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "a FIFO" if stat.S_ISFIFO(info.st_mode) else \
            "a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode) else "not a regular file"
        raise error_cls(f"{what} is {kind}", where=str(path), how="give the path of a regular file")
    if info.st_size > max_bytes:
        raise error_cls(f"{what} is {info.st_size} bytes, over the limit of {max_bytes}", where=str(path),
                        how="give a smaller file (an edgekit input file is a few kB)")
    try:
        # O_NONBLOCK: if the path was swapped for a FIFO after the stat, open does not hang.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise OSError("not a regular file")
            raw = handle.read(max_bytes + 1)
    except OSError as exc:
        raise error_cls(f"cannot read {what}: {exc.strerror or exc}", where=str(path),
                        how="make it a readable regular file") from None
    if len(raw) > max_bytes:
        raise error_cls(f"{what} is over the limit of {max_bytes} bytes", where=str(path), how="give a smaller file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise error_cls(f"{what} is not valid UTF-8 (byte {exc.start})", where=f"{path} line {line}",
                        how="save it as UTF-8 text") from None
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise error_cls(f"{what} contains a NUL byte", where=f"{path} line {line}",
                        how="remove it (an edgekit input file is plain text)")
    return text


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader whose composer refuses nesting past MAX_DEPTH, more than MAX_NODES nodes and
    more than MAX_ALIASES aliases while it reads, before any of it is built into Python objects."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0
        self._aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise _limit(event.start_mark, f"more than {MAX_ALIASES} aliases")
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise _limit(event.start_mark, f"more than {MAX_NODES} values")
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _limit(event.start_mark, f"nested deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _limit(mark: Any, problem: str) -> yaml.MarkedYAMLError:
    return yaml.composer.ComposerError(None, None, problem, mark)


_NON_FINITE = {".inf", "+.inf", "-.inf", ".nan"}


def _check_tree(root: yaml.Node) -> None:
    """Bounds that need the alias-expanded tree (size, depth, cycles) and the values no recipe
    means: duplicate keys, non-finite numbers, integers past MAX_INT_DIGITS. Memoized per node,
    so an alias bomb costs its unique nodes, not its expansion."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()

    def visit(node: yaml.Node, depth: int) -> int:
        if depth > MAX_DEPTH:
            raise _limit(node.start_mark, f"nested deeper than {MAX_DEPTH} levels (aliases followed)")
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in on_path:
            raise _limit(node.start_mark, "an alias refers to a value that contains it (a cycle)")
        on_path.add(key)
        size = 1
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    line = key_node.start_mark.line + 1
                    if key_node.value in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"duplicate key '{key_node.value}' (first on line {seen[key_node.value]}, "
                            f"again on line {line})", key_node.start_mark)
                    seen[key_node.value] = line
                size += visit(key_node, depth + 1) + visit(value_node, depth + 1)
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                size += visit(item, depth + 1)
        else:
            _check_scalar(node)
        on_path.discard(key)
        if size > MAX_NODES:
            raise _limit(node.start_mark, f"more than {MAX_NODES} values once aliases are expanded (an alias bomb?)")
        sizes[key] = size
        return size

    visit(root, 1)


def _check_scalar(node: yaml.ScalarNode) -> None:
    if node.tag == "tag:yaml.org,2002:float" and node.value.lower() in _NON_FINITE:
        raise yaml.constructor.ConstructorError(
            None, None, f"non-finite number {node.value} (only finite numbers are meaningful here)", node.start_mark)
    if node.tag == "tag:yaml.org,2002:int":
        digits = node.value.lstrip("+-").replace("_", "")
        if len(digits) > MAX_INT_DIGITS:
            raise _limit(node.start_mark, f"an integer of {len(digits)} digits (at most {MAX_INT_DIGITS})")


def _walk(node: yaml.Node, loc: Loc, lines: dict[Loc, int]) -> None:
    lines.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            if not isinstance(key, (str, int)):
                continue  # a complex key: no YAML path to report lines for
            lines[loc + (key,)] = key_node.start_mark.line + 1
            _walk(value_node, loc + (key,), lines)
            lines[loc + (key,)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _walk(item, loc + (index,), lines)


def _check_events(text: str) -> None:
    """Depth, value and alias bounds from libyaml's event stream (C speed), before anything is
    composed: a hostile file is refused after reading at most MAX_NODES values of it."""
    depth = nodes = aliases = 0
    for event in yaml.parse(text, Loader=yaml.CSafeLoader):
        if isinstance(event, (yaml.ScalarEvent, yaml.AliasEvent, yaml.CollectionStartEvent)):
            nodes += 1
            if nodes > MAX_NODES:
                raise _limit(event.start_mark, f"more than {MAX_NODES} values")
            if isinstance(event, yaml.AliasEvent):
                aliases += 1
                if aliases > MAX_ALIASES:
                    raise _limit(event.start_mark, f"more than {MAX_ALIASES} aliases")
            elif isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth >= MAX_DEPTH:
                    raise _limit(event.start_mark, f"nested deeper than {MAX_DEPTH} levels")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def parse_yaml_text(text: str) -> tuple[Any, yaml.Node | None]:
    """``yaml.safe_load`` within the bounds above; raises yaml.YAMLError past them. libyaml's
    C parser where the yaml package has it (a 1 MB file in well under a second), else the
    pure-Python parser with the same bounds checked while it composes."""
    if getattr(yaml, "__with_libyaml__", False):
        _check_events(text)
        loader: Any = yaml.CSafeLoader(text)
    else:
        loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, None
        _check_tree(node)
        return loader.construct_document(node), node
    finally:
        loader.dispose()


def load_yaml(path: Path | str, *, error_cls: type[EdgekitError], what: str = "file") -> tuple[Any, LineMap]:
    """Read a YAML file safely, returning the data and a :class:`LineMap`.

    Raises ``error_cls`` (one line, with the line number) for a missing, oversized, malformed
    or hostile file: see the MAX_* bounds above and :func:`read_input_text`.
    """
    path = Path(path)
    text = read_input_text(path, error_cls=error_cls, what=what)
    try:
        data, node = parse_yaml_text(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = exc.problem or exc.context or "invalid YAML"
        limit = any(word in problem for word in ("more than", "deeper than", "nesting depth", "digits", "cycle"))
        how = ("simplify the file (edgekit's limits: "
               f"{MAX_INPUT_BYTES} bytes, {MAX_NODES} values, nesting {MAX_DEPTH}, {MAX_ALIASES} aliases)") if limit \
            else "remove one of the two entries" if problem.startswith("duplicate key") \
            else "give a finite number" if problem.startswith("non-finite") \
            else "fix the YAML syntax there (indentation, a missing ':' or an unclosed quote)"
        raise error_cls(f"malformed YAML: {problem}", where=f"{path}{line}", how=how) from None
    except (yaml.YAMLError, ValueError, TypeError, RecursionError) as exc:
        # ValueError/TypeError: a value the constructor cannot build (a bad timestamp, an
        # unhashable key); RecursionError cannot happen within MAX_DEPTH but is never a traceback.
        raise error_cls(f"malformed YAML: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                        where=str(path), how="fix the value there") from None
    lines: dict[Loc, int] = {}
    if node is not None:
        _walk(node, (), lines)
    return data, LineMap(lines)


def load_json_file(path: Path | str, *, error_cls: type[EdgekitError], what: str = "JSON file",
                   max_bytes: int = MAX_INPUT_BYTES) -> Any:
    """A small JSON input file (a model's config.json, a bundle's runtime.json) parsed within
    the same bounds: size, nesting (no RecursionError), finite numbers only (``NaN`` and
    ``Infinity`` are refused), integers of at most MAX_INT_DIGITS digits."""
    text = read_input_text(path, error_cls=error_cls, what=what, max_bytes=max_bytes)
    return parse_json_text(text, error_cls=error_cls, what=what, where=str(path))


def parse_json_text(text: str, *, error_cls: type[EdgekitError], what: str, where: str) -> Any:
    def refuse_constant(name: str) -> Any:
        raise InputLimitError(f"non-finite number {name}")

    def bounded_int(digits: str) -> int:
        if len(digits.lstrip("-")) > MAX_INT_DIGITS:
            raise InputLimitError(f"an integer of {len(digits.lstrip('-'))} digits (at most {MAX_INT_DIGITS})")
        return int(digits)

    depth = _json_depth(text)
    if depth > MAX_DEPTH:
        raise error_cls(f"{what} is nested deeper than {MAX_DEPTH} levels", where=where, how="give a flatter file")
    try:
        return json.loads(text, parse_constant=refuse_constant, parse_int=bounded_int)
    except InputLimitError as exc:
        raise error_cls(f"{what} holds {exc}", where=where, how="give finite numbers of sensible size") from None
    except json.JSONDecodeError as exc:
        raise error_cls(f"{what} is not valid JSON: {exc.msg}", where=f"{where} line {exc.lineno}",
                        how="fix the JSON syntax there") from None
    except (ValueError, RecursionError) as exc:
        raise error_cls(f"{what} is not valid JSON: {exc}", where=where, how="fix the file") from None


def _json_depth(text: str) -> int:
    """The deepest bracket nesting of a JSON text, strings skipped (a linear scan: json's own
    parser recurses and would raise RecursionError on a hostile file)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


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
    message = err["msg"].removeprefix("Value error, ")  # pydantic's tag for a validator's ValueError
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


def finite_json(data: Any) -> Any:
    """``data`` with every non-finite float (a diverged perplexity, say) replaced by None:
    ``Infinity``/``NaN`` are not JSON, and other readers (jq, browsers, Go) refuse them."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: finite_json(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_json(value) for value in data]
    return data


def atomic_write_json(path: Path | str, data: Any) -> None:
    """JSON through a temp file + rename; strict JSON: non-finite numbers are written as null."""
    text = json.dumps(finite_json(data), indent=2, sort_keys=False, default=str, allow_nan=False)
    atomic_write_text(path, text + "\n")


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)
