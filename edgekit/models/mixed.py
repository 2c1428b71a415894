"""``builtin:mixed``: several kinds of text from the Python standard library, interleaved.

Three kinds, each read from the running interpreter's own standard library (no download, no
third-party package):

- ``reference``: ``pydoc_data.topics``, the language and library reference (English prose
  with code examples; the whole of ``builtin:python-docs``);
- ``docstrings``: module, class and function docstrings of stdlib modules (API prose,
  including the RFC-heavy ``email`` / ``http`` ones), each under its qualified name;
- ``code``: the source of other stdlib modules, comments and docstrings kept (at most
  :data:`CODE_MAX_CHARS` characters of each, so many modules contribute).

Modules are taken in a fixed pseudo-random order (sha256 of their path), so every part of the
stdlib contributes, and each module goes to one kind only (alternately), so no text appears
twice. Packages that distributions split out or drop (``test``, ``idlelib``, ``tkinter``,
``lib2to3``, ``distutils``, ``ensurepip``, ``turtledemo``), generated tables (``encodings``),
``pydoc_data`` (already the reference) and anything under ``site-packages`` /
``dist-packages`` are never read: the out-of-domain evaluation text
(``builtin:package-readmes``, the READMEs in installed packages' metadata) lives there.

The kinds are cut into chunks of about :data:`CHUNK_CHARS` characters at line ends and
interleaved round-robin (reference, docstrings, code, reference, ...) until the reference is
used up, so every stretch of the text, the held-out end included, holds every kind in
equal shares. The text depends on the Python version (and on distribution patches to the
stdlib): its sha256 and the version are part of its fingerprint.
"""

from __future__ import annotations

import ast
import hashlib
import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

KINDS = ("reference", "docstrings", "code")
CHUNK_CHARS = 2048
# Directories never read: split out or dropped by distributions (so the text would differ
# between installs of one version), generated tables, the reference itself, and installed
# third-party packages (where the out-of-domain READMEs are).
EXCLUDED_DIRS = frozenset({
    "site-packages", "dist-packages", "__pycache__", "lib-dynload", "test", "tests", "idle_test", "idlelib",
    "tkinter", "turtledemo", "lib2to3", "distutils", "ensurepip", "encodings", "pydoc_data", "__phello__",
})
# Files that describe the build machine, not Python.
EXCLUDED_PREFIXES = ("_sysconfigdata", "sitecustomize", "usercustomize", "__hello__")
# Each module gives the code kind at most this many characters (cut at a blank line), so the
# code comes from many modules rather than a few long ones.
CODE_MAX_CHARS = 8_000
# A docstring shorter than this many words ("Return self.") says nothing worth training on.
MIN_DOCSTRING_WORDS = 4


@dataclass(frozen=True)
class MixedCorpus:
    text: str
    spans: tuple[tuple[str, int, int], ...]  # (kind, start, end) of each chunk in text, in order
    parts: dict[str, dict[str, Any]]  # kind -> {"characters", "chunks", "share", "from"}
    sha256: str
    python: str

    def fingerprint(self) -> dict[str, Any]:
        return {"builtin": "builtin:mixed", "python": self.python, "sha256": self.sha256,
                "characters": len(self.text), "chunk_chars": CHUNK_CHARS, "parts": self.parts}

    def token_shares(self, starts: list[int], cut: int) -> dict[str, dict[str, Any]]:
        """Tokens of each kind before token ``cut`` (calibration / training) and from it on (the
        held-out end), given each token's start offset in :attr:`text`."""
        import bisect

        chunk_starts = [s for _, s, _ in self.spans]
        counts = {part: {kind: 0 for kind in KINDS} for part in ("calibration", "evaluation")}
        for index, offset in enumerate(starts):
            chunk = max(0, bisect.bisect_right(chunk_starts, offset) - 1)
            counts["calibration" if index < cut else "evaluation"][self.spans[chunk][0]] += 1
        out: dict[str, dict[str, Any]] = {}
        for part, by_kind in counts.items():
            total = sum(by_kind.values()) or 1
            out[part] = {kind: {"tokens": n, "share": round(n / total, 4)} for kind, n in by_kind.items()}
        return out


def stdlib_dir() -> Path:
    """The running interpreter's standard library (a venv's base interpreter's)."""
    import sysconfig

    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_modules(root: Path) -> list[str]:
    """The stdlib's ``.py`` files (relative POSIX paths) that :mod:`builtin:mixed <edgekit.models.mixed>`
    may read, in a fixed pseudo-random order: sha256 of the path."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in EXCLUDED_DIRS and not d.startswith("config-")]
        for name in files:
            if name.endswith(".py") and not name.startswith(EXCLUDED_PREFIXES):
                found.append((Path(folder) / name).relative_to(root).as_posix())
    return sorted(found, key=lambda rel: hashlib.sha256(rel.encode()).hexdigest())


def _read(root: Path, rel: str) -> str | None:
    try:
        return (root / rel).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _module_name(rel: str) -> str:
    name = rel[:-3].replace("/", ".")
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def _docstrings(root: Path, modules: list[str], used: list[str]) -> Iterator[str]:
    for rel in modules:
        source = _read(root, rel)
        if source is None:
            continue
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            continue
        used.append(rel)
        stack: list[tuple[str, Any]] = [(_module_name(rel), tree)]
        while stack:
            name, node = stack.pop()
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc.split()) >= MIN_DOCSTRING_WORDS:
                yield f"{name}\n{doc}\n\n"
            children = [c for c in getattr(node, "body", ()) if isinstance(c, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
            stack.extend((f"{name}.{c.name}", c) for c in reversed(children))  # source order


def _code(root: Path, modules: list[str], used: list[str]) -> Iterator[str]:
    for rel in modules:
        source = _read(root, rel)
        if source is None or not source.strip():
            continue
        used.append(rel)
        source = source.rstrip()
        if len(source) > CODE_MAX_CHARS:
            cut = source.rfind("\n\n", 0, CODE_MAX_CHARS)
            source = source[: cut if cut > 0 else CODE_MAX_CHARS].rstrip()
        yield f"# {rel}\n{source}\n\n"


def _chunks(records: Iterator[str], size: int = CHUNK_CHARS) -> Iterator[str]:
    """``size``-character chunks of the records' lines, cut at line ends (a longer line alone)."""
    pending: list[str] = []
    length = 0
    for record in records:
        for line in record.splitlines(keepends=True):
            while len(line) > size:  # one line longer than a chunk: cut it
                if pending:
                    yield "".join(pending)
                    pending, length = [], 0
                yield line[:size]
                line = line[size:]
            if length + len(line) > size and pending:
                yield "".join(pending)
                pending, length = [], 0
            pending.append(line)
            length += len(line)
    if pending:
        yield "".join(pending)


@lru_cache(maxsize=2)
def mixed_corpus(root: str | None = None) -> MixedCorpus:
    """The text of ``builtin:mixed`` (built once per process: about a second)."""
    from pydoc_data import topics

    base = Path(root) if root is not None else stdlib_dir()
    modules = stdlib_modules(base)
    used: dict[str, list[str]] = {"docstrings": [], "code": []}
    streams = {
        "reference": _chunks(iter(["\n".join(topics.topics.values())])),
        "docstrings": _chunks(_docstrings(base, modules[0::2], used["docstrings"])),
        "code": _chunks(_code(base, modules[1::2], used["code"])),
    }
    chunks: list[tuple[str, str]] = []
    while True:
        cycle = [(kind, next(streams[kind], None)) for kind in KINDS]
        if any(chunk is None for _, chunk in cycle):
            break  # stop with complete cycles: every stretch of the text holds every kind
        chunks.extend(cycle)  # type: ignore[arg-type]
    pieces, spans, offset = [], [], 0
    for kind, chunk in chunks:
        body = chunk.rstrip("\n") + "\n"
        pieces.append(body)
        spans.append((kind, offset, offset + len(body)))
        offset += len(body) + 1
    text = "\n".join(pieces)
    sizes = {kind: sum(e - s for k, s, e in spans if k == kind) for kind in KINDS}
    total = sum(sizes.values()) or 1
    sources = {"reference": f"pydoc_data.topics ({len(topics.topics)} topics)",
               "docstrings": f"{len(used['docstrings'])} stdlib modules",
               "code": f"{len(used['code'])} stdlib modules"}
    parts = {kind: {"characters": sizes[kind], "chunks": sum(1 for k, _, _ in spans if k == kind),
                    "share": round(sizes[kind] / total, 4), "from": sources[kind]} for kind in KINDS}
    if not spans:
        from edgekit.errors import DataError

        raise DataError(f"builtin:mixed found no stdlib source files under {base}", where="data.source",
                        how="use a Python installation that ships its standard library as .py files, or builtin:python-docs")
    return MixedCorpus(text=text, spans=tuple(spans), parts=parts, sha256=hashlib.sha256(text.encode()).hexdigest(),
                       python=sys.version.split()[0])


__all__ = ["CHUNK_CHARS", "KINDS", "MixedCorpus", "mixed_corpus", "stdlib_dir", "stdlib_modules"]
