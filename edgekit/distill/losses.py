"""The distillation losses: pure functions of tensors, computed in float32.

Shapes: logits ``[batch, tokens, vocab]``, input ids ``[batch, tokens]``, hidden states
``[batch, tokens, channels]``. Every loss is a mean over tokens (and, for the MSE, channels
and mapped layers), so its scale does not depend on the batch or sequence length.
"""

from __future__ import annotations

from typing import Any, Sequence


def kl_divergence(student_logits: Any, teacher_logits: Any, temperature: float = 1.0) -> Any:
    """Forward KL(teacher || student) of the softmaxes at ``temperature``, times T².

    ``sum_v p_t(v) * (log p_t(v) - log p_s(v))`` per token, from log-softmaxes in float32,
    averaged over all tokens. The T² factor keeps the gradient's scale independent of T
    (Hinton et al.): the soft targets' gradients shrink as 1/T². Zero iff the two
    distributions agree; never negative (up to rounding).
    """
    import torch

    t = float(temperature)
    student = torch.log_softmax(student_logits.float() / t, dim=-1)
    teacher = torch.log_softmax(teacher_logits.float() / t, dim=-1)
    per_token = (teacher.exp() * (teacher - student)).sum(dim=-1)
    return per_token.mean() * (t * t)


def reverse_kl_divergence(student_logits: Any, teacher_logits: Any, temperature: float = 1.0) -> Any:
    """Reverse KL(student || teacher) at ``temperature``, times T²: ``sum_v p_s(v) * (log p_s(v)
    - log p_t(v))`` per token, averaged. Mode-seeking: the student is punished for mass where
    the teacher has little, not for missing some of the teacher's modes (MiniLLM)."""
    import torch

    t = float(temperature)
    student = torch.log_softmax(student_logits.float() / t, dim=-1)
    teacher = torch.log_softmax(teacher_logits.float() / t, dim=-1)
    per_token = (student.exp() * (student - teacher)).sum(dim=-1)
    return per_token.mean() * (t * t)


def jensen_shannon_divergence(student_logits: Any, teacher_logits: Any, temperature: float = 1.0, beta: float = 0.5) -> Any:
    """Generalized JSD at ``temperature``, times T² (GKD): with ``m = beta * p_t + (1 - beta) * p_s``,
    ``beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)`` per token, averaged. Bounded (by ln 2 at
    beta 0.5) and symmetric at beta 0.5; zero iff the distributions agree."""
    import math

    import torch

    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1), not {beta}")
    t = float(temperature)
    student = torch.log_softmax(student_logits.float() / t, dim=-1)
    teacher = torch.log_softmax(teacher_logits.float() / t, dim=-1)
    # log m computed from the log-probabilities (logsumexp), stable where either is tiny
    mixture = torch.logsumexp(torch.stack([teacher + math.log(beta), student + math.log(1.0 - beta)]), dim=0)
    to_teacher = (teacher.exp() * (teacher - mixture)).sum(dim=-1)
    to_student = (student.exp() * (student - mixture)).sum(dim=-1)
    return (beta * to_teacher + (1.0 - beta) * to_student).mean() * (t * t)


# Rows of [tokens, vocab] per chunk in the fused losses: 64 x 49152 float32 is 12.6 MB, small
# enough for malloc's heap and the caches, large enough to keep the vector units busy.
CHUNK_ROWS = 64


def _fused_kl_function() -> Any:
    import torch

    class FusedKL(torch.autograd.Function):
        """Forward or reverse KL at temperature ``t`` (times t²) with its gradient to the student's
        logits computed in the same pass, chunk by chunk over the tokens: the same values as
        :func:`kl_divergence` / :func:`reverse_kl_divergence` up to float32 summation order, with
        one [tokens, vocab] tensor kept (the gradient, in the logits' dtype) instead of the ten or
        so float32 ones autograd keeps or allocates for the reference formula (on a 49k vocabulary
        that is most of a CPU step's memory traffic)."""

        @staticmethod
        def forward(ctx: Any, student_logits: Any, teacher_logits: Any, t: float, reverse: bool) -> Any:
            vocab = student_logits.shape[-1]
            student_rows = student_logits.detach().reshape(-1, vocab)
            teacher_rows = teacher_logits.detach().reshape(-1, vocab)
            rows = student_rows.shape[0]
            grad = torch.empty_like(student_rows)
            total = torch.zeros((), dtype=torch.float64, device=student_logits.device)
            with torch.autocast(student_logits.device.type, enabled=False):
                for start in range(0, rows, CHUNK_ROWS):
                    s = torch.log_softmax(student_rows[start:start + CHUNK_ROWS].float() / t, dim=-1)
                    q = torch.log_softmax(teacher_rows[start:start + CHUNK_ROWS].float() / t, dim=-1)
                    p_s = s.exp()
                    if reverse:  # d/du sum p_s (s - q) = p_s * ((s - q) - KL_row)
                        diff = s.sub_(q)
                        per_row = (p_s * diff).sum(dim=-1, keepdim=True)
                        chunk_grad = p_s.mul_(diff.sub_(per_row))
                    else:  # d/du sum p_t (q - s) = p_s - p_t
                        p_t = q.exp()
                        per_row = (p_t * (q - s)).sum(dim=-1, keepdim=True)
                        chunk_grad = p_s.sub_(p_t)
                    total += per_row.sum(dtype=torch.float64)
                    # d(t^2 * mean)/d logits = t^2 / rows * (1 / t) * d/du
                    grad[start:start + CHUNK_ROWS] = chunk_grad.mul_(t / rows)
            ctx.save_for_backward(grad)
            ctx.shape = student_logits.shape
            return (total / rows * (t * t)).float()

        @staticmethod
        def backward(ctx: Any, grad_output: Any) -> Any:
            (grad,) = ctx.saved_tensors
            return (grad * grad_output.to(grad.dtype)).reshape(ctx.shape), None, None, None

    return FusedKL


_FUSED_KL: Any = None


def fused_kl(student_logits: Any, teacher_logits: Any, temperature: float = 1.0, *, reverse: bool = False) -> Any:
    """:func:`kl_divergence` (``reverse``: :func:`reverse_kl_divergence`) for training: the same
    loss and gradient, computed chunk by chunk in one pass (see ``FusedKL``); the teacher's
    logits get no gradient."""
    global _FUSED_KL
    if _FUSED_KL is None:
        _FUSED_KL = _fused_kl_function()
    return _FUSED_KL.apply(student_logits, teacher_logits, float(temperature), bool(reverse))


def fused_forward_kl(student_logits: Any, teacher_logits: Any, temperature: float = 1.0) -> Any:
    return fused_kl(student_logits, teacher_logits, temperature)


def fused_reverse_kl(student_logits: Any, teacher_logits: Any, temperature: float = 1.0) -> Any:
    return fused_kl(student_logits, teacher_logits, temperature, reverse=True)


# The ``loss:`` setting of the distill stage -> the distribution loss on the logits: the
# reference formulas above (what evaluation and the tests compare against) ...
DISTRIBUTION_LOSSES = {
    "forward_kl": kl_divergence,
    "reverse_kl": reverse_kl_divergence,
    "jsd": jensen_shannon_divergence,
}
# ... and what the training loop runs: the two KLs fused (same value and gradient, a fraction of
# the memory traffic), the JSD through autograd.
TRAINING_LOSSES = {
    "forward_kl": fused_forward_kl,
    "reverse_kl": fused_reverse_kl,
    "jsd": jensen_shannon_divergence,
}


def next_token_cross_entropy(logits: Any, input_ids: Any) -> Any:
    """Mean cross-entropy of predicting token ``k + 1`` from position ``k`` (float32)."""
    import torch

    vocab = logits.shape[-1]
    shifted = logits[:, :-1].float().reshape(-1, vocab)
    targets = input_ids[:, 1:].reshape(-1)
    return torch.nn.functional.cross_entropy(shifted, targets)


def hidden_state_mse(
    student_hidden: Sequence[Any],
    teacher_hidden: Sequence[Any],
    layers: Sequence[int],
    channels: Sequence[int] | Any | None = None,
) -> Any:
    """Mean over student layers ``i`` of MSE(student_hidden[i], teacher_hidden[layers[i]]).

    ``channels`` (the teacher hidden channels the student kept, as a list or a LongTensor;
    None = all) slices the teacher's states to the student's width first.
    """
    import torch

    if len(student_hidden) != len(layers):
        raise ValueError(f"{len(student_hidden)} student hidden states but {len(layers)} mapped layers")
    if not len(layers):
        raise ValueError("no layers to compare")
    total = None
    for i, teacher_layer in enumerate(layers):
        target = teacher_hidden[teacher_layer]
        if channels is not None:
            index = channels if torch.is_tensor(channels) else torch.tensor(list(channels), dtype=torch.long)
            target = target.index_select(-1, index.to(target.device))
        term = torch.nn.functional.mse_loss(student_hidden[i].float(), target.float())
        total = term if total is None else total + term
    return total / len(layers)


def even_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Teacher layer for each student layer when no pruning record says: identity when the
    counts match, else spread evenly with the last student layer on the last teacher layer."""
    if student_layers == teacher_layers:
        return list(range(student_layers))
    return [max(0, round((i + 1) * teacher_layers / student_layers) - 1) for i in range(student_layers)]


def combine(parts: dict[str, Any], weights: dict[str, float]) -> Any:
    """``sum(weights[k] * parts[k])`` over the parts with a non-zero weight."""
    total = None
    for name, value in parts.items():
        weight = weights.get(name, 0.0)
        if weight:
            term = value * weight
            total = term if total is None else total + term
    if total is None:
        raise ValueError("every loss weight is zero")
    return total
