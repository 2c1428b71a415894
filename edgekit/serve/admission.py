"""Bounded admission: at most ``max_concurrency`` generations at once, at most ``max_queue``
requests waiting, first come first served.

Each generation slot is a :class:`~edgekit.runtime.router.Router` (a Router serves one request
at a time; all of them share the loaded branches, whose sessions each own their KV cache).
``admit()`` never blocks: it hands a free router out at once, queues the request, or refuses
it (the queue is full, or the server is draining). ``release()`` hands the router straight to
the oldest waiter, so a newcomer can never overtake the queue; the waiter learns it through
its ticket's ``notify`` callback (the HTTP layer's event loop: no thread waits in the queue)
or by blocking in ``wait()``. A waiter that gives up ``abandon()``s its ticket; when the
server's grace period ends, ``cancel_waiting()`` turns every waiter away at once.

Thread-safe: generation threads release, the event loop admits and abandons.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Callable


class Ticket:
    """One request's place: ``status`` is "granted", "queued", "full", "draining", then
    "abandoned" or "cancelled" for a queued ticket that never got a router."""

    __slots__ = ("_event", "_notify", "router", "status")

    def __init__(self, status: str, router: Any = None, notify: Callable[[Any], None] | None = None):
        self.status, self.router, self._notify = status, router, notify
        self._event = threading.Event()
        if router is not None:
            self._event.set()

    def _resolve(self, status: str, router: Any) -> None:
        """Called under the admission lock: the ticket's wait is over."""
        self.status, self.router = status, router
        self._event.set()
        if self._notify is not None:
            self._notify(router)  # must not block or take the admission lock (e.g. loop.call_soon_threadsafe)


class Admission:
    def __init__(self, routers: list[Any], max_queue: int):
        if not routers:
            raise ValueError("at least one router (generation slot) is needed")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.max_concurrency = len(routers)
        self.max_queue = max_queue
        self._lock = threading.Lock()
        self._idle_cond = threading.Condition(self._lock)
        self._free = list(routers)
        self._waiting: deque[Ticket] = deque()
        self._draining = False

    # -- numbers for /metrics and /healthz

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return self.max_concurrency - len(self._free)

    # -- the request's side

    def admit(self, notify: Callable[[Any], None] | None = None) -> Ticket:
        """A ticket: "granted" (``ticket.router`` is the caller's until ``release``), "queued"
        (``notify(router)`` is called once its turn comes, ``notify(None)`` if the waiters are
        cancelled), "full" or "draining"."""
        with self._lock:
            if self._draining:
                return Ticket("draining")
            if self._free and not self._waiting:
                return Ticket("granted", self._free.pop())
            if len(self._waiting) >= self.max_queue:
                return Ticket("full")
            ticket = Ticket("queued", notify=notify)
            self._waiting.append(ticket)
            return ticket

    def abandon(self, ticket: Ticket) -> Any:
        """Leave the queue. Returns the router when the ticket was granted meanwhile (the caller
        owns it and must ``release`` it), else None."""
        with self._lock:
            if ticket.router is not None:
                return ticket.router
            if ticket in self._waiting:
                self._waiting.remove(ticket)
                ticket.status = "abandoned"
                self._idle_cond.notify_all()
            return None

    def wait(self, ticket: Ticket, timeout: float, *, poll: float = 0.25, abandon: Callable[[], bool] | None = None) -> Any:
        """The router once it is this ticket's turn, or None after ``timeout`` seconds or as
        soon as ``abandon()`` (checked every ``poll`` seconds: the client left) is true; the
        ticket then leaves the queue."""
        deadline = time.perf_counter() + timeout
        while True:
            left = deadline - time.perf_counter()
            if ticket._event.wait(max(0.0, min(poll, left))):
                return ticket.router
            if left <= 0 or (abandon is not None and abandon()):
                return self.abandon(ticket)  # granted between the wait and the lock: keep it

    def release(self, router: Any) -> None:
        with self._lock:
            if self._waiting:
                self._waiting.popleft()._resolve("granted", router)
            else:
                self._free.append(router)
                self._idle_cond.notify_all()

    # -- the server's side

    def drain(self) -> None:
        """Refuse new requests from now on; queued and running ones go on."""
        with self._lock:
            self._draining = True

    def cancel_waiting(self) -> int:
        """Turn every queued request away (the grace period is over): their tickets end
        "cancelled" with no router. Returns how many there were."""
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
            for ticket in waiting:
                ticket._resolve("cancelled", None)
            self._idle_cond.notify_all()
            return len(waiting)

    @property
    def draining(self) -> bool:
        return self._draining

    def wait_idle(self, timeout: float) -> bool:
        """True once nothing runs and nothing waits; False if ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        with self._idle_cond:
            while self._waiting or len(self._free) < self.max_concurrency:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle_cond.wait(left)
            return True
