"""The routing scores: how hard a prompt looks (``input_complexity``) and how sure the small
branch is of its answer (``cascade``); the formulas are in :mod:`edgekit.runtime.router`'s
docstring, and calibration (:mod:`edgekit.runtime.calibration`) fits thresholds on them."""

from __future__ import annotations

import bisect
import math
from typing import Sequence


def complexity_score(prefill_logits, prompt_ids: Sequence[int], length_weight: float = 0.0) -> tuple[float, float]:
    """(score, mean_nll) of a prompt from the small model's prefill logits [n, vocab]:
    mean_nll over tokens 2..n (0 for one token), score = mean_nll + length_weight*log(1+n)."""
    import numpy as np

    n = len(prompt_ids)
    if n < 2:
        mean_nll = 0.0
    else:
        x = np.asarray(prefill_logits[: n - 1], dtype=np.float64)
        m = x.max(axis=1, keepdims=True)
        lse = (m[:, 0] + np.log(np.exp(x - m).sum(axis=1)))
        target = x[np.arange(n - 1), np.asarray(prompt_ids[1:], dtype=np.int64)]
        mean_nll = float((lse - target).mean())
    return mean_nll + length_weight * math.log1p(n), mean_nll


def _quantile(sorted_values: list[float], q: float) -> float:
    """numpy's default (linear) quantile of an ascending list."""
    h = (len(sorted_values) - 1) * q
    i = math.floor(h)
    a, b = sorted_values[i], sorted_values[min(i + 1, len(sorted_values) - 1)]
    return a + (b - a) * (h - i)


class ConfidenceMonitor:
    """The cascade rule: ``push`` each token's confidence; True = escalate now.
    ``finish()`` applies the end-of-answer decision point; ``score`` is the running
    minimum of Q(t) over the decision points seen (+inf before the first)."""

    def __init__(self, threshold: float, *, quantile: float = 0.1, min_tokens: int = 8, check: str = "incremental"):
        self.threshold, self.quantile, self.min_tokens, self.check = threshold, quantile, min_tokens, check
        self.values: list[float] = []
        self._sorted: list[float] = []
        self.score = math.inf
        self._scored_at = 0  # last t that was a decision point

    def _decide(self) -> bool:
        self._scored_at = len(self.values)
        self.score = min(self.score, _quantile(self._sorted, self.quantile))
        return self.score < self.threshold

    def push(self, confidence: float) -> bool:
        self.values.append(float(confidence))
        bisect.insort(self._sorted, float(confidence))
        if self.check == "incremental" and len(self.values) >= self.min_tokens:
            return self._decide()
        return False

    def finish(self) -> bool:
        if self.values and self._scored_at != len(self.values):
            return self._decide()
        return self.score < self.threshold


__all__ = ["ConfidenceMonitor", "complexity_score"]
