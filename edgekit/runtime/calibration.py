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

* ``learned``: the learned scorer's output (``Router.learned_score``: the prompt's predicted
  gain from the large branch); a prompt goes large when ``score > threshold``. With a scorer
  already in the router, :func:`calibrate` refits its threshold only; :func:`calibrate_learned`
  trains the scorer first (below).

All are put on one axis, the *escalation score* ``e`` (``score``, resp. ``-score``: larger
goes large), and the threshold ``t`` is chosen among the gaps between distinct sorted
values of ``e``: the one whose count of ``e > t`` is closest to ``large_rate * n``, ties to
the smaller count (fewer large calls). Within a gap the threshold is the midpoint of the two
neighbouring values, so prompts near either one route like them; above every value it is
the maximum (nothing strictly above it), below every value the minimum minus 1. The
returned ``threshold`` is in the policy's own units (``-t`` for cascade).

Training the learned scorer (:func:`routing_examples`, :func:`calibrate_learned`): for every
calibration prompt, one teacher-forced pass of each branch over the prompt and its reference
continuation (the first ``target_tokens`` tokens of the item's ``continuation``; for an item
without one, the large branch's greedy answer) gives the target, the large branch's gain in
nats per token (small NLL - large NLL, mean over those tokens), and the small pass's prompt rows
give the features (the same rows the router's prefill computes). The threshold is the quantile
of the *out-of-fold* scores (5 folds, each scored by a scorer trained without it), so it is
placed where a scorer meets prompts it was not trained on; the scorer kept is then trained on
all of them. The large branch must be local (its logits), and is called only here.

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
    if policy == "learned":
        router.learned = getattr(router_or_branches, "learned", None)
        if router.learned is None:
            raise EdgekitError("policy learned has no scorer to calibrate a threshold for", where="calibrate",
                               how="train one with calibrate_learned (edgekit calibrate-router --policy learned)")
        scores = [router.learned_score(p) for p in prompts]
        escalation = scores
    elif policy == "input_complexity":
        scores = [router.prompt_score(p) for p in prompts]
        escalation = scores
    else:
        scores = [router.confidence_score(p) for p in prompts]
        escalation = [-s for s in scores]
    t, count = quantile_threshold(escalation, float(large_rate))
    threshold = -t if policy == "cascade" else t
    th = router.thresholds
    out = {
        "policy": policy,
        "threshold": threshold,
        "large_rate_target": float(large_rate),
        "large_rate_achieved": count / len(prompts),
        "n_prompts": len(prompts),
        "scores": scores,
        "rule": "escalate when score < threshold" if policy == "cascade" else "large when score > threshold",
    }
    if policy == "input_complexity":
        out["length_weight"] = th.length_weight
    elif policy == "learned":
        out["learned"] = router.learned.model_dump(mode="json")
    else:
        out.update(quantile=th.quantile, min_tokens=th.min_tokens, check=th.check, max_new_tokens=router.max_new_tokens)
    return out


def apply_calibration(router: Any, calibration: dict) -> None:
    """Set the router's threshold (and the scoring settings it was calibrated with)."""
    if calibration["policy"] == "input_complexity":
        fitted = {"complexity": calibration["threshold"], "length_weight": calibration["length_weight"]}
    elif calibration["policy"] == "learned":
        from edgekit.runtime.config import LearnedScorer

        fitted = {"learned": calibration["threshold"]}
        router.learned = LearnedScorer.model_validate(calibration["learned"])
    else:
        fitted = {"confidence": calibration["threshold"], "quantile": calibration["quantile"],
                  "min_tokens": calibration["min_tokens"], "check": calibration["check"]}
    router.thresholds = Thresholds.model_validate({**router.thresholds.model_dump(), **fitted})


def _encode_continuation(tokenizer: Any, text: str) -> list[int]:
    try:
        return [int(t) for t in tokenizer.encode(text, add_special_tokens=False)]
    except TypeError:  # a tokenizer without the option adds nothing
        return [int(t) for t in tokenizer.encode(text)]


def _token_nll(branch: Any, ids: list[int], start: int):
    """(prompt rows' logits, NLL of ids[start:] given what precedes them) from one pass."""
    import numpy as np

    session = branch.session()
    try:
        logits = np.asarray(session.feed(ids), dtype=np.float64)
    finally:
        session.close()
    rows = logits[start - 1:len(ids) - 1]
    m = rows.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(rows - m).sum(axis=1))
    return logits[:start], lse - rows[np.arange(len(rows)), np.asarray(ids[start:], dtype=np.int64)]


def greedy_answer(branch: Any, ids: list[int], max_new_tokens: int) -> list[int]:
    """The branch's greedy continuation of ``ids`` (argmax each step, EOS excluded)."""
    from edgekit.runtime.answers import eos_ids
    from edgekit.runtime.backends.common import greedy_generate

    eos = eos_ids(branch.tokenizer)
    tokens = greedy_generate(branch, ids, max_new_tokens, eos_token_id=eos)
    return tokens[:-1] if tokens and tokens[-1] in eos else tokens


def routing_examples(small: Any, large: Any, items: Sequence[Any], *, target_tokens: int = 32, progress: Any = None) -> list[dict]:
    """Per item (``edgekit.models.routing_set.PromptItem`` or any object with ``prompt``,
    ``kind``, ``continuation``): ``{"kind", "features", "gain", "small_nll", "large_nll",
    "tokens", "prompt_tokens"}`` (module docstring: the target). Branches local, one tokenizer."""
    from edgekit.runtime.learned import prompt_features

    for label, branch in (("small", small), ("large", large)):
        if branch is None or not getattr(branch, "has_logits", False):
            raise EdgekitError(f"training the learned router needs the {label} branch's logits", where=f"router.{label}",
                               how="give a local large branch (a bundle directory) with --large")
    if not isinstance(target_tokens, int) or not 1 <= target_tokens <= 4096:
        raise EdgekitError(f"target_tokens must be in [1, 4096], got {target_tokens!r}", where="routing_examples", how="e.g. 32")
    out = []
    for i, item in enumerate(items):
        ids = [int(t) for t in small.tokenizer.encode(item.prompt)]
        if not ids:
            raise DataError("a prompt encodes to no tokens", where=f"prompt {i}", how="drop it")
        reference = _encode_continuation(small.tokenizer, item.continuation)[:target_tokens] if item.continuation else []
        if not reference:
            reference = greedy_answer(large, ids, target_tokens)
        if not reference:  # the large branch ends at once: nothing to gain
            reference = [int(ids[-1])]
        rows, small_nll = _token_nll(small, ids + reference, len(ids))
        _, large_nll = _token_nll(large, ids + reference, len(ids))
        out.append({"kind": getattr(item, "kind", "default"), "features": prompt_features(rows, ids, item.prompt),
                    "gain": float((small_nll - large_nll).mean()), "small_nll": float(small_nll.sum()),
                    "large_nll": float(large_nll.sum()), "tokens": len(reference), "prompt_tokens": len(ids)})
        if progress is not None:
            progress(i + 1, len(items))
    return out


def calibrate_learned(examples: Sequence[dict], *, large_rate: float = 0.3, hidden: int = 8, seed: int = 0, folds: int = 5) -> dict:
    """Train the learned scorer on ``examples`` (:func:`routing_examples` of the calibration
    prompts) and place its threshold for ``large_rate`` on their out-of-fold scores (module
    docstring). Returns the calibration record, ``learned`` holding the scorer."""
    import numpy as np

    from edgekit.runtime.learned import cross_validated_scores, fit_scorer

    if isinstance(large_rate, bool) or not isinstance(large_rate, (int, float)) or not 0.0 <= large_rate <= 1.0:
        raise EdgekitError(f"large_rate must be in [0, 1], got {large_rate!r}", where="calibrate", how="use e.g. 0.3")
    if len(examples) < 2 * folds:
        raise DataError(f"{len(examples)} calibration prompts are too few to train the learned router (at least {2 * folds})",
                        where="calibrate", how="give more prompts (builtin:routing-mixed has about 300 per half)")
    X = np.asarray([e["features"] for e in examples], dtype=np.float64)
    y = np.asarray([e["gain"] for e in examples], dtype=np.float64)
    oof = cross_validated_scores(X, y, folds=folds, seed=seed, hidden=hidden)
    t, count = quantile_threshold(oof, float(large_rate))
    scorer = fit_scorer(X, y, hidden=hidden, seed=seed, target="large branch's gain, nats/token (small NLL - large NLL)")
    correlation = float(np.corrcoef(oof, y)[0, 1]) if np.std(oof) > 0 and np.std(y) > 0 else 0.0
    return {
        "policy": "learned", "threshold": t, "large_rate_target": float(large_rate), "large_rate_achieved": count / len(y),
        "n_prompts": len(y), "scores": [float(v) for v in oof], "rule": "large when score > threshold",
        "learned": scorer.model_dump(mode="json"), "hidden": hidden, "folds": folds,
        "out_of_fold_correlation_with_gain": correlation,
    }


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


__all__ = ["apply_calibration", "calibrate", "calibrate_learned", "greedy_answer", "held_out_prompts", "measured_large_rate",
           "quantile_threshold", "routing_examples"]
