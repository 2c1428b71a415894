"""Prompt-prefix KV reuse (edgekit.runtime.prefix_cache and SessionBase.feed): the LRU on its
own (keys, block alignment, byte and entry bounds, threads), then on the tiny bundles' real
sessions -- the copied-cache optimum graph, the fused shared-buffer graph and the TensorRT
session's logic on the CPU stand-in engine -- where greedy output with reuse must be token for
token the output without it, and finally the server's wiring (/metrics, the settings).
"""

from __future__ import annotations

import http.client
import json
import threading
import types
from urllib.parse import urlsplit

import numpy as np
import pytest
from backend_fixtures import branch, bundle  # noqa: F401 (fixtures)
from conftest import write_recipe

from edgekit import api
from edgekit.runtime.backends import OnnxRuntimeBranch, greedy_generate
from edgekit.runtime.config import PrefixCacheConfig, RuntimeConfig
from edgekit.runtime.prefix_cache import PrefixCache, attach_prefix_caches

BLOCK = 16
FUSED_STAGES = """\
stages:
  - type: load
  - type: export_onnx
    onnxruntime_graph: fused
  - type: bundle
"""


def _block(fill: float = 0.0, width: int = 8) -> dict[str, np.ndarray]:
    return {"past_key_values.0.key": np.full((1, 1, BLOCK, width), fill, dtype=np.float32)}


def _fills(blocks) -> list[float]:
    return [float(b["past_key_values.0.key"][0, 0, 0, 0]) for b in blocks]


def _cache(**kw) -> PrefixCache:
    return PrefixCache(**{"max_bytes": 1 << 20, "block_tokens": BLOCK, "min_tokens": BLOCK, **kw})


# --- the cache on its own ---------------------------------------------------------------------


def test_lookup_reuses_whole_shared_blocks_only():
    cache = _cache(min_tokens=2 * BLOCK)
    ids = list(range(100))
    assert cache.store_length(len(ids)) == 96 and cache.store_length(97) == 96 and cache.store_length(96) == 80
    assert cache.store_length(2 * BLOCK) == 0  # the last token stays out: 31 -> one block, under min_tokens
    assert cache.insert(ids[:64], {end: _block(end) for end in (16, 32, 48, 64)}) == 4
    blocks, reuse = cache.lookup(ids[:70])
    assert (_fills(blocks), reuse) == ([16, 32, 48, 64], 64)
    # shares 40 tokens: the two whole blocks before the difference are reused
    blocks, reuse = cache.lookup(ids[:40] + [999] * 30)
    assert (_fills(blocks), reuse) == ([16, 32], 32)
    # shares 31 tokens: one whole block, under min_tokens -> a miss
    assert cache.lookup(ids[:31] + [999] * 30) is None
    # a prompt equal to a cached prefix reuses all but its last token (which must run)
    blocks, reuse = cache.lookup(ids[:64])
    assert (len(blocks), reuse) == (4, 63)
    # a prompt too short for min_tokens is not a lookup
    assert cache.lookup(ids[:2 * BLOCK]) is None
    # another prompt with the same first 32 tokens shares those blocks: only its own are missing
    other = ids[:32] + [7] * 40
    assert cache.missing(other, 64) == [48, 64] and cache.contains(ids[:64]) and not cache.contains(other[:64])
    assert cache.stats() == {"blocks": 4, "bytes": cache.bytes, "hits": 3, "misses": 1, "tokens_reused": 64 + 32 + 63,
                             "evictions": 0}
    # the key is the ids themselves: different ids -> no hit
    assert cache.lookup([i + 1 for i in ids[:70]]) is None
    with pytest.raises(ValueError):  # stored blocks are read-only
        blocks[0]["past_key_values.0.key"][0, 0, 0, 0] = 5.0


def test_eviction_by_bytes_is_least_recently_used_first_and_tails_first():
    def size(end):  # one block's tensors + its key (the ids up to its end)
        return _block()["past_key_values.0.key"].nbytes + 8 * end

    q, r, p = [1] * 20, [2] * 20, [3] * 60
    cache = _cache(max_bytes=size(16) + size(16) + size(32) + size(48))
    assert cache.insert(q[:16], {16: _block(1)}) == 1
    assert cache.insert(p[:48], {16: _block(16), 32: _block(32), 48: _block(48)}) == 3
    assert cache.bytes == cache.max_bytes and cache.evictions == 0  # full
    assert cache.lookup(q) is not None  # q is now the most recently used
    assert cache.insert(r[:16], {16: _block(2)}) == 1  # over the budget by one block
    # p's last block went (least recent: a prefix's later blocks age before its first ones)
    assert cache.evictions == 1 and cache.bytes <= cache.max_bytes
    assert cache.contains(q[:16]) and cache.contains(r[:16]) and cache.missing(p, 48) == [48]
    blocks, reuse = cache.lookup(p)
    assert (_fills(blocks), reuse) == ([16, 32], 32)
    # once the size per token is known, what one prompt stores is capped to the budget
    assert 0 < cache.store_length(10_000) <= 3 * BLOCK
    # a block larger than the whole budget is refused without evicting anything
    before = cache.stats()
    assert cache.insert([9] * 16, {16: _block(width=512)}) == 0
    assert cache.stats() == before
    # the block count bounds it too
    small = _cache(max_blocks=2)
    for ids in (q, r, p):
        small.insert(ids[:16], {16: _block()})
    assert len(small) == 2 and not small.contains(q[:16])


def test_the_cache_is_consistent_under_threads():
    cache = _cache(max_bytes=20 * (_block()["past_key_values.0.key"].nbytes + 256))
    errors = []

    def work(seed):
        rng = np.random.default_rng(seed)
        try:
            for _ in range(300):
                k = int(rng.integers(0, 40))
                ids = [k] * 32 + [int(rng.integers(0, 9))] * 8
                found = cache.lookup(ids)
                if found is not None:
                    assert set(_fills(found[0])) == {k}  # never another prefix's KV
                else:
                    cache.insert(ids[:32], {16: _block(k), 32: _block(k)})
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    stats = cache.stats()
    assert stats["hits"] + stats["misses"] == 6 * 300 and stats["evictions"] > 0
    assert stats["bytes"] == sum(b.nbytes for b in cache._blocks.values()) <= cache.max_bytes


def test_settings_are_bounded_and_attach_respects_them(branch):  # noqa: F811
    assert RuntimeConfig().prefix_cache.max_mb == 64
    for bad in ({"max_mb": -1}, {"block_tokens": 0}, {"min_tokens": 0}, {"max_blocks": 0}, {"size": 3}):
        with pytest.raises(ValueError):
            PrefixCacheConfig(**bad)

    class _Router:
        def __init__(self, policy, protects=None, small=branch):
            self.policy, self.protects, self.small, self.large = policy, protects or policy, small, None

    try:
        assert attach_prefix_caches(_Router("small_only"), PrefixCacheConfig(max_mb=0)) == []
        # input_complexity scores every prompt row; a reused prefix has none
        assert attach_prefix_caches(_Router("input_complexity"), PrefixCacheConfig()) == []
        assert attach_prefix_caches(_Router("degrade", protects="input_complexity"), PrefixCacheConfig()) == []
        assert getattr(branch, "prefix_cache", None) is None
        caches = attach_prefix_caches(_Router("cascade"), PrefixCacheConfig(max_mb=1, block_tokens=8, min_tokens=8))
        assert len(caches) == 1 and branch.prefix_cache is caches[0] and caches[0].max_bytes == 1 << 20
        # a wrapper (batched decoding) shares the wrapped branch's cache, and attaching again keeps it
        wrapper = types.SimpleNamespace(inner=branch)
        assert attach_prefix_caches(_Router("small_only", small=wrapper), PrefixCacheConfig()) == caches
        assert not hasattr(wrapper, "prefix_cache")
    finally:
        branch.prefix_cache = None


# --- real sessions ------------------------------------------------------------------------------


def _prompts(tokenizer) -> dict[str, list[int]]:
    """A 64-token head (four blocks) shared by several prompts with short tails."""
    text = ("You are a careful assistant for the Python standard library. Answer with short, exact sentences, "
            "quote the documentation where it helps, and say when something is not documented. ")
    head = tokenizer(text * 3)["input_ids"]
    assert len(head) >= 64
    head = head[:64]
    tail = tokenizer(" The for statement is used to iterate over the elements of a sequence")["input_ids"][:12]
    other = tokenizer(" A module can contain executable statements as well as function definitions")["input_ids"][:12]
    assert len(tail) == len(other) == 12
    return {"a": head + tail, "b": head + other, "c": head[:40] + other, "exact": head, "d": head + tail[:5],
            "e": head[:10] + other}


# prompts in the order above, against a cache that starts empty: a stores its 64-token head
# (four blocks); c shares 40 tokens of it: the two whole blocks; exact is the cached prefix: all
# but its last token come from the cache; e shares less than a block: a miss
EXPECTED_REUSE = {"a": 0, "b": 64, "c": 32, "exact": 63, "d": 64, "e": 0}


def _with_cache(branch, **kw):
    branch.prefix_cache = PrefixCache(**{"max_bytes": 64 << 20, "block_tokens": BLOCK, "min_tokens": BLOCK, **kw})
    return branch.prefix_cache


def _exactness(branch) -> float:
    """Greedy with reuse == greedy without, for each kind of prompt; returns the largest
    difference of the last prompt logits row seen."""
    prompts = _prompts(branch.tokenizer)
    branch.prefix_cache = None
    reference = {name: greedy_generate(branch, ids, 12) for name, ids in prompts.items()}
    last_rows = {}
    for name, ids in prompts.items():
        s = branch.session()
        last_rows[name] = s.feed(ids)[-1]
        s.close()
    cache = _with_cache(branch)
    worst = 0.0
    try:
        for name, ids in prompts.items():
            session = branch.session()
            rows = session.feed(ids)
            assert session.reused == EXPECTED_REUSE[name], name
            assert rows.shape == (len(ids) - session.reused, branch.vocab_size)
            worst = max(worst, float(np.abs(rows[-1] - last_rows[name]).max()))
            session.close()
            assert greedy_generate(branch, ids, 12) == reference[name], name
        # the uncached path is a one-shot prefill: no chunking was needed for identical output
        assert worst < 1e-4, worst
        stats = cache.stats()
        # the greedy runs hit too: a and e on what their sessions stored, c on its own third block
        assert (stats["hits"], stats["misses"]) == (10, 2)
        assert stats["tokens_reused"] == 64 + 2 * (64 + 63 + 64) + 32 + 48 + 16
    finally:
        branch.prefix_cache = None
    return worst


def test_copied_cache_session_is_exact_with_reuse(branch):  # noqa: F811
    assert branch.kv_cache == "copied"
    worst = _exactness(branch)
    print(f"copied cache: max |last logits with reuse - without| = {worst:.2e}")


@pytest.fixture(scope="module")
def fused_branch(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("fused")
    recipe = write_recipe(tmp / "fused.yaml", tiny_model_dir, stages=FUSED_STAGES, output=tmp / "run")
    manifest = api.compress(recipe, quiet=True)
    found = OnnxRuntimeBranch(tmp / "run" / manifest["stages"][-1]["dir"] / "tiny", threads=1)
    assert found.kv_cache == "shared_buffer"
    return found


def test_shared_buffer_session_is_exact_with_reuse(fused_branch):
    worst = _exactness(fused_branch)
    print(f"shared buffer: max |last logits with reuse - without| = {worst:.2e}")
    # a restored session keeps working after growing its buffers and rolling back
    prompts = _prompts(fused_branch.tokenizer)
    _with_cache(fused_branch)
    try:
        fused_branch.session().feed(prompts["a"])
        session = fused_branch.session()
        session._FIRST_CAPACITY = 8  # forces _reserve to grow (and copy) right after the restore
        session.feed(prompts["b"])
        assert session.reused == 64
        long = session.feed(list(range(3, 150)))
        session.rollback(147)
        again = session.feed(list(range(3, 150)))
        np.testing.assert_allclose(again, long, rtol=0, atol=1e-4)
    finally:
        fused_branch.prefix_cache = None


def test_concurrent_sessions_on_one_branch(branch):  # noqa: F811
    prompts = _prompts(branch.tokenizer)
    order = [prompts[n] for n in ("a", "b", "c", "d", "exact", "a", "b", "d")]
    branch.prefix_cache = None
    reference = [greedy_generate(branch, ids, 10) for ids in order]
    cache = _with_cache(branch, max_bytes=30_000)  # room for three blocks: evictions happen too
    results, errors = [None] * (len(order) * 3), []

    def work(index):
        try:
            results[index] = greedy_generate(branch, order[index % len(order)], 10)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(results))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        branch.prefix_cache = None
    assert not errors
    assert results == reference * 3
    assert cache.stats()["hits"] > 0 and cache.stats()["evictions"] > 0 and cache.bytes <= cache.max_bytes


def test_a_failed_feed_after_a_restore_leaves_the_session_empty(branch, monkeypatch):  # noqa: F811
    prompts = _prompts(branch.tokenizer)
    _with_cache(branch)
    try:
        branch.session().feed(prompts["a"])
        session = branch.session()
        monkeypatch.setattr(session, "_forward", lambda ids: (_ for _ in ()).throw(RuntimeError("boom")))
        with pytest.raises(RuntimeError, match="boom"):
            session.feed(prompts["b"])
        assert session.length == 0 and session._cache["past_key_values.0.key"].shape[2] == 0
        monkeypatch.undo()
        branch.prefix_cache = None
        np.testing.assert_allclose(session.feed(prompts["b"])[-1], branch.session().feed(prompts["b"])[-1], rtol=0, atol=1e-4)
    finally:
        branch.prefix_cache = None


def test_tensorrt_session_snapshots_on_the_stand_in_engine(bundle, branch, monkeypatch):  # noqa: F811
    import sys

    import edgekit.engine.record as record
    from test_runtime_backends_trt import _CpuTensorRTBranch, _StandInEngine

    fake_trt = types.SimpleNamespace(__version__="10.3.0", TensorIOMode=types.SimpleNamespace(INPUT="input", OUTPUT="output"),
                                     float32="float32", float16="float16", int64="int64", int32="int32")
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt)
    monkeypatch.setattr(record, "load_engine", lambda bundle_dir, target: _StandInEngine(
        branch.ort_session, branch.graph, context_length=256, max_prefill=128))
    trt_branch = _CpuTensorRTBranch(bundle, context_length=256)
    prompts = _prompts(branch.tokenizer)
    reference = {name: greedy_generate(trt_branch, ids, 8) for name, ids in prompts.items()}
    cache = _with_cache(trt_branch)
    for name, ids in prompts.items():
        assert greedy_generate(trt_branch, ids, 8) == reference[name], name
    assert (cache.stats()["hits"], cache.stats()["misses"], cache.stats()["tokens_reused"]) == (4, 2, 64 + 32 + 63 + 64)


# --- the server ---------------------------------------------------------------------------------


def _get(url: str, path: str, body: dict | None = None) -> tuple[int, str]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        if body is None:
            conn.request("GET", path)
        else:
            conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def _samples(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def test_server_reuses_prefixes_and_counts_them(bundle):  # noqa: F811
    from edgekit.runtime.bundle import resolve_config
    from edgekit.serve.server import EdgekitServer, ServeOptions

    config = resolve_config(bundle)
    config = config.model_copy(update={"prefix_cache": PrefixCacheConfig(block_tokens=BLOCK, min_tokens=BLOCK)})
    # one generation slot: no batched decoding (tests/test_serve.py covers prefixes in the batch)
    server = EdgekitServer(bundle, ServeOptions(port=0, access_log=False, max_concurrency=1), config=config, threads=1)
    server.start()
    try:
        server.load()
        prompts = _prompts(server.parser.tokenizer)
        answers = []
        for name in ("a", "b", "b"):
            status, text = _get(server.url, "/v1/completions", {"prompt": prompts[name], "max_tokens": 6, "temperature": 0})
            assert status == 200, text
            answers.append(json.loads(text)["choices"][0]["text"])
        seen = _samples(_get(server.url, "/metrics")[1])
        assert seen["edgekit_prefix_cache_misses_total"] == 1
        assert seen["edgekit_prefix_cache_hits_total"] == 2
        assert seen["edgekit_prefix_cache_tokens_reused_total"] == 64 + 64
        assert seen["edgekit_prefix_cache_bytes"] == server.prefix_caches[0].bytes > 0
        # the same answers as the branch without a cache (greedy)
        small = OnnxRuntimeBranch(bundle, threads=1)
        for name, answer in zip(("a", "b", "b"), answers):
            assert answer == small.tokenizer.decode(greedy_generate(small, prompts[name], 6)), name
    finally:
        server.stop(0)
