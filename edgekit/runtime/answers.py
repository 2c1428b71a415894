"""How one answer is produced and shown: the request, plain decoding on a local branch,
incremental detokenization and the stream events that keep the client's text equal to the
answer's (pieces, resets)."""

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


class Text:
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


class RemoteText:
    def __init__(self, label: str, text: str):
        self.label, self.emitted = label, text


class Output:
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
        self.text = Text(guard.tokenizer, guard.label)
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
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(eos)} if isinstance(eos, int) else {int(t) for t in eos}


@dataclass
class Request:
    prompt: str | list[int]
    max_new_tokens: int
    sampler_params: dict  # fastpath.Sampler kwargs, seed included
    t0: float
    small: Guard | None
    large: Guard | None
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


__all__ = ["Answer", "LocalRun", "Output", "RemoteText", "Request", "StreamEvent", "Text", "eos_ids", "token_rate"]
