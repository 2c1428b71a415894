"""GPTQ: second-order weight quantization of one linear layer, as plain tensor functions.

Reference: Elias Frantar, Saleh Ashkboos, Torsten Hoefler, Dan Alistarh, "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers" (ICLR 2023,
arXiv:2210.17323). Written here from the paper's Algorithm 1; the notation follows it.

The layer ``y = x W^T`` is quantized to minimise ``||X W^T - X W_hat^T||^2`` over the
calibration inputs ``X``. The Hessian of that objective w.r.t. one row of ``W`` is
``H = 2 X^T X`` (shared by all rows). Columns are quantized one at a time; the rounding error
of column ``q`` is spread over the not-yet-quantized columns through the inverse Hessian (the
Optimal Brain Surgeon update), so later columns compensate for earlier rounding:

    err     = (w_q - quant(w_q)) / [H^-1]_qq
    W[:, F] -= err * [H^-1]_{q, F}                          (F: the columns after q)

The paper's three engineering steps are all here:

* **Cholesky reformulation.** The rows of the upper Cholesky factor ``U`` of ``H^-1``
  (``H^-1 = U^T U``) are exactly the rows of the successively-eliminated inverse Hessians, so
  one factorisation replaces ``in_features`` rank-1 downdates and is numerically stable.
* **Lazy batch updates.** Columns are processed in blocks of ``block_size``; inside a block
  the updates are rank-1, and the rest of the matrix receives the block's accumulated errors
  with one matmul at the end of the block (the work is memory-bound otherwise). On CPU a
  second level of the same trick (sub-blocks of 16 columns inside a block) keeps the per-column
  rank-1 updates tiny; lazy updates only reorder float sums, they do not change the result.
* **Dampening.** ``damp * mean(diag(H))`` is added to the diagonal before inverting.

Plus the usual practical extras: inputs that never fire (``H[i, i] == 0``) are "dead" (their
weight column is set to 0 and ``H[i, i]`` to 1), and ``act_order`` processes columns by
descending ``diag(H)`` (the most activated inputs first, while many columns are still free to
absorb their error).

**Static groups (an edgekit design decision).** Group ``g`` always covers the input channels
``[g * group_size, (g + 1) * group_size)`` of the *original* column order, so
``g_idx == arange(in_features) // group_size`` even with ``act_order``: every checkpoint stays
usable by block-wise kernels (ONNX Runtime MatMulNBits, DequantizeLinear with block_size,
ExLlama without reordering). The grid of group ``g`` is computed at the moment its first
column is reached in processing order, from the *current* (error-updated) weights of all its
columns; a lazy block is cut there, so no update is pending at that moment. Without
``act_order`` this is the paper's usual grouping. (The reference implementation's
``static_groups`` instead fits all grids upfront on the unquantized weights.)
"""

from __future__ import annotations

import time
from typing import Any

from edgekit.weights.grid import QuantizedWeight, find_params, max_code

_SUB = 16  # columns per inner lazy-update sub-block (see _gptq)


def accumulate_hessian(H: Any, x: Any, n_seen: int) -> tuple[Any, int]:
    """Fold a batch of layer inputs into the running Hessian ``H = mean(2 x x^T)``.

    ``x`` has shape ``[..., in_features]``; every leading index (batch, token) is one sample,
    so the result depends on the set of samples, not on how they were batched. ``H`` is
    ``None`` on the first call (a float32 zero matrix is created on ``x``'s device), and is
    updated in place afterwards; pass a float64 ``H`` to accumulate in float64. Returns the
    updated ``H`` and the new sample count.
    """
    import torch

    x = x.detach().reshape(-1, x.shape[-1])
    if H is None:
        H = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32, device=x.device)
    n = x.shape[0]
    if n == 0:
        return H, n_seen
    x = x.to(device=H.device, dtype=H.dtype)
    total = n_seen + n
    # H <- H * n_seen/total + (2/total) x^T x: the mean over all samples seen so far.
    H.addmm_(x.t(), x, beta=n_seen / total, alpha=2.0 / total)
    return H, total


def accumulate_cross(C: Any, x_quantized: Any, x_float: Any, n_seen: int) -> tuple[Any, int]:
    """Fold a batch into the running cross moment ``C = mean(2 x_quantized x_float^T)``.

    ``x_quantized`` is what the layer reads in the partly quantized model and ``x_float`` what
    the same layer reads, for the same tokens, in the float model (same shapes). Used with the
    Hessian of ``x_quantized`` by :func:`float_target`. ``C`` is None on the first call.
    """
    import torch

    xq = x_quantized.detach().reshape(-1, x_quantized.shape[-1])
    xf = x_float.detach().reshape(-1, x_float.shape[-1])
    if xq.shape != xf.shape:
        raise ValueError(f"quantized and float inputs differ in shape: {tuple(xq.shape)} vs {tuple(xf.shape)}")
    if C is None:
        C = torch.zeros(xq.shape[-1], xq.shape[-1], dtype=torch.float32, device=xq.device)
    n = xq.shape[0]
    if n == 0:
        return C, n_seen
    total = n_seen + n
    C.addmm_(xq.to(device=C.device, dtype=C.dtype).t(), xf.to(device=C.device, dtype=C.dtype),
             beta=n_seen / total, alpha=2.0 / total)
    return C, total


def float_target(weight: Any, H: Any, cross: Any, *, damp: float = 0.01, alpha: float = 1.0) -> Any:
    """The weight GPTQ should approximate when its inputs are the quantized model's.

    GPTQ minimises ``||X~ (W_hat - W)^T||^2`` with ``X~`` the inputs of the partly quantized
    model, so every layer matches *its own* input's product and the errors of the layers before
    it pile up. The float model's output ``X W^T`` is the real target:
    ``||X~ W_hat^T - X W^T||^2 = ||X~ (W_hat - W')^T||^2 + const`` with
    ``H W'^T = C W^T`` (``H = 2 X~^T X~``, ``C = 2 X~^T X``), so GPTQ on ``W'`` with the same
    ``H`` minimises the distance to the float output (the "asymmetric calibration" of GPTAQ, also
    called GPTQ v2, Li et al. 2025; written here from that identity). Solved in the damped,
    unbiased form ``W'^T = W^T + alpha (H + lambda I)^-1 (C - H) W^T`` (``lambda = damp *
    mean(diag H)``): identical streams (``C == H``) give ``W' == W`` exactly, and ``alpha``
    (0..1) blends between plain GPTQ (0) and the full correction (1).
    """
    import torch

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if tuple(cross.shape) != tuple(H.shape):
        raise ValueError(f"cross moment shape {tuple(cross.shape)} does not match the Hessian {tuple(H.shape)}")
    plain = weight.detach().to(torch.float32).clone()  # plain GPTQ's target
    if alpha == 0.0:
        return plain
    # the same damped factor GPTQ itself uses: U^T U = (H + lambda I)^-1
    U, _ = _inverse_hessian_factor(H.to(torch.float64), damp)
    W = weight.to(torch.float64)
    correction = (cross.to(torch.float64) - H.to(torch.float64)) @ W.t()  # [in, out]
    delta = U.t() @ (U @ correction.to(torch.float32))
    out = plain + alpha * delta.t()
    return out if _finite(out) else plain


def gptq_quantize(
    weight: Any,
    H: Any,
    *,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    act_order: bool,
    damp: float = 0.01,
    block_size: int = 128,
    mse: bool = False,
) -> tuple[QuantizedWeight, dict]:
    """Quantize ``weight`` [out, in] with GPTQ given the input Hessian ``H`` [in, in].

    ``group_size`` None means one grid per output channel. Returns the
    :class:`QuantizedWeight` (static groups: ``g_idx == arange(in) // group_size``) and stats
    ``{"loss": sum_q (w_q - w_hat_q)^2 / [H^-1]_qq^2 / 2 (the paper's objective),
    "seconds": ..., "damp": the relative dampening actually used}``. ``qw.dequantize()`` is
    bit-identical to the weights the error feedback used.
    """
    qw, stats, _ = _gptq(weight, H, bits=bits, group_size=group_size, symmetric=symmetric, act_order=act_order,
                         damp=damp, block_size=block_size, mse=mse)
    return qw, stats


def _check_args(weight: Any, H: Any, bits: int, group_size: int | None, damp: float, block_size: int) -> int:
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    in_features = weight.shape[1]
    if tuple(H.shape) != (in_features, in_features):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match in_features {in_features}")
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    group = group_size or in_features
    if group <= 0 or in_features % group:
        raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
    if damp < 0 or block_size < 1:
        raise ValueError(f"need damp >= 0 and block_size >= 1, got damp={damp}, block_size={block_size}")
    return group


def _finite(t: Any) -> bool:
    """No NaN/inf in ``t`` (a float64 sum: one pass, and any NaN/inf propagates into it)."""
    import torch

    return bool(torch.isfinite(t.sum(dtype=torch.float64)))


def _inverse_hessian_factor(H: Any, damp: float) -> tuple[Any, float]:
    """Upper Cholesky factor ``U`` (float32) of ``(H + damp * mean(diag H) * I)^-1``.

    With ``J`` the reversal permutation and ``J H J = L L^T`` (lower Cholesky), one gets
    ``H^-1 = (J L^-T J)(J L^-1 J)``, a lower-triangular matrix times its transpose, so
    ``U^T U = H^-1`` for ``U = J L^-1 J``: one Cholesky and one triangular inverse instead of
    the usual Cholesky, ``cholesky_inverse`` and second Cholesky.
    float32 is tried first (relative error ~1e-6, far below rounding noise, and 2x faster than
    float64 on CPU); if it fails, float64; if the dampened H is still not positive definite
    (tiny calibration sets, overflow upstream), the dampening is raised tenfold, up to 4 times.
    """
    import torch

    mean_diag = float(torch.diagonal(H).mean())
    relative = damp
    for _ in range(5):
        for dtype in (torch.float32, torch.float64):
            Hd = H.to(dtype)
            eye = torch.eye(H.shape[0], dtype=dtype, device=H.device)
            L, info = torch.linalg.cholesky_ex((Hd + (relative * mean_diag) * eye).flip(0, 1))
            if int(info) == 0:
                U = torch.linalg.solve_triangular(L, eye, upper=False, left=False).flip(0, 1)  # L^-1
                if _finite(U):
                    return U.to(torch.float32), relative
        relative = max(relative * 10, 1e-4)
    raise ValueError(f"the Hessian is not positive definite even with dampening {relative / 10:g}; "
                     "use more (or more varied) calibration samples")


def _gptq(weight: Any, H: Any, *, bits: int, group_size: int | None, symmetric: bool, act_order: bool,
          damp: float, block_size: int, mse: bool) -> tuple[QuantizedWeight, dict, Any]:
    """GPTQ proper; also returns the committed float32 weights [out, in] (for tests)."""
    import torch

    start = time.perf_counter()
    group = _check_args(weight, H, bits, group_size, damp, block_size)
    rows, cols = weight.shape
    n_groups = cols // group
    maxq = float(max_code(bits))
    with torch.no_grad():
        device = weight.device
        # The work happens on the transpose: column q of W is the contiguous row q of Wt.
        Wt = weight.detach().to(torch.float32).t().clone(memory_format=torch.contiguous_format)  # [in, out], a copy
        H = H.detach().to(device=device, dtype=torch.float64).clone()
        if not (_finite(H) and _finite(Wt)):
            raise ValueError("the weight or the Hessian contains NaN/inf")

        dead = torch.diagonal(H) == 0
        H[dead, dead] = 1.0
        Wt[dead] = 0.0

        if act_order:
            perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        else:
            perm = torch.arange(cols, device=device)
        invperm = torch.argsort(perm)
        Wt = Wt[perm]
        H = H[perm][:, perm]
        U, damp_used = _inverse_hessian_factor(H, damp)
        del H

        # Group bookkeeping in processing order: the group of each position, and the position
        # at which each group is first reached (where its grid is computed).
        group_positions = invperm.view(n_groups, group)  # positions of the columns of each group
        group_of = (perm // group).tolist()
        first_reached = dict(zip(group_positions.min(dim=1).values.tolist(), range(n_groups)))
        # Lazy-batch blocks; a block also starts wherever a group is first reached: at a block
        # start every pending update has been applied, so the group's grid is computed from
        # its columns' current weights (with act_order they are spread over later blocks).
        starts = sorted(set(range(0, cols, block_size)) | set(first_reached))

        scales = torch.zeros(n_groups, rows, dtype=torch.float32, device=device)
        zeros = torch.zeros(n_groups, rows, dtype=torch.float32, device=device)
        codes_t = torch.empty(cols, rows, dtype=torch.float32, device=device)
        committed_t = torch.empty(cols, rows, dtype=torch.float32, device=device)
        Err = torch.empty(cols, rows, dtype=torch.float32, device=device)  # scaled errors, per position
        diag = torch.diagonal(U).tolist()

        for i1, i2 in zip(starts, starts[1:] + [cols]):
            g = first_reached.get(i1)
            if g is not None:
                s, z = find_params(Wt[group_positions[g]].t(), bits, symmetric, mse=mse)
                scales[g], zeros[g] = s, z.to(torch.float32)
            # Inside the block a second, smaller level of lazy updates: rank-1 updates stay
            # within _SUB columns (small, single-threaded ops), the rest of the block is
            # updated by one matmul per sub-block.
            for j1 in range(i1, i2, _SUB):
                j2 = min(j1 + _SUB, i2)
                for c in range(j1, j2):
                    g = group_of[c]
                    s, z = scales[g], zeros[g]
                    w, q, wq, err = Wt[c], codes_t[c], committed_t[c], Err[c]
                    # Same float32 ops as grid.quantize_codes and QuantizedWeight.dequantize,
                    # so what is committed here is bit-for-bit what a loader rebuilds.
                    torch.div(w, s, out=q).round_().add_(z).clamp_(0, maxq)
                    torch.sub(q, z, out=wq).mul_(s)
                    torch.sub(w, wq, out=err).div_(diag[c])
                    if c + 1 < j2:
                        Wt[c + 1:j2].addr_(U[c, c + 1:j2], err, alpha=-1.0)
                if j2 < i2:
                    Wt[j2:i2].addmm_(U[j1:j2, j2:i2].t(), Err[j1:j2], alpha=-1.0)
            # Lazy batch: the rest of the matrix gets the whole block's error in one matmul.
            if i2 < cols:
                Wt[i2:].addmm_(U[i1:i2, i2:].t(), Err[i1:i2], alpha=-1.0)
        loss = float(Err.double().pow(2).sum() / 2)

        qw = QuantizedWeight(
            qweight=codes_t[invperm].t().to(torch.int32).contiguous(),
            scales=scales.t().contiguous(),
            zeros=zeros.t().to(torch.int32).contiguous(),
            g_idx=torch.arange(cols, dtype=torch.int32, device=device) // group,
            bits=bits,
            group_size=group,
            symmetric=symmetric,
        )
        committed = committed_t[invperm].t().contiguous()
    stats = {"loss": loss, "seconds": time.perf_counter() - start, "damp": damp_used}
    return qw, stats, committed


def split_rows(qw: QuantizedWeight, sizes: list[int]) -> list[QuantizedWeight]:
    """Split a QuantizedWeight along its output rows.

    GPTQ treats every output row independently given ``H``, so layers that read the same
    input (q/k/v projections, gate/up) can be quantized as one concatenated weight, sharing
    one Hessian factorisation and one pass of the column loop, then split back here.
    """
    if sum(sizes) != qw.out_features:
        raise ValueError(f"row sizes {sizes} do not add up to out_features {qw.out_features}")
    parts, start = [], 0
    for size in sizes:
        rows = slice(start, start + size)
        parts.append(QuantizedWeight(
            qweight=qw.qweight[rows].contiguous(), scales=qw.scales[rows].contiguous(),
            zeros=qw.zeros[rows].contiguous(), g_idx=qw.g_idx.clone(), bits=qw.bits,
            group_size=qw.group_size, symmetric=qw.symmetric))
        start += size
    return parts
