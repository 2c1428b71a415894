"""A bundle's manifest.json, read in one place: the format constants, one typed
:class:`Manifest`, :func:`read_manifest` with one error wording, the graph-variant lookup
(:func:`graph_variant`: which graph is the TensorRT / ONNX Runtime / draft / float one) and
:class:`Bundle`, the handle a command opens once and passes around (directory + manifest +
runtime.json), like an opaque model handle.

A bundle is data from elsewhere: every value it names is checked where it enters. The file is
bounded (size, nesting, integer digits; edgekit.yamlio), must be a JSON object, and its
fields have the types the bundle stage writes; names (``name``, ``target``) and relative paths
(``onnx.variants``) are checked by the accessors that turn them into names and paths
(:mod:`edgekit.names`), the file table by :func:`edgekit.bundle.archive.check_file_table`.
Unknown keys are kept: stages add records (``engines``, ``stages``' metrics) and older or
newer bundles may carry more.

The stdlib-only device agent (:mod:`edgekit.deploy.agent`) keeps its own minimal reader on
purpose: it runs on devices without edgekit installed.

Light on purpose: pydantic and the standard library only (the runtime path imports it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StrictInt, StrictStr, ValidationError, field_validator

from edgekit.errors import EdgekitError
from edgekit.graph_variants import DRAFT_VARIANT

# --- the format -----------------------------------------------------------------------------

BUNDLE_FORMAT = "edgekit.bundle/1"
MANIFEST_NAME = "manifest.json"
RUNTIME_NAME = "runtime.json"  # edgekit.recipe.RuntimeConfig, updated by edgekit calibrate-router
RUNTIME_FORMAT = "edgekit.runtime/1"
SIGNATURE_NAME = "signature.json"
PRIMARY_GRAPH = "model.onnx"
MAX_MANIFEST_BYTES = 16 * 2**20  # a manifest is a few kB; a files table of 10,000 rows fits
MAX_CONTEXT_LENGTH = 1 << 24

#: keys of the manifest's ``onnx.variants`` (written by the export_onnx stage)
FLOAT_VARIANT = "float"
ONNXRUNTIME_VARIANT = "onnxruntime"
TENSORRT_VARIANT = "tensorrt"
# DRAFT_VARIANT ("onnxruntime_draft", the speculative draft graph): edgekit.graph_variants

#: what :func:`graph_variant` is asked for
GRAPH_USES = ("tensorrt", "deployed", "check", "onnxruntime", "draft")

HOW_NOT_A_BUNDLE = "pass a bundle directory written by `edgekit compress` (runs/<name>/stages/NN-bundle/<name>)"
HOW_DAMAGED = "rebuild the bundle (edgekit compress) or copy it again from its source; do not edit manifest.json by hand"


# --- the typed manifest ---------------------------------------------------------------------


class OnnxSection(BaseModel):
    """``onnx``: the primary graph and its variants (variant key -> path relative to the bundle)."""

    model_config = ConfigDict(extra="allow")

    file: Optional[StrictStr] = None
    external_data: Optional[StrictStr] = None
    # values are relative paths, checked when one becomes a path (graph_variant / Bundle.graph)
    variants: dict[str, Any] = Field(default_factory=dict)
    export: Optional[dict[str, Any]] = None

    @field_validator("variants", mode="before")
    @classmethod
    def _no_variants(cls, value: Any) -> Any:
        return {} if value is None else value


class Manifest(BaseModel):
    """manifest.json as the bundle stage writes it (edgekit.pack.stage), plus what later
    steps record (``engines`` by build-engine). ``raw`` is the parsed JSON object itself, for
    the code that rewrites the file (record_engine) or signs it (edgekit.bundle.signing)."""

    model_config = ConfigDict(extra="allow")

    format: Optional[StrictStr] = None
    name: Any = None  # a safe name: checked by Bundle.checked_name, with the caller's error class
    edgekit_version: Optional[StrictStr] = None
    model: Optional[dict[str, Any]] = None
    target: Any = None  # a safe name: checked by Manifest.target_name
    context_length: Optional[StrictInt] = Field(None, ge=1, le=MAX_CONTEXT_LENGTH)
    budgets: Optional[dict[str, Any]] = None
    runtime: Optional[StrictStr] = None
    onnx: OnnxSection = Field(default_factory=OnnxSection)
    stages: Optional[list[Any]] = None
    packages: Optional[dict[str, Any]] = None
    files: Any = None  # checked by edgekit.bundle.archive.check_file_table where it is used
    engines: Optional[dict[str, Any]] = None

    _raw: dict[str, Any] = PrivateAttr(default_factory=dict)

    @field_validator("format")
    @classmethod
    def _our_format(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("edgekit.bundle/"):
            raise ValueError(f"{value!r} is not a bundle format (expected {BUNDLE_FORMAT!r})")
        return value

    @field_validator("onnx", mode="before")
    @classmethod
    def _no_onnx(cls, value: Any) -> Any:
        return {} if value is None else value

    @property
    def raw(self) -> dict[str, Any]:
        return self._raw

    @property
    def variants(self) -> dict[str, Any]:
        return self.onnx.variants

    def get(self, key: str, default: Any = None) -> Any:
        """The raw value of ``key`` (dict-style access for records the model does not type)."""
        return self._raw.get(key, default)

    def target_name(self, *, where: str, error_cls: type[EdgekitError] = EdgekitError) -> str | None:
        """``target`` (it names ``engine/<target>.plan``), checked as a safe name; None when unset."""
        from edgekit.names import check_name

        target = self.target
        return None if target is None else check_name(target, what="target in manifest.json", where=where, error_cls=error_cls)


def _field_problem(exc: ValidationError) -> str:
    first = exc.errors()[0]
    loc = ".".join(str(part) for part in first["loc"]) or "value"
    return f"{loc}: {first['msg'].removeprefix('Value error, ')}"


def _refuse(error_cls: type[EdgekitError], problem: str, where: str) -> EdgekitError:
    """The one wording of a manifest that cannot be used."""
    return error_cls(f"the bundle's manifest.json is unusable: {problem}", where=where, how=HOW_DAMAGED)


def parse_manifest(text: str | bytes, *, where: str, error_cls: type[EdgekitError] = EdgekitError) -> Manifest:
    """A :class:`Manifest` from the text of a manifest.json (a file's, or an archive member's)."""
    from edgekit.yamlio import MAX_DEPTH, MAX_INT_DIGITS, _json_depth

    if isinstance(text, bytes):
        if len(text) > MAX_MANIFEST_BYTES:
            raise _refuse(error_cls, f"{len(text)} bytes (at most {MAX_MANIFEST_BYTES})", where)
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _refuse(error_cls, f"not valid UTF-8 (byte {exc.start})", where) from None

    def bounded_int(digits: str) -> int:
        if len(digits.lstrip("-")) > MAX_INT_DIGITS:
            raise ValueError(f"an integer of {len(digits.lstrip('-'))} digits (at most {MAX_INT_DIGITS})")
        return int(digits)

    if _json_depth(text) > MAX_DEPTH:
        raise _refuse(error_cls, f"nested deeper than {MAX_DEPTH} levels", where)
    try:
        # NaN stays readable: a stage's metric may be one (the bundle stage writes json.dumps)
        data = json.loads(text, parse_int=bounded_int)
    except json.JSONDecodeError as exc:
        raise _refuse(error_cls, f"not valid JSON ({exc.msg}, line {exc.lineno})", where) from None
    except (ValueError, RecursionError) as exc:
        raise _refuse(error_cls, f"not valid JSON ({exc})", where) from None
    if not isinstance(data, dict):
        raise _refuse(error_cls, f"not a JSON object (a {type(data).__name__})", where)
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        raise _refuse(error_cls, _field_problem(exc), where) from None
    manifest._raw = data
    return manifest


def read_manifest(bundle_dir: str | Path, *, error_cls: type[EdgekitError] = EdgekitError) -> Manifest:
    """The bundle's manifest.json, checked (module docstring). Raises ``error_cls`` with one
    line: "not a bundle (no manifest.json)" when there is none, else "the bundle's
    manifest.json is unusable: <why>" (unreadable, over the size bound, not JSON, not an
    object, a field of the wrong type). OSError never escapes."""
    from edgekit.yamlio import read_input_text

    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST_NAME
    try:
        present = path.is_file()
    except (OSError, ValueError):
        present = False
    if not present:
        raise error_cls("not a bundle (no manifest.json)", where=str(bundle_dir), how=HOW_NOT_A_BUNDLE)
    try:
        text = read_input_text(path, error_cls=EdgekitError, what="manifest.json", max_bytes=MAX_MANIFEST_BYTES)
    except EdgekitError as exc:
        problem = exc.what.removeprefix("manifest.json ").removeprefix("is ")
        raise _refuse(error_cls, problem, exc.where or str(path)) from None
    return parse_manifest(text, where=str(path), error_cls=error_cls)


# --- which graph --------------------------------------------------------------------------


_ORDER = {
    "tensorrt": (TENSORRT_VARIANT, FLOAT_VARIANT),
    "deployed": (TENSORRT_VARIANT, FLOAT_VARIANT),
    "check": (TENSORRT_VARIANT, FLOAT_VARIANT),
    "onnxruntime": (ONNXRUNTIME_VARIANT, FLOAT_VARIANT),
    "draft": (DRAFT_VARIANT,),
}


def graph_variant(manifest: Manifest, use: str, *, variant: str | None = None, where: str = MANIFEST_NAME,
                  error_cls: type[EdgekitError] = EdgekitError) -> tuple[str | None, Any]:
    """(variant key or None, the graph's path as the manifest gives it) for ``use``:

    * ``"tensorrt"``: the Q/DQ variant, else the float one; a bundle with only ONNX Runtime
      graphs (MatMulNBits, which TensorRT cannot parse) is refused; no variants: the primary;
    * ``"deployed"``: the same, but never refused (the primary graph instead);
    * ``"check"``: the same, else the first variant by name (so a readiness check reports an
      ONNX Runtime graph's contrib ops), else the primary;
    * ``"onnxruntime"``: ``variant`` when given (refused when the bundle has no such variant),
      else the ONNX Runtime variant, else the float one, else the primary;
    * ``"draft"``: the speculative-decoding draft graph, or ``(None, None)`` when there is none.

    A key that is present is used: an empty or bad path is refused by :meth:`Bundle.graph`,
    not skipped. The path is not checked here; :meth:`Bundle.graph` checks it."""
    if use not in _ORDER:
        raise ValueError(f"unknown graph use {use!r} (one of {', '.join(GRAPH_USES)})")
    variants = manifest.variants
    if variant is not None:
        if variant not in variants:
            raise error_cls(f"the bundle has no ONNX variant {variant!r} (it has: {', '.join(sorted(variants)) or 'none'})",
                            where=where, how="pick one of the listed variants")
        return variant, variants[variant]
    for key in _ORDER[use]:
        if key in variants:
            return key, variants[key]
    if use == "draft":
        return None, None
    if use == "tensorrt" and variants:
        raise error_cls(
            f"the bundle has no TensorRT graph (variants: {', '.join(sorted(variants))}); "
            "its ONNX Runtime graph uses MatMulNBits, which TensorRT cannot parse",
            where=where,
            how="export with export_onnx format: tensorrt or both and rebuild the bundle",
        )
    if use == "check" and variants:
        key = sorted(variants)[0]
        return key, variants[key]
    return None, manifest.onnx.file or PRIMARY_GRAPH


# --- the handle -----------------------------------------------------------------------------


class Bundle:
    """A bundle directory opened once: its checked manifest and accessors for what the
    runtime, the engine tools and validation read from it. Pass it around instead of the
    path; ``os.fspath(bundle)`` is the directory, so path-taking code keeps working."""

    __slots__ = ("dir", "manifest")

    def __init__(self, bundle_dir: str | Path, manifest: Manifest):
        self.dir = Path(bundle_dir)
        self.manifest = manifest

    @classmethod
    def open(cls, bundle_dir: str | Path | Bundle, *, error_cls: type[EdgekitError] = EdgekitError) -> Bundle:
        """``bundle_dir`` as a handle (a handle is returned as it is: no second read)."""
        if isinstance(bundle_dir, Bundle):
            return bundle_dir
        return cls(bundle_dir, read_manifest(bundle_dir, error_cls=error_cls))

    def __fspath__(self) -> str:
        return os.fspath(self.dir)

    def __repr__(self) -> str:
        return f"Bundle({str(self.dir)!r})"

    @property
    def manifest_path(self) -> Path:
        return self.dir / MANIFEST_NAME

    @property
    def runtime_path(self) -> Path:
        return self.dir / RUNTIME_NAME

    @property
    def name(self) -> str:
        """The manifest's name, else the directory's (unchecked: see :meth:`checked_name`)."""
        return str(self.manifest.name or self.dir.name)

    def checked_name(self, *, error_cls: type[EdgekitError] = EdgekitError) -> str:
        """The manifest's ``name`` as a safe name (it becomes a folder on a device, a report's name)."""
        from edgekit.names import check_name

        return check_name(self.manifest.name, what="bundle name in manifest.json", where=f"{self.manifest_path}: name",
                          error_cls=error_cls)

    def target(self, *, error_cls: type[EdgekitError] = EdgekitError) -> str | None:
        return self.manifest.target_name(where=f"{self.manifest_path}: target", error_cls=error_cls)

    @property
    def context_length(self) -> int | None:
        return self.manifest.context_length

    def graph_variant(self, use: str, *, variant: str | None = None,
                      error_cls: type[EdgekitError] = EdgekitError) -> tuple[str | None, Any]:
        return graph_variant(self.manifest, use, variant=variant, where=str(self.manifest_path), error_cls=error_cls)

    def graph_rel(self, use: str, *, variant: str | None = None, error_cls: type[EdgekitError] = EdgekitError) -> str:
        """The graph for ``use`` (:func:`graph_variant`) as a checked path relative to the bundle."""
        return self.graph(use, variant=variant, error_cls=error_cls).relative_to(self.dir).as_posix()

    def graph(self, use: str, *, variant: str | None = None, error_cls: type[EdgekitError] = EdgekitError) -> Path:
        """The graph for ``use`` (:func:`graph_variant`) as a path inside the bundle, checked
        where it enters (:func:`edgekit.names.path_inside`: safe components, no '..', not
        absolute, inside the bundle once symlinks are followed). Whether it exists is the
        caller's to say. ``use="draft"`` with no draft graph raises; ask
        :meth:`graph_variant` first."""
        from edgekit.names import path_inside

        _key, rel = self.graph_variant(use, variant=variant, error_cls=error_cls)
        return path_inside(self.dir, rel, what="ONNX graph in manifest.json (onnx.variants)", where=str(self.manifest_path),
                           error_cls=error_cls, how="rebuild the bundle; a bundle names its files by relative paths inside it")

    def runtime_json(self, *, error_cls: type[EdgekitError] = EdgekitError) -> dict[str, Any] | None:
        """runtime.json as a JSON object (bounded; edgekit.yamlio.load_json_file), None when the
        bundle predates it."""
        from edgekit.yamlio import load_json_file

        if not self.runtime_path.is_file():
            return None
        data = load_json_file(self.runtime_path, error_cls=error_cls, what="runtime.json")
        if not isinstance(data, dict):
            raise error_cls("runtime.json is not a JSON object", where=str(self.runtime_path), how="rebuild the bundle")
        return data


def open_bundle(bundle_dir: str | Path | Bundle, *, error_cls: type[EdgekitError] = EdgekitError) -> Bundle:
    """:meth:`Bundle.open`."""
    return Bundle.open(bundle_dir, error_cls=error_cls)


# --- the bundle's files and its reproducible tar (sorted members, mtime 0, uid/gid 0, fixed
# modes: the same inputs give the same bytes and the same sha256 on every machine) ---------


def _reset(info: Any) -> Any:
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    # Scripts (build_engine.sh) keep their executable bit; everything else is 0644.
    info.mode = 0o755 if info.isdir() or info.mode & 0o100 else 0o644
    return info


def write_tar(bundle_dir: Path, tar_path: Path) -> None:
    """An uncompressed tar (weights barely compress) whose top directory is the bundle's name."""
    import tarfile

    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(bundle_dir, arcname=bundle_dir.name, recursive=False, filter=_reset)
        for path in sorted(bundle_dir.rglob("*")):
            tar.add(path, arcname=f"{bundle_dir.name}/{path.relative_to(bundle_dir).as_posix()}", recursive=False, filter=_reset)


def bundle_files(bundle_dir: Path) -> dict[str, Any]:
    """The manifest's ``files`` table of a bundle directory: size and sha256 of every file but
    manifest.json itself."""
    from edgekit.hashing import file_table

    table = file_table(bundle_dir)
    table.pop(MANIFEST_NAME, None)
    return table
