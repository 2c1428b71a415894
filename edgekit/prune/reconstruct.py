"""Refit what pruned units wrote, by least squares on calibration activations (``reconstruct``).

Removing MLP channels or attention heads removes input columns of the linear that writes the
layer's result into the residual stream (``mlp.down_proj``, ``self_attn.o_proj``). Slicing
keeps the surviving columns as they were, so whatever the removed units contributed is lost.
Refitting the kept columns lets them take over the part of it they can express:

    W' = argmin Σ_t ‖y_t − W' a_t,K‖²  =  (Σ_t y_t a_t,Kᵀ) (Σ_t a_t,K a_t,Kᵀ + λ I)⁻¹

with a_t the linear's input (all teacher units), a_t,K the kept ones and y_t = W a_t its
output without bias, on the teacher's own activations; λ = ``ridge`` × the mean diagonal of
the Gram matrix (the kept units' mean squared activation), so it is scale-free. Every layer is
fitted on the teacher's inputs, independently: fitting each layer to the pruned model's
drifting inputs instead shrinks every layer's output (errors in the variables) and measured
worse on SmolLM2-135M (docs/pruning.md).

Two passes over the calibration windows: the first (importance) decides what is kept; this
one accumulates, per refitted linear, ``Σ y a_Kᵀ`` [out, kept], ``Σ a_K a_Kᵀ`` [kept, kept] and
``Σ ‖y‖²``. Those grow with the kept width squared (a 7B MLP keeping 12k channels: 0.75 GB per
layer), so layers are visited in groups that fit ``budget_bytes``, each group a pass that stops
after its last layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from edgekit.prune.apply import KeptUnits, _head_index
from edgekit.prune.importance import head_dim_of, model_device
from edgekit.weights.layers import decoder_parts

#: what one pass's statistics may occupy; more layers than fit take more passes
DEFAULT_BUDGET_BYTES = 2 << 30
DEFAULT_RIDGE = 1e-3
#: the linear, per kind of unit, whose input columns the pruned units are
OUTPUT_LINEARS = ("self_attn.o_proj", "mlp.down_proj")


@dataclass
class Reconstruction:
    #: (teacher layer index, linear name) -> refitted weight [out (teacher rows), kept], float32 on the CPU
    weights: dict[tuple[int, str], Any] = field(default_factory=dict)
    #: the same keys -> relative output error on the calibration windows, sliced vs refitted
    error_sliced: dict[tuple[int, str], float] = field(default_factory=dict)
    error_refit: dict[tuple[int, str], float] = field(default_factory=dict)
    passes: int = 0

    def summary(self) -> dict[str, Any]:
        """What pruning.json records: the mean relative error per linear kind, before and after."""
        by_kind: dict[str, dict[str, float]] = {}
        for name in OUTPUT_LINEARS:
            keys = [k for k in self.weights if k[1] == name]
            if keys:
                by_kind[name] = {
                    "linears": len(keys),
                    "relative_error_sliced": round(sum(self.error_sliced[k] for k in keys) / len(keys), 5),
                    "relative_error_refit": round(sum(self.error_refit[k] for k in keys) / len(keys), 5),
                }
        return {"linears": by_kind, "passes": self.passes}

    def mean_errors(self) -> dict[str, float]:
        """The stage's metrics: mean relative output error over every refitted linear."""
        keys = list(self.weights)
        if not keys:
            return {}
        return {"output_error_sliced": round(sum(self.error_sliced[k] for k in keys) / len(keys), 5),
                "output_error_refit": round(sum(self.error_refit[k] for k in keys) / len(keys), 5)}


def kept_inputs(model: Any, kept: KeptUnits) -> dict[tuple[int, str], list[int]]:
    """The refitted linears and their kept input columns: only where units were removed."""
    config = model.config
    head_dim = head_dim_of(model)
    targets: dict[tuple[int, str], list[int]] = {}
    for layer, heads, channels in zip(kept.layers, kept.heads, kept.channels):
        if len(heads) < config.num_attention_heads:
            targets[(layer, "self_attn.o_proj")] = _head_index(heads, head_dim).tolist()
        if len(channels) < config.intermediate_size:
            targets[(layer, "mlp.down_proj")] = list(channels)
    return targets


def _groups(targets: dict[tuple[int, str], list[int]], out_features: dict[tuple[int, str], int], budget_bytes: int,
            item_bytes: int) -> list[list[tuple[int, str]]]:
    """Consecutive linears (in layer order) whose statistics fit the budget; at least one each."""
    groups: list[list[tuple[int, str]]] = []
    current: list[tuple[int, str]] = []
    used = 0
    for key in sorted(targets, key=lambda k: (k[0], OUTPUT_LINEARS.index(k[1]))):
        k = len(targets[key])
        size = (k * k + out_features[key] * k) * item_bytes
        if current and used + size > budget_bytes:
            groups.append(current)
            current, used = [], 0
        current.append(key)
        used += size
    if current:
        groups.append(current)
    return groups


def _plan(model: Any, kept: KeptUnits, budget_bytes: int) -> tuple[dict[tuple[int, str], list[int]], list[list[tuple[int, str]]], Any]:
    """The refitted linears (kept input columns), their grouping into passes, the accumulation dtype."""
    import torch

    _, layers = decoder_parts(model)
    targets = kept_inputs(model, kept)
    # float64 on the CPU (cheap there); float32 on a GPU, where float64 is slow.
    acc_dtype = torch.float64 if model_device(model).type == "cpu" else torch.float32
    out_features = {key: layers[key[0]].get_submodule(key[1]).out_features for key in targets}
    groups = _groups(targets, out_features, budget_bytes, 8 if acc_dtype == torch.float64 else 4)
    return targets, groups, acc_dtype


def reconstruction_passes(model: Any, kept: KeptUnits, *, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> int:
    """How many passes over the calibration windows :func:`reconstruct_outputs` will make."""
    return len(_plan(model, kept, budget_bytes)[1])


class _Done(Exception):
    """Raised by the last hooked linear of a pass: the rest of the forward is not needed."""


def reconstruct_outputs(model: Any, kept: KeptUnits, samples: list[Any], *, ridge: float = DEFAULT_RIDGE,
                        budget_bytes: int = DEFAULT_BUDGET_BYTES, advance: Callable[[], None] = lambda: None) -> Reconstruction:
    """Refitted output weights for every layer that lost heads or MLP channels (``model`` is the
    unpruned teacher, left untouched). ``advance`` is called once per window per pass."""
    import torch

    _, layers = decoder_parts(model)
    device = model_device(model)
    targets, groups, acc_dtype = _plan(model, kept, budget_bytes)
    result = Reconstruction()
    for group in groups:
        result.passes += 1
        index = {key: torch.tensor(targets[key], dtype=torch.long, device=device) for key in group}
        linears = {key: layers[key[0]].get_submodule(key[1]) for key in group}
        cross = {key: torch.zeros(linears[key].out_features, len(targets[key]), dtype=acc_dtype, device=device) for key in group}
        gram = {key: torch.zeros(len(targets[key]), len(targets[key]), dtype=acc_dtype, device=device) for key in group}
        energy = {key: torch.zeros((), dtype=acc_dtype, device=device) for key in group}
        handles = []
        for key, linear in linears.items():
            def hook(module, args, output, key=key, last=(key == group[-1])):
                a = args[0].detach().reshape(-1, args[0].shape[-1]).to(acc_dtype)
                y = output.detach().reshape(-1, output.shape[-1]).to(acc_dtype)
                if module.bias is not None:
                    y = y - module.bias.detach().to(acc_dtype)
                a_kept = a.index_select(1, index[key])
                cross[key].add_(y.T @ a_kept)
                gram[key].add_(a_kept.T @ a_kept)
                energy[key].add_((y * y).sum())
                if last:
                    raise _Done

            handles.append(linear.register_forward_hook(hook))
        try:
            with torch.inference_mode():
                for ids in samples:
                    try:
                        model(input_ids=ids.to(device), use_cache=False)
                    except _Done:
                        pass
                    advance()
        finally:
            for handle in handles:
                handle.remove()
        for key in group:
            weight = linears[key].weight.detach().to("cpu", torch.float64)
            c, g, e = cross[key].to("cpu", torch.float64), gram[key].to("cpu", torch.float64), float(energy[key])
            sliced = weight.index_select(1, index[key].cpu())
            lam = ridge * float(g.diagonal().mean().clamp_min(1e-12))
            # (G + λI) W'ᵀ = Cᵀ: G is symmetric positive definite once λ > 0.
            refit = torch.linalg.solve(g + lam * torch.eye(g.shape[0], dtype=g.dtype), c.T).T
            result.weights[key] = refit.float()
            result.error_sliced[key] = _relative_error(sliced, c, g, e)
            result.error_refit[key] = _relative_error(refit, c, g, e)
            del cross[key], gram[key]
    return result


def _relative_error(w: Any, cross: Any, gram: Any, energy: float) -> float:
    """Σ‖y − w a_K‖² / Σ‖y‖², from the accumulated statistics (no second pass)."""
    if energy <= 0:
        return 0.0
    residual = energy - 2.0 * float((w * cross).sum()) + float(((w @ gram) * w).sum())
    return max(0.0, residual) / energy


def apply_reconstruction(student: Any, kept: KeptUnits, reconstruction: Reconstruction) -> None:
    """Write the refitted weights into the pruned model (rows cut to the kept hidden channels)."""
    import torch

    _, student_layers = decoder_parts(student)
    position = {old: new for new, old in enumerate(kept.layers)}
    rows = torch.tensor(kept.hidden, dtype=torch.long) if kept.hidden is not None else None
    with torch.no_grad():
        for (layer, name), weight in reconstruction.weights.items():
            linear = student_layers[position[layer]].get_submodule(name)
            value = weight.index_select(0, rows) if rows is not None else weight
            if tuple(value.shape) != tuple(linear.weight.shape):
                raise RuntimeError(f"refitted {name} of layer {layer} is {tuple(value.shape)}, the pruned model's is "
                                   f"{tuple(linear.weight.shape)}")
            linear.weight.copy_(value.to(linear.weight.dtype))
