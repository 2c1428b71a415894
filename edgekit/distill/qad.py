"""Quantization-aware distillation (``distill`` with ``mode: qad``): the fake-quantized linear
that trains a GPTQ checkpoint's weights on their own integer grid, and the swaps in and out of
a model loaded from such a checkpoint.

The grid is the GPTQ one (:mod:`edgekit.weights.grid`): input channel ``i`` of a layer belongs
to group ``g_idx[i]``; each (output row, group) has a float16-representable ``scale`` and an
integer ``zero``; the weight the model computes with is

    W_hat = scale * (clamp(round(W / scale) + zero, 0, 2**bits - 1) - zero)

``W`` is a float *latent* weight initialised from the checkpoint's dequantized weight, so the
codes it rounds to at step 0 are the checkpoint's codes and the model at step 0 is the GPTQ
model bit for bit. ``round`` has a straight-through gradient (identity); the clamp passes the
gradient only inside the code range, so a weight pushed past the grid's end stops moving. With
trainable scales the same expression gives the LSQ gradient to each scale (``round(x) - x``
inside the range, the clamped code outside). Zero points stay the checkpoint's integers.

Imported only by the training loop (it subclasses ``torch.nn.Module``, so torch is imported at
module level; ``import edgekit`` never reaches this file).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edgekit.weights.grid import QuantizedWeight, max_code

# The smallest positive float16 (subnormal): the floor a trained scale is held at, since the
# checkpoint stores scales as float16 and a scale of 0 would divide by zero.
SMALLEST_SCALE = 2.0**-24


class _RoundStraightThrough(torch.autograd.Function):
    """``round`` forward (exact integers, so the fake-quantized weight equals the dequantized
    codes bit for bit), identity backward."""

    @staticmethod
    def forward(ctx: Any, x: Any) -> Any:
        return torch.round(x)

    @staticmethod
    def backward(ctx: Any, grad: Any) -> Any:
        return grad


def fake_codes(weight: Any, scales: Any, zeros: Any, g_idx: Any, bits: int) -> Any:
    """Float codes ``clamp(round(W / scale) + zero, 0, 2**bits - 1)`` per input channel's group
    (weight [out, in], scales/zeros [out, groups], g_idx [in]), with the straight-through round."""
    group = g_idx.long()
    scale = scales[:, group]
    return torch.clamp(_RoundStraightThrough.apply(weight / scale) + zeros.float()[:, group], 0, max_code(bits))


class _FakeQuantizeFrozenGrid(torch.autograd.Function):
    """:func:`fake_quantize` on a fixed grid (frozen scales) in one pass: the same forward, and the
    gradient it has, ``grad * (code inside the range)``, from one saved boolean per weight
    instead of autograd's float intermediates (the divide, round, clamp and multiply each keep a
    full-size tensor; per step that is several passes over every quantized weight)."""

    @staticmethod
    def forward(ctx: Any, weight: Any, scale: Any, zero: Any, top: float) -> Any:
        codes = torch.round(weight / scale).add_(zero)
        inside = (codes >= 0) & (codes <= top)
        ctx.save_for_backward(inside)
        return codes.clamp_(0, top).sub_(zero).mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: Any) -> Any:
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None


def fake_quantize_frozen(weight: Any, scales: Any, zeros: Any, g_idx: Any, bits: int) -> Any:
    """:func:`fake_quantize` with no gradient to the scales: bit for bit the same weight, the same
    straight-through gradient to ``weight`` up to the rounding of ``grad * s / s``."""
    group = g_idx.long()
    return _FakeQuantizeFrozenGrid.apply(weight, scales[:, group], zeros.float()[:, group], float(max_code(bits)))


def fake_quantize(weight: Any, scales: Any, zeros: Any, g_idx: Any, bits: int) -> Any:
    """``W_hat`` [out, in]: the codes of ``weight`` on the grid, dequantized in the order
    :meth:`QuantizedWeight.dequantize` uses (so equal codes give equal bits)."""
    group = g_idx.long()
    codes = fake_codes(weight, scales, zeros, g_idx, bits)
    return (codes - zeros.float()[:, group]) * scales[:, group]


class FakeQuantLinear(nn.Module):
    """A linear layer trained on its GPTQ grid: latent float ``weight`` (a parameter), per-group
    ``scales`` (a parameter when trainable, else a buffer), integer ``zeros`` and ``g_idx``
    (buffers), the float ``bias`` (a parameter, as standard distillation trains biases)."""

    def __init__(self, quantized: QuantizedWeight, bias: Any = None, *, trainable_scales: bool):
        super().__init__()
        self.in_features, self.out_features = quantized.in_features, quantized.out_features
        self.bits, self.group_size, self.symmetric = quantized.bits, quantized.group_size, quantized.symmetric
        self.weight = nn.Parameter(quantized.dequantize(torch.float32).clone())
        scales = quantized.scales.detach().float().clone()
        if trainable_scales:
            self.scales = nn.Parameter(scales)
        else:
            self.register_buffer("scales", scales)
        self.register_buffer("zeros", quantized.zeros.detach().to(torch.int32).clone())
        self.register_buffer("g_idx", quantized.g_idx.detach().to(torch.int32).clone())
        self.bias = nn.Parameter(bias.detach().float().clone()) if bias is not None else None

    @property
    def trainable_scales(self) -> bool:
        return isinstance(self.scales, nn.Parameter)

    def fake_weight(self) -> Any:
        if not self.trainable_scales:  # the common case: one fused pass (frozen scales need no LSQ gradient)
            return fake_quantize_frozen(self.weight, self.scales.clamp(min=SMALLEST_SCALE), self.zeros, self.g_idx, self.bits)
        return fake_quantize(self.weight, self.scales.clamp(min=SMALLEST_SCALE), self.zeros, self.g_idx, self.bits)

    def forward(self, x: Any) -> Any:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.fake_weight().to(x.dtype), bias)

    def snap_scales(self) -> None:
        """Round the scales to the float16 values the checkpoint will store (held above 0), so
        the model that is scored last is the one that is written."""
        with torch.no_grad():
            self.scales.copy_(self.scales.clamp(min=SMALLEST_SCALE).half().float().clamp(min=SMALLEST_SCALE))

    def quantized_weight(self) -> QuantizedWeight:
        """The integer codes of the latent weight on the current grid (scales snapped first)."""
        with torch.no_grad():
            codes = fake_codes(self.weight.float(), self.scales.float(), self.zeros, self.g_idx, self.bits)
            return QuantizedWeight(qweight=codes.to(torch.int32).cpu(), scales=self.scales.detach().float().cpu().clone(),
                                   zeros=self.zeros.cpu().clone(), g_idx=self.g_idx.cpu().clone(), bits=self.bits,
                                   group_size=self.group_size, symmetric=self.symmetric)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, sym={self.symmetric}, scales={'trainable' if self.trainable_scales else 'frozen'}")


def _set_module(model: Any, name: str, module: Any) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def to_fake_quant(model: Any, *, trainable_scales: bool) -> dict[str, QuantizedWeight]:
    """Replace every ``QuantLinear`` of a model loaded from a GPTQ checkpoint by a
    :class:`FakeQuantLinear` (in place); returns the checkpoint's grid and codes per layer name
    (what the trained codes are compared against). The model leaves eval mode untouched."""
    from edgekit.weights.loader import QuantLinear

    found = [(name, module) for name, module in model.named_modules() if isinstance(module, QuantLinear)]
    original: dict[str, QuantizedWeight] = {}
    for name, module in found:
        quantized = module.quantized_weight()
        original[name] = quantized
        bias = None if module.bias is None else module.bias.detach().float()
        _set_module(model, name, FakeQuantLinear(quantized, bias, trainable_scales=trainable_scales))
    return original


def fake_quant_layers(model: Any) -> list[tuple[str, FakeQuantLinear]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, FakeQuantLinear)]


def to_linears(model: Any) -> dict[str, QuantizedWeight]:
    """Snap every FakeQuantLinear's scales to float16, take its codes, and replace it by a plain
    ``nn.Linear`` holding the dequantized weight (what ``save_quantized_checkpoint`` takes, with
    the codes). Returns the codes per layer name."""
    quantized: dict[str, QuantizedWeight] = {}
    for name, layer in fake_quant_layers(model):
        layer.snap_scales()
        qw = layer.quantized_weight()
        quantized[name] = qw
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                           dtype=torch.float32, device=layer.weight.device)
        with torch.no_grad():
            linear.weight.copy_(qw.dequantize(torch.float32))
            if layer.bias is not None:
                linear.bias.copy_(layer.bias.float())
        _set_module(model, name, linear)
    return quantized


def snap_all_scales(model: Any) -> None:
    for _, layer in fake_quant_layers(model):
        layer.snap_scales()


def grid_changes(before: dict[str, QuantizedWeight], after: dict[str, QuantizedWeight]) -> dict[str, Any]:
    """How far training moved the checkpoint: integer codes (and scales) that differ from the
    input checkpoint's, counted over every quantized layer."""
    codes = sum(int((after[n].qweight != before[n].qweight).sum()) for n in before)
    total = sum(int(before[n].qweight.numel()) for n in before)
    scales = sum(int((after[n].scales != before[n].scales.float()).sum()) for n in before)
    scales_total = sum(int(before[n].scales.numel()) for n in before)
    return {"layers": len(before), "codes_total": total, "codes_changed": codes,
            "codes_changed_fraction": codes / total if total else 0.0,
            "scales_total": scales_total, "scales_changed": scales}


__all__ = ["FakeQuantLinear", "fake_codes", "fake_quantize", "fake_quant_layers", "fake_quantize_frozen", "grid_changes", "snap_all_scales",
           "to_fake_quant", "to_linears"]
