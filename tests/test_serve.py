"""`edgekit serve` on a real tiny bundle, talked to with a real HTTP client (http.client).

The large branch, where one is needed, is a real local HTTP server speaking OpenAI's
/v1/completions that holds every answer until the test releases it: overload, queueing,
disconnects and draining are then deterministic, not races against a fast model. The
metrics are read back with a small parser of the Prometheus text format that also checks
the format (HELP/TYPE before samples, cumulative buckets, +Inf == _count).
"""

from __future__ import annotations

import collections
import http.client
import json
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from conftest import compress_tiny_bundle

PROMPT = "The for statement is used to iterate over"
TEMPLATE = ("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant]{% endif %}")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_model_dir) -> Path:
    return compress_tiny_bundle(tmp_path_factory.mktemp("serve"), tiny_model_dir, extra="runtime:\n  max_new_tokens: 24\n")


@pytest.fixture(scope="module")
def start(bundle):
    """start(policy=..., large=..., thresholds=..., load=True, bundle_dir=..., **ServeOptions) -> a running server."""
    from edgekit.runtime.bundle import resolve_config
    from edgekit.serve.server import EdgekitServer, ServeOptions

    started = []

    def _start(*, policy=None, large=None, thresholds=None, load=True, bundle_dir=None, health=None, **options):
        where = bundle_dir or bundle
        config = resolve_config(where, policy=policy, large=large)
        if thresholds:
            config = config.model_copy(update={"thresholds": thresholds})
        server = EdgekitServer(where, ServeOptions(port=0, access_log=False, **options), config=config, threads=1, health=health)
        server.start()
        started.append(server)
        if load:
            server.load()
        return server

    yield _start
    for server in started:
        server.stop(0)


@pytest.fixture(scope="module")
def plain(start):
    """The everyday server: small_only, small limits to test against."""
    return start(max_prompt_tokens=64, max_tokens_limit=200, max_body_bytes=4096, max_concurrency=2)


class FakeRemote:
    """An OpenAI-compatible /v1/completions endpoint that answers ``text`` once ``release`` is set."""

    def __init__(self, text: str = " from the large model", gated: bool = False):
        self.text, self.release, self.received = text, threading.Event(), 0
        if not gated:
            self.release.set()
        remote = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                remote.received += 1
                remote.release.wait(30)
                body = json.dumps({"choices": [{"text": remote.text, "finish_reason": "stop"}],
                                   "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, address: None  # a caller that left (a server that was stopped) is fine
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def remote():
    made = []

    def make(**kw):
        made.append(FakeRemote(**kw))
        return made[-1]

    yield make
    for r in made:
        r.close()


# --------------------------------------------------------------------------- a client


def call(url, method, path, body=None, headers=None, timeout=60):
    """(status, headers, decoded JSON or text) of one request on a fresh connection."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        data = body if isinstance(body, (bytes, str)) or body is None else json.dumps(body)
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        raw = resp.read()
        kind = resp.getheader("Content-Type", "")
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, json.loads(raw) if "json" in kind else raw.decode()
    finally:
        conn.close()


def post(url, path, body, **kw):
    return call(url, "POST", path, body, **kw)


def stream(url, path, body, headers=None):
    """The parsed `data:` events of a streamed answer ("[DONE]" as the string)."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    try:
        conn.request("POST", path, body=json.dumps({**body, "stream": True}),
                     headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        assert resp.getheader("Content-Type").startswith("text/event-stream")
        events = []
        for line in resp:
            line = line.decode("utf-8").rstrip("\n")
            if line.startswith("data: "):
                events.append("[DONE]" if line == "data: [DONE]" else json.loads(line[6:]))
            else:
                assert line == "" or line.startswith(":"), line  # separators and comments only
        return events
    finally:
        conn.close()


def streamed_text(events, endpoint="completions"):
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks = [e for e in events[:-1] if e.get("choices")]
    if endpoint == "chat":
        return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    return "".join(c["choices"][0]["text"] for c in chunks)


def assert_error(status_body, status, *, code=None, param=None, type_=None):
    got, _, body = status_body[:3]
    assert got == status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    if param is not None:
        assert body["error"]["param"] == param, body
    if type_ is not None:
        assert body["error"]["type"] == type_, body
    return body["error"]


def wait_until(condition, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def abort(conn):
    """Close a client connection with a TCP reset (SO_LINGER 0), like a killed client."""
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


# --------------------------------------------------------------------------- metrics


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)",?')


class Metrics:
    """A parsed /metrics page. Checks the format as it parses."""

    def __init__(self, text: str):
        self.types, self.samples = {}, {}
        helped = set()
        for line in text.splitlines():
            if line.startswith("# HELP "):
                name, _, help_text = line[7:].partition(" ")
                assert help_text, line
                helped.add(name)
            elif line.startswith("# TYPE "):
                name, kind = line[7:].split(" ")
                assert name in helped and name not in self.types and kind in ("counter", "gauge", "histogram"), line
                self.types[name] = kind
            else:
                m = _SAMPLE.match(line)
                assert m, f"not a sample line: {line!r}"
                name, labels_text, value = m.groups()
                labels = dict(_LABEL.findall(labels_text or ""))
                assert "".join(f'{k}="{v}",' for k, v in labels.items()).rstrip(",") == (labels_text or ""), line
                family = re.sub(r"_(bucket|sum|count)$", "", name) if re.sub(r"_(bucket|sum|count)$", "", name) in self.types \
                    and self.types[re.sub(r"_(bucket|sum|count)$", "", name)] == "histogram" else name
                assert family in self.types, f"sample before its TYPE line: {line}"
                key = (name, frozenset(labels.items()))
                assert key not in self.samples, f"duplicate sample {line}"
                self.samples[key] = float(value)
        for family, kind in self.types.items():
            if kind == "histogram":
                self._check_histogram(family)

    def _check_histogram(self, family):
        series = collections.defaultdict(list)
        for (name, labels), value in self.samples.items():
            if name == family + "_bucket":
                rest = frozenset((k, v) for k, v in labels if k != "le")
                le = dict(labels)["le"]
                series[rest].append((float("inf") if le == "+Inf" else float(le), value))
        for rest, buckets in series.items():
            buckets.sort()
            counts = [v for _, v in buckets]
            assert counts == sorted(counts), f"{family}: buckets are not cumulative"
            assert buckets[-1][0] == float("inf") and counts[-1] == self.samples[(family + "_count", rest)]
            assert (family + "_sum", rest) in self.samples

    def get(self, metric, **labels):
        return self.samples.get((metric, frozenset((k, str(v)) for k, v in labels.items())), 0.0)


def metrics(server):
    status, headers, text = call(server.url, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    return Metrics(text)


def idle(server):
    wait_until(lambda: (m := metrics(server)).get("edgekit_requests_in_flight") == 0 and m.get("edgekit_queue_depth") == 0,
               what="the server to be idle")


# --------------------------------------------------------------------------- tests


def test_completion_streamed_equals_whole_and_the_router_answer(plain, bundle):
    from edgekit import api

    body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0}
    status, _, whole = post(plain.url, "/v1/completions", body)
    assert status == 200, whole
    assert whole["object"] == "text_completion" and whole["model"] == "tiny" and whole["id"].startswith("cmpl-")
    choice = whole["choices"][0]
    assert choice["finish_reason"] in ("stop", "length") and choice["text"]
    edge = whole["edgekit"]
    assert (edge["branch"], edge["answered_by"], edge["policy"], edge["fell_back"]) == ("small", "small", "small_only", False)
    assert edge["ttft_ms"] > 0 and edge["queue_ms"] >= 0
    # the server answers through the bundle's router: the same text as `edgekit run`
    direct = api.run_prompt(bundle, PROMPT, max_new_tokens=16)
    assert choice["text"] == direct["text"]
    assert whole["usage"] == {"prompt_tokens": direct["prompt_tokens"], "completion_tokens": len(direct["tokens"]),
                              "total_tokens": direct["prompt_tokens"] + len(direct["tokens"])}
    events = stream(plain.url, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    assert streamed_text(events) == choice["text"]
    assert len([e for e in events[:-1] if e.get("choices") and e["choices"][0]["text"]]) > 1  # pieces, not one blob
    finish = [e for e in events[:-1] if e.get("choices") and e["choices"][0]["finish_reason"]]
    assert len(finish) == 1 and finish[0]["choices"][0]["finish_reason"] == choice["finish_reason"]
    assert finish[0]["edgekit"]["branch"] == "small"
    assert events[-2]["choices"] == [] and events[-2]["usage"] == whole["usage"]  # include_usage: the last chunk
    assert len({e["id"] for e in events[:-1]}) == 1


def test_stop_sequences_cut_the_answer_streamed_or_not(plain):
    body = {"prompt": PROMPT, "max_tokens": 24}
    _, _, whole = post(plain.url, "/v1/completions", body)
    text = whole["choices"][0]["text"]
    pieces = [e["choices"][0]["text"] for e in stream(plain.url, "/v1/completions", body)[:-1] if e["choices"][0]["text"]]
    assert "".join(pieces) == text
    # a stop sequence across two streamed pieces: its first character must be held back
    i = next(i for i in range(1, len(pieces) - 1) if len(pieces[i + 1]) >= 2)
    stop = pieces[i][-1] + pieces[i + 1][:2]
    expected = text[: text.find(stop)]
    status, _, cut = post(plain.url, "/v1/completions", {**body, "stop": [stop, "\x00never"]})
    assert status == 200 and cut["choices"][0]["text"] == expected and cut["choices"][0]["finish_reason"] == "stop"
    assert cut["usage"]["completion_tokens"] <= whole["usage"]["completion_tokens"]
    events = stream(plain.url, "/v1/completions", {**body, "stop": stop})
    assert streamed_text(events) == expected  # the stop sequence's start was held back, never sent
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_chat_completions_plain_format_without_a_template(plain):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a loop?"}]
    status, _, chat = post(plain.url, "/v1/chat/completions", {"messages": messages, "max_tokens": 12})
    assert status == 200, chat
    assert chat["object"] == "chat.completion" and chat["id"].startswith("chatcmpl-")
    message = chat["choices"][0]["message"]
    assert message["role"] == "assistant"
    # the documented plain format: "Role: content" lines, then "Assistant:" — the same answer as that prompt
    rendered = "System: Be brief.\nUser: What is a loop?\nAssistant:"
    _, _, completion = post(plain.url, "/v1/completions", {"prompt": rendered, "max_tokens": 12})
    assert message["content"] == completion["choices"][0]["text"]
    assert chat["usage"]["prompt_tokens"] == completion["usage"]["prompt_tokens"]
    events = stream(plain.url, "/v1/chat/completions", {"messages": messages, "max_tokens": 12})
    assert events[0]["object"] == "chat.completion.chunk"
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert streamed_text(events, "chat") == message["content"]
    # content parts (text) are joined
    parts = [{"role": "system", "content": "Be brief."},
             {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "a loop?"}]}]
    _, _, joined = post(plain.url, "/v1/chat/completions", {"messages": parts, "max_tokens": 12})
    assert joined["choices"][0]["message"]["content"] == message["content"]


def test_chat_uses_the_bundles_chat_template(start, bundle, tmp_path):
    copy = tmp_path / "templated"
    shutil.copytree(bundle, copy)
    config_path = copy / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = TEMPLATE
    config_path.write_text(json.dumps(config))
    server = start(bundle_dir=copy)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    _, _, chat = post(server.url, "/v1/chat/completions", {"messages": messages, "max_tokens": 10})
    rendered = "[system] Be brief.\n[user] Hi\n[assistant]"  # TEMPLATE, by hand
    _, _, completion = post(server.url, "/v1/completions", {"prompt": rendered, "max_tokens": 10})
    assert chat["choices"][0]["message"]["content"] == completion["choices"][0]["text"]
    assert chat["usage"]["prompt_tokens"] == completion["usage"]["prompt_tokens"]


def test_models_and_health(plain):
    status, _, models = call(plain.url, "GET", "/v1/models")
    assert status == 200 and models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
    status, _, health = call(plain.url, "GET", "/healthz")
    assert status == 200
    assert (health["status"], health["bundle"], health["policy"]) == ("ok", "tiny", "small_only")
    assert health["branches"]["small"]["backend"] == "onnxruntime" and health["branches"]["large"] is None
    assert health["max_concurrency"] == 2


def test_health_is_503_while_loading_then_200(start):
    server = start(load=False)
    status, headers, health = call(server.url, "GET", "/healthz")
    assert status == 503 and health["status"] == "loading" and int(headers["retry-after"]) >= 1
    assert_error(post(server.url, "/v1/completions", {"prompt": PROMPT}), 503, code="loading")
    server.load()
    assert call(server.url, "GET", "/healthz")[0] == 200
    assert post(server.url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})[0] == 200


def test_bad_requests_get_openai_errors(plain):
    url, c = plain.url, "/v1/completions"
    assert_error(post(url, c, b"{not json"), 400, code="invalid_json")
    assert_error(post(url, c, b"[1, 2]"), 400)
    assert_error(post(url, c, {"prompt": PROMPT, "max_tokens": 201}), 400, param="max_tokens", code="max_tokens_exceeded")
    assert_error(post(url, c, {"prompt": PROMPT, "max_tokens": 0}), 400, param="max_tokens")
    assert_error(post(url, c, {"prompt": PROMPT, "temperature": -1}), 400, param="temperature")
    assert_error(post(url, c, {"prompt": PROMPT, "top_p": "high"}), 400, param="top_p")
    assert_error(post(url, c, {"prompt": PROMPT, "n": 2}), 400, param="n")
    assert_error(post(url, c, {"prompt": PROMPT, "frobnicate": 1}), 400, param="frobnicate")
    assert_error(post(url, c, {"prompt": ""}), 400, param="prompt")
    assert_error(post(url, c, {"max_tokens": 4}), 400, param="prompt")
    assert_error(post(url, c, {"prompt": PROMPT, "stop": [1]}), 400, param="stop")
    long_prompt = " ".join(["iterate"] * 200)
    err = assert_error(post(url, c, {"prompt": long_prompt}), 400, param="prompt", code="context_length_exceeded")
    assert "--max-prompt-tokens" in err["message"]
    assert_error(post(url, c, {"prompt": "x" * 5000}), 413, code="payload_too_large")
    assert_error(post(url, c, {"prompt": PROMPT, "model": "gpt-4"}), 404, param="model", code="model_not_found")
    assert_error(post(url, "/v1/chat/completions", {"messages": []}), 400, param="messages")
    assert_error(post(url, "/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}), 400,
                 param="messages[0].role")
    assert_error(post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [{}]}), 400,
                 param="tools")
    assert_error(post(url, c, {"prompt": [5, 999999]}), 400, param="prompt")
    status, _, by_ids = post(url, c, {"prompt": [5, 6, 7], "max_tokens": 3})  # token ids are a prompt too
    assert status == 200 and by_ids["usage"]["prompt_tokens"] == 3
    status, headers, _ = call(url, "GET", c)
    assert status == 405 and headers["allow"] == "POST"
    assert_error(call(url, "GET", "/v2/anything"), 404)
    # the connection that got a 413 was closed, but the server serves on
    assert post(url, c, {"prompt": PROMPT, "max_tokens": 2})[0] == 200


def test_bearer_auth(start):
    server = start(api_key="sk-edge-secret")
    body = {"prompt": PROMPT, "max_tokens": 2}
    status, headers, _ = post(server.url, "/v1/completions", body)
    assert status == 401 and headers["www-authenticate"].startswith("Bearer")
    assert_error(post(server.url, "/v1/completions", body), 401, code="invalid_api_key")
    assert_error(post(server.url, "/v1/completions", body, headers={"Authorization": "Bearer sk-edge-secreT"}), 401)
    assert_error(post(server.url, "/v1/completions", body, headers={"Authorization": "Basic sk-edge-secret"}), 401)
    assert_error(call(server.url, "GET", "/v1/models"), 401)
    ok = {"Authorization": "Bearer sk-edge-secret"}
    assert post(server.url, "/v1/completions", body, headers=ok)[0] == 200
    assert call(server.url, "GET", "/v1/models", headers=ok)[0] == 200
    events = stream(server.url, "/v1/completions", body, headers=ok)
    assert events[-1] == "[DONE]"
    # probes stay open by default ...
    assert call(server.url, "GET", "/healthz")[0] == 200
    m = metrics(server)
    assert m.get("edgekit_errors_total", kind="unauthorized") == 5
    assert m.get("edgekit_requests_total", endpoint="/v1/completions", code="401") == 4
    # ... and not with --auth-metrics
    locked = start(api_key="sk-edge-secret", auth_metrics=True)
    assert call(locked.url, "GET", "/metrics")[0] == 401 and call(locked.url, "GET", "/healthz")[0] == 401
    assert call(locked.url, "GET", "/metrics", headers=ok)[0] == 200


def test_metrics_move_by_what_was_served(plain):
    idle(plain)
    before = metrics(plain)
    answers = []
    for body in ({"prompt": PROMPT, "max_tokens": 8}, {"prompt": "A list is", "max_tokens": 5}):
        status, _, answer = post(plain.url, "/v1/completions", body)
        assert status == 200
        answers.append(answer)
    events = stream(plain.url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6,
                                                         "stream_options": {"include_usage": True}})
    answers.append({"usage": events[-2]["usage"]})
    assert post(plain.url, "/v1/completions", b"{")[0] == 400
    idle(plain)
    after = metrics(plain)

    def delta(name, **labels):
        return after.get(name, **labels) - before.get(name, **labels)

    assert delta("edgekit_requests_total", endpoint="/v1/completions", code="200") == 2
    assert delta("edgekit_requests_total", endpoint="/v1/chat/completions", code="200") == 1
    assert delta("edgekit_requests_total", endpoint="/v1/completions", code="400") == 1
    assert delta("edgekit_errors_total", kind="bad_request") == 1
    assert delta("edgekit_prompt_tokens_total") == sum(a["usage"]["prompt_tokens"] for a in answers)
    assert delta("edgekit_generated_tokens_total") == sum(a["usage"]["completion_tokens"] for a in answers)
    assert delta("edgekit_answers_total", branch="small", fell_back="false") == 3
    for histogram in ("edgekit_time_to_first_token_seconds", "edgekit_request_duration_seconds", "edgekit_queue_wait_seconds"):
        assert delta(histogram + "_count") == 3, histogram
        assert delta(histogram + "_sum") > 0 or histogram == "edgekit_queue_wait_seconds"
    multi = sum(a["usage"]["completion_tokens"] > 1 for a in answers)
    assert delta("edgekit_time_per_output_token_seconds_count") == multi
    assert after.types["edgekit_time_to_first_token_seconds"] == "histogram"
    assert after.types["edgekit_requests_total"] == "counter" and after.types["edgekit_queue_depth"] == "gauge"
    assert after.get("edgekit_serve_info", model="tiny", policy="small_only") == 1


def test_overload_gets_429_and_every_admitted_request_completes(start, remote):
    large = remote(gated=True, text=" held answer")
    server = start(policy="large_only", large=large.url, max_concurrency=1, max_queue=1)
    before = metrics(server)
    results = [None] * 6

    def fire(i):
        results[i] = post(server.url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 8})

    threads = [threading.Thread(target=fire, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    # one request is held in the large branch, one waits in the queue, the other four are refused at once
    wait_until(lambda: sum(r is not None for r in results) == 4 and large.received == 1, what="four refusals")
    m = metrics(server)
    assert m.get("edgekit_requests_in_flight") == 1 and m.get("edgekit_queue_depth") == 1
    assert call(server.url, "GET", "/healthz")[2]["queued"] == 1
    large.release.set()
    for t in threads:
        t.join(60)
    statuses = collections.Counter(r[0] for r in results)
    assert statuses == {200: 2, 429: 4}
    for status, headers, body in results:
        if status == 429:
            assert int(headers["retry-after"]) >= 1
            assert_error((status, headers, body), 429, code="queue_full", type_="rate_limit_error")
        else:
            assert body["choices"][0]["text"] == " held answer" and body["edgekit"]["branch"] == "large"
            assert body["usage"]["completion_tokens"] == 4  # the remote's own count
    idle(server)
    after = metrics(server)
    assert after.get("edgekit_errors_total", kind="queue_full") - before.get("edgekit_errors_total", kind="queue_full") == 4
    assert after.get("edgekit_requests_total", endpoint="/v1/completions", code="429") == 4
    assert after.get("edgekit_answers_total", branch="large", fell_back="false") == 2
    assert after.get("edgekit_queue_wait_seconds_count") == 2


def test_bounded_load_loses_nothing(start):
    server = start(max_concurrency=2, max_queue=2)
    stop_at = time.monotonic() + 3.0
    outcomes, failures = [], []

    def client(i):
        n = 0
        while time.monotonic() < stop_at:
            n += 1
            body = {"prompt": f"{PROMPT} {i} {n}", "max_tokens": 8}
            try:
                if (i + n) % 3 == 0:
                    u = urlsplit(server.url)
                    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
                    conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}))
                    resp = conn.getresponse()
                    raw = resp.read().decode()
                    conn.close()
                    if resp.status == 200:
                        assert raw.rstrip().endswith("data: [DONE]"), raw[-200:]
                        assert '"finish_reason": "' in raw
                    outcomes.append((resp.status, "stream", raw))
                else:
                    status, headers, answer = post(server.url, "/v1/completions", body)
                    if status == 200:
                        assert answer["choices"][0]["finish_reason"] in ("stop", "length")
                    outcomes.append((status, headers, answer))
                if outcomes[-1][0] == 429:
                    time.sleep(0.02)
            except Exception as exc:  # nothing may be lost: every request gets an answer
                failures.append(repr(exc))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures[:3]
    statuses = collections.Counter(o[0] for o in outcomes)
    assert set(statuses) <= {200, 429} and statuses[200] >= 8, statuses
    for status, _, answer in outcomes:
        if status == 429:
            body = json.loads(answer) if isinstance(answer, str) else answer
            assert body["error"]["code"] == "queue_full"
    idle(server)
    m = metrics(server)
    assert m.get("edgekit_requests_total", endpoint="/v1/completions", code="200") == statuses[200]
    assert m.get("edgekit_requests_total", endpoint="/v1/completions", code="429") == statuses[429]
    assert m.get("edgekit_answers_total", branch="small", fell_back="false") == statuses[200]
    assert sum(v for (name, labels), v in m.samples.items() if name == "edgekit_errors_total") == statuses[429]


def test_request_timeout_in_the_queue_and_while_answering(start, remote):
    large = remote(gated=True)
    server = start(policy="large_only", large=large.url, max_concurrency=1, max_queue=1, request_timeout_s=0.5)
    held = []
    worker = threading.Thread(target=lambda: held.append(post(server.url, "/v1/completions", {"prompt": PROMPT})))
    worker.start()
    wait_until(lambda: large.received == 1, what="the held request")
    # queued behind it, no slot frees within the request timeout
    assert_error(post(server.url, "/v1/completions", {"prompt": PROMPT}), 503, code="queue_timeout")
    large.release.set()  # the held answer arrives after its deadline: checked between tokens
    worker.join(60)
    assert_error(held[0], 504, code="request_timeout")
    m = metrics(server)
    assert m.get("edgekit_errors_total", kind="queue_timeout") == 1 and m.get("edgekit_errors_total", kind="request_timeout") == 1


def test_an_unreachable_large_branch_falls_back_and_says_so(start):
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    server = start(policy="large_only", large=dead)
    status, _, answer = post(server.url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 6})
    assert status == 200
    edge = answer["edgekit"]
    assert edge["branch"] == "small" and edge["fell_back"] is True and "connection refused" in edge["reason"]
    events = stream(server.url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 6})
    assert streamed_text(events) == answer["choices"][0]["text"]
    assert events[-2]["edgekit"]["fell_back"] is True
    m = metrics(server)
    assert m.get("edgekit_answers_total", branch="small", fell_back="true") == 2
    assert m.get("edgekit_branch_failures_total", branch="large") == 2
    health = call(server.url, "GET", "/healthz")[2]
    assert health["branches"]["large"]["url"] == dead + "/v1/completions"


def test_cascade_streams_only_what_the_router_commits_to(start, remote):
    large = remote(text=" the large answer")
    always = start(policy="cascade", large=large.url, thresholds={"confidence": 1.5, "min_tokens": 2})
    events = stream(always.url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 12})
    # the small branch's text, dropped by the escalation, never reached the client
    assert streamed_text(events) == " the large answer"
    assert not any(e.get("edgekit", {}).get("event") == "reset" for e in events[:-1])
    assert events[-2]["edgekit"]["escalated"] is True and events[-2]["edgekit"]["branch"] == "large"
    never = start(policy="cascade", large=large.url, thresholds={"confidence": 0.0})
    _, _, whole = post(never.url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 12})
    assert whole["edgekit"]["branch"] == "small" and whole["edgekit"]["escalated"] is False
    events = stream(never.url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 12})
    assert streamed_text(events) == whole["choices"][0]["text"]
    assert large.received == 1


def test_edgekit_run_stop_cuts_as_the_server_does(plain, bundle):
    from conftest import run_cli

    body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0}
    text = post(plain.url, "/v1/completions", body)[2]["choices"][0]["text"]
    stop = text[len(text) // 2: len(text) // 2 + 3]
    _, _, served = post(plain.url, "/v1/completions", {**body, "stop": stop})
    out = run_cli("run", str(bundle), "--prompt", PROMPT, "--max-new-tokens", "24", "--temperature", "0", "--stop", stop,
                  "--stop", "\x01never", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["text"] == served["choices"][0]["text"] == text[: text.find(stop)] and result["finish_reason"] == "stop"
    bad = run_cli("run", str(bundle), "--prompt", PROMPT, *["--stop", "x"] * 17)
    assert bad.returncode != 0 and "stop" in bad.stderr and "Traceback" not in bad.stderr


def test_the_assembler_signals_every_retraction():
    from edgekit.runtime.answers import StreamEvent
    from edgekit.serve.generation import Assembler

    a = Assembler(["END"], hold_small=False)
    actions = []
    for event in (StreamEvent("text", "Hello wo", "small"), StreamEvent("text", "rld E", "small"),
                  StreamEvent("reset", "", "large", "small branch unavailable"), StreamEvent("text", "Hi EN", "large")):
        a.push(event, 0.0)
        actions += a.flush(False)
    a.push(StreamEvent("text", "D more", "large"), 0.0)
    actions += a.flush(False)
    # "E" and "EN" were held back (a stop sequence could start there); the reset is signalled
    assert actions == [("text", "Hello wo"), ("text", "rld "), ("reset", "small branch unavailable"), ("text", "Hi ")]
    assert a.stopped and a.view == "Hi " and a.resets_sent == 1
    held = Assembler([], hold_small=True)
    held.push(StreamEvent("text", "small draft", "small"), 0.0)
    assert held.flush(False) == []
    held.push(StreamEvent("reset", "", "large", "escalated"), 0.0)
    held.push(StreamEvent("text", "large", "large"), 0.0)
    assert held.flush(False) == [("text", "large")] and held.resets_sent == 0


def test_a_client_that_leaves_frees_its_slot(start, remote):
    large = remote(gated=True)
    server = start(policy="large_only", large=large.url, max_concurrency=1, max_queue=2)
    u = urlsplit(server.url)
    streaming = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    streaming.request("POST", "/v1/completions", json.dumps({"prompt": PROMPT, "max_tokens": 8, "stream": True}))
    assert streaming.getresponse().status == 200  # admitted; its answer is held in the large branch
    wait_until(lambda: large.received == 1, what="the large branch call")
    queued = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    queued.request("POST", "/v1/completions", json.dumps({"prompt": PROMPT, "max_tokens": 8}))
    wait_until(lambda: metrics(server).get("edgekit_queue_depth") == 1, what="the second request to queue")
    abort(queued)  # leaves the queue
    wait_until(lambda: metrics(server).get("edgekit_queue_depth") == 0, what="the queue to empty")
    abort(streaming)  # leaves mid-stream
    large.release.set()
    idle(server)
    m = metrics(server)
    assert m.get("edgekit_errors_total", kind="client_disconnected") == 2
    assert m.get("edgekit_requests_total", endpoint="/v1/completions", code="499") == 2
    assert large.received == 1  # the queued request never reached a branch
    status, _, answer = post(server.url, "/v1/completions", {"prompt": PROMPT, "max_tokens": 8})
    assert status == 200 and answer["edgekit"]["branch"] == "large"  # the slot was given back


def _read_line(pipe, timeout):
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        assert left > 0, f"no line within {timeout} s (got {line!r})"
        if select.select([pipe], [], [], left)[0]:
            byte = os.read(pipe.fileno(), 1)
            assert byte, f"the process ended (got {line!r})"
            line += byte
    return line.decode()


def test_cli_serves_then_drains_on_sigterm(bundle, remote):
    large = remote(gated=True, text=" drained answer")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgekit", "serve", str(bundle), "--host", "0.0.0.0", "--port", "0", "--policy", "large_only",
         "--large", large.url, "--grace-period", "30", "--threads", "1", "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={k: v for k, v in os.environ.items() if k != "EDGEKIT_API_KEY"},
    )
    try:
        line = _read_line(proc.stdout, 120)
        assert line.startswith("edgekit serve: listening on http://0.0.0.0:") and "policy large_only" in line
        url = "http://127.0.0.1:" + re.search(r"http://0\.0\.0\.0:(\d+)", line).group(1)
        results = []
        worker = threading.Thread(target=lambda: results.append(post(url, "/v1/completions", {"prompt": PROMPT})))
        worker.start()
        wait_until(lambda: large.received == 1, what="the in-flight request")
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: call(url, "GET", "/healthz")[0] == 503, what="draining")
        assert call(url, "GET", "/healthz")[2]["status"] == "draining"
        assert_error(post(url, "/v1/completions", {"prompt": PROMPT}), 503, code="draining")
        large.release.set()
        worker.join(60)
        assert results[0][0] == 200 and results[0][2]["choices"][0]["text"] == " drained answer"
        assert proc.wait(60) == 0
        err = proc.stderr.read().decode()
        assert "warning: listening on 0.0.0.0 without --api-key" in err
        assert "SIGTERM received; draining" in err and "all finished" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_options_are_one_line_errors(bundle, tmp_path):
    from conftest import run_cli

    result = run_cli("serve", str(bundle), "--max-concurrency", "0")
    assert result.returncode == 2 and result.stderr.startswith("error: Invalid value for '--max-concurrency': 0 is not in")
    assert len(result.stderr.strip().splitlines()) == 1 and "To resolve" in result.stderr
    result = run_cli("serve", str(tmp_path), "--port", "0")
    assert result.returncode == 2 and "not a bundle" in result.stderr


def test_metric_text_format_escapes_and_accumulates():
    from edgekit.serve.metrics import Registry

    registry = Registry()
    counter = registry.counter("demo_total", "A demo.\nSecond line.", ("path",))
    counter.inc(2, path='a "quoted" \\ path\nnext')
    histogram = registry.histogram("demo_seconds", "Latency.", buckets=(0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        histogram.observe(value)
    text = registry.render()
    assert '# HELP demo_total A demo.\\nSecond line.' in text
    parsed = Metrics(text)  # also checks cumulative buckets and +Inf == _count
    assert parsed.get("demo_total", path='a \\"quoted\\" \\\\ path\\nnext') == 2  # as escaped on the wire
    assert [parsed.get("demo_seconds_bucket", le=le) for le in ("0.1", "1.0", "+Inf")] == [2, 3, 4]
    assert parsed.get("demo_seconds_sum") == 3.65 and parsed.get("demo_seconds_count") == 4
    with pytest.raises(ValueError):
        counter.inc(-1, path="x")


def test_batched_requests_sharing_a_system_prompt_reuse_its_prefix(start):
    """Batching on (max_concurrency 4): concurrent requests that share a 100+-token system
    prompt restore it from the prefix cache into their rows of the batch and answer exactly as
    a server without the cache; /metrics counts the hits."""
    from edgekit.runtime.config import PrefixCacheConfig

    servers = {}
    for name, max_mb in (("off", 0.0), ("on", 64.0)):
        server = start(max_concurrency=4, load=False)
        server.config = server.config.model_copy(update={"prefix_cache": PrefixCacheConfig(max_mb=max_mb)})
        server.load()
        servers[name] = server
    assert servers["off"].prefix_caches == [] and len(servers["on"].prefix_caches) == 1
    tokenizer = servers["on"].parser.tokenizer
    system = tokenizer("You are the assistant of a Python course. Answer in one short sentence, quote the language "
                       "reference where it helps, never invent a function, and say so when a question is outside "
                       "the standard library. " * 3)["input_ids"][:110]
    questions = ["The for statement is used to iterate over", "A list comprehension builds", "Exceptions are raised",
                 "Each module has its own namespace", "Generators yield"]
    prompts = [system + tokenizer(" " + q)["input_ids"] for q in questions]
    block = servers["on"].config.prefix_cache.block_tokens
    reuse = len(system) // block * block
    assert reuse >= 96

    def ask(server, prompt):
        status, _, body = post(server.url, "/v1/completions", {"prompt": prompt, "max_tokens": 16, "temperature": 0})
        assert status == 200, body
        return body["choices"][0]["text"]

    answers = {}
    for name, server in servers.items():
        first = ask(server, prompts[0])  # on: a miss that stores the system prompt's blocks
        got = [None] * (len(prompts) - 1)
        barrier = threading.Barrier(len(got))

        def client(i, server=server, got=got, barrier=barrier):
            barrier.wait(30)
            got[i] = ask(server, prompts[i + 1])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(got))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        answers[name] = [first] + got
        idle(server)
    assert answers["on"] == answers["off"] and all(answers["on"])
    seen = {name: metrics(server) for name, server in servers.items()}
    assert seen["on"].get("edgekit_prefix_cache_misses_total") == 1
    assert seen["on"].get("edgekit_prefix_cache_hits_total") == 4
    assert seen["on"].get("edgekit_prefix_cache_tokens_reused_total") == 4 * reuse
    assert seen["off"].get("edgekit_prefix_cache_hits_total") == seen["off"].get("edgekit_prefix_cache_misses_total") == 0
    for name in servers:  # the concurrent requests decoded in shared steps
        steps = seen[name].get("edgekit_batch_size_count", branch="small")
        assert steps > seen[name].get("edgekit_batch_size_bucket", branch="small", le="1.0"), name
