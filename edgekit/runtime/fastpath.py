"""Per-decode-step runtime fast path: sampling, confidence, speculative acceptance, latency.

    from edgekit.runtime import fastpath

    sampler = fastpath.Sampler(vocab_size, temperature=0.8, top_k=50, top_p=0.9,
                               repetition_penalty=1.1, seed=1234)
    token = sampler.sample(logits, history=tokens)      # logits: float32 buffer
    conf = fastpath.confidence(logits)                  # (max_prob, margin, entropy)
    accepted, token = sampler.speculative_accept(p, q, draft_token)
    stats = fastpath.LatencyStats(); stats.record_ttft(0.12); stats.record_token(0.02)
    stats.summary()                                     # count, mean, p50, p90, p99

The work is done by the C extension ``edgekit.runtime._fastpath`` when it is built (``pip
install -e .`` with gcc available builds it), else by the NumPy reference
``edgekit.runtime.sampling_ref``, with one ``FastpathUnavailableWarning`` per process.
Both implement the same algorithm, documented step by step in ``sampling_ref``:

    penalties -> temperature -> top-k -> softmax -> top-p -> min-p -> renormalize -> draw

(ties to the lowest token id; one xoshiro256** draw per non-greedy step), so a seed gives
the same tokens on either. ``BACKEND`` says which one is in use ("c" or "reference").
A ``Sampler`` holds its RNG state and scratch buffers: use one per decode stream, not one
shared between threads.

Errors: malformed logits (NaN, +inf; -inf is a masked token), a wrong length (the vocab
size is fixed when the sampler is created), out-of-vocabulary history ids and bad
parameters raise ``ValueError``; a buffer that is not float32 raises ``TypeError``, a
non-contiguous one ``ValueError``. The messages name the problem. In C these are the
return codes EK_ERR_NAN, EK_ERR_SIZE, EK_ERR_TOKEN, EK_ERR_PARAM, ... (``_fastpath.c``).
"""

from __future__ import annotations

import warnings


class FastpathUnavailableWarning(RuntimeWarning):
    """The C extension is not built; the (slower) NumPy reference is used instead."""


try:
    from edgekit.runtime import _fastpath as _impl

    BACKEND = "c"
except ImportError as exc:  # not built (or built for another Python): fall back, say so once
    from edgekit.runtime import sampling_ref as _impl

    BACKEND = "reference"
    warnings.warn(
        f"edgekit.runtime._fastpath is not built ({exc}); using the NumPy reference, which is "
        "several times slower per decode step. Build it with `pip install -e .` on a machine "
        "with gcc and the Python headers (python3-dev).",
        FastpathUnavailableWarning,
        stacklevel=2,
    )

Sampler = _impl.Sampler
LatencyStats = _impl.LatencyStats
Confidence = _impl.Confidence
confidence = _impl.confidence
default_params = _impl.default_params

__all__ = [
    "BACKEND",
    "Confidence",
    "FastpathUnavailableWarning",
    "LatencyStats",
    "Sampler",
    "confidence",
    "default_params",
]
