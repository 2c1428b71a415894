"""Perplexity over non-overlapping windows of the held-out split.

The protocol behind every number edgekit reports (and the peers in the README): the
held-out split is the last ``eval_tokens`` tokens of the text; it is cut into windows of
``window`` tokens, each scored on its own (no context carried across windows); the loss of
a window averages over its ``window - 1`` next-token predictions, and the perplexity is
``exp`` of the mean over all predictions.

With a teacher (the recipe's loaded model, in PyTorch), the same windows also give the
student's **top-1 agreement** (the fraction of the ``window - 1`` next-token predictions per
window where the student's most likely token is the teacher's) and **KL(teacher || student)**
(nats per prediction, the mean over predictions of ``sum_v p_t(v) (log p_t(v) - log p_s(v))``):
how far the small model's next-token distribution is from the model it was made from.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence


def _windows(ids: Sequence[int], window: int, max_windows: int | None) -> list[list[int]]:
    count = len(ids) // window
    if max_windows:
        count = min(count, max_windows)
    return [list(ids[i * window : (i + 1) * window]) for i in range(count)]


def _result(nll_sum: float, predictions: int, windows: int, window: int) -> dict[str, Any]:
    mean = nll_sum / predictions
    return {"perplexity": math.exp(mean), "nll": mean, "windows": windows, "window": window, "tokens": predictions}


class _TeacherComparison:
    """Accumulates top-1 agreement and KL(teacher || student) over windows."""

    def __init__(self, teacher: Any):
        self.teacher = teacher
        self.device = next(teacher.parameters()).device
        self.agree, self.kl, self.count = 0, 0.0, 0

    def add(self, batch: list[int], student_logits: Any) -> None:
        """``student_logits``: the student's [window - 1, vocab] logits (torch or numpy)."""
        import torch

        with torch.inference_mode():
            input_ids = torch.tensor([batch], device=self.device)
            teacher = self.teacher(input_ids=input_ids, use_cache=False).logits[0, :-1].float()
            student = torch.as_tensor(student_logits).to(teacher.device).float()
            if student.shape != teacher.shape:
                raise ValueError(f"the student's logits have shape {tuple(student.shape)}, the teacher's "
                                 f"{tuple(teacher.shape)}: they do not share a vocabulary")
            log_t = torch.log_softmax(teacher, dim=-1)
            log_s = torch.log_softmax(student, dim=-1)
            self.kl += float((log_t.exp() * (log_t - log_s)).sum(dim=-1).clamp_min(0).sum())
            self.agree += int((teacher.argmax(dim=-1) == student.argmax(dim=-1)).sum())
            self.count += teacher.shape[0]

    def result(self) -> dict[str, Any]:
        return {"agreement": self.agree / self.count, "kl": self.kl / self.count} if self.count else {}


def perplexity_torch(model: Any, ids: Sequence[int], *, window: int, max_windows: int | None = None, advance: Callable[[], None] = lambda: None,
                     teacher: Any = None) -> dict[str, Any]:
    """Perplexity of ``model`` on ``ids``; with ``teacher`` (a PyTorch model on the same
    vocabulary) also ``agreement`` and ``kl`` against it on the same predictions."""
    import torch

    nll_sum, predictions = 0.0, 0
    batches = _windows(ids, window, max_windows)
    device = next(model.parameters()).device
    compare = _TeacherComparison(teacher) if teacher is not None else None
    with torch.inference_mode():
        for batch in batches:
            input_ids = torch.tensor([batch], device=device)
            logits = model(input_ids=input_ids, use_cache=False).logits[0, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits, input_ids[0, 1:], reduction="sum")
            nll_sum += float(nll)
            predictions += len(batch) - 1
            if compare is not None:
                compare.add(batch, logits)
            advance()
    result = _result(nll_sum, predictions, len(batches), window)
    if compare is not None:
        result.update(compare.result())
    return result


def _log_softmax_nll(logits: Any, targets: Any) -> float:
    import numpy as np

    logits = logits.astype(np.float64)
    peak = logits.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(logits - peak).sum(axis=-1)) + peak[:, 0]
    return float((log_norm - logits[np.arange(len(targets)), targets]).sum())


def perplexity_onnx(model_path: Path, ids: Sequence[int], *, window: int, max_windows: int | None = None, advance: Callable[[], None] = lambda: None,
                    teacher: Any = None) -> dict[str, Any]:
    """Same protocol on an exported decoder (inputs as optimum writes them, empty KV cache);
    ``teacher``: a PyTorch model whose logits the graph's are compared with (agreement, KL)."""
    import numpy as np

    from edgekit.measure.onnx_session import DecoderSession

    session = DecoderSession(model_path)
    nll_sum, predictions = 0.0, 0
    batches = _windows(ids, window, max_windows)
    compare = _TeacherComparison(teacher) if teacher is not None else None
    for batch in batches:
        logits, _ = session.forward(np.asarray([batch], dtype=np.int64))
        nll_sum += _log_softmax_nll(logits[0, :-1], np.asarray(batch[1:]))
        predictions += len(batch) - 1
        if compare is not None:
            compare.add(batch, logits[0, :-1])
        advance()
    result = _result(nll_sum, predictions, len(batches), window)
    if compare is not None:
        result.update(compare.result())
    return result
