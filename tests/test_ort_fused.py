"""The fused ONNX Runtime decoder (edgekit.export.ort_fused) on the tiny Llama, float and RTN INT4.

Both are built by the pipeline with ``export_onnx: onnxruntime_graph: fused``, so the bundle
holds the fused graph (variant ``onnxruntime``, what OnnxRuntimeBranch runs) next to a traced
optimum graph of the same weights (``float``, or the ``tensorrt`` Q/DQ graph). Every check
drives the graphs through the runtime's own sessions -- prefill, single-token decode, a
k-token verify after a prefix, a rollback -- and compares each logits row with PyTorch run on
the whole sequence (for the quantized model: edgekit's dequantizing loader), and with the
optimum graph.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write_recipe

from edgekit import api
from edgekit.errors import StageError
from edgekit.runtime.backends import OnnxRuntimeBranch, greedy_generate

TEXT = "The interpreter reads a module, compiles each function to bytecode and runs it in a loop over the frames."
ATOL = 1e-4

FLOAT_STAGES = """\
stages:
  - type: load
  - type: export_onnx
    onnxruntime_graph: fused
  - type: evaluate
  - type: bundle
"""
# tensorrt_dtype float32: the traced graph is the exact reference the fused one is compared
# with at ATOL (a half-precision traced graph differs from it by fp16 rounding).
QUANT_STAGES = """\
stages:
  - type: load
  - type: quantize
    method: rtn
    bits: 4
    group_size: 32
    symmetric: true
    quantize_lm_head: true
  - type: export_onnx
    format: both
    onnxruntime_graph: fused
    tensorrt_dtype: float32
  - type: evaluate
  - type: bundle
"""

# The same checkpoint (RTN is deterministic), ONNX Runtime only: no traced graph is written.
ORT_ONLY_STAGES = QUANT_STAGES.replace("format: both", "format: onnxruntime").replace("  - type: evaluate\n", "")
# The default recipe's shape: a float lm_head, the fused graph, and the speculative draft graph.
DRAFT_STAGES = QUANT_STAGES.replace("    quantize_lm_head: true\n", "").replace(
    "onnxruntime_graph: fused\n", "onnxruntime_graph: fused\n    draft_graph: true\n")
# A float lm_head quantized by the export itself (8-bit): the parity reference must follow.
LM8_STAGES = ORT_ONLY_STAGES.replace("    quantize_lm_head: true\n", "").replace(
    "onnxruntime_graph: fused\n", "onnxruntime_graph: fused\n    fused_lm_head_bits: 8\n")


class Run:
    def __init__(self, manifest: dict, out: Path):
        self.stages = {s["name"]: s for s in manifest["stages"]}
        self.out = out
        self.bundle = out / self.stages["bundle"]["dir"] / "tiny"
        self.export_dir = out / self.stages["export_onnx"]["dir"]
        self.record = json.loads((self.export_dir / "export.json").read_text())

    def checkpoint(self) -> Path:
        last = "quantize" if "quantize" in self.stages else "load"
        return self.out / self.stages[last]["dir"]


def _run(tmp_path_factory, tiny_model_dir, name: str, stages: str) -> Run:
    tmp = tmp_path_factory.mktemp(name)
    recipe = write_recipe(tmp / f"{name}.yaml", tiny_model_dir, stages=stages, output=tmp / "run")
    return Run(api.compress(recipe, quiet=True), tmp / "run")


@pytest.fixture(scope="module")
def float_run(tmp_path_factory, tiny_model_dir) -> Run:
    return _run(tmp_path_factory, tiny_model_dir, "float", FLOAT_STAGES)


@pytest.fixture(scope="module")
def quant_run(tmp_path_factory, tiny_model_dir) -> Run:
    return _run(tmp_path_factory, tiny_model_dir, "quant", QUANT_STAGES)


def _reference(run: Run):
    from edgekit.weights.checkpoint import load_checkpoint

    model, _ = load_checkpoint(run.checkpoint(), dtype="float32")
    return model


def _torch_rows(model, tokens: list[int], count: int) -> np.ndarray:
    """PyTorch logits of the last ``count`` positions, the whole sequence in one pass (no cache)."""
    import torch

    with torch.inference_mode():
        return model(input_ids=torch.tensor([tokens])).logits[0, -count:].float().numpy()


def _scenario(branches: dict[str, OnnxRuntimeBranch], model, prompt: list[int]) -> dict[str, float]:
    """Prefill, 3 single-token steps, a 4-token verify, rollback 2, a 3-token feed: the worst
    |logits - PyTorch| per branch and between the branches, over every row of every step."""
    sessions = {name: branch.session() for name, branch in branches.items()}
    tokens: list[int] = []
    worst: dict[str, float] = collections.defaultdict(float)

    def feed(new: list[int]) -> None:
        tokens.extend(new)
        expected = _torch_rows(model, tokens, len(new))
        rows = {name: session.feed(new) for name, session in sessions.items()}
        for name, got in rows.items():
            assert got.shape == expected.shape and got.dtype == np.float32
            worst[name] = max(worst[name], float(np.abs(got - expected).max()))
        first, *others = rows
        for other in others:
            worst[f"{first}-{other}"] = max(worst[f"{first}-{other}"], float(np.abs(rows[first] - rows[other]).max()))

    feed(prompt)
    for token in (7, 42, 99):
        feed([token])
    feed([5, 17, 250, 3])
    for session in sessions.values():
        session.rollback(2)
        assert session.length == len(tokens) - 2
    del tokens[-2:]
    feed([64, 120, 8])
    for session in sessions.values():
        session.close()
    return dict(worst)


def _ops(path: Path) -> collections.Counter:
    import onnx

    return collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def _io(path: Path) -> dict[str, list]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph

    def dims(v):  # fixed dims as ints, symbolic ones as "?"
        return [d.dim_value if d.HasField("dim_value") else "?" for d in v.type.tensor_type.shape.dim]

    return {v.name: [v.type.tensor_type.elem_type, dims(v)] for v in list(graph.input) + list(graph.output)}


# --- float ------------------------------------------------------------------------------------


def test_float_bundle_has_the_fused_graph_with_optimum_io(float_run):
    record = float_run.record
    assert record["variants"] == {"float": "model.onnx", "onnxruntime": "onnxruntime/model.onnx"}
    assert record["primary"] == "float" and record["onnxruntime_graph"] == "fused"
    fused, traced = float_run.bundle / "onnxruntime" / "model.onnx", float_run.bundle / "model.onnx"
    ops = _ops(fused)
    assert ops["GroupQueryAttention"] == 2 and ops["SkipSimplifiedLayerNormalization"] == 2 * 2
    # q/k/v and gate/up fused: 4 MatMuls per layer, + the lm_head on the embedding's (load-time folded) Transpose
    assert ops["MatMul"] == 2 * 4 + 1 and ops["Transpose"] == 1 and not {"Softmax", "Where", "Expand", "Concat"} & set(ops)
    assert sum(ops.values()) * 2 < sum(_ops(traced).values()) / 4  # far fewer kernels per step than optimum's trace
    assert _io(fused) == _io(traced)  # names, types, fixed dims: what OnnxRuntimeBranch relies on
    # the stage's own parity check ran on the fused graph, cache outputs included
    parity = record["parity"]["onnxruntime"]
    assert parity["logits_max_abs_diff"] < ATOL and parity["present_max_abs_diff"] < ATOL and parity["greedy_agreement"] == 1.0
    manifest = json.loads((float_run.bundle / "manifest.json").read_text())
    assert manifest["onnx"]["variants"]["onnxruntime"] == "onnxruntime/model.onnx"


def test_float_prefill_decode_verify_rollback_match_pytorch_and_optimum(float_run, monkeypatch):
    from edgekit.runtime.backends.ort import SharedBufferSession

    # a tiny first buffer: the 12-token prefill and the later feeds each grow the cache
    monkeypatch.setattr(SharedBufferSession, "_FIRST_CAPACITY", 4)
    fused = OnnxRuntimeBranch(float_run.bundle, threads=1)
    traced = OnnxRuntimeBranch(float_run.bundle, variant="float", threads=1)
    copying = OnnxRuntimeBranch(float_run.bundle, threads=1)
    copying.kv_cache = "copied"  # the same fused graph, its cache moved through every run
    assert fused.graph.parent.name == "onnxruntime" and traced.graph.parent == float_run.bundle
    assert (fused.kv_cache, traced.kv_cache) == ("shared_buffer", "copied")
    assert isinstance(fused.session(), SharedBufferSession)
    prompt = fused.tokenizer(TEXT)["input_ids"][:12]
    worst = _scenario({"fused": fused, "optimum": traced, "copying": copying}, _reference(float_run), prompt)
    assert worst["fused"] < ATOL and worst["optimum"] < ATOL and worst["fused-optimum"] < ATOL, worst
    assert worst["fused-copying"] == 0.0, worst  # in place or copied: the same kernel, the same numbers


def test_float_greedy_is_token_identical(float_run):
    import torch

    fused = OnnxRuntimeBranch(float_run.bundle, threads=1)
    traced = OnnxRuntimeBranch(float_run.bundle, variant="float", threads=1)
    prompt = fused.tokenizer(TEXT)["input_ids"][:16]
    tokens = greedy_generate(fused, prompt, 32)
    assert len(tokens) == 32 and tokens == greedy_generate(traced, prompt, 32)
    model = _reference(float_run)
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert tokens == out[0, len(prompt):].tolist()


def test_float_perplexity_of_the_fused_graph(float_run):
    metrics = float_run.stages["evaluate"]["metrics"]  # evaluate scored every ONNX variant
    assert metrics["graph"] == "float"
    assert metrics["perplexity_onnxruntime"] == pytest.approx(metrics["perplexity"], rel=1e-5)


# --- quantized ---------------------------------------------------------------------------------


def test_quantized_fused_graph_reads_our_codes(quant_run):
    record = quant_run.record
    assert record["variants"] == {"onnxruntime": "model.onnx", "tensorrt": "tensorrt/model.onnx"}
    report = record["rewrites"]["onnxruntime"]
    assert report["format"] == "ort-fused" and report["linears"] == {"MatMulNBits 4-bit group 32 symmetric": 2 * 7}
    assert report["lm_head"] == "MatMulNBits 4-bit group 32 symmetric"  # the checkpoint's own lm_head codes
    ops = _ops(quant_run.export_dir / "model.onnx")
    assert ops["MatMulNBits"] == 2 * 4 + 1 and ops["GroupQueryAttention"] == 2 and "MatMul" not in ops
    assert record["parity"]["onnxruntime"]["logits_max_abs_diff"] < ATOL
    # the traced graphs' side files are there although no optimum graph was written for ORT
    assert (quant_run.export_dir / "tokenizer.json").is_file()
    assert "quantization_config" not in json.loads((quant_run.export_dir / "config.json").read_text())


def test_quantized_prefill_decode_verify_rollback_match_dequantized_pytorch(quant_run):
    fused = OnnxRuntimeBranch(quant_run.bundle, threads=1)
    traced = OnnxRuntimeBranch(quant_run.bundle, variant="tensorrt", threads=1)  # optimum trace + Q/DQ weights
    prompt = fused.tokenizer(TEXT)["input_ids"][:12]
    worst = _scenario({"fused": fused, "optimum": traced}, _reference(quant_run), prompt)
    assert worst["fused"] < ATOL and worst["fused-optimum"] < ATOL, worst


def test_quantized_greedy_and_perplexity(quant_run):
    fused = OnnxRuntimeBranch(quant_run.bundle, threads=1)
    traced = OnnxRuntimeBranch(quant_run.bundle, variant="tensorrt", threads=1)
    prompt = fused.tokenizer(TEXT)["input_ids"][:16]
    assert greedy_generate(fused, prompt, 32) == greedy_generate(traced, prompt, 32)
    metrics = quant_run.stages["evaluate"]["metrics"]
    assert metrics["graph"] == "onnxruntime"
    assert metrics["perplexity"] == pytest.approx(metrics["perplexity_tensorrt"], rel=1e-4)


def test_asymmetric_and_8bit_codes_with_zero_points(tiny_model_dir, tmp_path):
    """Zero points (asymmetric grids) and the 8-bit container, from in-memory QuantLinears."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgekit.measure.onnx_session import DecoderSession
    from edgekit.export.ort_fused import build_fused_decoder
    from edgekit.weights.grid import rtn_quantize
    from edgekit.weights.loader import QuantLinear

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for index, layer in enumerate(model.model.layers):
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    qw = rtn_quantize(child.weight.data, bits=8 if index else 4, group_size=32, symmetric=False)
                    setattr(parent, name, QuantLinear.from_quantized(qw))
    report = build_fused_decoder(model, tmp_path)
    assert report["linears"] == {"MatMulNBits 4-bit group 32": 7, "MatMulNBits 8-bit group 32": 7}
    ids = np.array([[5, 17, 42, 99, 3, 250, 7, 8, 120, 64]])
    session = DecoderSession(tmp_path / "model.onnx")
    logits, past = session.forward(ids)
    step, _ = session.forward(np.array([[11, 12]]), past)
    reference = _torch_rows(model, ids[0].tolist() + [11, 12], 12)
    assert np.abs(np.concatenate([logits[0], step[0]]) - reference).max() < ATOL


def test_onnxruntime_only_export_skips_optimum(quant_run, tmp_path_factory, tiny_model_dir):
    run = _run(tmp_path_factory, tiny_model_dir, "ortonly", ORT_ONLY_STAGES)
    assert run.record["variants"] == {"onnxruntime": "model.onnx"} and "tensorrt" not in run.record["rewrites"]
    assert sorted(p.name for p in run.export_dir.glob("model.onnx*")) == ["model.onnx", "model.onnx_data"]
    assert not list(run.export_dir.glob(".float-*"))  # no twin checkpoint, no optimum staging left behind
    # the side files optimum would have written: configs of the float twin, tokenizer
    config = json.loads((run.export_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 2
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (run.export_dir / name).is_file() and (run.bundle / name).is_file()
    # the same graph as the one exported next to a traced graph
    assert (run.export_dir / "model.onnx_data").read_bytes() == (quant_run.export_dir / "model.onnx_data").read_bytes()
    branch = OnnxRuntimeBranch(run.bundle, threads=1)
    prompt = branch.tokenizer(TEXT)["input_ids"][:16]
    assert greedy_generate(branch, prompt, 16) == greedy_generate(OnnxRuntimeBranch(quant_run.bundle, threads=1), prompt, 16)


def test_stage_checks_an_8bit_lm_head_against_its_own_reference(tmp_path_factory, tiny_model_dir):
    import torch

    from edgekit.export.ort_fused import lm_head_reference

    run = _run(tmp_path_factory, tiny_model_dir, "lm8", LM8_STAGES)
    report = run.record["rewrites"]["onnxruntime"]
    assert report["lm_head"] == "MatMulNBits 8-bit group 32 symmetric (round-to-nearest)"
    assert report["linears"] == {"MatMulNBits 4-bit group 32 symmetric": 2 * 7}
    # against the float lm_head the logits would differ by ~3e-3: the stage compared with the 8-bit one
    assert run.record["parity"]["onnxruntime"]["logits_max_abs_diff"] < ATOL
    branch = OnnxRuntimeBranch(run.bundle, threads=1)
    prompt = branch.tokenizer(TEXT)["input_ids"][:16]
    model = _reference(run)
    with torch.inference_mode(), lm_head_reference(model, 8, 32):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert greedy_generate(branch, prompt, 24) == out[0, len(prompt):].tolist()


def test_lm_head_bits_on_a_checkpoint_that_quantized_it_is_refused(quant_run, tmp_path):
    from edgekit.export.ort_fused import build_fused_decoder

    with pytest.raises(StageError, match="already quantized"):
        build_fused_decoder(quant_run.checkpoint(), tmp_path, lm_head_bits=8)
    assert not (tmp_path / "model.onnx").exists()


# --- options and refusals ----------------------------------------------------------------------


def test_lm_head_bits_matches_its_reference_and_restores_the_model(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from edgekit.measure.onnx_session import DecoderSession
    from edgekit.export.ort_fused import build_fused_decoder, lm_head_reference

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = np.array([[5, 17, 42, 99, 3, 250, 7, 8, 120, 64]])
    with torch.inference_mode():
        float_logits = model(torch.from_numpy(ids)).logits.numpy()
    for bits in (8, 4):
        report = build_fused_decoder(model, tmp_path / str(bits), lm_head_bits=bits, lm_head_group_size=32, fuse_qkv=False)
        assert report["lm_head"].startswith(f"MatMulNBits {bits}-bit group 32") and report["ops"]["MatMulNBits"] == 1
        assert report["ops"]["MatMul"] == 2 * 6  # q, k, v unfused; o; gate/up fused; down
        logits, _ = DecoderSession(tmp_path / str(bits) / "model.onnx").forward(ids)
        with torch.inference_mode(), lm_head_reference(model, bits, 32):
            reference = model(torch.from_numpy(ids)).logits.numpy()
        assert np.abs(logits - reference).max() < ATOL
        assert np.abs(logits - float_logits).max() > 10 * ATOL  # it really is another lm_head
        with torch.inference_mode():
            assert np.array_equal(model(torch.from_numpy(ids)).logits.numpy(), float_logits)  # restored
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied


def test_the_rotary_cache_bounds_the_sequence(tiny_model_dir, tmp_path):
    from edgekit.measure.onnx_session import DecoderSession
    from edgekit.export.ort_fused import build_fused_decoder

    build_fused_decoder(tiny_model_dir, tmp_path, max_length=16)
    session = DecoderSession(tmp_path / "model.onnx")
    _, past = session.forward(np.arange(10, 26)[None])  # 16 positions: fits
    with pytest.raises(Exception, match="cos_cache"):  # ONNX Runtime refuses a 17th, never reads past the cache
        session.forward(np.array([[5]]), past)


def test_unsupported_models_are_refused(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config

    from edgekit.export.ort_fused import build_fused_decoder

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1)
    qwen = AutoModelForCausalLM.from_config(Qwen2Config(**small))
    with pytest.raises(StageError, match="Llama-family"):
        build_fused_decoder(qwen, tmp_path)
    dynamic = LlamaForCausalLM(LlamaConfig(**small, rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    with pytest.raises(StageError, match="dynamic"):
        build_fused_decoder(dynamic, tmp_path)
    with pytest.raises(StageError, match="lm_head_bits"):
        build_fused_decoder(tiny_model_dir, tmp_path, lm_head_bits=3)
    with pytest.raises(StageError, match="config.json is missing"):
        build_fused_decoder(tmp_path / "nowhere", tmp_path)
    assert not list(tmp_path.glob("model.onnx*"))
    del torch


def test_recipe_options_are_validated(tiny_model_dir, tmp_path):
    from edgekit.errors import RecipeError

    bad = "stages:\n  - type: load\n  - type: export_onnx\n    fused_lm_head_bits: 8\n"
    recipe = write_recipe(tmp_path / "bad.yaml", tiny_model_dir, stages=bad, output=tmp_path / "run")
    with pytest.raises(RecipeError, match="fused_lm_head_bits needs onnxruntime_graph: fused"):
        api.validate_recipe(recipe)


def test_draft_graph_is_a_checked_variant_that_speculative_drafts_with(float_run, tmp_path_factory, tiny_model_dir):
    """export_onnx draft_graph: an int8-activation + 8-bit-lm_head copy of the fused graph,
    parity-checked against its own reference and scored by evaluate; the runtime drafts with it
    under the speculative policy only, and the output stays the large branch's."""
    from edgekit.runtime.bundle import open_router, resolve_config

    run = _run(tmp_path_factory, tiny_model_dir, "draft", DRAFT_STAGES)
    assert run.record["variants"] == {"onnxruntime": "model.onnx", "tensorrt": "tensorrt/model.onnx",
                                      "onnxruntime_draft": "onnxruntime-draft/model.onnx"}
    draft = run.record["rewrites"]["onnxruntime_draft"]
    assert draft["accuracy_level"] == 4 and draft["lm_head"] == "MatMulNBits 8-bit group 32 symmetric (round-to-nearest)"
    parity = run.record["parity"]["onnxruntime_draft"]
    assert parity["tolerance"] == 3.0 and 0 < parity["logits_max_abs_diff"] < 3.0
    assert run.record["parity"]["onnxruntime"]["logits_max_abs_diff"] < ATOL  # the main graph stays exact
    metrics = run.stages["evaluate"]["metrics"]
    assert metrics["perplexity_onnxruntime_draft"] == pytest.approx(metrics["perplexity"], rel=0.05)
    assert (run.bundle / "onnxruntime-draft" / "model.onnx").is_file()

    large = str(float_run.bundle)
    spec = open_router(run.bundle, resolve_config(run.bundle, policy="speculative", large=large, max_new_tokens=24))
    assert spec.small.graph == run.bundle / "onnxruntime-draft" / "model.onnx"
    off = open_router(run.bundle, resolve_config(run.bundle, policy="speculative", large=large, draft_graph="off"))
    assert off.small.graph == run.bundle / "model.onnx"
    assert open_router(run.bundle, resolve_config(run.bundle, policy="cascade", large=large)).small.graph == run.bundle / "model.onnx"
    alone = open_router(run.bundle, resolve_config(run.bundle, policy="large_only", large=large, max_new_tokens=24))
    for prompt in (TEXT, "A loop over the frames"):
        result = spec.generate(prompt)
        assert result.branch == "speculative" and result.tokens == alone.generate(prompt).tokens
