"""Python/NumPy reference of the runtime fast path (``edgekit.runtime._fastpath``).

This module *is* the specification: the C extension implements exactly the algorithm
below, step for step, so that the same seed gives the same token in C and here. It is
also the fallback that ``edgekit.runtime.fastpath`` uses when the extension is not built.

Sampling one token: ``Sampler(vocab_size, **params).sample(logits, history)``
---------------------------------------------------------------------------
``logits`` is a C-contiguous float32 buffer of exactly ``vocab_size`` values (a numpy
array of any shape, ``array.array('f')``, a memoryview). NaN and +inf are errors; -inf
marks a masked token, which is never returned. ``history`` holds the token ids seen so
far (prompt + generated, oldest first); it is read only when a penalty is active
(``repetition_penalty != 1``, ``frequency_penalty != 0`` or ``presence_penalty != 0``,
and ``penalty_last_n != 0``), and then only its last ``penalty_last_n`` entries (all of
it for -1), which must lie in ``[0, vocab_size)``.

All arithmetic is IEEE double; float32 logits convert exactly. With ``c_t`` the count of
token ``t`` in that history window:

1. Penalties, for each token with ``c_t > 0``, in this order:
   repetition (CTRL): ``x_t = x_t / rp if x_t > 0 else x_t * rp``;
   frequency/presence (OpenAI): ``x_t = x_t - (frequency * c_t + presence)``.
2. Temperature: ``temperature == 0`` is greedy: the token with the largest penalized
   logit (lowest id on ties) is returned, the RNG is not touched and the steps below do
   not run. Otherwise ``v = x * (1.0 / temperature)`` (the inverse is computed once).
3. Candidates are the finite tokens (``v > -inf``); none left is an error. *Rank order*
   is ``v`` descending, then token id ascending. Top-k (``top_k > 0``) keeps the first
   ``top_k`` tokens in rank order (all of them when there are fewer).
4. Softmax over the kept set S: ``m = max v``, ``w_t = exp(v_t - m)`` (0 when
   ``v_t - m < -708``, just above exp's underflow), ``Z = sum(w)`` over S in ascending id
   order, one term after the other (``np.cumsum``, not numpy's pairwise ``sum``).
5. Top-p (``top_p < 1``): walk S in rank order summing ``w``; keep the shortest prefix
   whose running sum is ``>= top_p * Z`` (all of S if rounding never gets there).
6. Min-p (``min_p > 0``): of those, keep the tokens with ``w_t >= min_p``. The top
   token has ``w == 1`` exactly, so this is ``p_t >= min_p * p_max``.
7. Renormalize: ``Z' = sum(w)`` over the kept tokens in ascending id order.
8. Draw: ``u`` = the RNG's next double in [0, 1); walk the kept tokens in ascending id
   order summing ``w``; return the first token whose running sum is ``> u * Z'`` (the
   last kept token with ``w > 0`` if rounding leaves none).

Every non-greedy step takes exactly one RNG draw. Ties are broken by the lowest token id
everywhere (greedy, top-k and top-p rank order).

The RNG is xoshiro256** (Blackman & Vigna) seeded from a 64-bit seed by four
splitmix64 outputs; a double is ``(next() >> 11) * 2**-53``. Only exp may differ between
the C build (its own vectorized exp) and numpy, by at most an ulp, so C and reference can
disagree only when a comparison above lands within an ulp or two of its threshold: in
practice, never (the tests compare thousands of steps token for token).

Speculative acceptance: ``Sampler.speculative_accept(p, q, draft_token)``
-------------------------------------------------------------------------
``p`` (target model) and ``q`` (draft model) are float32 *probability* buffers of length
``vocab_size``, after the caller's own temperature and filters; finite, ``>= 0``, with a
positive sum (they are normalized here, so they need not sum to exactly 1). ``q[x] > 0``
for the drafted token ``x``. With ``P = sum(p)`` and ``Q = sum(q)`` (ascending id order):
``u`` = next double; accept iff ``u < (p[x]/P) / (q[x]/Q)`` -> ``(True, x)``. Otherwise a
second draw samples (as in step 8) from ``r_i = max(0, p_i/P - q_i/Q)``, or from ``p``
when every ``r_i`` is 0, -> ``(False, token)``. The returned token is distributed exactly
as ``p`` (Leviathan et al. 2023 / Chen et al. 2023).

Confidence: ``confidence(logits)``
----------------------------------
Statistics of ``softmax(logits)`` at temperature 1, before penalties and filters (-inf
masked): ``max_prob`` = p1, ``margin`` = p1 - p2 (p2 the second-largest probability; 0 on
a tie, p1 when only one token is finite), ``entropy`` = -sum p ln p in nats. Computed in
double; C and reference agree to ~1e-12 (the C sums in a different order).

Latency: ``LatencyStats(window=1 << 20)``
------------------------------------------
Two series, ``"ttft"`` (time to first token, one per request) and ``"token"`` (one per
later token), in seconds. ``count`` and ``mean`` cover every sample ever recorded; the
quantiles cover the last ``window`` samples of the series (a ring buffer: memory stays
bounded in a long-running server). Quantiles use numpy's default ``linear`` method:
``h = (n - 1) * q``, ``i = floor(h)``, ``t = h - i``, ``a, b = s[i], s[min(i + 1, n - 1)]``
over the sorted samples ``s``, result ``b - (b - a) * (1 - t)`` if ``t >= 0.5`` else
``a + (b - a) * t`` (numpy's own rounding of the interpolation).

Errors: malformed input and bad parameters raise ``ValueError`` (``TypeError`` for a
buffer of the wrong type), with a message naming the problem; see ``fastpath.py``.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

MASK64 = (1 << 64) - 1
EXP_FLUSH = -708.0  # exp(v - m) is taken as 0 below this (C's exp flushes there too)
TEMPERATURE_MIN, TEMPERATURE_MAX = 1e-6, 1e6
PENALTY_MAX = 1e6  # |frequency|, |presence| and repetition_penalty bounds: no overflow in double
DEFAULT_WINDOW = 1 << 20

_DEFAULTS = {
    "temperature": 1.0,
    "top_k": 0,
    "top_p": 1.0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "penalty_last_n": 64,
    "seed": 0,
}


def default_params() -> dict:
    """The sampler's defaults: plain sampling from softmax(logits) (temperature 1, every
    filter and penalty off), penalty window 64 tokens, seed 0."""
    return dict(_DEFAULTS)


# --------------------------------------------------------------------------- RNG


def _splitmix64(state: int) -> tuple[int, int]:
    state = (state + 0x9E3779B97F4A7C15) & MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return state, z ^ (z >> 31)


def _rotl(x: int, k: int) -> int:
    return ((x << k) | (x >> (64 - k))) & MASK64


class Xoshiro256:
    """xoshiro256** 1.0, seeded with four splitmix64 outputs (the authors' recommendation)."""

    def __init__(self, seed: int):
        self.s = []
        state = seed & MASK64
        for _ in range(4):
            state, z = _splitmix64(state)
            self.s.append(z)

    def next_u64(self) -> int:
        s = self.s
        result = (_rotl((s[1] * 5) & MASK64, 7) * 9) & MASK64
        t = (s[1] << 17) & MASK64
        s[2] ^= s[0]
        s[3] ^= s[1]
        s[1] ^= s[2]
        s[0] ^= s[3]
        s[2] ^= t
        s[3] = _rotl(s[3], 45)
        return result

    def random(self) -> float:
        """A double in [0, 1) with 53 random bits (exact: both factors are exact)."""
        return (self.next_u64() >> 11) * (1.0 / 9007199254740992.0)


# --------------------------------------------------------------------------- validation


def _check_number(name: str, value, lo: float, hi: float, *, lo_open=False, extra_ok=()) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if value in extra_ok:
        return value
    ok = math.isfinite(value) and (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        raise ValueError(f"{name} must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {value!r}")
    return value


def _check_int(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def check_params(params: dict) -> dict:
    """Validate and complete sampler parameters (raises ValueError / TypeError)."""
    unknown = set(params) - set(_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown sampler parameter(s): {', '.join(sorted(unknown))}; known: {', '.join(_DEFAULTS)}")
    p = {**_DEFAULTS, **params}
    t = p["temperature"]
    if isinstance(t, bool) or not isinstance(t, (int, float, np.integer, np.floating)):
        raise TypeError(f"temperature must be a number, got {type(t).__name__}")
    t = float(t)
    if not (t == 0.0 or (TEMPERATURE_MIN <= t <= TEMPERATURE_MAX)):
        raise ValueError(f"temperature must be 0 (greedy) or in [{TEMPERATURE_MIN:g}, {TEMPERATURE_MAX:g}], got {t!r}")
    return {
        "temperature": t,
        "top_k": _check_int("top_k", p["top_k"], 0, 2**31 - 1),
        "top_p": _check_number("top_p", p["top_p"], 0.0, 1.0, lo_open=True),
        "min_p": _check_number("min_p", p["min_p"], 0.0, 1.0),
        "repetition_penalty": _check_number("repetition_penalty", p["repetition_penalty"], TEMPERATURE_MIN, PENALTY_MAX),
        "frequency_penalty": _check_number("frequency_penalty", p["frequency_penalty"], -PENALTY_MAX, PENALTY_MAX),
        "presence_penalty": _check_number("presence_penalty", p["presence_penalty"], -PENALTY_MAX, PENALTY_MAX),
        "penalty_last_n": _check_int("penalty_last_n", p["penalty_last_n"], -1, 2**31 - 1),
        "seed": _check_int("seed", p["seed"], 0, MASK64),
    }


_NATIVE_F32 = {"f", "@f", "=f", "<f" if np.little_endian else ">f"}


def as_float32(obj, name: str) -> np.ndarray:
    """A flat float32 view of a C-contiguous float32 buffer (no copy), or TypeError /
    ValueError, exactly as the C extension decides."""
    try:
        mv = memoryview(obj)
    except TypeError:
        raise TypeError(
            f"{name} must be a float32 buffer (numpy float32 array, array.array('f'), memoryview), "
            f"got {type(obj).__name__}"
        ) from None
    if mv.format not in _NATIVE_F32 or mv.itemsize != 4:
        raise TypeError(f"{name} must be float32 (buffer format 'f'), got format {mv.format!r}; convert with .astype(numpy.float32)")
    if not mv.c_contiguous:
        raise ValueError(f"{name} must be a C-contiguous buffer; pass numpy.ascontiguousarray({name})")
    return np.asarray(mv).reshape(-1)


def _check_length(arr: np.ndarray, name: str, vocab: int) -> None:
    if arr.size != vocab:
        raise ValueError(f"{name} has {arr.size} values but the sampler's vocab_size is {vocab}")


def _first_bad_logit(x: np.ndarray, name: str) -> None:
    bad = np.isnan(x) | (x == np.inf)
    if bad.any():
        i = int(np.argmax(bad))
        what = "NaN" if math.isnan(x[i]) else "+inf (use -inf to mask a token)"
        raise ValueError(f"{name}[{i}] is {what}")


def _history_tail(history, n: int) -> tuple[np.ndarray, int]:
    """(the last n entries (all for -1) of the history as int64, index of the first one)."""
    if history is None:
        return np.zeros(0, dtype=np.int64), 0
    if isinstance(history, np.ndarray):
        if history.dtype.kind not in "iu":
            raise TypeError(f"history must hold integer token ids, got dtype {history.dtype}")
        arr = history.reshape(-1)
    else:
        try:
            mv = memoryview(history)
        except TypeError:
            mv = None
        if mv is not None and mv.format.lstrip("@=<>!") in ("b", "B", "h", "H", "i", "I", "l", "L", "q", "Q", "n", "N"):
            arr = np.asarray(mv).reshape(-1)
        else:
            try:
                seq = history if isinstance(history, (list, tuple)) else list(history)
            except TypeError:
                raise TypeError(f"history must be a sequence of int token ids, got {type(history).__name__}") from None
            start = 0 if n < 0 else max(0, len(seq) - n)
            tail = seq[start:]
            for item in tail:
                if isinstance(item, bool) or not isinstance(item, (int, np.integer)):
                    raise TypeError(f"history must hold int token ids, got {type(item).__name__}")
            return np.array([int(t) for t in tail], dtype=np.int64).reshape(-1), start
    start = 0 if n < 0 else max(0, arr.size - n)
    return arr[start:].astype(np.int64), start


def _draw(ids: np.ndarray, w: np.ndarray, u: float) -> int:
    """Step 8: ids ascending, w >= 0 with at least one positive weight."""
    cw = np.cumsum(w)
    j = int(np.searchsorted(cw, u * cw[-1], side="right"))
    if j == ids.size:  # u * Z' rounded up to Z': the last positive weight
        j = int(np.flatnonzero(w > 0)[-1])
    return int(ids[j])


# --------------------------------------------------------------------------- Sampler


class Sampler:
    """One decode stream's sampler: parameters, vocabulary size and RNG state."""

    def __init__(self, vocab_size: int, **params):
        self.vocab_size = _check_int("vocab_size", vocab_size, 1, 2**31 - 1)
        self._p = check_params(params)
        self._rng = Xoshiro256(self._p["seed"])

    @property
    def params(self) -> dict:
        return dict(self._p)

    def reseed(self, seed: int) -> None:
        self._p["seed"] = _check_int("seed", seed, 0, MASK64)
        self._rng = Xoshiro256(self._p["seed"])

    def random(self) -> float:
        """The RNG's next double in [0, 1) (advances the stream like a sampling step)."""
        return self._rng.random()

    def _penalized(self, logits, history) -> np.ndarray:
        x = as_float32(logits, "logits")
        _check_length(x, "logits", self.vocab_size)
        _first_bad_logit(x, "logits")
        x = x.astype(np.float64)
        p = self._p
        rp, fp, pp = p["repetition_penalty"], p["frequency_penalty"], p["presence_penalty"]
        if (rp != 1.0 or fp != 0.0 or pp != 0.0) and p["penalty_last_n"] != 0:
            tail, start = _history_tail(history, p["penalty_last_n"])
            if tail.size:
                bad = (tail < 0) | (tail >= self.vocab_size)
                if bad.any():
                    j = int(np.argmax(bad))
                    raise ValueError(
                        f"history[{start + j}] = {int(tail[j])} is outside the vocabulary [0, {self.vocab_size})"
                    )
                ids, counts = np.unique(tail, return_counts=True)
                xt = x[ids]
                if rp != 1.0:
                    xt = np.where(xt > 0, xt / rp, xt * rp)
                if fp != 0.0 or pp != 0.0:
                    xt = xt - (fp * counts.astype(np.float64) + pp)
                x[ids] = xt
        return x

    def sample(self, logits, history=None) -> int:
        """One token id; see the module docstring for the exact steps."""
        x = self._penalized(logits, history)
        p = self._p
        if p["temperature"] == 0.0:  # greedy: argmax returns the first (lowest id) maximum
            if not (x > -np.inf).any():
                raise ValueError("every token is masked (all logits are -inf)")
            return int(np.argmax(x))
        v = x * (1.0 / p["temperature"])
        finite = v > -np.inf
        if finite.all():  # the common case: no gather needed
            ids, vs = np.arange(v.size), v
        else:
            ids = np.flatnonzero(finite)
            if ids.size == 0:
                raise ValueError("every token is masked (all logits are -inf)")
            vs = v[ids]
        k = p["top_k"]
        if 0 < k < ids.size:  # the k first in rank order, ties to the lowest ids
            kth = np.partition(vs, ids.size - k)[ids.size - k]
            sel = vs > kth
            need = k - int(sel.sum())
            sel[np.flatnonzero(vs == kth)[:need]] = True
            ids, vs = ids[sel], vs[sel]
        d = vs - vs.max()
        w = np.exp(d)
        w[d < EXP_FLUSH] = 0.0
        keep = None
        if p["top_p"] < 1.0:
            z = np.cumsum(w)[-1]
            order = np.lexsort((ids, -vs))  # rank order: v descending, id ascending
            cw = np.cumsum(w[order])
            reached = cw >= p["top_p"] * z
            n_keep = int(np.argmax(reached)) + 1 if reached.any() else ids.size
            keep = np.zeros(ids.size, dtype=bool)
            keep[order[:n_keep]] = True
        if p["min_p"] > 0.0:
            keep = (w >= p["min_p"]) if keep is None else keep & (w >= p["min_p"])
        if keep is not None:
            ids, w = ids[keep], w[keep]
        return _draw(ids, w, self._rng.random())

    def speculative_accept(self, p, q, draft_token: int) -> tuple[bool, int]:
        """(accepted, token) for a drafted token; see the module docstring."""
        pv = _as_probs(p, "p", self.vocab_size)
        qv = _as_probs(q, "q", self.vocab_size)
        x = _check_int("draft_token", draft_token, 0, self.vocab_size - 1)
        big_p, big_q = np.cumsum(pv)[-1], np.cumsum(qv)[-1]
        if not big_p > 0:
            raise ValueError("p sums to 0 (no probability mass)")
        if not big_q > 0:
            raise ValueError("q sums to 0 (no probability mass)")
        if qv[x] == 0.0:
            raise ValueError(f"q[{x}] is 0: the draft model cannot have drafted token {x}")
        px, qx = pv[x] / big_p, qv[x] / big_q
        if self._rng.random() < px / qx:
            return True, x
        r = np.maximum(0.0, pv / big_p - qv / big_q)
        u = self._rng.random()
        ids = np.arange(self.vocab_size)
        if np.cumsum(r)[-1] > 0:
            return False, _draw(ids, r, u)
        return False, _draw(ids, pv, u)


def _as_probs(obj, name: str, vocab: int) -> np.ndarray:
    a = as_float32(obj, name)
    _check_length(a, name, vocab)
    bad = ~np.isfinite(a)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{name}[{i}] is {a[i]} (probabilities must be finite)")
    neg = a < 0
    if neg.any():
        i = int(np.argmax(neg))
        raise ValueError(f"{name}[{i}] is negative ({a[i]})")
    return a.astype(np.float64)


# --------------------------------------------------------------------------- confidence


class Confidence(tuple):
    """(max_prob, margin, entropy); a tuple with named fields, like the C struct sequence."""

    __slots__ = ()
    n_fields = 3

    def __new__(cls, max_prob: float, margin: float, entropy: float):
        return super().__new__(cls, (max_prob, margin, entropy))

    max_prob = property(lambda self: self[0])
    margin = property(lambda self: self[1])
    entropy = property(lambda self: self[2])

    def __repr__(self):
        return f"Confidence(max_prob={self[0]!r}, margin={self[1]!r}, entropy={self[2]!r})"


def confidence(logits) -> Confidence:
    """max probability, top-2 margin and entropy (nats) of softmax(logits), temperature 1."""
    x = as_float32(logits, "logits")
    if x.size == 0:
        raise ValueError("logits is empty")
    _first_bad_logit(x, "logits")
    finite = x > -np.inf
    x = (x if finite.all() else x[finite]).astype(np.float64)
    if x.size == 0:
        raise ValueError("every token is masked (all logits are -inf)")
    m1 = x.max()
    m2 = np.partition(x, x.size - 2)[x.size - 2] if x.size > 1 else -np.inf
    d = x - m1
    w = np.exp(d)
    z = w.sum()
    max_prob = 1.0 / z
    margin = (1.0 - math.exp(m2 - m1)) / z
    entropy = math.log(z) - float((w * d).sum()) / z  # not np.dot: BLAS threads
    return Confidence(float(max_prob), float(margin), float(entropy))


# --------------------------------------------------------------------------- latency


def quantile_sorted(s, q: float) -> float:
    """numpy's default ('linear') quantile of an ascending sequence, numpy's rounding."""
    n = len(s)
    h = (n - 1) * q
    i = math.floor(h)
    t = h - i
    a = s[i]
    b = s[min(i + 1, n - 1)]
    diff = b - a
    return b - diff * (1.0 - t) if t >= 0.5 else a + diff * t


SERIES = ("ttft", "token")


class LatencyStats:
    """Streaming TTFT / per-token latency statistics (seconds)."""

    def __init__(self, window: int = DEFAULT_WINDOW):
        self.window = _check_int("window", window, 1, 2**40)
        self._buf = {s: deque(maxlen=self.window) for s in SERIES}
        self._count = dict.fromkeys(SERIES, 0)
        self._sum = dict.fromkeys(SERIES, 0.0)

    def _record(self, series: str, seconds) -> None:
        value = _check_number(f"{series} latency", seconds, 0.0, math.inf)
        self._buf[series].append(value)
        self._count[series] += 1
        self._sum[series] += value

    def record_ttft(self, seconds: float) -> None:
        self._record("ttft", seconds)

    def record_token(self, seconds: float) -> None:
        self._record("token", seconds)

    def reset(self) -> None:
        for s in SERIES:
            self._buf[s].clear()
            self._count[s] = 0
            self._sum[s] = 0.0

    def quantile(self, q: float, series: str = "token") -> float | None:
        """Quantile q in [0, 1] of the series' window; None when it is empty."""
        if series not in SERIES:
            raise ValueError(f"series must be 'ttft' or 'token', got {series!r}")
        q = _check_number("q", q, 0.0, 1.0)
        if not self._buf[series]:
            return None
        return quantile_sorted(sorted(self._buf[series]), q)

    def summary(self) -> dict:
        """{"ttft": {...}, "token": {...}}, each with count, window, mean, p50, p90, p99
        (None when the series is empty)."""
        out = {}
        for s in SERIES:
            buf = sorted(self._buf[s])
            n = self._count[s]
            out[s] = {
                "count": n,
                "window": len(buf),
                "mean": self._sum[s] / n if n else None,
                **{key: (quantile_sorted(buf, q) if buf else None) for key, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))},
            }
        return out


__all__ = [
    "Confidence",
    "LatencyStats",
    "Sampler",
    "Xoshiro256",
    "check_params",
    "confidence",
    "default_params",
    "quantile_sorted",
]
