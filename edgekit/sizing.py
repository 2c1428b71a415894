"""Memory arithmetic from a model's config alone (no weights): used by recipe validation to
refuse a model that cannot fit the target, and by `edgekit plan` later. Every number here
is a *prediction*.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

GIB = 1024**3
# CUDA context, TensorRT/ORT workspaces and activations of a batch-1 decoder: a planning
# allowance, not a measurement.
RUNTIME_OVERHEAD_GB = 0.5


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

    @property
    def linear_parameters(self) -> int:
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        per_layer = h * q + 2 * h * kv + q * h + 3 * h * self.intermediate_size
        return self.num_layers * per_layer

    @property
    def embedding_parameters(self) -> int:
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)


def shape_from_config(config: dict[str, Any]) -> ModelShape:
    heads = config["num_attention_heads"]
    return ModelShape(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def shape_from_gguf(path: Path) -> ModelShape:
    import gguf

    reader = gguf.GGUFReader(str(path))

    def value(key: str) -> Any:
        field = reader.fields[key]
        return field.parts[field.data[0]].tolist()[0]

    arch = bytes(reader.fields["general.architecture"].parts[reader.fields["general.architecture"].data[0]]).decode()
    heads = value(f"{arch}.attention.head_count")
    hidden = value(f"{arch}.embedding_length")
    names = {t.name for t in reader.tensors}
    return ModelShape(
        vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data),
        hidden_size=hidden,
        intermediate_size=value(f"{arch}.feed_forward_length"),
        num_layers=value(f"{arch}.block_count"),
        num_heads=heads,
        num_kv_heads=value(f"{arch}.attention.head_count_kv") if f"{arch}.attention.head_count_kv" in reader.fields else heads,
        head_dim=hidden // heads,
        tie_word_embeddings="output.weight" not in names,
    )


def model_shape(source: Any) -> ModelShape | None:
    """The shape of a resolved ModelSource, or None when only the hub has its config."""
    import json

    if source.is_gguf:
        return shape_from_gguf(source.path)
    if source.kind == "dir":
        return shape_from_config(json.loads((source.path / "config.json").read_text()))
    try:  # a hub id: only a config already in the local hub cache (no download here)
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source.spec, "config.json", revision=source.revision)
    except Exception:
        return None
    if isinstance(cached, str):
        return shape_from_config(json.loads(Path(cached).read_text()))
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
    """Predicted device memory: weights + KV cache (fp16 by default) + runtime allowance."""
    linear = shape.linear_parameters * linear_bits / 8
    other = shape.embedding_parameters * other_bits / 8
    kv = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * context_length * batch * kv_bytes
    weights_gb, kv_gb = (linear + other) / GIB, kv / GIB
    return {
        "weights_gb": round(weights_gb, 3),
        "kv_cache_gb": round(kv_gb, 3),
        "overhead_gb": RUNTIME_OVERHEAD_GB,
        "total_gb": round(weights_gb + kv_gb + RUNTIME_OVERHEAD_GB, 3),
    }
