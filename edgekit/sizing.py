"""A model's shape and memory from its config alone (no weights): the bounded readers of a
config.json and of a GGUF header, where a hub model's config is found offline, the shape they
give, and the memory arithmetic on it. Used by recipe validation to refuse a model that cannot
fit the target, and by `edgekit plan` (:mod:`edgekit.planning`, which adds activations, decode
and prefill time). Every number here is a *prediction*.

Units (the one memory model, shared by ``plan``, recipe validation's rules and shape chain,
and the TensorRT readiness check): memory in **decimal GB** (``GB`` = 10^9 bytes), as the
target profiles and datasheets state it. ``GIB`` only converts values that are GiB by
definition (TensorRT's workspace pool limit, ``build_engine.workspace_gb``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

GB = 1e9  # decimal: target profiles, datasheets and every edgekit memory estimate
GIB = 1024**3  # only for quantities defined in GiB (TensorRT's workspace pool limit)
#: The one runtime allowance (decimal GB): what an inference engine's execution context
#: allocates beyond its weights, KV cache, activations and workspace (tactic state, scratch).
#: A target's ``usable_gb`` already excludes the OS, the CUDA context and library workspaces
#: (its "reserve"), so this covers only the engine's own allocations. A planning estimate.
RUNTIME_ALLOWANCE_GB = 0.25


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    #: biases on the q/k/v projections (Qwen2) and on o_proj (Llama's attention_bias)
    qkv_bias: bool = False
    o_bias: bool = False

    @property
    def linear_parameters(self) -> int:
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        per_layer = h * q + 2 * h * kv + q * h + 3 * h * self.intermediate_size
        return self.num_layers * per_layer

    @property
    def bias_parameters(self) -> int:
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        per_layer = (q + 2 * kv if self.qkv_bias else 0) + (self.hidden_size if self.o_bias else 0)
        return self.num_layers * per_layer

    @property
    def embedding_parameters(self) -> int:
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)


def shape_from_config(config: dict[str, Any]) -> ModelShape:
    heads = config["num_attention_heads"]
    # Qwen2's attention always has q/k/v biases (its config has no switch); Llama-style
    # configs say attention_bias (q, k, v and o).
    attention_bias = bool(config.get("attention_bias", False))
    qwen2 = config.get("model_type") == "qwen2"
    return ModelShape(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=qwen2 or attention_bias,
        o_bias=attention_bias and not qwen2,
    )


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
    from edgekit.errors import ModelError
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


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_header(path: Path) -> tuple[dict[str, Any], list[str]]:
    """The metadata and tensor names of a GGUF (v2/v3) file, read from its header alone.

    Arrays are returned as their length (the tokenizer's token list is a 49k-string array:
    its length is the vocabulary size, its strings are skipped unread). The gguf package's
    reader builds every array element as a numpy view, which takes seconds for a tokenizer;
    this reads the same header in milliseconds. Raises ValueError for anything else."""
    import struct

    try:
        return _parse_gguf_header(path)
    except struct.error as exc:  # a header cut short
        raise ValueError(f"{path}: truncated GGUF header ({exc})") from None


def _parse_gguf_header(path: Path) -> tuple[dict[str, Any], list[str]]:
    import mmap
    import struct

    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        version, tensor_count, kv_count = struct.unpack_from("<IQQ", data, 4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2 or 3 expected)")
        offset = 24

        def string() -> str:
            nonlocal offset
            (length,) = struct.unpack_from("<Q", data, offset)
            text = data[offset + 8: offset + 8 + length].decode("utf-8", errors="replace")
            offset += 8 + length
            return text

        def scalar(kind: int) -> Any:
            nonlocal offset
            fmt = _GGUF_SCALARS[kind]
            (value,) = struct.unpack_from(fmt, data, offset)
            offset += struct.calcsize(fmt)
            return value

        def skip(kind: int, count: int) -> None:
            nonlocal offset
            if kind == _GGUF_STRING:
                for _ in range(count):
                    (length,) = struct.unpack_from("<Q", data, offset)
                    offset += 8 + length
            elif kind in _GGUF_SCALARS:
                offset += struct.calcsize(_GGUF_SCALARS[kind]) * count
            else:
                raise ValueError(f"unsupported GGUF array element type {kind}")

        metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = string()
            (kind,) = struct.unpack_from("<I", data, offset)
            offset += 4
            if kind == _GGUF_STRING:
                metadata[key] = string()
            elif kind == _GGUF_ARRAY:
                element, count = struct.unpack_from("<IQ", data, offset)
                offset += 12
                skip(element, count)
                metadata[key] = count
            elif kind in _GGUF_SCALARS:
                metadata[key] = scalar(kind)
            else:
                raise ValueError(f"unsupported GGUF value type {kind} for {key}")
        names = []
        for _ in range(tensor_count):
            names.append(string())
            (dims,) = struct.unpack_from("<I", data, offset)
            offset += 4 + 8 * dims + 4 + 8  # dims, ggml type, data offset
    return metadata, names


def shape_from_gguf(path: Path) -> ModelShape:
    metadata, names = read_gguf_header(path)
    arch = metadata["general.architecture"]

    def value(key: str) -> Any:
        return metadata[f"{arch}.{key}"]

    heads = value("attention.head_count")
    hidden = value("embedding_length")
    return ModelShape(
        vocab_size=metadata["tokenizer.ggml.tokens"],
        hidden_size=hidden,
        intermediate_size=value("feed_forward_length"),
        num_layers=value("block_count"),
        num_heads=heads,
        num_kv_heads=metadata.get(f"{arch}.attention.head_count_kv", heads),
        head_dim=hidden // heads,
        tie_word_embeddings="output.weight" not in set(names),
        qkv_bias="blk.0.attn_q.bias" in set(names),
        o_bias="blk.0.attn_output.bias" in set(names),
    )


#: Published config.json files of the hub models the shipped recipes name (one folder per
#: hub id, "/" written "--"): configs are facts, and they let validation run offline.
PUBLISHED_CONFIGS = Path(__file__).resolve().parent / "models" / "published"


def published_config(spec: str) -> Path | None:
    """The config.json kept in the repo for hub id ``spec`` (``org/name``), or None."""
    if spec.count("/") != 1:
        return None
    org, name = spec.split("/")
    path = PUBLISHED_CONFIGS / f"{org}--{name}" / "config.json"
    return path if path.is_file() else None


def locate_config(source: Any) -> tuple[Path, str] | None:
    """Where a hub model's config.json is found offline, and what that place is: the local
    Hugging Face cache (never a download), else the published copy in the repo. None when
    neither has it."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source.spec, "config.json", revision=source.revision)
    except Exception:  # no huggingface_hub, an odd id or revision: fall through
        cached = None
    if isinstance(cached, str):
        return Path(cached), "config.json in the local Hugging Face cache"
    published = published_config(source.spec)
    if published is not None:
        return published, f"published config.json kept in edgekit ({published.parent.name})"
    return None


def estimate_memory_gb(
    shape: ModelShape,
    *,
    linear_bits: float,
    other_bits: float,
    context_length: int,
    batch: int = 1,
    kv_bytes: int = 2,
) -> dict[str, float]:
    """Predicted device memory in decimal GB: weights + KV cache (fp16 by default) + the
    runtime allowance. (``edgekit plan`` and recipe validation use the fuller
    :func:`edgekit.planning.roofline.memory_breakdown`, which adds activations.)"""
    linear = shape.linear_parameters * linear_bits / 8
    other = shape.embedding_parameters * other_bits / 8
    kv = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * context_length * batch * kv_bytes
    weights_gb, kv_gb = (linear + other) / GB, kv / GB
    return {
        "weights_gb": round(weights_gb, 3),
        "kv_cache_gb": round(kv_gb, 3),
        "overhead_gb": RUNTIME_ALLOWANCE_GB,
        "total_gb": round(weights_gb + kv_gb + RUNTIME_ALLOWANCE_GB, 3),
    }
