"""The ASGI application behind ``edgekit serve``: routing, authentication, request bodies,
admission, generation and the answers (starlette's request and response primitives, uvicorn
runs it).

The event loop never blocks on the model. Everything CPU-bound runs in a thread:

* **parsing** — JSON decoding, :func:`~edgekit.serve.openai_api.check_json`, the chat template
  and tokenizing the prompt — on a small pool (``PARSE_THREADS``), before the request takes a
  place in the queue;
* **generation** — the router's token loop — on one daemon thread per admitted request, so at
  most ``--max-concurrency`` at once (admission hands out that many routers). Daemon: a
  generation stuck in a long call must not keep the process alive after the shutdown grace.

Waiting in the queue costs no thread: :class:`~edgekit.serve.admission.Admission` calls the
ticket's ``notify`` when a slot frees, which posts to the request's inbox on the loop. The
inbox (an ``asyncio.Queue``) also receives the generation's stream pieces, its result, the
client's disconnect (a task waiting on ASGI ``receive``) and the server's shutdown; the
request's coroutine handles whichever comes first, and its deadline (``--request-timeout``).
A streamed answer holds at most ``STREAM_BUFFER`` pieces not yet written: a slow reader slows
its generation rather than filling memory.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from edgekit.serve import openai_api as oa
from edgekit.serve.http import MAX_HEADER_BYTES
from edgekit.serve.generation import Cancelled, ClientGone, GenerationFailed, RequestTimeout, generate
from edgekit.serve.metrics import CONTENT_TYPE

if TYPE_CHECKING:
    from edgekit.serve.server import EdgekitServer

COMPLETIONS, CHAT, MODELS, HEALTH, METRICS = "/v1/completions", "/v1/chat/completions", "/v1/models", "/healthz", "/metrics"
POST_PATHS, GET_PATHS = (COMPLETIONS, CHAT), (MODELS, HEALTH, METRICS)
MODEL = MODELS + "/{id}"  # GET one model (the official client's models.retrieve); the metrics label
STREAM_BUFFER = 32  # stream pieces generated and not yet written to the client


def dump_json(obj: Any) -> bytes:
    """UTF-8 JSON; text that is not valid Unicode (it cannot come from a validated request,
    but a branch could produce it) is written with ASCII escapes instead of failing."""
    try:
        return json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, ensure_ascii=True).encode("ascii")


class ServeApp:
    """The ASGI callable (``lifespan`` is off: the server object loads the model itself)."""

    def __init__(self, server: EdgekitServer):
        self.server = server

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await _Exchange(self.server, scope, receive, send).run()


class _Exchange:
    """One request and its answer."""

    def __init__(self, server: EdgekitServer, scope: dict, receive: Any, send: Any):
        self.server, self.scope, self.receive, self.send = server, scope, receive, send
        self.request = Request(scope, receive)
        self.method, self.path = scope["method"], scope["path"]
        self.model_id = self.path[len(MODELS) + 1:] if self.path.startswith(MODELS + "/") else None
        # the label is the route, never the raw path: a client cannot grow the metric's series
        self.endpoint = (self.path if self.path in POST_PATHS + GET_PATHS
                         else MODEL if self.model_id is not None else "other")
        headers = self.request.headers
        length = headers.get("content-length")
        # h11 has checked the framing: one non-negative Content-Length, or chunked
        self.body_done = "transfer-encoding" not in headers and (length is None or int(length) == 0)
        self.started = self.counted = self.must_close = False
        self.status: int | None = None
        self.loop = asyncio.get_running_loop()
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.closed = False  # the coroutine stopped reading its inbox
        self.halt = threading.Event()  # the generation must stop: the client left, or nobody reads it any more
        self.began = time.perf_counter()
        self._gone = scope.get("extensions", {}).get("edgekit.gone") or (lambda: False)

    # -- the frame

    async def run(self) -> None:
        server = self.server
        server.exchanges.add(self)
        try:
            await self._route()
        except oa.ApiError as exc:
            if not self.started:
                await self._send_error(exc)
            elif not self.counted:  # cannot happen by design; never write a second status line
                self._count(exc.status, exc.kind)
        except ClientGone:
            if self.counted:  # the answer was complete and counted; the client left during its last bytes
                server.metrics.errors.inc(kind="client_disconnected")
            else:
                self._count(499, "client_disconnected")
        except Exception as exc:  # a bug: answer 500, keep serving, keep the trace in the log
            server.log(f"internal error on {self.method} {self.path}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            if not self.started and not self.counted:
                await self._send_error(oa.ApiError(500, f"internal error: {type(exc).__name__}", type=oa.SERVER_ERROR,
                                                   code="internal_error", kind="internal"))
            elif not self.counted:  # an answer already under way: cut it (a stream's client sees no [DONE])
                self._count(500, "internal")
            else:
                server.metrics.errors.inc(kind="internal")
        finally:
            self.closed = True
            self.halt.set()
            server.exchanges.discard(self)
            if server.options.access_log:
                client = self.scope.get("client")
                who = f"{client[0]}:{client[1]}" if client else "-"
                server.log(f'{who} - "{self.method} {self.path} HTTP/{self.scope.get("http_version", "1.1")}" '
                           f"{self.status if self.status is not None else '-'} {time.perf_counter() - self.began:.3f}s")

    async def _route(self) -> None:
        path, method = self.path, self.method
        headers = self.request.headers
        size = len(self.scope.get("raw_path", b"")) + len(self.scope.get("query_string", b"")) + sum(
            len(k) + len(v) + 4 for k, v in self.scope["headers"])
        if size > MAX_HEADER_BYTES:  # h11 bounds what it buffers, not a request that arrives whole
            self.must_close = True
            raise oa.ApiError(431, f"the request line and headers are larger than {MAX_HEADER_BYTES // 1024} KiB",
                              code="headers_too_large")
        if "transfer-encoding" in headers and "content-length" in headers:  # RFC 9112 6.1: a smuggling attempt, or a broken proxy
            raise oa.bad("the request has both Content-Length and Transfer-Encoding; send one", code="invalid_http")
        if path in POST_PATHS and method == "POST":
            await self._generation()
        elif (path in GET_PATHS or self.model_id is not None) and method in ("GET", "HEAD"):
            await self._get()
        elif path in POST_PATHS + GET_PATHS or self.model_id is not None:
            allowed = "POST" if path in POST_PATHS else "GET, HEAD"
            where = path if self.model_id is None else oa.show(path, 80)  # a model id is the client's text
            raise oa.ApiError(405, f"{oa.printable(method)} is not allowed on {where}; use {allowed.split(',')[0]}",
                              code="method_not_allowed", kind="method_not_allowed", headers={"Allow": allowed})
        else:
            raise oa.ApiError(404, f"no endpoint {oa.show(path, 80)}; this server has {', '.join(POST_PATHS + GET_PATHS)}",
                              code="not_found", kind="not_found")

    # -- plain answers

    def _count(self, status: int, error_kind: str | None = None) -> None:
        self.counted, self.status = True, status
        self.server.metrics.requests.inc(endpoint=self.endpoint, code=str(status))
        if error_kind:
            self.server.metrics.errors.inc(kind=error_kind)

    async def _send_bytes(self, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        headers = dict(headers or {})
        if not self.body_done:
            self.must_close = True  # the rest of the body is not read: no next request on this connection
        if self.must_close:
            headers["Connection"] = "close"
        # counted before writing: the status is decided, and whoever reads /metrics after the
        # answer arrived sees it
        self._count(status)
        self.started = True
        await Response(data, status_code=status, headers=headers, media_type=content_type)(self.scope, self.receive, self.send)
        if self._gone():  # the client left as the answer went out
            self.server.metrics.errors.inc(kind="client_disconnected")

    async def _send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        await self._send_bytes(status, dump_json(obj), "application/json", headers)

    async def _send_error(self, exc: oa.ApiError) -> None:
        headers = dict(exc.headers)
        if exc.status in (429, 503) and "Retry-After" not in headers:
            headers["Retry-After"] = str(self.server.retry_after())
        if exc.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="edgekit"'
        self.server.metrics.errors.inc(kind=exc.kind)
        await self._send_json(exc.status, exc.body(), headers)

    def _authorize(self) -> None:
        options = self.server.options
        if options.api_key is None or (self.path in (HEALTH, METRICS) and not options.auth_metrics):
            return
        header = self.request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        # compare_digest: the time taken does not depend on how much of the key matched
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("utf-8", "surrogateescape"),
                                                                 options.api_key.encode("utf-8")):
            raise oa.ApiError(401, "missing or invalid API key: send the header 'Authorization: Bearer <key>'",
                              code="invalid_api_key", kind="unauthorized")

    async def _get(self) -> None:
        self._authorize()
        server = self.server
        if self.path == HEALTH:
            ready = server.state == "ready"
            await self._send_json(200 if ready else 503, server.health(), {} if ready else {"Retry-After": str(server.retry_after())})
        elif self.path == METRICS:
            await self._send_bytes(200, server.metrics.render().encode("utf-8"), CONTENT_TYPE)
        else:
            model = {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "edgekit"}
            if self.model_id is None:
                await self._send_json(200, {"object": "list", "data": [model]})
            elif self.model_id == server.model_name:
                await self._send_json(200, model)
            else:
                raise oa.ApiError(404, f"the model {oa.show(self.model_id, 80)} does not exist; this server serves "
                                  f"{server.model_name!r} (GET /v1/models)", param="model", code="model_not_found",
                                  kind="not_found")

    # -- the request body

    async def _read_body(self) -> bytes:
        server, limit = self.server, self.server.options.max_body_bytes
        length = self.request.headers.get("content-length")
        if self.body_done:
            raise oa.bad("the request has no body; send a JSON object")
        if length is not None and int(length) > limit:
            raise oa.ApiError(413, f"the request body has {length} bytes, more than this server's limit of {limit} "
                              "(--max-body-bytes)", code="payload_too_large", kind="payload_too_large")
        chunks: list[bytes] = []
        total = 0

        async def read() -> None:
            nonlocal total
            while True:
                message = await self.receive()
                if message["type"] == "http.disconnect":
                    raise ClientGone()
                chunk = message.get("body", b"")
                total += len(chunk)
                if total > limit:  # a chunked body without a declared length
                    raise oa.ApiError(413, f"the request body is larger than this server's limit of {limit} bytes "
                                      "(--max-body-bytes)", code="payload_too_large", kind="payload_too_large")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return

        try:
            await asyncio.wait_for(read(), server.options.header_timeout_s)
        except asyncio.TimeoutError:
            raise oa.ApiError(408, f"the request body did not arrive within {server.options.header_timeout_s:g} s "
                              "(--header-timeout)", code="body_timeout", kind="client_timeout") from None
        self.body_done = True
        return b"".join(chunks)

    # -- generation

    def _unavailable(self, code: str, message: str) -> oa.ApiError:
        return oa.ApiError(503, message, type=oa.UNAVAILABLE, code=code, kind="unavailable")

    def _deliver(self, message: tuple[str, Any]) -> None:
        """On the loop: a message for this request's coroutine (dropped once it stopped reading)."""
        if not self.closed:
            self.inbox.put_nowait(message)

    def _post(self, message: tuple[str, Any]) -> None:
        """From any thread: :meth:`_deliver` on the loop."""
        try:
            self.loop.call_soon_threadsafe(self._deliver, message)
        except RuntimeError:  # the loop is closed: the server has stopped
            pass

    async def _next(self, deadline: float) -> tuple[str, Any]:
        left = deadline - time.perf_counter()
        if not self.inbox.empty():
            return self.inbox.get_nowait()
        if left <= 0:
            return ("timeout", None)
        try:
            return await asyncio.wait_for(self.inbox.get(), left)
        except asyncio.TimeoutError:
            return ("timeout", None)

    async def _watch(self) -> None:
        """The client's disconnect (a reset, or a close before the request was complete); a
        half-close after a complete request is not one (the protocol keeps the connection)."""
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self.halt.set()
                self._deliver(("gone", None))
                return

    async def _generation(self) -> None:
        server = self.server
        arrival = time.perf_counter()
        self._authorize()
        if server.state == "loading":
            raise self._unavailable("loading", "the model is still loading; retry shortly")
        if server.state != "ready":
            raise self._unavailable("draining", "the server is shutting down and takes no new requests")
        raw = await self._read_body()
        request = await server.parse(self.path, raw)
        admission = server.admission
        ticket = admission.admit(notify=lambda router: self._post(("slot", router)))
        if ticket.status == "full":
            raise oa.ApiError(429, f"the server is at capacity ({admission.max_concurrency} generating, "
                              f"{admission.max_queue} waiting); retry after the Retry-After seconds",
                              type=oa.RATE_LIMIT, code="queue_full", kind="queue_full")
        if ticket.status == "draining":
            raise self._unavailable("draining", "the server is shutting down and takes no new requests")
        deadline = arrival + server.options.request_timeout_s
        watcher = asyncio.ensure_future(self._watch())
        router = ticket.router
        waiting = router is None  # queued: the ticket may still be granted until abandoned
        try:
            if waiting:
                kind, value = await self._next(deadline)
                if kind == "slot" and value is not None:
                    router, waiting = value, False
                else:
                    late, waiting = admission.abandon(ticket), False
                    if late is not None:  # granted while we gave up: hand it on
                        admission.release(late)
                    if kind == "gone":
                        raise ClientGone()
                    if kind == "timeout":
                        raise oa.ApiError(503, f"no generation slot became free within the request timeout "
                                          f"({server.options.request_timeout_s:g} s, --request-timeout)", type=oa.UNAVAILABLE,
                                          code="queue_timeout", kind="queue_timeout")
                    raise self._unavailable("draining", "the server shut down before a generation slot became free")
            admitted = time.perf_counter()
            server.metrics.queue_wait.observe(admitted - arrival)
            credits = threading.Semaphore(STREAM_BUFFER) if request.stream else None
            if request.stream:
                await self._start_stream(request)
            self._start_generation(request, router, deadline, credits)
            router = None  # the generation thread releases it
            if request.stream:
                await self._stream(request, arrival, admitted, deadline, credits)
            else:
                await self._complete(request, arrival, admitted, deadline)
        finally:
            if waiting:  # left the queue some other way (the task was cancelled)
                router = admission.abandon(ticket)
            if router is not None:
                admission.release(router)
            watcher.cancel()

    def _start_generation(self, request: Any, router: Any, deadline: float, credits: threading.Semaphore | None) -> None:
        server, halt, abort = self.server, self.halt, self.server.aborting
        parser = server.parser
        emit = None
        thinking = _reasoning_parser(server, request)  # chat on a reasoning model: <think> goes to reasoning_content
        if credits is not None:
            rid, model, endpoint = self.rid, server.model_name, request.endpoint

            def emit(kind: str, text: str) -> None:
                if thinking is not None and kind == "text":
                    for part, piece in thinking.push(text):
                        send(_piece_event(endpoint, rid, model, part, piece))
                    return
                if kind == "text":
                    data = _event(oa.chunk(endpoint, rid, model, text=text))
                elif kind == "reset":  # the text of this choice so far is void; the new answer follows from its start
                    if thinking is not None:
                        thinking.reset()
                    data = _event(oa.chunk(endpoint, rid, model, edgekit={"event": "reset", "reason": text}))
                elif kind == "end":  # the answer is complete: what the reasoning parser held back
                    for part, piece in thinking.finish() if thinking is not None else ():
                        send(_piece_event(endpoint, rid, model, part, piece))
                    return
                else:
                    data = b": keep-alive\n\n"
                send(data)

            def send(data: bytes) -> None:
                while not credits.acquire(timeout=0.1):  # the client reads slower than the model writes
                    if halt.is_set():
                        raise ClientGone()
                    if abort.is_set():
                        raise Cancelled()
                    if time.perf_counter() > deadline:
                        raise RequestTimeout()
                self._post(("data", data))

        def work() -> None:
            started = time.perf_counter()
            try:
                outcome = generate(router, request.prompt, max_tokens=request.max_tokens, sampler_params=request.sampler_params,
                                   seed=request.seed, stops=request.stop, deadline=deadline, emit=emit,
                                   client_gone=halt.is_set, cancelled=abort.is_set,
                                   count_tokens=lambda text: len(parser.tokenizer.encode(text, add_special_tokens=False)))
                if emit is not None and thinking is not None:
                    emit("end", "")
                message: tuple[str, Any] = ("done", outcome)
            except BaseException as exc:  # noqa: BLE001 — handed to the request's coroutine
                message = ("error", exc)
            finally:
                server.admission.release(router)
                server.record_duration(time.perf_counter() - started)
            self._post(message)

        threading.Thread(target=work, name="edgekit-generate", daemon=True).start()

    def _generation_error(self, kind: str, value: Any) -> oa.ApiError:
        """The error answer for an inbox message that is not the answer."""
        if kind == "error":
            if isinstance(value, ClientGone):
                raise ClientGone()
            if isinstance(value, RequestTimeout):
                return self._timed_out()
            if isinstance(value, GenerationFailed):
                return oa.ApiError(503, f"no branch could answer: {value}", type=oa.SERVER_ERROR, code="branches_unavailable",
                                   kind="generation_failed")
            if isinstance(value, Cancelled):
                return self._cut()
            raise value
        if kind == "gone":
            raise ClientGone()
        if kind == "abort":
            return self._cut()
        return self._timed_out()  # "timeout"

    def _timed_out(self) -> oa.ApiError:
        return oa.ApiError(504, f"the answer took longer than the request timeout ({self.server.options.request_timeout_s:g} "
                           "s, --request-timeout)", type=oa.SERVER_ERROR, code="request_timeout", kind="request_timeout")

    def _cut(self) -> oa.ApiError:
        return self._unavailable("draining", "the server shut down before this answer was complete (the shutdown grace "
                                 "period, --grace-period, ended)")

    def _edgekit_field(self, outcome: Any, queue_s: float) -> dict[str, Any]:
        out = {
            "branch": outcome.branch, "answered_by": outcome.answered_by, "policy": self.server.policy,
            "fell_back": outcome.fell_back, "escalated": outcome.escalated, "reason": outcome.reason,
            "ttft_ms": round(outcome.ttft_s * 1000, 1) if outcome.ttft_s is not None else None,
            "tokens_per_s": round(1.0 / outcome.tpot_s, 2) if outcome.tpot_s else None,
            "queue_ms": round(queue_s * 1000, 1),
        }
        if outcome.result is not None and outcome.result.score is not None:
            out.update(score=outcome.result.score, threshold=outcome.result.threshold)
        if outcome.result is not None and outcome.result.acceptance_rate is not None:
            out["acceptance_rate"] = outcome.result.acceptance_rate
        if self.server.policy == "degrade":
            out.update(degraded=outcome.degraded, degraded_reason=outcome.degraded_reason)
        return out

    def _record_answer(self, request: Any, outcome: Any, arrival: float, admitted: float) -> None:
        m = self.server.metrics
        m.prompt_tokens.inc(request.prompt_tokens)
        m.generated_tokens.inc(outcome.completion_tokens)
        fell_back = "unknown" if outcome.fell_back is None else str(bool(outcome.fell_back)).lower()
        m.answers.inc(branch=outcome.branch or "none", fell_back=fell_back)
        if outcome.escalated:
            m.escalations.inc()
        if outcome.degraded and outcome.degraded_reason:
            m.downgrades.inc(reason=outcome.degraded_reason)
        if outcome.result is not None:
            for attempt in outcome.result.attempts:
                if not attempt.get("ok"):
                    m.branch_failures.inc(branch=attempt.get("branch", "?"))
        if outcome.ttft_s is not None:
            m.ttft.observe((admitted - arrival) + outcome.ttft_s)
        if outcome.tpot_s is not None:
            m.tpot.observe(outcome.tpot_s)
        if outcome.branch:
            if outcome.ttft_s is not None:
                m.branch_ttft.observe(outcome.ttft_s, branch=outcome.branch)
            if outcome.tpot_s is not None:
                m.branch_tpot.observe(outcome.tpot_s, branch=outcome.branch)
        m.duration.observe(time.perf_counter() - arrival)

    async def _complete(self, request: Any, arrival: float, admitted: float, deadline: float) -> None:
        kind, value = await self._next(deadline)
        if kind != "done":
            raise self._generation_error(kind, value)
        outcome = value
        rid = oa.new_id(request.endpoint)
        reason = oa.finish_reason(outcome.finish_reason, outcome.stopped)
        use = oa.usage(request.prompt_tokens, outcome.completion_tokens)
        text, thought, thinking = outcome.text, None, _reasoning_parser(self.server, request)
        if thinking is not None:
            thought, text = thinking.split(outcome.text)
            thought = thought if thinking.saw_reasoning else None
        body = oa.response(request.endpoint, rid, self.server.model_name, text, reason, use,
                           self._edgekit_field(outcome, admitted - arrival), reasoning=thought, split=thinking is not None)
        self._record_answer(request, outcome, arrival, admitted)
        await self._send_json(200, body)

    # -- streaming (server-sent events; chunked over HTTP/1.1, close-delimited over HTTP/1.0)

    async def _write(self, data: bytes, more: bool = True) -> None:
        """One piece of a stream; ClientGone once the client is known to be gone (uvicorn drops
        what is sent after that without a word)."""
        if self._gone():
            raise ClientGone()
        await self.send({"type": "http.response.body", "body": data, "more_body": more})
        if more and self._gone():
            raise ClientGone()

    async def _start_stream(self, request: Any) -> None:
        self.rid = oa.new_id(request.endpoint)
        headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                   (b"x-accel-buffering", b"no")]  # nginx: pass events through as they come
        # No Content-Length: h11 frames the body with chunked encoding for an HTTP/1.1 client and
        # by closing the connection for an HTTP/1.0 one (which does not know chunked encoding).
        self.started = True
        await self.send({"type": "http.response.start", "status": 200, "headers": headers})
        if request.endpoint == "chat":
            await self._write(_event(oa.chunk(request.endpoint, self.rid, self.server.model_name, role=True)))

    async def _stream(self, request: Any, arrival: float, admitted: float, deadline: float,
                      credits: threading.Semaphore) -> None:
        server, endpoint, rid, model = self.server, request.endpoint, self.rid, self.server.model_name
        error: oa.ApiError | None = None
        while True:
            kind, value = await self._next(deadline)
            if kind == "data":
                await self._write(value)
                credits.release()
                continue
            if kind == "done":
                outcome = value
                break
            error = self._generation_error(kind, value)
            break
        if error is not None:  # the status line is sent: the error travels as an event, then [DONE]
            self._count(error.status, error.kind)  # the status the error would have had
            await self._write(_event(error.body()))
            await self._write(b"data: [DONE]\n\n", more=False)
            return
        reason = oa.finish_reason(outcome.finish_reason, outcome.stopped)
        use = oa.usage(request.prompt_tokens, outcome.completion_tokens)
        await self._write(_event(oa.chunk(endpoint, rid, model, reason=reason,
                                          edgekit=self._edgekit_field(outcome, admitted - arrival))))
        if request.include_usage:
            await self._write(_event(oa.chunk(endpoint, rid, model, use=use, no_choices=True)))
        if self._gone():
            raise ClientGone()
        self._record_answer(request, outcome, arrival, admitted)
        self._count(200)  # the answer is complete; only the end-of-stream marker is left
        await self._write(b"data: [DONE]\n\n", more=False)
        if self._gone():  # the client left during the last bytes
            server.metrics.errors.inc(kind="client_disconnected")


def _event(obj: Any) -> bytes:
    return b"data: " + dump_json(obj) + b"\n\n"


def _piece_event(endpoint: str, rid: str, model: str, part: str, piece: str) -> bytes:
    if part == "reasoning":
        return _event(oa.chunk(endpoint, rid, model, reasoning=piece))
    return _event(oa.chunk(endpoint, rid, model, text=piece))


def reasoning_split(server: Any) -> bool:
    """Whether this server splits a reasoning model's <think> block off chat answers
    (runtime.reasoning and the tokenizer; edgekit.runtime.reasoning), decided once. A bundle that
    asks for split with a tokenizer that drops the tags is served unsplit, with one log line."""
    decided = getattr(server, "reasoning_split", None)
    if decided is None:
        from edgekit.errors import EdgekitError
        from edgekit.runtime.reasoning import reasoning_enabled

        mode = getattr(getattr(server, "config", None), "reasoning", "off")
        try:
            decided = reasoning_enabled(mode, getattr(server.parser, "tokenizer", None))
        except EdgekitError as exc:
            server.log(f"reasoning is not split: {exc.one_line()}")
            decided = False
        server.reasoning_split = decided
    return decided


def _reasoning_parser(server: Any, request: Any) -> Any:
    """A parser for this request's answer when it is a chat answer to split, else None."""
    if request.endpoint != "chat" or not reasoning_split(server):
        return None
    from edgekit.runtime.reasoning import ReasoningParser, prompt_opens_reasoning

    return ReasoningParser(in_reasoning=prompt_opens_reasoning(request.prompt))
