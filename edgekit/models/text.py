"""Calibration and evaluation text, and its fixed held-out split.

``builtin:python-docs`` is the stdlib's ``pydoc_data.topics`` joined with newlines
(≈113k SmolLM2 tokens): real English + code, present on every Python, no download. The
held-out split is always the *last* ``eval_tokens`` tokens; calibration may use only the
text before it, so no stage ever calibrates on what it is evaluated on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from edgekit.errors import DataError
from edgekit.hashing import sha256_file

BUILTIN_PYTHON_DOCS = "builtin:python-docs"
TextKind = Literal["builtin", "txt", "jsonl", "dir", "datasets"]


@dataclass(frozen=True)
class TextSource:
    kind: TextKind
    spec: str
    path: Path | None = None

    def files(self) -> list[Path]:
        if self.kind in ("txt", "jsonl"):
            return [self.path]
        if self.kind == "dir":
            return sorted(p for p in self.path.iterdir() if p.suffix in (".txt", ".jsonl") and p.is_file())
        if self.kind == "datasets":
            return sorted(p for p in self.path.rglob("*") if p.is_file())
        return []

    def fingerprint(self) -> dict[str, Any]:
        if self.kind == "builtin":
            import sys

            # pydoc_data changes with the Python version: key on it.
            return {"builtin": self.spec, "python": sys.version.split()[0]}
        return {"files": {p.name: sha256_file(p) for p in self.files()}}

    def read(self, text_field: str = "text") -> str:
        if self.kind == "builtin":
            from pydoc_data import topics

            return "\n".join(topics.topics.values())
        if self.kind == "datasets":
            try:
                import datasets
            except ImportError:
                raise DataError(
                    "this directory is a `datasets` dataset, but the datasets package is not installed",
                    where=str(self.path),
                    how="`pip install datasets`, or give a .txt/.jsonl file instead",
                ) from None
            data = datasets.load_from_disk(str(self.path))
            if hasattr(data, "keys"):  # a DatasetDict: use its first split
                data = data[sorted(data.keys())[0]]
            if text_field not in data.column_names:
                raise DataError(
                    f"dataset has no column '{text_field}' (columns: {', '.join(data.column_names)})",
                    where=str(self.path),
                    how="set data.text_field to the column that holds the text",
                )
            return "\n".join(str(t) for t in data[text_field])
        parts = [_read_file(p, text_field) for p in self.files()]
        return "\n".join(parts)


def _read_file(path: Path, text_field: str) -> str:
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read text: {exc}", where=str(path), how="give a UTF-8 text file") from exc
    if path.suffix != ".jsonl":
        return raw
    texts = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"invalid JSON: {exc.msg}", where=f"{path} line {number}", how="make each line one JSON object") from None
        except (ValueError, RecursionError) as exc:  # a 5000-digit number, hostile nesting
            raise DataError(f"invalid JSON record: {type(exc).__name__}", where=f"{path} line {number}",
                            how="make each line one flat JSON object with a text field") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise DataError(
                f"record has no string field '{text_field}'",
                where=f"{path} line {number}",
                how=f"give every line a \"{text_field}\" string, or set data.text_field",
            )
        texts.append(record[text_field])
    return "\n".join(texts)


def resolve_text_source(spec: str, *, base_dir: Path | None = None) -> TextSource:
    if spec.startswith("builtin:"):
        if spec != BUILTIN_PYTHON_DOCS:
            raise DataError(
                f"unknown built-in text '{spec}'", where="data.source", how=f"use '{BUILTIN_PYTHON_DOCS}' or a file path"
            )
        return TextSource("builtin", spec)
    path = Path(spec).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.exists():
        raise DataError(
            f"data path {spec!r} does not exist",
            where=str(path),
            how=f"fix the path (relative to the recipe's directory) or use '{BUILTIN_PYTHON_DOCS}'",
        )
    if not path.is_file() and not path.is_dir():
        raise DataError("data path is neither a regular file nor a directory (a FIFO or a device?)", where=str(path),
                        how="give a .txt or .jsonl file or a directory of them")
    if path.is_file():
        if path.suffix not in (".txt", ".jsonl"):
            raise DataError(f"unsupported data file type '{path.suffix}'", where=str(path), how="give a .txt or .jsonl file")
        return TextSource("jsonl" if path.suffix == ".jsonl" else "txt", spec, path.resolve())
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        return TextSource("datasets", spec, path.resolve())
    source = TextSource("dir", spec, path.resolve())
    if not source.files():
        raise DataError("directory holds no .txt or .jsonl files", where=str(path), how="add text files or point at a file")
    return source


@dataclass(frozen=True)
class TokenSplits:
    calibration: list[int]  # everything before the held-out split
    evaluation: list[int]  # the last eval_tokens tokens (fewer if the text is short)
    window: int

    @property
    def eval_windows(self) -> int:
        return len(self.evaluation) // self.window


def tokenize_splits(text: str, tokenizer: Any, *, eval_tokens: int, window: int, where: str = "data.source") -> TokenSplits:
    """Tokenize once and cut the fixed held-out split from the end."""
    ids = tokenizer(text, verbose=False)["input_ids"]
    held_out = ids[-eval_tokens:] if len(ids) > eval_tokens else list(ids)
    if len(held_out) < window:
        raise DataError(
            f"the evaluation text has {len(held_out)} tokens, shorter than one window of {window}",
            where=where,
            how=f"give more text (at least {window} tokens) or lower data.window",
        )
    return TokenSplits(calibration=list(ids[: len(ids) - len(held_out)]), evaluation=list(held_out), window=window)
