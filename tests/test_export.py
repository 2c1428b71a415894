"""ONNX export of a tiny Llama: KV-cache interface, external data, parity, checker."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgekit.errors import StageError


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model_dir) -> Path:
    from edgekit.export.onnx_export import export_decoder

    out = tmp_path_factory.mktemp("onnx")
    export_decoder(tiny_model_dir, out, opset=18, trust_remote_code=False)
    return out


def test_layout_and_interface(exported):
    import onnx

    from edgekit.export.onnx_export import describe

    assert (exported / "model.onnx").is_file() and (exported / "model.onnx_data").is_file()
    assert (exported / "tokenizer.json").is_file() and (exported / "config.json").is_file()
    assert not (exported / ".optimum").exists()
    # weights live in the external file; the graph itself stays small
    assert (exported / "model.onnx").stat().st_size < (exported / "model.onnx_data").stat().st_size
    onnx.checker.check_model(str(exported / "model.onnx"))
    info = describe(exported / "model.onnx")
    assert info["opset"] == 18
    assert {"input_ids", "attention_mask", "past_key_values.0.key", "past_key_values.1.value"} <= set(info["inputs"])
    assert info["inputs"]["past_key_values.0.key"][1] == 2  # GQA: 2 KV heads
    assert info["outputs"]["logits"][-1] == json.loads((exported / "config.json").read_text())["vocab_size"]


def test_parity_against_pytorch(exported, tiny_model_dir):
    from edgekit.export.parity import check_parity
    from edgekit.weights.checkpoint import load_checkpoint

    model, tokenizer = load_checkpoint(tiny_model_dir)
    parity = check_parity(model, tokenizer, exported / "model.onnx")
    assert parity["logits_max_abs_diff"] < 1e-4
    assert parity["present_max_abs_diff"] < 1e-4
    assert parity["greedy_agreement"] == 1.0
    assert set(parity["max_abs_diff"]["decode"]) == {"logits"} | {f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value")}


def test_kv_cache_decode_matches_full_forward(exported):
    """Prefill + one cached decode step gives the same last logits as one full pass."""
    from edgekit.measure.onnx_session import DecoderSession

    session = DecoderSession(exported / "model.onnx")
    ids = np.array([[5, 17, 42, 99, 3, 250]], dtype=np.int64)
    full, _ = session.forward(ids)
    _, past = session.forward(ids[:, :-1])
    step, present = session.forward(ids[:, -1:], past)
    np.testing.assert_allclose(step[0, -1], full[0, -1], atol=1e-5)
    assert present["past_key_values.0.key"].shape[2] == ids.shape[1]


def test_parity_detects_a_different_model(exported, tiny_model_dir, tmp_path):
    """The check can fail: against a model with other weights the diff is large."""
    from conftest import build_tiny_model

    from edgekit.export.parity import check_parity
    from edgekit.weights.checkpoint import load_checkpoint

    other = build_tiny_model(tmp_path / "other", seed=1)
    model, tokenizer = load_checkpoint(other)
    assert check_parity(model, tokenizer, exported / "model.onnx")["logits_max_abs_diff"] > 1e-2


def test_unexportable_model_is_a_clear_error(tmp_path, tiny_model_dir):
    import shutil

    from edgekit.export.onnx_export import export_decoder

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["model_type"] = "made_up_arch"
    config["architectures"] = ["MadeUpForCausalLM"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(StageError, match="optimum cannot export this model"):
        export_decoder(broken, tmp_path / "out", opset=18, trust_remote_code=False)
