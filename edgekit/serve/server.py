"""``edgekit serve``: an OpenAI-compatible HTTP server over a bundle's runtime router.

    server = EdgekitServer("bundles/smollm2", ServeOptions(port=0), config=resolve_config(bundle))
    server.start()          # listening; /healthz says 503 "loading"
    server.load()           # branches loaded; /healthz 200
    server.url              # http://127.0.0.1:<port> (https:// with TLS)
    server.stop(grace_s=30) # refuse new requests, let the admitted ones finish, close

The HTTP stack is maintained and pure Python: uvicorn with its h11 protocol (no uvloop or
httptools to build on a device), extended by :mod:`edgekit.serve.http` (connection cap,
header and send timeouts, half-close, error answers in the API's shape), running the starlette
ASGI application of :mod:`edgekit.serve.app`. uvicorn runs on a background thread with its own
event loop, so the server is embeddable (``start()`` returns); the event loop only moves bytes,
the model runs on threads (parsing on a small pool, one daemon thread per admitted
generation, at most ``max_concurrency``; see :mod:`edgekit.serve.app`). TLS, optionally mutual,
is the standard library's ``ssl`` on uvicorn's listener. /metrics is ``prometheus_client``
with a registry per server. Endpoints and semantics: docs/serve.md.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import ssl
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from edgekit.errors import EdgekitError
from edgekit.serve import openai_api as oa
from edgekit.serve.admission import Admission
from edgekit.serve.app import CHAT, COMPLETIONS, GET_PATHS, HEALTH, METRICS, MODELS, POST_PATHS, ServeApp  # noqa: F401
from edgekit.serve.http import MAX_HEADER_BYTES, ConnectionGuard, protocol_class
from edgekit.serve.metrics import ServeMetrics

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
PARSE_THREADS = 2  # JSON, chat template and tokenizing run here, off the event loop
STOP_FLUSH_S = 3.0  # after the drain: how long answers already decided may take to go out


#: --max-tokens-limit when the bundle's own max_new_tokens is smaller
DEFAULT_MAX_TOKENS_LIMIT = 512


def max_tokens_limit(option: int | None, bundle_max_new_tokens: int, context: int) -> int:
    """The largest max_tokens a request may ask for: ``--max-tokens-limit`` when given, else
    the bundle's max_new_tokens or DEFAULT_MAX_TOKENS_LIMIT, whichever is larger (a reasoning
    bundle defaults to its context: 512 would cut its thinking short); below the context."""
    wanted = option if option is not None else max(DEFAULT_MAX_TOKENS_LIMIT, bundle_max_new_tokens)
    return max(1, min(wanted, context - 1))


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (server.url says which)
    api_key: str | None = None  # bearer token for /v1/* (and /healthz, /metrics with auth_metrics)
    auth_metrics: bool = False
    max_concurrency: int = 1  # generations at once
    max_queue: int = 16  # requests waiting for a generation slot; more -> 429
    max_tokens_limit: int | None = None  # a request's max_tokens above this -> 400 (default: DEFAULT_MAX_TOKENS_LIMIT
    # or the bundle's max_new_tokens, whichever is larger: a reasoning bundle's answers are long)
    max_prompt_tokens: int | None = None  # default: the model's context length - 1
    max_body_bytes: int = 1 << 20  # larger bodies -> 413
    request_timeout_s: float = 300.0  # arrival to the end of the answer, queue wait included
    grace_period_s: float = 30.0  # on SIGTERM/SIGINT: how long admitted requests may still take
    access_log: bool = True  # one line per request on stderr
    model_name: str | None = None  # the model id clients send (default: the bundle's name)
    max_connections: int = 64  # open client connections; one more is answered 503 and closed
    header_timeout_s: float = 10.0  # connection start / previous answer -> end of the request's headers (and body)
    keep_alive_timeout_s: float = 5.0  # an idle keep-alive connection is closed after this
    send_timeout_s: float = 30.0  # an answer the client does not read for this long cuts the connection
    tls_cert: str | None = None  # PEM certificate (chain) -> HTTPS
    tls_key: str | None = None  # PEM private key (unencrypted)
    tls_client_ca: str | None = None  # PEM CA bundle: client certificates required and verified (mutual TLS)

    def validate(self) -> None:
        def bad(option: str, why: str, how: str) -> EdgekitError:
            return EdgekitError(f"{option} {why}", where=option, how=how)

        integers = (("--max-concurrency", self.max_concurrency, 1), ("--max-queue", self.max_queue, 0),
                    ("--max-tokens-limit", self.max_tokens_limit, 1), ("--max-body-bytes", self.max_body_bytes, 64),
                    ("--max-connections", self.max_connections, 1))
        for option, value, low in integers:
            if option == "--max-tokens-limit" and value is None:  # the default: from the bundle
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise bad(option, f"must be an integer >= {low} (got {value!r})", f"pass e.g. {max(low, 1)}")
        if self.max_prompt_tokens is not None and (not isinstance(self.max_prompt_tokens, int) or self.max_prompt_tokens < 1):
            raise bad("--max-prompt-tokens", f"must be an integer >= 1 (got {self.max_prompt_tokens!r})", "pass e.g. 1024")
        if not (isinstance(self.port, int) and 0 <= self.port <= 65535):
            raise bad("--port", f"must be 0..65535 (got {self.port!r})", "pass e.g. 8000, or 0 for any free port")
        seconds = (("--request-timeout", self.request_timeout_s), ("--grace-period", self.grace_period_s),
                   ("--header-timeout", self.header_timeout_s), ("--keep-alive-timeout", self.keep_alive_timeout_s),
                   ("send_timeout_s", self.send_timeout_s))
        for option, value in seconds:
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise bad(option, f"must be a positive number of seconds (got {value!r})", "pass e.g. 30")
        if self.api_key is not None and not self.api_key.strip():
            raise bad("--api-key", "is empty", "pass a non-empty token (or unset EDGEKIT_API_KEY)")
        if (self.tls_cert is None) != (self.tls_key is None):
            given, missing = ("--tls-cert", "--tls-key") if self.tls_key is None else ("--tls-key", "--tls-cert")
            raise bad(missing, f"is missing ({given} was given)", "pass both --tls-cert FILE and --tls-key FILE")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise bad("--tls-client-ca", "needs TLS", "pass --tls-cert FILE and --tls-key FILE too")

    @property
    def loopback(self) -> bool:
        return self.host in LOOPBACK_HOSTS or self.host.startswith("127.")

    @property
    def exposed_without_key(self) -> bool:
        """Listening beyond loopback with no api key: anyone who reaches the port can generate."""
        return self.api_key is None and not self.loopback

    def exposure_warnings(self) -> list[str]:
        """One line per risk of listening beyond loopback: no API key, no TLS."""
        if self.loopback:
            return []
        out = []
        if self.api_key is None:
            out.append(f"warning: listening on {self.host} without --api-key: anyone who can reach this port can use the "
                       "model. Set --api-key (or EDGEKIT_API_KEY), or listen on 127.0.0.1 behind a reverse proxy.")
        if self.tls_cert is None:
            out.append(f"warning: listening on {self.host} without TLS: prompts, answers and the API key cross the network "
                       "in clear text. Pass --tls-cert and --tls-key (and --tls-client-ca for mutual TLS), or terminate "
                       "TLS in a reverse proxy.")
        return out


def tls_context(cert: str, key: str, client_ca: str | None = None) -> tuple[ssl.SSLContext, list[str]]:
    """The server's TLS context (TLS 1.2 at least; 1.3 when the client has it) and warnings
    about the certificate. Unusable files are an :class:`EdgekitError` naming the option."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    def read(option: str, path: str, what: str) -> bytes:
        p = Path(path)
        if not p.is_file():
            raise EdgekitError(f"{option} {path}: no such file", where=option, how=f"pass the path of a PEM {what}")
        try:
            return p.read_bytes()
        except OSError as exc:
            raise EdgekitError(f"{option} {path}: cannot read it ({exc.strerror or exc})", where=option,
                               how="check the file's permissions for the user running edgekit serve") from None

    cert_pem, key_pem = read("--tls-cert", cert, "certificate"), read("--tls-key", key, "private key")
    try:
        certs = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise EdgekitError(f"--tls-cert {cert}: not a PEM certificate", where="--tls-cert",
                           how="pass the certificate (chain) in PEM form, '-----BEGIN CERTIFICATE-----'") from None
    try:
        load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise EdgekitError(f"--tls-key {key}: the key is encrypted with a passphrase", where="--tls-key",
                           how="give the server an unencrypted key (openssl pkey -in KEY -out KEY.plain; chmod 600)") from None
    except (ValueError, Exception) as exc:  # cryptography raises ValueError, or UnsupportedAlgorithm
        raise EdgekitError(f"--tls-key {key}: not a PEM private key ({type(exc).__name__})", where="--tls-key",
                           how="pass the private key in PEM form, '-----BEGIN PRIVATE KEY-----'") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise EdgekitError(f"--tls-cert/--tls-key: cannot use them together ({exc.reason or exc})", where="--tls-key",
                           how="pass the private key that belongs to the certificate") from None
    if client_ca is not None:
        ca_pem = read("--tls-client-ca", client_ca, "CA certificate")
        try:
            x509.load_pem_x509_certificates(ca_pem)
            context.load_verify_locations(cafile=client_ca)
        except (ValueError, ssl.SSLError):
            raise EdgekitError(f"--tls-client-ca {client_ca}: not a PEM certificate", where="--tls-client-ca",
                               how="pass the CA certificate(s) that sign the clients' certificates, in PEM form") from None
        context.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: no certificate, or one the CA did not sign -> no connection
    warnings = []
    leaf = certs[0]
    now = time.time()
    if leaf.not_valid_after_utc.timestamp() < now:
        warnings.append(f"warning: the TLS certificate {cert} expired on {leaf.not_valid_after_utc:%Y-%m-%d}; clients "
                        "will refuse it")
    elif leaf.not_valid_before_utc.timestamp() > now:
        warnings.append(f"warning: the TLS certificate {cert} is not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} "
                        "UTC; clients will refuse it until then")
    return context, warnings


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise EdgekitError(f"cannot listen on {host}:{port}: {exc.strerror or exc}", where="--host/--port",
                           how="pick another --port (0 = any free port) or stop the process using it") from None
    return sock


class EdgekitServer:
    """The served bundle: its routers, admission, metrics and the HTTP listener."""

    def __init__(self, bundle: str | Path, options: ServeOptions, *, config: Any, threads: int | None = None,
                 log: Callable[[str], None] | None = None, health: Any = None):
        """``health``: the device-health reader for /metrics (default: a
        :class:`edgekit.telemetry.DeviceHealth` over whatever this host has)."""
        import uvicorn

        from edgekit import __version__

        from edgekit.bundle.manifest import Bundle

        options.validate()
        # opened once (edgekit.bundle.manifest): the name, the creation time and the branches
        self.handle = Bundle.open(bundle)
        self.bundle, self.options, self.config, self.threads = self.handle.dir, options, config, threads
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.model_name = options.model_name or self.handle.name
        self.created = int(self.handle.manifest_path.stat().st_mtime)
        self.state = "loading"
        self.admission: Admission | None = None
        self.parser: oa.RequestParser | None = None
        self.branches: dict[str, Any] = {}
        self.policy = config.policy
        self.load_monitor: Any = None  # policy degrade: the large branch's load, shared by the routers (runtime/load.py)
        self.ssl: ssl.SSLContext | None = None
        if options.tls_cert is not None:
            self.ssl, warnings = tls_context(options.tls_cert, options.tls_key, options.tls_client_ca)
            for line in warnings:
                self.log(line)
        self.guard = ConnectionGuard(max_connections=options.max_connections, header_timeout_s=options.header_timeout_s,
                                     send_timeout_s=options.send_timeout_s, count=self._count_connection_event,
                                     log=self.log, quiet=not options.access_log)
        if health is None:
            from edgekit.telemetry import DeviceHealth

            health = DeviceHealth()
        self.device_health = health
        self.metrics = ServeMetrics(queue_depth=lambda: self.admission.queued if self.admission else 0,
                                    in_flight=lambda: self.admission.running if self.admission else 0,
                                    info={"model": self.model_name, "policy": self.policy},
                                    open_connections=lambda: self.guard.open,
                                    budgets=self.handle.manifest.budgets, health=health,
                                    prefix_cache_bytes=lambda: sum(c.bytes for c in self.prefix_caches))
        self.prefix_caches: list = []  # one per local branch when prompt-prefix reuse is on
        self._duration_ewma: float | None = None
        self._ewma_lock = threading.Lock()
        self.unfinished = 0  # requests still running or queued when the grace period ended
        self.aborting = threading.Event()  # the grace period is over: running generations stop, queued ones get 503
        self.exchanges: set = set()  # requests being answered (touched on the event loop only)
        self._parse_pool = ThreadPoolExecutor(max_workers=PARSE_THREADS, thread_name_prefix="edgekit-parse")
        self.sock = _listen(options.host, options.port)
        self.port = self.sock.getsockname()[1]
        uv_config = uvicorn.Config(
            ServeApp(self), http=protocol_class(self.guard), ws="none", lifespan="off", interface="asgi3", loop="none",
            log_config=None, access_log=False, proxy_headers=False, server_header=False, date_header=True,
            headers=[("server", f"edgekit/{__version__}")], timeout_keep_alive=options.keep_alive_timeout_s,  # type: ignore[arg-type]
            h11_max_incomplete_event_size=MAX_HEADER_BYTES, timeout_graceful_shutdown=int(math.ceil(STOP_FLUSH_S)),
        )
        uv_config.load()
        uv_config.ssl = self.ssl  # our context (TLS floor, mutual TLS), not one uvicorn builds from file names
        self._uvicorn = uvicorn.Server(uv_config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        port = self.port
        host = self.options.host
        return f"{'https' if self.ssl else 'http'}://{'[' + host + ']' if ':' in host else host}:{port}"

    def start(self) -> None:
        """Serve on a background thread (its own event loop); returns once listening."""
        failed: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            try:
                loop.run_until_complete(self._uvicorn.serve(sockets=[self.sock]))
            except BaseException as exc:  # noqa: BLE001 — reported by start()
                failed.append(exc)
            finally:
                loop.close()

        self.device_health.start()  # tegrastats in the background on a Jetson; nothing to start elsewhere
        self._thread = threading.Thread(target=run, daemon=True, name="edgekit-serve")
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._uvicorn.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self._uvicorn.started:
            raise EdgekitError(f"the HTTP server did not start: {failed[0] if failed else 'timed out'}", where="edgekit serve",
                               how="see the log above")

    def load(self) -> None:
        """Load the branches (the slow part) and open for requests."""
        from edgekit.runtime.bundle import open_router
        from edgekit.runtime.router import Router

        first = open_router(self.handle, self.config, threads=self.threads)
        batching = getattr(self.config, "batching", None)
        if self.options.max_concurrency > 1 and batching is not None and batching.max_batch > 1:
            from edgekit.runtime.backends.batched import batch_branches

            # the streams of each local branch share its decode steps (docs/serve.md, "Batched decoding")
            batch_branches(first, batching, on_step=lambda label, size: self.metrics.batch_size.observe(size, branch=label))
        # A Router serves one request at a time; the others share its loaded branches (one ONNX
        # Runtime session or TensorRT context per branch), every request getting its own KV cache.
        routers = [first] + [
            Router(first.small, first.large, first.policy, thresholds=first.thresholds, sampler_params=first.sampler_params,
                   max_new_tokens=first.max_new_tokens, draft_tokens=first.draft_tokens, timeout_s=first.timeout_s,
                   seed=first.seed, draft_min_confidence=first.draft_min_confidence, degrade=first.degrade, load=first.load)
            for _ in range(self.options.max_concurrency - 1)
        ]
        if first.load is not None:  # policy degrade: one load monitor for all the routers (they share the large branch)
            self.metrics.watch_load(first.load)
            self.load_monitor = first.load
        from edgekit.runtime.prefix_cache import attach_prefix_caches

        # the branches are shared, so their prefix caches are too
        self.prefix_caches = attach_prefix_caches(first, getattr(self.config, "prefix_cache", None),
                                                  on_lookup=self.metrics.prefix_lookup)
        small = first.small
        context = int(small.context_length)
        limits = oa.Limits(
            max_tokens_limit=max_tokens_limit(self.options.max_tokens_limit, int(first.max_new_tokens), context),
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
        ``force`` is set), then answer what is left 503 — queued requests, and running ones,
        whose generation stops at its next token — and close. True when everything admitted
        finished."""
        grace = self.options.grace_period_s if grace_s is None else grace_s
        self.state = "draining"
        drained = True
        if self.admission is not None:
            self.admission.drain()
            deadline = time.monotonic() + grace
            drained = self.admission.wait_idle(0)
            while not drained and time.monotonic() < deadline and not (force is not None and force.is_set()):
                drained = self.admission.wait_idle(min(0.2, max(0.0, deadline - time.monotonic())))
            if not drained:
                self.unfinished = self.admission.running + self.admission.queued
                self.aborting.set()
                self.admission.cancel_waiting()
                self._in_loop(self._abort_exchanges)
        self.state = "stopped"
        flush_until = time.monotonic() + STOP_FLUSH_S  # answers already decided (and the 503s above) go out
        while self.exchanges and time.monotonic() < flush_until and self._thread is not None and self._thread.is_alive():
            time.sleep(0.02)
        if self._thread is not None:
            # Idle and closing connections go now (uvicorn would wait for their clients to close);
            # then uvicorn closes the listener and ends its loop.
            self._in_loop(self._close_connections)
            close_until = time.monotonic() + STOP_FLUSH_S
            while self.guard.open > 0 and time.monotonic() < close_until and self._thread.is_alive():
                time.sleep(0.02)
            self._uvicorn.should_exit = True
            self._thread.join(STOP_FLUSH_S + 10)
            self._thread = None
        else:
            self.sock.close()
        self._parse_pool.shutdown(wait=False)
        self.device_health.close()
        return drained

    def _in_loop(self, fn: Callable[[], None]) -> None:
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(fn)
            except RuntimeError:  # the loop has closed
                pass

    def _close_connections(self) -> None:
        for protocol in list(self._uvicorn.server_state.connections):
            close_now = getattr(protocol, "close_now", None)
            if close_now is not None:
                close_now()

    def _abort_exchanges(self) -> None:
        for exchange in list(self.exchanges):
            exchange._deliver(("abort", None))

    # -- bookkeeping shared by the requests

    async def parse(self, path: str, raw: bytes) -> Any:
        """The validated request for ``raw`` (JSON decoding, the untrusted-JSON checks, the
        chat template and tokenizing: on the parse threads)."""
        return await asyncio.get_running_loop().run_in_executor(self._parse_pool, self._parse, path, raw)

    def _parse(self, path: str, raw: bytes) -> Any:
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise oa.bad(f"the request body is not valid JSON: {oa.printable(str(exc))}", code="invalid_json") from None
        oa.check_json(body)
        parser = self.parser
        return parser.completion(body) if path == COMPLETIONS else parser.chat(body)

    def _count_connection_event(self, status: int | None, kind: str | None) -> None:
        if status is not None:
            self.metrics.requests.inc(endpoint="other", code=str(status))
        if kind is not None:
            self.metrics.errors.inc(kind=kind)

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
        out = {"status": status, "bundle": self.model_name, "policy": self.policy, "branches": self.branches,
               "device_health": self.device_health.sources}
        if self.admission is not None:
            out.update(in_flight=self.admission.running, queued=self.admission.queued,
                       max_concurrency=self.admission.max_concurrency, max_queue=self.admission.max_queue)
        if self.load_monitor is not None:
            out["load"] = self.load_monitor.state()
        return out


def _describe_branch(branch: Any) -> dict[str, Any]:
    out = {"name": str(getattr(branch, "name", "?")), "backend": str(getattr(branch, "backend", "?"))}
    if getattr(branch, "url", None):
        out["url"] = branch.url
    return out


# --------------------------------------------------------------------------- the command


def serve(bundle: str | Path, options: ServeOptions, *, config: Any, threads: int | None = None,
          on_ready: Callable[[EdgekitServer], None] | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Serve until SIGINT/SIGTERM, then drain: new requests get 503, admitted ones have
    ``grace_period_s`` to finish (a second signal stops at once), what is left then gets 503.
    Blocks; returns a summary."""
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
        left = server.unfinished
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return {"url": server.url, "drained": drained, "in_flight_at_signal": running, "unfinished": left}
