"""Runtime branches: ONNX Runtime sessions on a real tiny bundle, the TensorRT session's logic on
a stand-in engine, a remote OpenAI-compatible endpoint on a real local HTTP server, load_branch.

The property every test of a local session comes back to: feeding tokens all at once, one by
one, or k at a time after a prefix gives the same logits, and a rollback really forgets.
Speculative decoding is correct only if that holds. The real TensorRT run is the gpu/tensorrt
test at the end (scripts/gpu_check.sh).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import shutil
import socket
import sys
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from conftest import compress_tiny_bundle

from edgekit.errors import EdgekitError, EngineError
from edgekit.runtime.backends import (
    BranchUnavailable,
    OnnxRuntimeBranch,
    RemoteBranch,
    TensorRTBranch,
    greedy_generate,
    load_branch,
)

TEXT = "The interpreter reads a module, compiles each function to bytecode and runs it in a loop."
ATOL = 1e-4


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_model_dir) -> Path:
    return compress_tiny_bundle(tmp_path_factory.mktemp("backends"), tiny_model_dir)


@pytest.fixture(scope="module")
def branch(bundle) -> OnnxRuntimeBranch:
    return OnnxRuntimeBranch(bundle, threads=1)


@pytest.fixture(scope="module")
def prompt(branch) -> list[int]:
    ids = branch.tokenizer(TEXT)["input_ids"]
    assert len(ids) >= 20
    return ids[:20]


def _feed_each(session, tokens) -> np.ndarray:
    return np.concatenate([session.feed([t]) for t in tokens])


# --- ONNX Runtime on a real tiny bundle -------------------------------------------------------


def test_branch_reads_the_bundle(branch, bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert (branch.name, branch.backend, branch.has_logits) == ("small", "onnxruntime", True)
    assert branch.vocab_size == json.loads((bundle / "config.json").read_text())["vocab_size"]
    assert branch.context_length == manifest["context_length"]
    assert branch.tokenizer.decode(branch.tokenizer(TEXT)["input_ids"]) == TEXT


def test_prefill_at_once_equals_token_by_token(branch, prompt):
    whole, single = branch.session(), branch.session()
    at_once = whole.feed(prompt)
    assert at_once.shape == (len(prompt), branch.vocab_size) and at_once.dtype == np.float32
    one_by_one = _feed_each(single, prompt)
    assert whole.length == single.length == len(prompt)
    np.testing.assert_allclose(at_once, one_by_one, rtol=0, atol=ATOL)
    # and the two caches continue identically
    np.testing.assert_allclose(whole.feed([5]), single.feed([5]), rtol=0, atol=ATOL)


def test_k_tokens_after_a_prefix_equal_k_single_feeds(branch, prompt):
    """Speculative verification: k draft tokens in one pass give the rows k decode steps give."""
    for k in (2, 4, 7):
        batched, stepped = branch.session(), branch.session()
        batched.feed(prompt[:8])
        stepped.feed(prompt[:8])
        rows = batched.feed(prompt[8:8 + k])
        assert rows.shape == (k, branch.vocab_size)
        np.testing.assert_allclose(rows, _feed_each(stepped, prompt[8:8 + k]), rtol=0, atol=ATOL)


def test_rollback_forgets_the_dropped_tokens(branch, prompt):
    session = branch.session()
    session.feed(prompt[:10])
    first = session.feed(prompt[10:16])
    session.rollback(6)
    assert session.length == 10
    np.testing.assert_allclose(session.feed(prompt[10:16]), first, rtol=0, atol=ATOL)
    # a rejected draft replaced by other tokens: the same as a fresh session that never saw it
    session.rollback(4)
    other = [7, 8, 9]
    fresh = branch.session()
    fresh.feed(prompt[:12])
    np.testing.assert_allclose(session.feed(other), fresh.feed(other), rtol=0, atol=ATOL)
    session.rollback(0)
    assert session.length == 15
    with pytest.raises(ValueError, match="cannot roll back 16 token.s.: the cache holds 15"):
        session.rollback(16)
    session.rollback(15)  # back to empty: a prefill again
    np.testing.assert_allclose(session.feed(prompt[:4]), fresh_rows(branch, prompt[:4]), rtol=0, atol=ATOL)


def fresh_rows(branch, tokens):
    session = branch.session()
    try:
        return session.feed(tokens)
    finally:
        session.close()


def test_greedy_generate_equals_transformers_generate(branch, prompt, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    # A randomly initialized model soon repeats one token, so greedy tokens alone say little:
    # several prompts (each settles on another token), and the logits along the way.
    prompts = [prompt] + [branch.tokenizer(text)["input_ids"][:16] for text in ("def f(x): return x + 1",
                                                                                "Exceptions propagate up the call stack.")]
    seen, first = set(), None
    for ids in prompts:
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 do_sample=False, max_new_tokens=12, eos_token_id=2, pad_token_id=2)
            expected = out[0, len(ids):].tolist()
            reference = model(out[:, :-1]).logits[0].numpy()
        assert len(expected) == 12  # no early stop on these prompts: a real 12-token check
        assert greedy_generate(branch, ids, 12, eos_token_id=2) == expected
        session = branch.session()
        np.testing.assert_allclose(session.feed(out[0, :-1].tolist()), reference, rtol=0, atol=ATOL)
        seen.add(expected[-1])
        first = first or expected
    assert len(seen) == len(prompts)
    # stops at an end-of-sequence id (and keeps it), one id or several
    assert greedy_generate(branch, prompt, 12, eos_token_id=[99999, first[0]]) == first[:1]
    assert greedy_generate(branch, prompt, 0) == []


def test_context_overflow_and_bad_input_are_refused(bundle, prompt):
    capped = OnnxRuntimeBranch(bundle, context_length=16, threads=1)
    assert capped.context_length == 16
    session = capped.session()
    session.feed(prompt[:10])
    with pytest.raises(EdgekitError, match="feeding 7 token.s. after the 10 in the cache would exceed the context length of 16"):
        session.feed(prompt[10:17])
    assert session.length == 10  # a refused feed changes nothing
    session.feed(prompt[10:16])
    with pytest.raises(EdgekitError, match="To resolve, shorten the prompt"):
        session.feed([1])
    # greedy decoding stops when the cache is full instead of failing
    assert len(greedy_generate(capped, prompt[:10], 50)) == 16 - 10 + 1
    with pytest.raises(ValueError, match="outside the vocabulary"):
        capped.session().feed([capped.vocab_size])
    with pytest.raises(ValueError, match="at least one token"):
        capped.session().feed([])
    session.close()
    with pytest.raises(RuntimeError, match="closed"):
        session.feed([1])


# --- the TensorRT session's logic on a stand-in engine (CPU) ---------------------------------
# Not a TensorRT test (that is test_tensorrt_branch_matches_onnxruntime below): a recording
# engine with TensorRT's Python surface, whose profiles come from edgekit.engine.settings and
# whose execute_async_v3 reads the bound addresses, runs the ONNX graph and writes the outputs
# back. It checks profile choice, splitting, the cache hand-over, rollback and that every
# address points at a dense buffer of the right size.


class _StandInContext:
    def __init__(self, engine):
        self.engine, self.active_optimization_profile = engine, 0
        self.shapes, self.addresses, self.calls = {}, {}, []

    def set_optimization_profile_async(self, index, stream):
        self.active_optimization_profile, self.shapes = index, {}
        return True

    def set_input_shape(self, name, shape):
        low, _, high = self.engine.profiles[self.active_optimization_profile].shapes[name]
        if not all(lo <= d <= hi for d, lo, hi in zip(shape, low, high)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, address):
        assert address, name
        self.addresses[name] = address

    def get_tensor_shape(self, name):
        past, count = self.shapes["past_key_values.0.key"][2], self.shapes["input_ids"][1]
        if name == "logits":
            return (1, count, self.engine.vocab)
        heads, dim = self.engine.cache_dims
        return (1, heads, past + count, dim)

    def _array(self, name, shape, dtype):
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        buffer = (ctypes.c_char * max(size, 1)).from_address(self.addresses[name])
        return np.frombuffer(buffer, dtype=dtype, count=int(np.prod(shape))).reshape(shape)

    def execute_async_v3(self, stream):
        feeds = {}
        for value in self.engine.ort.get_inputs():
            dtype = np.int64 if "int64" in value.type else np.float32
            feeds[value.name] = self._array(value.name, self.shapes[value.name], dtype).copy()
        self.calls.append((self.active_optimization_profile, self.shapes["input_ids"][1], self.shapes["past_key_values.0.key"][2]))
        names = [o.name for o in self.engine.ort.get_outputs()]
        for name, value in zip(names, self.engine.ort.run(names, feeds)):
            assert value.shape == tuple(self.get_tensor_shape(name)), name
            self._array(name, value.shape, np.float32)[...] = value
        return True


class _StandInEngine:
    def __init__(self, ort_session, onnx_path, *, context_length, max_prefill):
        from edgekit.engine.settings import make_profiles, read_graph

        self.ort = ort_session
        graph = read_graph(onnx_path)
        self.profiles = make_profiles(graph.inputs, context_length=context_length, max_batch=1, max_prefill=max_prefill)
        self.num_optimization_profiles = len(self.profiles)
        self.inputs = {v.name: v for v in ort_session.get_inputs()}
        self.outputs = {v.name: v for v in ort_session.get_outputs()}
        self.names = list(self.inputs) + list(self.outputs)
        self.num_io_tensors = len(self.names)
        key = self.inputs["past_key_values.0.key"].shape
        self.cache_dims = (key[1], key[3])
        self.vocab = self.outputs["logits"].shape[-1]
        self.contexts = []

    def get_tensor_name(self, index):
        return self.names[index]

    def get_tensor_mode(self, name):
        return "input" if name in self.inputs else "output"

    def get_tensor_dtype(self, name):
        return "int64" if name in ("input_ids", "attention_mask", "position_ids") else "float32"

    def get_tensor_shape(self, name):
        value = self.inputs.get(name) or self.outputs[name]
        return tuple(d if isinstance(d, int) else -1 for d in value.shape)

    def get_tensor_profile_shape(self, name, index):
        return list(self.profiles[index].shapes[name])

    def create_execution_context(self):
        self.contexts.append(_StandInContext(self))
        return self.contexts[-1]


class _CpuTensorRTBranch(TensorRTBranch):
    device_type = "cpu"

    def _new_stream(self):
        return types.SimpleNamespace(cuda_stream=0)

    def on_stream(self):
        return contextlib.nullcontext()


def test_tensorrt_session_logic_on_a_stand_in_engine(bundle, branch, prompt, monkeypatch):
    import edgekit.engine.record as record

    fake_trt = types.SimpleNamespace(__version__="10.3.0", TensorIOMode=types.SimpleNamespace(INPUT="input", OUTPUT="output"),
                                     float32="float32", float16="float16", int64="int64", int32="int32")
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt)
    engines = []

    def fake_load_engine(bundle_dir, target):
        assert target == "jetson-orin-nano-8gb"
        engines.append(_StandInEngine(branch.ort_session, branch.graph, context_length=64, max_prefill=8))
        return engines[0]

    monkeypatch.setattr(record, "load_engine", fake_load_engine)
    trt_branch = _CpuTensorRTBranch(bundle, context_length=64)
    assert (trt_branch.backend, trt_branch.vocab_size, trt_branch.target) == ("tensorrt", branch.vocab_size, "jetson-orin-nano-8gb")
    calls = engines[0].contexts[0].calls
    session, reference = trt_branch.session(), branch.session()
    # 12 tokens > max_prefill 8: one prefill call, then four decode calls; same rows as ORT at once
    np.testing.assert_allclose(session.feed(prompt[:12]), reference.feed(prompt[:12]), rtol=0, atol=ATOL)
    assert calls == [(0, 8, 0), (1, 1, 8), (1, 1, 9), (1, 1, 10), (1, 1, 11)]
    # k tokens after a prefix (verification): k decode calls, the same rows
    np.testing.assert_allclose(session.feed(prompt[12:15]), reference.feed(prompt[12:15]), rtol=0, atol=ATOL)
    assert calls[-3:] == [(1, 1, 12), (1, 1, 13), (1, 1, 14)] and session.length == 15
    session.rollback(3)
    reference.rollback(3)
    np.testing.assert_allclose(session.feed([3, 4]), reference.feed([3, 4]), rtol=0, atol=ATOL)
    session.rollback(session.length)  # empty again: the prefill profile
    session.feed(prompt[:2])
    assert calls[-1] == (0, 2, 0)
    assert greedy_generate(trt_branch, prompt, 16) == greedy_generate(branch, prompt, 16)
    with pytest.raises(EdgekitError, match="exceed the context length of 64"):
        session.feed(list(range(63)))


def test_tensorrt_branch_without_tensorrt_is_a_clear_error(bundle, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    with pytest.raises(EngineError, match="the TensorRT Python package does not import"):
        TensorRTBranch(bundle)


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


# --- load_branch ---------------------------------------------------------------------------


def test_load_branch_picks_the_backend(bundle, tmp_path):
    from edgekit.engine.builder import tensorrt_available

    local = load_branch(bundle, name="small")
    assert isinstance(local, OnnxRuntimeBranch) and local.name == "small"
    remote = load_branch("https://example.invalid/v1", name="large", model="m", timeout=3)
    assert isinstance(remote, RemoteBranch) and (remote.name, remote.model, remote.timeout) == ("large", "m", 3.0)
    with pytest.raises(EdgekitError, match="branch large returns text, not logits"):
        greedy_generate(remote, [1, 2], 4)
    with pytest.raises(EdgekitError, match="no bundle directory or http"):
        load_branch(tmp_path / "nothing", name="small")
    with pytest.raises(EdgekitError, match="unknown backend 'tensorrt-llm'"):
        load_branch(bundle, name="small", backend="tensorrt-llm")
    if tensorrt_available() is not None:
        return  # the rest is about a machine without TensorRT
    # an engine file without the tensorrt package: auto still runs on ONNX Runtime
    copy = tmp_path / "tiny"
    shutil.copytree(bundle, copy)
    (copy / "engine").mkdir()
    (copy / "engine" / "jetson-orin-nano-8gb.plan").write_bytes(b"plan")
    assert isinstance(load_branch(copy, name="small"), OnnxRuntimeBranch)
    with pytest.raises(EngineError, match="backend tensorrt needs the TensorRT Python package") as caught:
        load_branch(copy, name="small", backend="tensorrt")
    assert "To resolve" in str(caught.value)


def test_spin_wait_reaches_the_onnxruntime_session(bundle, prompt, tmp_path):
    """runtime.json spin_wait (default true) sets how ONNX Runtime's workers wait; every run
    stops spinning at its end either way, and the numbers do not depend on it."""
    from edgekit.runtime.bundle import open_router, resolve_config

    def entries(branch):
        options = branch.ort_session.get_session_options()
        return (options.get_session_config_entry("session.intra_op.allow_spinning"),
                options.get_session_config_entry("session.force_spinning_stop"))

    spinning = load_branch(bundle, name="small")
    sleeping = load_branch(bundle, name="small", spin_wait=False)
    assert entries(spinning) == ("1", "1") and entries(sleeping) == ("0", "1")
    assert np.array_equal(spinning.session().feed(prompt), sleeping.session().feed(prompt))
    router = open_router(bundle, resolve_config(bundle, spin_wait=False))
    assert entries(router.small) == ("0", "1")
    copy = tmp_path / "tiny"
    shutil.copytree(bundle, copy)
    runtime = copy / "runtime.json"
    data = json.loads(runtime.read_text()) if runtime.is_file() else {}
    runtime.write_text(json.dumps({**data, "spin_wait": "sometimes"}))
    with pytest.raises(EdgekitError, match="spin_wait"):
        resolve_config(copy)


# --- the graph read without onnx -----------------------------------------------------------


def test_graph_nodes_read_from_the_protobuf_equal_onnx(bundle, tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgekit.runtime.backends import _appends_in_place
    from edgekit.runtime.onnx_graph import MalformedGraph, graph_nodes, read_graph_nodes

    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    assert read_graph_nodes(bundle / "model.onnx") == [(n.op_type, list(n.output)) for n in model.graph.node]
    assert _appends_in_place(bundle / "model.onnx", ["present.0.key"]) is False  # optimum's graph: copied cache
    # a fused-style graph: GroupQueryAttention makes the presents, with an initializer to skip
    nodes = [helper.make_node("GroupQueryAttention", ["q", "k", "v", "past_key_values.0.key", "past_key_values.0.value"],
                              ["attn", "present.0.key", "present.0.value"], domain="com.microsoft", num_heads=4, kv_num_heads=2),
             helper.make_node("MatMul", ["attn", "w"], ["logits"], name="lm_head")]
    weight = numpy_helper.from_array(np.ones((4, 8), dtype=np.float32), name="w")
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 8])], [weight])
    fused = tmp_path / "fused.onnx"
    onnx.save(helper.make_model(graph), str(fused))
    assert read_graph_nodes(fused) == [("GroupQueryAttention", ["attn", "present.0.key", "present.0.value"]), ("MatMul", ["logits"])]
    assert _appends_in_place(fused, ["present.0.key", "present.0.value"]) is True
    assert _appends_in_place(fused, ["present.0.key", "present.1.key"]) is False
    data = fused.read_bytes()
    for broken in (data[: len(data) // 2], b"\xff" * 16, b"\x3a\xff\xff\xff\xff\x0f"):
        with pytest.raises(MalformedGraph):
            graph_nodes(broken)
        (tmp_path / "broken.onnx").write_bytes(broken)
        assert _appends_in_place(tmp_path / "broken.onnx", ["present.0.key"]) is False


# --- names and paths from a bundle's manifest / runtime.json ---------------------------------

HOSTILE_PATHS = {"parent": "../x", "nested parent": "graphs/../../x", "absolute": "/etc/passwd", "nul": "model\x00.onnx",
                 "empty": "", "long": "m" * 1000, "backslash": "..\\x", "hidden": ".model.onnx", "not a string": 7}


def _edited(bundle: Path, tmp_path: Path, *, manifest=None, runtime=None) -> Path:
    copy = tmp_path / "tiny"
    shutil.copytree(bundle, copy)
    for name, change in (("manifest.json", manifest), ("runtime.json", runtime)):
        if change:
            path = copy / name
            data = json.loads(path.read_text()) if path.is_file() else {}
            change(data)
            path.write_text(json.dumps(data))
    return copy


@pytest.mark.parametrize("case", sorted(HOSTILE_PATHS))
def test_hostile_graph_paths_in_the_manifest_are_refused(bundle, tmp_path, case):
    value = HOSTILE_PATHS[case]

    def change(manifest):
        manifest["onnx"]["variants"] = {"onnxruntime": value, "float": "model.onnx"}

    copy = _edited(bundle, tmp_path, manifest=change)
    with pytest.raises(EdgekitError, match="ONNX graph in manifest.json") as caught:
        load_branch(copy, name="small", backend="onnxruntime")
    assert "\n" not in str(caught.value) and "To resolve" in str(caught.value)


def test_a_graph_path_through_a_symlink_out_of_the_bundle_is_refused(bundle, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(bundle / "model.onnx", outside / "model.onnx")

    def change(manifest):
        manifest["onnx"]["variants"] = {"onnxruntime": "link/model.onnx"}

    copy = _edited(bundle, tmp_path, manifest=change)
    (copy / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(EdgekitError, match="leads outside"):
        load_branch(copy, name="small", backend="onnxruntime")


def test_a_graph_in_a_subfolder_of_the_bundle_is_fine(bundle, tmp_path):
    def change(manifest):
        manifest["onnx"]["variants"] = {"onnxruntime": "graphs/model.onnx"}

    copy = _edited(bundle, tmp_path, manifest=change)
    (copy / "graphs").mkdir()
    for name in ("model.onnx", "model.onnx_data"):
        shutil.move(copy / name, copy / "graphs" / name)
    branch = load_branch(copy, name="small", backend="onnxruntime")
    assert branch.graph == copy / "graphs" / "model.onnx"


@pytest.mark.parametrize("case", ["parent", "absolute", "nul", "empty", "long", "not a string"])
def test_hostile_targets_and_branch_names_are_refused(bundle, tmp_path, case):
    value = HOSTILE_PATHS[case]

    def change(manifest):
        manifest["target"] = value

    copy = _edited(bundle, tmp_path, manifest=change)
    with pytest.raises(EdgekitError, match="target") as caught:
        load_branch(copy, name="small")
    assert "\n" not in str(caught.value)
    with pytest.raises(EdgekitError, match="invalid branch name"):
        load_branch(bundle, name=value)


@pytest.mark.parametrize("case", sorted(HOSTILE_PATHS))
def test_hostile_large_branches_in_runtime_json_are_refused(bundle, tmp_path, case):
    from edgekit.runtime.bundle import read_runtime_config, resolve_config

    value = HOSTILE_PATHS[case]
    copy = _edited(bundle, tmp_path, runtime=lambda data: data.update(policy="cascade", large=value))
    with pytest.raises(EdgekitError, match="runtime.large|runtime.json") as caught:
        read_runtime_config(copy)
    text = str(caught.value)
    assert "\n" not in text and "runtime.json" in text and "To resolve" in text
    with pytest.raises(EdgekitError):
        resolve_config(copy)


@pytest.mark.parametrize("url", ["http://host:8000/v1\x00", "http://a b/", "https://" + "h" * 3000])
def test_hostile_large_urls_are_refused(bundle, tmp_path, url):
    from edgekit.runtime.bundle import read_runtime_config

    copy = _edited(bundle, tmp_path, runtime=lambda data: data.update(policy="cascade", large=url))
    with pytest.raises(EdgekitError, match="invalid runtime.large"):
        read_runtime_config(copy)


def test_large_branches_a_bundle_may_name(bundle, tmp_path):
    """An endpoint, or a bundle inside this one; a bundle elsewhere comes from the caller."""
    from edgekit.runtime.bundle import large_spec, open_router, read_runtime_config, resolve_config

    copy = _edited(bundle, tmp_path, runtime=lambda data: data.update(policy="large_only", large="branches/large"))
    shutil.copytree(bundle, copy / "branches" / "large")
    config = read_runtime_config(copy)
    assert config.large == "branches/large"
    router = open_router(copy, config)
    assert Path(router.large.bundle_dir) == (copy / "branches" / "large").resolve()
    remote = _edited(bundle, tmp_path / "remote", runtime=lambda data: data.update(policy="cascade", large="http://127.0.0.1:9/v1"))
    assert read_runtime_config(remote).large == "http://127.0.0.1:9/v1"
    # from the caller (--large), a path outside the bundle is theirs to give
    assert resolve_config(copy, large=str(bundle)).large == str(bundle)
    assert large_spec(copy, str(bundle)) == str(bundle)
    with pytest.raises(EdgekitError, match="NUL"):
        large_spec(copy, "x\x00y")


# --- on a machine with TensorRT and a GPU (scripts/gpu_check.sh) ---------------------------


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_tensorrt_branch_matches_onnxruntime(bundle, branch, prompt, tmp_path):
    """The real engine for this GPU against the ONNX Runtime branch: greedy tokens for 16 steps,
    and prefill / decode / k-after-prefix / rollback logits close. The float graph is built
    with FP16 on TensorRT 10, so logits agree to fp16 accuracy, and a greedy step may differ
    only where ONNX Runtime's top two logits are a near tie."""
    from edgekit.engine.builder import cuda_device
    from edgekit.engine.prepare import prepare_engine
    from edgekit.engine.settings import BuildOptions
    from edgekit.targets import Target, list_targets, load_target

    copy = tmp_path / "tiny"
    shutil.copytree(bundle, copy)
    _, cc = cuda_device()
    here = next((t for t in list_targets() if t.compute_capability == cc), None)
    if here is None:  # a GPU without a profile: a copy of the H100 profile with this compute capability
        here = Target.model_validate({**load_target("workstation-h100").model_dump(mode="json"), "name": "this-gpu",
                                      "compute_capability": cc, "supported_precisions": ["fp32", "fp16"]})
    assert prepare_engine(copy, here, BuildOptions(max_prefill=64, workspace_gb=1), build="always")["status"] == "built"
    trt_branch = load_branch(copy, name="small", target=here.name)
    assert isinstance(trt_branch, TensorRTBranch)
    tolerance = 2e-2
    session, reference = trt_branch.session(), branch.session()
    np.testing.assert_allclose(session.feed(prompt[:12]), reference.feed(prompt[:12]), rtol=0, atol=tolerance)
    np.testing.assert_allclose(session.feed(prompt[12:13]), reference.feed(prompt[12:13]), rtol=0, atol=tolerance)
    np.testing.assert_allclose(session.feed(prompt[13:17]), reference.feed(prompt[13:17]), rtol=0, atol=tolerance)
    session.rollback(3)
    reference.rollback(3)
    np.testing.assert_allclose(session.feed([3, 4]), reference.feed([3, 4]), rtol=0, atol=tolerance)

    expected = greedy_generate(branch, prompt, 16)
    got = greedy_generate(trt_branch, prompt, 16)
    if got != expected:
        step = next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)
        rows = fresh_rows(branch, prompt + expected[:step])[-1]
        top2 = np.sort(rows)[-2:]
        assert top2[1] - top2[0] < tolerance, f"greedy tokens differ at step {step} without a near tie: {got} vs {expected}"
