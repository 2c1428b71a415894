"""Layer-by-layer calibration driver for GPTQ (and anything else that needs per-layer
input statistics).

Peak memory stays near one decoder layer plus its calibration activations: the inputs of
layer 0 are captured once, then for each layer i the linears are quantized in
true-sequential order — (q, k, v) → o → (gate, up) → down — each group's Hessian collected
with the groups before it already quantized, and finally the quantized layer is run to
produce the inputs of layer i+1. A forward pass for a group stops as soon as every module
of the group has seen its input, so collecting the early groups costs little.

On a GPU host (``device="cuda"``) the model stays in CPU memory and each decoder layer
visits the GPU only while it is calibrated, with its activations: so a 7B model quantizes on
one GPU, and SmolLM2-135M on 2 CPU cores with the same code.
"""

from __future__ import annotations

from typing import Any, Callable

from edgekit.weights.layers import decoder_layers

# True-sequential groups for Llama-family decoder layers (Llama, Mistral, Qwen2/3, SmolLM):
# modules in one group read the same input, so they share one Hessian.
SEQUENTIAL_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


class _StopForward(Exception):
    """Raised from a hook to end a forward pass early (its remaining work is not needed)."""


def linear_groups(layer: Any) -> list[tuple[str, ...]]:
    """Groups of Linears that read the same input, in execution order."""
    import torch

    linears = [name for name, module in layer.named_modules() if isinstance(module, torch.nn.Linear)]
    groups = [tuple(n for n in group if n in linears) for group in SEQUENTIAL_GROUPS]
    groups = [g for g in groups if g]
    covered = {n for g in groups for n in g}
    # An architecture with other names: each remaining Linear on its own, in module order
    # (their inputs may differ, so they cannot share a Hessian).
    groups += [(name,) for name in linears if name not in covered]
    return groups


def _to(value: Any, device: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value


def capture_layer_inputs(model: Any, samples: list[Any], device: Any = "cpu") -> tuple[list[Any], list[dict]]:
    """Hidden states entering decoder layer 0, and the keyword arguments the model passes to
    its layers (attention mask, rotary embeddings, ...), for every calibration sample."""
    import torch

    layers = decoder_layers(model)
    inputs: list[Any] = []
    kwargs_list: list[dict] = []

    def grab(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        inputs.append(hidden.detach().to(device))
        kwargs_list.append({k: _to(v, device) for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.inference_mode():
            for ids in samples:
                try:
                    model(input_ids=ids, use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return inputs, kwargs_list


def _run_layer(layer: Any, hidden: Any, kwargs: dict) -> Any:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


# (module names, the nn.Linear modules, their shared Hessian) -> one QuantizedWeight per module
QuantizeGroupFn = Callable[[tuple[str, ...], list, Any], list]


def _group_input(layer: Any, module: Any, hidden: Any, kwargs: dict) -> Any:
    """What ``module`` (inside ``layer``) reads when ``layer`` runs on ``hidden``."""
    seen: list = []

    def hook(_module, args):
        seen.append(args[0])
        raise _StopForward  # the rest of the layer is not needed

    handle = module.register_forward_pre_hook(hook)
    try:
        _run_layer(layer, hidden, kwargs)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return seen[0]


def quantize_layer_by_layer(
    model: Any, samples: list[Any], quantize: QuantizeGroupFn, *, device: Any = "cpu", advance: Callable[[], None] = lambda: None,
    float_targets: bool = False,
) -> dict[str, Any]:
    """Quantize every Linear inside the decoder layers; returns {module name: QuantizedWeight}.

    ``quantize`` gets each group of Linears that read one input (q/k/v, gate/up) with their
    shared Hessian; each module's weight is then replaced by its dequantized weight, so later
    groups and layers calibrate on the quantized model, as GPTQ requires.

    With ``float_targets`` the float model runs beside it (a float copy of the current layer on
    its own stream of hidden states) and ``quantize`` is also called with ``cross=`` the moment
    ``mean(2 x_quantized x_float^T)`` of the group's two inputs, for the same tokens
    (:func:`edgekit.quantize.gptq.float_target` turns it into the weight to approximate). Costs
    one more forward per group and one float copy of one layer.
    """
    import copy

    import torch

    from edgekit.quantize.gptq import accumulate_cross, accumulate_hessian

    layers = decoder_layers(model)
    prefix = next(name for name, module in model.named_modules() if module is layers)
    hidden_states, layer_kwargs = capture_layer_inputs(model, samples, device)
    float_states = list(hidden_states) if float_targets else None
    results: dict[str, Any] = {}
    home = next(layers[0].parameters()).device
    with torch.inference_mode():
        for index, layer in enumerate(layers):
            layer.to(device)
            reference = copy.deepcopy(layer) if float_targets else None  # this layer's float weights
            modules = dict(layer.named_modules())
            reference_modules = dict(reference.named_modules()) if reference is not None else {}
            for group in linear_groups(layer):
                H, n_h, C, n_c = None, 0, None, 0
                for hidden, kwargs, float_hidden in zip(hidden_states, layer_kwargs, float_states or hidden_states):
                    x = _group_input(layer, modules[group[0]], hidden, kwargs)  # the group's other modules read it too
                    H, n_h = accumulate_hessian(H, x, n_h)
                    if reference is not None:
                        x_float = _group_input(reference, reference_modules[group[0]], float_hidden, kwargs)
                        C, n_c = accumulate_cross(C, x, x_float, n_c)
                members = [modules[name] for name in group]
                qweights = quantize(group, members, H) if reference is None else quantize(group, members, H, cross=C)
                for name, module, qweight in zip(group, members, qweights):
                    module.weight.data = qweight.dequantize(module.weight.dtype).to(module.weight.device)
                    results[f"{prefix}.{index}.{name}"] = _to_cpu(qweight)
            # inputs of the next layer come from this layer, quantized (and, beside them, float)
            hidden_states = [_run_layer(layer, h, kw) for h, kw in zip(hidden_states, layer_kwargs)]
            if reference is not None:
                float_states = [_run_layer(reference, h, kw) for h, kw in zip(float_states, layer_kwargs)]
                del reference, reference_modules
            layer.to(home)
            advance()
    return results


def _to_cpu(qweight: Any) -> Any:
    for field in ("qweight", "scales", "zeros", "g_idx"):
        setattr(qweight, field, getattr(qweight, field).cpu())
    return qweight


def resolve_device(name: str, stage: str = "quantize") -> str:
    """``auto`` = the first CUDA GPU when torch sees one, else the CPU (:mod:`edgekit.devices`)."""
    from edgekit.devices import resolve_device as resolve

    return resolve(name, stage=stage)
