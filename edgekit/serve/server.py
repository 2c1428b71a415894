"""``edgekit serve``: an OpenAI-compatible HTTP server over a bundle's runtime router.

    server = EdgekitServer("bundles/smollm2", ServeOptions(port=0), config=resolve_config(bundle))
    server.start()          # listening; /healthz says 503 "loading"
    server.load()           # branches loaded; /healthz 200
    server.url              # http://127.0.0.1:<port>
    server.stop(grace_s=30) # refuse new requests, let the admitted ones finish, close

Stdlib only (``http.server.ThreadingHTTPServer``): one thread per connection, and generation
runs on that thread once :class:`~edgekit.serve.admission.Admission` grants it a slot (one of
``max_concurrency`` routers sharing the loaded branches). The model, not the HTTP layer, is
the bottleneck: a decode step is milliseconds to tens of milliseconds, next to which a
thread per connection costs nothing, and a Jetson image needs no web framework for it.
Endpoints and semantics: docs/serve.md.
"""

from __future__ import annotations

import hmac
import json
import math
import select
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

from edgekit.errors import EdgekitError
from edgekit.serve import openai_api as oa
from edgekit.serve.admission import Admission
from edgekit.serve.generation import ClientGone, GenerationFailed, RequestTimeout, generate
from edgekit.serve.metrics import CONTENT_TYPE, ServeMetrics

COMPLETIONS, CHAT, MODELS, HEALTH, METRICS = "/v1/completions", "/v1/chat/completions", "/v1/models", "/healthz", "/metrics"
POST_PATHS, GET_PATHS = (COMPLETIONS, CHAT), (MODELS, HEALTH, METRICS)
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (server.url says which)
    api_key: str | None = None  # bearer token for /v1/* (and /healthz, /metrics with auth_metrics)
    auth_metrics: bool = False
    max_concurrency: int = 1  # generations at once
    max_queue: int = 16  # requests waiting for a generation slot; more -> 429
    max_tokens_limit: int = 512  # a request's max_tokens above this -> 400
    max_prompt_tokens: int | None = None  # default: the model's context length - 1
    max_body_bytes: int = 1 << 20  # larger bodies -> 413
    request_timeout_s: float = 300.0  # arrival to the end of the answer, queue wait included
    grace_period_s: float = 30.0  # on SIGTERM/SIGINT: how long admitted requests may still take
    access_log: bool = True  # one line per request on stderr
    model_name: str | None = None  # the model id clients send (default: the bundle's name)

    def validate(self) -> None:
        def bad(option: str, why: str, how: str) -> EdgekitError:
            return EdgekitError(f"{option} {why}", where=option, how=how)

        integers = (("--max-concurrency", self.max_concurrency, 1), ("--max-queue", self.max_queue, 0),
                    ("--max-tokens-limit", self.max_tokens_limit, 1), ("--max-body-bytes", self.max_body_bytes, 64))
        for option, value, low in integers:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise bad(option, f"must be an integer >= {low} (got {value!r})", f"pass e.g. {max(low, 1)}")
        if self.max_prompt_tokens is not None and (not isinstance(self.max_prompt_tokens, int) or self.max_prompt_tokens < 1):
            raise bad("--max-prompt-tokens", f"must be an integer >= 1 (got {self.max_prompt_tokens!r})", "pass e.g. 1024")
        if not (isinstance(self.port, int) and 0 <= self.port <= 65535):
            raise bad("--port", f"must be 0..65535 (got {self.port!r})", "pass e.g. 8000, or 0 for any free port")
        for option, value in (("--request-timeout", self.request_timeout_s), ("--grace-period", self.grace_period_s)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise bad(option, f"must be a positive number of seconds (got {value!r})", "pass e.g. 30")
        if self.api_key is not None and not self.api_key.strip():
            raise bad("--api-key", "is empty", "pass a non-empty token (or unset EDGEKIT_API_KEY)")

    @property
    def exposed_without_key(self) -> bool:
        """Listening beyond loopback with no api key: anyone who reaches the port can generate."""
        return self.api_key is None and self.host not in LOOPBACK_HOSTS and not self.host.startswith("127.")


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client must not hold up the process's exit
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], app: EdgekitServer):
        self.app = app
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.address_family = family
        super().__init__(address, _Handler)


class EdgekitServer:
    """The served bundle: its routers, admission, metrics and the HTTP listener."""

    def __init__(self, bundle: str | Path, options: ServeOptions, *, config: Any, threads: int | None = None,
                 log: Callable[[str], None] | None = None):
        options.validate()
        self.bundle, self.options, self.config, self.threads = Path(bundle), options, config, threads
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.model_name = options.model_name or _bundle_name(self.bundle)
        self.created = int((self.bundle / "manifest.json").stat().st_mtime) if (self.bundle / "manifest.json").is_file() else 0
        self.state = "loading"
        self.admission: Admission | None = None
        self.parser: oa.RequestParser | None = None
        self.branches: dict[str, Any] = {}
        self.policy = config.policy
        self.metrics = ServeMetrics(queue_depth=lambda: self.admission.queued if self.admission else 0,
                                    in_flight=lambda: self.admission.running if self.admission else 0,
                                    info={"model": self.model_name, "policy": self.policy})
        self._duration_ewma: float | None = None
        self._ewma_lock = threading.Lock()
        try:
            self.httpd = _HTTPServer((options.host, options.port), self)
        except OSError as exc:
            raise EdgekitError(f"cannot listen on {options.host}:{options.port}: {exc.strerror or exc}", where="--host/--port",
                               how="pick another --port (0 = any free port) or stop the process using it") from None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        port = self.httpd.server_address[1]
        host = self.options.host
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True,
                                        name="edgekit-serve")
        self._thread.start()

    def load(self) -> None:
        """Load the branches (the slow part) and open for requests."""
        from edgekit.runtime.bundle import open_router
        from edgekit.runtime.router import Router

        first = open_router(self.bundle, self.config, threads=self.threads)
        # A Router serves one request at a time; the others share its loaded branches (one ONNX
        # Runtime session or TensorRT context per branch), every request getting its own KV cache.
        routers = [first] + [
            Router(first.small, first.large, first.policy, thresholds=first.thresholds, sampler_params=first.sampler_params,
                   max_new_tokens=first.max_new_tokens, draft_tokens=first.draft_tokens, timeout_s=first.timeout_s,
                   seed=first.seed, draft_min_confidence=first.draft_min_confidence)
            for _ in range(self.options.max_concurrency - 1)
        ]
        small = first.small
        context = int(small.context_length)
        limits = oa.Limits(
            max_tokens_limit=min(self.options.max_tokens_limit, context - 1),
            max_prompt_tokens=min(self.options.max_prompt_tokens or context - 1, context - 1),
            context_length=context,
        )
        # RequestParser encodes once here, on one thread: a fast tokenizer's settings are then
        # fixed, and concurrent encode/decode calls from request threads only read them.
        self.parser = oa.RequestParser(model_name=self.model_name, tokenizer=small.tokenizer, vocab_size=int(small.vocab_size),
                                       default_sampling=first.sampler_params, default_max_tokens=first.max_new_tokens,
                                       limits=limits, policy=first.policy)
        self.branches = {"small": _describe_branch(small), "large": _describe_branch(first.large) if first.large else None}
        self.admission = Admission(routers, self.options.max_queue)
        self.state = "ready"

    def stop(self, grace_s: float | None = None, *, force: threading.Event | None = None) -> bool:
        """Refuse new requests (503), wait up to ``grace_s`` for admitted ones (or until
        ``force`` is set), then close. True when everything admitted finished."""
        grace = self.options.grace_period_s if grace_s is None else grace_s
        self.state = "draining"
        drained = True
        if self.admission is not None:
            self.admission.drain()
            deadline = time.monotonic() + grace
            drained = self.admission.wait_idle(0)
            while not drained and time.monotonic() < deadline and not (force is not None and force.is_set()):
                drained = self.admission.wait_idle(min(0.2, max(0.0, deadline - time.monotonic())))
        self.state = "stopped"
        if self._thread is not None:  # shutdown() waits for serve_forever, which must have started
            self.httpd.shutdown()
            self._thread = None
        self.httpd.server_close()
        return drained

    # -- bookkeeping shared by the handlers

    def retry_after(self) -> int:
        """Seconds a refused client should wait: the recent mean request time, 1..60."""
        with self._ewma_lock:
            mean = self._duration_ewma or 1.0
        return int(min(60, max(1, math.ceil(mean))))

    def record_duration(self, seconds: float) -> None:
        with self._ewma_lock:
            self._duration_ewma = seconds if self._duration_ewma is None else 0.8 * self._duration_ewma + 0.2 * seconds

    def health(self) -> dict[str, Any]:
        status = {"ready": "ok"}.get(self.state, self.state)
        out = {"status": status, "bundle": self.model_name, "policy": self.policy, "branches": self.branches}
        if self.admission is not None:
            out.update(in_flight=self.admission.running, queued=self.admission.queued,
                       max_concurrency=self.admission.max_concurrency, max_queue=self.admission.max_queue)
        return out


def _bundle_name(bundle: Path) -> str:
    try:
        return str(json.loads((bundle / "manifest.json").read_text()).get("name") or bundle.name)
    except (OSError, ValueError):
        return bundle.name


def _describe_branch(branch: Any) -> dict[str, Any]:
    out = {"name": str(getattr(branch, "name", "?")), "backend": str(getattr(branch, "backend", "?"))}
    if getattr(branch, "url", None):
        out["url"] = branch.url
    return out


# --------------------------------------------------------------------------- HTTP


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; streams use chunked transfer encoding
    timeout = 60  # seconds a connection may sit idle or stall mid-request (slow clients)
    server: _HTTPServer

    @property
    def app(self) -> EdgekitServer:
        return self.server.app

    def version_string(self) -> str:
        from edgekit import __version__

        return f"edgekit/{__version__}"

    def log_message(self, format: str, *args: Any) -> None:
        if self.app.options.access_log:
            self.app.log(f"{self.address_string()} - {format % args}")

    # -- routing

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def _route(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        endpoint = path if path in POST_PATHS + GET_PATHS else "other"
        self._endpoint, self._streaming, self._counted = endpoint, False, False
        try:
            if path in POST_PATHS and method == "POST":
                self._generate(path)
            elif path in GET_PATHS and method == "GET":
                self._get(path)
            elif path in POST_PATHS + GET_PATHS:
                allowed = "POST" if path in POST_PATHS else "GET"
                raise oa.ApiError(405, f"{method} is not allowed on {path}; use {allowed}", code="method_not_allowed",
                                  kind="method_not_allowed", headers={"Allow": allowed})
            else:
                raise oa.ApiError(404, f"no endpoint {path}; this server has {', '.join(POST_PATHS + GET_PATHS)}",
                                  code="not_found", kind="not_found")
        except oa.ApiError as exc:
            self._send_error(exc)
        except ClientGone:
            if self._counted:  # the answer was complete and counted; the client left during its last bytes
                self.app.metrics.errors.inc(kind="client_disconnected")
            else:
                self._count(499, "client_disconnected")
            self.close_connection = True
        except Exception as exc:  # a bug: answer 500, keep serving, keep the trace in the log
            self.app.log(f"internal error on {method} {path}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            if not self._streaming and not self._counted:
                self._send_error(oa.ApiError(500, f"internal error: {type(exc).__name__}", type=oa.SERVER_ERROR,
                                             code="internal_error", kind="internal"))
            else:  # an answer already under way: cut it (a stream's client sees no [DONE])
                if not self._counted:
                    self._count(500, "internal")
                else:
                    self.app.metrics.errors.inc(kind="internal")
                self.close_connection = True

    # -- plain answers

    def _send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self._send_bytes(status, data, "application/json", headers)

    def _send_bytes(self, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        # counted before writing: the status is decided, and whoever reads /metrics after the
        # answer arrived sees it
        self._count(status)
        try:
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client left as the answer went out
            self.app.metrics.errors.inc(kind="client_disconnected")
            self.close_connection = True

    def _send_error(self, exc: oa.ApiError) -> None:
        headers = dict(exc.headers)
        if exc.status in (429, 503) and "Retry-After" not in headers:
            headers["Retry-After"] = str(self.app.retry_after())
        if exc.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="edgekit"'
        self.app.metrics.errors.inc(kind=exc.kind)
        self._send_json(exc.status, exc.body(), headers)

    def _count(self, status: int, error_kind: str | None = None) -> None:
        self._counted = True
        self.app.metrics.requests.inc(endpoint=self._endpoint, code=str(status))
        if error_kind:
            self.app.metrics.errors.inc(kind=error_kind)

    def _authorize(self, path: str) -> None:
        key = self.app.options.api_key
        if key is None or (path in (HEALTH, METRICS) and not self.app.options.auth_metrics):
            return
        header = self.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        # compare_digest: the time taken does not depend on how much of the key matched
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("utf-8"), key.encode("utf-8")):
            self.close_connection = True  # an unread body may follow; do not parse it as a request
            raise oa.ApiError(401, "missing or invalid API key: send the header 'Authorization: Bearer <key>'",
                              code="invalid_api_key", kind="unauthorized")

    def _get(self, path: str) -> None:
        self._authorize(path)
        app = self.app
        if path == HEALTH:
            self._send_json(200 if app.state == "ready" else 503, app.health(),
                            {} if app.state == "ready" else {"Retry-After": str(app.retry_after())})
        elif path == METRICS:
            self._send_bytes(200, app.metrics.render().encode("utf-8"), CONTENT_TYPE)
        else:
            self._send_json(200, {"object": "list", "data": [
                {"id": app.model_name, "object": "model", "created": app.created, "owned_by": "edgekit"}]})

    # -- generation

    def _read_json(self) -> Any:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise oa.ApiError(411, "send the body with a Content-Length (chunked request bodies are not supported)",
                              code="length_required")
        length_text = self.headers.get("Content-Length")
        try:
            length = int(length_text) if length_text is not None else 0
        except ValueError:
            self.close_connection = True
            raise oa.bad(f"Content-Length {length_text!r} is not a number") from None
        limit = self.app.options.max_body_bytes
        if length > limit:
            self.close_connection = True  # the body stays unread
            raise oa.ApiError(413, f"the request body has {length} bytes, more than this server's limit of {limit} "
                              "(--max-body-bytes)", code="payload_too_large", kind="payload_too_large")
        if length <= 0:
            raise oa.bad("the request has no body; send a JSON object")
        raw = self.rfile.read(length)
        if len(raw) < length:
            self.close_connection = True
            raise oa.bad(f"the request body ended after {len(raw)} of {length} bytes")
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise oa.bad(f"the request body is not valid JSON: {exc}", code="invalid_json") from None

    def _client_gone(self) -> bool:
        """The client closed its end (a readable socket with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _unavailable(self, code: str, message: str) -> oa.ApiError:
        return oa.ApiError(503, message, type=oa.UNAVAILABLE, code=code, kind="unavailable")

    def _generate(self, path: str) -> None:
        app = self.app
        arrival = time.perf_counter()
        self._authorize(path)
        if app.state == "loading":
            self.close_connection = True
            raise self._unavailable("loading", "the model is still loading; retry shortly")
        if app.state != "ready":
            self.close_connection = True
            raise self._unavailable("draining", "the server is shutting down and takes no new requests")
        body = self._read_json()
        parser = app.parser
        request = parser.completion(body) if path == COMPLETIONS else parser.chat(body)
        ticket = app.admission.admit()
        if ticket.status == "full":
            raise oa.ApiError(429, f"the server is at capacity ({app.admission.max_concurrency} generating, "
                              f"{app.admission.max_queue} waiting); retry after the Retry-After seconds",
                              type=oa.RATE_LIMIT, code="queue_full", kind="queue_full")
        if ticket.status == "draining":
            raise self._unavailable("draining", "the server is shutting down and takes no new requests")
        deadline = arrival + app.options.request_timeout_s
        router = ticket.router
        if router is None:
            router = app.admission.wait(ticket, max(0.0, deadline - time.perf_counter()), abandon=self._client_gone)
            if router is None:
                if self._client_gone():
                    raise ClientGone()
                raise oa.ApiError(503, f"no generation slot became free within the request timeout "
                                  f"({app.options.request_timeout_s:g} s, --request-timeout)", type=oa.UNAVAILABLE,
                                  code="queue_timeout", kind="queue_timeout")
        admitted = time.perf_counter()
        app.metrics.queue_wait.observe(admitted - arrival)
        try:
            if request.stream:
                self._stream(request, router, arrival, admitted, deadline)
            else:
                self._complete(request, router, arrival, admitted, deadline)
        finally:
            app.admission.release(router)
            app.record_duration(time.perf_counter() - admitted)

    def _edgekit_field(self, outcome: Any, queue_s: float) -> dict[str, Any]:
        app = self.app
        out = {
            "branch": outcome.branch, "answered_by": outcome.answered_by, "policy": app.policy, "fell_back": outcome.fell_back,
            "escalated": outcome.escalated, "reason": outcome.reason,
            "ttft_ms": round(outcome.ttft_s * 1000, 1) if outcome.ttft_s is not None else None,
            "tokens_per_s": round(1.0 / outcome.tpot_s, 2) if outcome.tpot_s else None,
            "queue_ms": round(queue_s * 1000, 1),
        }
        if outcome.result is not None and outcome.result.score is not None:
            out.update(score=outcome.result.score, threshold=outcome.result.threshold)
        if outcome.result is not None and outcome.result.acceptance_rate is not None:
            out["acceptance_rate"] = outcome.result.acceptance_rate
        return out

    def _record_answer(self, request: Any, outcome: Any, arrival: float, admitted: float) -> None:
        m = self.app.metrics
        m.prompt_tokens.inc(request.prompt_tokens)
        m.generated_tokens.inc(outcome.completion_tokens)
        fell_back = "unknown" if outcome.fell_back is None else str(bool(outcome.fell_back)).lower()
        m.answers.inc(branch=outcome.branch or "none", fell_back=fell_back)
        if outcome.escalated:
            m.escalations.inc()
        if outcome.result is not None:
            for attempt in outcome.result.attempts:
                if not attempt.get("ok"):
                    m.branch_failures.inc(branch=attempt.get("branch", "?"))
        if outcome.ttft_s is not None:
            m.ttft.observe((admitted - arrival) + outcome.ttft_s)
        if outcome.tpot_s is not None:
            m.tpot.observe(outcome.tpot_s)
        m.duration.observe(time.perf_counter() - arrival)

    def _run(self, request: Any, router: Any, deadline: float, emit=None):
        parser = self.app.parser
        return generate(router, request.prompt, max_tokens=request.max_tokens, sampler_params=request.sampler_params,
                        seed=request.seed, stops=request.stop, deadline=deadline, emit=emit,
                        client_gone=None if emit else self._client_gone,
                        count_tokens=lambda text: len(parser.tokenizer.encode(text, add_special_tokens=False)))

    def _complete(self, request: Any, router: Any, arrival: float, admitted: float, deadline: float) -> None:
        try:
            outcome = self._run(request, router, deadline)
        except RequestTimeout:
            raise self._timed_out() from None
        except GenerationFailed as exc:
            raise self._generation_failed(str(exc)) from None
        rid = oa.new_id(request.endpoint)
        reason = oa.finish_reason(outcome.finish_reason, outcome.stopped)
        use = oa.usage(request.prompt_tokens, outcome.completion_tokens)
        body = oa.response(request.endpoint, rid, self.app.model_name, outcome.text, reason, use,
                           self._edgekit_field(outcome, admitted - arrival))
        self._record_answer(request, outcome, arrival, admitted)
        self._send_json(200, body)

    def _timed_out(self) -> oa.ApiError:
        return oa.ApiError(504, f"the answer took longer than the request timeout ({self.app.options.request_timeout_s:g} s, "
                           "--request-timeout)", type=oa.SERVER_ERROR, code="request_timeout", kind="request_timeout")

    def _generation_failed(self, message: str) -> oa.ApiError:
        return oa.ApiError(503, f"no branch could answer: {message}", type=oa.SERVER_ERROR, code="branches_unavailable",
                           kind="generation_failed")

    # -- streaming (server-sent events over chunked transfer encoding)

    def _write_chunk(self, data: bytes) -> None:
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        except OSError:  # BrokenPipe, ConnectionReset, a send timeout: the client is gone
            raise ClientGone() from None

    def _event(self, obj: Any) -> None:
        self._write_chunk(b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n")

    def _stream(self, request: Any, router: Any, arrival: float, admitted: float, deadline: float) -> None:
        app = self.app
        rid, model, endpoint = oa.new_id(request.endpoint), app.model_name, request.endpoint
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Accel-Buffering", "no")  # nginx: pass events through as they come
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._streaming = True
        if endpoint == "chat":
            self._event(oa.chunk(endpoint, rid, model, role=True))

        def emit(kind: str, text: str) -> None:
            if kind == "text":
                self._event(oa.chunk(endpoint, rid, model, text=text))
            elif kind == "reset":  # the text of this choice so far is void; the new answer follows from its start
                self._event(oa.chunk(endpoint, rid, model, edgekit={"event": "reset", "reason": text}))
            else:
                self._write_chunk(b": keep-alive\n\n")

        error: oa.ApiError | None = None
        try:
            outcome = self._run(request, router, deadline, emit)
        except RequestTimeout:
            error = self._timed_out()
        except GenerationFailed as exc:
            error = self._generation_failed(str(exc))
        if error is not None:  # the status line is sent: the error travels as an event, then [DONE]
            self._count(error.status, error.kind)  # the status the error would have had
            self._event(error.body())
            self._write_chunk(b"data: [DONE]\n\n")
            self._write_chunk(b"")
            return
        reason = oa.finish_reason(outcome.finish_reason, outcome.stopped)
        use = oa.usage(request.prompt_tokens, outcome.completion_tokens)
        self._event(oa.chunk(endpoint, rid, model, reason=reason, edgekit=self._edgekit_field(outcome, admitted - arrival)))
        if request.include_usage:
            self._event(oa.chunk(endpoint, rid, model, use=use, no_choices=True))
        self._record_answer(request, outcome, arrival, admitted)
        self._count(200)  # the answer is complete; only the end-of-stream marker is left
        self._write_chunk(b"data: [DONE]\n\n")
        self._write_chunk(b"")  # the last chunk of the chunked body


# --------------------------------------------------------------------------- the command


def serve(bundle: str | Path, options: ServeOptions, *, config: Any, threads: int | None = None,
          on_ready: Callable[[EdgekitServer], None] | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Serve until SIGINT/SIGTERM, then drain: new requests get 503, admitted ones have
    ``grace_period_s`` to finish (a second signal stops at once). Blocks; returns a summary."""
    import signal

    server = EdgekitServer(bundle, options, config=config, threads=threads, log=log)
    stop, force = threading.Event(), threading.Event()
    received: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        received.append(signum)
        (force if stop.is_set() else stop).set()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        server.start()
        try:
            server.load()
        except BaseException:
            server.stop(0)
            raise
        if on_ready is not None and not stop.is_set():
            on_ready(server)
        while not stop.wait(0.5):
            pass
        server.log(f"edgekit serve: {signal.Signals(received[0]).name if received else 'stop'} received; draining "
                   f"(up to {options.grace_period_s:g} s; a second signal stops at once)")
        running = server.admission.running + server.admission.queued if server.admission else 0
        drained = server.stop(force=force)
        left = server.admission.running + server.admission.queued if server.admission else 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return {"url": server.url, "drained": drained, "in_flight_at_signal": running, "unfinished": left}
