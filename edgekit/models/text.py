"""Calibration, distillation and evaluation text, and its fixed held-out split.

Sources (``data.source``; docs/data.md):

- ``builtin:python-docs``: the stdlib's ``pydoc_data.topics`` joined with newlines (113,108
  SmolLM2 tokens on Python 3.11): real English + code, present on every Python, no download;
- ``builtin:mixed``: that reference, stdlib docstrings and stdlib source code interleaved in
  2 kB chunks (:mod:`edgekit.models.mixed`; 366,595 SmolLM2 tokens on Python 3.11.7);
- a local ``.txt``, ``.jsonl`` (one JSON object per line, ``data.text_field``) or ``.parquet``
  file, or a directory of them;
- a ``datasets`` ``save_to_disk`` directory (read with pyarrow: ``datasets`` is not needed);
- ``hf:ORG/NAME``: a Hugging Face dataset by id (``data.subset``, ``data.split``,
  ``data.streaming``, ``data.token_budget``), read from the local Hugging Face cache when it
  is there (``huggingface-cli download --repo-type dataset ...``) and never from the network
  when ``HF_DATASETS_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``.

Every source is read record by record and stops once it has the text for ``token_budget``
tokens (:data:`READ_CHARS_PER_TOKEN` characters per token, then trimmed to exactly the budget
by :func:`tokenize_splits`): a 10B-token corpus is never loaded whole. The held-out split is
always the *last* ``eval_tokens`` tokens of what was taken; calibration and distillation use
only the text before it, so no stage ever trains or calibrates on what it is evaluated on.

:func:`estimate_tokens` and :func:`data_budget_rows` / :func:`check_data_budget` size the
text against what the recipe's stages consume, before any stage runs (no tokenizing).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

from edgekit.errors import DataError
from edgekit.hashing import sha256_file

BUILTIN_PYTHON_DOCS = "builtin:python-docs"
# Several kinds of stdlib text interleaved (edgekit.models.mixed); never the out-of-domain READMEs.
BUILTIN_MIXED = "builtin:mixed"
# Out-of-domain held-out text (docs/data.md, "Evaluation sets"): the PyPI long
# descriptions (README files) that edgekit's own dependencies ship in their installed METADATA.
BUILTIN_PACKAGE_READMES = "builtin:package-readmes"
BUILTINS = (BUILTIN_PYTHON_DOCS, BUILTIN_MIXED, BUILTIN_PACKAGE_READMES)
# The packages whose READMEs make builtin:package-readmes, in this order: edgekit's direct
# dependencies (pyproject.toml), so every install has them. A missing one is skipped (and
# the fingerprint says so); versions and the text's sha256 are recorded with every score.
README_PACKAGES = (
    "torch", "transformers", "onnx", "onnxruntime", "accelerate", "tokenizers", "safetensors", "nncf", "optimum-onnx",
    "numpy", "pyarrow", "rich", "click", "jinja2", "starlette", "uvicorn", "h11", "cryptography", "prometheus-client",
    "matplotlib", "gguf", "pydantic", "pyyaml",
)
# Each README contributes at most this many characters (cut at a paragraph end), so no one
# package (pydantic's README carries its whole changelog) dominates the text.
README_MAX_CHARS = 12_000
HUB_PREFIX = "hf:"
TextKind = Literal["builtin", "txt", "jsonl", "parquet", "dir", "datasets", "hub"]
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")

# Token estimates without a tokenizer. Byte-level BPE tokenizers with large vocabularies
# (SmolLM2 49k, Qwen2 152k, Llama 3 128k) take 3.5-4.5 characters per token on English and
# code: the python docs measure 4.11 with SmolLM2's. Small vocabularies take fewer.
CHARS_PER_TOKEN = 4.0
# read() takes this many characters per budget token, so that even a tokenizer that needs 8
# characters per token still finds token_budget tokens; tokenize_splits then trims to exactly
# the budget.
READ_CHARS_PER_TOKEN = 8
# More passes over the same distillation text than this is memorising it: refused unless the
# recipe says data.allow_repeat.
MAX_DISTILL_PASSES = 4.0
# builtin:python-docs measured with SmolLM2-135M's tokenizer, keyed by the text's sha256
# (pydoc_data changes with the Python version; elsewhere the count is estimated).
_PYTHON_DOCS_TOKENS = {
    "3.11": (465_048, 113_108),  # (characters, SmolLM2 tokens)
}
# builtin:mixed measured with SmolLM2-135M's tokenizer, keyed by the text's sha256 (it changes
# with the Python version and distribution patches to the stdlib); elsewhere characters /
# MIXED_CHARS_PER_TOKEN, the ratio measured here.
_MIXED_TOKENS = {
    "85658f9fe46a29b5a044e54bd1a45c42325a4be2cdf4229a3ed111f0ec9cdb2f": 366_595,  # CPython 3.11.7 (pyenv)
}
MIXED_CHARS_PER_TOKEN = 3.82

_OFFLINE_VALUES = ("1", "true", "yes", "on")
_SPLIT_TOKEN = re.compile(r"[-._ 0-9]+")


def hub_offline() -> bool:
    """True when ``HF_DATASETS_OFFLINE`` or ``HF_HUB_OFFLINE`` forbids the network."""
    return any(os.environ.get(v, "").strip().lower() in _OFFLINE_VALUES for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


@dataclass(frozen=True)
class TextSource:
    kind: TextKind
    spec: str
    path: Path | None = None
    # hub datasets (kind "hub") and save_to_disk DatasetDicts (kind "datasets": split only)
    repo: str | None = None
    subset: str | None = None
    split: str = "train"
    revision: str | None = None
    streaming: bool = False
    # tokens to take from the start of the text (None: all of it)
    token_budget: int | None = None
    text_field: str = "text"
    _hub: Any = field(default=None, compare=False, repr=False)

    def files(self) -> list[Path]:
        if self.kind in ("txt", "jsonl", "parquet"):
            return [self.path]
        if self.kind == "dir":
            return sorted(p for p in self.path.iterdir() if p.suffix in FILE_SUFFIXES and p.is_file())
        if self.kind == "datasets":
            return sorted(p for p in self.path.rglob("*") if p.is_file())
        return []

    def fingerprint(self) -> dict[str, Any]:
        if self.kind == "builtin":
            import sys

            if self.spec == BUILTIN_PACKAGE_READMES:
                # The READMEs change with the installed versions: key on them and on the text.
                return package_readmes_fingerprint()
            if self.spec == BUILTIN_MIXED:
                # The stdlib's files change with the version and distribution patches: the text's sha256.
                from edgekit.models.mixed import mixed_corpus

                return mixed_corpus().fingerprint()
            # pydoc_data changes with the Python version: key on it.
            return {"builtin": self.spec, "python": sys.version.split()[0]}
        if self.kind == "hub":
            # The cached snapshot's commit names the files exactly (hashing a corpus would
            # read it all); not cached: the revision asked for.
            snapshot = _hub_snapshot(self.repo, self.revision)
            return {"hub": self.repo, "subset": self.subset, "split": self.split,
                    "revision": snapshot.name if snapshot is not None else (self.revision or "main")}
        return {"files": {p.name: sha256_file(p) for p in self.files()}}

    # -- reading -------------------------------------------------------------------------

    def iter_text(self, text_field: str | None = None) -> Iterator[str]:
        """The text in pieces, records separated by newlines (``"".join`` of it is
        :meth:`read` without the budget): what a streaming consumer tokenizes piece by piece."""
        text_field = text_field or self.text_field
        first = True
        for record in self._records(text_field):
            if not first:
                yield "\n"
            first = False
            yield from record

    def read(self, text_field: str | None = None, *, max_chars: int | None = None) -> str:
        """The text, at most ``max_chars`` characters (default: ``token_budget`` x
        :data:`READ_CHARS_PER_TOKEN`); records are read lazily and reading stops there."""
        if max_chars is None and self.token_budget is not None:
            max_chars = self.token_budget * READ_CHARS_PER_TOKEN
        if max_chars is None and self.kind == "hub":
            # A hub corpus can be terabytes: never read whole. The recipe's data section has the
            # budget (DataConfig requires it); resolve_data carries it here.
            raise DataError(f"dataset '{self.repo}' read without a token budget", where="data.source",
                            how="read it through edgekit.models.text.resolve_data(recipe.data) or read_token_splits, "
                            "which carry data.token_budget")
        parts: list[str] = []
        total = 0
        for piece in self.iter_text(text_field):
            parts.append(piece)
            total += len(piece)
            if max_chars is not None and total >= max_chars:
                break
        text = "".join(parts)
        return text[:max_chars] if max_chars is not None else text

    def _records(self, text_field: str) -> Iterator[Iterator[str]]:
        """Each record as an iterator of pieces (a large .txt file comes in chunks)."""
        if self.kind == "builtin":
            if self.spec == BUILTIN_PACKAGE_READMES:
                for _, _, text in package_readmes():
                    yield iter([text])
                return
            if self.spec == BUILTIN_MIXED:
                from edgekit.models.mixed import mixed_corpus

                yield iter([mixed_corpus().text])
                return
            from pydoc_data import topics

            yield iter(["\n".join(topics.topics.values())])
            return
        if self.kind == "datasets":
            for text in _iter_saved_dataset(self.path, self.split, text_field):
                yield iter([text])
            return
        if self.kind == "hub":
            for name, opener in _hub_reader(self).files():
                for text in _iter_data_file(name, opener, text_field):
                    yield iter([text])
            return
        for path in self.files():
            if path.suffix == ".txt":
                yield _iter_txt(path)
            else:
                for text in _iter_data_file(str(path), lambda p=path: open(p, "rb"), text_field):
                    yield iter([text])


# -- builtin:package-readmes -----------------------------------------------------------------

_FENCE = re.compile(r"^[\s>]*(```|~~~)")  # also inside a block quote
# Lines that are markup, not prose: HTML, badges and images, reStructuredText directives,
# interactive sessions and shell commands.
_MARKUP_LINE = ("<", "[![", "![", ".. image::", ".. |", ".. raw::", ">>>", "$ ")


def _readme_prose(body: str) -> str:
    """A README's prose: fenced code blocks and markup-only lines dropped, blank runs
    collapsed, at most :data:`README_MAX_CHARS` characters (cut at a paragraph end)."""
    lines, fenced = [], False
    for line in body.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if fenced or line.strip().startswith(_MARKUP_LINE):
            continue
        lines.append(line.rstrip())
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    if len(text) > README_MAX_CHARS:
        cut = text.rfind("\n\n", 0, README_MAX_CHARS)
        text = text[: cut if cut > 0 else README_MAX_CHARS].rstrip()
    return text


def package_readmes() -> list[tuple[str, str, str]]:
    """``(package, version, prose)`` for each installed package of :data:`README_PACKAGES`
    that ships a README in its METADATA (the PyPI long description), in that order: the text of
    ``builtin:package-readmes``. Read from the installed dist-info; nothing is downloaded."""
    import importlib.metadata as metadata

    out = []
    for name in README_PACKAGES:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        meta = dist.metadata
        body = meta.get_payload() if hasattr(meta, "get_payload") else None
        if not body:  # metadata 1.x / 2.0: the description is a header, continuation lines indented
            body = re.sub(r"\n {7}\|?", "\n", meta.get("Description") or "")
        prose = _readme_prose(body if isinstance(body, str) else "")
        if prose:
            out.append((name, dist.version, prose))
    return out


def package_readmes_fingerprint() -> dict[str, Any]:
    """What builtin:package-readmes is on this machine: the packages and versions it was made
    from and the sha256 of its text. Scores on it compare only where the sha256 matches."""
    import hashlib

    readmes = package_readmes()
    text = "\n".join(prose for _, _, prose in readmes)
    return {"builtin": BUILTIN_PACKAGE_READMES, "packages": {name: version for name, version, _ in readmes},
            "sha256": hashlib.sha256(text.encode()).hexdigest(), "characters": len(text)}


# -- local files ------------------------------------------------------------------------------

def _iter_txt(path: Path, chunk: int = 1 << 20) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8") as handle:
            while piece := handle.read(chunk):
                yield piece
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read text: {exc}", where=str(path), how="give a UTF-8 text file") from exc


def _iter_data_file(name: str, opener: Any, text_field: str) -> Iterator[str]:
    """Records of one .jsonl / .parquet / .txt file; ``opener()`` gives a binary file object
    (local, cached or a remote stream)."""
    if name.endswith(".parquet"):
        yield from _iter_parquet(name, opener, text_field)
    elif name.endswith(".jsonl"):
        yield from _iter_jsonl(name, opener, text_field)
    else:
        with opener() as handle:
            try:
                yield handle.read().decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"cannot read text: {exc}", where=name, how="give a UTF-8 text file") from None


def _iter_jsonl(name: str, opener: Any, text_field: str) -> Iterator[str]:
    import io

    with opener() as raw:
        handle = io.TextIOWrapper(raw, encoding="utf-8")
        number = 0
        try:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"invalid JSON: {exc.msg}", where=f"{name} line {number}",
                                    how="make each line one JSON object") from None
                except (ValueError, RecursionError) as exc:  # a 5000-digit number, hostile nesting
                    raise DataError(f"invalid JSON record: {type(exc).__name__}", where=f"{name} line {number}",
                                    how="make each line one flat JSON object with a text field") from None
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise DataError(
                        f"record has no string field '{text_field}'",
                        where=f"{name} line {number}",
                        how=f"give every line a \"{text_field}\" string, or set data.text_field",
                    )
                yield record[text_field]
        except UnicodeDecodeError as exc:
            raise DataError(f"cannot read text: {exc}", where=f"{name} line {number + 1}", how="give a UTF-8 file") from None


def _pyarrow(where: str) -> Any:
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise DataError("reading parquet / Arrow data needs the pyarrow package, which is not installed", where=where,
                        how="`pip install pyarrow` (an edgekit dependency), or give a .txt/.jsonl file instead") from None
    return pyarrow


def _text_column(schema: Any, text_field: str, where: str) -> None:
    pa = _pyarrow(where)
    if text_field not in schema.names:
        raise DataError(f"dataset has no column '{text_field}' (columns: {', '.join(schema.names)})", where=where,
                        how="set data.text_field to the column that holds the text")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"column '{text_field}' holds {kind}, not text", where=where,
                        how="set data.text_field to the column that holds the text")


def _iter_batches_text(batches: Iterator[Any], text_field: str) -> Iterator[str]:
    for batch in batches:
        for value in batch.column(text_field).to_pylist():
            if value is not None:  # a null text is no record
                yield value


def _iter_parquet(name: str, opener: Any, text_field: str) -> Iterator[str]:
    pa = _pyarrow(name)
    with opener() as handle:
        try:
            parquet = pa.parquet.ParquetFile(handle, pre_buffer=False)  # no read-ahead of the whole file
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"not a readable parquet file: {exc}", where=name, how="give a parquet file") from None
        _text_column(parquet.schema_arrow, text_field, name)
        # Row group by row group: a stream over the network reads only what is consumed.
        yield from _iter_batches_text(parquet.iter_batches(columns=[text_field], batch_size=256), text_field)


def _saved_split_dir(path: Path, split: str) -> Path:
    """A save_to_disk Dataset directory, or the ``split`` of a DatasetDict directory."""
    from edgekit.names import path_inside
    from edgekit.yamlio import load_json_file

    manifest = path / "dataset_dict.json"
    if not manifest.exists():
        return path
    splits = load_json_file(manifest, error_cls=DataError, what="dataset_dict.json").get("splits")
    if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
        raise DataError("dataset_dict.json has no list of splits", where=str(manifest), how="save the dataset again with save_to_disk")
    if split not in splits:
        raise DataError(f"the dataset has no split '{split}' (splits: {', '.join(splits)})", where=str(path),
                        how="set data.split to one of them")
    return path_inside(path, split, what="split", where=str(manifest), error_cls=DataError,
                       how="save the dataset again with save_to_disk")


def _iter_saved_dataset(path: Path, split: str, text_field: str) -> Iterator[str]:
    """A ``datasets`` ``save_to_disk`` directory: Arrow IPC stream files listed in state.json."""
    from edgekit.names import check_name
    from edgekit.yamlio import load_json_file

    folder = _saved_split_dir(path, split)
    state = load_json_file(folder / "state.json", error_cls=DataError, what="state.json")
    entries = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(entries, list) or not entries:
        raise DataError("state.json lists no data files", where=str(folder / "state.json"),
                        how="save the dataset again with save_to_disk")
    pa = _pyarrow(str(folder))
    for entry in entries:
        name = entry.get("filename") if isinstance(entry, dict) else None
        check_name(name, what="data file name in state.json", where=str(folder / "state.json"), error_cls=DataError)
        file = folder / name
        try:
            with pa.memory_map(str(file)) as source:
                reader = pa.ipc.open_stream(source)
                _text_column(reader.schema, text_field, str(file))
                yield from _iter_batches_text(reader, text_field)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"cannot read the Arrow file: {exc}", where=str(file), how="save the dataset again with save_to_disk") from None


# -- Hugging Face datasets by id --------------------------------------------------------------

def _prefetch_hint(repo: str, subset: str | None) -> str:
    include = (f" (with --include README.md and --include for subset {subset}'s files, which the dataset card's "
               "configs: name)") if subset else ""
    return (f"pre-fetch it where there is network: `huggingface-cli download --repo-type dataset {repo}`{include} and "
            "copy the Hugging Face cache (~/.cache/huggingface/hub, or $HF_HUB_CACHE) here, or save it with "
            "`datasets.load_dataset(...).save_to_disk(DIR)` and set data.source to DIR (docs/data.md)")


def _hub_cache_dir() -> str:
    # Read at call time (huggingface_hub reads it once, at import).
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _hub_snapshot(repo: str, revision: str | None) -> Path | None:
    """The cached snapshot folder of the dataset repo, or None (never touches the network)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        return None
    try:
        folder = snapshot_download(repo, repo_type="dataset", revision=revision, local_files_only=True,
                                   cache_dir=_hub_cache_dir())
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        return None
    return Path(folder)


def _readme_configs(readme: str | None) -> list[dict[str, Any]]:
    """The ``configs:`` of a dataset card's YAML header (which files make which split)."""
    if not readme or not readme.startswith("---"):
        return []
    end = readme.find("\n---", 3)
    if end < 0:
        return []
    from edgekit.yamlio import parse_yaml_text

    try:
        header, _ = parse_yaml_text(readme[3:end])
    except Exception:  # a card we cannot read: fall back to the file-name conventions
        return []
    configs = header.get("configs") if isinstance(header, dict) else None
    return [c for c in configs if isinstance(c, dict)] if isinstance(configs, list) else []


def _patterns(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def select_split_files(files: list[str], *, readme: str | None, subset: str | None, split: str, where: str) -> list[str]:
    """The data files of ``subset``/``split`` in a dataset repo, in order: by the card's
    ``configs:`` when it has them, else by the datasets library's file-name conventions
    (``train/...``, ``data/train-0000.parquet``, ``sub/train.jsonl``)."""
    files = sorted(f for f in files if f.endswith(FILE_SUFFIXES) and not f.startswith("."))
    configs = _readme_configs(readme)
    if configs:
        names = [str(c.get("config_name", "default")) for c in configs]
        if subset is None:
            chosen = next((c for c in configs if c.get("default")), configs[0])
        elif subset in names:
            chosen = configs[names.index(subset)]
        else:
            raise DataError(f"the dataset has no subset '{subset}' (subsets: {', '.join(names)})", where=where,
                            how="set data.subset to one of them")
        data_files = chosen.get("data_files")
        if isinstance(data_files, list) and data_files and all(isinstance(d, dict) for d in data_files):
            splits = {str(d.get("split", "train")): _patterns(d.get("path")) for d in data_files}
        else:
            splits = {"train": _patterns(data_files)}
        if split not in splits:
            raise DataError(f"subset '{chosen.get('config_name', 'default')}' has no split '{split}' (splits: "
                            f"{', '.join(splits)})", where=where, how="set data.split to one of them")
        picked = [f for f in files if any(fnmatch.fnmatch(f, p) for p in splits[split])]
    else:
        if subset is not None:
            files = [f for f in files if subset in f.split("/")[:-1]]

        def split_of(path: str) -> str | None:
            parts = path.split("/")
            for name in ("train", "validation", "test"):
                if name in parts[:-1] or name in _SPLIT_TOKEN.split(parts[-1].rsplit(".", 1)[0]):
                    return name
            return None

        named = {f: split_of(f) for f in files}
        if any(named.values()):
            picked = [f for f in files if named[f] == split]
        else:
            picked = files if split == "train" else []
    if not picked:
        raise DataError(f"no {'/'.join(FILE_SUFFIXES)} files for split '{split}'"
                        + (f" of subset '{subset}'" if subset else ""), where=where,
                        how="check data.subset and data.split against the dataset card, or pre-fetch those files")
    return picked


class _HubReader:
    """The files of one dataset split, from the local cache or (not offline) the hub."""

    def __init__(self, source: TextSource):
        self.source = source

    def files(self) -> list[tuple[str, Any]]:
        source = self.source
        where = "data.source"
        snapshot = _hub_snapshot(source.repo, source.revision)
        if snapshot is not None:
            listed = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
            readme = snapshot / "README.md"
            text = readme.read_text(encoding="utf-8", errors="replace") if readme.is_file() else None
            try:
                picked = select_split_files(listed, readme=text, subset=source.subset, split=source.split, where=where)
                return [(f"{source.repo}/{f}", lambda f=f: open(snapshot / f, "rb")) for f in picked]
            except DataError:
                if hub_offline():
                    raise
        elif hub_offline():
            raise not_cached_error(source)
        return self._remote(where)

    def _remote(self, where: str) -> list[tuple[str, Any]]:  # pragma: no cover - needs the network
        from huggingface_hub import HfApi, HfFileSystem, hf_hub_download

        source = self.source
        revision = source.revision or "main"
        try:
            listed = HfApi().list_repo_files(source.repo, repo_type="dataset", revision=revision)
            readme = None
            if "README.md" in listed:
                readme = Path(hf_hub_download(source.repo, "README.md", repo_type="dataset", revision=revision,
                                              cache_dir=_hub_cache_dir())).read_text(encoding="utf-8", errors="replace")
        except Exception as exc:  # the hub's errors: not found, gated, no network
            raise DataError(f"cannot list dataset '{source.repo}' on the Hugging Face hub: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}", where=where,
                            how="check the id and your access (huggingface-cli login), or " + _prefetch_hint(source.repo, source.subset)) from None
        picked = select_split_files(listed, readme=readme, subset=source.subset, split=source.split, where=where)
        if source.streaming:
            fs = HfFileSystem()
            return [(f"{source.repo}/{f}", lambda f=f: fs.open(f"datasets/{source.repo}@{revision}/{f}", "rb", block_size=1 << 22))
                    for f in picked]
        # Not streaming: each file is downloaded into the cache when the reader gets to it
        # (reading stops at the token budget, so only the files needed are fetched).
        return [(f"{source.repo}/{f}", lambda f=f: open(hf_hub_download(source.repo, f, repo_type="dataset", revision=revision,
                                                                       cache_dir=_hub_cache_dir()), "rb"))
                for f in picked]


def _hub_reader(source: TextSource) -> Any:
    return source._hub if source._hub is not None else _HubReader(source)


def not_cached_error(source: TextSource) -> DataError:
    offline = [v for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE") if os.environ.get(v, "").strip().lower() in _OFFLINE_VALUES]
    return DataError(f"dataset '{source.repo}' is not in the local Hugging Face cache ({_hub_cache_dir()}) and "
                     f"{'/'.join(offline) or 'offline mode'} forbids downloading it", where="data.source",
                     how=_prefetch_hint(source.repo, source.subset))


# -- resolving a recipe's data section ---------------------------------------------------------

def resolve_text_source(spec: str, *, base_dir: Path | None = None, subset: str | None = None, split: str = "train",
                        revision: str | None = None, streaming: bool = False, token_budget: int | None = None,
                        text_field: str = "text") -> TextSource:
    """The source ``spec`` names, checked (exists, supported; a hub dataset is cached or may be
    downloaded). Nothing is read."""
    options = dict(split=split, token_budget=token_budget, text_field=text_field)
    if spec.startswith(HUB_PREFIX):
        from edgekit.names import check_name

        repo = spec[len(HUB_PREFIX):]
        parts = repo.split("/")
        if len(parts) != 2:
            raise DataError(f"a Hugging Face dataset id is ORG/NAME, not {repo!r}", where="data.source",
                            how="write data.source as hf:ORG/NAME (e.g. hf:HuggingFaceFW/fineweb-edu)")
        for part in parts:
            check_name(part, what="dataset id part", where="data.source", error_cls=DataError)
        source = TextSource("hub", spec, repo=repo, subset=subset, revision=revision, streaming=streaming, **options)
        if hub_offline() and _hub_snapshot(repo, revision) is None:
            raise not_cached_error(source)
        return source
    if spec.startswith("builtin:"):
        if spec not in BUILTINS:
            raise DataError(
                f"unknown built-in text '{spec}'", where="data.source",
                how=f"use {' or '.join(repr(b) for b in BUILTINS)} or a file path"
            )
        return TextSource("builtin", spec, **options)
    path = Path(spec).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.exists():
        raise DataError(
            f"data path {spec!r} does not exist",
            where=str(path),
            how=f"fix the path (relative to the recipe's directory), use '{BUILTIN_PYTHON_DOCS}' or hf:ORG/NAME",
        )
    if not path.is_file() and not path.is_dir():
        raise DataError("data path is neither a regular file nor a directory (a FIFO or a device?)", where=str(path),
                        how="give a .txt, .jsonl or .parquet file or a directory of them")
    if path.is_file():
        if path.suffix not in FILE_SUFFIXES:
            raise DataError(f"unsupported data file type '{path.suffix}'", where=str(path),
                            how="give a .txt, .jsonl or .parquet file (or hf:ORG/NAME)")
        return TextSource(path.suffix[1:], spec, path.resolve(), **options)
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        return TextSource("datasets", spec, path.resolve(), **options)
    source = TextSource("dir", spec, path.resolve(), **options)
    if not source.files():
        raise DataError("directory holds no .txt, .jsonl or .parquet files", where=str(path),
                        how="add text files or point at a file")
    return source


def resolve_data(data: Any, *, base_dir: Path | None = None) -> TextSource:
    """The source of a recipe's ``data`` section (a DataConfig or its dict), with its split,
    subset, streaming, token budget and text field: what every stage should read through."""
    get = (lambda k, d=None: data.get(k, d)) if isinstance(data, dict) else (lambda k, d=None: getattr(data, k, d))
    return resolve_text_source(get("source"), base_dir=base_dir, subset=get("subset"), split=get("split", "train") or "train",
                               revision=get("revision"), streaming=bool(get("streaming", False)),
                               token_budget=get("token_budget"), text_field=get("text_field", "text") or "text")


def recipe_data_fingerprint(recipe: Any, base_dir: Path | None) -> dict[str, Any]:
    """The recipe's ``data`` section as a cache key holds it: the text's content fingerprint and
    the other data settings (the runner's "data" section, edgekit.pipeline.registry). The
    evaluation sets are not part of it (only evaluate reads them: its "eval_sets" section), so
    changing them reruns no stage that calibrates or trains."""
    source = resolve_text_source(recipe.data.source, base_dir=base_dir)
    return {"source": source.fingerprint(), "config": recipe.data.model_dump(exclude={"source", "eval_sets"})}


# -- evaluation sets: held-out text from other sources, read only by the evaluate stage --------

IN_DOMAIN = "in_domain"  # data.source's own held-out split (edgekit.recipe.IN_DOMAIN)
DEFAULT_EVAL_LABEL = "ood"
# An evaluation set is read up to this many characters (≈8M tokens): its windows are spread
# over what was read.
EVAL_SET_MAX_CHARS = 32 << 20


@dataclass(frozen=True)
class EvalSet:
    """One resolved evaluation set (``data.eval_sets`` entry, or the default)."""

    label: str
    source: str
    tokens: int
    text_field: str = "text"
    where: str = "data.eval_sets"


def resolve_eval_sets(data: Any) -> list[EvalSet]:
    """The held-out sets the evaluate stage scores besides data.source's own split: the recipe's
    ``data.eval_sets``, or by default one set labelled ``ood``: builtin:package-readmes
    (builtin:python-docs when the recipe calibrates and trains on the READMEs)."""
    get = (lambda k, d=None: data.get(k, d)) if isinstance(data, dict) else (lambda k, d=None: getattr(data, k, d))
    eval_tokens = get("eval_tokens", 8192)
    entries = get("eval_sets")
    if entries is None:
        default = BUILTIN_PYTHON_DOCS if get("source") == BUILTIN_PACKAGE_READMES else BUILTIN_PACKAGE_READMES
        return [EvalSet(DEFAULT_EVAL_LABEL, default, eval_tokens, where="data.eval_sets (default)")]
    out = []
    for index, entry in enumerate(entries):
        item = (lambda k, d=None, e=entry: e.get(k, d)) if isinstance(entry, dict) else (lambda k, d=None, e=entry: getattr(e, k, d))
        out.append(EvalSet(item("label"), item("source"), item("tokens") or eval_tokens, item("text_field", "text") or "text",
                           where=f"data.eval_sets[{index}].source"))
    return out


def eval_set_source(entry: EvalSet, *, base_dir: Path | None = None) -> TextSource:
    """The set's text source, checked (exists, supported); errors name the recipe field."""
    try:
        return resolve_text_source(entry.source, base_dir=base_dir, text_field=entry.text_field)
    except DataError as exc:
        where = entry.where + (f" -> {exc.where}" if exc.where and exc.where != "data.source" else "")
        raise DataError(exc.what, where=where, how=exc.how) from None


def spread_windows(ids: Sequence[int], *, tokens: int, window: int, where: str = "data.eval_sets") -> list[int]:
    """``tokens // window`` windows of ``window`` tokens spread evenly over ``ids`` (no two
    overlap; fewer when the text is shorter), concatenated: the perplexity protocol cuts them
    back at the same boundaries. Deterministic."""
    fit = len(ids) // window
    count = min(max(1, tokens // window), fit)
    if count < 1:
        raise DataError(f"the evaluation text has {len(ids)} tokens, shorter than one window of {window}", where=where,
                        how=f"give more text (at least {window} tokens) or lower data.window")
    span = len(ids) - window
    starts = [i * span // (count - 1) for i in range(count)] if count > 1 else [0]
    out: list[int] = []
    for start in starts:
        out.extend(ids[start: start + window])
    return out


def read_eval_set(entry: EvalSet, tokenizer: Any, *, window: int, base_dir: Path | None = None) -> tuple[list[int], dict[str, Any]]:
    """The token ids the evaluate stage scores on ``entry`` and what they are: ``{"source",
    "sha256" (of the text read), "text_tokens", "fingerprint"}`` (for builtin:package-readmes the
    package versions: its scores compare only where the sha256 matches)."""
    import hashlib

    source = eval_set_source(entry, base_dir=base_dir)
    text = source.read(max_chars=EVAL_SET_MAX_CHARS)
    ids = tokenizer(text, verbose=False)["input_ids"]
    chosen = spread_windows(ids, tokens=entry.tokens, window=window, where=entry.where)
    info: dict[str, Any] = {"source": entry.source, "sha256": hashlib.sha256(text.encode()).hexdigest(),
                            "text_tokens": len(ids)}
    if source.kind == "builtin" and source.spec == BUILTIN_PACKAGE_READMES:
        info["packages"] = package_readmes_fingerprint()["packages"]
    return chosen, info


def recipe_eval_sets_fingerprint(recipe: Any, base_dir: Path | None) -> list[dict[str, Any]]:
    """The evaluation sets as the evaluate stage's cache key holds them (section "eval_sets"):
    each set's label, token count, text field and content fingerprint."""
    return [{"label": e.label, "tokens": e.tokens, "text_field": e.text_field,
             "source": eval_set_source(e, base_dir=base_dir).fingerprint()}
            for e in resolve_eval_sets(recipe.data)]


@dataclass(frozen=True)
class TokenSplits:
    calibration: Sequence[int]  # everything before the held-out split (a list, or a uint32 memmap)
    evaluation: Sequence[int]  # the last eval_tokens tokens (fewer if the text is short)
    window: int
    # builtin:mixed: tokens of each kind in each split ({"calibration"|"evaluation": {kind:
    # {"tokens", "share"}}}); None for other sources or a tokenizer without offsets
    parts: dict[str, Any] | None = None

    @property
    def eval_windows(self) -> int:
        return len(self.evaluation) // self.window


def tokenize_splits(text: str, tokenizer: Any, *, eval_tokens: int, window: int, where: str = "data.source",
                    token_budget: int | None = None) -> TokenSplits:
    """Tokenize once, keep the first ``token_budget`` tokens (all: None) and cut the fixed
    held-out split from the end."""
    ids = tokenizer(text, verbose=False)["input_ids"]
    return _split_ids(ids, eval_tokens=eval_tokens, window=window, where=where, token_budget=token_budget)


def _split_ids(ids: Sequence[int], *, eval_tokens: int, window: int, where: str = "data.source",
               token_budget: int | None = None) -> TokenSplits:
    if token_budget is not None:
        ids = ids[:token_budget]
    held_out = ids[-eval_tokens:] if len(ids) > eval_tokens else list(ids)
    if len(held_out) < window:
        raise DataError(
            f"the evaluation text has {len(held_out)} tokens, shorter than one window of {window}",
            where=where,
            how=f"give more text (at least {window} tokens) or lower data.window",
        )
    return TokenSplits(calibration=list(ids[: len(ids) - len(held_out)]), evaluation=list(held_out), window=window)


# Above this many tokens a corpus is tokenized once into a uint32 file in the run cache that
# every stage (and every training process) memory-maps: the held-out split is the end of the
# text, so without it each evaluate, prune and quantize stage would tokenize the whole budget
# again, and a 2B-token corpus as a Python list would take ~80 GB.
TOKEN_FILE_ABOVE = 16_000_000


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    import hashlib

    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(
        {"name": getattr(tokenizer, "name_or_path", ""), "vocab": len(tokenizer)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def token_file(data: Any, tokenizer: Any, *, base_dir: Path | None = None, cache_dir: Path | None = None,
               log: Any = None) -> Path | None:
    """The cached token file of a large budgeted corpus (made on first use: one pass of the
    tokenizer, written through a temp file), or None for text small enough to tokenize in memory."""
    get = (lambda k, d=None: data.get(k, d)) if isinstance(data, dict) else (lambda k, d=None: getattr(data, k, d))
    budget = get("token_budget")
    if cache_dir is None or not budget or budget <= TOKEN_FILE_ABOVE:
        return None
    from edgekit.hashing import sha256_json

    fields = ("source", "subset", "split", "revision", "token_budget", "text_field")
    key = sha256_json({"data": {k: get(k) for k in fields}, "tokenizer": _tokenizer_fingerprint(tokenizer)})
    path = Path(cache_dir) / "tokens" / f"{key[:32]}.u32"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        count = tokenize_to_file(resolve_data(data, base_dir=base_dir), tokenizer, path)
        if log is not None:
            log(f"tokenized {count:,} tokens of {get('source')} into {path}")
    return path


def read_token_splits(data: Any, tokenizer: Any, *, base_dir: Path | None = None, cache_dir: Path | None = None,
                      log: Any = None) -> TokenSplits:
    """A recipe's data section read (up to its token budget), tokenized and split: the one
    call a stage needs. With ``cache_dir``, a corpus over TOKEN_FILE_ABOVE tokens is tokenized
    once and memory-mapped (:func:`token_file`)."""
    get = (lambda k: data[k]) if isinstance(data, dict) else (lambda k: getattr(data, k))
    cached = token_file(data, tokenizer, base_dir=base_dir, cache_dir=cache_dir, log=log)
    if cached is not None:
        return token_splits_from_file(cached, eval_tokens=get("eval_tokens"), window=get("window"))
    source = resolve_data(data, base_dir=base_dir)
    if source.kind == "builtin" and source.spec == BUILTIN_MIXED:
        return _mixed_token_splits(source, tokenizer, eval_tokens=get("eval_tokens"), window=get("window"))
    return tokenize_splits(source.read(), tokenizer, eval_tokens=get("eval_tokens"), window=get("window"),
                           token_budget=source.token_budget)


def _mixed_token_splits(source: TextSource, tokenizer: Any, *, eval_tokens: int, window: int) -> TokenSplits:
    """builtin:mixed tokenized once with character offsets, so the splits say how many tokens
    of each kind they hold (a tokenizer without offsets: the same splits, no ``parts``)."""
    import dataclasses

    from edgekit.models.mixed import mixed_corpus

    corpus = mixed_corpus()
    text = source.read()
    try:
        encoded = tokenizer(text, return_offsets_mapping=True, verbose=False)
        offsets = encoded["offset_mapping"]
    except (TypeError, NotImplementedError, KeyError):  # a slow tokenizer has no offsets
        return tokenize_splits(text, tokenizer, eval_tokens=eval_tokens, window=window, token_budget=source.token_budget)
    ids = encoded["input_ids"]
    splits = _split_ids(ids, eval_tokens=eval_tokens, window=window, token_budget=source.token_budget)
    starts = [start for start, _ in offsets[: len(splits.calibration) + len(splits.evaluation)]]
    return dataclasses.replace(splits, parts=corpus.token_shares(starts, len(splits.calibration)))


def data_record(data: Any, *, base_dir: Path | None = None, splits: TokenSplits | None = None,
                part: str = "calibration") -> dict[str, Any]:
    """What a stage read from ``data.source``, for its report: the source, its content
    fingerprint (for a built-in text the sha256 of the text; for files each file's sha256; for a
    hub dataset the snapshot), the token budget, and for builtin:mixed each kind's characters in
    the text and tokens in ``part`` (``calibration``: the text before the held-out split;
    ``evaluation``: the held-out end). Deterministic: the same text gives the same record."""
    import hashlib

    get = (lambda k, d=None: data.get(k, d)) if isinstance(data, dict) else (lambda k, d=None: getattr(data, k, d))
    source = resolve_data(data, base_dir=base_dir)
    record: dict[str, Any] = {"source": source.spec}
    record.update({k: v for k, v in source.fingerprint().items() if k != "builtin"})
    if source.kind == "builtin" and "sha256" not in record:
        record["sha256"] = hashlib.sha256(source.read().encode()).hexdigest()
    if source.token_budget is not None:
        record["token_budget"] = source.token_budget
    record["eval_tokens"] = get("eval_tokens")
    if splits is not None and splits.parts and "parts" in record:
        shares = splits.parts[part]
        record["parts"] = {kind: {**info, f"{part}_tokens": shares[kind]["tokens"], f"{part}_token_share": shares[kind]["share"]}
                           for kind, info in record["parts"].items()}
    return record


def tokenize_to_file(source: TextSource, tokenizer: Any, path: Path | str, *, chunk_chars: int = 1 << 22) -> int:
    """Stream ``source`` through ``tokenizer`` into ``path``: a flat little-endian uint32
    array (``numpy.memmap(path, dtype="<u4")``), at most ``source.token_budget`` tokens;
    returns the count. Memory stays at one chunk whatever the corpus size: what a
    billion-token distillation trains from (a Python list of 2B ids would need ~80 GB).
    Chunks end at record boundaries, so tokens match tokenizing record by record."""
    import numpy as np

    from edgekit.yamlio import atomic_write

    budget = source.token_budget

    def write(tmp: Path) -> None:
        nonlocal count
        with open(tmp, "wb") as out:
            pending: list[str] = []
            size = 0

            def flush(text: str) -> bool:
                nonlocal count
                ids = tokenizer(text, verbose=False)["input_ids"] if text else []
                if budget is not None:
                    ids = ids[: budget - count]
                np.asarray(ids, dtype="<u4").tofile(out)
                count += len(ids)
                return budget is not None and count >= budget

            for piece in source.iter_text():
                pending.append(piece)
                size += len(piece)
                if size >= chunk_chars and piece == "\n":  # a record boundary
                    if flush("".join(pending)):
                        return
                    pending, size = [], 0
            flush("".join(pending))

    count = 0
    atomic_write(Path(path), write)
    return count


def token_splits_from_file(path: Path | str, *, eval_tokens: int, window: int, where: str = "data.source") -> TokenSplits:
    """The held-out split of a :func:`tokenize_to_file` array, memory-mapped (no copy): the
    same cut as :func:`tokenize_splits` (last ``eval_tokens`` held out), for any corpus size."""
    import numpy as np

    ids = np.memmap(path, dtype="<u4", mode="r") if Path(path).stat().st_size else np.zeros(0, dtype="<u4")
    held = min(len(ids), eval_tokens)
    if held < window:
        raise DataError(f"the evaluation text has {held} tokens, shorter than one window of {window}", where=where,
                        how=f"give more text (at least {window} tokens) or lower data.window")
    return TokenSplits(calibration=ids[: len(ids) - held], evaluation=ids[len(ids) - held:].tolist(), window=window)


# -- token accounting (no tokenizing) ---------------------------------------------------------

def _builtin_tokens(spec: str = BUILTIN_PYTHON_DOCS) -> int:
    import sys

    if spec == BUILTIN_PACKAGE_READMES:
        chars = sum(len(text) for _, _, text in package_readmes())
        return int(chars / CHARS_PER_TOKEN)
    if spec == BUILTIN_MIXED:
        from edgekit.models.mixed import mixed_corpus

        corpus = mixed_corpus()
        known = _MIXED_TOKENS.get(corpus.sha256)
        return known if known is not None else int(len(corpus.text) / MIXED_CHARS_PER_TOKEN)

    from pydoc_data import topics

    chars = sum(len(v) for v in topics.topics.values()) + len(topics.topics) - 1
    known = _PYTHON_DOCS_TOKENS.get(".".join(sys.version.split(".")[:2]))
    if known is not None and known[0] == chars:
        return known[1]
    return int(chars / 4.11)


def _mixed_measured() -> bool:
    """True when this machine's builtin:mixed is the text :data:`_MIXED_TOKENS` measured."""
    from edgekit.models.mixed import mixed_corpus

    return mixed_corpus().sha256 in _MIXED_TOKENS


def _parquet_text_bytes(path: Path | str, text_field: str) -> int | None:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        return None
    try:
        meta = pq.ParquetFile(str(path)).metadata
    except Exception:
        return None
    total = 0
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        for c in range(group.num_columns):
            column = group.column(c)
            if column.path_in_schema == text_field:
                total += column.total_uncompressed_size
    return total


def _saved_text_bytes(path: Path, split: str, text_field: str) -> int | None:
    try:
        import pyarrow as pa
        import pyarrow.ipc  # noqa: F401
        folder = _saved_split_dir(path, split)
        from edgekit.yamlio import load_json_file

        state = load_json_file(folder / "state.json", error_cls=DataError, what="state.json")
        total = 0
        for entry in state.get("_data_files", []):
            with pa.memory_map(str(folder / entry["filename"])) as handle:  # zero copy: only sizes are read
                table = pa.ipc.open_stream(handle).read_all()
                total += table.column(text_field).nbytes
        return total
    except Exception:
        return None


def estimate_tokens(source: TextSource | str, *, text_field: str | None = None, base_dir: Path | None = None) -> int | None:
    """Tokens the source holds, without tokenizing (seconds for any size): exact for
    builtin:python-docs and (where its sha256 was measured) builtin:mixed (SmolLM2's tokenizer), bytes / :data:`CHARS_PER_TOKEN` for local
    files (the text column's size for parquet and save_to_disk data), the cached files'
    size for a hub dataset; never more than ``token_budget``. None when unknown."""
    if isinstance(source, str):
        source = resolve_text_source(source, base_dir=base_dir)
    text_field = text_field or source.text_field
    size: float | None
    if source.kind == "builtin":
        size = _builtin_tokens(source.spec)
    elif source.kind == "datasets":
        found = _saved_text_bytes(source.path, source.split, text_field)
        size = None if found is None else found / CHARS_PER_TOKEN
    elif source.kind == "hub":
        size = None
        snapshot = _hub_snapshot(source.repo, source.revision)
        if snapshot is not None:
            try:
                listed = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
                readme = snapshot / "README.md"
                picked = select_split_files(listed, readme=readme.read_text(errors="replace") if readme.is_file() else None,
                                            subset=source.subset, split=source.split, where=source.spec)
                total = 0.0
                for name in picked:
                    path = snapshot / name
                    found = _parquet_text_bytes(path, text_field) if name.endswith(".parquet") else path.stat().st_size
                    total += found or 0
                size = total / CHARS_PER_TOKEN
                if not hub_offline() and source.token_budget is not None and size < source.token_budget:
                    size = None  # the rest may be downloaded: the budget decides
            except DataError:
                size = None
        if size is None and source.token_budget is not None:
            return source.token_budget
    else:
        total = 0.0
        for path in source.files():
            if path.suffix == ".parquet":
                found = _parquet_text_bytes(path, text_field)
                if found is None:
                    return None if source.token_budget is None else source.token_budget
                total += found
            else:
                total += path.stat().st_size
        size = total / CHARS_PER_TOKEN
    if size is None:
        return None
    tokens = int(size)
    return min(tokens, source.token_budget) if source.token_budget is not None else tokens


def _distill_processes(config: Any, base_dir: Path) -> int:
    """Processes a distill stage runs: ``processes``, else the accelerate config's
    ``num_processes`` (1 when unreadable: the distill stage reports that file itself)."""
    if config.processes > 1 or not config.accelerate_config:
        return config.processes
    from edgekit.yamlio import load_yaml

    path = Path(config.accelerate_config).expanduser()
    path = path if path.is_absolute() else base_dir / path
    try:
        data, _ = load_yaml(path, error_cls=DataError, what="accelerate config")
    except DataError:
        return 1
    value = data.get("num_processes") if isinstance(data, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 100_000 else 1


def data_budget_rows(loaded: Any) -> list[dict[str, Any]]:
    """What each data-consuming stage asks of the text against what the text holds before
    its held-out split: one row per prune / distill / quantize stage that reads data::

        {"stage", "type", "tokens_asked", "tokens_available", "passes", "problem", "how", "where"}

    ``problem`` is None, or why the recipe is refused (:func:`check_data_budget` raises it).
    Nothing is read or tokenized."""
    recipe = loaded.recipe
    data = recipe.data
    source = resolve_data(data, base_dir=loaded.base_dir)
    total = estimate_tokens(source)
    available = None if total is None else max(0, total - data.eval_tokens)
    exact = source.spec == BUILTIN_PYTHON_DOCS or (source.spec == BUILTIN_MIXED and _mixed_measured())
    approx = "" if exact else "≈"
    described = (f"{data.source}" + (f" (token_budget {data.token_budget:,})" if data.token_budget else ""))
    rows = []
    for index, spec in enumerate(recipe.stages):
        if spec.type not in ("prune", "distill", "quantize"):
            continue
        config = recipe.stage_config(index)
        row: dict[str, Any] = {"stage": spec.name, "type": spec.type, "tokens_asked": 0, "tokens_available": available,
                               "passes": None, "problem": None, "how": None, "where": loaded.where("stages", index)}
        if spec.type == "distill":
            processes = _distill_processes(config, loaded.base_dir)
            asked = config.steps * config.batch_size * config.gradient_accumulation * processes * config.sequence_length
            row["tokens_asked"] = asked
            row["formula"] = (f"{config.steps} steps x {config.batch_size} x {config.gradient_accumulation} accumulation x "
                              f"{processes} processes x {config.sequence_length} tokens")
            if available is not None:
                row["passes"] = asked / available if available else float("inf")
                if available < config.sequence_length:
                    row["problem"] = (f"distillation needs sequences of {config.sequence_length} tokens, but {described} "
                                      f"has {approx}{available:,} tokens before the held-out {data.eval_tokens:,}")
                    row["how"] = "give more text (data.source / data.token_budget), or lower sequence_length or data.eval_tokens"
                elif row["passes"] > MAX_DISTILL_PASSES and not data.allow_repeat:
                    need = int(asked / MAX_DISTILL_PASSES) + data.eval_tokens
                    steps = int(MAX_DISTILL_PASSES * available // max(1, asked // config.steps))
                    fewer = f"lower steps to {steps} or the batch" if steps >= 1 else "lower the batch or sequence_length"
                    row["problem"] = (f"distillation consumes {asked:,} tokens ({row['formula']}) but {described} has "
                                      f"{approx}{available:,} tokens before the held-out {data.eval_tokens:,}: "
                                      f"{row['passes']:,.1f} passes over the same text (at most {MAX_DISTILL_PASSES:g})")
                    row["how"] = (f"give a corpus of at least {need:,} tokens (docs/data.md names one), {fewer}, "
                                  "or set data.allow_repeat: true to train on it repeatedly")
        else:
            uses = (spec.type == "quantize" and config.method != "rtn") or (
                spec.type == "prune" and (config.importance == "activation" or getattr(config, "depth_metric", None) == "perplexity_drop"))
            if not uses:
                continue
            asked = config.calibration_samples * config.sequence_length
            row["tokens_asked"] = asked
            row["formula"] = f"{config.calibration_samples} samples x {config.sequence_length} tokens"
            if available is not None:
                row["passes"] = asked / available if available else float("inf")
                if asked > available:
                    fit = available // config.sequence_length
                    row["problem"] = (f"{spec.type} asks {asked:,} calibration tokens ({row['formula']}) but {described} "
                                      f"has {approx}{available:,} tokens before the held-out {data.eval_tokens:,}: at most "
                                      f"{fit} samples of {config.sequence_length} fit")
                    row["how"] = (f"lower calibration_samples to {fit}" if fit else
                                  f"lower sequence_length to at most {available}") + ", or give more text (data.source)"
        rows.append(row)
    return rows


def check_data_budget(loaded: Any) -> list[dict[str, Any]]:
    """:func:`data_budget_rows`, refusing the first stage that asks more than the text can
    give (one-line DataError naming the stage, the numbers and a fix)."""
    rows = data_budget_rows(loaded)
    for row in rows:
        if row["problem"]:
            raise DataError(row["problem"], where=f"{row['where']} (stage {row['stage']})", how=row["how"])
    return rows


__all__ = [
    "BUILTIN_MIXED", "BUILTIN_PACKAGE_READMES", "BUILTIN_PYTHON_DOCS", "EvalSet", "data_record", "HUB_PREFIX", "IN_DOMAIN", "eval_set_source",
    "package_readmes", "read_eval_set", "resolve_eval_sets", "spread_windows", "MAX_DISTILL_PASSES", "TextSource", "TokenSplits", "check_data_budget",
    "data_budget_rows", "estimate_tokens", "hub_offline", "read_token_splits", "resolve_data", "resolve_text_source",
    "select_split_files", "token_splits_from_file", "tokenize_splits", "tokenize_to_file",
]
