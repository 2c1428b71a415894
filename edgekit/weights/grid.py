"""The integer grid shared by every weight quantizer (RTN, GPTQ, AWQ import).

A weight ``W`` of shape ``[out_features, in_features]`` is cut along ``in_features`` into
groups; input channel ``i`` belongs to group ``g_idx[i]``. Each (output row, group) has a
``scale`` and an integer ``zero`` point, and integer codes ``q`` in ``[0, 2**bits - 1]``:

    W_hat[o, i] = (q[o, i] - zero[o, g_idx[i]]) * scale[o, g_idx[i]]

Symmetric quantization fixes ``zero = 2**(bits-1)`` (so the code range is centred and a
signed-int export needs no zero point); asymmetric fits ``zero`` per group. Scales are
rounded to float16 when they are computed, because the GPTQ checkpoint format stores them
as float16: the weights GPTQ's error feedback sees are then exactly the ones a loader
rebuilds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def max_code(bits: int) -> int:
    return (1 << bits) - 1


@dataclass
class QuantizedWeight:
    """Integer codes + per-group scale/zero for one linear layer (unpacked, torch tensors)."""

    qweight: Any  # int32 [out, in], values in [0, 2**bits - 1]
    scales: Any  # float32 [out, n_groups] (values representable in float16)
    zeros: Any  # int32 [out, n_groups], values in [0, 2**bits - 1]
    g_idx: Any  # int32 [in], the group of each input channel
    bits: int
    group_size: int  # input channels per group (= in_features for per-channel)
    symmetric: bool

    @property
    def out_features(self) -> int:
        return int(self.qweight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.qweight.shape[1])

    @property
    def n_groups(self) -> int:
        return int(self.scales.shape[1])

    @property
    def contiguous_groups(self) -> bool:
        """True when g_idx == arange(in) // group_size: what block-wise kernels need
        (MatMulNBits, DequantizeLinear with block_size)."""
        import torch

        expected = torch.arange(self.in_features, dtype=torch.int32) // self.group_size
        return bool(torch.equal(self.g_idx.to(torch.int32).cpu(), expected))

    def dequantize(self, dtype: Any = None) -> Any:
        import torch

        g = self.g_idx.long()
        w = (self.qweight.float() - self.zeros.float()[:, g]) * self.scales.float()[:, g]
        return w.to(dtype or torch.float32)


def find_params(w: Any, bits: int, symmetric: bool, *, mse: bool = False, grid: int = 100, max_shrink: float = 0.8) -> tuple[Any, Any]:
    """Scale and zero point per row of ``w`` (shape [rows, cols]) for the min/max grid.

    With ``mse``, the range is shrunk (clipped) to the factor in [max_shrink, 1] that
    minimises the squared quantization error of the row (the search GPTQ's reference code
    offers as ``mse=True``): outliers cost less range for everyone else.
    Returns ``scale`` (float32, float16-representable) and ``zero`` (int32), shape [rows].
    """
    import torch

    w = w.float()
    maxq = max_code(bits)
    lo = torch.minimum(w.min(dim=1).values, torch.zeros(1, device=w.device))
    hi = torch.maximum(w.max(dim=1).values, torch.zeros(1, device=w.device))

    def params_for(lo_: Any, hi_: Any) -> tuple[Any, Any]:
        if symmetric:
            amax = torch.maximum(lo_.abs(), hi_)
            scale = 2 * amax / maxq
            zero = torch.full_like(scale, (maxq + 1) // 2)
        else:
            scale = (hi_ - lo_) / maxq
            zero = None
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        scale = scale.half().float()  # what the checkpoint stores
        scale = torch.where(scale > 0, scale, torch.full_like(scale, 2.0**-24))
        if zero is None:
            zero = torch.clamp(torch.round(-lo_ / scale), 0, maxq)
            # The GPTQ v1 checkpoint stores ``zero - 1`` in `bits` bits, so zero 0 has no
            # encoding (it wraps to maxq and every v1 reader dequantizes with maxq + 1). A
            # group that is (nearly) all >= 0 gets zero 1 and a scale that still reaches hi.
            low = zero < 1
            if maxq > 1 and bool(low.any()):
                shifted = (hi_ / (maxq - 1)).half().float()
                shifted = torch.where(shifted > 0, shifted, torch.ones_like(shifted))
                scale = torch.where(low, shifted, scale)
                zero = torch.where(low, torch.ones_like(zero), zero)
        return scale, zero

    scale, zero = params_for(lo, hi)
    if mse:
        best = torch.full_like(scale, float("inf"))
        for step in range(int((1 - max_shrink) * grid) + 1):
            factor = 1 - step / grid
            s, z = params_for(lo * factor, hi * factor)
            q = torch.clamp(torch.round(w / s[:, None]) + z[:, None], 0, maxq)
            err = ((q - z[:, None]) * s[:, None] - w).pow(2).sum(dim=1)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, s, scale)
            zero = torch.where(better, z, zero)
    return scale, zero.to(torch.int32)


def quantize_codes(w: Any, scale: Any, zero: Any, bits: int) -> Any:
    """Integer codes of ``w`` [rows, cols] on the per-row grid (scale, zero: [rows] or [rows, 1])."""
    import torch

    if scale.dim() == 1:
        scale, zero = scale[:, None], zero[:, None]
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, max_code(bits)).to(torch.int32)


def rtn_quantize(weight: Any, *, bits: int, group_size: int | None, symmetric: bool, mse: bool = False) -> QuantizedWeight:
    """Round-to-nearest on the same grid: the baseline every report shows."""
    import torch

    out_features, in_features = weight.shape
    group = group_size or in_features
    if in_features % group:
        raise ValueError(f"group_size {group} does not divide in_features {in_features}")
    n_groups = in_features // group
    w = weight.detach().float().reshape(out_features * n_groups, group)  # row-major: [o, g] blocks
    scale, zero = find_params(w, bits, symmetric, mse=mse)
    q = quantize_codes(w, scale, zero, bits).reshape(out_features, in_features)
    return QuantizedWeight(
        qweight=q,
        scales=scale.reshape(out_features, n_groups),
        zeros=zero.reshape(out_features, n_groups),
        g_idx=(torch.arange(in_features, dtype=torch.int32) // group),
        bits=bits,
        group_size=group,
        symmetric=symmetric,
    )
