"""One request's generation: the router's event stream turned into what the client may see.

The router (``edgekit.runtime.router``) yields "text" pieces, "reset" (the text shown so far
is abandoned and a new answer follows from its start) and "done"; it applies the request's
stop sequences itself (the answer is cut before the first one, generation stops, and no piece
carries text that is later cut). A client must never get text that is later taken back
without being told, so :class:`Assembler` keeps two strings: ``view``, the router's current
answer, and ``sent``, what the client has received. It sends ``view``'s new part when
``view`` still begins with ``sent``, else a reset signal and the new answer from its start.
What it holds back:

* **cascade**: the small branch's answer, until the router commits to it (the answer ended
  without escalating) or escalates (the large branch's answer then streams as it comes), so
  an escalation never retracts anything the client saw (the router's ``active_policy``: a
  degrade policy that protects a cascade and is degraded answers with the small branch only,
  which streams as it comes);
* **stop sequences** given to the Assembler itself (for an event stream that did not apply
  them; the server gives them to the router): the router's :class:`StopScan`, on ``view``.

A reset signal therefore reaches a client only when a branch fails in the middle of an
answer it was streaming (a local branch past ``timeout_s``, a large branch failing after an
escalation) and the other branch answers from the start.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from edgekit.errors import EdgekitError
from edgekit.runtime.answers import StopScan


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
        self.scan = StopScan(stops)
        self.hold_small = hold_small
        self.view = ""
        self.branch: str | None = None
        self.sent = ""
        self.stopped = False
        self.first_at: float | None = None  # time of the current answer's first text
        self.last_at: float | None = None
        self.resets_sent = 0
        self._last_reset_reason = ""

    def push(self, event: Any, now: float) -> None:
        if event.kind == "reset":
            self.view, self.first_at, self.last_at = "", None, None
            self.scan.reset()
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
        if self.stopped:
            return
        cut = self.scan.find(self.view)
        if cut is not None:
            self.view = self.view[:cut]
            self.stopped = True

    def flush(self, final: bool) -> list[tuple[str, str]]:
        """The actions for the client now: ("text", piece) and ("reset", reason)."""
        settled = final or self.stopped
        if not settled and self.hold_small and self.branch == "small":
            return []
        safe = self.view if settled else self.view[: len(self.view) - self.scan.held(self.view)]
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
    finish_reason: str | None  # the router's: "eos", "length", "stop" (a stop sequence), a remote's
    stopped: bool  # cut at a stop sequence
    branch: str | None
    answered_by: str | None
    fell_back: bool | None
    escalated: bool
    reason: str
    result: Any  # the RouteResult
    completion_tokens: int
    ttft_s: float | None  # generation start -> the answer's first token
    tpot_s: float | None  # mean time per output token after the first
    resets_sent: int
    degraded: bool = False  # policy degrade: the large branch was over budget, the small one answered
    degraded_reason: str | None = None  # "queue" | "ttft_p99" | "tpot_p99"


def generate(router: Any, prompt: Any, *, max_tokens: int, sampler_params: dict, seed: int | None, stops: list[str],
             deadline: float, count_tokens: Callable[[str], int], emit: Callable[[str, str], None] | None = None,
             client_gone: Callable[[], bool] | None = None, cancelled: Callable[[], bool] | None = None,
             keepalive_s: float = 10.0) -> Outcome:
    """Run one request through ``router`` (``stops``: its stop sequences, which the router
    applies). ``emit(kind, text)`` (streaming) receives "text", "reset" and "ping" (nothing sent
    for ``keepalive_s``, e.g. a held cascade answer) and may raise :class:`ClientGone`;
    ``client_gone()`` and ``cancelled()`` are polled between tokens. ``count_tokens(text)``
    counts the completion tokens of a remote answer without usage. Raises RequestTimeout,
    ClientGone, Cancelled or GenerationFailed."""
    assembler = Assembler([], hold_small=router.policy == "cascade")
    last_write = time.perf_counter()
    stream = router.stream(prompt, max_new_tokens=max_tokens, sampler_params=sampler_params, seed=seed, stop=stops)
    result = None
    try:
        for event in stream:
            now = time.perf_counter()
            if cancelled is not None and cancelled():
                raise Cancelled()
            if client_gone is not None and client_gone():
                raise ClientGone()
            # decided by the time the first event comes: degrade may answer with the small branch alone
            assembler.hold_small = router.active_policy == "cascade"
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
            if final:
                break
            if now > deadline:
                raise RequestTimeout()
    except EdgekitError as exc:
        raise GenerationFailed(exc.one_line()) from None
    finally:
        stream.close()  # an abandoned generation: the router closes its sessions
    if result is None:  # pragma: no cover - the router's stream always ends with "done"
        raise GenerationFailed("the router ended without an answer")

    usage_tokens = (result.usage or {}).get("completion_tokens")
    if result.tokens:  # generated, the tokens of a stop sequence included
        n_tokens = len(result.tokens)
    elif isinstance(usage_tokens, int) and usage_tokens >= 0:
        n_tokens = usage_tokens
    else:
        n_tokens = count_tokens(result.text) if result.text else 0
    tpot = 1.0 / result.tokens_per_s if result.tokens_per_s else None
    return Outcome(assembler.view, result.finish_reason, result.finish_reason == "stop", result.branch, result.answered_by,
                   result.fell_back, bool(result.escalated), result.reason, result, n_tokens, result.ttft_s, tpot,
                   assembler.resets_sent, bool(getattr(result, "degraded", False)), getattr(result, "degraded_reason", None))
