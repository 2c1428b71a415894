"""The ONNX Runtime branch on a real tiny bundle (edgekit.runtime.backends.ort), greedy decoding
against transformers, and the graph read without onnx that picks its KV cache layout.

The property every test of a local session comes back to: feeding tokens all at once, one by
one, or k at a time after a prefix gives the same logits, and a rollback really forgets.
Speculative decoding is correct only if that holds.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from backend_fixtures import ATOL, TEXT, branch, bundle, fresh_rows, prompt  # noqa: F401 (fixtures)

from edgekit.errors import EdgekitError
from edgekit.runtime.backends import OnnxRuntimeBranch, greedy_generate


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


# --- the graph read without onnx -----------------------------------------------------------


def test_graph_nodes_read_from_the_protobuf_equal_onnx(bundle, tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgekit.runtime.backends.ort import appends_in_place
    from edgekit.runtime.onnx_graph import MalformedGraph, graph_nodes, read_graph_nodes

    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    assert read_graph_nodes(bundle / "model.onnx") == [(n.op_type, list(n.output)) for n in model.graph.node]
    assert appends_in_place(bundle / "model.onnx", ["present.0.key"]) is False  # optimum's graph: copied cache
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
    assert appends_in_place(fused, ["present.0.key", "present.0.value"]) is True
    assert appends_in_place(fused, ["present.0.key", "present.1.key"]) is False
    data = fused.read_bytes()
    for broken in (data[: len(data) // 2], b"\xff" * 16, b"\x3a\xff\xff\xff\xff\x0f"):
        with pytest.raises(MalformedGraph):
            graph_nodes(broken)
        (tmp_path / "broken.onnx").write_bytes(broken)
        assert appends_in_place(tmp_path / "broken.onnx", ["present.0.key"]) is False
