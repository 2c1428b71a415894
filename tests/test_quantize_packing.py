"""The GPTQ v1 checkpoint layout (packing) and quantized checkpoints on disk (loader)."""

from __future__ import annotations

import json
import sys
import types

import pytest

torch = pytest.importorskip("torch")

from edgekit.errors import ModelError  # noqa: E402
from edgekit.weights.grid import QuantizedWeight, find_params, max_code, rtn_quantize  # noqa: E402
from edgekit.weights.packing import gptq_quantization_config, pack_gptq, pack_rows, unpack_gptq, unpack_rows  # noqa: E402


def random_quantized(out_features: int, in_features: int, bits: int, group_size: int | None, symmetric: bool,
                     seed: int = 0) -> QuantizedWeight:
    gen = torch.Generator().manual_seed(seed)
    group = group_size or in_features
    n_groups = in_features // group
    maxq = max_code(bits)
    if symmetric:
        zeros = torch.full((out_features, n_groups), 2 ** (bits - 1), dtype=torch.int32)
    else:
        zeros = torch.randint(1, maxq + 1, (out_features, n_groups), generator=gen, dtype=torch.int32)
    return QuantizedWeight(
        qweight=torch.randint(0, maxq + 1, (out_features, in_features), generator=gen, dtype=torch.int32),
        scales=(torch.rand(out_features, n_groups, generator=gen) * 0.1 + 1e-4).half().float(),
        zeros=zeros,
        g_idx=torch.arange(in_features, dtype=torch.int32) // group,
        bits=bits,
        group_size=group,
        symmetric=symmetric,
    )


def assert_same(a: QuantizedWeight, b: QuantizedWeight) -> None:
    assert torch.equal(a.qweight, b.qweight) and a.qweight.dtype == b.qweight.dtype == torch.int32
    assert torch.equal(a.scales, b.scales) and b.scales.dtype == torch.float32
    assert torch.equal(a.zeros, b.zeros) and b.zeros.dtype == torch.int32
    assert torch.equal(a.g_idx, b.g_idx)
    assert (a.bits, a.group_size, a.symmetric) == (b.bits, b.group_size, b.symmetric)
    assert torch.equal(a.dequantize(), b.dequantize())


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape,group_size", [((64, 128), 32), ((96, 256), 64), ((32, 64), None), ((128, 96), 32)])
def test_pack_unpack_round_trip(shape, group_size, bits, symmetric):
    qw = random_quantized(*shape, bits, group_size, symmetric, seed=bits)
    packed = pack_gptq(qw)
    out_features, in_features = shape
    n_groups = in_features // (group_size or in_features)
    assert tuple(packed["qweight"].shape) == (in_features * bits // 32, out_features)
    assert tuple(packed["qzeros"].shape) == (n_groups, out_features * bits // 32)
    assert tuple(packed["scales"].shape) == (n_groups, out_features) and packed["scales"].dtype == torch.float16
    assert packed["qweight"].dtype == packed["qzeros"].dtype == packed["g_idx"].dtype == torch.int32
    back = unpack_gptq(packed, bits=bits, group_size=-1 if group_size is None else group_size, symmetric=symmetric)
    assert_same(qw, back)


def test_round_trip_of_rtn_weights():
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(1))
    for symmetric in (True, False):
        qw = rtn_quantize(w, bits=4, group_size=32, symmetric=symmetric)
        assert_same(qw, unpack_gptq(pack_gptq(qw), bits=4, group_size=32, symmetric=symmetric))


def test_hand_made_4bit_layout_and_v1_zero_convention():
    """8 inputs x 8 outputs, 4 bits, one group: every value checked by hand."""
    codes = torch.tensor([[(o + i) % 16 for i in range(8)] for o in range(8)], dtype=torch.int32)  # [out, in]
    zeros = torch.arange(1, 9, dtype=torch.int32)[:, None]  # zero of output o is o + 1
    qw = QuantizedWeight(qweight=codes, scales=torch.full((8, 1), 0.5), zeros=zeros,
                         g_idx=torch.zeros(8, dtype=torch.int32), bits=4, group_size=8, symmetric=False)
    packed = pack_gptq(qw)

    def word(nibbles):  # low nibble first, as a signed int32
        value = sum(n << (4 * k) for k, n in enumerate(nibbles))
        return value - (1 << 32) if value >= 1 << 31 else value

    # qweight [in/8, out]: column o packs the 8 input codes of output o
    assert packed["qweight"].tolist() == [[word([(o + i) % 16 for i in range(8)]) for o in range(8)]]
    assert packed["qweight"][0, 0].item() == 0x76543210
    assert packed["qweight"][0, 7].item() == 0xEDCBA987 - (1 << 32)  # codes 7..14; the top bit set
    # qzeros [n_groups, out/8]: zero - 1 (v1), i.e. 0..7 for outputs 0..7
    assert packed["qzeros"].tolist() == [[0x76543210]]
    assert packed["scales"].tolist() == [[0.5] * 8]
    assert packed["g_idx"].tolist() == [0] * 8


def test_hand_made_8bit_and_3bit_layouts():
    codes = torch.tensor([[1, 2, 3, 4]], dtype=torch.int32).t()  # [4 inputs, 1 output]
    assert pack_rows(codes, 8).tolist() == [[0x04030201]]
    # 3 bits: 32 codes -> 3 words, code k at bit 3k of the 96-bit stream (AutoGPTQ layout)
    codes3 = torch.tensor([k % 8 for k in range(32)], dtype=torch.int32)[:, None]
    stream = sum((k % 8) << (3 * k) for k in range(32))
    expected = [(stream >> (32 * j)) & 0xFFFFFFFF for j in range(3)]
    expected = [v - (1 << 32) if v >= 1 << 31 else v for v in expected]
    assert pack_rows(codes3, 3)[:, 0].tolist() == expected
    assert torch.equal(unpack_rows(pack_rows(codes3, 3), 3), codes3)


def test_zero_point_zero_is_refused_and_never_produced():
    qw = random_quantized(8, 32, 4, None, False)
    qw.zeros[0, 0] = 0
    with pytest.raises(ValueError, match=r"zero points must lie in \[1, 15\]"):
        pack_gptq(qw)
    # An all-positive row would want zero 0; the grid moves it to zero 1 and still reaches the max.
    w = torch.tensor([[0.0, 0.1, 0.5, 1.5], [0.01, 0.2, 0.3, 3.0], [-0.001, 0.2, 0.3, 3.0]])
    scale, zero = find_params(w, 4, False)
    assert zero.tolist() == [1, 1, 1]
    q = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, 15)
    assert torch.allclose((q - zero[:, None]) * scale[:, None], w, atol=float(scale.max()) / 2 + 1e-6)


def test_invalid_bits_and_unrepresentable_scales():
    with pytest.raises(ValueError, match="supports bits"):
        pack_gptq(random_quantized(8, 32, 5, None, True))
    qw = random_quantized(8, 32, 4, None, True)
    qw.scales[0, 0] = 0.1  # not a float16 value
    with pytest.raises(ValueError, match="float16"):
        pack_gptq(qw)


def test_quantization_config_block():
    qc = gptq_quantization_config(bits=4, group_size=None, symmetric=False, act_order=True, damp=0.01, method="rtn")
    assert qc == {
        "quant_method": "gptq", "bits": 4, "group_size": -1, "desc_act": False, "edgekit_act_order": True, "sym": False,
        "static_groups": True, "damp_percent": 0.01, "true_sequential": True, "checkpoint_format": "gptq",
        "quantized_by": "edgekit", "edgekit_method": "rtn", "edgekit_float_target": 0.0,
    }
    assert gptq_quantization_config(bits=8, group_size=128, symmetric=True, act_order=False, damp=0.1)["group_size"] == 128


# ----------------------------------------------------------------------------- loader


def decoder_linears(model) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


def collect_hessians(model, n_sequences: int = 4, length: int = 64) -> dict:
    from edgekit.quantize.gptq import accumulate_hessian

    state: dict = {}

    def hook(name):
        def pre_hook(module, args):
            H, n = state.get(name, (None, 0))
            state[name] = accumulate_hessian(H, args[0], n)
        return pre_hook

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in decoder_linears(model).items()]
    ids = torch.randint(3, model.config.vocab_size, (n_sequences, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    return {name: H for name, (H, _) in state.items()}


@pytest.fixture(scope="module")
def quantized_checkpoint(tiny_model_dir, tmp_path_factory):
    """The tiny Llama, every decoder Linear GPTQ-quantized (act-order, group 32), saved."""
    from transformers import AutoModelForCausalLM

    from edgekit.quantize.gptq import gptq_quantize
    from edgekit.weights.loader import save_quantized_checkpoint

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    hessians = collect_hessians(model)
    quantized = {
        name: gptq_quantize(module.weight, hessians[name], bits=4, group_size=32, symmetric=False, act_order=True)[0]
        for name, module in decoder_linears(model).items()
    }
    out = tmp_path_factory.mktemp("quantized") / "tiny-gptq"
    qc = gptq_quantization_config(bits=4, group_size=32, symmetric=False, act_order=True, damp=0.01)
    save_quantized_checkpoint(model, quantized, out, quantization_config=qc)
    # The reference: the in-memory model with the dequantized weights substituted.
    with torch.no_grad():
        for name, module in decoder_linears(model).items():
            module.weight.copy_(quantized[name].dequantize())
    return out, model, quantized


def test_saved_files(quantized_checkpoint):
    from safetensors import safe_open

    from edgekit.weights.loader import is_quantized_checkpoint

    out, model, quantized = quantized_checkpoint
    assert {"config.json", "generation_config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gptq"
    # GPTQ ran in act-order, but the file's groups are static and g_idx is trivial: desc_act false
    assert config["quantization_config"]["desc_act"] is False and config["quantization_config"]["group_size"] == 32
    assert config["quantization_config"]["edgekit_act_order"] is True and config["quantization_config"]["static_groups"] is True
    assert is_quantized_checkpoint(out) == "gptq"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F32"
    assert len(quantized) == 14
    for name in quantized:
        assert f"{name}.weight" not in keys
        assert {f"{name}.{k}" for k in ("qweight", "qzeros", "scales", "g_idx")} <= keys
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys  # tied: stored once
    assert "model.norm.weight" in keys


def test_reload_is_bit_exact_and_logits_match(quantized_checkpoint):
    from edgekit.weights.loader import QuantLinear, dequantize_model, load_quantized_model, read_quantized_weights

    out, reference, quantized = quantized_checkpoint
    model = load_quantized_model(out)
    assert not model.training
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert set(layers) == set(quantized)
    for name, layer in layers.items():
        assert torch.equal(layer.dequantized_weight(), quantized[name].dequantize())
        assert torch.equal(layer.quantized_weight().qweight, quantized[name].qweight)
    assert model.lm_head.weight is model.model.embed_tokens.weight

    ids = torch.randint(3, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)

    on_disk = read_quantized_weights(out)
    assert set(on_disk) == set(quantized)
    assert all(torch.equal(on_disk[n].dequantize(), quantized[n].dequantize()) for n in quantized)

    dequantize_model(model)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_reload_in_half_precision(quantized_checkpoint):
    from edgekit.weights.loader import load_quantized_model

    out, _, quantized = quantized_checkpoint
    model = load_quantized_model(out, dtype="bfloat16")
    layer = model.model.layers[0].mlp.down_proj
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert model(ids).logits.dtype == torch.bfloat16
    assert torch.equal(layer.dequantized_weight(torch.float32), quantized["model.layers.0.mlp.down_proj"].dequantize())


def _rewrite(src, dst, edit):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize("damage,message", [
    (lambda t: t.pop("model.layers.1.self_attn.k_proj.qzeros"), "missing model.layers.1.self_attn.k_proj.qzeros"),
    (lambda t: t.pop("model.norm.weight"), "missing model.norm.weight"),
    (lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)}), "unexpected model.layers.0.extra.weight"),
    (lambda t: t.update({"model.layers.0.mlp.up_proj.qweight": torch.zeros(3, 128, dtype=torch.int32)}), "do not fit"),
    (lambda t: t["model.layers.0.mlp.up_proj.g_idx"].fill_(7), "g_idx"),
])
def test_damaged_checkpoint_is_a_model_error(quantized_checkpoint, tmp_path, damage, message):
    from edgekit.weights.loader import load_quantized_model

    out, _, _ = quantized_checkpoint
    broken = _rewrite(out, tmp_path / "broken", damage)
    with pytest.raises(ModelError, match=message) as info:
        load_quantized_model(broken)
    assert "To resolve" in str(info.value) and "\n" not in str(info.value)


def test_truncated_file_is_a_model_error(quantized_checkpoint, tmp_path):
    import shutil

    from edgekit.weights.loader import load_quantized_model, read_quantized_weights

    out, _, _ = quantized_checkpoint
    broken = tmp_path / "truncated"
    shutil.copytree(out, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    for load in (load_quantized_model, read_quantized_weights):
        with pytest.raises(ModelError, match="cannot read model.safetensors"):
            load(broken)


def test_not_quantized_and_fp8_dispatch(tiny_model_dir, tmp_path, monkeypatch):
    from edgekit.weights.loader import is_quantized_checkpoint, load_quantized_model

    assert is_quantized_checkpoint(tiny_model_dir) is None
    assert is_quantized_checkpoint(tmp_path) is None
    with pytest.raises(ModelError, match="not a quantized checkpoint"):
        load_quantized_model(tiny_model_dir)

    config = json.loads((tiny_model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    calls = []
    fake = types.ModuleType("edgekit.weights.fp8")
    fake.load_fp8_model = lambda path, dtype=None: calls.append((path, dtype)) or "fp8-model"
    monkeypatch.setitem(sys.modules, "edgekit.weights.fp8", fake)
    assert load_quantized_model(tmp_path, dtype="float16") == "fp8-model"
    assert calls == [(tmp_path, "float16")]
    assert is_quantized_checkpoint(tmp_path) == "fp8"


def test_quantized_lm_head_unties_embeddings(tiny_model_dir, tmp_path):
    """Quantizing the (tied) lm_head keeps the float embedding and unties the two."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from edgekit.weights.loader import QuantLinear, load_quantized_model, save_quantized_checkpoint

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    embedding = model.model.embed_tokens.weight.detach().clone()
    qw = rtn_quantize(model.lm_head.weight, bits=8, group_size=32, symmetric=True)
    qc = gptq_quantization_config(bits=8, group_size=32, symmetric=True, act_order=False, damp=0.01, method="rtn")
    save_quantized_checkpoint(model, {"lm_head": qw}, tmp_path / "q", quantization_config=qc)
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        assert "lm_head.qweight" in f.keys() and "lm_head.weight" not in f.keys()
    assert json.loads((tmp_path / "q" / "config.json").read_text())["tie_word_embeddings"] is False
    reloaded = load_quantized_model(tmp_path / "q")
    assert isinstance(reloaded.lm_head, QuantLinear)
    assert torch.equal(reloaded.model.embed_tokens.weight, embedding)
    assert torch.equal(reloaded.lm_head.dequantized_weight(), qw.dequantize())


def test_quant_linear_keeps_float16_scales_when_cast(quantized_checkpoint):
    from edgekit.weights.loader import QuantLinear, load_quantized_model

    out, _, quantized = quantized_checkpoint
    model = load_quantized_model(out).to(torch.bfloat16)
    layer = model.model.layers[1].self_attn.o_proj
    assert isinstance(layer, QuantLinear) and layer.scales.dtype == torch.float16 and layer.dtype == torch.bfloat16
    expected = quantized["model.layers.1.self_attn.o_proj"].dequantize()
    assert torch.equal(layer.dequantized_weight(torch.float32), expected)
    assert torch.equal(layer.dequantized_weight(), expected.to(torch.bfloat16))
    standalone = QuantLinear.from_quantized(quantized["model.layers.1.self_attn.o_proj"])
    x = torch.randn(3, layer.in_features)
    torch.testing.assert_close(standalone(x), x @ expected.T)


def test_foreign_layout_arbitrary_g_idx_and_shards(tiny_model_dir, tmp_path):
    """A v1 checkpoint as AutoGPTQ writes it with desc_act and dynamic groups (g_idx a
    permutation of the groups), split into two safetensors shards with an index."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from edgekit.weights.loader import load_quantized_model, save_quantized_checkpoint

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    name = "model.layers.0.mlp.down_proj"  # in_features 128: 4 groups of 32
    qw = random_quantized(64, 128, 4, 32, False, seed=3)
    qw.g_idx = qw.g_idx[torch.randperm(128, generator=torch.Generator().manual_seed(0))].contiguous()
    assert not qw.contiguous_groups
    qc = gptq_quantization_config(bits=4, group_size=32, symmetric=False, act_order=True, damp=0.01)
    save_quantized_checkpoint(model, {name: qw}, tmp_path, quantization_config=qc)
    written = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert written["desc_act"] is True and written["static_groups"] is False  # the file says what g_idx is
    tensors = load_file(str(tmp_path / "model.safetensors"))
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2], "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for shard, shard_keys in shards.items():
        save_file({k: tensors[k] for k in shard_keys}, str(tmp_path / shard))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: s for s, ks in shards.items() for k in ks}}))
    (tmp_path / "model.safetensors").unlink()

    reloaded = load_quantized_model(tmp_path)
    layer = dict(reloaded.named_modules())[name]
    assert torch.equal(layer.g_idx, qw.g_idx)
    assert torch.equal(layer.dequantized_weight(), qw.dequantize())
