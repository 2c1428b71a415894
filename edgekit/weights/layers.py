"""Find a causal LM's decoder layers: the one finder every stage uses (quantize walks their
Linears, distill hooks their outputs, prune rewrites them)."""

from __future__ import annotations

from typing import Any

# model_type values whose decoder is Llama-shaped (what structured pruning can rewrite)
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "granite", "olmo", "olmo2")


def decoder_layers(model: Any) -> Any:
    """The ModuleList of decoder layers (``model.model.layers`` for Llama-likes); raises
    ValueError when there is none (callers turn it into their stage's error)."""
    import torch

    inner = getattr(model, "model", None)
    if inner is not None and isinstance(getattr(inner, "layers", None), torch.nn.ModuleList):
        return inner.layers
    base = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(base, "layers", None)
    if isinstance(layers, torch.nn.ModuleList):
        return layers
    count = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise ValueError("cannot find the decoder layers of this model")


def decoder_linears(model: Any) -> list[tuple[str, Any]]:
    """(full module name, nn.Linear) of every Linear inside the decoder layers: what every
    method quantizes (lm_head and the embeddings are outside the layers)."""
    import torch

    layers = decoder_layers(model)
    prefix = next(name for name, module in model.named_modules() if module is layers)
    return [
        (f"{prefix}.{index}.{name}", module)
        for index, layer in enumerate(layers)
        for name, module in layer.named_modules()
        if isinstance(module, torch.nn.Linear)
    ]


def decoder_parts(model: Any) -> tuple[Any, list[Any]]:
    """(the inner model with embed_tokens/norm, its decoder layers), for Llama-like models;
    raises ValueError for any other shape."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or getattr(model.config, "model_type", None) not in LLAMA_LIKE:
        raise ValueError(
            f"structured pruning supports Llama-style decoders ({', '.join(LLAMA_LIKE)}), "
            f"not model_type '{getattr(model.config, 'model_type', '?')}'"
        )
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if not hasattr(attn, name):
                raise ValueError(f"attention without {name}: not a Llama-style layer")
        for name in ("gate_proj", "up_proj", "down_proj"):
            if not hasattr(mlp, name):
                raise ValueError(f"MLP without {name}: not a gated Llama-style MLP")
    return inner, list(layers)
