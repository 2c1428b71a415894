"""The remote branch (edgekit.runtime.backends.remote) against a real local HTTP server that
speaks the OpenAI completions API: answers, streams, and every failure as BranchUnavailable.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from edgekit.runtime.backends import BranchUnavailable, RemoteBranch


# --- a remote OpenAI-compatible endpoint on a real local HTTP server -------------------------

CHUNKS = ["Hello", ",", " edge", " world"]


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, status, body, content_type="application/json"):
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        mode = self.server.mode
        if self.path != "/v1/completions":
            return self._send(404, json.dumps({"error": {"message": "no such route"}}))
        if mode == "sleep":
            time.sleep(1.0)
            with contextlib.suppress(OSError):
                self._send(200, "{}")
            return
        if mode == "error":
            return self._send(500, json.dumps({"error": {"message": "model crashed\nat line 3"}}))
        if mode == "garbage":
            return self._send(200, "<html>not json</html>", "text/html")
        if not body.get("stream"):
            return self._send(200, json.dumps({
                "id": "cmpl-1", "object": "text_completion", "model": body.get("model", "m"),
                "choices": [{"index": 0, "text": "".join(CHUNKS), "finish_reason": "length"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
            }))
        # Server-sent events; HTTP/1.0 (the handler's default): the body ends when the connection closes.
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        self.wfile.write(b": keep-alive\n\n")
        for i, chunk in enumerate(CHUNKS):
            if mode in ("stall", "truncate") and i == 2:
                if mode == "stall":
                    time.sleep(1.0)
                return
            event = {"choices": [{"index": 0, "text": chunk, "finish_reason": None}]}
            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
            self.wfile.flush()
        self.wfile.write(b'data: {"choices": [{"index": 0, "text": "", "finish_reason": "stop"}]}\n\ndata: [DONE]\n\n')


@pytest.fixture
def server():
    servers = []

    def start(mode="ok"):
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        httpd.daemon_threads = True  # a sleeping handler must not hold up the test's end
        httpd.mode, httpd.requests = mode, []
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(httpd)
        return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"

    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


def test_remote_completion_and_stream(server):
    httpd, url = server()
    remote = RemoteBranch(url + "/", model="qwen-7b", api_key="sk-test", timeout=5)
    assert remote.has_logits is False and remote.url == url + "/v1/completions"
    result = remote.complete("Say hello", max_new_tokens=4, temperature=0.0, stop=["\n"])
    assert result == {"text": "Hello, edge world", "finish_reason": "length",
                      "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}
    sent = httpd.requests[-1]
    assert sent["path"] == "/v1/completions" and sent["auth"] == "Bearer sk-test"
    assert sent["body"] == {"prompt": "Say hello", "max_tokens": 4, "temperature": 0.0, "stream": False, "model": "qwen-7b",
                            "stop": ["\n"]}
    assert list(remote.stream("Say hello", max_new_tokens=4, temperature=0.7)) == CHUNKS
    assert httpd.requests[-1]["body"]["stream"] is True
    # a /v1 root is not doubled, and no model or key is sent when none is given
    bare = RemoteBranch(url + "/v1")
    assert bare.complete("x", max_new_tokens=1, temperature=0)["text"] == "Hello, edge world"
    assert "model" not in httpd.requests[-1]["body"] and httpd.requests[-1]["auth"] is None


@pytest.mark.parametrize("mode, says", [
    ("sleep", r"no answer within 0.3 s \(timed out\)"),
    ("error", "HTTP 500 Internal Server Error: model crashed at line 3"),
    ("garbage", "malformed response"),
])
def test_remote_failures_are_branch_unavailable(server, mode, says):
    _, url = server(mode)
    remote = RemoteBranch(url, timeout=0.3)
    started = time.perf_counter()
    with pytest.raises(BranchUnavailable, match=says) as caught:
        remote.complete("x", max_new_tokens=2, temperature=0)
    assert time.perf_counter() - started < 0.9  # the timeout, not the server's sleep
    assert caught.value.url == url + "/v1/completions" and "\n" not in str(caught.value)
    assert str(caught.value).startswith(f"{url}/v1/completions is unavailable: ")
    if mode != "garbage":
        with pytest.raises(BranchUnavailable, match=says):
            remote.stream("x", max_new_tokens=2, temperature=0)  # raised before any text


@pytest.mark.parametrize("mode, says", [("stall", "timed out"), ("truncate", r"ended without data: \[DONE\]")])
def test_remote_stream_that_breaks_off(server, mode, says):
    _, url = server(mode)
    chunks = RemoteBranch(url, timeout=0.3).stream("x", max_new_tokens=4, temperature=0)
    received = []
    with pytest.raises(BranchUnavailable, match=says):
        for chunk in chunks:
            received.append(chunk)
    assert received == CHUNKS[:2]


def test_remote_closed_port_is_branch_unavailable():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    remote = RemoteBranch(f"http://127.0.0.1:{port}", timeout=2)
    with pytest.raises(BranchUnavailable, match=f"http://127.0.0.1:{port}/v1/completions is unavailable: connection refused"):
        remote.complete("x", max_new_tokens=1, temperature=0)
