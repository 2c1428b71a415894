"""``edgekit validate``: measure a bundle where it runs and check it against its budgets.

    report = validate_bundle("bundles/smollm2", concurrency=2)     # writes validate.json + .html
    report["passed"], report["budgets"]["latency_p99_ms"]

What one run does, in order:

1. **Prompts.** ``--prompts FILE`` (one prompt per line, or JSON Lines with ``{"prompt": ...}``),
   encoded with the bundle's tokenizer as ``edgekit run`` encodes a prompt; or, by default,
   :data:`DEFAULT_PROMPTS` windows of :data:`DEFAULT_PROMPT_TOKENS` tokens cut at evenly spaced
   offsets from the held-out split of the text the bundle was compressed on (the last
   ``data.eval_tokens`` tokens of its recipe's built-in ``data.source``, the split ``evaluate``
   scored perplexity on; ``builtin:python-docs`` when the recipe's text is a file or dataset,
   which a bundle does not carry), fed as token ids.
2. **Load** the bundle's branch (``edgekit.runtime.backends.load_branch``: ONNX Runtime, or
   the TensorRT engine where it is built and loads).
3. **Warm-up**: ``warmup`` requests at the same concurrency, not measured (first-call
   allocations, thread pools, caches).
4. **Measured requests**, closed loop: ``concurrency`` worker threads, each with its own
   sessions (own KV cache) on the one loaded branch; each takes a first request, all start
   together, and each takes the next request as soon as its previous one ends, until none is
   left. Request *i* uses prompt *i mod #prompts*.
   Decoding is greedy (the runtime's C sampler at temperature 0) for exactly
   ``max_new_tokens`` tokens: end-of-sequence is ignored so every request does the same work.
   Per request: **TTFT** = from the request's start (a new session, empty cache) to the first
   token chosen (prefill + first sampling step); **TPOT** = the time between consecutive
   tokens (one decode step + sampling each, ``max_new_tokens - 1`` per request); decode
   tokens/s = (max_new_tokens - 1) / the sum of its TPOTs. Throughput = all generated tokens /
   wall time of the measured phase. Quantiles (p50/p90/p99) are numpy's default ``linear``
   definition, computed by the runtime's latency statistics (:class:`fastpath.LatencyStats`,
   the same code ``serve`` reports with): over the sorted samples ``s`` of ``n``,
   ``h = (n - 1) q``, result ``s[floor h] + (h - floor h) (s[floor h + 1] - s[floor h])``.
5. **Memory**: the peak resident set of this process from the moment validation starts (Linux:
   ``VmHWM`` after resetting the watermark through ``/proc/self/clear_refs``; elsewhere the
   lifetime peak from ``getrusage``), plus the GPU memory of this process where a GPU backend
   runs (``nvidia-smi`` per-process, else torch's peak allocation). On a Jetson,
   ``tegrastats`` runs in the background for power, temperatures and device RAM.
6. **Budgets** from the manifest (``latency_p99_ms`` vs TPOT p99, ``ttft_p99_ms`` vs TTFT
   p99, ``memory_gb`` vs peak memory), overridden or added by the caller.
7. **Predicted vs measured**: ``edgekit plan``'s predictions for the bundle's model config,
   weight format and target (and this host's target profile when it matches one), next to
   the measurements.
8. **Report**: ``validate.json`` (``edgekit.validate/1``, every raw latency included) and a
   self-contained ``validate.html``, written atomically into ``output_dir`` (never into the
   bundle: bundles are not modified once written).

On a machine that is not the bundle's target the numbers describe this machine; the report
says so in ``host.note`` and at the top of the HTML.

The modules, in the order a run uses them: :mod:`~edgekit.validate.prompts` (1),
:mod:`~edgekit.validate.host` (what this machine is, which target profile it matches),
:mod:`~edgekit.validate.memory` and :mod:`~edgekit.telemetry.tegrastats` (5),
:mod:`~edgekit.validate.requests` (3, 4) with :mod:`~edgekit.validate.statistics`,
:mod:`~edgekit.validate.budgets` (6), :mod:`~edgekit.validate.predictions` (7),
:mod:`~edgekit.validate.report` (8), and :mod:`~edgekit.validate.run`, which runs them in order.
Nothing here imports torch, transformers or onnx at import time (it runs on the device).
"""

from edgekit.validate.budgets import BUDGET_KEYS
from edgekit.validate.prompts import DEFAULT_PROMPT_TOKENS, DEFAULT_PROMPTS
from edgekit.validate.run import DEFAULT_MAX_NEW_TOKENS, DEFAULT_REQUESTS, DEFAULT_WARMUP, FORMAT, validate_bundle

__all__ = [
    "BUDGET_KEYS", "DEFAULT_MAX_NEW_TOKENS", "DEFAULT_PROMPTS", "DEFAULT_PROMPT_TOKENS", "DEFAULT_REQUESTS", "DEFAULT_WARMUP",
    "FORMAT", "validate_bundle",
]
