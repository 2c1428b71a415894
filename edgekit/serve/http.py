"""The connection layer: uvicorn's pure-Python h11 protocol, with the guards a server on an
untrusted network needs and uvicorn does not give by itself.

h11 parses and frames every request (Content-Length and chunked bodies, a body the application
never reads is skipped by its length, not parsed as the next request; a malformed or ambiguous
request is refused); uvicorn runs the ASGI application. :class:`EdgekitProtocol` adds, per
connection:

* **a connection cap** (``--max-connections``): a connection past it is answered at once with
  503 ``too_many_connections`` (Retry-After: 1) and closed, before any request is read;
* **a header timeout** (``--header-timeout``): from the connection's start, or the end of the
  previous answer, to the end of the next request's headers. A client that sends nothing, or
  drips its headers, is cut (408 ``header_timeout`` when it had started a request). uvicorn's
  keep-alive timeout alone only covers a silent connection between requests;
* **a send timeout**: an answer the client does not read for ``send_timeout_s`` (the write
  buffer stays full, or a closing connection cannot flush) aborts the connection, so a client
  that stops reading cannot hold a generation slot or a connection forever;
* **half-close**: a client that shuts down its sending side after a complete request (``shutdown(
  SHUT_WR)``) still gets its answer, then the connection closes. (uvicorn closes the connection
  on end-of-file, which drops the answer.) Over TLS a half-close is not possible: end-of-file
  closes the connection;
* **lingering close**: closing after an answer first ends the sending side (FIN) and discards
  what the client still sends for ``LINGER_S`` (2 s), so an answer to a request whose body was
  not read (413, 401...) is not destroyed by a TCP reset before the client reads it; then the
  socket is closed (a client that keeps its end open does not keep the connection counted);
* **error answers in the API's shape**: a malformed request (h11's 400, 431 for headers over
  16 KiB, 501 for an unsupported transfer coding) gets ``{"error": {...}}`` like every other
  error, not uvicorn's plain text.
"""

from __future__ import annotations

import asyncio
import json
import logging
from http import HTTPStatus
from typing import Any, Callable

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from edgekit.serve import openai_api as oa

MAX_HEADER_BYTES = 16 * 1024  # request line + headers (h11_max_incomplete_event_size, and checked whole by the app)
LINGER_S = 2.0  # after the server's FIN: how long a closing connection still reads (and discards) the client's bytes


def raw_answer(error: oa.ApiError, headers: dict[str, str] | None = None) -> bytes:
    """A complete HTTP/1.1 answer (``Connection: close``) carrying ``error``'s JSON, for the
    places where no request cycle exists to send it through."""
    body = json.dumps(error.body()).encode("ascii")
    try:
        phrase = HTTPStatus(error.status).phrase
    except ValueError:
        phrase = ""
    lines = [f"HTTP/1.1 {error.status} {phrase}", "Content-Type: application/json", f"Content-Length: {len(body)}",
             "Connection: close"] + [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class ConnectionGuard:
    """What the connections of one server share: the limits and the counters."""

    def __init__(self, *, max_connections: int, header_timeout_s: float, send_timeout_s: float,
                 count: Callable[[int | None, str | None], None], log: Callable[[str], None], quiet: bool = False):
        self.max_connections, self.header_timeout_s, self.send_timeout_s = max_connections, header_timeout_s, send_timeout_s
        self.count = count  # count(status or None, error kind or None): the metrics
        self.open = 0  # connections made and not yet lost
        # uvicorn's per-connection messages go to the server's log, not to logging's tree: its
        # warnings (a malformed request) with the access log, its errors always
        self.logger = logging.Logger("edgekit.serve.http")
        level = logging.ERROR if quiet else logging.WARNING
        self.logger.addHandler(_Forward(log, level))
        self.logger.setLevel(level)


class _Forward(logging.Handler):
    def __init__(self, log: Callable[[str], None], level: int):
        super().__init__(level)
        self._log = log

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            self._log(f"edgekit serve: {text}")
        except Exception:  # a log line must never break a connection
            pass


class _Transport:
    """The asyncio transport as uvicorn sees it: ``close()`` becomes a lingering close with
    deadlines (see the module docstring); everything else passes through."""

    def __init__(self, inner: asyncio.Transport, loop: asyncio.AbstractEventLoop, send_timeout_s: float):
        self._inner, self._loop, self._send_timeout_s = inner, loop, send_timeout_s
        self.closing = False  # close() was asked for (the inner transport may still be flushing)
        self.lost = False
        self._timer: asyncio.TimerHandle | None = None
        self._close_by = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def is_closing(self) -> bool:
        return self.closing or self._inner.is_closing()

    def close(self) -> None:
        if self.lost:
            self._inner.close()
            return
        if self.closing:
            return
        self.closing = True
        if not self._inner.can_write_eof():  # TLS: close_notify and close (asyncio bounds the TLS shutdown)
            self._inner.close()
        else:  # plain TCP: FIN once the answer is flushed; keep reading for a moment to discard
            try:
                self._inner.write_eof()
            except (OSError, RuntimeError):
                self._inner.close()
        self._close_by = self._loop.time() + self._send_timeout_s
        self._timer = self._loop.call_later(LINGER_S, self._linger_done)

    def _linger_done(self) -> None:
        """The linger is over: close for good once the answer has left, abort past the send timeout."""
        self._timer = None
        if self.lost:
            return
        if self._inner.get_write_buffer_size() == 0:
            self._inner.close()  # the kernel delivers what it holds; the connection no longer counts
        elif self._loop.time() >= self._close_by:
            self.abort()  # the client has not read its answer for --send-timeout
        else:
            self._timer = self._loop.call_later(LINGER_S, self._linger_done)

    def close_now(self) -> None:
        """Shutdown: no linger (the client got its answer or gets no more)."""
        self.closing = True
        if self._inner.get_write_buffer_size() == 0:
            self._inner.close()
        else:
            self.abort()

    def abort(self) -> None:
        self.closing = True
        self._inner.abort()

    def connection_lost(self) -> None:
        self.lost = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class EdgekitProtocol(H11Protocol):
    """uvicorn's h11 protocol with the guards above; ``guard`` is set on a per-server subclass
    (:func:`protocol_class`)."""

    guard: ConnectionGuard

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.logger = self.guard.logger
        self._header_timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        self._proxy: _Transport | None = None
        self._refused = False
        self._half_closed = False
        self._last_error: h11.RemoteProtocolError | None = None
        next_event = self.conn.next_event

        def next_event_kept() -> Any:  # keep h11's error: its status hint (431, 501) goes into the answer
            try:
                return next_event()
            except h11.RemoteProtocolError as exc:
                self._last_error = exc
                raise

        self.conn.next_event = next_event_kept  # type: ignore[method-assign]

    # -- the connection's life

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._proxy = _Transport(transport, self.loop, self.guard.send_timeout_s)
        super().connection_made(self._proxy)  # type: ignore[arg-type]
        self.guard.open += 1
        if self.guard.open > self.guard.max_connections:
            self._refused = True
            self.guard.count(None, "too_many_connections")
            error = oa.ApiError(503, f"the server has {self.guard.max_connections} connections open, its limit "
                                "(--max-connections); retry shortly", type=oa.UNAVAILABLE, code="too_many_connections",
                                kind="too_many_connections")
            self._proxy.write(raw_answer(error, {"Retry-After": "1"}))
            self._proxy.close()
            return
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.open -= 1
        for timer in (self._header_timer, self._send_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._send_timer = None
        if self._proxy is not None:
            self._proxy.connection_lost()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused or (self._proxy is not None and self._proxy.closing):
            return  # a lingering close: what the client still sends is discarded
        super().data_received(data)

    def eof_received(self) -> bool | None:
        cycle = self.cycle
        if self._proxy is not None and self._proxy.closing:
            return None  # the client read our FIN and closed too: done
        if (cycle is not None and not cycle.response_complete and not cycle.more_body
                and not self.transport.get_extra_info("sslcontext")):
            # a half-close after a complete request: answer it, then close
            self._half_closed = True
            return True
        return None  # nothing to answer (or the request is incomplete): close, the client is gone

    # -- request boundaries: the header timer

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        cycle = self.cycle
        if cycle is not before:  # a new request's headers are in (its task has not run yet)
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            proxy = self._proxy
            # For the application: is the client gone? True as soon as a write failed (uvicorn's
            # send() drops data silently after that) or the connection was lost.
            cycle.scope.setdefault("extensions", {})["edgekit.gone"] = (
                lambda: cycle.disconnected or (proxy is not None and proxy.is_closing() and not cycle.response_complete))

    def on_response_complete(self) -> None:
        if self._half_closed:
            self.server_state.total_requests += 1
            self.transport.close()
            return
        done = self.cycle
        super().on_response_complete()
        if self.cycle is done and not self.transport.is_closing():
            self._arm_header_timer()  # waiting for the next request (keep-alive)

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.guard.header_timeout_s, self._header_timeout)

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        started = bool(self.conn.trailing_data[0])
        self.guard.count(408 if started else None, "client_timeout")
        if started:  # part of a request arrived: say why the connection ends
            error = oa.ApiError(408, f"the request's headers did not arrive within {self.guard.header_timeout_s:g} s "
                                "(--header-timeout)", code="header_timeout", kind="client_timeout")
            self.transport.write(raw_answer(error))
        self.transport.close()

    # -- answers uvicorn would write as plain text

    def send_400_response(self, msg: str) -> None:
        exc = self._last_error
        status = exc.error_status_hint if exc is not None and exc.error_status_hint in (400, 431, 501) else 400
        detail = str(exc) if exc is not None and str(exc) else msg
        message = {431: f"the request line and headers are larger than {MAX_HEADER_BYTES // 1024} KiB",
                   501: f"unsupported transfer coding: {detail}"}.get(status, f"malformed HTTP request: {detail}")
        code = {431: "headers_too_large", 501: "not_implemented"}.get(status, "invalid_http")
        self.guard.count(status, "bad_request")
        self.transport.write(raw_answer(oa.ApiError(status, message, code=code)))
        self.transport.close()

    # -- a client that does not read

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self.guard.send_timeout_s, self._send_stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def close_now(self) -> None:
        """The server stops: close an idle or closing connection at once (a request still being
        answered is left to uvicorn's shutdown)."""
        cycle = self.cycle
        if self._proxy is not None and (cycle is None or cycle.response_complete or self._proxy.closing):
            self._proxy.close_now()

    def _send_stalled(self) -> None:
        self._send_timer = None
        if self._proxy is not None:
            self._proxy.abort()  # connection_lost follows: the request sees a disconnect


def protocol_class(guard: ConnectionGuard) -> type[EdgekitProtocol]:
    return type("EdgekitH11Protocol", (EdgekitProtocol,), {"guard": guard})
