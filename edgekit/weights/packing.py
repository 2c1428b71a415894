"""The GPTQ checkpoint tensor layout ("gptq" v1 ``checkpoint_format``).

This is the layout AutoGPTQ introduced and that GPTQModel, optimum and transformers read. Per
quantized linear layer ``<name>`` (``in`` = in_features, ``out`` = out_features, ``b`` = bits):

* ``<name>.qweight`` int32 ``[in * b / 32, out]``: the codes, packed along the *input* dim;
* ``<name>.qzeros``  int32 ``[n_groups, out * b / 32]``: ``zero - 1``, packed along the
  *output* dim (the v1 convention: readers add the 1 back);
* ``<name>.scales``  float16 ``[n_groups, out]``;
* ``<name>.g_idx``   int32 ``[in]``: the group of each input channel.

Packing is a little-endian bit stream: code ``k`` of a packed column occupies bits
``[k*b, (k+1)*b)`` of the concatenated 32-bit words (word ``j`` = bits ``32j..32j+31``, low
bits first). For b = 2, 4, 8 that is simply ``32 / b`` codes per word; for b = 3 it is
AutoGPTQ's 3-words-per-32-codes layout, with codes straddling word boundaries.

Because v1 stores ``zero - 1`` in ``b`` bits, a zero point of 0 has no encoding (it would
wrap to ``2**b - 1`` and every v1 reader would dequantize with ``2**b``): :func:`pack_gptq`
refuses it, and :func:`edgekit.weights.grid.find_params` never produces it.
"""

from __future__ import annotations

from typing import Any

from edgekit.weights.grid import QuantizedWeight, max_code

SUPPORTED_BITS = (2, 3, 4, 8)
_WORD = 32


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"the GPTQ checkpoint format supports bits {SUPPORTED_BITS}, got {bits}")


def pack_rows(codes: Any, bits: int) -> Any:
    """Pack integer codes [n, m] (values in [0, 2**bits)) along dim 0 into int32 [n*bits/32, m]."""
    import torch

    _check_bits(bits)
    n, m = codes.shape
    if (n * bits) % _WORD:
        raise ValueError(f"{n} rows of {bits}-bit codes do not fill whole 32-bit words")
    c = codes.to(torch.int64)
    pad = (-n) % _WORD  # pad to whole chunks of 32 codes (= `bits` words); dropped below
    if pad:
        c = torch.cat([c, c.new_zeros(pad, m)])
    c = c.view(-1, _WORD, m)
    words = torch.zeros(c.shape[0], bits, m, dtype=torch.int64, device=c.device)
    for k in range(_WORD):  # code k of each chunk sits at bit k*bits of the chunk's stream
        word, offset = divmod(k * bits, _WORD)
        words[:, word] |= (c[:, k] << offset) & 0xFFFFFFFF
        if offset + bits > _WORD:  # straddles into the next word (3-bit only)
            words[:, word + 1] |= c[:, k] >> (_WORD - offset)
    words = words.view(-1, m)[: n * bits // _WORD]
    # uint32 bit pattern -> int32 with the same bits
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_rows(words: Any, bits: int) -> Any:
    """Inverse of :func:`pack_rows`: int32 [n*bits/32, m] -> int32 codes [n, m]."""
    import torch

    _check_bits(bits)
    n_words, m = words.shape
    n = n_words * _WORD // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    pad = (-n_words) % bits
    if pad:
        w = torch.cat([w, w.new_zeros(pad, m)])
    w = w.view(-1, bits, m)
    codes = torch.empty(w.shape[0], _WORD, m, dtype=torch.int64, device=w.device)
    mask = max_code(bits)
    for k in range(_WORD):
        word, offset = divmod(k * bits, _WORD)
        value = w[:, word] >> offset
        if offset + bits > _WORD:
            value = value | (w[:, word + 1] << (_WORD - offset))
        codes[:, k] = value & mask
    return codes.view(-1, m)[:n].to(torch.int32)


def pack_gptq(qw: QuantizedWeight) -> dict[str, Any]:
    """The four checkpoint tensors of one layer: qweight, qzeros, scales, g_idx."""
    import torch

    bits = qw.bits
    _check_bits(bits)
    codes = qw.qweight.to(torch.int32)
    if int(codes.min()) < 0 or int(codes.max()) > max_code(bits):
        raise ValueError(f"codes outside [0, {max_code(bits)}] for {bits}-bit packing")
    zeros = qw.zeros.to(torch.int32)
    if int(zeros.min()) < 1 or int(zeros.max()) > max_code(bits):
        raise ValueError(
            f"zero points must lie in [1, {max_code(bits)}] for the GPTQ v1 format (it stores zero - 1), "
            f"got [{int(zeros.min())}, {int(zeros.max())}]"
        )
    scales = qw.scales.to(torch.float32)
    scales16 = scales.to(torch.float16)
    if not torch.equal(scales16.to(torch.float32), scales):
        raise ValueError("scales are not float16-representable; round them when computing the grid")
    return {
        "qweight": pack_rows(codes.t(), bits),  # along in_features
        "qzeros": pack_rows((zeros - 1), bits).t().contiguous(),  # [out, g] packed along out -> [g, out*b/32]
        "scales": scales16.t().contiguous(),
        "g_idx": qw.g_idx.to(torch.int32).contiguous(),
    }


def unpack_gptq(tensors: dict[str, Any], *, bits: int, group_size: int | None, symmetric: bool) -> QuantizedWeight:
    """Rebuild the QuantizedWeight from the four checkpoint tensors (shapes inferred).

    ``group_size`` -1 or None means per output channel. A missing ``g_idx`` (some old
    checkpoints) means contiguous groups.
    """
    import torch

    _check_bits(bits)
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    in_features = qweight.shape[0] * _WORD // bits
    out_features = qweight.shape[1]
    group = in_features if group_size in (None, -1) else int(group_size)
    n_groups = -(-in_features // group)
    if tuple(scales.shape) != (n_groups, out_features):
        raise ValueError(f"scales has shape {tuple(scales.shape)}, expected {(n_groups, out_features)}")
    if tuple(qzeros.shape) != (n_groups, out_features * bits // _WORD):
        raise ValueError(f"qzeros has shape {tuple(qzeros.shape)}, expected {(n_groups, out_features * bits // _WORD)}")
    g_idx = tensors.get("g_idx")
    if g_idx is None:
        g_idx = torch.arange(in_features, dtype=torch.int32) // group
    g_idx = g_idx.to(torch.int32)
    if tuple(g_idx.shape) != (in_features,) or int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups:
        raise ValueError(f"g_idx must be {in_features} group indices in [0, {n_groups})")
    # v1: stored = zero - 1 (no masking on the way back, as v1 readers do)
    zeros = unpack_rows(qzeros.t(), bits)[:out_features] + 1  # [out, n_groups]
    return QuantizedWeight(
        qweight=unpack_rows(qweight, bits).t().contiguous(),
        scales=scales.to(torch.float32).t().contiguous(),
        zeros=zeros.contiguous(),
        g_idx=g_idx,
        bits=bits,
        group_size=group,
        symmetric=symmetric,
    )


def gptq_quantization_config(
    *,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    act_order: bool,
    damp: float,
    true_sequential: bool = True,
    method: str = "gptq",
    float_target: float = 0.0,
) -> dict[str, Any]:
    """The ``quantization_config`` block of config.json for a checkpoint in this layout.

    The block describes the file, not the algorithm: edgekit's groups are contiguous (``g_idx ==
    arange(in) // group_size``) even when GPTQ processed columns in act-order, so ``desc_act`` is
    false and ``static_groups`` true. Readers take ``desc_act: true`` to mean a permuted ``g_idx``
    and pick slower paths for it (ONNX Runtime's MatMulNBits with a ``g_idx`` input ignores the
    zero points, so an asymmetric checkpoint read that way decodes to garbage).
    :func:`edgekit.weights.loader.save_quantized_checkpoint` sets ``desc_act`` true only if a
    layer's ``g_idx`` really is not contiguous. Whether GPTQ used act-order is recorded apart,
    in ``edgekit_act_order``; ``edgekit_method`` records what produced the codes (gptq, rtn,
    awq), since all of them use this one format; ``edgekit_float_target`` how far GPTQ aimed at
    the float model's output (0: plain GPTQ).
    """
    _check_bits(bits)
    return {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": -1 if group_size in (None, -1) else int(group_size),
        "desc_act": False,
        "edgekit_act_order": bool(act_order),
        "sym": bool(symmetric),
        "static_groups": True,
        "damp_percent": float(damp),
        "true_sequential": bool(true_sequential),
        "checkpoint_format": "gptq",
        "quantized_by": "edgekit",
        "edgekit_method": method,
        "edgekit_float_target": float(float_target),
    }
