"""Policy learned (edgekit.runtime.learned): the NumPy scorer learns known rules, its stored form
refuses hostile values, the Router routes by it, and calibration trains it and places its
threshold for a target share of large calls on prompts it has not seen (fake branches)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from branch_fakes import EOS, LARGE_TABLE, SMALL_TABLE, Local, Model, Tok

from edgekit.errors import EdgekitError
from edgekit.runtime import calibration, learned as L, router as R
from edgekit.runtime.config import FEATURE_NAMES, MAX_HIDDEN, LearnedScorer, RuntimeConfig

F = len(FEATURE_NAMES)


def _synthetic(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, F)) * rng.uniform(0.1, 10, size=F) + rng.normal(size=F) * 5


@pytest.mark.parametrize("hidden", [0, 8])
def test_the_scorer_learns_a_separable_rule(hidden):
    X = _synthetic(600)
    z = (X - X.mean(0)) / X.std(0)
    y = (z[:, 0] + 0.7 * z[:, 5] - 0.5 * z[:, 14] > 0.2).astype(float)
    scorer = L.fit_scorer(X[:400], y[:400], hidden=hidden, loss="logistic")
    accuracy = ((L.score_many(scorer, X[400:]) > 0) == y[400:]).mean()
    assert accuracy >= 0.95, accuracy
    assert len(scorer.hidden_weights) == hidden and len(scorer.output_weights) == (hidden or F)
    # same data, same seed: the same scorer
    assert L.fit_scorer(X[:400], y[:400], hidden=hidden, loss="logistic") == scorer


def test_the_hidden_layer_learns_what_a_linear_scorer_cannot():
    X = _synthetic(900, seed=1)
    z = (X - X.mean(0)) / X.std(0)
    gain = z[:, 2] ** 2 + 0.1 * np.random.default_rng(2).normal(size=900)  # symmetric: no linear signal
    linear = L.fit_scorer(X[:600], gain[:600], hidden=0)
    mlp = L.fit_scorer(X[:600], gain[:600], hidden=8)
    r_linear = np.corrcoef(L.score_many(linear, X[600:]), gain[600:])[0, 1]
    r_mlp = np.corrcoef(L.score_many(mlp, X[600:]), gain[600:])[0, 1]
    assert r_mlp >= 0.9 and r_linear < 0.3, (r_mlp, r_linear)
    # outputs are in the target's units (squared error on the standardized target, mapped back)
    assert abs(L.score_many(mlp, X[600:]).mean() - gain[600:].mean()) < 0.2
    oof = L.cross_validated_scores(X[:600], gain[:600], hidden=8)
    assert np.corrcoef(oof, gain[:600])[0, 1] >= 0.85


def test_fit_refuses_bad_inputs():
    X = _synthetic(20)
    with pytest.raises(EdgekitError, match="not finite"):
        L.fit_scorer(np.where(np.eye(20, F) > 0, np.nan, X), np.zeros(20))
    with pytest.raises(EdgekitError, match="need features"):
        L.fit_scorer(X[:, :3], np.zeros(20))
    with pytest.raises(EdgekitError, match="hidden"):
        L.fit_scorer(X, np.zeros(20), hidden=MAX_HIDDEN + 1)
    with pytest.raises(EdgekitError, match="unknown feature"):
        L.fit_scorer(X, np.zeros(20), names=("nll_mean", "bogus"))


def test_prompt_features_follow_the_prefill():
    tok = Tok()
    ids = tok.encode("abcabcabc")
    model = Model(SMALL_TABLE)
    logits = np.asarray([model(ids[: i + 1]) for i in range(len(ids))])
    features = dict(zip(FEATURE_NAMES, L.prompt_features(logits, ids, "abc 12!")))
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    nll = -logp[np.arange(len(ids) - 1), ids[1:]]
    assert features["nll_mean"] == pytest.approx(nll.mean()) and features["nll_max"] == pytest.approx(nll.max())
    assert features["top1_last"] == pytest.approx(np.exp(logp[-1]).max())
    assert features["log_tokens"] == pytest.approx(math.log1p(len(ids)))
    assert features["digits"] == pytest.approx(2 / 7) and features["punct"] == pytest.approx(1 / 7)
    one = L.prompt_features(logits[:1], ids[:1], "a")
    assert one[:6] == [0.0] * 6 and all(math.isfinite(v) for v in one)


def _scorer(**overrides) -> dict:
    base = L.fit_scorer(_synthetic(40), np.arange(40.0), hidden=2, steps=10).model_dump(mode="json")
    return {**base, **overrides}


@pytest.mark.parametrize("bad, message", [
    ({"features": ["nll_mean", "nope"]}, "unknown feature"),
    ({"features": ["nll_mean"] * 2}, None),
    ({"mean": [0.0] * (F - 1)}, "mean and scale"),
    ({"scale": [0.0] * F}, "greater than 0"),
    ({"hidden_weights": [[0.1] * (F - 1)] * 2}, "every row"),
    ({"hidden_bias": [0.0]}, "hidden_bias"),
    ({"output_weights": [1.0] * 5}, "output_weights"),
    ({"output_bias": float("nan")}, None),
    ({"output_bias": 1e300}, "less than or equal"),
    ({"hidden_weights": [[0.0] * F] * (MAX_HIDDEN + 1)}, "at most"),
    ({"mean": [0.0] * 100_000}, "at most"),
    ({"extra": 1}, "Extra inputs"),
    ({"target": "x" * 10_000}, "at most 200"),
])
def test_hostile_stored_scorers_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        LearnedScorer.model_validate(_scorer(**bad))
    with pytest.raises(ValueError):  # as runtime.json's learned
        RuntimeConfig.model_validate({"policy": "learned", "large": "large", "learned": _scorer(**bad)})


def test_the_stored_scorer_round_trips_through_runtime_json():
    stored = _scorer()
    config = RuntimeConfig.model_validate({"policy": "learned", "large": "large", "learned": stored,
                                           "thresholds": {"learned": 0.5}})
    again = RuntimeConfig.model_validate(json.loads(json.dumps(config.model_dump(mode="json"))))
    assert again == config and again.learned == LearnedScorer.model_validate(stored)
    with pytest.raises(ValueError, match="policy learned needs its scorer"):
        RuntimeConfig.model_validate({"policy": "learned", "large": "large"})


def _fakes():
    return Local("small", Model(SMALL_TABLE, eos_bias=-50)), Local("large", Model(LARGE_TABLE, eos_bias=-50))


def _length_scorer() -> LearnedScorer:
    """A hand-made linear scorer: the score is log(1 + prompt tokens)."""
    index = FEATURE_NAMES.index("log_tokens")
    return LearnedScorer(features=FEATURE_NAMES, mean=(0.0,) * F, scale=(1.0,) * F,
                         output_weights=tuple(1.0 if i == index else 0.0 for i in range(F)))


def test_the_router_routes_by_the_learned_score():
    small, large = _fakes()
    router = R.Router(small, large, "learned", learned=_length_scorer(), thresholds={"learned": math.log1p(6)},
                      max_new_tokens=4)
    short = router.generate("abc")
    assert short.branch == "small" and short.score == pytest.approx(math.log1p(3)) and "<=" in short.reason
    long = router.generate("abcdefghij")
    assert long.branch == "large" and long.threshold == pytest.approx(math.log1p(6)) and "learned score" in long.reason
    assert router.learned_score("abcdefghij") == pytest.approx(math.log1p(10))
    # the small prefill is reused: one small session when the small branch answers
    before = small.feed_calls
    router.generate("ab")
    assert small.feed_calls - before == 4  # the prefill, then one pass per generated token after the first
    with pytest.raises(EdgekitError, match="policy learned needs its scorer"):
        R.Router(small, large, "learned")
    failing = Local("small", Model(SMALL_TABLE), fail_after=0)
    fell = R.Router(failing, large, "learned", learned=_length_scorer(), max_new_tokens=2).generate("abc")
    assert fell.branch == "large" and fell.fell_back and "could not score" in fell.reason


def test_degrade_protects_the_learned_policy():
    """Policy degrade with protects: learned routes by the learned score while the large branch
    has room, answers small while it is full, and needs the scorer like policy learned."""
    from edgekit.runtime.load import LoadMonitor

    small, large = _fakes()
    load = LoadMonitor(max_in_flight=1)
    router = R.Router(small, large, "degrade", learned=_length_scorer(), thresholds={"learned": math.log1p(6)},
                      degrade={"protects": "learned"}, load=load, max_new_tokens=4)
    r = router.generate("abcdefghij")
    assert r.branch == "large" and not r.degraded and router.active_policy == "learned"
    held = load.admit()  # the large branch's only place is taken
    r = router.generate("abcdefghij")
    assert r.degraded and r.branch == "small"
    load.release(held.ticket)
    assert router.generate("abc").branch == "small"  # within budget again: the learned score decides
    with pytest.raises(EdgekitError, match="policy learned needs its scorer"):
        R.Router(small, large, "degrade", degrade={"protects": "learned"})


def _items(n, seed):
    """Prompts whose length sets how much the large fake gains: a learnable rule."""
    from edgekit.models.routing_set import PromptItem

    rng = np.random.default_rng(seed)
    letters = "abcdefghijklmnopqrstuvw"
    out = []
    for _ in range(n):
        k = int(rng.integers(2, 41))
        out.append(PromptItem("".join(letters[int(i)] for i in rng.integers(0, EOS, size=k)),
                              "long" if k > 20 else "short",
                              "".join(letters[int(i)] for i in rng.integers(0, EOS, size=6))))
    return out


def test_calibration_trains_the_scorer_and_hits_the_rate_on_unseen_prompts():
    def scale(tokens):  # the small fake gets worse with length: the large branch gains on long prompts
        return max(0.1, 1.0 - 0.025 * len(tokens))

    small = Local("small", Model(SMALL_TABLE, eos_bias=-50))
    large = Local("large", Model(LARGE_TABLE, eos_bias=-50))
    small.model.scale = scale
    items = _items(400, 0)
    examples = calibration.routing_examples(small, large, items[:200], target_tokens=6)
    assert len(examples) == 200 and all(len(e["features"]) == F and e["tokens"] == 6 for e in examples)
    record = calibration.calibrate_learned(examples, large_rate=0.3, hidden=4)
    assert record["policy"] == "learned" and abs(record["large_rate_achieved"] - 0.3) <= 0.02
    assert record["out_of_fold_correlation_with_gain"] > 0.3
    router = R.Router(small, large, "small_only", max_new_tokens=2)
    calibration.apply_calibration(router, record)
    assert router.thresholds.learned == record["threshold"] and router.learned.target.startswith("large branch")
    held = [router.learned_score(i.prompt) for i in items[200:]]
    rate = sum(v > record["threshold"] for v in held) / len(held)
    assert abs(rate - 0.3) <= 0.06, rate
    # the scorer's picks gain more than the others: what it was trained for
    gains = [e["gain"] for e in calibration.routing_examples(small, large, items[200:], target_tokens=6)]
    picked = [g for g, v in zip(gains, held) if v > record["threshold"]]
    rest = [g for g, v in zip(gains, held) if v <= record["threshold"]]
    assert np.mean(picked) > np.mean(rest)
    # calibrate() re-fits the threshold of the scorer a router has
    learned_router = R.Router(small, large, "learned", learned=router.learned, max_new_tokens=2)
    again = calibration.calibrate(learned_router, [i.prompt for i in items[:200]], large_rate=0.5)
    assert again["policy"] == "learned" and abs(again["large_rate_achieved"] - 0.5) <= 0.02
    with pytest.raises(EdgekitError, match="too few"):
        calibration.calibrate_learned(examples[:4])
    with pytest.raises(EdgekitError, match="large branch's logits"):
        calibration.routing_examples(small, None, items[:2])
