"""Router, speculative decoding and threshold calibration (edgekit.runtime.router /
speculative / calibration) on tiny deterministic fake branches: no model, no backends.

The fake "language model" looks a logits row up in a fixed random table by the last two
tokens of the sequence (times a scale that may depend on the first tokens); the small model
is the large one plus noise, so speculative acceptance is partial.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edgekit.errors import EdgekitError
from edgekit.runtime import calibration, router as R, speculative as S

V = 24
EOS = V - 1
ALPHABET = "abcdefghijklmnopqrstuvw$"  # token i <-> ALPHABET[i]; "$" is EOS
# chi2.isf(1e-4, df) (scipy), df = support size - 1
CHI2_CRIT = {1: 15.137, 2: 18.421, 3: 21.108, 4: 23.513, 5: 25.745, 6: 27.856, 7: 29.878, 8: 31.828}


class BranchUnavailable(Exception):
    """Stands in for edgekit.runtime.backends.BranchUnavailable (matched by name)."""


class Tok:
    eos_token_id = EOS

    def encode(self, text):
        return [ALPHABET.index(ch) for ch in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(ALPHABET[i] for i in ids if not (skip_special_tokens and i == EOS))

    def __call__(self, text, verbose=False):
        return {"input_ids": self.encode(text)}


class ByteTok:
    eos_token_id = None

    def __call__(self, text, verbose=False):
        return {"input_ids": list(text.encode("utf-8"))}

    def decode(self, ids, skip_special_tokens=False):
        return bytes(ids).decode("utf-8", errors="ignore")


def table(seed, scale=3.0):
    return np.random.default_rng(seed).normal(size=((V + 1) * V, V)) * scale


LARGE_TABLE = table(1234)
SMALL_TABLE = LARGE_TABLE + np.random.default_rng(99).normal(size=LARGE_TABLE.shape) * 1.2


class Model:
    """logits(tokens) = scale(tokens) * table[last two tokens]."""

    def __init__(self, tab, scale=None, eos_bias=-4.0):
        self.tab, self.scale, self.eos_bias = tab, scale, eos_bias

    def __call__(self, tokens):
        prev = tokens[-2] if len(tokens) > 1 else V
        row = self.tab[prev * V + tokens[-1]].copy()
        if self.scale is not None:
            row *= self.scale(tokens)
        row[EOS] += self.eos_bias  # EOS rare but possible
        return row


class Session:
    def __init__(self, branch):
        self.branch, self.tokens, self.vocab_size, self.closed = branch, [], V, False

    @property
    def length(self):
        return len(self.tokens)

    def feed(self, ids):
        b = self.branch
        assert len(ids) >= 1 and not self.closed
        b.feed_calls += 1
        if b.delay:
            time.sleep(b.delay)
        if b.fail_after is not None and b.feed_calls > b.fail_after:
            raise b.error
        rows = []
        for t in ids:
            assert 0 <= t < V
            self.tokens.append(int(t))
            rows.append(b.model(self.tokens))
        assert len(self.tokens) <= b.context_length
        return np.asarray(rows, dtype=np.float32)

    def rollback(self, n):
        assert 1 <= n <= len(self.tokens)
        del self.tokens[-n:]

    def close(self):
        self.closed = True


class Local:
    has_logits = True
    backend = "fake"

    def __init__(self, name, model, *, fail_after=None, error=None, context_length=4096, delay=0.0):
        self.name, self.model, self.vocab_size, self.context_length = name, model, V, context_length
        self.delay = delay
        self.tokenizer = Tok()
        self.fail_after, self.error = fail_after, error or BranchUnavailable(f"{name} is down")
        self.feed_calls = 0
        self.sessions = []

    def session(self):
        s = Session(self)
        self.sessions.append(s)
        return s


class Remote:
    has_logits = False

    def __init__(self, name="remote", *, error=None, block=None):
        self.name, self.error, self.block, self.calls = name, error, block, []

    def complete(self, prompt, *, max_new_tokens, temperature, stop=None):
        self.calls.append({"prompt": prompt, "max_new_tokens": max_new_tokens, "temperature": temperature})
        if self.block is not None:
            self.block.wait(10)
        if self.error is not None:
            raise self.error
        return {"text": "remote says hi", "finish_reason": "stop", "usage": {"completion_tokens": 3}}


def greedy(model, prompt, n, eos=None):
    tokens, out = list(prompt), []
    for _ in range(n):
        t = int(np.argmax(model(tokens).astype(np.float32)))
        if t == eos:
            break
        out.append(t)
        tokens.append(t)
    return out


def large():
    return Local("large", Model(LARGE_TABLE))


def small():
    return Local("small", Model(SMALL_TABLE))


PROMPTS = [[3], [5, 7], [1, 2, 3, 4], [10, 0, 22, 9, 9, 14], list(range(20))]


# --------------------------------------------------------------------------- speculative


def check_invariant(res, prompt):
    generated = 1  # the first token comes from the large prefill
    for r in res.rounds:
        assert 0 <= r.accepted <= r.drafted and r.emitted == r.accepted + 1
        generated = r.generated
        if r is not res.rounds[-1] or res.finish_reason == "length":
            assert r.large_length == len(prompt) + r.generated - 1, r
            assert r.small_length + r.small_backlog == r.large_length, r
    assert generated == len(res.tokens) or res.finish_reason == "eos"


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
def test_speculative_greedy_equals_large_greedy(k):
    rates = []
    for i, prompt in enumerate(PROMPTS):
        eos = EOS if i % 2 else None
        s, big = small(), large()
        seen = []
        res = S.speculative_generate(s, big, prompt, max_new_tokens=40, draft_tokens=k, eos_token_id=eos, on_token=seen.append)
        want = greedy(big.model, prompt, 40, eos)
        assert res.tokens == want and seen == want, (k, prompt)
        assert res.large_calls == big.feed_calls and res.small_calls == s.feed_calls
        assert big.feed_calls < len(res.tokens)
        assert res.drafted == sum(r.drafted for r in res.rounds) and res.accepted == sum(r.accepted for r in res.rounds)
        check_invariant(res, prompt)
        if res.finish_reason == "length":  # the caches hold exactly the context but the pending token
            assert big.sessions[0].tokens == (prompt + res.tokens)[:-1]
            assert s.sessions[0].tokens == big.sessions[0].tokens[: len(s.sessions[0].tokens)]
        assert all(sess.closed for sess in s.sessions + big.sessions)
        rates.append(res.acceptance_rate)
    assert any(0 < r < 1 for r in rates), rates


@pytest.mark.parametrize("threshold", [0.3, 0.6, 0.95])
def test_speculative_draft_min_confidence_ends_rounds_early_same_output(threshold):
    # The stop rule only looks at the small model's own probabilities, so greedy output stays
    # the large model's; rounds end early exactly where the draft was unsure.
    short_rounds = 0
    for i, prompt in enumerate(PROMPTS):
        eos = EOS if i % 2 else None
        s, big = small(), large()
        res = S.speculative_generate(s, big, prompt, max_new_tokens=40, draft_tokens=6, eos_token_id=eos,
                                     draft_min_confidence=threshold)
        assert res.tokens == greedy(big.model, prompt, 40, eos), (threshold, prompt)
        assert res.large_calls == big.feed_calls and res.small_calls == s.feed_calls
        check_invariant(res, prompt)
        budget_rounds = [r for r in res.rounds if r.generated + 6 < 40]  # not capped by max_new_tokens
        short_rounds += sum(r.drafted < 6 for r in budget_rounds)
        plain = S.speculative_generate(small(), large(), prompt, max_new_tokens=40, draft_tokens=6, eos_token_id=eos)
        assert res.drafted <= plain.drafted
    assert short_rounds > 0


def test_speculative_draft_min_confidence_keeps_sampled_distribution():
    s, big, p, q = context_free_pair()
    params = SAMPLING
    threshold = float(np.median(q[q > 0]))  # about half of the drafts end their round
    runs = [
        S.speculative_generate(s, big, [1, 2], max_new_tokens=4, draft_tokens=2, sampler_params=params, seed=seed,
                               draft_min_confidence=threshold)
        for seed in range(2500)
    ]
    first_round = [r.rounds[0].drafted for r in runs]
    assert 1 in first_round and 2 in first_round  # some rounds ended early, some did not
    for position in (1, 2, 3):
        stat, crit = chi2_ok(np.array([r.tokens[position] for r in runs]), p)
        assert stat < crit, (position, stat, crit)


def test_speculative_stops_at_eos():
    finishes = set()
    for k in (1, 3, 5):
        for prompt in PROMPTS:
            s = Local("small", Model(SMALL_TABLE, eos_bias=2.5))
            big = Local("large", Model(LARGE_TABLE, eos_bias=2.5))
            res = S.speculative_generate(s, big, prompt, max_new_tokens=60, draft_tokens=k, eos_token_id=EOS)
            assert res.tokens == greedy(big.model, prompt, 60, EOS) and EOS not in res.tokens
            assert len(res.confidences) == len(res.tokens) + (res.finish_reason == "eos")
            check_invariant(res, prompt)
            finishes.add((res.finish_reason, len(res.tokens) >= 3))
    assert ("eos", True) in finishes  # EOS decided inside a round, after some tokens


def test_speculative_rounds_and_limits():
    res = S.speculative_generate(small(), large(), [4, 5], max_new_tokens=1, draft_tokens=4)
    assert len(res.tokens) == 1 and res.rounds == [] and res.large_calls == 1
    res = S.speculative_generate(small(), large(), [4, 5], max_new_tokens=7, draft_tokens=4)
    assert len(res.tokens) == 7 and sum(r.drafted for r in res.rounds) <= 6
    # the context length caps the generation: caches hold at most prompt + new - 1 tokens
    s, big = Local("s", Model(SMALL_TABLE), context_length=10), Local("l", Model(LARGE_TABLE), context_length=10)
    res = S.speculative_generate(s, big, [1, 2, 3, 4], max_new_tokens=50, draft_tokens=3)
    assert len(res.tokens) == 7 and res.tokens == greedy(big.model, [1, 2, 3, 4], 7)


def test_sampling_probs_follow_sampler_filters():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=V).astype(np.float32) * 2
    params = {"temperature": 0.7, "top_k": 8, "top_p": 0.8, "min_p": 0.05}
    probs = S.sampling_probs(logits, params)
    assert probs.dtype == np.float32 and abs(float(probs.sum()) - 1) < 1e-6
    from edgekit.runtime import fastpath

    sampler = fastpath.Sampler(V, **params, seed=3)
    drawn = {sampler.sample(logits) for _ in range(2000)}
    assert drawn == set(np.flatnonzero(probs).tolist())
    one_hot = S.sampling_probs(logits, {"temperature": 0.0})
    assert one_hot[int(np.argmax(logits))] == 1 and one_hot.sum() == 1


def chi2_ok(tokens, probs):
    support = np.flatnonzero(probs)
    counts = np.bincount(tokens, minlength=V).astype(np.float64)
    assert counts[np.setdiff1d(np.arange(V), support)].sum() == 0, "a token outside the filtered support"
    expected = len(tokens) * probs[support].astype(np.float64) / probs[support].sum()
    assert expected.min() >= 5
    stat = float(((counts[support] - expected) ** 2 / expected).sum())
    return stat, CHI2_CRIT[support.size - 1]


SAMPLING = {"temperature": 0.9, "top_k": 7, "top_p": 0.95}


def context_free_pair():
    """Context-free models (every position an independent draw): a large one and a poor draft
    of it, with their filtered distributions p and q under SAMPLING."""
    rng = np.random.default_rng(7)
    big_row = rng.normal(size=V) * 1.5
    small_row = big_row + rng.normal(size=V) * 1.5
    big = Local("large", lambda tokens: big_row.copy())
    small_branch = Local("small", lambda tokens: small_row.copy())
    return (small_branch, big, S.sampling_probs(big_row.astype(np.float32), SAMPLING),
            S.sampling_probs(small_row.astype(np.float32), SAMPLING))


def test_speculative_sampling_keeps_large_distribution():
    s, big, p, q = context_free_pair()
    params = SAMPLING
    assert np.abs(p - q).sum() > 0.3  # the draft is a poor proposal: rejections happen
    runs = [
        S.speculative_generate(s, big, [1, 2], max_new_tokens=4, draft_tokens=2, sampler_params=params, seed=seed)
        for seed in range(2500)
    ]
    assert all(len(r.tokens) == 4 for r in runs)
    rate = np.mean([r.acceptance_rate for r in runs])
    assert 0.2 < rate < 0.9, rate
    for position in (1, 2, 3):  # 1, 2: accepted draft or resample; 3: bonus or resample
        stat, crit = chi2_ok(np.array([r.tokens[position] for r in runs]), p)
        assert stat < crit, (position, stat, crit)
    # a fixed seed reproduces the run
    again = S.speculative_generate(s, big, [1, 2], max_new_tokens=4, draft_tokens=2, sampler_params=params, seed=11)
    assert again.tokens == runs[11].tokens


def test_speculative_refuses_penalties_and_remote():
    with pytest.raises(EdgekitError, match="repetition_penalty"):
        S.speculative_generate(small(), large(), [1], max_new_tokens=4, sampler_params={"repetition_penalty": 1.2})
    with pytest.raises(EdgekitError, match="frequency_penalty"):
        R.Router(small(), large(), "speculative", sampler_params={"temperature": 0.7, "frequency_penalty": 0.5})
    with pytest.raises(EdgekitError, match="remote"):
        R.Router(small(), Remote(), "speculative")
    router = R.Router(small(), large(), "speculative")
    with pytest.raises(EdgekitError, match="presence_penalty"):
        router.generate("abc", sampler_params={"presence_penalty": 1.0})


# --------------------------------------------------------------------------- router


def test_small_only_large_only_and_speculative_policy():
    s, big = small(), large()
    r = R.Router(s, big, "small_only", max_new_tokens=12).generate("abc")
    assert r.branch == "small" and not r.fell_back and r.tokens == greedy(s.model, [0, 1, 2], 12, EOS)
    assert r.text == Tok().decode(r.tokens) and len(r.confidences) >= len(r.tokens) and r.prompt_tokens == 3
    assert big.feed_calls == 0 and r.ttft_s is not None and r.ttft_s >= 0
    r = R.Router(s, big, "large_only", max_new_tokens=12).generate([0, 1, 2])
    assert r.branch == "large" and r.answered_by == "large" and r.tokens == greedy(big.model, [0, 1, 2], 12, EOS)
    router = R.Router(small(), large(), "speculative", max_new_tokens=30, draft_tokens=3)
    r = router.generate("hello")
    assert r.branch == "speculative" and r.tokens == greedy(big.model, Tok().encode("hello"), 30, EOS)
    assert r.speculative["large_calls"] < len(r.tokens) and 0 <= r.acceptance_rate <= 1
    assert router.counts["speculative"] == 1 and router.latency_summary()["ttft"]["count"] == 1


def test_stream_pieces_add_up():
    router = R.Router(small(), large(), "large_only", max_new_tokens=10)
    events = list(router.stream("abc"))
    assert [e.kind for e in events[:-1]] == ["text"] * (len(events) - 1) and events[-1].kind == "done"
    assert "".join(e.text for e in events[:-1]) == events[-1].result.text


def confident_first(tokens):  # first prompt token even: peaked logits; odd: nearly flat
    return 2.0 if tokens[0] % 2 == 0 else 0.05


def cascade_pair():
    return Local("small", Model(SMALL_TABLE, confident_first, eos_bias=-50)), Local("large", Model(LARGE_TABLE, eos_bias=-50))


@pytest.mark.parametrize("check", ["incremental", "end"])
def test_cascade_escalates_only_when_unsure(check):
    s, big = cascade_pair()
    router = R.Router(s, big, "cascade", thresholds={"confidence": 0.3, "min_tokens": 4, "check": check}, max_new_tokens=16)
    sure = router.generate("ace")
    assert sure.branch == "small" and not sure.escalated and sure.score >= 0.3 and big.feed_calls == 0
    events = list(router.stream("bce"))
    unsure = events[-1].result
    assert unsure.branch == "large" and unsure.escalated and unsure.score < 0.3 and not unsure.fell_back
    assert unsure.tokens == greedy(big.model, Tok().encode("bce"), 16)
    assert len(unsure.small_confidences) == (4 if check == "incremental" else 16)
    kinds = [e.kind for e in events]
    assert kinds.count("reset") == 1 and "escalated" in events[kinds.index("reset")].reason
    after = "".join(e.text for e in events[kinds.index("reset") + 1 : -1])
    assert after == unsure.text
    assert router.counts == {"small": 1, "large": 1, "speculative": 0, "fell_back": 0, "escalated": 1}


def test_cascade_score_matches_monitor_rule():
    m = R.ConfidenceMonitor(0.5, quantile=0.0, min_tokens=3)
    assert [m.push(c) for c in (0.9, 0.4, 0.8)] == [False, False, True] and m.score == 0.4
    m = R.ConfidenceMonitor(0.5, quantile=0.5, min_tokens=3, check="end")
    assert [m.push(c) for c in (0.9, 0.4, 0.8)] == [False] * 3 and m.finish() is False and m.score == 0.8
    m = R.ConfidenceMonitor(0.5, min_tokens=8)
    m.push(0.1)
    assert m.finish() is True  # a short answer is still checked at its end


def test_input_complexity_routes_by_score():
    s, big = small(), large()
    easy = [3] + greedy(s.model, [3], 9)  # the small model's own continuation: low NLL
    hard, tokens = [3], [3]
    for _ in range(9):  # the small model's least likely tokens: high NLL
        hard.append(int(np.argmin(s.model(hard)[:EOS])))
    router = R.Router(s, big, "input_complexity", max_new_tokens=5)
    e, h = router.prompt_score(easy), router.prompt_score(hard)
    logits = np.stack([s.model(easy[: i + 1]) for i in range(len(easy))])
    manual = np.mean([np.log(np.exp(logits[i]).sum()) - logits[i][easy[i + 1]] for i in range(len(easy) - 1)])
    assert e == pytest.approx(manual) and e < h
    router.thresholds = R.Thresholds(complexity=(e + h) / 2)
    s.sessions.clear()
    r = router.generate(easy)
    assert r.branch == "small" and r.score == pytest.approx(e) and r.threshold == (e + h) / 2
    assert len(s.sessions) == 1 and s.sessions[0].tokens[: len(easy)] == easy  # one prefill, reused
    assert r.tokens == greedy(s.model, easy, 5, EOS)
    r = router.generate(hard)
    assert r.branch == "large" and r.score == pytest.approx(h) and ">" in r.reason
    # the large branch is down: the small answers from the prefill it scored with
    s.sessions.clear()
    router.large = Local("large", Model(LARGE_TABLE), fail_after=0)
    r = router.generate(hard)
    assert r.branch == "small" and r.fell_back and len(s.sessions) == 1 and r.tokens == greedy(s.model, hard, 5, EOS)
    weighted = R.complexity_score(logits, easy, length_weight=0.5)[0]
    assert weighted == pytest.approx(manual + 0.5 * np.log1p(len(easy)))
    assert R.complexity_score(logits[:1], easy[:1])[0] == 0.0


def test_fallbacks():
    # a failing local large branch: the small one answers
    down = Local("large", Model(LARGE_TABLE), fail_after=0)
    r = R.Router(small(), down, "large_only", max_new_tokens=5).generate("abc")
    assert r.branch == "small" and r.fell_back and "large is down" in r.reason
    assert [a["ok"] for a in r.attempts] == [False, True]
    # the large branch fails mid-answer after some text was streamed: reset, then the small answer
    half = Local("large", Model(LARGE_TABLE), fail_after=4)
    events = list(R.Router(small(), half, "large_only", max_new_tokens=10).stream("abc"))
    kinds = [e.kind for e in events]
    assert kinds.count("reset") == 1 and events[-1].result.fell_back and events[-1].result.branch == "small"
    assert "".join(e.text for e in events[kinds.index("reset") + 1 : -1]) == events[-1].result.text
    # escalated cascade whose large branch is down: the small answer resumes where it stopped
    s, _ = cascade_pair()
    down = Local("large", Model(LARGE_TABLE), fail_after=0)
    router = R.Router(s, down, "cascade", thresholds={"confidence": 0.3, "min_tokens": 4}, max_new_tokens=16)
    r = router.generate("bce")
    assert r.branch == "small" and r.fell_back and r.escalated is False and "escalated" in r.reason
    assert r.tokens == greedy(s.model, Tok().encode("bce"), 16, EOS) and len(s.sessions) == 1
    # speculative with a failing large branch: the small one answers alone
    r = R.Router(small(), Local("large", Model(LARGE_TABLE), fail_after=1), "speculative", max_new_tokens=8).generate("abc")
    assert r.branch == "small" and r.fell_back and r.tokens == greedy(small().model, [0, 1, 2], 8, EOS)
    # a local branch past the timeout (checked between forward passes) is unavailable too
    slow = Local("large", Model(LARGE_TABLE), delay=0.03)
    r = R.Router(small(), slow, "large_only", max_new_tokens=50, timeout_s=0.1).generate("abc")
    assert r.branch == "small" and r.fell_back and "timed out after 0.1 s" in r.reason and slow.feed_calls < 10
    # a local exception that is not "unavailable" is a bug: it propagates
    buggy = Local("large", Model(LARGE_TABLE), fail_after=0, error=ValueError("shape bug"))
    with pytest.raises(ValueError, match="shape bug"):
        R.Router(small(), buggy, "large_only").generate("abc")
    # both down
    with pytest.raises(EdgekitError, match="both branches"):
        R.Router(Local("small", Model(SMALL_TABLE), fail_after=0), down, "small_only").generate("abc")


def test_remote_large_branch():
    remote = Remote()
    s = small()
    r = R.Router(s, remote, "large_only", max_new_tokens=7).generate([0, 1, 2])
    assert r.branch == "large" and r.text == "remote says hi" and r.tokens == [] and r.answered_by == "remote"
    assert remote.calls[-1] == {"prompt": "abc", "max_new_tokens": 7, "temperature": 0.0}
    router = R.Router(s, remote, "input_complexity", thresholds={"complexity": -1.0})
    assert router.generate("abcd").branch == "large"
    sc, _ = cascade_pair()
    r = R.Router(sc, remote, "cascade", thresholds={"confidence": 0.3, "min_tokens": 4}).generate("bce")
    assert r.branch == "large" and r.escalated and r.text == "remote says hi"
    # an endpoint that errors, and one that hangs past the router's timeout
    r = R.Router(small(), Remote(error=ConnectionRefusedError("refused")), "large_only", max_new_tokens=4).generate("abc")
    assert r.branch == "small" and r.fell_back and "refused" in r.reason
    r = R.Router(small(), Remote(error=BranchUnavailable("HTTP 503")), "large_only", max_new_tokens=4).generate("abc")
    assert r.fell_back and "HTTP 503" in r.reason
    gate = threading.Event()
    try:
        start = time.perf_counter()
        r = R.Router(small(), Remote(block=gate), "large_only", max_new_tokens=4, timeout_s=0.2).generate("abc")
        assert time.perf_counter() - start < 3
        assert r.branch == "small" and r.fell_back and "no answer within 0.2 s" in r.reason
    finally:
        gate.set()
    for policy in ("cascade", "input_complexity"):
        with pytest.raises(EdgekitError, match="logits"):
            R.Router(Remote(), large(), policy)


def test_bad_configuration():
    with pytest.raises(EdgekitError, match="unknown routing policy"):
        R.Router(small(), large(), "random")
    with pytest.raises(EdgekitError, match="unknown threshold"):
        R.Router(small(), large(), "cascade", thresholds={"confidnce": 0.1})
    with pytest.raises(EdgekitError, match="check"):
        R.Router(small(), large(), "cascade", thresholds={"check": "sometimes"})
    with pytest.raises(EdgekitError, match="top_p"):
        R.Router(small(), large(), "cascade", sampler_params={"top_p": 2.0})
    with pytest.raises(EdgekitError, match="empty"):
        R.Router(small(), large(), "small_only").generate("")
    with pytest.raises(EdgekitError, match="draft_min_confidence"):
        R.Router(small(), large(), "speculative", draft_min_confidence=1.0)


# --------------------------------------------------------------------------- calibration


def test_quantile_threshold_ties_are_deterministic():
    assert calibration.quantile_threshold([1, 1, 1, 2, 2, 3], 0.5) == (1.5, 3)
    assert calibration.quantile_threshold([1, 1, 1, 1, 2], 0.5) == (1.5, 1)  # 1 is closer to 2.5 than 5
    assert calibration.quantile_threshold([3, 1, 2], 0.0) == (3.0, 0)
    assert calibration.quantile_threshold([3, 1, 2], 1.0) == (0.0, 3)


def random_prompts(n, seed, model):
    """Prompts from the small model sampled at various temperatures: a spread of NLLs."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tokens = [int(rng.integers(0, EOS))]
        temp = rng.uniform(0.3, 3.0)
        for _ in range(int(rng.integers(3, 12))):
            p = np.exp((model(tokens)[:EOS] - model(tokens)[:EOS].max()) / temp)
            tokens.append(int(rng.choice(EOS, p=p / p.sum())))
        out.append(tokens)
    return out


def test_calibration_hits_target_rate_on_unseen_prompts():
    s, big = small(), large()
    prompts = random_prompts(2000, 0, s.model)
    cal_prompts, eval_prompts = prompts[:1000], prompts[1000:]
    router = R.Router(s, big, "input_complexity", max_new_tokens=1)
    cal = calibration.calibrate(router, cal_prompts, large_rate=0.3)
    assert cal["policy"] == "input_complexity" and cal["n_prompts"] == 1000 and len(cal["scores"]) == 1000
    assert abs(cal["large_rate_achieved"] - 0.3) < 0.01
    calibration.apply_calibration(router, cal)
    assert router.thresholds.complexity == cal["threshold"]
    rate = calibration.measured_large_rate(router, eval_prompts)
    assert abs(rate - 0.3) <= 0.05, rate


def test_cascade_calibration_hits_target_rate_on_unseen_prompts():
    def scale(tokens):  # confidence varies with the first three prompt tokens
        h = (tokens[0] * 7919 + tokens[min(1, len(tokens) - 1)] * 104729 + tokens[min(2, len(tokens) - 1)] * 1299709) % 1000
        return 0.1 + 1.5 * h / 1000

    s = Local("small", Model(SMALL_TABLE, scale, eos_bias=-50))
    big = Local("large", Model(LARGE_TABLE, eos_bias=-50))
    rng = np.random.default_rng(3)
    prompts = [[int(t) for t in rng.integers(0, EOS, size=int(rng.integers(3, 8)))] for _ in range(1200)]
    router = R.Router(s, big, "cascade", thresholds={"min_tokens": 4}, max_new_tokens=10)
    cal = calibration.calibrate(router, prompts[:600], large_rate=0.3)
    assert cal["rule"] == "escalate when score < threshold" and abs(cal["large_rate_achieved"] - 0.3) < 0.01
    assert sum(sc < cal["threshold"] for sc in cal["scores"]) == round(cal["large_rate_achieved"] * 600)
    calibration.apply_calibration(router, cal)
    rate = calibration.measured_large_rate(router, prompts[600:])
    assert abs(rate - 0.3) <= 0.05, rate
    with pytest.raises(EdgekitError, match="no threshold"):
        calibration.calibrate(router, prompts[:5], policy="speculative")


def test_held_out_prompts_come_from_the_held_out_halves():
    from conftest import python_docs_text

    tok = ByteTok()
    ids = tok(python_docs_text())["input_ids"]
    tail = ids[-8192:]
    first, second = tok.decode(tail[:4096]), tok.decode(tail[4096:])
    cal = calibration.held_out_prompts(tok, n=40, min_tokens=16, max_tokens=64, split="calibration")
    ev = calibration.held_out_prompts(tok, n=40, min_tokens=16, max_tokens=64, split="evaluation")
    assert len(cal) == len(ev) == 40 and not set(cal) & set(ev)
    assert all(p in first for p in cal) and all(p in second for p in ev)
    assert all(10 <= len(p.encode()) <= 64 for p in cal + ev)
    assert cal == calibration.held_out_prompts(tok, n=40, min_tokens=16, max_tokens=64)
    with pytest.raises(EdgekitError, match="max_tokens"):
        calibration.held_out_prompts(tok, n=4, max_tokens=5000, eval_tokens=8192)
