"""Route each request to a small (edge) or a large branch, with fallback.

    from edgekit.runtime.router import Router

    router = Router(small, large, "cascade", thresholds={"confidence": 0.2},
                    max_new_tokens=128, timeout_s=30)
    result = router.generate("Explain list comprehensions.")
    result.text, result.branch, result.fell_back, result.reason, result.ttft_s
    for event in router.stream(prompt):          # "text" pieces, "reset", then "done"
        ...

``small`` and ``large`` are branches (``edgekit.runtime.backends``): local ones have logits
and a KV-cache ``session()``; a remote one (``has_logits`` False) only ``complete``s text.

Policies
--------
``small_only`` / ``large_only``
    Always that branch (the other one is only the fallback).
``input_complexity``
    Score the prompt with the small model's prefill, which gives every prompt token's
    log-probability for free::

        mean_nll = mean over i = 2..n of  -log softmax(logits[i-1])[x_i]     (nats)
        score    = mean_nll + length_weight * log(1 + n)

    with n the prompt's token count in the small tokenizer (BOS included when the
    tokenizer adds one) and mean_nll = 0 for a 1-token prompt. ``score > complexity`` ->
    large, else small, which then continues from the same prefill (no second prefill).
``cascade``
    The small branch answers while the router watches its per-token confidence: ``c_t`` =
    max probability of softmax(logits) at temperature 1 (``fastpath.confidence``; the same
    whatever the sampling settings, so a threshold does not move with temperature), for
    every sampled token, EOS included. With ``Q(t)`` the ``quantile``-quantile (numpy's
    linear method) of ``c_1..c_t``, the decision points are ``t = min_tokens..T`` and the
    end ``T`` (``check="incremental"``), or only the end (``check="end"``), and::

        score = min over decision points t of Q(t)

    The answer escalates as soon as a decision point has ``Q(t) < confidence``, i.e. iff
    ``score < confidence``: the small answer is dropped and the large branch regenerates
    from the prompt (what a remote large branch supports). Calibration
    (``edgekit.runtime.calibration``) computes the same score on a full small generation.
``speculative``
    ``edgekit.runtime.speculative``: the small branch drafts, the large one verifies. Both
    must be local with logits and share the tokenizer; penalties are refused.

Fallback
--------
A branch that raises ``BranchUnavailable`` (recognized by class name, so the router does
not import the backends), ``TimeoutError`` or ``ConnectionError``, any exception from a
remote branch, or a branch that runs past ``timeout_s`` (wall clock, from its first call
in the request) is *unavailable*: the other branch answers, ``fell_back`` is True and
``reason`` says why. Other exceptions from a local branch are bugs and propagate. A local
feed cannot be interrupted, so its timeout is checked between forward passes; a remote
``complete`` runs in a daemon thread the router stops waiting for. When both branches fail
the router raises ``EdgekitError``. If the large branch fails after a cascade escalated,
the small answer resumes where it stopped.

Streaming
---------
``stream`` yields :class:`StreamEvent`: ``"text"`` pieces as tokens are decided (partial
UTF-8 held back), ``"reset"`` when the text shown so far is abandoned (a cascade
escalation once the large branch starts answering, a fallback after a branch failed
mid-answer) and is followed by the new answer's text from its start, and last ``"done"``
carrying the :class:`RouteResult`. ``generate`` is ``stream`` consumed.

Token-id prompts are given to both local branches as they are (the branches must share
the tokenizer) and decoded with a local tokenizer for a remote branch. Text prompts are
encoded by each local branch's ``tokenizer.encode`` (special tokens as it adds them); no
chat template is applied. A ``Router`` serves one request at a time (a sampler per request,
but shared counters and branch sessions): use one per worker thread.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterator, Sequence

from edgekit.errors import EdgekitError

POLICIES = ("small_only", "large_only", "input_complexity", "cascade", "speculative")
CHECKS = ("incremental", "end")


@dataclass(frozen=True)
class Thresholds:
    """Routing thresholds. The defaults are placeholders: calibrate them for a target share
    of large calls with ``edgekit.runtime.calibration.calibrate``."""

    complexity: float = 3.0  # input_complexity: large when score > complexity (nats/token)
    length_weight: float = 0.0  # input_complexity: weight of log(1 + prompt tokens)
    confidence: float = 0.2  # cascade: escalate when the low quantile falls below this
    quantile: float = 0.1  # cascade: which low quantile of the confidences
    min_tokens: int = 8  # cascade: first decision point (incremental check)
    check: str = "incremental"  # cascade: "incremental" or "end"

    @classmethod
    def of(cls, value: Thresholds | dict | None) -> Thresholds:
        if value is None:
            return cls()
        if isinstance(value, cls):
            value.validate()
            return value
        if not isinstance(value, dict):
            raise EdgekitError(f"thresholds must be a dict, got {type(value).__name__}", where="thresholds", how="pass a dict")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise EdgekitError(
                f"unknown threshold(s) {', '.join(unknown)}", where="thresholds", how=f"use only {', '.join(sorted(known))}"
            )
        out = cls(**value)
        out.validate()
        return out

    def validate(self) -> None:
        def bad(name, why):
            raise EdgekitError(f"thresholds.{name} {why}, got {getattr(self, name)!r}", where=f"thresholds.{name}", how="fix the value")

        for name in ("complexity", "length_weight", "confidence"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                bad(name, "must be a finite number")
        if not (isinstance(self.quantile, (int, float)) and 0.0 <= self.quantile <= 1.0):
            bad("quantile", "must be in [0, 1]")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 1:
            bad("min_tokens", "must be an int >= 1")
        if self.check not in CHECKS:
            bad("check", f"must be one of {', '.join(CHECKS)}")


@dataclass
class RouteResult:
    text: str  # the answer (canonical decode of `tokens` for a local branch)
    tokens: list[int]  # generated ids, EOS excluded ([] for a remote branch)
    branch: str  # which branch answered: "small" | "large" | "speculative"
    answered_by: str  # that branch's name ("small+large" names for speculative)
    policy: str
    fell_back: bool  # the policy's choice was unavailable and the other branch answered
    reason: str  # one line: why this branch answered
    finish_reason: str  # "eos" | "length" | a remote's finish_reason
    score: float | None = None  # input_complexity: prompt score; cascade: confidence score
    threshold: float | None = None  # the threshold the score was compared with
    escalated: bool = False  # cascade: the small answer was dropped for the large branch
    confidences: list[float] = field(default_factory=list)  # per token of the answer (local)
    small_confidences: list[float] = field(default_factory=list)  # cascade: the small's, up to the decision
    prompt_tokens: int | None = None
    ttft_s: float | None = None  # request start -> the answering branch's first token
    tokens_per_s: float | None = None  # answering branch, after its first token
    elapsed_s: float = 0.0
    acceptance_rate: float | None = None  # speculative
    speculative: dict | None = None  # speculative: accepted, drafted, large_calls, small_calls, ...
    usage: dict | None = None  # a remote branch's usage
    attempts: list[dict] = field(default_factory=list)  # every branch tried: branch, ok, error, seconds

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class StreamEvent:
    kind: str  # "text" | "reset" | "done"
    text: str = ""  # "text": the new piece
    branch: str | None = None  # the branch the text comes from
    reason: str = ""  # "reset": why
    result: RouteResult | None = None  # "done"


# --------------------------------------------------------------------------- scores


def complexity_score(prefill_logits, prompt_ids: Sequence[int], length_weight: float = 0.0) -> tuple[float, float]:
    """(score, mean_nll) of a prompt from the small model's prefill logits [n, vocab]:
    mean_nll over tokens 2..n (0 for one token), score = mean_nll + length_weight*log(1+n)."""
    import numpy as np

    n = len(prompt_ids)
    if n < 2:
        mean_nll = 0.0
    else:
        x = np.asarray(prefill_logits[: n - 1], dtype=np.float64)
        m = x.max(axis=1, keepdims=True)
        lse = (m[:, 0] + np.log(np.exp(x - m).sum(axis=1)))
        target = x[np.arange(n - 1), np.asarray(prompt_ids[1:], dtype=np.int64)]
        mean_nll = float((lse - target).mean())
    return mean_nll + length_weight * math.log1p(n), mean_nll


def _quantile(sorted_values: list[float], q: float) -> float:
    """numpy's default (linear) quantile of an ascending list."""
    h = (len(sorted_values) - 1) * q
    i = math.floor(h)
    a, b = sorted_values[i], sorted_values[min(i + 1, len(sorted_values) - 1)]
    return a + (b - a) * (h - i)


class ConfidenceMonitor:
    """The cascade rule: ``push`` each token's confidence; True = escalate now.
    ``finish()`` applies the end-of-answer decision point; ``score`` is the running
    minimum of Q(t) over the decision points seen (+inf before the first)."""

    def __init__(self, threshold: float, *, quantile: float = 0.1, min_tokens: int = 8, check: str = "incremental"):
        self.threshold, self.quantile, self.min_tokens, self.check = threshold, quantile, min_tokens, check
        self.values: list[float] = []
        self._sorted: list[float] = []
        self.score = math.inf
        self._scored_at = 0  # last t that was a decision point

    def _decide(self) -> bool:
        self._scored_at = len(self.values)
        self.score = min(self.score, _quantile(self._sorted, self.quantile))
        return self.score < self.threshold

    def push(self, confidence: float) -> bool:
        self.values.append(float(confidence))
        bisect.insort(self._sorted, float(confidence))
        if self.check == "incremental" and len(self.values) >= self.min_tokens:
            return self._decide()
        return False

    def finish(self) -> bool:
        if self.values and self._scored_at != len(self.values):
            return self._decide()
        return self.score < self.threshold


# --------------------------------------------------------------------------- branch guards


class _BranchFailed(Exception):
    def __init__(self, label: str, message: str):
        super().__init__(f"{label} branch unavailable: {message}")
        self.label, self.message = label, message


def _is_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    return any(cls.__name__ == "BranchUnavailable" for cls in type(exc).__mro__)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Guard:
    """One branch within one request: turns 'unavailable' failures and timeouts into
    _BranchFailed, so the router can fall back."""

    def __init__(self, branch: Any, label: str, timeout_s: float | None):
        self.branch, self.label, self.timeout_s = branch, label, timeout_s
        self.name = str(getattr(branch, "name", label))
        self.has_logits = bool(getattr(branch, "has_logits", False))
        self.started: float | None = None
        self.sessions: list[_GuardedSession] = []

    def __getattr__(self, name):  # vocab_size, context_length, tokenizer, ...
        return getattr(self.branch, name)

    def _start(self) -> None:
        if self.started is None:
            self.started = time.perf_counter()

    def check_time(self) -> None:
        if self.timeout_s is not None and self.started is not None and time.perf_counter() - self.started > self.timeout_s:
            raise _BranchFailed(self.label, f"timed out after {self.timeout_s:g} s")

    def call(self, fn, *args, **kwargs):
        self._start()
        try:
            out = fn(*args, **kwargs)
        except _BranchFailed:
            raise
        except Exception as exc:
            if not self.has_logits or _is_unavailable(exc):
                raise _BranchFailed(self.label, _describe(exc)) from exc
            raise
        self.check_time()
        return out

    def session(self) -> _GuardedSession:
        sess = _GuardedSession(self, self.call(self.branch.session))
        self.sessions.append(sess)
        return sess

    def complete(self, prompt: str, **kwargs) -> dict:
        self._start()
        if self.timeout_s is None:
            out = self.call(self.branch.complete, prompt, **kwargs)
        else:
            box: dict = {}

            def work():
                try:
                    box["value"] = self.branch.complete(prompt, **kwargs)
                except BaseException as exc:  # handed to the request thread
                    box["error"] = exc

            # a daemon thread: a hung endpoint can neither block the answer nor the exit
            worker = threading.Thread(target=work, daemon=True, name=f"edgekit-{self.label}-complete")
            worker.start()
            worker.join(max(0.0, self.timeout_s - (time.perf_counter() - self.started)))
            if worker.is_alive():
                raise _BranchFailed(self.label, f"no answer within {self.timeout_s:g} s")
            if "error" in box:
                raise _BranchFailed(self.label, _describe(box["error"])) from box["error"]
            out = box["value"]
        if not isinstance(out, dict) or not isinstance(out.get("text"), str):
            raise _BranchFailed(self.label, f"malformed response (expected a dict with 'text'): {str(out)[:200]}")
        return out

    def close(self) -> None:
        for sess in self.sessions:
            sess.close()


class _GuardedSession:
    def __init__(self, guard: _Guard, session: Any):
        self.guard, self.inner, self.closed = guard, session, False

    @property
    def length(self) -> int:
        return self.inner.length

    @property
    def vocab_size(self) -> int:
        return self.inner.vocab_size

    def feed(self, token_ids):
        return self.guard.call(self.inner.feed, token_ids)

    def rollback(self, n: int) -> None:
        self.guard.call(self.inner.rollback, n)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.inner.close()
            except Exception:  # closing a failed branch must not hide the answer
                pass


# --------------------------------------------------------------------------- text


class _Text:
    """Incremental detokenization of one answer (TGI's prefix/read offsets): a piece is
    released once it does not end in a partial UTF-8 character."""

    def __init__(self, tokenizer: Any, label: str):
        self.tokenizer, self.label = tokenizer, label
        self.ids: list[int] = []
        self.emitted = ""
        self._prefix = self._read = 0

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> None:
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.emitted += after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)

    def finish(self) -> str:
        """The canonical text (a full decode); ``emitted`` becomes it."""
        self.emitted = self._decode(self.ids)
        return self.emitted


class _RemoteText:
    def __init__(self, label: str, text: str):
        self.label, self.emitted = label, text


class _Output:
    """Keeps the client's view equal to one answer's text: a continuation of what was
    shown is sent as a piece, anything else as a reset and the full text."""

    def __init__(self):
        self.current = None
        self.shown = ""

    def sync(self, source, reason: str = "") -> Iterator[StreamEvent]:
        text = source.emitted
        if source is self.current and text.startswith(self.shown):
            if len(text) > len(self.shown):
                yield StreamEvent("text", text[len(self.shown) :], source.label)
        else:
            if self.shown:
                yield StreamEvent("reset", "", source.label, reason or f"switching to the {source.label} branch")
            if text:
                yield StreamEvent("text", text, source.label)
        self.current, self.shown = source, text


# --------------------------------------------------------------------------- answers


@dataclass
class _Answer:
    label: str
    name: str
    text: str
    tokens: list[int]
    finish_reason: str
    confidences: list[float]
    ttft_s: float | None
    tokens_per_s: float | None
    token_times: list[float] = field(default_factory=list)
    usage: dict | None = None
    speculative: Any = None


class _LocalRun:
    """Plain decoding on one local branch; ``steps()`` is resumable (a cascade stops it
    and may resume it if the large branch fails)."""

    def __init__(self, guard: _Guard, ids: list[int], req: _Request):
        self.guard, self.ids, self.req = guard, ids, req
        self.session = None
        self.last = None
        self.prefill_logits = None
        self.tokens: list[int] = []
        self.confidences: list[float] = []
        self.times: list[float] = []
        self.finish: str | None = None
        self.text = _Text(guard.tokenizer, guard.label)
        self._steps = None

    def prefill(self):
        if self.session is None:
            context = int(getattr(self.guard, "context_length", 0) or 0)
            if context and len(self.ids) > context:
                raise _BranchFailed(self.guard.label, f"the prompt has {len(self.ids)} tokens, over its context length {context}")
            self.session = self.guard.session()
            self.prefill_logits = self.session.feed(self.ids)
            self.last = self.prefill_logits[-1]
        return self.prefill_logits

    def steps(self) -> Iterator[tuple[int | None, float]]:
        if self._steps is None:
            self._steps = self._generate()
        return self._steps

    def _generate(self):
        import numpy as np

        from edgekit.runtime import fastpath

        self.prefill()
        req = self.req
        context = int(getattr(self.guard, "context_length", 0) or 0)
        budget = min(req.max_new_tokens, context - len(self.ids) + 1) if context else req.max_new_tokens
        sampler = fastpath.Sampler(int(self.guard.vocab_size), **req.sampler_params)
        eos = _eos_ids(self.guard.tokenizer)
        history = list(self.ids)
        self.finish = "length"
        while len(self.tokens) < budget:
            row = np.ascontiguousarray(self.last, dtype=np.float32)
            token = sampler.sample(row, history=history)
            c = fastpath.confidence(row).max_prob
            self.confidences.append(c)
            self.times.append(time.perf_counter())
            if token in eos:
                self.finish = "eos"
                yield None, c
                return
            self.tokens.append(token)
            history.append(token)
            self.text.push(token)
            yield token, c
            if len(self.tokens) < budget:
                self.last = self.session.feed([token])[-1]

    def answer(self) -> _Answer:
        self.text.finish()
        return _Answer(
            self.guard.label,
            self.guard.name,
            self.text.emitted,
            list(self.tokens),
            self.finish or "length",
            list(self.confidences),
            self.times[0] - self.req.t0 if self.times else None,
            _rate(self.times),
            token_times=list(self.times),
        )


def _rate(times: list[float]) -> float | None:
    if len(times) < 2 or times[-1] <= times[0]:
        return None
    return (len(times) - 1) / (times[-1] - times[0])


def _eos_ids(tokenizer: Any) -> set[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(eos)} if isinstance(eos, int) else {int(t) for t in eos}


@dataclass
class _Request:
    prompt: str | list[int]
    max_new_tokens: int
    sampler_params: dict  # fastpath.Sampler kwargs, seed included
    t0: float
    small: _Guard | None
    large: _Guard | None
    attempts: list[dict] = field(default_factory=list)
    _ids: dict = field(default_factory=dict)

    def ids_for(self, guard: _Guard) -> list[int]:
        if guard.label not in self._ids:
            if isinstance(self.prompt, str):
                ids = [int(t) for t in guard.tokenizer.encode(self.prompt)]
            else:
                ids = list(self.prompt)
            if not ids:
                raise EdgekitError("the prompt is empty", where="prompt", how="give a non-empty prompt")
            self._ids[guard.label] = ids
        return self._ids[guard.label]

    def text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        for guard in (self.small, self.large):
            if guard is not None and guard.has_logits:
                return guard.tokenizer.decode(self.prompt, skip_special_tokens=True)
        raise EdgekitError("a token-id prompt needs a local branch's tokenizer", where="prompt", how="pass the prompt as text")

    def other(self, guard: _Guard) -> _Guard | None:
        return self.large if guard is self.small else self.small

    def log(self, guard: _Guard, ok: bool, error: str | None = None) -> None:
        seconds = time.perf_counter() - guard.started if guard.started is not None else 0.0
        self.attempts.append({"branch": guard.label, "name": guard.name, "ok": ok, "error": error, "seconds": seconds})


# --------------------------------------------------------------------------- router


class Router:
    """Answers prompts with the small or the large branch per ``policy`` (module docstring)."""

    def __init__(
        self,
        small: Any,
        large: Any,
        policy: str = "cascade",
        *,
        thresholds: Thresholds | dict | None = None,
        sampler_params: dict | None = None,
        max_new_tokens: int = 128,
        draft_tokens: int = 8,
        timeout_s: float | None = None,
        seed: int = 0,
        draft_min_confidence: float = 0.5,
    ):
        from edgekit.runtime import fastpath, sampling_ref

        if policy not in POLICIES:
            raise EdgekitError(f"unknown routing policy {policy!r}", where="policy", how=f"use one of {', '.join(POLICIES)}")
        self.small, self.large, self.policy = small, large, policy
        self.thresholds = Thresholds.of(thresholds)
        needs = {"small_only": ("small",), "large_only": ("large",)}.get(policy, ("small", "large"))
        for label in needs:
            if (small if label == "small" else large) is None:
                raise EdgekitError(f"policy {policy} needs a {label} branch", where="router", how=f"configure the {label} branch")
        if policy in ("input_complexity", "cascade") and not getattr(small, "has_logits", False):
            raise EdgekitError(
                f"policy {policy} needs the small branch's logits, but {getattr(small, 'name', 'small')!r} is remote",
                where="router.small",
                how="use a local small model (ONNX Runtime / TensorRT / PyTorch)",
            )
        if policy == "speculative":
            remote = [getattr(b, "name", label) for label, b in (("small", small), ("large", large)) if not getattr(b, "has_logits", False)]
            if remote:
                raise EdgekitError(
                    f"speculative decoding needs logits from both branches, but {', '.join(map(repr, remote))} is remote",
                    where="router",
                    how="use two local models that share a tokenizer, or the cascade / input_complexity policy",
                )
            from edgekit.runtime.speculative import speculative_params

            speculative_params(sampler_params)  # refuses penalties up front
            self._check_same_tokenizer()
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise EdgekitError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}", where="max_new_tokens", how="use e.g. 128")
        if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or draft_tokens < 1:
            raise EdgekitError(f"draft_tokens must be an int >= 1, got {draft_tokens!r}", where="draft_tokens", how="use e.g. 4")
        if isinstance(draft_min_confidence, bool) or not isinstance(draft_min_confidence, (int, float)) or not 0 <= draft_min_confidence < 1:
            raise EdgekitError(f"draft_min_confidence must be in [0, 1), got {draft_min_confidence!r}", where="draft_min_confidence",
                               how="use e.g. 0.5, or 0 to always draft draft_tokens")
        self.draft_min_confidence = float(draft_min_confidence)
        if timeout_s is not None and not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
            raise EdgekitError(f"timeout_s must be > 0 or None, got {timeout_s!r}", where="timeout_s", how="use e.g. 30")
        self.sampler_params = self._check_sampler(sampler_params, sampling_ref)
        self.max_new_tokens, self.draft_tokens, self.timeout_s, self.seed = max_new_tokens, draft_tokens, timeout_s, seed
        self.latency = fastpath.LatencyStats()
        self.counts = {"small": 0, "large": 0, "speculative": 0, "fell_back": 0, "escalated": 0}

    @staticmethod
    def _check_sampler(params: dict | None, sampling_ref) -> dict:
        params = dict(params or {"temperature": 0.0})
        try:
            sampling_ref.check_params(params)
        except (TypeError, ValueError) as exc:
            raise EdgekitError(f"invalid sampler parameters: {exc}", where="sampler_params", how="fix the value") from None
        return params

    def _check_same_tokenizer(self) -> None:
        a, b = getattr(self.small, "tokenizer", None), getattr(self.large, "tokenizer", None)
        if a is None or b is None or a is b or not (hasattr(a, "get_vocab") and hasattr(b, "get_vocab")):
            return
        if a.get_vocab() != b.get_vocab():
            raise EdgekitError(
                "speculative decoding needs one tokenizer, but the small and large branches' vocabularies differ",
                where="router",
                how="pair models of one family (same tokenizer), or use the cascade policy",
            )

    # ------------------------------------------------------------------ public

    def generate(self, prompt: str | Sequence[int], **overrides) -> RouteResult:
        """Answer one prompt (text, or token ids); ``overrides``: max_new_tokens,
        sampler_params, seed for this request only."""
        for event in self.stream(prompt, **overrides):
            if event.kind == "done":
                return event.result
        raise AssertionError("stream ended without a result")  # pragma: no cover

    def stream(
        self,
        prompt: str | Sequence[int],
        *,
        max_new_tokens: int | None = None,
        sampler_params: dict | None = None,
        seed: int | None = None,
    ) -> Iterator[StreamEvent]:
        """Yield ``StreamEvent``s: "text" pieces, "reset" (drop what was shown: a new
        answer follows from its start), and last "done" with the RouteResult."""
        from edgekit.runtime import sampling_ref

        params = self.sampler_params if sampler_params is None else self._check_sampler(sampler_params, sampling_ref)
        if self.policy == "speculative" and sampler_params is not None:
            from edgekit.runtime.speculative import speculative_params

            speculative_params(params)
        params = {**params, "seed": int(params.get("seed", self.seed) if seed is None else seed)}
        if isinstance(prompt, str):
            if not prompt:
                raise EdgekitError("the prompt is empty", where="prompt", how="give a non-empty prompt")
        else:
            prompt = [int(t) for t in prompt]
        req = _Request(
            prompt,
            self.max_new_tokens if max_new_tokens is None else int(max_new_tokens),
            params,
            time.perf_counter(),
            _Guard(self.small, "small", self.timeout_s) if self.small is not None else None,
            _Guard(self.large, "large", self.timeout_s) if self.large is not None else None,
        )
        out = _Output()
        try:
            result = yield from getattr(self, "_route_" + self.policy)(req, out)
        finally:
            for guard in (req.small, req.large):
                if guard is not None:
                    guard.close()
        result.attempts = req.attempts
        ids = req._ids.get(result.branch if result.branch in req._ids else "small", req._ids.get("large"))
        result.prompt_tokens = len(ids) if ids is not None else None
        result.elapsed_s = time.perf_counter() - req.t0
        self._record(result)
        yield StreamEvent("done", "", result.branch, result.reason, result)

    def prompt_score(self, prompt: str | Sequence[int]) -> float:
        """The input_complexity score of a prompt (one small prefill, nothing generated)."""
        guard = _Guard(self.small, "small", None)
        req = _Request(prompt if isinstance(prompt, str) else list(prompt), 1, {}, time.perf_counter(), guard, None)
        run = _LocalRun(guard, req.ids_for(guard), req)
        try:
            logits = run.prefill()
            return complexity_score(logits, run.ids, self.thresholds.length_weight)[0]
        except _BranchFailed as exc:
            raise EdgekitError(str(exc), where="router.small", how="check the small branch") from None
        finally:
            guard.close()

    def confidence_score(self, prompt: str | Sequence[int], *, max_new_tokens: int | None = None) -> float:
        """The cascade score of a prompt: the small branch generates its whole answer (no
        early stop) and the score is min over the decision points of the low quantile; the
        cascade escalates iff this is below ``thresholds.confidence``."""
        t = self.thresholds
        guard = _Guard(self.small, "small", None)
        params = {**self.sampler_params, "seed": int(self.sampler_params.get("seed", self.seed))}
        req = _Request(
            prompt if isinstance(prompt, str) else list(prompt),
            self.max_new_tokens if max_new_tokens is None else max_new_tokens,
            params,
            time.perf_counter(),
            guard,
            None,
        )
        monitor = ConfidenceMonitor(t.confidence, quantile=t.quantile, min_tokens=t.min_tokens, check=t.check)
        run = _LocalRun(guard, req.ids_for(guard), req)
        try:
            for _, c in run.steps():
                monitor.push(c)
            monitor.finish()
            return monitor.score
        except _BranchFailed as exc:
            raise EdgekitError(str(exc), where="router.small", how="check the small branch") from None
        finally:
            guard.close()

    def latency_summary(self) -> dict:
        """``LatencyStats.summary()`` over the answers so far (ttft, per-token)."""
        return self.latency.summary()

    # ------------------------------------------------------------------ bookkeeping

    def _record(self, result: RouteResult) -> None:
        self.counts[result.branch] += 1
        self.counts["fell_back"] += int(result.fell_back)
        self.counts["escalated"] += int(result.escalated)
        if result.ttft_s is not None:
            self.latency.record_ttft(max(0.0, result.ttft_s))
        times = getattr(result, "_token_times", None) or []
        for a, b in zip(times, times[1:]):
            self.latency.record_token(max(0.0, b - a))

    @staticmethod
    def _result(req: _Request, answer: _Answer, policy: str, *, fell_back: bool, reason: str, **extra) -> RouteResult:
        result = RouteResult(
            text=answer.text,
            tokens=answer.tokens,
            branch=answer.label,
            answered_by=answer.name,
            policy=policy,
            fell_back=fell_back,
            reason=reason,
            finish_reason=answer.finish_reason,
            confidences=answer.confidences,
            ttft_s=answer.ttft_s,
            tokens_per_s=answer.tokens_per_s,
            usage=answer.usage,
            **extra,
        )
        result._token_times = answer.token_times  # for the latency stats, not a field
        return result

    # ------------------------------------------------------------------ answering

    def _answer(self, guard: _Guard, req: _Request, out: _Output, run: _LocalRun | None = None):
        """Generator: one branch answers in full, streaming; returns an _Answer or raises
        _BranchFailed (logged)."""
        try:
            if guard.has_logits:
                run = run or _LocalRun(guard, req.ids_for(guard), req)
                for token, _ in run.steps():
                    if token is not None:
                        yield from out.sync(run.text)
                answer = run.answer()
                yield from out.sync(run.text)
            else:
                greedy = req.sampler_params.get("temperature", 1.0) == 0.0
                reply = guard.complete(
                    req.text(),
                    max_new_tokens=req.max_new_tokens,
                    temperature=0.0 if greedy else float(req.sampler_params.get("temperature", 1.0)),
                    stop=None,
                )
                elapsed = time.perf_counter() - req.t0
                usage = reply.get("usage") or None
                n_out = (usage or {}).get("completion_tokens")
                answer = _Answer(
                    guard.label,
                    guard.name,
                    reply["text"],
                    [],
                    str(reply.get("finish_reason") or "stop"),
                    [],
                    elapsed,
                    None,
                    usage=usage,
                )
                if isinstance(n_out, int) and n_out > 0 and guard.started is not None:
                    answer.tokens_per_s = n_out / max(1e-9, time.perf_counter() - guard.started)
                yield from out.sync(_RemoteText(guard.label, reply["text"]))
        except _BranchFailed as exc:
            req.log(guard, False, exc.message)
            raise
        req.log(guard, True)
        return answer

    def _answer_either(self, first: _Guard, req: _Request, out: _Output, reason: str, runs: dict | None = None, **extra):
        """Generator: ``first`` answers, or the other branch when it is unavailable;
        ``runs`` maps a label to a _LocalRun already prefilled for it (reused)."""
        runs = runs or {}
        try:
            answer = yield from self._answer(first, req, out, runs.get(first.label))
            return self._result(req, answer, self.policy, fell_back=False, reason=reason, **extra)
        except _BranchFailed as exc:
            failure = exc
        other = req.other(first)
        if other is None:
            raise EdgekitError(
                str(failure), where=f"router.{first.label}", how=f"check the {first.label} branch, or configure a fallback branch"
            )
        answer = yield from self._last_resort(other, req, out, failure, runs.get(other.label))
        return self._result(
            req, answer, self.policy, fell_back=True, reason=f"{reason}; {failure}, so the {other.label} branch answered", **extra
        )

    def _last_resort(self, guard: _Guard, req: _Request, out: _Output, failure: _BranchFailed, run: _LocalRun | None = None):
        try:
            return (yield from self._answer(guard, req, out, run))
        except _BranchFailed as exc:
            raise EdgekitError(
                f"both branches are unavailable: {failure}; {exc}",
                where="router",
                how="check that the models load and that the endpoint is reachable (and its timeout)",
            ) from None

    # ------------------------------------------------------------------ policies

    def _route_small_only(self, req, out):
        return (yield from self._answer_either(req.small, req, out, "policy small_only"))

    def _route_large_only(self, req, out):
        return (yield from self._answer_either(req.large, req, out, "policy large_only"))

    def _route_input_complexity(self, req, out):
        t = self.thresholds
        small = req.small
        run = None
        try:
            run = _LocalRun(small, req.ids_for(small), req)
            score, mean_nll = complexity_score(run.prefill(), run.ids, t.length_weight)
        except _BranchFailed as exc:
            req.log(small, False, exc.message)
            answer = yield from self._last_resort(req.large, req, out, exc)
            return self._result(
                req, answer, self.policy, fell_back=True, reason=f"{exc} (could not score the prompt), so the large branch answered"
            )
        extra = {"score": score, "threshold": t.complexity}
        detail = f"prompt score {score:.3f} (mean NLL {mean_nll:.3f} nats over {len(run.ids)} tokens)"
        # the small prefill is reused whether the small branch is chosen or the fallback
        if score > t.complexity:
            return (yield from self._answer_either(req.large, req, out, f"{detail} > {t.complexity:g}", {"small": run}, **extra))
        return (yield from self._answer_either(small, req, out, f"{detail} <= {t.complexity:g}", {"small": run}, **extra))

    def _route_cascade(self, req, out):
        t = self.thresholds
        small, large = req.small, req.large
        monitor = ConfidenceMonitor(t.confidence, quantile=t.quantile, min_tokens=t.min_tokens, check=t.check)
        run = _LocalRun(small, req.ids_for(small), req)
        escalate = False
        try:
            for token, c in run.steps():
                if token is not None:
                    yield from out.sync(run.text)
                if monitor.push(c):
                    escalate = True
                    break
            else:
                escalate = monitor.finish()
        except _BranchFailed as exc:
            req.log(small, False, exc.message)
            answer = yield from self._last_resort(large, req, out, exc)
            return self._result(
                req, answer, self.policy, fell_back=True, reason=f"{exc}, so the large branch answered", small_confidences=monitor.values
            )
        q = f"q{t.quantile:g} confidence {monitor.score:.3f}"
        extra = {"score": monitor.score, "threshold": t.confidence, "small_confidences": list(monitor.values)}
        if not escalate:
            req.log(small, True)
            answer = run.answer()
            yield from out.sync(run.text)  # the canonical decode
            return self._result(req, answer, self.policy, fell_back=False, reason=f"{q} >= {t.confidence:g}", **extra)
        reason = f"{q} < {t.confidence:g} after {len(monitor.values)} tokens: escalated"
        try:
            answer = yield from self._answer(large, req, _Escalation(out, reason))
        except _BranchFailed as exc:  # resume the small answer where it stopped
            answer = yield from self._last_resort(small, req, out, exc, run=run)
            return self._result(
                req, answer, self.policy, fell_back=True, reason=f"{reason}, but {exc}, so the small branch answered", **extra
            )
        return self._result(req, answer, self.policy, fell_back=False, reason=reason, escalated=True, **extra)

    def _route_speculative(self, req, out):
        from edgekit.runtime.speculative import iter_speculative

        small, large = req.small, req.large
        ids = req.ids_for(small)
        text = _Text(small.tokenizer, "speculative")
        gen = iter_speculative(
            small,
            large,
            ids,
            max_new_tokens=req.max_new_tokens,
            draft_tokens=self.draft_tokens,
            draft_min_confidence=self.draft_min_confidence,
            sampler_params=req.sampler_params,
            seed=req.sampler_params["seed"],
            eos_token_id=sorted(_eos_ids(small.tokenizer)) or None,
        )
        times: list[float] = []
        try:
            while True:
                try:
                    token = next(gen)
                except StopIteration as stop:
                    spec = stop.value
                    break
                times.append(time.perf_counter())
                text.push(token)
                yield from out.sync(text)
        except _BranchFailed as exc:
            failed = small if exc.label == "small" else large
            req.log(failed, False, exc.message)
            other = req.other(failed)
            answer = yield from self._last_resort(other, req, out, exc)
            reason = f"speculative decoding failed: {exc}, so the {other.label} branch answered alone"
            return self._result(req, answer, self.policy, fell_back=True, reason=reason)
        text.finish()
        yield from out.sync(text)
        req.log(small, True)
        req.log(large, True)
        stats = {k: v for k, v in asdict(spec).items() if k not in ("tokens", "confidences", "rounds")}
        stats["tokens_per_large_call"] = spec.tokens_per_large_call
        answer = _Answer(
            "speculative",
            f"{small.name}+{large.name}",
            text.emitted,
            spec.tokens,
            spec.finish_reason,
            spec.confidences[: len(spec.tokens)],
            times[0] - req.t0 if times else None,
            _rate(times),
            token_times=times,
        )
        reason = f"speculative decoding: {spec.accepted}/{spec.drafted} drafts accepted, {spec.large_calls} large calls"
        return self._result(
            req, answer, self.policy, fell_back=False, reason=reason, acceptance_rate=spec.acceptance_rate, speculative=stats
        )


class _Escalation:
    """The _Output seen by the large branch after an escalation: resets carry the reason."""

    def __init__(self, out: _Output, reason: str):
        self.out, self.reason = out, reason

    def sync(self, source, reason: str = ""):
        return self.out.sync(source, reason or self.reason)


__all__ = ["POLICIES", "ConfidenceMonitor", "RouteResult", "Router", "StreamEvent", "Thresholds", "complexity_score"]
