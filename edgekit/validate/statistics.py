"""Latency statistics of a validation run: count, mean, p50/p90/p99, min, max, with the
runtime's quantiles (the code ``serve`` reports with), and the rounding the report uses."""

from __future__ import annotations

from typing import Any

QUANTILE_DEFINITION = ("numpy's default 'linear' quantile: over the n sorted samples s, h = (n - 1) * q, "
                       "result s[floor(h)] + (h - floor(h)) * (s[floor(h) + 1] - s[floor(h)])")


def summarize(values: list[float]) -> dict[str, float | int] | None:
    """count, mean, p50, p90, p99, min, max of ``values`` (None when empty); the quantiles
    are the runtime's (:class:`edgekit.runtime.fastpath.LatencyStats`, numpy 'linear')."""
    if not values:
        return None
    from edgekit.runtime import fastpath

    stats = fastpath.LatencyStats(window=max(1, len(values)))
    for value in values:
        stats.record_token(float(value))
    summary = stats.summary()["token"]
    return {"count": summary["count"], "mean": summary["mean"], "p50": summary["p50"], "p90": summary["p90"],
            "p99": summary["p99"], "min": min(values), "max": max(values)}


def rounded(summary: dict[str, Any] | None, digits: int = 4) -> dict[str, Any] | None:
    """``summary`` with its floats rounded to ``digits`` (None stays None): the report's numbers."""
    if summary is None:
        return None
    return {k: (round(v, digits) if isinstance(v, float) else v) for k, v in summary.items()}
