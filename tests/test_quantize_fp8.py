"""FP8 (E4M3) simulation: weight codes, Fp8Linear numerics, the tiny Llama, save/load."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import python_docs_text

from edgekit.errors import ModelError, StageError
from edgekit.quantize.fp8 import fp8_quantize
from edgekit.weights.fp8 import (
    E4M3_MAX,
    Fp8Linear,
    load_fp8_model,
    quantize_weight_fp8,
    save_fp8_checkpoint,
)

LINEARS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def data(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer(python_docs_text()[:30_000], return_tensors="pt").input_ids
    return [ids[:, i * 64 : (i + 1) * 64] for i in range(4)], ids[:, 1000:1128]


def sqnr_db(reference, approx):
    return 10 * math.log10(float(reference.pow(2).sum() / (reference - approx).pow(2).sum()))


def test_weight_codes_are_e4m3_per_channel():
    torch.manual_seed(0)
    weight = torch.randn(64, 128)
    codes, scale = quantize_weight_fp8(weight)
    assert codes.dtype == torch.float8_e4m3fn and tuple(codes.shape) == (64, 128)
    assert scale.dtype == torch.float32 and tuple(scale.shape) == (64,)
    assert torch.equal(scale, weight.abs().amax(dim=1) / E4M3_MAX)
    assert bool((codes.float().abs().amax(dim=1) == E4M3_MAX).all())  # each row's max maps to 448
    dequantized = codes.float() * scale[:, None]
    assert sqnr_db(weight, dequantized) > 25  # e4m3: 3 mantissa bits, ~31 dB on Gaussian weights
    # An all-zero row stays zero (no 0/0).
    weight[3] = 0
    codes, scale = quantize_weight_fp8(weight)
    assert torch.isfinite(scale).all() and not codes[3].float().any()


def test_fp8_linear_static_and_dynamic_close_to_float():
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 64)
    x = torch.randn(4, 16, 128)
    with torch.no_grad():
        reference = linear(x)
        static = Fp8Linear.from_linear(linear, activations="static", input_scale=float(x.abs().amax()) / E4M3_MAX)
        dynamic = Fp8Linear.from_linear(linear, activations="dynamic")
        for module in (static, dynamic):
            assert module.weight.dtype == torch.float8_e4m3fn and module.weight_scale.dtype == torch.float32
            out = module(x)
            assert out.dtype == x.dtype and out.shape == reference.shape
            assert sqnr_db(reference, out) > 20, module.activations
        assert static.input_scale.dtype == torch.float32 and static.input_scale.dim() == 0
        assert dynamic.input_scale is None and "input_scale" not in dict(dynamic.named_buffers())
        # A static scale saturates beyond its calibrated range instead of overflowing.
        assert torch.isfinite(static(x * 1000)).all()
        assert torch.isfinite(dynamic(torch.zeros(2, 128))).all()
        # Per-token scaling is scale-invariant (a power of two keeps the float math exact).
        torch.testing.assert_close(dynamic(x * 1024) - linear.bias, (dynamic(x) - linear.bias) * 1024, rtol=1e-5, atol=1e-3)
    # .half() moves the module but keeps the FP8 codes and float32 scales as they are.
    half = Fp8Linear.from_linear(linear, activations="static", input_scale=0.01).half()
    assert half.weight.dtype == torch.float8_e4m3fn and half.weight_scale.dtype == torch.float32
    assert half.input_scale.dtype == torch.float32 and half.bias.dtype == torch.float16


@pytest.mark.parametrize("activations", ["static", "dynamic"])
def test_fp8_quantize_tiny_llama(tiny_model_dir, data, activations):
    calibration, probe = data
    model = load(tiny_model_dir)
    reference = logits(model, probe)
    embedding = model.model.embed_tokens.weight.detach().clone()
    exported = fp8_quantize(model, calibration, activations=activations)

    names = {f"model.layers.{i}.{n}" for i in range(2) for n in LINEARS}
    assert set(exported) == names
    for name, entry in exported.items():
        module = model.get_submodule(name)
        assert isinstance(module, Fp8Linear) and module.activations == activations
        assert entry["weight"].dtype.name == "float32" and entry["weight"].shape == tuple(module.weight.shape)
        assert (entry["weight"] == module.dequantized_weight().numpy()).all()
        assert (entry["weight_scale"] == module.weight_scale.numpy()).all()
        if activations == "static":
            assert isinstance(entry["input_scale"], float) and entry["input_scale"] > 0
            assert entry["input_scale"] == float(module.input_scale)
        else:
            assert entry["input_scale"] is None
    assert type(model.lm_head) is torch.nn.Linear  # not quantized
    assert model.lm_head.weight is model.model.embed_tokens.weight and torch.equal(model.model.embed_tokens.weight, embedding)
    quantized = logits(model, probe)
    assert 0 < (quantized - reference).abs().max() < 0.1 * reference.abs().max()


@pytest.mark.parametrize("activations", ["static", "dynamic"])
def test_save_load_round_trip(tiny_model_dir, data, tmp_path, activations):
    from safetensors import safe_open

    calibration, probe = data
    model = load(tiny_model_dir)
    fp8_quantize(model, calibration, activations=activations)
    expected = logits(model, probe)
    out = tmp_path / "fp8"
    save_fp8_checkpoint(model, out, activations=activations)

    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "fp8", "activation_scheme": activations, "weight_scheme": "per_channel", "fmt": "e4m3",
        "quantized_by": "edgekit", "ignored_layers": ["lm_head"],
    }
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
        assert handle.get_tensor("model.layers.0.mlp.down_proj.weight").dtype == torch.float8_e4m3fn
        assert handle.get_tensor("model.layers.0.mlp.down_proj.weight_scale").dtype == torch.float32
        assert handle.get_tensor("model.embed_tokens.weight").dtype == torch.float32
    assert "lm_head.weight" not in keys  # tied: stored once
    assert ("model.layers.1.self_attn.q_proj.input_scale" in keys) == (activations == "static")

    loaded = load_fp8_model(out)
    assert not loaded.training
    assert isinstance(loaded.model.layers[1].self_attn.q_proj, Fp8Linear)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded, probe), expected)


def _rewrite(path, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_load_refuses_missing_or_unexpected_tensors(tiny_model_dir, data, tmp_path):
    calibration, _ = data
    model = load(tiny_model_dir)
    fp8_quantize(model, calibration, activations="static")
    out = tmp_path / "fp8"
    save_fp8_checkpoint(model, out, activations="static")
    weights = out / "model.safetensors"

    _rewrite(weights, lambda t: t.pop("model.layers.1.mlp.down_proj.input_scale"))
    with pytest.raises(ModelError, match="lacks 1 tensor") as info:
        load_fp8_model(out)
    line = info.value.one_line()
    assert "model.layers.1.mlp.down_proj.input_scale" in line and "\n" not in line
    assert "To resolve, " in line and line.endswith(".")

    _rewrite(weights, lambda t: t.__setitem__("model.layers.1.mlp.down_proj.input_scale", torch.tensor(1.0)))
    _rewrite(weights, lambda t: t.__setitem__("model.layers.0.extra", torch.zeros(3)))
    with pytest.raises(ModelError, match="does not use"):
        load_fp8_model(out)

    with pytest.raises(ModelError, match="not an edgekit FP8 checkpoint"):
        load_fp8_model(tiny_model_dir)


def test_bad_settings_are_stage_errors(tiny_model_dir):
    model = load(tiny_model_dir)
    with pytest.raises(StageError, match="activation scheme"):
        fp8_quantize(model, [], activations="per-tensor")
    with pytest.raises(StageError, match="calibration"):
        fp8_quantize(model, [], activations="static")
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear  # untouched
    fp8_quantize(model, [], activations="dynamic")  # needs no calibration
    with pytest.raises(StageError, match="dynamic activations, not static"):
        save_fp8_checkpoint(model, tiny_model_dir.parent / "never", activations="static")
