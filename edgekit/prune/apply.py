"""Cut a Llama-style model down to the kept units, producing a standard HF model.

``KeptUnits`` says what survives (teacher indices); :func:`select_units` picks them from an
importance score and a target shape; :func:`prune_model` slices every weight and writes a
config transformers loads unchanged. Removing hidden channels changes what each RMSNorm
averages over, so its weight is scaled by sqrt(H/H') and ``rms_norm_eps`` by H/H': a channel
that carried nothing leaves the model's output exactly as it was (what the tests check), and
for one that carried little the normalisation stays close to the teacher's.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

from edgekit.prune.importance import Importance, head_dim_of
from edgekit.weights.layers import decoder_parts


@dataclass
class KeptUnits:
    layers: list[int]  # teacher layer indices, ascending
    hidden: list[int] | None  # teacher hidden channels kept (ascending); None = all
    heads: list[list[int]]  # per kept layer: teacher query-head indices kept, grouped by kv head
    kv_heads: list[list[int]]  # per kept layer: teacher key/value heads kept
    channels: list[list[int]]  # per kept layer: teacher MLP channels kept (ascending)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _top(scores: Any, count: int) -> list[int]:
    """Indices of the ``count`` largest scores, ascending (ties: lower index wins)."""
    import torch

    order = torch.argsort(-scores.double(), stable=True)[:count]
    return sorted(int(i) for i in order)


def select_units(model: Any, importance: Importance, shape: Any) -> KeptUnits:
    """Keep the most important units for ``shape`` (an edgekit.sizing.ModelShape)."""
    config = model.config
    n_heads, n_kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    per_group = n_heads // n_kv
    new_per_group = shape.num_heads // shape.num_kv_heads
    layers = _top(importance.layers, shape.num_layers)
    hidden = None if shape.hidden_size == config.hidden_size else _top(importance.hidden, shape.hidden_size)
    heads, kv_heads, channels = [], [], []
    for layer in layers:
        scores = importance.heads[layer]
        # Whole groups first (a group is worth the sum of its query heads), then the best
        # query heads inside each kept group: repeat_kv's head -> group mapping stays valid.
        group_scores = scores.reshape(n_kv, per_group).sum(1)
        groups = _top(group_scores, shape.num_kv_heads)
        kept = []
        for g in groups:
            inside = _top(scores[g * per_group : (g + 1) * per_group], new_per_group)
            kept.extend(g * per_group + i for i in inside)
        heads.append(kept)
        kv_heads.append(groups)
        channels.append(_top(importance.channels[layer], shape.intermediate_size))
    return KeptUnits(layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, channels=channels)


def _rows(weight: Any, index: Any) -> Any:
    return weight.index_select(0, index.to(weight.device)).contiguous()


def _cols(weight: Any, index: Any) -> Any:
    return weight.index_select(1, index.to(weight.device)).contiguous()


def _head_index(heads: list[int], head_dim: int) -> Any:
    import torch

    return torch.tensor([h * head_dim + d for h in heads for d in range(head_dim)], dtype=torch.long)


def prune_model(model: Any, kept: KeptUnits) -> Any:
    """A new model of the pruned shape, its weights sliced from ``model`` (left untouched)."""
    import math

    import torch
    from transformers import AutoModelForCausalLM

    inner, layers = decoder_parts(model)
    config = model.config
    head_dim = head_dim_of(model)
    old_hidden = config.hidden_size
    hidden_index = torch.tensor(kept.hidden, dtype=torch.long) if kept.hidden is not None else None
    new_hidden = len(kept.hidden) if kept.hidden is not None else old_hidden
    norm_scale = math.sqrt(old_hidden / new_hidden)

    def cut_in(weight):  # a linear reading from the residual stream
        return _cols(weight, hidden_index) if hidden_index is not None else weight.clone()

    def cut_out(tensor):  # a linear / bias writing to the residual stream
        return _rows(tensor, hidden_index) if hidden_index is not None else tensor.clone()

    def cut_norm(weight):
        w = weight.index_select(0, hidden_index.to(weight.device)) if hidden_index is not None else weight.clone()
        return (w.float() * norm_scale).to(weight.dtype) if hidden_index is not None else w

    state: dict[str, Any] = {}
    with torch.no_grad():
        state["model.embed_tokens.weight"] = cut_in(inner.embed_tokens.weight)
        state["model.norm.weight"] = cut_norm(inner.norm.weight)
        for new_i, (old_i, heads, kv_heads, channels) in enumerate(zip(kept.layers, kept.heads, kept.kv_heads, kept.channels)):
            layer = layers[old_i]
            attn, mlp = layer.self_attn, layer.mlp
            prefix = f"model.layers.{new_i}."
            q_index, kv_index = _head_index(heads, head_dim), _head_index(kv_heads, head_dim)
            for name, index in (("q_proj", q_index), ("k_proj", kv_index), ("v_proj", kv_index)):
                lin = getattr(attn, name)
                state[prefix + f"self_attn.{name}.weight"] = cut_in(_rows(lin.weight, index))
                if lin.bias is not None:
                    state[prefix + f"self_attn.{name}.bias"] = _rows(lin.bias, index)
            state[prefix + "self_attn.o_proj.weight"] = cut_out(_cols(attn.o_proj.weight, q_index))
            if attn.o_proj.bias is not None:
                state[prefix + "self_attn.o_proj.bias"] = cut_out(attn.o_proj.bias)
            # Per-head norms (Qwen3's q_norm/k_norm) act on head_dim, which never changes.
            for name in ("q_norm", "k_norm"):
                if hasattr(attn, name):
                    state[prefix + f"self_attn.{name}.weight"] = getattr(attn, name).weight.clone()
            channel_index = torch.tensor(channels, dtype=torch.long)
            for name in ("gate_proj", "up_proj"):
                state[prefix + f"mlp.{name}.weight"] = cut_in(_rows(getattr(mlp, name).weight, channel_index))
            state[prefix + "mlp.down_proj.weight"] = cut_out(_cols(mlp.down_proj.weight, channel_index))
            state[prefix + "input_layernorm.weight"] = cut_norm(layer.input_layernorm.weight)
            state[prefix + "post_attention_layernorm.weight"] = cut_norm(layer.post_attention_layernorm.weight)
        tied = bool(getattr(config, "tie_word_embeddings", False))
        if not tied:
            state["lm_head.weight"] = cut_in(model.get_output_embeddings().weight)

    new_config = copy.deepcopy(config)
    new_config.hidden_size = new_hidden
    new_config.intermediate_size = len(kept.channels[0]) if kept.channels else config.intermediate_size
    new_config.num_hidden_layers = len(kept.layers)
    new_config.num_attention_heads = len(kept.heads[0])
    new_config.num_key_value_heads = len(kept.kv_heads[0])
    new_config.head_dim = head_dim  # explicit: hidden_size / heads no longer gives it
    if hidden_index is not None:
        new_config.rms_norm_eps = config.rms_norm_eps * old_hidden / new_hidden
    if getattr(new_config, "layer_types", None):
        new_config.layer_types = [config.layer_types[i] for i in kept.layers]
    if getattr(new_config, "max_window_layers", None) is not None:
        new_config.max_window_layers = min(new_config.max_window_layers, new_config.num_hidden_layers)
    dtype = next(model.parameters()).dtype
    student = AutoModelForCausalLM.from_config(new_config, dtype=dtype)
    if tied:
        student.tie_weights()
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"pruned state does not match the pruned config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if tied:
        student.tie_weights()
    student.eval()
    return student
