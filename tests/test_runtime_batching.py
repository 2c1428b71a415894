"""Batched decoding (edgekit.runtime.backends.batched) on the tiny Llama's two graph kinds.

One bundle (``export_onnx: onnxruntime_graph: fused``) holds the fused GroupQueryAttention
graph (the in-place shared buffer, :class:`FusedBatchCache`) and optimum's traced graph of the
same weights (the copied cache, :class:`CopiedBatchCache`). Checked: the batch layouts row by
row against a session of their own (steps of every row and of a subset, a row leaving
mid-batch, a per-row rollback, a verification alone); threads generating greedily through a
batched branch -- different prompt lengths, streams joining and leaving mid-way, one stopped
early -- get token for token what each gets alone; speculative decoding (rollback) through two
batched branches; the TensorRT batched step on a stand-in engine (the shapes and profile it
sets); ``edgekit serve`` answering concurrent requests as it answers them one by one; the
settings refused when hostile.
"""

from __future__ import annotations

import threading
import types
import warnings

import numpy as np
import pytest
from conftest import write_recipe
from pydantic import ValidationError

from edgekit import api
from edgekit.errors import EdgekitError
from edgekit.runtime.backends import OnnxRuntimeBranch, greedy_generate
from edgekit.runtime.backends.batched import BatchedBranch, batch_branches
from edgekit.runtime.backends.ort import CopiedBatchCache, FusedBatchCache
from edgekit.runtime.config import BatchingConfig, RuntimeConfig

ATOL = 1e-4
STAGES = "stages:\n  - type: load\n  - type: export_onnx\n    onnxruntime_graph: fused\n  - type: bundle\n"
KINDS = ("fused", "optimum")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("batching")
    recipe = write_recipe(tmp / "tiny.yaml", tiny_model_dir, stages=STAGES, output=tmp / "run",
                          extra="runtime:\n  max_new_tokens: 24\n")
    manifest = api.compress(recipe, quiet=True)
    return tmp / "run" / manifest["stages"][-1]["dir"] / "tiny"


@pytest.fixture(scope="module")
def branches(bundle) -> dict[str, OnnxRuntimeBranch]:
    out = {"fused": OnnxRuntimeBranch(bundle, threads=1), "optimum": OnnxRuntimeBranch(bundle, variant="float", threads=1)}
    assert (out["fused"].kv_cache, out["optimum"].kv_cache) == ("shared_buffer", "copied")
    return out


def _prompts(branch, lengths):
    text = ("The interpreter reads a module, compiles each function to bytecode and runs it in a loop over the frames "
            "of the call stack, one instruction at a time.")
    ids = branch.tokenizer(text)["input_ids"]
    assert len(ids) >= max(lengths) + 7
    return [ids[i : i + n] for i, n in enumerate(lengths)]


# --------------------------------------------------------------------------- the layouts, row by row


@pytest.mark.parametrize("kind", KINDS)
def test_batch_layout_rows_match_their_own_sessions(branches, kind, monkeypatch):
    branch = branches[kind]
    if kind == "fused":  # a tiny first buffer: the rows and the capacity both grow on the way
        monkeypatch.setattr(FusedBatchCache, "_FIRST_CAPACITY", 4)
    cache = branch.batch_cache(8)
    assert isinstance(cache, FusedBatchCache if kind == "fused" else CopiedBatchCache)
    prompts = _prompts(branch, (5, 9, 3))
    alone = [branch.session() for _ in prompts]
    worst = 0.0

    def same(got, want):
        nonlocal worst
        assert got.shape == want.shape
        worst = max(worst, float(np.abs(got - want).max()))

    for i, prompt in enumerate(prompts):  # rows 0, 1, 2: A, B, C, each prefilled alone
        assert cache.add() == i
        same(cache.feed_alone(i, prompt), alone[i].feed(prompt))
    by_row = [0, 1, 2]  # row -> stream
    tokens = {0: [11, 12, 13, 14, 15, 16], 1: [21, 22, 23, 24, 25, 26], 2: [31, 32, 33, 34, 35, 36]}

    def step(streams):
        fed = [tokens[by_row[r]].pop(0) for r in range(len(streams))]
        assert [by_row[r] for r in range(len(streams))] == streams
        got = cache.step(fed)
        for r, token in enumerate(fed):
            same(got[r : r + 1], alone[by_row[r]].feed([token]))

    step([0, 1, 2])  # every row
    cache.swap(0, 2)  # C to the front, A to the back: a step of the two first rows leaves A out
    by_row = [2, 1, 0]
    step([2, 1])
    step([2, 1])
    assert [cache.length(r) for r in range(3)] == [6, 12, 6]
    cache.remove(0)  # C leaves: the last row (A) moves into row 0
    alone[2].close()
    by_row = [0, 1]
    assert cache.rows == 2 and [cache.length(r) for r in range(2)] == [6, 12]
    step([0, 1])
    cache.truncate(1, cache.length(1) - 2)  # B rolls back 2, A does not
    alone[1].rollback(2)
    step([0, 1])
    verify = [40, 41, 42]  # A verifies three tokens alone (speculative decoding)
    same(cache.feed_alone(0, verify), alone[0].feed(verify))
    step([0, 1])
    assert [cache.length(r) for r in range(2)] == [alone[0].length, alone[1].length]
    cache.remove(1)
    cache.remove(0)
    assert cache.rows == 0
    assert worst < ATOL, worst
    cache.close()


def test_copied_layout_squeezes_holes(branches, monkeypatch):
    """A row that keeps sitting steps out gets a hole per step; past SLACK the rows are packed
    (right-aligned again) and the logits do not change."""
    branch = branches["optimum"]
    monkeypatch.setattr(CopiedBatchCache, "SLACK", 3)
    cache = branch.batch_cache(4)
    prompts = _prompts(branch, (3, 12))  # the row that sits out is the longer one: its holes widen the batch
    alone = [branch.session() for _ in prompts]
    for i, prompt in enumerate(prompts):
        cache.add()
        cache.feed_alone(i, prompt)
        alone[i].feed(prompt)
    widths = []
    for token in range(50, 58):  # row 0 alone: row 1 gets a hole every step
        np.testing.assert_allclose(cache.step([token]), alone[0].feed([token]), rtol=0, atol=ATOL)
        widths.append(cache.width)
    assert max(widths) <= 12 + 3 + 1 and widths != sorted(widths)  # packed at least once
    assert cache.mask[1].sum() == 12 and cache.lengths == [11, 12]
    np.testing.assert_allclose(cache.step([60, 61]), np.concatenate([alone[0].feed([60]), alone[1].feed([61])]),
                               rtol=0, atol=ATOL)


# --------------------------------------------------------------------------- streams on threads


def _wait_for_every_row(batched: BatchedBranch) -> None:
    """Make the batches deterministic: a step waits (up to 30 s) for every stream holding a row.
    Both bounds must go: max_wait_ms, and the cap at half the recent step time, which on a
    tiny graph is a millisecond or less -- a loaded CI machine then runs steps of one."""
    batched.max_wait_s = 30.0
    batched._wait_bound = lambda: batched.max_wait_s


def test_the_wait_for_stragglers_is_capped_at_half_a_step(branches):
    batched = BatchedBranch(branches["optimum"], max_batch=2, max_wait_ms=20)
    assert batched._wait_bound() == pytest.approx(0.020)  # no step timed yet: max_wait_ms
    batched._step_s = 0.010
    assert batched._wait_bound() == pytest.approx(0.005)  # a fast step: half of it
    batched._step_s = 0.100
    assert batched._wait_bound() == pytest.approx(0.020)  # a slow one: max_wait_ms


def _stream(session, prompt, count, out, *, stop_after=None, progress=None, gate=None, together=None):
    """Greedy decoding on ``session`` (the reference decode, greedy_generate's, step by step):
    ``stop_after`` stops early (a cancelled request), ``progress`` is set after 5 tokens,
    ``gate`` is waited for before the first feed (a stream joining mid-way), ``together`` (a
    barrier) after it: streams started together all hold their rows before any decodes, so a
    thread scheduled late on a loaded machine still meets the others in the batch."""
    if gate is not None:
        assert gate.wait(60)
    try:
        logits = session.feed(prompt)
        if together is not None:
            together.wait(60)
        while True:
            token = int(np.argmax(logits[-1]))
            out.append(token)
            if progress is not None and len(out) == 5:
                progress.set()
            if len(out) >= (stop_after or count):
                return
            logits = session.feed([token])
    finally:
        session.close()


@pytest.mark.parametrize("kind", KINDS)
def test_concurrent_greedy_streams_match_each_alone(branches, kind):
    branch = branches[kind]
    batched = BatchedBranch(branch, max_batch=4, max_wait_ms=100)
    _wait_for_every_row(batched)
    lengths = (3, 11, 6, 17, 8, 14)
    prompts = _prompts(branch, lengths)
    counts = [30, 12, 25, 30, 20, 16]  # streams leave at different steps
    expected = [greedy_generate(branch, p, n) for p, n in zip(prompts, counts)]
    stop_after = {2: 4}  # stream 2 is cancelled after 4 tokens
    outs = [[] for _ in prompts]
    started = threading.Event()
    # streams 0-3 start together; 4 and 5 join once stream 0 has 5 tokens (mid-way); the
    # 5th and 6th concurrent stream finds the 4 rows taken or not, depending on who left
    gates = [None, None, None, None, started, started]
    first_four = threading.Barrier(4)
    threads = [threading.Thread(target=_stream, args=(batched.session(), p, n, outs[i]),
                                kwargs={"stop_after": stop_after.get(i), "progress": started if i == 0 else None,
                                        "gate": gates[i], "together": first_four if i < 4 else None})
               for i, (p, n) in enumerate(zip(prompts, counts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    for i, (got, want) in enumerate(zip(outs, expected)):
        assert got == want[: stop_after.get(i, len(want))], i
    assert batched.active == 0  # every stream gave its row back
    assert max(batched.step_sizes) >= 3, batched.step_sizes  # the steps really were shared
    assert sum(batched.step_sizes.values()) < sum(len(o) for o in outs)


def test_streams_beyond_max_batch_decode_unbatched_and_late_streams_do_not_block(branches):
    """Two rows for three streams: the third decodes on a session of its own. A stream that
    pauses between tokens (a slow sampler) is left out of steps after max_wait_ms: the rows
    are reordered for those steps, and every output is still its own."""
    branch = branches["optimum"]
    batched = BatchedBranch(branch, max_batch=2, max_wait_ms=0)
    prompts = _prompts(branch, (4, 9, 6))
    sessions = [batched.session() for _ in prompts]
    first = [s.feed(p) for s, p in zip(sessions, prompts)]
    assert [s.batched for s in sessions] == [True, True, False] and batched.active == 2
    expected = [greedy_generate(branch, p, 10) for p in prompts]
    outs = [[int(np.argmax(f[-1]))] for f in first]

    def run(i, pause):
        import time

        while len(outs[i]) < 10:
            logits = sessions[i].feed([outs[i][-1]])
            outs[i].append(int(np.argmax(logits[-1])))
            if pause:
                time.sleep(0.003)  # lets the other stream step without it
        sessions[i].close()

    threads = [threading.Thread(target=run, args=(i, i == 0)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert outs == expected
    assert batched.active == 0


def test_speculative_decoding_through_batched_branches_rolls_back_per_row(bundle, branches):
    """The speculative policy drafts on one batched branch and verifies on another (several
    tokens alone, then a rollback of the row): concurrent requests give the unbatched tokens."""
    from edgekit.runtime.router import Router

    small, large = OnnxRuntimeBranch(bundle, threads=1), branches["fused"]
    prompts = _prompts(large, (5, 12, 8))
    plain = Router(small, large, "speculative", max_new_tokens=20, draft_tokens=4, draft_min_confidence=0.0)
    expected = [plain.generate(p).tokens for p in prompts]
    holder = types.SimpleNamespace(small=small, large=large)
    wrapped = batch_branches(holder, BatchingConfig(max_batch=4, max_wait_ms=5))
    assert [w.inner for w in wrapped] == [small, large]
    got = [None] * len(prompts)

    def run(i):
        router = Router(holder.small, holder.large, "speculative", max_new_tokens=20, draft_tokens=4, draft_min_confidence=0.0)
        got[i] = router.generate(prompts[i]).tokens

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == expected
    assert all(w.active == 0 for w in wrapped)


# --------------------------------------------------------------------------- TensorRT, up to its API


def _stand_in_tensorrt(reference, monkeypatch, engine_batch):
    """A TensorRT branch class whose engine is a stand-in with TensorRT's Python surface that
    runs ``reference``'s optimum graph on the CPU (tests/test_runtime_backends_trt.py), built
    for ``engine_batch["value"]`` rows (read when a branch is made); its contexts record the
    shapes of every run in ``context.steps``."""
    import sys

    import edgekit.engine.record as record
    from test_runtime_backends_trt import _CpuTensorRTBranch, _StandInContext, _StandInEngine

    class BatchContext(_StandInContext):
        def get_tensor_shape(self, name):
            batch = self.shapes["input_ids"][0]
            past, count = self.shapes["past_key_values.0.key"][2], self.shapes["input_ids"][1]
            if name == "logits":
                return (batch, count, self.engine.vocab)
            heads, dim = self.engine.cache_dims
            return (batch, heads, past + count, dim)

        def execute_async_v3(self, stream):
            self.steps.append({n: self.shapes[n] for n in ("input_ids", "attention_mask", "position_ids", "past_key_values.0.key")})
            return super().execute_async_v3(stream)

    class BatchEngine(_StandInEngine):
        def __init__(self, *args, max_batch, **kwargs):
            from edgekit.engine.settings import make_profiles, read_graph

            super().__init__(*args, **kwargs)
            self.profiles = make_profiles(read_graph(args[1]).inputs, context_length=kwargs["context_length"],
                                          max_batch=max_batch, max_prefill=kwargs["max_prefill"])

        def create_execution_context(self):
            context = BatchContext(self)
            context.steps = []
            self.contexts.append(context)
            return context

    fake_trt = types.SimpleNamespace(__version__="10.3.0", TensorIOMode=types.SimpleNamespace(INPUT="input", OUTPUT="output"),
                                     float32="float32", float16="float16", int64="int64", int32="int32")
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt)
    monkeypatch.setattr(record, "load_engine", lambda bundle_dir, target: BatchEngine(
        reference.ort_session, reference.graph, context_length=64, max_prefill=8, max_batch=engine_batch["value"]))
    return _CpuTensorRTBranch


def test_tensorrt_batched_step_on_a_stand_in_engine(branches, monkeypatch):
    """The TensorRT batched step against a stand-in engine with TensorRT's Python surface that
    runs the optimum graph (tests/test_runtime_backends_trt.py): the shapes and the profile the
    step sets, and the same greedy tokens as ONNX Runtime."""
    from edgekit.runtime.backends.trt import TensorRTBatchCache

    reference = branches["optimum"]
    engine_batch = {"value": 4}
    _CpuTensorRTBranch = _stand_in_tensorrt(reference, monkeypatch, engine_batch)
    trt_branch = _CpuTensorRTBranch(reference.bundle_dir, context_length=64)
    assert trt_branch.batch_rows() == 4
    batched = BatchedBranch(trt_branch, max_batch=8, max_wait_ms=100)
    assert isinstance(batched.cache, TensorRTBatchCache) and batched.max_batch == 4  # capped at the engine's batch
    _wait_for_every_row(batched)
    prompts = _prompts(reference, (3, 10, 6))
    expected = [greedy_generate(reference, p, 12) for p in prompts]
    outs = [[] for _ in prompts]
    together = threading.Barrier(len(prompts))
    threads = [threading.Thread(target=_stream, args=(batched.session(), p, 12, outs[i]), kwargs={"together": together})
               for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert outs == expected
    steps = [s for s in trt_branch.context.steps if s["input_ids"][0] > 1]
    assert steps and max(s["input_ids"][0] for s in steps) == 3
    for s in steps:  # rows x one token, the mask one wider than the padded past, a position per row
        batch, width = s["input_ids"][0], s["past_key_values.0.key"][2]
        assert s["input_ids"] == (batch, 1) and s["position_ids"] == (batch, 1) and s["attention_mask"] == (batch, width + 1)
    assert trt_branch.context.active_optimization_profile == 1  # the decode profile
    # an engine built for batch 1 cannot batch: serve leaves that branch unbatched, with a warning
    engine_batch["value"] = 1
    single = _CpuTensorRTBranch(reference.bundle_dir, context_length=64)
    with pytest.raises(EdgekitError, match="one stream per forward pass"):
        BatchedBranch(single, max_batch=4)
    holder = types.SimpleNamespace(small=single, large=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert batch_branches(holder, BatchingConfig(max_batch=4)) == []
    assert holder.small is single and "decodes unbatched" in str(caught[0].message)


# --------------------------------------------------------------------------- prompt-prefix reuse in the batch

BLOCK = 16
SYSTEM = ("You are a careful assistant for the Python standard library. Answer with short, exact sentences, "
          "quote the documentation where it helps, and say when something is not documented. ")


def _shared_prompts(branch, lengths):
    """A 32-token system prompt (two blocks of BLOCK) followed by different tails."""
    head = branch.tokenizer(SYSTEM * 2)["input_ids"]
    assert len(head) >= 2 * BLOCK
    return head[: 2 * BLOCK], [head[: 2 * BLOCK] + tail for tail in _prompts(branch, lengths)]


def _prefix_cache(branch):
    from edgekit.runtime.prefix_cache import PrefixCache

    branch.prefix_cache = PrefixCache(max_bytes=64 << 20, block_tokens=BLOCK, min_tokens=BLOCK)
    return branch.prefix_cache


@pytest.mark.parametrize("kind", KINDS)
def test_rows_restored_from_snapshots_match_their_own_sessions(branches, kind, monkeypatch):
    """Snapshots of a row (left-padded and with a hole in the copied layout) equal a session's
    own; rows restored from them and prefilled with the rest give the session's logits, and
    steps, swaps, a leave and a rollback afterwards keep every row exact."""
    branch = branches[kind]
    if kind == "fused":  # a tiny first buffer: the restore has to grow it
        monkeypatch.setattr(FusedBatchCache, "_FIRST_CAPACITY", 4)
    cache = branch.batch_cache(4)
    head, (a, b) = _shared_prompts(branch, (5, 9))
    other = head[3:] + _prompts(branch, (14,))[0]  # row 0: longer than a, so a's row is left-padded
    worst = 0.0

    def same(got, want):
        nonlocal worst
        assert got.shape == want.shape
        worst = max(worst, float(np.abs(got - want).max()))

    alone = {name: branch.session() for name in ("other", "a", "b", "exact")}
    cache.add(), cache.add()
    same(cache.feed_alone(0, other), alone["other"].feed(other))
    same(cache.feed_alone(1, a), alone["a"].feed(a))
    streams = {0: "other", 1: "a"}  # row -> stream

    def step(tokens):
        got = cache.step(tokens)
        for row, token in enumerate(tokens):
            same(got[row : row + 1], alone[streams[row]].feed([token]))

    step([11, 21])
    step([12])  # a sits this step out: a hole after its entries in the copied layout
    step([13, 22])
    if kind == "optimum":
        assert cache.mask[1, 0] == 0 and 0 in cache.mask[1, -3:]  # padding before a's entries, a hole among them
    blocks = [cache.snapshot(1, 0, BLOCK), cache.snapshot(1, BLOCK, 2 * BLOCK)]
    for block, (start, stop) in zip(blocks, ((0, BLOCK), (BLOCK, 2 * BLOCK))):
        want = alone["a"].kv_snapshot(start, stop)
        assert set(block) == set(want)
        for name, value in block.items():
            assert value.shape == want[name].shape and not np.shares_memory(value, cache.cache[name] if kind == "optimum"
                                                                              else cache._arrays[name])
            np.testing.assert_allclose(value, want[name], rtol=0, atol=ATOL)
    # b restores the whole head and prefills its tail; "exact" is the head itself: all but its last token
    assert cache.add() == 2 and cache.add() == 3
    cache.restore(2, blocks, 2 * BLOCK)
    same(cache.feed_alone(2, b[2 * BLOCK :]), alone["b"].feed(b)[2 * BLOCK :])
    cache.restore(3, blocks, 2 * BLOCK - 1)
    same(cache.feed_alone(3, head[-1:]), alone["exact"].feed(head)[-1:])
    streams.update({2: "b", 3: "exact"})
    assert [cache.length(r) for r in range(4)] == [alone[streams[r]].length for r in range(4)]
    step([14, 23, 31, 41])
    cache.swap(1, 3)  # a restored row and a prefilled one change places
    streams[1], streams[3] = streams[3], streams[1]
    step([15, 42, 32])  # the last row (a) sits out
    cache.remove(2)  # b leaves: a (last) moves into its row
    alone["b"].close()
    streams = {0: "other", 1: "exact", 2: "a"}
    step([16, 43, 24])
    cache.truncate(1, cache.length(1) - 3)  # the restored row rolls back past its own tokens, into the prefix
    alone["exact"].rollback(3)
    step([17, 44, 25])
    assert [cache.length(r) for r in range(3)] == [alone[streams[r]].length for r in range(3)]
    assert worst < ATOL, worst
    cache.close()


def _greedy_threads(sessions, prompts, counts):
    """Greedy streams on threads started together, decoding once every first feed is done;
    returns (tokens, tokens reused by the first feed, whether the stream held a row) per stream."""
    outs, reused, in_row = [[] for _ in prompts], [None] * len(prompts), [None] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def run(i):
        session = sessions[i]
        barrier.wait(30)
        try:
            logits = session.feed(prompts[i])
            reused[i], in_row[i] = session.reused, getattr(session, "batched", None)
            barrier.wait(30)  # every stream has its row (or not) before any leaves
            while True:
                outs[i].append(int(np.argmax(logits[-1])))
                if len(outs[i]) >= counts[i]:
                    return
                logits = session.feed([outs[i][-1]])
        finally:
            session.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    return outs, reused, in_row


@pytest.mark.parametrize("kind", KINDS)
def test_concurrent_streams_sharing_a_system_prompt_restore_it_into_their_rows(branches, kind):
    """A stream stores the system prompt from its row; five concurrent streams then reuse it --
    three restored into rows, two (no row free) into sessions of their own -- and decode token
    for token what they decode without a cache, leaving at different steps."""
    branch = branches[kind]
    head, prompts = _shared_prompts(branch, (5, 9, 3, 12, 7, 4))
    counts = [10, 16, 6, 12, 16, 9]
    branch.prefix_cache = None
    expected = [greedy_generate(branch, p, n) for p, n in zip(prompts, counts)]
    cache = _prefix_cache(branch)
    try:
        batched = BatchedBranch(branch, max_batch=3, max_wait_ms=100)
        _wait_for_every_row(batched)
        first = batched.session()
        logits = first.feed(prompts[0])
        assert first.batched and first.reused == 0 and cache.contains(head)  # stored from the row
        out = [int(np.argmax(logits[-1]))]
        while len(out) < counts[0]:
            out.append(int(np.argmax(first.feed([out[-1]])[-1])))
        first.close()
        assert out == expected[0]
        outs, reused, in_row = _greedy_threads([batched.session() for _ in prompts[1:]], prompts[1:], counts[1:])
        assert outs == expected[1:]
        assert reused == [2 * BLOCK] * 5 and sorted(in_row) == [False, False, True, True, True]
        stats = cache.stats()
        assert (stats["hits"], stats["misses"], stats["tokens_reused"]) == (5, 1, 5 * 2 * BLOCK)
        assert batched.active == 0 and max(batched.step_sizes) == 3
        # rows all taken (by prompts too short to look up): an unbatched stream looks up once
        holders = [batched.session() for _ in range(3)]
        for holder in holders:
            holder.feed(prompts[0][-3:])
        novel = _prompts(branch, (3,))[0] + head  # not a cached prefix: a miss, then stored
        solo = batched.session()
        logits = solo.feed(novel)
        assert not solo.batched and solo.reused == 0 and logits.shape[0] == len(novel)
        assert (cache.stats()["hits"], cache.stats()["misses"]) == (5, 2) and cache.contains(novel[: 2 * BLOCK])
        branch.prefix_cache = None
        assert int(np.argmax(logits[-1])) == greedy_generate(branch, novel, 1)[0]
        for session in holders + [solo]:
            session.close()
    finally:
        branch.prefix_cache = None


def test_tensorrt_batch_cache_restores_prefixes_on_a_stand_in_engine(branches, monkeypatch):
    """The same against TensorRTBatchCache's torch buffers (the stand-in engine on the CPU): rows
    store and restore the system prompt, the rest prefills as decode steps (the prefill profile
    takes an empty past only), and the tokens are ONNX Runtime's without a cache."""
    reference = branches["optimum"]
    trt_branch = _stand_in_tensorrt(reference, monkeypatch, {"value": 4})(reference.bundle_dir, context_length=64)
    head, prompts = _shared_prompts(reference, (5, 9, 3, 7))
    counts = [8, 12, 6, 10]
    expected = [greedy_generate(reference, p, n) for p, n in zip(prompts, counts)]
    cache = _prefix_cache(trt_branch)
    batched = BatchedBranch(trt_branch, max_batch=4, max_wait_ms=100)
    _wait_for_every_row(batched)
    warm, _, _ = _greedy_threads([batched.session()], prompts[:1], counts[:1])
    outs, reused, in_row = _greedy_threads([batched.session() for _ in prompts[1:]], prompts[1:], counts[1:])
    assert warm + outs == expected
    assert reused == [2 * BLOCK] * 3 and in_row == [True] * 3
    assert (cache.stats()["hits"], cache.stats()["misses"]) == (3, 1)
    steps = [s for s in trt_branch.context.steps if s["input_ids"][0] > 1]
    assert steps and max(s["input_ids"][0] for s in steps) == 3


# --------------------------------------------------------------------------- edgekit serve


def test_serve_concurrent_requests_answer_as_sequential_ones(bundle):
    import json

    from test_serve import call

    from edgekit.runtime.bundle import resolve_config
    from edgekit.serve.server import EdgekitServer, ServeOptions

    config = resolve_config(bundle).model_copy(update={"batching": BatchingConfig(max_batch=4, max_wait_ms=50)})
    server = EdgekitServer(bundle, ServeOptions(port=0, access_log=False, max_concurrency=4), config=config, threads=1)
    server.start()
    try:
        server.load()
        prompts = ["A for statement iterates over", "The interpreter reads a module", "Each function", "Exceptions are"]

        def ask(prompt):
            status, _, body = call(server.url, "POST", "/v1/completions",
                                   {"prompt": prompt, "max_tokens": 48, "temperature": 0})
            assert status == 200, body
            return body["choices"][0]["text"]

        sequential = [ask(p) for p in prompts]
        concurrent = [None] * len(prompts)
        barrier = threading.Barrier(len(prompts))

        def client(i):
            barrier.wait(30)
            concurrent[i] = ask(prompts[i])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert concurrent == sequential
        _, _, metrics = call(server.url, "GET", "/metrics")
        lines = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines()
                 if line.startswith("edgekit_batch_size")}
        steps = lines['edgekit_batch_size_count{branch="small"}']
        single = lines['edgekit_batch_size_bucket{branch="small",le="1.0"}']
        assert steps > 0 and single < steps, json.dumps(lines)  # some steps decoded several streams
    finally:
        server.stop(0)


def test_serve_with_one_slot_or_batching_off_does_not_wrap(bundle):
    from edgekit.runtime.bundle import open_router, resolve_config

    config = resolve_config(bundle)
    router = open_router(bundle, config, threads=1)
    assert batch_branches(router, BatchingConfig(max_batch=1)) == [] and not isinstance(router.small, BatchedBranch)
    wrapped = batch_branches(router, config.batching)
    assert len(wrapped) == 1 and router.small is wrapped[0] and wrapped[0].max_batch == 8
    assert batch_branches(router, config.batching) == []  # already wrapped: not twice


# --------------------------------------------------------------------------- hostile settings


@pytest.mark.parametrize("batching, message", [
    ({"max_batch": 0}, "greater than or equal to 1"),
    ({"max_batch": 65}, "less than or equal to 64"),
    ({"max_batch": 2.5}, "integer"),
    ({"max_wait_ms": -1}, "greater than or equal to 0"),
    ({"max_wait_ms": 1e9}, "less than or equal to 100"),
    ({"max_wait_ms": float("nan")}, "finite"),
    ({"max_rows": 4}, "Extra inputs"),
])
def test_hostile_batching_settings_are_refused(batching, message):
    with pytest.raises(ValidationError, match=message):
        RuntimeConfig.model_validate({"batching": batching})


def test_batched_branch_refuses_bad_arguments_and_remote_branches(branches):
    for bad in (1, 65, True, "4", None):
        with pytest.raises(EdgekitError, match="max_batch must be"):
            BatchedBranch(branches["fused"], max_batch=bad)
    for bad in (-0.1, 101, float("nan"), "2"):
        with pytest.raises(EdgekitError, match="max_wait_ms must be"):
            BatchedBranch(branches["fused"], max_wait_ms=bad)
    remote = types.SimpleNamespace(name="large", backend="remote", has_logits=False)
    with pytest.raises(EdgekitError, match="cannot batch"):
        BatchedBranch(remote)
    holder = types.SimpleNamespace(small=branches["fused"], large=remote)
    wrapped = batch_branches(holder, BatchingConfig(max_batch=2))
    assert holder.large is remote and [w.inner for w in wrapped] == [branches["fused"]]
    session = wrapped[0].session()
    with pytest.raises(EdgekitError, match="exceed the context length"):
        session.feed([1] * (wrapped[0].context_length + 1))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        session.feed([wrapped[0].vocab_size])
    assert wrapped[0].active == 0  # a refused feed never took a row
    session.close()
