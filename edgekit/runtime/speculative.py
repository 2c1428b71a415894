"""Speculative decoding: a small draft branch proposes, a large branch verifies.

    from edgekit.runtime.speculative import speculative_generate

    result = speculative_generate(small, large, prompt_ids, max_new_tokens=128,
                                  draft_tokens=4, sampler_params={"temperature": 0.7, "top_p": 0.9})
    result.tokens, result.acceptance_rate, result.large_calls

The algorithm of Leviathan et al. 2023 / Chen et al. 2023. ``small`` and ``large`` are local
branches with logits (``has_logits``), sharing one tokenizer; each ``session()`` is a KV
cache that ``feed``s tokens (one forward pass, one logits row per token) and ``rollback``s.

Cache convention
----------------
Let ``context`` be prompt + generated tokens. Between rounds the last generated token is
*pending*: decided but not fed to either model yet. So after every round

    large.length == len(prompt) + len(generated) - 1
    small.length + len(small_backlog) == large.length

where ``small_backlog`` holds tokens of ``context[:-1]`` the small cache has not seen: the
last draft after a fully accepted round (the small never feeds its own last draft) and
the pending token of a round without drafts. Every :class:`Round` in ``result.rounds``
records these lengths, so the invariant can be checked.

Prefill: both branches ``feed(prompt)``; the first generated token comes from the large
model's last prefill row (exactly what large-only decoding would produce) and becomes
pending. One round then:

1. Draft: the small model feeds ``backlog + [pending]`` (one call; its last row is the
   distribution ``q1`` of draft ``d1``), then ``[d1]``, ... ``[d(k-1)]``: k calls, k
   distributions ``q1..qk`` and drafts ``d1..dk`` (each drawn from its ``q``).
2. Verify: the large model feeds ``[pending, d1, ..., dk]`` in ONE call: k+1 rows. Row 0
   follows ``pending``, so it is the large distribution ``p1`` for ``d1``; row i is ``p(i+1)``
   for ``d(i+1)``; row k follows ``dk`` and is the bonus distribution.
3. Accept ``d1, d2, ...`` in order with ``Sampler.speculative_accept(p_i, q_i, d_i)``
   (accept with probability min(1, p/q), else resample from normalized max(0, p - q)); at
   the first rejection keep the resampled token and stop. Greedy (temperature 0) accepts
   iff ``d_i`` is the large argmax and otherwise takes the large argmax, so the output is
   large-only greedy decoding, token for token. If all k are accepted, add a bonus token
   drawn from row k.
4. Roll back past the first rejection: with ``a`` drafts accepted (``a < k``), the large
   cache drops ``k - a`` tokens (the rejected draft and everything after it) and the small
   one ``k - 1 - a``. On full acceptance nothing is dropped and ``dk`` joins the backlog.

Each round emits 1..k+1 tokens for one large call; ``k`` shrinks near ``max_new_tokens``
so no forward pass is wasted on tokens that would be cut. With ``draft_min_confidence`` > 0
a round also ends early after a draft the small model itself doubts (greedy: its max
probability; sampling: ``q_i(d_i)``) is below it: such a draft is likely rejected, and every
draft after it is then wasted. The rule looks only at the small model's own distributions,
so the drafts stay draws from ``q`` and the output is unchanged (greedy: token for token;
sampling: in distribution); only the number of drafts per large call adapts. Sampling uses one
:class:`~edgekit.runtime.fastpath.Sampler` RNG stream (``seed``), so a seed reproduces a
run. ``p`` and ``q`` are the *filtered* distributions the sampler would draw from
(:func:`sampling_probs`: temperature -> top-k -> softmax -> top-p -> min-p ->
renormalize), so the output follows the large model's filtered distribution exactly.
Repetition / frequency / presence penalties depend on the history, which differs between
a draft and its verification, so they are refused (:func:`speculative_params`).

The vocabularies must be the same; when the two ``vocab_size`` differ (models of one
family padded to different multiples), both logit vectors are cut to the smaller size,
since ids past the tokenizer's vocabulary are padding that never holds a real token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Sequence

from edgekit.errors import EdgekitError
from edgekit.runtime.config import SpeculativeSettings, checked

PENALTIES = ("repetition_penalty", "frequency_penalty", "presence_penalty")


@dataclass(frozen=True)
class Round:
    """One draft/verify round; lengths are measured after its rollbacks."""

    drafted: int
    accepted: int
    emitted: int
    large_length: int
    small_length: int
    small_backlog: int
    generated: int  # tokens generated so far, this round's included


@dataclass
class SpeculativeResult:
    tokens: list[int]  # generated ids (EOS excluded)
    accepted: int  # drafts accepted
    drafted: int  # drafts verified
    large_calls: int  # large `feed` calls, prefill included
    small_calls: int  # small `feed` calls, prefill included
    acceptance_rate: float  # accepted / drafted (0.0 when nothing was drafted)
    finish_reason: str  # "eos" | "length" | "stop" (the caller stopped it)
    confidences: list[float] = field(default_factory=list)  # large max_prob per token
    rounds: list[Round] = field(default_factory=list)
    ttft_s: float | None = None  # prefill + first token
    elapsed_s: float = 0.0

    @property
    def tokens_per_large_call(self) -> float:
        """Generated tokens per large forward pass (1.0 = no speed-up), prefill excluded."""
        calls = self.large_calls - 1
        return len(self.tokens) / calls if calls > 0 else float(len(self.tokens))


def speculative_params(sampler_params: dict | None) -> dict:
    """Validated sampler parameters for speculative decoding (None = greedy).

    Raises EdgekitError for penalties (history-dependent: the draft and the verifier would
    see different histories) and for malformed values."""
    from edgekit.runtime import sampling_ref

    params = dict(sampler_params or {"temperature": 0.0})
    params.pop("penalty_last_n", None)  # harmless: no penalty is active
    neutral = {"repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0}
    # a non-number is left to check_params, which names the type problem
    active = [n for n in PENALTIES if isinstance(params.get(n), (int, float)) and params[n] != neutral[n]]
    if active:
        raise EdgekitError(
            f"speculative decoding does not support {', '.join(active)}",
            where="sampler_params",
            how="drop the penalties, or use the cascade / input_complexity / large_only policy",
        )
    try:
        return sampling_ref.check_params(params)
    except (TypeError, ValueError) as exc:
        raise EdgekitError(f"invalid sampler parameters: {exc}", where="sampler_params", how="fix the value") from None


def sampling_probs(logits, params: dict):
    """The probability vector (float32, full vocabulary) a ``Sampler`` with ``params``
    draws from: temperature -> top-k -> softmax -> top-p -> min-p -> renormalize, exactly
    as ``sampling_ref`` documents (ties to the lowest id, sums in ascending id order).
    Temperature 0 gives the one-hot vector of the argmax. Penalties are not applied."""
    import numpy as np

    from edgekit.runtime.sampling_ref import EXP_FLUSH

    x = np.asarray(logits, dtype=np.float64).reshape(-1)
    out = np.zeros(x.size, dtype=np.float64)
    if params.get("temperature", 1.0) == 0.0:
        out[int(np.argmax(x))] = 1.0
        return out.astype(np.float32)
    v = x * (1.0 / params.get("temperature", 1.0))
    ids = np.flatnonzero(v > -np.inf)
    if ids.size == 0:
        raise ValueError("every token is masked (all logits are -inf)")
    vs = v[ids]
    k = params.get("top_k", 0)
    if 0 < k < ids.size:
        kth = np.partition(vs, ids.size - k)[ids.size - k]
        sel = vs > kth
        sel[np.flatnonzero(vs == kth)[: k - int(sel.sum())]] = True
        ids, vs = ids[sel], vs[sel]
    d = vs - vs.max()
    w = np.exp(d)
    w[d < EXP_FLUSH] = 0.0
    keep = np.ones(ids.size, dtype=bool)
    top_p = params.get("top_p", 1.0)
    if top_p < 1.0:
        order = np.lexsort((ids, -vs))
        reached = np.cumsum(w[order]) >= top_p * np.cumsum(w)[-1]
        n_keep = int(np.argmax(reached)) + 1 if reached.any() else ids.size
        keep[:] = False
        keep[order[:n_keep]] = True
    if params.get("min_p", 0.0) > 0.0:
        keep &= w >= params["min_p"]
    ids, w = ids[keep], w[keep]
    out[ids] = w / np.cumsum(w)[-1]
    return out.astype(np.float32)


def _draw(probs, u: float) -> int:
    """Inverse-CDF draw in ascending id order (sampling_ref's step 8)."""
    import numpy as np

    cw = np.cumsum(probs, dtype=np.float64)
    j = int(np.searchsorted(cw, u * cw[-1], side="right"))
    if j >= probs.size:  # u * total rounded up to total: the last positive weight
        j = int(np.flatnonzero(probs > 0)[-1])
    return j


def iter_speculative(
    small: Any,
    large: Any,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    draft_tokens: int = 4,
    sampler_params: dict | None = None,
    seed: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    draft_min_confidence: float = 0.0,
) -> Generator[int, None, SpeculativeResult]:
    """Yield generated token ids as they are decided; return the :class:`SpeculativeResult`
    (``StopIteration.value``). Closing the generator closes both sessions. ``send(True)`` in
    place of ``next()`` ends the generation after the token just yielded (finish_reason
    ``"stop"``: the caller found a stop sequence), with the statistics so far."""
    import numpy as np

    from edgekit.runtime import fastpath

    params = speculative_params(sampler_params)
    greedy = params["temperature"] == 0.0
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise EdgekitError("the prompt is empty", where="prompt", how="give at least one token")
    settings = checked(SpeculativeSettings, "speculative", max_new_tokens=max_new_tokens, draft_tokens=draft_tokens,
                       draft_min_confidence=draft_min_confidence)
    max_new_tokens, draft_tokens = settings.max_new_tokens, settings.draft_tokens
    draft_min_confidence = settings.draft_min_confidence
    eos = set() if eos_token_id is None else {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(t) for t in eos_token_id}
    vocab = min(int(small.vocab_size), int(large.vocab_size))
    # The caches hold at most prompt + max_new_tokens - 1 tokens (the last one is never fed).
    room = min(int(getattr(b, "context_length", 0) or 1 << 62) for b in (small, large)) - len(prompt) + 1
    if room < 1:
        raise EdgekitError(
            f"the prompt has {len(prompt)} tokens, more than the context length allows",
            where="prompt",
            how="shorten the prompt",
        )
    budget = min(max_new_tokens, room)
    # one RNG stream for drafts, acceptance tests and bonus draws: a seed reproduces a run
    seed = int((sampler_params or {}).get("seed", seed))
    sampler = fastpath.Sampler(vocab, temperature=params["temperature"] or 1.0, seed=seed)

    def probs(row):
        return sampling_probs(row[:vocab], params)

    def pick(row) -> int:  # a large-model token from one row (first token, bonus)
        return int(np.argmax(row[:vocab])) if greedy else _draw(probs(row), sampler.random())

    def conf(row) -> float:
        return fastpath.confidence(np.ascontiguousarray(row[:vocab], dtype=np.float32)).max_prob

    start = time.perf_counter()
    s_sess = large_sess = None
    tokens: list[int] = []
    confidences: list[float] = []
    rounds: list[Round] = []
    n_acc = n_draft = 0
    calls = {"small": 0, "large": 0}
    finish = "length"
    ttft = None
    try:
        s_sess = small.session()
        large_sess = large.session()
        large_rows = large_sess.feed(prompt)
        calls["large"] += 1
        s_sess.feed(prompt)  # only to cache the prompt: the first token is the large model's
        calls["small"] += 1
        first = pick(large_rows[-1])
        ttft = time.perf_counter() - start
        confidences.append(conf(large_rows[-1]))
        if first in eos:
            finish = "eos"
            budget = 0
        else:
            tokens.append(first)
            if (yield first):
                finish = "stop"
                budget = 0
        pending, backlog = first, []
        while len(tokens) < budget:
            k = min(draft_tokens, budget - len(tokens) - 1)
            drafts: list[int] = []
            qs = []
            feed = backlog + [pending]
            for _ in range(k):
                row = s_sess.feed(feed)[-1]
                calls["small"] += 1
                if greedy:
                    d = int(np.argmax(row[:vocab]))
                else:
                    q = probs(row)
                    d = _draw(q, sampler.random())
                    qs.append(q)
                drafts.append(d)
                feed = [d]
                # A draft the small model itself doubts is likely rejected, and so is every
                # draft after it: stop the round there and let the large model verify.
                if draft_min_confidence and len(drafts) < k:
                    confidence = conf(row) if greedy else float(qs[-1][d])
                    if confidence < draft_min_confidence:
                        break
            k = len(drafts)
            # k == 0: the small was fed nothing this round, so the pending token joins its backlog
            backlog = [] if k else backlog + [pending]
            rows = large_sess.feed([pending] + drafts)
            calls["large"] += 1
            emitted: list[int] = []
            accepted = 0
            for i, d in enumerate(drafts):
                if greedy:
                    best = int(np.argmax(rows[i][:vocab]))
                    ok, token = best == d, best
                else:
                    ok, token = sampler.speculative_accept(probs(rows[i]), qs[i], d)
                emitted.append(int(token))
                confidences.append(conf(rows[i]))
                if not ok:
                    break
                accepted += 1
            if accepted == k:
                emitted.append(pick(rows[k]))
                confidences.append(conf(rows[k]))
            n_draft += k
            n_acc += accepted
            if accepted < k:
                large_sess.rollback(k - accepted)
                if k - 1 - accepted:
                    s_sess.rollback(k - 1 - accepted)
            elif k:
                backlog = [drafts[-1]]
            for token in emitted:
                if token in eos:
                    finish = "eos"
                    break
                tokens.append(token)
                if (yield token):
                    finish = "stop"
                    break
            # drop the confidences of tokens cut by EOS or a stop (the EOS decision itself is kept)
            del confidences[len(tokens) + (finish == "eos") :]
            rounds.append(Round(k, accepted, len(emitted), large_sess.length, s_sess.length, len(backlog), len(tokens)))
            if finish != "length":
                break
            pending = emitted[-1]
    finally:
        for sess in (s_sess, large_sess):
            if sess is not None:
                sess.close()
    return SpeculativeResult(
        tokens=tokens,
        accepted=n_acc,
        drafted=n_draft,
        large_calls=calls["large"],
        small_calls=calls["small"],
        acceptance_rate=n_acc / n_draft if n_draft else 0.0,
        finish_reason=finish,
        confidences=confidences,
        rounds=rounds,
        ttft_s=ttft,
        elapsed_s=time.perf_counter() - start,
    )


def speculative_generate(
    small: Any,
    large: Any,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    draft_tokens: int = 4,
    sampler_params: dict | None = None,
    seed: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    on_token: Callable[[int], None] | None = None,
    draft_min_confidence: float = 0.0,
) -> SpeculativeResult:
    """Generate up to ``max_new_tokens`` tokens after ``prompt_ids`` (see the module
    docstring); ``sampler_params`` None is greedy. The RNG is seeded with
    ``sampler_params["seed"]`` when given, else ``seed``. ``on_token(id)`` is called for
    every token as soon as it is decided. EOS ends generation and is not in ``tokens``."""
    gen = iter_speculative(
        small,
        large,
        prompt_ids,
        max_new_tokens=max_new_tokens,
        draft_tokens=draft_tokens,
        sampler_params=sampler_params,
        seed=seed,
        eos_token_id=eos_token_id,
        draft_min_confidence=draft_min_confidence,
    )
    while True:
        try:
            token = next(gen)
        except StopIteration as stop:
            return stop.value
        if on_token is not None:
            on_token(token)


__all__ = [
    "Round",
    "SpeculativeResult",
    "iter_speculative",
    "sampling_probs",
    "speculative_generate",
    "speculative_params",
]
