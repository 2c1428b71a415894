"""`edgekit serve`'s HTTP layer under hostile and odd clients, on real sockets (127.0.0.1).

Malformed requests go through raw sockets (what a client library would refuse to send);
every read has a socket timeout and every loop a bound on its count, and no test asserts how
long something took: a server that misbehaves fails on what it answers (or never answers).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from urllib.parse import urlsplit

import pytest
from test_serve import PROMPT, _read_line, assert_error, bundle, call, metrics, post, remote, start, wait_until  # noqa: F401

SMUGGLED = json.dumps({"prompt": PROMPT, "max_tokens": 1}).encode()
SMUGGLED_REQUEST = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(SMUGGLED), SMUGGLED))


@pytest.fixture(scope="module")
def plain(start):
    return start(max_prompt_tokens=64, max_tokens_limit=200, max_body_bytes=4096, max_concurrency=1)


def address(server):
    u = urlsplit(server.url)
    return u.hostname, u.port


def exchange(server, data: bytes, *, half_close: bool = False, limit: int = 1 << 20) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes it (or 30 s of
    silence, or ``limit`` bytes)."""
    with socket.create_connection(address(server), timeout=30) as s:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        out = b""
        while len(out) < limit:
            try:
                piece = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                break
            if not piece:
                break
            out += piece
        return out


def responses(raw: bytes) -> list[tuple[int, dict, bytes]]:
    """The HTTP responses in ``raw`` (Content-Length framed, or the rest for the last one)."""
    out = []
    while raw:
        head, sep, rest = raw.partition(b"\r\n\r\n")
        assert sep, f"an incomplete response: {raw[:200]!r}"
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if "content-length" in headers:
            n = int(headers["content-length"])
            body, raw = rest[:n], rest[n:]
        else:
            body, raw = rest, b""
        out.append((status, headers, body))
    return out


def json_error(response, status, code=None, param=None):
    got, headers, body = response
    assert got == status, (got, body)
    assert headers["content-type"] == "application/json"
    error = json.loads(body.decode("utf-8"))  # valid UTF-8 JSON, always
    assert set(error) == {"error"} and set(error["error"]) == {"message", "type", "param", "code"}, error
    if code is not None:
        assert error["error"]["code"] == code, error
    if param is not None:
        assert error["error"]["param"] == param, error
    return error["error"]


def completions_answered(server) -> float:
    return metrics(server).get("edgekit_requests_total", endpoint="/v1/completions", code="200")


# --------------------------------------------------------------------------- request framing


@pytest.mark.parametrize("head", [
    b"GET /v1/models HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n",  # a GET with a body
    b"GET /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n",  # 404
    b"PUT /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n",  # 405
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n",  # CL.TE
])
def test_an_unread_body_is_never_parsed_as_the_next_request(plain, head):
    before = completions_answered(plain)
    raw = exchange(plain, (head % len(SMUGGLED_REQUEST)) + SMUGGLED_REQUEST)
    answers = responses(raw)
    assert len(answers) == 1, raw  # one request on the wire, one answer; the body was not a request
    assert answers[0][0] in (200, 400, 404, 405), raw
    assert completions_answered(plain) == before


def test_a_refused_body_is_not_read_as_a_request_either(start):
    server = start(api_key="sk-test", max_body_bytes=1024)
    ok = {"Authorization": "Bearer sk-test"}
    before = metrics(server).get("edgekit_requests_total", endpoint="/v1/completions", code="200")
    raw = exchange(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(SMUGGLED_REQUEST)
                   + SMUGGLED_REQUEST)  # no key: 401, the body is not read
    answers = responses(raw)
    assert len(answers) == 1 and answers[0][0] == 401 and answers[0][1]["connection"] == "close", raw
    padded = SMUGGLED_REQUEST + b" " * 2000  # over --max-body-bytes: 413, not read
    raw = exchange(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-test\r\n"
                   b"Content-Length: %d\r\n\r\n" % len(padded) + padded)
    answers = responses(raw)
    assert len(answers) == 1, raw
    json_error(answers[0], 413, code="payload_too_large")
    assert answers[0][1]["connection"] == "close"
    assert call(server.url, "GET", "/metrics", headers=ok)[0] == 200
    assert metrics(server).get("edgekit_requests_total", endpoint="/v1/completions", code="200") == before


def test_a_bad_content_length_is_refused_and_what_follows_is_not_run(plain):
    before = metrics(plain)
    for length in (b"-1", b"1x", b"5, 6"):
        raw = exchange(plain, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: " + length + b"\r\n\r\n"
                       + SMUGGLED_REQUEST)
        answers = responses(raw)
        assert len(answers) == 1, raw
        json_error(answers[0], 400, code="invalid_http")
        assert answers[0][1]["connection"] == "close"
    after = metrics(plain)
    assert after.get("edgekit_requests_total", endpoint="/v1/completions", code="200") == \
        before.get("edgekit_requests_total", endpoint="/v1/completions", code="200")
    assert after.get("edgekit_requests_total", endpoint="other", code="400") - \
        before.get("edgekit_requests_total", endpoint="other", code="400") == 3


def test_garbage_and_oversized_headers_get_json_errors(plain):
    json_error(responses(exchange(plain, b"\x16\x03\x01\x02\x00garbage\r\n\r\n"))[0], 400, code="invalid_http")
    json_error(responses(exchange(plain, b"GET /healthz HTTP/1.1\r\n\r\n"))[0], 400, code="invalid_http")  # no Host
    big = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 20000 + b"\r\n\r\n"
    json_error(responses(exchange(plain, big))[0], 431, code="headers_too_large")
    # the server serves on
    assert call(plain.url, "GET", "/healthz")[0] == 200


def test_other_methods_get_405_in_the_api_shape_and_are_counted(plain):
    before = metrics(plain)
    methods = ("PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "FROB")
    for method in methods:
        status, headers, body = call(plain.url, method, "/v1/completions", b"{}")
        assert (status, headers["allow"]) == (405, "POST"), (method, body)
        assert_error((status, headers, body), 405, code="method_not_allowed")
    status, headers, body = call(plain.url, "DELETE", "/healthz")
    assert status == 405 and headers["allow"] == "GET, HEAD" and body["error"]["code"] == "method_not_allowed"
    conn = http.client.HTTPConnection(*address(plain), timeout=30)
    conn.request("HEAD", "/healthz")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read() == b"" and int(resp.getheader("content-length")) > 0
    conn.close()
    after = metrics(plain)
    assert after.get("edgekit_requests_total", endpoint="/v1/completions", code="405") - \
        before.get("edgekit_requests_total", endpoint="/v1/completions", code="405") == len(methods)
    assert after.get("edgekit_errors_total", kind="method_not_allowed") - \
        before.get("edgekit_errors_total", kind="method_not_allowed") == len(methods) + 1


def test_a_chunked_request_body_is_read_and_bounded(plain):
    body = json.dumps({"prompt": PROMPT, "max_tokens": 2}).encode()
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 7]), body[i:i + 7]) for i in range(0, len(body), 7)) + b"0\r\n\r\n"
    raw = exchange(plain, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                   + chunked)
    status, _, answer = responses(raw)[0]
    assert status == 200 and json.loads(answer)["usage"]["completion_tokens"] >= 1
    big = b"5000\r\n" + b"a" * 0x5000 + b"\r\n0\r\n\r\n"  # over --max-body-bytes, no length declared
    raw = exchange(plain, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + big)
    json_error(responses(raw)[0], 413, code="payload_too_large")


# --------------------------------------------------------------------------- untrusted fields


def test_lone_surrogates_are_400_naming_the_field(plain):
    c = "/v1/completions"
    cases = [
        (b'{"prompt": "a\\ud800b", "max_tokens": 2}', c, "prompt"),
        (b'{"prompt": "ok", "stop": ["\\udfff"]}', c, "stop[0]"),
        (b'{"\\ud800": 1, "prompt": "ok"}', c, "\\ud800"),
        (b'{"messages": [{"role": "user", "content": "hi \\ud83d"}]}', "/v1/chat/completions", "messages[0].content"),
        (b'{"messages": [{"role": "user", "\\udc00x": 1, "content": "hi"}]}', "/v1/chat/completions", "messages[0].\\udc00x"),
        ('{"prompt": "raw \udc80 bytes"}'.encode("utf-8", "surrogatepass"), c, "prompt"),  # CESU-style bytes
    ]
    for raw, path, param in cases:
        status, headers, body = post(plain.url, path, raw)
        assert_error((status, headers, body), 400, param=param)
    assert post(plain.url, c, {"prompt": "still fine 😀", "max_tokens": 2})[0] == 200  # a real pair is text


def test_numbers_must_be_finite_and_bodies_bounded(plain, start):
    c = "/v1/completions"
    for raw, param in ((b'{"prompt": "x", "temperature": NaN}', "temperature"),
                       (b'{"prompt": "x", "top_p": Infinity}', "top_p"),
                       (b'{"prompt": "x", "temperature": -Infinity}', "temperature"),
                       (b'{"prompt": "x", "temperature": 1e999}', "temperature"),
                       (b'{"prompt": "x", "seed": 1' + b"0" * 40 + b"}", "seed"),
                       (b'{"prompt": "x", "temperature": 1' + b"0" * 400 + b"}", "temperature")):
        assert_error(post(plain.url, c, raw), 400, param=param)
    deep = b'{"prompt": "x", "user": ' + b"[" * 20 + b"]" * 20 + b"}"
    assert "deeper" in assert_error(post(plain.url, c, deep), 400)["message"]
    assert_error(post(plain.url, c, b"[" * 2000 + b"]" * 2000), 400)  # nested past any parser limit
    assert_error(post(plain.url, c, {"prompt": "x", "stop": ["s" * 300]}), 400, param="stop")
    assert_error(post(plain.url, c, {"prompt": "x", "user": "u" * 300}), 400, param="user")
    assert_error(post(plain.url, c, {"prompt": "x", "model": "m" * 300}), 400, param="model")
    assert_error(post(plain.url, c, {"prompt": "x", "k" * 300: 1}), 400)
    roomy = start(max_body_bytes=1 << 16, load=False)
    roomy.parser, roomy.state = plain.parser, "ready"  # the same model; only the body limit differs
    many = {"messages": [{"role": "user", "content": "a"}] * 300}
    assert_error(post(roomy.url, "/v1/chat/completions", many), 400, param="messages")
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 300}]}
    assert_error(post(roomy.url, "/v1/chat/completions", parts), 400, param="messages[0].content")
    role = assert_error(post(plain.url, "/v1/chat/completions", {"messages": [{"role": "r" * 2000, "content": "a"}]}), 400)
    assert len(role["message"]) < 300  # what is echoed back is shortened
    assert_error(post(plain.url, c, b'{"prompt": "x", "max_tokens": 2}\xff'), 400, code="invalid_json")


# --------------------------------------------------------------------------- connections


def test_a_half_closed_client_still_gets_its_answer(plain):
    body = json.dumps({"prompt": PROMPT, "max_tokens": 4}).encode()
    request = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body), body)
    answers = responses(exchange(plain, request, half_close=True))
    assert len(answers) == 1 and answers[0][0] == 200, answers
    assert json.loads(answers[0][2])["choices"][0]["finish_reason"] in ("stop", "length")
    stream_body = json.dumps({"prompt": PROMPT, "max_tokens": 4, "stream": True}).encode()
    raw = exchange(plain, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (
        len(stream_body), stream_body), half_close=True)
    assert raw.startswith(b"HTTP/1.1 200") and raw.rstrip().endswith(b"0"), raw[-100:]  # chunked, to the last chunk
    assert b"data: [DONE]" in raw


def test_an_http10_client_never_gets_chunked_encoding(plain):
    body = json.dumps({"prompt": PROMPT, "max_tokens": 6, "stream": True}).encode()
    raw = exchange(plain, b"POST /v1/completions HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body), body))
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"transfer-encoding" not in head.lower() and b"content-length" not in head.lower()
    assert b"connection: close" in head.lower()
    # the body is the events themselves, delimited by the end of the connection
    assert rest.startswith(b"data: {") and rest.endswith(b"data: [DONE]\n\n"), rest[-80:]
    events = [json.loads(line[6:]) for line in rest.decode().split("\n") if line.startswith("data: {")]
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    # and a plain answer to HTTP/1.0 has its length
    status, headers, _ = responses(exchange(plain, b"GET /healthz HTTP/1.0\r\n\r\n"))[0]
    assert status == 200 and "content-length" in headers and "transfer-encoding" not in headers


def test_past_the_connection_cap_the_server_refuses_at_once(start):
    server = start(max_connections=4, header_timeout_s=60, load=False)
    idle = [socket.create_connection(address(server), timeout=30) for _ in range(4)]
    try:
        wait_until(lambda: server.guard.open == 4, what="four open connections")
        status, headers, body = call(server.url, "GET", "/healthz", timeout=30)
        assert_error((status, headers, body), 503, code="too_many_connections")
        assert headers["retry-after"] == "1" and headers["connection"] == "close"
    finally:
        for s in idle:
            s.close()
    wait_until(lambda: server.guard.open == 0, what="the idle connections to close")
    status, _, health = call(server.url, "GET", "/healthz")
    assert status == 503 and health["status"] == "loading"  # served again (still loading: 503 by design)
    m = metrics(server)
    assert m.get("edgekit_errors_total", kind="too_many_connections") == 1
    assert m.get("edgekit_open_connections") == 1  # the scrape's own


def test_slow_and_silent_clients_are_cut_by_the_header_timeout(start):
    server = start(max_connections=3, header_timeout_s=1.0, keep_alive_timeout_s=1.0, load=False)
    # a silent connection: closed, nothing said
    with socket.create_connection(address(server), timeout=30) as silent:
        assert silent.recv(100) == b""
    # a client dripping its headers (each byte well within any idle timeout): cut with 408
    drip = socket.create_connection(address(server), timeout=30)
    received = b""
    try:
        header = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: y\r\n" * 300
        for byte in header:  # at most ~30 s
            try:
                drip.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            if select_readable(drip, 0.1):
                break
        received = read_all(drip)
    finally:
        drip.close()
    json_error(responses(received)[0], 408, code="header_timeout")
    # three slow clients at the cap do not lock a real one out for longer than the timeout
    slow = [socket.create_connection(address(server), timeout=30) for _ in range(3)]
    for s in slow:
        s.sendall(b"GET /healthz HTTP/1.1\r\n")
    try:
        wait_until(lambda: call(server.url, "GET", "/healthz")[2].get("status") == "loading", timeout=60,
                   what="the slow clients to be cut")  # answered (503 "loading", by design) instead of refused
    finally:
        for s in slow:
            s.close()
    m = metrics(server)
    assert m.get("edgekit_errors_total", kind="client_timeout") >= 5
    assert m.get("edgekit_requests_total", endpoint="other", code="408") >= 4


def select_readable(sock, timeout):
    import select

    return bool(select.select([sock], [], [], timeout)[0])


def read_all(sock) -> bytes:
    out = b""
    for _ in range(1000):
        try:
            piece = sock.recv(65536)
        except (socket.timeout, ConnectionResetError):
            break
        if not piece:
            break
        out += piece
    return out


def test_sigterm_with_a_short_grace_answers_every_waiting_request(bundle, remote):
    large = remote(gated=True, text=" never sent")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgekit", "serve", str(bundle), "--host", "0.0.0.0", "--port", "0", "--policy", "large_only",
         "--large", large.url, "--grace-period", "1", "--max-concurrency", "1", "--max-queue", "2", "--threads", "1", "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={k: v for k, v in os.environ.items() if k != "EDGEKIT_API_KEY"},
    )
    try:
        line = _read_line(proc.stdout, 120)
        url = "http://127.0.0.1:" + re.search(r"http://0\.0\.0\.0:(\d+)", line).group(1)
        results = []
        workers = [threading.Thread(target=lambda: results.append(post(url, "/v1/completions", {"prompt": PROMPT})))
                   for _ in range(3)]
        workers[0].start()
        wait_until(lambda: large.received == 1, what="the in-flight request")
        for w in workers[1:]:
            w.start()
        wait_until(lambda: call(url, "GET", "/healthz")[2].get("queued") == 2, what="two queued requests")
        proc.send_signal(signal.SIGTERM)
        for w in workers:
            w.join(60)
        assert len(results) == 3  # every client got an answer, none a dropped connection
        for result in results:
            error = assert_error(result, 503, code="draining")
            assert int(result[1]["retry-after"]) >= 1
            assert "shut down" in error["message"]
        assert proc.wait(60) == 1  # not everything finished within the grace period
        err = proc.stderr.read().decode()
        assert "warning: listening on 0.0.0.0 without --api-key" in err
        assert "warning: listening on 0.0.0.0 without TLS" in err
        assert "stopped with 3 request(s) unfinished" in err
    finally:
        large.release.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_exposure_warnings():
    from edgekit.serve.server import ServeOptions

    assert ServeOptions(host="127.0.0.1").exposure_warnings() == []
    both = ServeOptions(host="0.0.0.0").exposure_warnings()
    assert len(both) == 2 and "--api-key" in both[0] and "without TLS" in both[1]
    assert ServeOptions(host="192.168.1.5", api_key="k", tls_cert="c", tls_key="k").exposure_warnings() == []
    only_tls = ServeOptions(host="::", api_key="k").exposure_warnings()
    assert len(only_tls) == 1 and "without TLS" in only_tls[0]
