"""Branch guards: one branch within one request, its failures and its time limit.

A branch that raises ``BranchUnavailable`` (recognized by class name, so nothing here imports
the backends), ``TimeoutError`` or ``ConnectionError``, any exception from a remote branch,
or a branch past ``timeout_s`` (wall clock, from its first call in the request) becomes a
:class:`BranchFailed`, which the router answers with the other branch. Other exceptions from
a local branch are bugs and propagate.
"""

from __future__ import annotations

import threading
import time
from typing import Any


class BranchFailed(Exception):
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


class Guard:
    """One branch within one request: turns 'unavailable' failures and timeouts into
    BranchFailed, so the router can fall back."""

    def __init__(self, branch: Any, label: str, timeout_s: float | None):
        self.branch, self.label, self.timeout_s = branch, label, timeout_s
        self.name = str(getattr(branch, "name", label))
        self.has_logits = bool(getattr(branch, "has_logits", False))
        self.started: float | None = None
        self.sessions: list[GuardedSession] = []

    def __getattr__(self, name):  # vocab_size, context_length, tokenizer, ...
        return getattr(self.branch, name)

    def _start(self) -> None:
        if self.started is None:
            self.started = time.perf_counter()

    def check_time(self) -> None:
        if self.timeout_s is not None and self.started is not None and time.perf_counter() - self.started > self.timeout_s:
            raise BranchFailed(self.label, f"timed out after {self.timeout_s:g} s")

    def call(self, fn, *args, **kwargs):
        self._start()
        try:
            out = fn(*args, **kwargs)
        except BranchFailed:
            raise
        except Exception as exc:
            if not self.has_logits or _is_unavailable(exc):
                raise BranchFailed(self.label, _describe(exc)) from exc
            raise
        self.check_time()
        return out

    def session(self) -> GuardedSession:
        sess = GuardedSession(self, self.call(self.branch.session))
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
                raise BranchFailed(self.label, f"no answer within {self.timeout_s:g} s")
            if "error" in box:
                raise BranchFailed(self.label, _describe(box["error"])) from box["error"]
            out = box["value"]
        if not isinstance(out, dict) or not isinstance(out.get("text"), str):
            raise BranchFailed(self.label, f"malformed response (expected a dict with 'text'): {str(out)[:200]}")
        return out

    def close(self) -> None:
        for sess in self.sessions:
            sess.close()


class GuardedSession:
    def __init__(self, guard: Guard, session: Any):
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


__all__ = ["BranchFailed", "Guard", "GuardedSession"]
