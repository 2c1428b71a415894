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
``learned``
    Score the prompt from the same small prefill with a tiny network trained at calibration
    time (``edgekit calibrate-router --policy learned``; ``edgekit.runtime.learned``): the
    features are the prompt's per-token NLL quantiles, next-token entropies, length and
    character classes; the output predicts the large branch's gain on the prompt.
    ``score > thresholds.learned`` -> large, else the small branch continues from its prefill.
``speculative``
    ``edgekit.runtime.speculative``: the small branch drafts, the large one verifies. Both
    must be local with logits and share the tokenizer; penalties are refused.
``degrade``
    Keeps the large branch within its latency budget under load: the request follows the
    policy ``degrade.protects`` (large_only, input_complexity, cascade or learned) unless the
    :class:`~edgekit.runtime.load.LoadMonitor` (``load=``; shared by the Routers of a
    server) says one more request on the large branch would breach the budget, in which
    case the small branch answers (``degraded`` True, ``degraded_reason`` queue | ttft_p99 |
    tpot_p99) until the monitor recovers. Each answer the large branch gives is recorded in
    the monitor's window.

Stop sequences
--------------
``stop=`` (a string or up to 16): the answer ends before the first one its text contains,
generation stops there and ``finish_reason`` is ``"stop"``; while streaming, the end of the
text that could be the start of one is held back, so no event shows text that is later cut
(``edgekit.runtime.answers``: ``StopScan``). A remote branch gets them too (at most 4, what
OpenAI's API takes) and its answer is cut here whatever it did with them.

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

Settings are checked as :class:`~edgekit.runtime.config.RouterSettings` (the field types of
runtime.json's :class:`~edgekit.runtime.config.RuntimeConfig`); the scores live in
:mod:`edgekit.runtime.scores`, the branch guards (fallback, timeouts) in
:mod:`edgekit.runtime.guards`, one answer's decoding and stream events in
:mod:`edgekit.runtime.answers`; this module holds the policies.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Sequence

from edgekit.errors import EdgekitError
from edgekit.runtime.answers import (Answer, LocalRun, Output, RemoteText, Request, StreamEvent, Text, check_stops, eos_ids,
                                     token_rate)
from edgekit.runtime.config import DegradeSettings, LearnedScorer, RouterSettings, Thresholds, checked
from edgekit.runtime.guards import BranchFailed, Guard
from edgekit.runtime.load import LoadMonitor, load_monitor
from edgekit.runtime.scores import ConfidenceMonitor, complexity_score


@dataclass
class RouteResult:
    text: str  # the answer (canonical decode of `tokens` for a local branch)
    tokens: list[int]  # generated ids, EOS excluded ([] for a remote branch)
    branch: str  # which branch answered: "small" | "large" | "speculative"
    answered_by: str  # that branch's name ("small+large" names for speculative)
    policy: str
    fell_back: bool  # the policy's choice was unavailable and the other branch answered
    reason: str  # one line: why this branch answered
    finish_reason: str  # "eos" | "length" | "stop" (a stop sequence) | a remote's finish_reason
    score: float | None = None  # input_complexity: prompt score; cascade: confidence score; learned: predicted gain
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
    degraded: bool = False  # policy degrade: the large branch was over budget, the small one answered
    degraded_reason: str | None = None  # "queue" | "ttft_p99" | "tpot_p99"

    def to_dict(self) -> dict:
        return asdict(self)


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
        degrade: DegradeSettings | dict | None = None,
        load: LoadMonitor | None = None,
        learned: LearnedScorer | dict | None = None,
    ):
        """``degrade``, ``load``: policy degrade's settings and the load monitor it shares with
        other Routers (default: one of its own from ``degrade``'s explicit budgets); ``learned``:
        policy learned's scorer (runtime.json's ``learned``)."""
        from edgekit.runtime import fastpath, sampling_ref

        # the values as runtime.json takes them (edgekit.runtime.config); what follows checks
        # what only the loaded branches can tell
        settings = checked(RouterSettings, "router", policy=policy, thresholds=thresholds, max_new_tokens=max_new_tokens,
                           draft_tokens=draft_tokens, timeout_s=timeout_s, draft_min_confidence=draft_min_confidence,
                           degrade=degrade.model_dump() if isinstance(degrade, DegradeSettings) else degrade,
                           learned=learned.model_dump() if isinstance(learned, LearnedScorer) else learned)
        policy = settings.policy
        self.small, self.large, self.policy = small, large, policy
        self.thresholds, self.degrade, self.learned = settings.thresholds, settings.degrade, settings.learned
        if "learned" in (policy, settings.degrade.protects if policy == "degrade" else None) and self.learned is None:
            raise EdgekitError("policy learned needs its scorer", where="router.learned",
                               how="run edgekit calibrate-router --policy learned on the bundle")
        # the policy whose checks apply: degrade routes with the policy it protects (or small_only)
        self.protects = settings.degrade.protects if policy == "degrade" else policy
        self.load = load if load is not None or policy != "degrade" else load_monitor(settings.degrade)
        self.active_policy = self.protects  # the policy deciding the request in progress (degrade: it may be small_only)
        needs = {"small_only": ("small",), "large_only": ("large",)}.get(policy, ("small", "large"))
        for label in needs:
            if (small if label == "small" else large) is None:
                raise EdgekitError(f"policy {policy} needs a {label} branch", where="router", how=f"configure the {label} branch")
        if self.protects in ("input_complexity", "cascade", "learned") and not getattr(small, "has_logits", False):
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
        self.max_new_tokens, self.draft_tokens = settings.max_new_tokens, settings.draft_tokens
        self.draft_min_confidence, self.timeout_s, self.seed = settings.draft_min_confidence, settings.timeout_s, seed
        self.sampler_params = self._check_sampler(sampler_params, sampling_ref)
        self.latency = fastpath.LatencyStats()
        self.counts = {"small": 0, "large": 0, "speculative": 0, "fell_back": 0, "escalated": 0}
        if policy == "degrade":
            self.counts["degraded"] = 0

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
        sampler_params, seed, stop for this request only."""
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
        stop: str | Sequence[str] | None = None,
    ) -> Iterator[StreamEvent]:
        """Yield ``StreamEvent``s: "text" pieces, "reset" (drop what was shown: a new
        answer follows from its start), and last "done" with the RouteResult. ``stop``: stop
        sequences (module docstring)."""
        from edgekit.runtime import sampling_ref

        stops = check_stops(stop)
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
        req = Request(
            prompt,
            self.max_new_tokens if max_new_tokens is None else int(max_new_tokens),
            params,
            time.perf_counter(),
            Guard(self.small, "small", self.timeout_s) if self.small is not None else None,
            Guard(self.large, "large", self.timeout_s) if self.large is not None else None,
            stops,
        )
        out = Output()
        self.active_policy = self.protects
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
        guard = Guard(self.small, "small", None)
        req = Request(prompt if isinstance(prompt, str) else list(prompt), 1, {}, time.perf_counter(), guard, None)
        run = LocalRun(guard, req.ids_for(guard), req)
        try:
            logits = run.prefill()
            return complexity_score(logits, run.ids, self.thresholds.length_weight)[0]
        except BranchFailed as exc:
            raise EdgekitError(str(exc), where="router.small", how="check the small branch") from None
        finally:
            guard.close()

    def learned_score(self, prompt: str | Sequence[int]) -> float:
        """The learned policy's score of a prompt (one small prefill, nothing generated)."""
        return self.learned_scores(prompt)[0]

    def learned_scores(self, prompt: str | Sequence[int]) -> tuple[float, list[float]]:
        """(learned score or nan without a scorer, the prompt's features) from one small prefill."""
        from edgekit.runtime.learned import prompt_features, score

        guard = Guard(self.small, "small", None)
        req = Request(prompt if isinstance(prompt, str) else list(prompt), 1, {}, time.perf_counter(), guard, None)
        run = LocalRun(guard, req.ids_for(guard), req)
        try:
            features = prompt_features(run.prefill(), run.ids, req.text())
        except BranchFailed as exc:
            raise EdgekitError(str(exc), where="router.small", how="check the small branch") from None
        finally:
            guard.close()
        return (score(self.learned, features) if self.learned is not None else float("nan")), features

    def confidence_score(self, prompt: str | Sequence[int], *, max_new_tokens: int | None = None) -> float:
        """The cascade score of a prompt: the small branch generates its whole answer (no
        early stop) and the score is min over the decision points of the low quantile; the
        cascade escalates iff this is below ``thresholds.confidence``."""
        t = self.thresholds
        guard = Guard(self.small, "small", None)
        params = {**self.sampler_params, "seed": int(self.sampler_params.get("seed", self.seed))}
        req = Request(
            prompt if isinstance(prompt, str) else list(prompt),
            self.max_new_tokens if max_new_tokens is None else max_new_tokens,
            params,
            time.perf_counter(),
            guard,
            None,
        )
        monitor = ConfidenceMonitor(t.confidence, quantile=t.quantile, min_tokens=t.min_tokens, check=t.check)
        run = LocalRun(guard, req.ids_for(guard), req)
        try:
            for _, c in run.steps():
                monitor.push(c)
            monitor.finish()
            return monitor.score
        except BranchFailed as exc:
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
        if result.degraded:
            self.counts["degraded"] += 1
        if result.ttft_s is not None:
            self.latency.record_ttft(max(0.0, result.ttft_s))
        times = getattr(result, "_token_times", None) or []
        for a, b in zip(times, times[1:]):
            self.latency.record_token(max(0.0, b - a))

    @staticmethod
    def _result(req: Request, answer: Answer, policy: str, *, fell_back: bool, reason: str, **extra) -> RouteResult:
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

    def _answer(self, guard: Guard, req: Request, out: Output, run: LocalRun | None = None):
        """Generator: one branch answers in full, streaming; returns an Answer or raises
        BranchFailed (logged)."""
        try:
            if guard.has_logits:
                run = run or LocalRun(guard, req.ids_for(guard), req)
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
                    stop=req.stop[:4] or None,  # OpenAI's API takes 4; the text is cut here in any case
                )
                elapsed = time.perf_counter() - req.t0
                usage = reply.get("usage") or None
                n_out = (usage or {}).get("completion_tokens")
                text = RemoteText(guard.label, reply["text"], req.stop)
                answer = Answer(
                    guard.label,
                    guard.name,
                    text.emitted,
                    [],
                    "stop" if text.stopped else str(reply.get("finish_reason") or "stop"),
                    [],
                    elapsed,
                    None,
                    usage=usage,
                )
                if isinstance(n_out, int) and n_out > 0 and guard.started is not None:
                    answer.tokens_per_s = n_out / max(1e-9, time.perf_counter() - guard.started)
                yield from out.sync(text)
        except BranchFailed as exc:
            req.log(guard, False, exc.message)
            raise
        req.log(guard, True)
        return answer

    def _answer_either(self, first: Guard, req: Request, out: Output, reason: str, runs: dict | None = None, **extra):
        """Generator: ``first`` answers, or the other branch when it is unavailable;
        ``runs`` maps a label to a LocalRun already prefilled for it (reused)."""
        runs = runs or {}
        try:
            answer = yield from self._answer(first, req, out, runs.get(first.label))
            return self._result(req, answer, self.policy, fell_back=False, reason=reason, **extra)
        except BranchFailed as exc:
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

    def _last_resort(self, guard: Guard, req: Request, out: Output, failure: BranchFailed, run: LocalRun | None = None):
        try:
            return (yield from self._answer(guard, req, out, run))
        except BranchFailed as exc:
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

        def scored(run):
            value, mean_nll = complexity_score(run.prefill(), run.ids, t.length_weight)
            return value, f"prompt score {value:.3f} (mean NLL {mean_nll:.3f} nats over {len(run.ids)} tokens)"

        return (yield from self._route_by_prompt_score(req, out, scored, t.complexity))

    def _route_learned(self, req, out):
        from edgekit.runtime.learned import prompt_features, score

        def scored(run):
            value = score(self.learned, prompt_features(run.prefill(), run.ids, req.text()))
            return value, f"learned score {value:.3f} over {len(run.ids)} tokens"

        return (yield from self._route_by_prompt_score(req, out, scored, self.thresholds.learned))

    def _route_by_prompt_score(self, req, out, scored, threshold: float):
        """Policies that decide before generating: one small prefill, ``scored(run) -> (score,
        detail)``; above ``threshold`` the large branch answers, else the small one continues
        from that prefill (it is reused by the fallback too). A failed prefill: the large branch."""
        small = req.small
        try:
            run = LocalRun(small, req.ids_for(small), req)
            value, detail = scored(run)
        except BranchFailed as exc:
            req.log(small, False, exc.message)
            answer = yield from self._last_resort(req.large, req, out, exc)
            return self._result(
                req, answer, self.policy, fell_back=True, reason=f"{exc} (could not score the prompt), so the large branch answered"
            )
        extra = {"score": value, "threshold": threshold}
        if value > threshold:
            return (yield from self._answer_either(req.large, req, out, f"{detail} > {threshold:g}", {"small": run}, **extra))
        return (yield from self._answer_either(small, req, out, f"{detail} <= {threshold:g}", {"small": run}, **extra))

    def _route_cascade(self, req, out):
        t = self.thresholds
        small, large = req.small, req.large
        monitor = ConfidenceMonitor(t.confidence, quantile=t.quantile, min_tokens=t.min_tokens, check=t.check)
        run = LocalRun(small, req.ids_for(small), req)
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
        except BranchFailed as exc:
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
        except BranchFailed as exc:  # resume the small answer where it stopped
            answer = yield from self._last_resort(small, req, out, exc, run=run)
            return self._result(
                req, answer, self.policy, fell_back=True, reason=f"{reason}, but {exc}, so the small branch answered", **extra
            )
        return self._result(req, answer, self.policy, fell_back=False, reason=reason, escalated=True, **extra)

    def _route_degrade(self, req, out):
        decision = self.load.admit()
        if not decision.large:
            self.active_policy = "small_only"
            result = yield from self._answer_either(req.small, req, out, f"degraded ({decision.reason}): {decision.detail}; "
                                                    "the small branch answered")
            result.degraded, result.degraded_reason = True, decision.reason
            return result
        result = None
        try:
            result = yield from getattr(self, "_route_" + self.protects)(req, out)
            return result
        finally:  # also when the request is abandoned (the stream closed): the queue must not leak
            answered = result is not None and result.branch == "large"
            tpot = 1.0 / result.tokens_per_s if answered and result.tokens_per_s else None
            self.load.release(decision.ticket, ttft_s=result.ttft_s if answered else None, tpot_s=tpot)

    def _route_speculative(self, req, out):
        from edgekit.runtime.speculative import iter_speculative

        small, large = req.small, req.large
        ids = req.ids_for(small)
        text = Text(small.tokenizer, "speculative", req.stop)
        gen = iter_speculative(
            small,
            large,
            ids,
            max_new_tokens=req.max_new_tokens,
            draft_tokens=self.draft_tokens,
            draft_min_confidence=self.draft_min_confidence,
            sampler_params=req.sampler_params,
            seed=req.sampler_params["seed"],
            eos_token_id=sorted(eos_ids(small.tokenizer)) or None,
        )
        times: list[float] = []
        try:
            while True:
                try:
                    token = gen.send(text.stopped or None)  # a true value: stop after the token just yielded
                except StopIteration as stop:
                    spec = stop.value
                    break
                times.append(time.perf_counter())
                text.push(token)
                yield from out.sync(text)
        except BranchFailed as exc:
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
        answer = Answer(
            "speculative",
            f"{small.name}+{large.name}",
            text.emitted,
            spec.tokens,
            spec.finish_reason,
            spec.confidences[: len(spec.tokens)],
            times[0] - req.t0 if times else None,
            token_rate(times),
            token_times=times,
        )
        reason = f"speculative decoding: {spec.accepted}/{spec.drafted} drafts accepted, {spec.large_calls} large calls"
        return self._result(
            req, answer, self.policy, fell_back=False, reason=reason, acceptance_rate=spec.acceptance_rate, speculative=stats
        )


class _Escalation:
    """The Output seen by the large branch after an escalation: resets carry the reason."""

    def __init__(self, out: Output, reason: str):
        self.out, self.reason = out, reason

    def sync(self, source, reason: str = ""):
        return self.out.sync(source, reason or self.reason)


__all__ = ["RouteResult", "Router"]
