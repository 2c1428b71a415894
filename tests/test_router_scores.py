"""The routing scores (edgekit.runtime.scores): the cascade's confidence rule."""

from __future__ import annotations

from edgekit.runtime.scores import ConfidenceMonitor


def test_cascade_score_matches_monitor_rule():
    m = ConfidenceMonitor(0.5, quantile=0.0, min_tokens=3)
    assert [m.push(c) for c in (0.9, 0.4, 0.8)] == [False, False, True] and m.score == 0.4
    m = ConfidenceMonitor(0.5, quantile=0.5, min_tokens=3, check="end")
    assert [m.push(c) for c in (0.9, 0.4, 0.8)] == [False] * 3 and m.finish() is False and m.score == 0.8
    m = ConfidenceMonitor(0.5, min_tokens=8)
    m.push(0.1)
    assert m.finish() is True  # a short answer is still checked at its end
