"""Speculative decoding (edgekit.runtime.speculative) on the fake branches of branch_fakes:
greedy output equals the large model's, sampled output keeps its distribution."""

from __future__ import annotations

import numpy as np
import pytest
from branch_fakes import EOS, greedy, large, LARGE_TABLE, Local, Model, PROMPTS, Remote, small, SMALL_TABLE, V

from edgekit.errors import EdgekitError
from edgekit.runtime import router as R, speculative as S

# chi2.isf(1e-4, df) (scipy), df = support size - 1
CHI2_CRIT = {1: 15.137, 2: 18.421, 3: 21.108, 4: 23.513, 5: 25.745, 6: 27.856, 7: 29.878, 8: 31.828}


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
