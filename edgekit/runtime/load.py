"""The large branch's load, for the ``degrade`` routing policy: when admitting one more
request to the large branch would breach the latency budget, requests go to the small branch
until it recovers.

    monitor = LoadMonitor(tpot_budget_s=0.05, ttft_budget_s=0.5)   # or load_monitor(settings, budgets)
    decision = monitor.admit()          # one request: may it use the large branch?
    if decision.large:
        ...                              # answer with the protected policy
        monitor.release(decision.ticket, ttft_s=..., tpot_s=...)   # what the large branch took
    else:
        decision.reason, decision.detail  # "queue" | "ttft_p99" | "tpot_p99", and a sentence

One monitor is shared by every Router of a server (thread-safe: one lock, no I/O under it).
It keeps

* the **queue**: requests admitted to the large branch and not yet released;
* a **window** of the large branch's recent answers (the last ``window`` of them, none older
  than ``window_s``): time to first token, mean time per output token, and how many requests
  shared the branch meanwhile (time-weighted mean of the queue over the answer).

Signals, each a ratio to its budget (> 1: breached):

``queue``
    With ``max_large_in_flight`` set: (queue + 1) / max_large_in_flight. Without it, a
    prediction: an unbatched branch serves its streams one after another, so one stream's
    per-token time is about ``u × (streams sharing it)``, with ``u`` the window's median of
    ``tpot / sharing`` (and likewise for the TTFT); one more request would see ``u × (queue
    + 1)``. An empty window or an empty queue predicts nothing (one stream alone is the p99
    signals' business). For a branch that batches its streams the prediction is pessimistic:
    set ``max_large_in_flight`` instead.
``ttft_p99`` / ``tpot_p99``
    The window's 99th percentile (numpy's linear method) over the budget.

Hysteresis: the monitor becomes *degraded* when a signal exceeds 1, and leaves that state
only when every signal is at most ``recover`` (for the count of ``max_large_in_flight``:
queue + 1 <= max(1, floor(recover × max))). So a latency that hovers at the budget switches
the policy once, not at every request. A degraded monitor admits nothing to the large
branch, so its window only empties with time (``window_s``): the first request after that
tries the large branch again.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from edgekit.errors import EdgekitError

REASONS = ("queue", "ttft_p99", "tpot_p99")  # the order signals are reported in


@dataclass(frozen=True)
class Ticket:
    """A request admitted to the large branch."""

    started: float
    area: float  # the queue's time integral when it was admitted


@dataclass(frozen=True)
class Decision:
    large: bool  # the request may use the large branch (then release its ticket)
    reason: str | None  # degraded: the signal that holds the monitor degraded
    detail: str  # one sentence: the signal against its budget
    ticket: Ticket | None = None


@dataclass(frozen=True)
class _Answer:
    at: float
    ttft_s: float | None
    tpot_s: float | None
    sharing: float  # mean requests on the large branch during the answer (>= 1)


def _quantile(values: list[float], q: float) -> float:
    """numpy's linear-interpolation quantile of a non-empty list."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


class LoadMonitor:
    """The large branch's queue and recent latency against its budgets (module docstring)."""

    def __init__(self, *, tpot_budget_s: float | None = None, ttft_budget_s: float | None = None,
                 max_in_flight: int | None = None, window: int = 64, window_s: float = 30.0, recover: float = 0.8,
                 clock: Callable[[], float] = time.monotonic):
        for name, value in (("tpot_budget_s", tpot_budget_s), ("ttft_budget_s", ttft_budget_s)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise EdgekitError(f"{name} must be a positive number, got {value!r}", where="degrade", how="fix the budget")
        if max_in_flight is not None and max_in_flight < 1:
            raise EdgekitError(f"max_large_in_flight must be at least 1, got {max_in_flight}", where="degrade",
                               how="fix the value")
        if tpot_budget_s is None and ttft_budget_s is None and max_in_flight is None:
            raise EdgekitError("policy degrade has no budget to keep", where="degrade",
                               how="set runtime.degrade.tpot_p99_ms / ttft_p99_ms / max_large_in_flight, or the "
                               "recipe's budgets.latency_p99_ms / ttft_p99_ms")
        if not (0 < recover < 1) or window < 1 or not window_s > 0:
            raise EdgekitError("degrade: recover must be in (0, 1), window >= 1 and window_s > 0", where="degrade",
                               how="fix the value")
        self.tpot_budget_s, self.ttft_budget_s, self.max_in_flight = tpot_budget_s, ttft_budget_s, max_in_flight
        self.window_s, self.recover, self.clock = float(window_s), float(recover), clock
        self._answers: deque[_Answer] = deque(maxlen=int(window))
        self._lock = threading.Lock()
        self.in_flight = 0
        self._area = 0.0  # time integral of in_flight
        self._changed = clock()
        self.degraded = False
        self.reason: str | None = None
        self.transitions = 0  # entries into and exits from the degraded state
        self.downgrades = {r: 0 for r in REASONS}  # requests sent to the small branch, by reason

    # ------------------------------------------------------------------ requests

    def admit(self) -> Decision:
        """Decide one request: the large branch (a ticket to release) or, degraded, the small one."""
        with self._lock:
            now = self.clock()
            signals = self._evaluate(now)
            if self.degraded:
                self.downgrades[self.reason] += 1
                return Decision(False, self.reason, signals[self.reason][1])
            self._advance(now)
            self.in_flight += 1
            return Decision(True, None, "the large branch is within budget", Ticket(now, self._area))

    def release(self, ticket: Ticket, *, ttft_s: float | None = None, tpot_s: float | None = None) -> None:
        """The request of ``ticket`` left the large branch; ``ttft_s`` / ``tpot_s``: what the
        large branch took to answer it (None: it did not answer, nothing is recorded)."""
        with self._lock:
            now = self.clock()
            self._advance(now)
            self.in_flight = max(0, self.in_flight - 1)
            ttft_s = ttft_s if ttft_s is not None and math.isfinite(ttft_s) and ttft_s >= 0 else None
            tpot_s = tpot_s if tpot_s is not None and math.isfinite(tpot_s) and tpot_s >= 0 else None
            if ttft_s is None and tpot_s is None:
                return
            span = now - ticket.started
            sharing = (self._area - ticket.area) / span if span > 0 else 1.0
            self._answers.append(_Answer(now, ttft_s, tpot_s, max(1.0, sharing)))

    def record(self, *, ttft_s: float | None = None, tpot_s: float | None = None, sharing: float = 1.0) -> None:
        """One large-branch answer measured elsewhere (e.g. a request outside the policy)."""
        with self._lock:
            self._answers.append(_Answer(self.clock(), ttft_s, tpot_s, max(1.0, float(sharing))))

    # ------------------------------------------------------------------ state

    def state(self) -> dict[str, Any]:
        """The monitor now (re-evaluated): degraded, reason, queue, the window's p99s."""
        with self._lock:
            now = self.clock()
            self._evaluate(now)
            ttft, tpot = self._values("ttft_s"), self._values("tpot_s")
            return {
                "degraded": self.degraded, "reason": self.reason, "large_in_flight": self.in_flight,
                "window_answers": len(self._answers),
                "ttft_p99_s": _quantile(ttft, 0.99) if ttft else None, "tpot_p99_s": _quantile(tpot, 0.99) if tpot else None,
                "ttft_budget_s": self.ttft_budget_s, "tpot_budget_s": self.tpot_budget_s,
                "max_large_in_flight": self.max_in_flight, "downgrades": dict(self.downgrades),
            }

    # ------------------------------------------------------------------ under the lock

    def _advance(self, now: float) -> None:
        self._area += self.in_flight * max(0.0, now - self._changed)
        self._changed = now

    def _values(self, name: str) -> list[float]:
        return [v for v in (getattr(a, name) for a in self._answers) if v is not None]

    def _signals(self) -> dict[str, tuple[float, str, float]]:
        """reason -> (ratio to budget, detail, the ratio at or below which it has recovered)."""
        out: dict[str, tuple[float, str, float]] = {}
        n = self.in_flight
        if self.max_in_flight is not None:
            m = self.max_in_flight
            out["queue"] = ((n + 1) / m, f"{n} request(s) on the large branch, at most {m} (max_large_in_flight)",
                            max(1, math.floor(self.recover * m)) / m)
        elif n:  # alone, a stream's latency is the p99 signals' business
            worst: tuple[float, str] | None = None
            for name, budget, what in (("tpot_s", self.tpot_budget_s, "per token"), ("ttft_s", self.ttft_budget_s, "TTFT")):
                units = [getattr(a, name) / a.sharing for a in self._answers if getattr(a, name) is not None]
                if budget is None or not units:
                    continue
                predicted = _quantile(units, 0.5) * (n + 1)
                ratio = predicted / budget
                if worst is None or ratio > worst[0]:
                    worst = (ratio, f"{n} request(s) on the large branch; one more predicts {_ms(predicted)} {what}, "
                                    f"budget {_ms(budget)}")
            if worst is not None:
                out["queue"] = (worst[0], worst[1], self.recover)
        for reason, name, budget, what in (("ttft_p99", "ttft_s", self.ttft_budget_s, "TTFT"),
                                           ("tpot_p99", "tpot_s", self.tpot_budget_s, "per-token latency")):
            values = self._values(name)
            if budget is None or not values:
                continue
            p99 = _quantile(values, 0.99)
            out[reason] = (p99 / budget, f"large-branch {what} p99 {_ms(p99)} over its last {len(values)} answer(s), "
                                         f"budget {_ms(budget)}", self.recover)
        return out

    def _evaluate(self, now: float) -> dict[str, tuple[float, str]]:
        """Expire the window, update the degraded state; reason -> (ratio, detail)."""
        while self._answers and now - self._answers[0].at > self.window_s:
            self._answers.popleft()
        signals = self._signals()
        if not self.degraded:
            breached = next((r for r in REASONS if r in signals and signals[r][0] > 1.0), None)
            if breached is not None:
                self.degraded, self.reason = True, breached
                self.transitions += 1
        else:
            pending = next((r for r in REASONS if r in signals and signals[r][0] > signals[r][2]), None)
            if pending is None:
                self.degraded, self.reason = False, None
                self.transitions += 1
            else:
                self.reason = pending
        details = {r: (v[0], v[1]) for r, v in signals.items()}
        if self.degraded:  # the reason is a signal present now: the one that breached, or one not yet recovered
            ratio, text = details[self.reason]
            if ratio <= 1.0:
                details[self.reason] = (ratio, f"{text} (recovering: back at {self.recover:.0%} of it)")
        return details


def load_monitor(settings: Any, budgets: dict | None = None, *, clock: Callable[[], float] = time.monotonic) -> LoadMonitor:
    """A LoadMonitor from :class:`~edgekit.runtime.config.DegradeSettings`, the budgets it leaves
    unset taken from a bundle manifest's ``budgets`` (latency_p99_ms: per token, ttft_p99_ms).
    The manifest is data from elsewhere: a budget that is not a positive finite number is
    ignored."""

    def budget(explicit: float | None, key: str) -> float | None:
        if explicit is not None:
            return explicit / 1000.0
        value = (budgets or {}).get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
            return float(value) / 1000.0
        return None

    return LoadMonitor(tpot_budget_s=budget(settings.tpot_p99_ms, "latency_p99_ms"),
                       ttft_budget_s=budget(settings.ttft_p99_ms, "ttft_p99_ms"), max_in_flight=settings.max_large_in_flight,
                       window=settings.window, window_s=settings.window_s, recover=settings.recover, clock=clock)


__all__ = ["REASONS", "Decision", "LoadMonitor", "Ticket", "load_monitor"]
