"""Policy ``learned``: a tiny scorer over features the small branch's prefill already gives,
trained at calibration time to predict how much the large branch gains on a prompt.

    from edgekit.runtime.learned import fit_scorer, prompt_features, score

    x = prompt_features(prefill_logits, prompt_ids, prompt_text)     # FEATURE_NAMES order
    scorer = fit_scorer(X, gains, hidden=8)                          # a LearnedScorer (runtime.json)
    score(scorer, x) > thresholds.learned                            # -> the large branch

Features (:data:`edgekit.runtime.config.FEATURE_NAMES`): from the prefill logits ``[n, vocab]``
of the prompt's ``n`` tokens, the per-token NLL of tokens 2..n (mean, 0.1 / 0.5 / 0.9 quantiles,
max, mean over the last quarter; 0 for a one-token prompt), the entropy of the next-token
distributions (mean, 0.9 quantile, at the last position: how open the continuation is), the top
probability at the last position, ``log(1 + n)``, characters per token (low for numbers and
non-English text), and the shares of digits, punctuation, non-ASCII, whitespace and upper-case
characters of the text. All of them cost one softmax over rows the prefill computed anyway.

The scorer (:class:`~edgekit.runtime.config.LearnedScorer`) standardizes the features and is
either linear or one tanh hidden layer; :func:`fit_scorer` trains it full-batch with Adam in
NumPy on squared error (``loss="mse"``, targets such as the large branch's gain in nats per
token; the output is in the target's units) or on the logistic loss (``loss="logistic"``, 0/1
targets; the output is a logit), with L2 on the weights, deterministic for a given seed.
:func:`cross_validated_scores` gives out-of-fold predictions, which calibration uses to place
the threshold where a model trained on all the calibration prompts will land on new ones.

NumPy only, imported inside the functions (the runtime's start-up stays light).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from edgekit.errors import EdgekitError
from edgekit.runtime.config import FEATURE_NAMES, MAX_HIDDEN, LearnedScorer

_PUNCT = set("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


def _text_shares(text: str) -> tuple[float, float, float, float, float]:
    n = max(1, len(text))
    digits = sum(c.isdigit() and c.isascii() for c in text)
    punct = sum(c in _PUNCT for c in text)
    non_ascii = sum(not c.isascii() for c in text)
    spaces = sum(c.isspace() for c in text)
    upper = sum(c.isupper() for c in text)
    return digits / n, punct / n, non_ascii / n, spaces / n, upper / n


def prompt_features(prefill_logits: Any, prompt_ids: Sequence[int], text: str) -> list[float]:
    """The features of one prompt in :data:`FEATURE_NAMES` order (module docstring)."""
    import numpy as np

    n = len(prompt_ids)
    x = np.asarray(prefill_logits[:n], dtype=np.float64)
    m = x.max(axis=1, keepdims=True)
    z = np.exp(x - m)
    total = z.sum(axis=1)
    lse = m[:, 0] + np.log(total)
    p = z / total[:, None]
    entropy = -(p * (x - lse[:, None])).sum(axis=1)
    if n >= 2:
        nll = lse[: n - 1] - x[np.arange(n - 1), np.asarray(prompt_ids[1:], dtype=np.int64)]
        q10, q50, q90 = np.quantile(nll, [0.1, 0.5, 0.9])
        tail = nll[-max(1, (n - 1) // 4):].mean()
        nll_stats = [float(nll.mean()), float(q10), float(q50), float(q90), float(nll.max()), float(tail)]
    else:
        nll_stats = [0.0] * 6
    features = nll_stats + [
        float(entropy.mean()), float(np.quantile(entropy, 0.9)), float(entropy[-1]), float(p[-1].max()),
        math.log1p(n), len(text) / max(1, n), *_text_shares(text),
    ]
    return features


def score_many(scorer: LearnedScorer, rows: Any) -> Any:
    """The scorer's outputs for feature rows ``[m, len(FEATURE_NAMES)]`` (NumPy array)."""
    import numpy as np

    rows = np.atleast_2d(np.asarray(rows, dtype=np.float64))
    index = [FEATURE_NAMES.index(name) for name in scorer.features]
    x = (rows[:, index] - np.asarray(scorer.mean)) / np.asarray(scorer.scale)
    if scorer.hidden_weights:
        h = np.tanh(x @ np.asarray(scorer.hidden_weights).T + np.asarray(scorer.hidden_bias))
        return h @ np.asarray(scorer.output_weights) + scorer.output_bias
    return x @ np.asarray(scorer.output_weights) + scorer.output_bias


def score(scorer: LearnedScorer, features: Sequence[float]) -> float:
    """The scorer's output for one prompt's features (:func:`prompt_features`)."""
    value = float(score_many(scorer, [list(features)])[0])
    return value if math.isfinite(value) else math.inf  # an overflow counts as "hard": the large branch


def fit_scorer(
    features: Any,
    targets: Sequence[float],
    *,
    hidden: int = 8,
    loss: str = "mse",
    l2: float = 1e-3,
    steps: int = 2000,
    learning_rate: float = 0.02,
    seed: int = 0,
    names: Sequence[str] = FEATURE_NAMES,
    target: str = "gain",
) -> LearnedScorer:
    """Train a scorer on ``features`` ``[m, len(FEATURE_NAMES)]`` (rows of :func:`prompt_features`;
    the scorer reads the columns ``names``) and ``targets`` ``[m]`` (module docstring). ``hidden``
    0: linear."""
    import numpy as np

    X = np.asarray(features, dtype=np.float64)
    y = np.asarray(targets, dtype=np.float64)
    if X.ndim != 2 or y.ndim != 1 or X.shape[0] != y.shape[0] or X.shape[1] != len(FEATURE_NAMES) or X.shape[0] < 2:
        raise EdgekitError(f"need features [m >= 2, {len(FEATURE_NAMES)}] and m targets, got {X.shape} and {y.shape}",
                           where="fit_scorer", how="score more prompts")
    unknown = [n for n in names if n not in FEATURE_NAMES]
    if unknown or not names:
        raise EdgekitError(f"unknown feature(s) {unknown}", where="fit_scorer", how=f"use {', '.join(FEATURE_NAMES)}")
    X = X[:, [FEATURE_NAMES.index(n) for n in names]]
    if not (np.isfinite(X).all() and np.isfinite(y).all()):
        raise EdgekitError("a feature or target is not finite", where="fit_scorer", how="check the branches' outputs")
    if not (isinstance(hidden, int) and 0 <= hidden <= MAX_HIDDEN) or loss not in ("mse", "logistic"):
        raise EdgekitError(f"hidden must be in [0, {MAX_HIDDEN}] and loss mse or logistic, got {hidden!r}, {loss!r}",
                           where="fit_scorer", how="fix the value")
    mean = X.mean(axis=0)
    scale = X.std(axis=0)
    scale = np.where(scale > 1e-9, scale, 1.0)
    Z = (X - mean) / scale
    if loss == "mse":
        y_mean, y_scale = float(y.mean()), float(y.std()) or 1.0
        t = (y - y_mean) / y_scale
    else:
        y_mean, y_scale, t = 0.0, 1.0, y
    rng = np.random.default_rng(seed)
    m, d = Z.shape
    params = {"w2": rng.normal(0, 0.1, hidden or d), "b2": np.zeros(1)}
    if hidden:
        params.update(w1=rng.normal(0, 1 / math.sqrt(d), (hidden, d)), b1=np.zeros(hidden))
    moments = {k: (np.zeros_like(v), np.zeros_like(v)) for k, v in params.items()}
    beta1, beta2 = 0.9, 0.999
    for step in range(1, steps + 1):
        h = np.tanh(Z @ params["w1"].T + params["b1"]) if hidden else Z
        out = h @ params["w2"] + params["b2"][0]
        if loss == "mse":
            d_out = 2 * (out - t) / m
        else:
            d_out = (1 / (1 + np.exp(-np.clip(out, -50, 50))) - t) / m
        grads = {"w2": h.T @ d_out + 2 * l2 * params["w2"], "b2": np.array([d_out.sum()])}
        if hidden:
            d_h = np.outer(d_out, params["w2"]) * (1 - h**2)
            grads.update(w1=d_h.T @ Z + 2 * l2 * params["w1"], b1=d_h.sum(axis=0))
        for k, g in grads.items():
            m1, m2 = moments[k]
            m1 *= beta1
            m1 += (1 - beta1) * g
            m2 *= beta2
            m2 += (1 - beta2) * g * g
            params[k] -= learning_rate * (m1 / (1 - beta1**step)) / (np.sqrt(m2 / (1 - beta2**step)) + 1e-8)
    return LearnedScorer(
        features=tuple(names), mean=tuple(map(float, mean)), scale=tuple(map(float, scale)),
        hidden_weights=tuple(tuple(map(float, row)) for row in params["w1"]) if hidden else (),
        hidden_bias=tuple(map(float, params["b1"])) if hidden else (),
        output_weights=tuple(float(w) * y_scale for w in params["w2"]),
        output_bias=float(params["b2"][0]) * y_scale + y_mean, target=target,
    )


def cross_validated_scores(features: Any, targets: Sequence[float], *, folds: int = 5, seed: int = 0, **fit: Any) -> Any:
    """Out-of-fold predictions: each row scored by a scorer trained without its fold (folds by
    a seeded permutation)."""
    import numpy as np

    X = np.asarray(features, dtype=np.float64)
    y = np.asarray(targets, dtype=np.float64)
    order = np.random.default_rng(seed).permutation(len(y))
    out = np.empty(len(y))
    folds = max(2, min(folds, len(y)))
    for k in range(folds):
        held = order[k::folds]
        keep = np.setdiff1d(order, held)
        scorer = fit_scorer(X[keep], y[keep], seed=seed, **fit)
        out[held] = score_many(scorer, X[held])
    return out


__all__ = ["cross_validated_scores", "fit_scorer", "prompt_features", "score", "score_many"]
