"""How one answer is produced and shown: the request, plain decoding on a local branch,
incremental detokenization, stop sequences and the stream events that keep the client's text
equal to the answer's (pieces, resets).

Stop sequences (``Request.stop``) are applied here, once for every consumer of the router
(``edgekit run``, the server): an answer's text ends before the first stop sequence it
contains, its generation stops there (finish reason ``"stop"``), and while it is still being
generated the end of its text that could be the start of a stop sequence is held back
(:class:`StopScan`), so a stream never shows text that is later cut."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

from edgekit.errors import EdgekitError
from edgekit.runtime.guards import BranchFailed, Guard

if TYPE_CHECKING:  # the router's result rides on the last event; the router imports this module
    from edgekit.runtime.router import RouteResult


@dataclass
class StreamEvent:
    kind: str  # "text" | "reset" | "done"
    text: str = ""  # "text": the new piece
    branch: str | None = None  # the branch the text comes from
    reason: str = ""  # "reset": why
    result: RouteResult | None = None  # "done"


MAX_STOPS = 16  # stop sequences per request
MAX_STOP_CHARS = 256  # characters per stop sequence


def check_stops(stop: Any) -> list[str]:
    """A request's stop sequences (a string, or a list of strings) as a list, or a one-line
    EdgekitError: at most MAX_STOPS non-empty strings of at most MAX_STOP_CHARS characters."""
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
        raise EdgekitError("stop sequences must be strings", where="stop", how="pass a string or a list of strings")
    if len(stops) > MAX_STOPS or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise EdgekitError(f"at most {MAX_STOPS} stop sequences of 1 to {MAX_STOP_CHARS} characters", where="stop",
                           how="shorten the list")
    return list(stops)


class StopScan:
    """Where a growing text must end: its first stop sequence, and how much of its end must be
    held back because it could be the start of one. ``find`` scans only what is new since its
    last call (a stop sequence can straddle the old end), so a long answer is scanned once."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._longest = max((len(s) for s in self.stops), default=0)
        self._scanned = 0  # text[:_scanned] holds no stop sequence

    def reset(self) -> None:
        """A new text follows (it does not continue the one scanned)."""
        self._scanned = 0

    def find(self, text: str) -> int | None:
        """The index of the first stop sequence in ``text`` (which continues the text of the
        previous call), or None."""
        if not self.stops:
            return None
        start = max(0, self._scanned - self._longest + 1)
        hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        self._scanned = len(text)
        return min(hits) if hits else None

    def held(self, text: str) -> int:
        """How many trailing characters of ``text`` could begin a stop sequence."""
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:n]):
                    keep = n
                    break
        return keep


class Text:
    """Incremental detokenization of one answer (TGI's prefix/read offsets): a piece is
    released once it does not end in a partial UTF-8 character. With stop sequences,
    ``emitted`` ends before the first one (``stopped``), and ``visible`` (what may be shown
    now) leaves out a tail that could still become one."""

    def __init__(self, tokenizer: Any, label: str, stops: list[str] | None = None):
        self.tokenizer, self.label = tokenizer, label
        self.ids: list[int] = []
        self.emitted = ""
        self.stopped = False  # cut at a stop sequence
        self.finished = False
        self.scan = StopScan(stops or [])
        self._prefix = self._read = 0

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> None:
        self.ids.append(token)
        if self.stopped:
            return
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.emitted += after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
            cut = self.scan.find(self.emitted)
            if cut is not None:
                self.emitted, self.stopped = self.emitted[:cut], True

    @property
    def visible(self) -> str:
        if self.stopped or self.finished:
            return self.emitted
        return self.emitted[: len(self.emitted) - self.scan.held(self.emitted)]

    def finish(self) -> str:
        """The canonical text (a full decode, cut at its first stop sequence); ``emitted``
        becomes it."""
        full = self._decode(self.ids)
        self.scan.reset()
        cut = self.scan.find(full)
        if cut is not None:
            self.emitted, self.stopped = full[:cut], True
        elif not self.stopped:  # a decode that lost the stop sequence the pieces had keeps the cut text
            self.emitted = full
        self.finished = True
        return self.emitted


class RemoteText:
    """A remote branch's whole answer, cut at its first stop sequence (whether or not the
    endpoint applied them)."""

    def __init__(self, label: str, text: str, stops: list[str] | None = None):
        cut = StopScan(stops or []).find(text)
        self.label, self.stopped = label, cut is not None
        self.emitted = self.visible = text if cut is None else text[:cut]


class Output:
    """Keeps the client's view equal to one answer's text: a continuation of what was
    shown is sent as a piece, anything else as a reset and the full text."""

    def __init__(self):
        self.current = None
        self.shown = ""

    def sync(self, source, reason: str = "") -> Iterator[StreamEvent]:
        text = source.visible
        if source is self.current and text.startswith(self.shown):
            if len(text) > len(self.shown):
                yield StreamEvent("text", text[len(self.shown) :], source.label)
        else:
            if self.shown:
                yield StreamEvent("reset", "", source.label, reason or f"switching to the {source.label} branch")
            if text:
                yield StreamEvent("text", text, source.label)
        self.current, self.shown = source, text


@dataclass
class Answer:
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


class LocalRun:
    """Plain decoding on one local branch; ``steps()`` is resumable (a cascade stops it
    and may resume it if the large branch fails)."""

    def __init__(self, guard: Guard, ids: list[int], req: Request):
        self.guard, self.ids, self.req = guard, ids, req
        self.session = None
        self.last = None
        self.prefill_logits = None
        self.tokens: list[int] = []
        self.confidences: list[float] = []
        self.times: list[float] = []
        self.finish: str | None = None
        self.text = Text(guard.tokenizer, guard.label, req.stop)
        self._steps = None

    def prefill(self):
        if self.session is None:
            context = int(getattr(self.guard, "context_length", 0) or 0)
            if context and len(self.ids) > context:
                raise BranchFailed(self.guard.label, f"the prompt has {len(self.ids)} tokens, over its context length {context}")
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
        eos = eos_ids(self.guard.tokenizer)
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
            if self.text.stopped:
                self.finish = "stop"
                yield token, c
                return
            yield token, c
            if len(self.tokens) < budget:
                self.last = self.session.feed([token])[-1]

    def answer(self) -> Answer:
        self.text.finish()
        return Answer(
            self.guard.label,
            self.guard.name,
            self.text.emitted,
            list(self.tokens),
            self.finish or "length",
            list(self.confidences),
            self.times[0] - self.req.t0 if self.times else None,
            token_rate(self.times),
            token_times=list(self.times),
        )


def token_rate(times: list[float]) -> float | None:
    if len(times) < 2 or times[-1] <= times[0]:
        return None
    return (len(times) - 1) / (times[-1] - times[0])


def eos_ids(tokenizer: Any) -> set[int]:
    """The ids an answer ends at: the tokenizer's eos token and the model's
    generation_config.json ``eos_token_id`` (BundleTokenizer.generation_eos_token_ids), which
    transformers' generate stops at and which may be another token."""
    eos = getattr(tokenizer, "eos_token_id", None)
    ids = set() if eos is None else {int(eos)} if isinstance(eos, int) else {int(t) for t in eos}
    return ids | {int(t) for t in getattr(tokenizer, "generation_eos_token_ids", ())}


@dataclass
class Request:
    prompt: str | list[int]
    max_new_tokens: int
    sampler_params: dict  # fastpath.Sampler kwargs, seed included
    t0: float
    small: Guard | None
    large: Guard | None
    stop: list[str] = field(default_factory=list)  # stop sequences (check_stops)
    attempts: list[dict] = field(default_factory=list)
    _ids: dict = field(default_factory=dict)

    def ids_for(self, guard: Guard) -> list[int]:
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

    def other(self, guard: Guard) -> Guard | None:
        return self.large if guard is self.small else self.small

    def log(self, guard: Guard, ok: bool, error: str | None = None) -> None:
        seconds = time.perf_counter() - guard.started if guard.started is not None else 0.0
        self.attempts.append({"branch": guard.label, "name": guard.name, "ok": ok, "error": error, "seconds": seconds})


__all__ = ["MAX_STOPS", "MAX_STOP_CHARS", "Answer", "LocalRun", "Output", "RemoteText", "Request", "StopScan", "StreamEvent",
           "Text", "check_stops", "eos_ids", "token_rate"]
