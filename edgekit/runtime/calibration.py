"""Calibrate a router's threshold for a target share of large-branch calls.

    from edgekit.runtime.calibration import apply_calibration, calibrate, held_out_prompts

    prompts = held_out_prompts(small.tokenizer, n=128, split="calibration")
    cal = calibrate(router, prompts, large_rate=0.3)      # {"threshold": ..., ...}
    apply_calibration(router, cal)

Quantile calibration: every held-out prompt gets the policy's score, and the threshold is
put where the target share of those prompts goes to the large branch.

* ``input_complexity``: the prompt score (``Router.prompt_score``: mean NLL of the prompt
  under the small model + length term); a prompt goes large when ``score > threshold``.
* ``cascade``: the confidence score (``Router.confidence_score``: the small branch's whole
  generation with the router's ``max_new_tokens`` and sampler settings, min over the
  decision points of the low-quantile confidence); a prompt escalates when
  ``score < threshold``. The router stops the small answer at the first decision point
  below the threshold, which happens exactly when this minimum is below it, so the
  calibrated share is the share the router will escalate.

Both are put on one axis, the *escalation score* ``e`` (``score``, resp. ``-score``: larger
goes large), and the threshold ``t`` is chosen among the gaps between distinct sorted
values of ``e``: the one whose count of ``e > t`` is closest to ``large_rate * n``, ties to
the smaller count (fewer large calls). Within a gap the threshold is the midpoint of the two
neighbouring values, so prompts near either one route like them; above every value it is
the maximum (nothing strictly above it), below every value the minimum minus 1. The
returned ``threshold`` is in the policy's own units (``-t`` for cascade).

Held-out prompts (:func:`held_out_prompts`) come from ``builtin:python-docs`` only from its
held-out split, the last ``eval_tokens`` tokens (``edgekit.models.text.tokenize_splits``, the
same split ``evaluate`` measures perplexity on, so no prompt comes from text a stage
calibrated on): the first half of that split gives the ``"calibration"`` prompts, the second
half the ``"evaluation"`` prompts, so a rate measured on evaluation prompts is measured on
prompts the threshold was not fitted to.
"""

from __future__ import annotations

from typing import Any, Sequence

from edgekit.errors import DataError, EdgekitError
from edgekit.runtime.config import CALIBRATABLE, Thresholds


def quantile_threshold(escalation_scores: Sequence[float], large_rate: float) -> tuple[float, int]:
    """(t, count of scores > t) with the count closest to ``large_rate * n`` (module
    docstring); deterministic for a given multiset of scores."""
    import numpy as np

    e = np.sort(np.asarray(escalation_scores, dtype=np.float64))
    n = e.size
    uniq = np.unique(e)
    target = large_rate * n
    # candidate j: t just above uniq[j] (count = scores > uniq[j]); candidate -1: below all
    above = n - np.searchsorted(e, uniq, side="right")
    counts = np.concatenate([[n], above])
    best = min(range(counts.size), key=lambda j: (abs(counts[j] - target), counts[j]))
    if best == 0:
        t = float(uniq[0]) - 1.0
    else:
        j = best - 1
        t = float(uniq[j]) if j + 1 == uniq.size else float((uniq[j] + uniq[j + 1]) / 2)
    return t, int(counts[best])


def calibrate(
    router_or_branches: Any,
    prompts: Sequence[str | Sequence[int]],
    *,
    policy: str | None = None,
    large_rate: float = 0.3,
    thresholds: dict | None = None,
    sampler_params: dict | None = None,
    max_new_tokens: int | None = None,
) -> dict:
    """Fit the threshold of ``policy`` so that ``large_rate`` of ``prompts`` go large.

    ``router_or_branches``: a ``Router`` (its policy, thresholds, sampler settings and
    ``max_new_tokens`` are used; the arguments here override them for the calibration
    run) or a ``(small, large)`` pair (``large`` may be None; it is never called).
    Returns ``{"policy", "threshold", "large_rate_target", "large_rate_achieved",
    "n_prompts", "scores", "rule", ...}`` with ``scores`` in prompt order and policy
    units."""
    from edgekit.runtime.router import Router

    if isinstance(router_or_branches, Router):
        base = router_or_branches
        small, policy = base.small, policy or base.policy
        thresholds = {**base.thresholds.model_dump(), **(thresholds or {})}
        sampler_params = base.sampler_params if sampler_params is None else sampler_params
        max_new_tokens = base.max_new_tokens if max_new_tokens is None else max_new_tokens
        seed = base.seed
    else:
        try:
            small, _large = router_or_branches
        except (TypeError, ValueError):
            raise EdgekitError(
                "calibrate needs a Router or a (small, large) pair of branches", where="calibrate", how="pass one"
            ) from None
        max_new_tokens = max_new_tokens or 64
        seed = 0
    if policy not in CALIBRATABLE:
        raise EdgekitError(f"policy {policy!r} has no threshold to calibrate", where="calibrate", how=f"use {' or '.join(CALIBRATABLE)}")
    if not getattr(small, "has_logits", False):
        raise EdgekitError(
            f"calibrating {policy} needs the small branch's logits", where="calibrate", how="use a local small model"
        )
    # only the small branch is scored: a small-only router carries the settings
    router = Router(
        small, None, "small_only", thresholds=thresholds, sampler_params=sampler_params, max_new_tokens=max_new_tokens, seed=seed
    )
    if isinstance(large_rate, bool) or not isinstance(large_rate, (int, float)) or not 0.0 <= large_rate <= 1.0:
        raise EdgekitError(f"large_rate must be in [0, 1], got {large_rate!r}", where="calibrate", how="use e.g. 0.3")
    prompts = list(prompts)
    if not prompts:
        raise DataError("no prompts to calibrate on", where="calibrate", how="give held-out prompts (held_out_prompts)")
    if policy == "input_complexity":
        scores = [router.prompt_score(p) for p in prompts]
        escalation = scores
    else:
        scores = [router.confidence_score(p) for p in prompts]
        escalation = [-s for s in scores]
    t, count = quantile_threshold(escalation, float(large_rate))
    threshold = t if policy == "input_complexity" else -t
    th = router.thresholds
    out = {
        "policy": policy,
        "threshold": threshold,
        "large_rate_target": float(large_rate),
        "large_rate_achieved": count / len(prompts),
        "n_prompts": len(prompts),
        "scores": scores,
        "rule": "large when score > threshold" if policy == "input_complexity" else "escalate when score < threshold",
    }
    if policy == "input_complexity":
        out["length_weight"] = th.length_weight
    else:
        out.update(quantile=th.quantile, min_tokens=th.min_tokens, check=th.check, max_new_tokens=router.max_new_tokens)
    return out


def apply_calibration(router: Any, calibration: dict) -> None:
    """Set the router's threshold (and the scoring settings it was calibrated with)."""
    if calibration["policy"] == "input_complexity":
        fitted = {"complexity": calibration["threshold"], "length_weight": calibration["length_weight"]}
    else:
        fitted = {"confidence": calibration["threshold"], "quantile": calibration["quantile"],
                  "min_tokens": calibration["min_tokens"], "check": calibration["check"]}
    router.thresholds = Thresholds.model_validate({**router.thresholds.model_dump(), **fitted})


def measured_large_rate(router: Any, prompts: Sequence[str | Sequence[int]], **overrides) -> float:
    """Share of ``prompts`` the router answers with the large branch (``generate`` each)."""
    prompts = list(prompts)
    large = sum(router.generate(p, **overrides).branch == "large" for p in prompts)
    return large / len(prompts) if prompts else 0.0


def held_out_prompts(
    tokenizer: Any,
    n: int = 64,
    *,
    min_tokens: int = 16,
    max_tokens: int = 64,
    split: str = "calibration",
    eval_tokens: int = 8192,
    seed: int = 0,
    source: str = "builtin:python-docs",
) -> list[str]:
    """``n`` prompt texts from one half of the held-out split (module docstring).

    Prompt i has a length drawn uniformly from [min_tokens, max_tokens] (numpy
    ``default_rng(seed)``) and starts at ``round(i * (L - max_tokens) / (n - 1))`` of the
    half's L tokens: evenly spread, overlapping only when ``n * max_tokens > L``. The
    tokens are decoded to text (a remote branch takes text; a local one re-encodes it)."""
    import numpy as np

    from edgekit.models.text import resolve_text_source, tokenize_splits

    if split not in ("calibration", "evaluation"):
        raise EdgekitError(f"split must be 'calibration' or 'evaluation', got {split!r}", where="held_out_prompts", how="pick one")
    if not (isinstance(n, int) and n >= 1 and isinstance(min_tokens, int) and 1 <= min_tokens <= max_tokens):
        raise EdgekitError(
            f"need n >= 1 and 1 <= min_tokens <= max_tokens, got n={n!r}, min_tokens={min_tokens!r}, max_tokens={max_tokens!r}",
            where="held_out_prompts",
            how="fix the sizes",
        )
    text = resolve_text_source(source).read()
    held = tokenize_splits(text, tokenizer, eval_tokens=eval_tokens, window=1, where=source).evaluation
    half = len(held) // 2
    region = held[:half] if split == "calibration" else held[half:]
    if len(region) < max_tokens:
        raise DataError(
            f"half of the held-out split has {len(region)} tokens, fewer than max_tokens={max_tokens}",
            where=source,
            how="lower max_tokens or raise eval_tokens",
        )
    lengths = np.random.default_rng(seed).integers(min_tokens, max_tokens + 1, size=n)
    span = len(region) - max_tokens
    prompts = []
    for i, length in enumerate(lengths):
        start = round(i * span / (n - 1)) if n > 1 else 0
        prompts.append(tokenizer.decode(list(region[start : start + int(length)]), skip_special_tokens=True))
    return prompts


__all__ = ["apply_calibration", "calibrate", "held_out_prompts", "measured_large_rate", "quantile_threshold"]
