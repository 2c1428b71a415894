"""Runtime fast path (issue #6): the C extension against its NumPy reference, the sampled
distributions, the speculative acceptance rule, malformed input and the fallback."""

from __future__ import annotations

import array
import importlib
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

import edgekit.runtime
from edgekit.runtime import fastpath
from edgekit.runtime import sampling_ref as R

try:
    from edgekit.runtime import _fastpath as C
except ImportError:
    C = None

# CI builds the extension and sets EDGEKIT_REQUIRE_FASTPATH=1: a failed build then fails
# these tests instead of skipping them.
REQUIRE_C = os.environ.get("EDGEKIT_REQUIRE_FASTPATH") == "1"
needs_c = pytest.mark.skipif(
    C is None and not REQUIRE_C,
    reason="edgekit.runtime._fastpath is not built (`pip install -e .` with gcc builds it)",
)
# Behaviour tests run on both implementations; the C one is skipped when it is not built.
IMPLS = [pytest.param("ref", id="reference"), pytest.param("c", id="c", marks=needs_c)]


def impl(name):
    return R if name == "ref" else C


# --------------------------------------------------------------------------- chi-square


def chi2_sf(x: float, df: int) -> float:
    """Survival function of the chi-square distribution, integer df (closed forms)."""
    if df % 2 == 0:
        term = total = math.exp(-x / 2)
        for i in range(1, df // 2):
            term *= (x / 2) / i
            total += term
        return total
    total = math.erfc(math.sqrt(x / 2))
    term = math.sqrt(2 * x / math.pi) * math.exp(-x / 2)
    for i in range(1, (df - 1) // 2 + 1):
        total += term
        term *= x / (2 * i + 1)
    return total


def chi2_critical(df: int, alpha: float = 1e-4) -> float:
    lo, hi = 0.0, 1000.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if chi2_sf(mid, df) > alpha else (lo, mid)
    return hi


def assert_matches(tokens, probs, alpha=1e-4):
    probs = np.asarray(probs, dtype=np.float64)
    counts = np.bincount(np.asarray(tokens), minlength=probs.size).astype(np.float64)
    expected = counts.sum() * probs
    assert expected.min() >= 5, "too few expected counts for a chi-square test"
    stat = float(((counts - expected) ** 2 / expected).sum())
    crit = chi2_critical(probs.size - 1, alpha)
    assert stat < crit, f"chi-square {stat:.2f} >= {crit:.2f} (df {probs.size - 1}); counts {counts}, expected {expected}"


def test_chi2_helper_against_known_quantiles():
    assert chi2_critical(1, 0.05) == pytest.approx(3.841459, abs=1e-5)
    assert chi2_critical(4, 1e-4) == pytest.approx(23.512742, abs=1e-5)
    assert chi2_critical(5, 0.01) == pytest.approx(15.086272, abs=1e-5)


# --------------------------------------------------------------------------- parity


COMBOS = {
    "greedy": dict(temperature=0.0),
    "greedy+penalties": dict(temperature=0.0, repetition_penalty=1.5, frequency_penalty=0.3),
    "temperature": dict(temperature=0.7),
    "top-k": dict(top_k=5),
    "top-k+temperature": dict(top_k=40, temperature=1.3),
    "top-p": dict(top_p=0.8),
    "min-p": dict(min_p=0.05),
    "repetition": dict(repetition_penalty=1.3),
    "repetition<1": dict(repetition_penalty=0.7, top_k=10),
    "frequency": dict(frequency_penalty=0.6),
    "presence": dict(presence_penalty=1.2, top_p=0.9),
    "negative penalties": dict(frequency_penalty=-0.5, presence_penalty=-0.5, top_k=3),
    "top-k+top-p": dict(top_k=20, top_p=0.5),
    "top-p+min-p, whole history": dict(top_p=0.95, min_p=0.1, repetition_penalty=1.1, penalty_last_n=-1),
    "everything": dict(temperature=0.8, top_k=50, top_p=0.9, min_p=0.02, repetition_penalty=1.2,
                       frequency_penalty=0.2, presence_penalty=0.1, penalty_last_n=16),
}


def logits_for(kind: str, vocab: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "normal":
        return (rng.standard_normal(vocab) * 3).astype(np.float32)
    if kind == "ties":  # few distinct values: every tie-break rule is exercised
        return np.round(rng.standard_normal(vocab) * 1.5).astype(np.float32)
    x = (rng.standard_normal(vocab) * 2).astype(np.float32)  # "masked": 40 % of tokens at -inf
    x[rng.random(vocab) < 0.4] = -np.inf
    x[rng.integers(vocab)] = 1.0  # at least one live token
    return x


@needs_c
@pytest.mark.parametrize("vocab", [50, 1000, 49152])
@pytest.mark.parametrize("combo", list(COMBOS))
def test_sampling_parity_with_reference(combo, vocab):
    params = COMBOS[combo]
    for kind in ("normal", "ties", "masked"):
        rng = np.random.default_rng([vocab, len(combo), len(kind)])
        seed = int(rng.integers(2**63))
        c, ref = C.Sampler(vocab, seed=seed, **params), R.Sampler(vocab, seed=seed, **params)
        history = [int(t) for t in rng.integers(0, vocab, 24)]
        for step in range(6):
            logits = logits_for(kind, vocab, rng)
            got_c, got_ref = c.sample(logits, history), ref.sample(logits, history)
            assert got_c == got_ref, f"{combo} vocab {vocab} {kind} step {step}: C {got_c} != reference {got_ref}"
            assert logits[got_c] > -np.inf
            history.append(got_c)
        assert c.random() == ref.random()  # same number of draws taken


@needs_c
@pytest.mark.parametrize("seed", [0, 1, 12345, 2**64 - 1])
def test_rng_streams_match(seed):
    c, ref = C.Sampler(3, seed=seed), R.Sampler(3, seed=seed)
    assert [c.random() for _ in range(50)] == [ref.random() for _ in range(50)]
    c.reseed(7), ref.reseed(7)
    assert c.random() == ref.random()


def test_rng_published_vectors():
    """splitmix64 and xoshiro256** as published (Vigna's reference C code)."""
    state, out = 1234567, []
    for _ in range(3):
        state, z = R._splitmix64(state)
        out.append(z)
    assert out == [6457827717110365317, 3203168211198807973, 9817491932198370423]
    rng = R.Xoshiro256(0)
    rng.s = [1, 2, 3, 4]
    assert [rng.next_u64() for _ in range(4)] == [11520, 0, 1509978240, 1215971899390074240]


@needs_c
@pytest.mark.parametrize(
    "history",
    [
        pytest.param(lambda h: h, id="list"),
        pytest.param(lambda h: tuple(h), id="tuple"),
        pytest.param(lambda h: np.array(h, dtype=np.int64), id="int64"),
        pytest.param(lambda h: np.array(h, dtype=np.int32), id="int32"),
        pytest.param(lambda h: np.array(h, dtype=np.uint16), id="uint16"),
        pytest.param(lambda h: array.array("i", h), id="array-i"),
        pytest.param(lambda h: np.array(h, dtype=np.int64)[::-1][::-1].reshape(5, -1), id="2-d"),
        pytest.param(lambda h: np.array(h + h, dtype=np.int64)[::2], id="strided"),
    ],
)
def test_history_forms_agree(history):
    vocab, rng = 300, np.random.default_rng(5)
    base = [int(t) for t in rng.integers(0, vocab, 40)]
    params = dict(repetition_penalty=5.0, frequency_penalty=2.0, penalty_last_n=30, temperature=0.0)
    logits = rng.standard_normal(vocab).astype(np.float32)
    want = R.Sampler(vocab, **params).sample(logits, base)
    assert C.Sampler(vocab, **params).sample(logits, history(base)) == want
    assert R.Sampler(vocab, **params).sample(logits, history(base)) == want


@needs_c
@pytest.mark.parametrize("vocab", [50, 1000, 49152])
def test_confidence_parity(vocab):
    rng = np.random.default_rng(vocab)
    for kind in ("normal", "ties", "masked"):
        for _ in range(5):
            logits = logits_for(kind, vocab, rng)
            got, want = C.confidence(logits), R.confidence(logits)
            assert np.allclose(tuple(got), tuple(want), rtol=0, atol=1e-6), (kind, got, want)
            assert (got.max_prob, got.margin, got.entropy) == tuple(got)


@pytest.mark.parametrize("name", IMPLS)
def test_confidence_values(name):
    m = impl(name)
    logits = np.array([2.0, 1.0, 0.5, -np.inf, 2.0 - np.log(2)], dtype=np.float32)
    x = logits[np.isfinite(logits)].astype(np.float64)
    p = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    got = m.confidence(logits)
    assert got.max_prob == pytest.approx(p.max(), abs=1e-12)
    assert got.margin == pytest.approx(p.max() - np.sort(p)[-2], abs=1e-12)
    assert got.entropy == pytest.approx(-(p * np.log(p)).sum(), abs=1e-12)
    tie = m.confidence(np.array([1, 1, 0], dtype=np.float32))
    assert tie.margin == 0.0
    one = m.confidence(np.array([3.0, -np.inf], dtype=np.float32))
    assert tuple(one) == (1.0, 1.0, 0.0)
    uniform = m.confidence(np.zeros(1000, dtype=np.float32))
    assert uniform.entropy == pytest.approx(math.log(1000), abs=1e-12)


@needs_c
@pytest.mark.parametrize("n", [1, 2, 15, 16, 17, 33, 1000])
def test_confidence_top_two_anywhere(n):
    """The C kernel scans 16 logits at a time and the tail one by one: the top two, a tie for
    the top, and a bad value must be found at every position, in the body or the tail."""
    rng = np.random.default_rng(n)
    for top in sorted({0, n // 2, n - 1, max(n - 16, 0)}):
        for second in sorted({0, n - 1, (top + 1) % n, (top + 17) % n} - ({top} if n > 1 else set())):
            logits = rng.uniform(-4, 0, n).astype(np.float32)
            logits[top] = 5.0
            if n > 1:
                logits[second] = 4.0
            got, want = C.confidence(logits), R.confidence(logits)
            assert np.allclose(tuple(got), tuple(want), rtol=0, atol=1e-12), (top, second)
            if n > 1:
                logits[second] = 5.0  # a tie for the top: margin 0
                assert C.confidence(logits).margin == 0.0
        for bad in (np.nan, np.inf):
            logits = np.zeros(n, np.float32)
            logits[top] = bad
            with pytest.raises(ValueError, match=rf"logits\[{top}\] is "):
                C.confidence(logits)


@needs_c
@pytest.mark.parametrize("vocab", [5, 50, 1000])
def test_speculative_parity(vocab):
    rng = np.random.default_rng(vocab + 1)
    c, ref = C.Sampler(vocab, seed=99), R.Sampler(vocab, seed=99)
    for trial in range(200):
        p = rng.dirichlet(np.ones(vocab) * 0.5).astype(np.float32)
        q = rng.dirichlet(np.ones(vocab) * 0.5).astype(np.float32)
        if trial % 10 == 0:
            q = p.copy()  # p == q: always accepted
        q[q == 0] = 1e-12
        x = int(rng.choice(vocab, p=q / q.sum()))
        assert c.speculative_accept(p, q, x) == ref.speculative_accept(p, q, x), trial
    assert c.random() == ref.random()


# --------------------------------------------------------------------------- distributions


P_TARGET = np.array([0.05, 0.10, 0.20, 0.30, 0.35])
Q_DRAFT = np.array([0.30, 0.30, 0.20, 0.10, 0.10])


@pytest.mark.parametrize("name", IMPLS)
def test_speculative_acceptance_keeps_target_distribution(name):
    trials = 20000 if name == "c" else 4000
    rng = np.random.default_rng(2024)
    drafts = rng.choice(5, size=trials, p=Q_DRAFT)
    sampler = impl(name).Sampler(5, seed=7)
    p, q = P_TARGET.astype(np.float32), Q_DRAFT.astype(np.float32)
    results = [sampler.speculative_accept(p, q, int(x)) for x in drafts]
    assert_matches([t for _, t in results], P_TARGET)
    accept_rate = np.mean([a for a, _ in results])
    expected = np.minimum(P_TARGET, Q_DRAFT).sum()  # 0.55
    assert abs(accept_rate - expected) < 5 * math.sqrt(expected * (1 - expected) / trials)
    for accepted, token in results[:200]:
        assert accepted or P_TARGET[token] > Q_DRAFT[token]  # resamples only where p > q


@pytest.mark.parametrize("name", IMPLS)
def test_speculative_identical_distributions_always_accept(name):
    sampler = impl(name).Sampler(5, seed=3)
    p = P_TARGET.astype(np.float32)
    assert all(sampler.speculative_accept(p, p, x)[0] for x in range(5) for _ in range(20))


@pytest.mark.parametrize("name", IMPLS)
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampling_matches_softmax(name, temperature):
    logits = np.array([1.0, 0.5, 0.0, -0.5, 2.0, -1.0, 0.25], dtype=np.float32)
    z = logits.astype(np.float64) / temperature
    probs = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    n = 20000 if name == "c" else 5000
    sampler = impl(name).Sampler(logits.size, temperature=temperature, seed=11)
    assert_matches([sampler.sample(logits) for _ in range(n)], probs)


@pytest.mark.parametrize("name", IMPLS)
def test_filters_respect_their_sets(name):
    m, rng = impl(name), np.random.default_rng(8)
    logits = (rng.standard_normal(200) * 1.5).astype(np.float32)
    logits[[3, 17, 60]] = logits.max() + 0.5  # a three-way tie at the top
    order = sorted(range(200), key=lambda i: (-logits[i], i))
    x = logits.astype(np.float64)
    probs = np.exp(x - x.max()) / np.exp(x - x.max()).sum()

    def draws(n, **params):
        sampler = m.Sampler(200, **params)
        return {int(sampler.sample(logits)) for _ in range(n)}

    top_k = draws(1500, top_k=5, seed=1)
    assert top_k <= set(order[:5]) and len(top_k) == 5

    cum = np.cumsum(probs[order])
    nucleus = set(order[: int(np.argmax(cum >= 0.6)) + 1])
    top_p = draws(3000, top_p=0.6, seed=2)
    assert top_p <= nucleus and len(top_p) >= len(nucleus) - 2

    allowed = {i for i in range(200) if probs[i] >= 0.3 * probs.max()}
    min_p = draws(1500, min_p=0.3, seed=3)
    assert min_p <= allowed and min_p >= {3, 17, 60}

    greedy = m.Sampler(200, temperature=0)
    assert greedy.sample(logits) == 3  # lowest id among the tied maxima
    assert m.Sampler(200, top_k=1, seed=5).sample(logits) == 3


@pytest.mark.parametrize("name", IMPLS)
def test_penalties_and_masking(name):
    m = impl(name)
    logits = np.array([5.0, 4.9, -1.0, -np.inf, 0.0], dtype=np.float32)
    greedy = dict(temperature=0)
    assert m.Sampler(5, **greedy).sample(logits, [0]) == 0  # penalties off by default
    assert m.Sampler(5, repetition_penalty=1.1, **greedy).sample(logits, [0]) == 1  # 5/1.1 < 4.9
    assert m.Sampler(5, presence_penalty=0.2, **greedy).sample(logits, [0, 1]) == 0
    assert m.Sampler(5, frequency_penalty=0.2, **greedy).sample(logits, [0, 0, 1]) == 1  # 4.6 < 4.7
    assert m.Sampler(5, repetition_penalty=2.0, penalty_last_n=1, **greedy).sample(logits, [0, 1]) == 0
    assert m.Sampler(5, presence_penalty=-10, **greedy).sample(logits, [2, 3]) == 2  # -inf stays masked
    sampler = m.Sampler(5, seed=4)
    assert all(sampler.sample(logits) != 3 for _ in range(300))


# --------------------------------------------------------------------------- malformed input

LOGITS = np.linspace(-1, 1, 10, dtype=np.float32)


def with_value(i, value):
    x = LOGITS.copy()
    x[i] = value
    return x


@pytest.mark.parametrize("name", IMPLS)
@pytest.mark.parametrize(
    "logits, error, match",
    [
        (with_value(3, np.nan), ValueError, r"logits\[3\] is NaN"),
        (with_value(7, np.inf), ValueError, r"logits\[7\] is \+inf"),
        (np.full(10, -np.inf, dtype=np.float32), ValueError, "masked"),
        (LOGITS[:9], ValueError, "9 values but the sampler's vocab_size is 10"),
        (LOGITS.astype(np.float64), TypeError, "float32"),
        (LOGITS.astype(np.float16), TypeError, "float32"),
        (LOGITS.astype(np.int32), TypeError, "float32"),
        (LOGITS.tolist(), TypeError, "float32 buffer"),
        (np.linspace(-1, 1, 20, dtype=np.float32)[::2], ValueError, "C-contiguous"),
        (LOGITS.astype(">f4"), TypeError, "float32"),
    ],
)
def test_malformed_logits(name, logits, error, match):
    for params in (dict(), dict(temperature=0), dict(top_k=3), dict(top_p=0.5)):
        with pytest.raises(error, match=match):
            impl(name).Sampler(10, **params).sample(logits)


@pytest.mark.parametrize("name", IMPLS)
def test_other_buffers_accepted(name):
    m = impl(name)
    want = m.Sampler(10, temperature=0).sample(LOGITS)
    for buf in (array.array("f", LOGITS.tolist()), memoryview(LOGITS), LOGITS.reshape(2, 5), bytearray(LOGITS.tobytes())):
        if isinstance(buf, bytearray):
            with pytest.raises(TypeError, match="float32"):
                m.Sampler(10, temperature=0).sample(buf)
        else:
            assert m.Sampler(10, temperature=0).sample(buf) == want


@pytest.mark.parametrize("name", IMPLS)
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(temperature=-0.5), ValueError, "temperature"),
        (dict(temperature=1e-9), ValueError, "temperature must be 0"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(temperature="hot"), TypeError, "temperature"),
        (dict(top_p=0.0), ValueError, "top_p"),
        (dict(top_p=1.5), ValueError, "top_p"),
        (dict(min_p=-0.1), ValueError, "min_p"),
        (dict(min_p=2), ValueError, "min_p"),
        (dict(top_k=-1), ValueError, "top_k"),
        (dict(top_k=2.5), TypeError, "top_k"),
        (dict(top_k=2**40), ValueError, "top_k"),
        (dict(repetition_penalty=0), ValueError, "repetition_penalty"),
        (dict(frequency_penalty=float("inf")), ValueError, "frequency_penalty"),
        (dict(presence_penalty=1e9), ValueError, "presence_penalty"),
        (dict(penalty_last_n=-2), ValueError, "penalty_last_n"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(seed=2**64), ValueError, "seed"),
        (dict(seed=1.5), TypeError, "seed"),
        (dict(tempreature=1.0), TypeError, "tempreature"),
    ],
)
def test_bad_parameters(name, kwargs, error, match):
    with pytest.raises(error, match=match):
        impl(name).Sampler(10, **kwargs)


@pytest.mark.parametrize("name", IMPLS)
def test_bad_vocab_and_history(name):
    m = impl(name)
    for vocab, error in ((0, ValueError), (-5, ValueError), (2**31, ValueError), ("10", TypeError)):
        with pytest.raises(error, match="vocab_size"):
            m.Sampler(vocab)
    s = m.Sampler(10, repetition_penalty=1.2)
    with pytest.raises(ValueError, match=r"history\[2\] = 99 is outside the vocabulary \[0, 10\)"):
        s.sample(LOGITS, [1, 2, 99, 3])
    with pytest.raises(ValueError, match=r"history\[1\] = -1"):
        s.sample(LOGITS, np.array([1, -1], dtype=np.int32))
    with pytest.raises(TypeError, match="history"):
        s.sample(LOGITS, [1.0, 2.0])
    with pytest.raises(TypeError, match="history"):
        s.sample(LOGITS, 5)
    assert s.sample(LOGITS, [1, 2, 3]) in range(10)  # still usable after the errors
    m.Sampler(10).sample(LOGITS, [99, "not read: no penalty is active"])
    assert m.Sampler(10, repetition_penalty=1.2, penalty_last_n=2).sample(LOGITS, [99, 1, 2]) in range(10)


@pytest.mark.parametrize("name", IMPLS)
def test_bad_speculative_inputs(name):
    s = impl(name).Sampler(5)
    p, q = P_TARGET.astype(np.float32), Q_DRAFT.astype(np.float32)
    cases = [
        ((np.array([np.nan, 0.5, 0.2, 0.2, 0.2], np.float32), q, 0), ValueError, r"p\[0\] is nan"),
        ((np.array([0.5, -0.1, 0.2, 0.2, 0.2], np.float32), q, 0), ValueError, r"p\[1\] is negative"),
        ((p, np.array([0.5, np.nan, 0.2, 0.2, 0.2], np.float32), 0), ValueError, r"q\[1\]"),
        ((p, np.array([0.5, np.inf, 0.2, 0.2, 0.2], np.float32), 0), ValueError, r"q\[1\]"),
        ((p[:4], q, 0), ValueError, "vocab_size"),
        ((p, q.astype(np.float64), 0), TypeError, "float32"),
        ((p, q, 5), ValueError, "draft_token"),
        ((p, q, -1), ValueError, "draft_token"),
        ((p, np.array([0, 0.5, 0.5, 0, 0], np.float32), 0), ValueError, r"q\[0\] is 0"),
        ((np.zeros(5, np.float32), q, 0), ValueError, "p sums to 0"),
    ]
    for args, error, match in cases:
        with pytest.raises(error, match=match):
            s.speculative_accept(*args)


@pytest.mark.parametrize("name", IMPLS)
def test_bad_confidence_inputs(name):
    m = impl(name)
    with pytest.raises(ValueError, match=r"logits\[1\] is NaN"):
        m.confidence(np.array([0, np.nan], np.float32))
    with pytest.raises(ValueError, match="empty"):
        m.confidence(np.zeros(0, np.float32))
    with pytest.raises(ValueError, match="masked"):
        m.confidence(np.full(3, -np.inf, np.float32))
    with pytest.raises(TypeError, match="float32"):
        m.confidence(np.zeros(3))


# --------------------------------------------------------------------------- latency


@pytest.mark.parametrize("window", [1, 7, 1000, 1 << 20])
def test_latency_stats(window):
    rng = np.random.default_rng(window)
    ttft, tokens = rng.gamma(2.0, 0.05, 37), rng.lognormal(-4, 0.5, 1500)
    impls = [R] + ([C] if C is not None else [])
    summaries = []
    for m in impls:
        stats = m.LatencyStats(window=window)
        for t in ttft:
            stats.record_ttft(float(t))
        for t in tokens:
            stats.record_token(t)
        summaries.append(stats.summary())
        assert stats.quantile(0.25, series="ttft") == pytest.approx(np.quantile(ttft[-window:], 0.25), rel=1e-12)
        stats.reset()
        assert stats.summary()["token"] == dict(count=0, window=0, mean=None, p50=None, p90=None, p99=None)
        assert stats.quantile(0.5) is None
    ref = summaries[0]
    for got in summaries[1:]:
        assert got == ref  # C and reference agree exactly
    for series, data in (("ttft", ttft), ("token", tokens)):
        kept = data[-window:]
        assert ref[series]["count"] == data.size and ref[series]["window"] == kept.size
        assert ref[series]["mean"] == pytest.approx(data.mean(), rel=1e-12)
        for key, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
            assert ref[series][key] == pytest.approx(np.quantile(kept, q), rel=1e-12, abs=0)


@pytest.mark.parametrize("name", IMPLS)
def test_latency_bad_input(name):
    m = impl(name)
    stats = m.LatencyStats()
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="latency"):
            stats.record_token(bad)
    with pytest.raises(TypeError):
        stats.record_ttft("fast")
    with pytest.raises(ValueError, match="series"):
        stats.quantile(0.5, series="tokens")
    with pytest.raises(ValueError, match="q must be"):
        stats.quantile(1.5)
    with pytest.raises(ValueError, match="window"):
        m.LatencyStats(window=0)
    assert stats.summary()["token"]["count"] == 0


# --------------------------------------------------------------------------- API and fallback


@pytest.mark.parametrize("name", IMPLS)
def test_api_surface(name):
    m = impl(name)
    assert m.default_params() == R.default_params()
    s = m.Sampler(7, top_k=3, seed=5)
    assert s.vocab_size == 7 and s.params == {**R.default_params(), "top_k": 3, "seed": 5}


def test_extension_built_when_required():
    if not REQUIRE_C:
        pytest.skip("EDGEKIT_REQUIRE_FASTPATH is not set")
    assert C is not None, "edgekit.runtime._fastpath did not build or import; see the pip install log"


def test_public_module_uses_c_when_built():
    assert fastpath.BACKEND == ("c" if C is not None else "reference")
    assert fastpath.Sampler is (C.Sampler if C is not None else R.Sampler)


def test_fallback_warns_once(monkeypatch):
    monkeypatch.setitem(sys.modules, "edgekit.runtime._fastpath", None)  # the import now fails
    monkeypatch.delattr(edgekit.runtime, "_fastpath", raising=False)
    monkeypatch.delitem(sys.modules, "edgekit.runtime.fastpath")
    monkeypatch.setattr(edgekit.runtime, "fastpath", fastpath)  # restored afterwards
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallback = importlib.import_module("edgekit.runtime.fastpath")
        importlib.import_module("edgekit.runtime.fastpath")
        sampler = fallback.Sampler(10, top_k=3, seed=1)
        sampler.sample(LOGITS), sampler.sample(LOGITS), fallback.confidence(LOGITS)
        fallback.LatencyStats().record_token(0.01)
    ours = [w for w in caught if issubclass(w.category, fallback.FastpathUnavailableWarning)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert "not built" in str(ours[0].message) and "pip install -e ." in str(ours[0].message)
    assert fallback.BACKEND == "reference" and fallback.Sampler is R.Sampler
    assert fallback is not fastpath


def test_runtime_import_is_light():
    code = "import sys, edgekit.runtime; heavy = [m for m in ('numpy', 'torch') if m in sys.modules]; assert not heavy, heavy"
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- portable kernels


@needs_c
def test_portable_build_matches_the_reference(tmp_path):
    """Jetson (aarch64) runs the portable kernels, not the AVX2 ones picked here: build the
    module again with dispatch off and check it against the reference too."""
    import importlib.util
    import shutil
    import sysconfig

    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    source = os.path.join(os.path.dirname(edgekit.runtime.__file__), "_fastpath.c")
    built = tmp_path / ("_fastpath" + sysconfig.get_config_var("EXT_SUFFIX"))
    subprocess.run(["gcc", "-O3", "-std=c11", "-ffp-contract=off", "-fno-trapping-math", "-fPIC", "-shared", "-DEK_NO_DISPATCH",
                    f"-I{sysconfig.get_paths()['include']}", source, "-o", str(built)], check=True)
    spec = importlib.util.spec_from_file_location("_fastpath", built)
    portable = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(portable)
    assert portable.KERNEL == "baseline"
    rng = np.random.default_rng(5)
    for vocab in (17, 1000, 49152):
        history = [int(t) for t in rng.integers(0, vocab, 32)]
        for params in (dict(temperature=0.0), dict(temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.1),
                       dict(temperature=1.0, min_p=0.05)):
            c, r = portable.Sampler(vocab, seed=4, **params), R.Sampler(vocab, seed=4, **params)
            for _ in range(5):
                logits = (rng.standard_normal(vocab) * 2.5).astype(np.float32)
                assert c.sample(logits, history) == r.sample(logits, history), (vocab, params)
        logits = (rng.standard_normal(vocab) * 2.5).astype(np.float32)
        assert np.allclose(tuple(portable.confidence(logits)), tuple(R.confidence(logits)), rtol=0, atol=1e-12)
