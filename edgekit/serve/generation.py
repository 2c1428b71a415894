"""One request's generation: the router's event stream turned into what the client may see.

The router (``edgekit.runtime.router``) yields "text" pieces, "reset" (the text shown so far
is abandoned and a new answer follows from its start) and "done". A client must never get
text that is later taken back without being told, so :class:`Assembler` keeps two strings:
``view``, the router's current answer, and ``sent``, what the client has received. It sends
``view``'s new part when ``view`` still begins with ``sent``, else a reset signal and the new
answer from its start. What it holds back:

* **cascade**: the small branch's answer, until the router commits to it (the answer ended
  without escalating) or escalates (the large branch's answer then streams as it comes), so
  an escalation never retracts anything the client saw;
* **stop sequences**: the end of ``view`` while it could be the start of a stop sequence; when
  one appears, the answer is cut before it and generation stops.

A reset signal therefore reaches a client only when a branch fails in the middle of an
answer it was streaming (a local branch past ``timeout_s``, a large branch failing after an
escalation) and the other branch answers from the start.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from edgekit.errors import EdgekitError


class ClientGone(Exception):
    """The client closed the connection; the generation stops."""


class RequestTimeout(Exception):
    """The request ran past its deadline (--request-timeout)."""


class GenerationFailed(Exception):
    """The router could not answer (both branches unavailable)."""


class Cancelled(Exception):
    """The server stopped the generation (its shutdown grace period ended)."""


class Assembler:
    def __init__(self, stops: list[str], *, hold_small: bool):
        self.stops = [s for s in stops if s]
        self.hold_small = hold_small
        self.view = ""
        self.branch: str | None = None
        self.sent = ""
        self.stopped = False
        self.first_at: float | None = None  # time of the current answer's first text
        self.last_at: float | None = None
        self.resets_sent = 0
        self._last_reset_reason = ""
        self._scanned = 0  # view[:_scanned] holds no stop sequence

    def push(self, event: Any, now: float) -> None:
        if event.kind == "reset":
            self.view, self._scanned, self.first_at, self.last_at = "", 0, None, None
            self.branch = event.branch
            self._last_reset_reason = event.reason
            return
        if event.kind != "text" or not event.text:
            return
        self.view += event.text
        self.branch = event.branch
        if self.first_at is None:
            self.first_at = now
        self.last_at = now
        self._cut_at_stop()

    def _cut_at_stop(self) -> None:
        if not self.stops or self.stopped:
            return
        longest = max(len(s) for s in self.stops)
        start = max(0, self._scanned - longest + 1)
        hits = [i for i in (self.view.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.view = self.view[: min(hits)]
            self.stopped = True
        self._scanned = len(self.view)

    def _held_tail(self) -> int:
        """How many trailing characters of ``view`` could begin a stop sequence."""
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.view)), keep, -1):
                if self.view.endswith(s[:n]):
                    keep = n
                    break
        return keep

    def flush(self, final: bool) -> list[tuple[str, str]]:
        """The actions for the client now: ("text", piece) and ("reset", reason)."""
        settled = final or self.stopped
        if not settled and self.hold_small and self.branch == "small":
            return []
        safe = self.view if settled else self.view[: len(self.view) - self._held_tail()]
        actions: list[tuple[str, str]] = []
        if safe.startswith(self.sent):
            if len(safe) > len(self.sent):
                actions.append(("text", safe[len(self.sent):]))
        else:
            actions.append(("reset", self._last_reset_reason or "the answer changed"))
            self.resets_sent += 1
            if safe:
                actions.append(("text", safe))
        self.sent = safe
        return actions


@dataclass
class Outcome:
    text: str
    finish_reason: str | None  # the router's ("eos", "length", a remote's) unless stopped
    stopped: bool  # cut at a stop sequence
    branch: str | None
    answered_by: str | None
    fell_back: bool | None  # None: unknown (cut at a stop sequence before the router finished)
    escalated: bool
    reason: str
    result: Any  # the RouteResult, or None when generation stopped at a stop sequence
    completion_tokens: int
    ttft_s: float | None  # generation start -> the answer's first token
    tpot_s: float | None  # mean time per output token after the first
    resets_sent: int


def branch_names(router: Any) -> dict[str, str]:
    names = {"small": str(getattr(router.small, "name", "small"))}
    if router.large is not None:
        names["large"] = str(getattr(router.large, "name", "large"))
        names["speculative"] = f"{names['small']}+{names['large']}"
    return names


def _inferred_fallback(policy: str, branch: str | None) -> bool | None:
    chosen = {"small_only": "small", "large_only": "large", "speculative": "speculative"}.get(policy)
    return None if chosen is None or branch is None else branch != chosen


def generate(router: Any, prompt: Any, *, max_tokens: int, sampler_params: dict, seed: int | None, stops: list[str],
             deadline: float, count_tokens: Callable[[str], int], emit: Callable[[str, str], None] | None = None,
             client_gone: Callable[[], bool] | None = None, cancelled: Callable[[], bool] | None = None,
             keepalive_s: float = 10.0) -> Outcome:
    """Run one request through ``router``. ``emit(kind, text)`` (streaming) receives "text",
    "reset" and "ping" (nothing sent for ``keepalive_s``, e.g. a held cascade answer) and may
    raise :class:`ClientGone`; ``client_gone()`` and ``cancelled()`` are polled between tokens.
    ``count_tokens(text)`` counts the completion tokens of an answer the router's result does not
    count (cut at a stop sequence, or a remote answer without usage). Raises RequestTimeout,
    ClientGone, Cancelled or GenerationFailed."""
    assembler = Assembler(stops, hold_small=router.policy == "cascade")
    started = last_write = time.perf_counter()
    stream = router.stream(prompt, max_new_tokens=max_tokens, sampler_params=sampler_params, seed=seed)
    result = None
    try:
        for event in stream:
            now = time.perf_counter()
            if cancelled is not None and cancelled():
                raise Cancelled()
            if client_gone is not None and client_gone():
                raise ClientGone()
            final = event.kind == "done"
            if final:
                result = event.result
            else:
                assembler.push(event, now)
            actions = assembler.flush(final)
            if emit is not None:
                for kind, text in actions:
                    emit(kind, text)
                    last_write = now
                if not actions and now - last_write > keepalive_s:
                    emit("ping", "")
                    last_write = now
            if final or assembler.stopped:
                break
            if now > deadline:
                raise RequestTimeout()
    except EdgekitError as exc:
        raise GenerationFailed(exc.one_line()) from None
    finally:
        stream.close()  # a stopped or abandoned generation: the router closes its sessions

    names = branch_names(router)
    if result is not None:
        branch, answered_by, fell_back = result.branch, result.answered_by, result.fell_back
        escalated, reason, ttft = bool(result.escalated), result.reason, result.ttft_s
        tpot = 1.0 / result.tokens_per_s if result.tokens_per_s else None
        router_finish = result.finish_reason
        usage_tokens = (result.usage or {}).get("completion_tokens")
        if assembler.stopped:
            n_tokens = count_tokens(assembler.view)
        elif result.tokens:
            n_tokens = len(result.tokens)
        elif isinstance(usage_tokens, int) and usage_tokens >= 0:
            n_tokens = usage_tokens
        else:
            n_tokens = count_tokens(assembler.view) if assembler.view else 0
    else:
        branch = assembler.branch
        answered_by = names.get(branch or "", branch)
        fell_back = _inferred_fallback(router.policy, branch)
        escalated = router.policy == "cascade" and branch == "large"
        reason = f"policy {router.policy}; cut at a stop sequence before the router finished"
        ttft = assembler.first_at - started if assembler.first_at is not None else None
        router_finish = None
        n_tokens = count_tokens(assembler.view) if assembler.view else 0
        first, last = assembler.first_at, assembler.last_at
        timed = first is not None and last is not None and last > first and n_tokens > 1
        tpot = (last - first) / (n_tokens - 1) if timed else None
    return Outcome(assembler.view, router_finish, assembler.stopped, branch, answered_by, fell_back, escalated, reason, result,
                   n_tokens, ttft, tpot, assembler.resets_sent)
