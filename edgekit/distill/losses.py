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
