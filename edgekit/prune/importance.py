"""Importance of every prunable unit, from activations on calibration text (forward only).

Minitron-style: one pass of the teacher over calibration windows with hooks; each unit is
scored by what it *contributes* to the residual stream, averaged over a window's tokens and
aggregated over windows with an L2 norm (the aggregation Minitron found best):

- attention head h of layer l: ‖o_proj[:, h] · attn_h(x)‖ — the head's share of o_proj's output;
- MLP channel j of layer l: |act(gate_j(x)) · up_j(x)| · ‖down_proj[:, j]‖;
- hidden channel c: Σ over every RMSNorm (both per layer, and the final one) of |norm(x)_c|;
- layer l (depth): ``block_importance`` = 1 − cos(input, output) of the layer, mean over
  tokens; or ``perplexity_drop`` = calibration loss with the layer skipped − without.

``magnitude`` importance (the baseline) scores the same units by the L2 norm of the weights
that read from or write to them, without looking at data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from edgekit.weights.layers import decoder_parts


@dataclass
class Importance:
    heads: list[Any]  # per layer: [num_heads] tensor
    channels: list[Any]  # per layer: [intermediate_size] tensor
    hidden: Any  # [hidden_size]
    layers: Any  # [num_layers]: larger = more important
    method: str


def model_device(model: Any) -> Any:
    """The device of the model's weights (calibration ids are moved there)."""
    return next(model.parameters()).device


def head_dim_of(model: Any) -> int:
    config = model.config
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def activation_importance(model: Any, samples: list[Any], *, advance: Callable[[], None] = lambda: None) -> Importance:
    """Heads, MLP channels and hidden channels by contribution; layers by block importance
    (``perplexity_drop`` is its own, costlier function)."""
    import torch

    inner, layers = decoder_parts(model)
    heads_n, head_dim = model.config.num_attention_heads, head_dim_of(model)
    n_layers = len(layers)
    # Per window, accumulate the mean over tokens; across windows, the sum of squares (-> L2).
    window_heads = [None] * n_layers
    window_channels = [None] * n_layers
    window_hidden = [None]
    window_cos = [None] * n_layers
    sq_heads = [0.0] * n_layers
    sq_channels = [0.0] * n_layers
    sq_hidden = [0.0]
    cos_sum = torch.zeros(n_layers, dtype=torch.float64)
    handles = []

    def add_hidden(_module, _args, output):
        value = output.detach().float().abs().reshape(-1, output.shape[-1]).mean(0)
        window_hidden[0] = value if window_hidden[0] is None else window_hidden[0] + value

    for index, layer in enumerate(layers):
        o_proj, down = layer.self_attn.o_proj, layer.mlp.down_proj

        def heads_hook(_module, args, index=index, o_proj=o_proj):
            x = args[0].detach().float().reshape(-1, heads_n, head_dim)  # [tokens, heads, head_dim]
            w = o_proj.weight.detach().float().reshape(o_proj.weight.shape[0], heads_n, head_dim)
            # Contribution of head h = x_h @ W_h^T; its squared norm = x_h^T (W_h^T W_h) x_h.
            gram = torch.einsum("ohd,ohe->hde", w, w)
            norms = torch.einsum("thd,hde,the->th", x, gram, x).clamp_min(0).sqrt()
            window_heads[index] = norms.mean(0)

        def channels_hook(_module, args, index=index, down=down):
            a = args[0].detach().float().reshape(-1, args[0].shape[-1]).abs().mean(0)
            window_channels[index] = a * down.weight.detach().float().norm(dim=0)

        def layer_hook(_module, args, kwargs, output, index=index):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(x_in.detach().float(), x_out.detach().float(), dim=-1)
            window_cos[index] = cos.mean().double()

        handles.append(o_proj.register_forward_pre_hook(heads_hook))
        handles.append(down.register_forward_pre_hook(channels_hook))
        handles.append(layer.register_forward_hook(layer_hook, with_kwargs=True))
        handles.append(layer.input_layernorm.register_forward_hook(add_hidden))
        handles.append(layer.post_attention_layernorm.register_forward_hook(add_hidden))
    handles.append(inner.norm.register_forward_hook(add_hidden))
    device = model_device(model)
    try:
        with torch.inference_mode():
            for ids in samples:
                window_hidden[0] = None
                model(input_ids=ids.to(device), use_cache=False)
                for i in range(n_layers):
                    sq_heads[i] = sq_heads[i] + window_heads[i] ** 2
                    sq_channels[i] = sq_channels[i] + window_channels[i] ** 2
                    cos_sum[i] += float(window_cos[i])
                sq_hidden[0] = sq_hidden[0] + window_hidden[0] ** 2
                advance()
    finally:
        for handle in handles:
            handle.remove()
    layer_scores = 1.0 - cos_sum / len(samples)
    # Scores come back on the CPU whatever device measured them (selection and pruning.json).
    return Importance(
        heads=[s.sqrt().cpu() for s in sq_heads],
        channels=[s.sqrt().cpu() for s in sq_channels],
        hidden=sq_hidden[0].sqrt().cpu(),
        layers=layer_scores.float(),
        method="activation",
    )


def perplexity_drop(model: Any, samples: list[Any]) -> Any:
    """Calibration loss with each layer skipped (its input passed through) − the full model's."""
    import torch

    _, layers = decoder_parts(model)

    device = model_device(model)

    def loss() -> float:
        total = 0.0
        with torch.inference_mode():
            for ids in samples:
                ids = ids.to(device)
                total += float(model(input_ids=ids, labels=ids, use_cache=False).loss)
        return total / len(samples)

    base = loss()
    drops = []
    for layer in layers:
        def skip(_module, args, kwargs, output):
            x_in = args[0] if args else kwargs["hidden_states"]
            return (x_in,) + tuple(output[1:]) if isinstance(output, tuple) else x_in

        handle = layer.register_forward_hook(skip, with_kwargs=True)
        try:
            drops.append(loss() - base)
        finally:
            handle.remove()
    return torch.tensor(drops, dtype=torch.float64)


def magnitude_importance(model: Any) -> Importance:
    """Data-free baseline: L2 norm of the weights each unit reads from and writes to."""
    import torch

    inner, layers = decoder_parts(model)
    heads_n, head_dim = model.config.num_attention_heads, head_dim_of(model)
    heads, channels, layer_scores = [], [], []
    hidden_sq = inner.embed_tokens.weight.detach().float().pow(2).sum(0)
    with torch.no_grad():
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            q = attn.q_proj.weight.float().reshape(heads_n, head_dim, -1).pow(2).sum((1, 2))
            o = attn.o_proj.weight.float().reshape(-1, heads_n, head_dim).pow(2).sum((0, 2))
            heads.append((q + o).sqrt())
            c = mlp.gate_proj.weight.float().pow(2).sum(1) + mlp.up_proj.weight.float().pow(2).sum(1) + mlp.down_proj.weight.float().pow(2).sum(0)
            channels.append(c.sqrt())
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                hidden_sq += lin.weight.float().pow(2).sum(0)
            for lin in (attn.o_proj, mlp.down_proj):
                hidden_sq += lin.weight.float().pow(2).sum(1)
            # A layer's size: what it can write into the residual stream.
            layer_scores.append(float(attn.o_proj.weight.float().norm() + mlp.down_proj.weight.float().norm()))
    return Importance(heads=[h.cpu() for h in heads], channels=[c.cpu() for c in channels], hidden=hidden_sq.sqrt().cpu(),
                      layers=torch.tensor(layer_scores), method="magnitude")
