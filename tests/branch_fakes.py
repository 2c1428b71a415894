"""Tiny deterministic fake branches for the router, speculative decoding and calibration
tests: no model, no backends.

The fake "language model" looks a logits row up in a fixed random table by the last two
tokens of the sequence (times a scale that may depend on the first tokens); the small model
is the large one plus noise, so speculative acceptance is partial.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np

V = 24
EOS = V - 1
ALPHABET = "abcdefghijklmnopqrstuvw$"  # token i <-> ALPHABET[i]; "$" is EOS


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
            with b.device or contextlib.nullcontext():  # a shared device: one forward pass at a time
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

    def __init__(self, name, model, *, fail_after=None, error=None, context_length=4096, delay=0.0, device=None):
        """``delay``: seconds per forward pass; ``device``: a lock the passes of every session
        take (an unbatched device: concurrent streams wait for each other)."""
        self.name, self.model, self.vocab_size, self.context_length = name, model, V, context_length
        self.delay, self.device = delay, device
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
