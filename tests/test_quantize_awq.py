"""NNCF AWQ + scale estimation as an edgekit method, on the tiny 2-layer Llama.

Reference = NNCF's own compressed model (the wrapped model with its decompression hooks,
as ``nncf.compress_weights`` returns it). NNCF decompresses ``(q - z) * scale`` in float16,
our grid in float32, so logits agree to 1e-3 (absolute; logits are O(1) here) and exactly
(1e-5, float32 matmul order) once the same float16 rounding is applied to our weights.
"""

from __future__ import annotations

import pytest
import torch
from conftest import python_docs_text

from edgekit.errors import StageError
from edgekit.quantize.awq import awq_quantize, extract_and_restore, run_nncf

LINEARS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)
LOGITS_ATOL = 1e-3


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def data(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer(python_docs_text()[:30_000], return_tensors="pt").input_ids
    calibration = [ids[:, i * 64 : (i + 1) * 64] for i in range(6)]
    probe = ids[:, 1000:1128]
    return calibration, probe


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def assert_plain(model, keys):
    """No NNCF wrapper, hook storage or module left; same parameters as before."""
    assert "forward" not in model.__dict__ and "_replicate_for_data_parallel" not in model.__dict__
    assert not [type(m).__module__ for m in model.modules() if type(m).__module__.startswith("nncf")]
    assert list(model.state_dict()) == keys
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # as from_pretrained left them


@pytest.mark.parametrize(
    "bits,group_size,symmetric,awq,scale_estimation",
    [(4, 32, False, True, True), (4, 32, True, True, True), (4, 0, False, True, False), (8, 0, True, False, False)],
    ids=["int4-asym-g32-awq-se", "int4-sym-g32-awq-se", "int4-asym-per-channel-awq", "int8-sym-per-channel"],
)
def test_reproduces_nncf_compressed_model(tiny_model_dir, data, bits, group_size, symmetric, awq, scale_estimation):
    calibration, probe = data
    model = load(tiny_model_dir)
    keys = list(model.state_dict())
    use_cache = model.config.use_cache
    float_before = {n: p.detach().clone() for n, p in model.named_parameters()}

    run = run_nncf(model, calibration, bits=bits, group_size=group_size, symmetric=symmetric, awq=awq, scale_estimation=scale_estimation)
    nncf_logits = logits(model, probe)  # NNCF's own compressed model
    result = extract_and_restore(run)

    # One QuantizedWeight per decoder Linear (7 per layer), none for lm_head / embeddings.
    assert set(result.weights) == {f"model.layers.{i}.{n}" for i in range(2) for n in LINEARS}
    for name, qw in result.weights.items():
        weight = model.get_submodule(name).weight
        assert qw.bits == bits and qw.symmetric == symmetric
        assert qw.qweight.dtype == torch.int32 and tuple(qw.qweight.shape) == tuple(weight.shape)
        assert int(qw.qweight.min()) >= 0 and int(qw.qweight.max()) <= 2**bits - 1
        assert int(qw.zeros.min()) >= 0 and int(qw.zeros.max()) <= 2**bits - 1
        assert qw.contiguous_groups
        assert qw.group_size == (group_size if group_size > 0 else weight.shape[1])
        assert qw.scales.dtype == torch.float32 and torch.equal(qw.scales, qw.scales.half().float())
        if symmetric:
            assert bool((qw.zeros == 2 ** (bits - 1)).all())
        assert torch.equal(weight, qw.dequantize())  # the model holds the grid's weights
    # Our float32 dequantization vs NNCF's float16 one: within half a float16 ulp.
    assert 0 < result.max_abs_diff < 1e-3

    assert_plain(model, keys)
    assert model.config.use_cache == use_cache
    # Llama: AWQ's smoothing went into up_proj's codes, no float parameter changed.
    assert result.changed_float_params == [] and result.folded_scales == {}
    for name, param in model.named_parameters():
        if name.removesuffix(".weight") not in result.weights:
            assert torch.equal(param, float_before[name]), name

    ours = logits(model, probe)
    torch.testing.assert_close(ours, nncf_logits, atol=LOGITS_ATOL, rtol=0)
    if bits == 4:  # it did quantize (8 bits per channel moves these logits by ~4e-3 only)
        assert (ours - logits(load(tiny_model_dir), probe)).abs().max() > 10 * LOGITS_ATOL
    # NNCF's float16 product rounding applied to our grid: the same model.
    for name, qw in result.weights.items():
        model.get_submodule(name).weight.data = qw.dequantize().half().float()
    torch.testing.assert_close(logits(model, probe), nncf_logits, atol=1e-5, rtol=0)


def test_awq_scales_live_in_the_preceding_linear(tiny_model_dir, data):
    """W·x = (W·diag(s))·(diag(1/s)·x): NNCF scales down_proj's input columns by s and
    up_proj's output rows by 1/s (Linear → Mul → Linear). Both land in the returned codes;
    dropping the up_proj half (the write-back) breaks those channels."""
    calibration, probe = data
    original = load(tiny_model_dir)
    smoothed = load(tiny_model_dir)
    with_awq = awq_quantize(smoothed, calibration, bits=4, group_size=32, symmetric=False, awq=True, scale_estimation=False)
    without = awq_quantize(load(tiny_model_dir), calibration, bits=4, group_size=32, symmetric=False, awq=False, scale_estimation=False)
    for i in range(2):
        up, down = f"model.layers.{i}.mlp.up_proj", f"model.layers.{i}.mlp.down_proj"
        up_w, down_w = original.get_submodule(up).weight, original.get_submodule(down).weight
        up_ratio = with_awq[up].dequantize().norm(dim=1) / up_w.norm(dim=1)  # channel c = row c of up
        down_ratio = with_awq[down].dequantize().norm(dim=0) / down_w.norm(dim=0)  # = column c of down
        smoothed_channels = (up_ratio - 1).abs() > 0.25
        assert smoothed_channels.any(), f"AWQ changed no channel of layer {i}"
        product = (up_ratio * down_ratio)[smoothed_channels]
        torch.testing.assert_close(product, torch.ones_like(product), rtol=0.1, atol=0)
        plain_ratio = without[up].dequantize().norm(dim=1) / up_w.norm(dim=1)
        assert (plain_ratio - 1).abs().max() < 0.1  # no AWQ: quantization alone keeps the norms

    # The smoothed channels on their real input: down_proj's contribution from them stays
    # close to float only with up_proj's 1/s in place; with up_proj put back to its float
    # weight (the write-back dropped) it shrinks by s.
    inputs = {}
    handles = [
        layer.mlp.register_forward_pre_hook(lambda _m, args, i=i: inputs.__setitem__(i, args[0].detach()))
        for i, layer in enumerate(original.model.layers)
    ]
    logits(original, probe)
    for handle in handles:
        handle.remove()

    def contribution(mlp, x, channels, up_weight=None):
        up = x @ (mlp.up_proj.weight if up_weight is None else up_weight).T
        hidden = mlp.act_fn(mlp.gate_proj(x)) * up
        return hidden[..., channels] @ mlp.down_proj.weight[:, channels].T

    with torch.no_grad():
        for i in range(2):
            mlp, float_mlp = smoothed.model.layers[i].mlp, original.model.layers[i].mlp
            channels = ((with_awq[f"model.layers.{i}.mlp.up_proj"].dequantize().norm(dim=1) / float_mlp.up_proj.weight.norm(dim=1)) - 1).abs() > 0.25
            reference = contribution(float_mlp, inputs[i], channels)
            ours = contribution(mlp, inputs[i], channels)
            dropped = contribution(mlp, inputs[i], channels, up_weight=float_mlp.up_proj.weight)
            relative = lambda y: float((y - reference).norm() / reference.norm())  # noqa: E731
            assert relative(ours) < 0.3 and relative(dropped) > 2 * relative(ours), (i, relative(ours), relative(dropped))


def _register_scale(model, op_names, seed):
    from nncf.torch.function_hook.wrapper import register_pre_function_hook
    from nncf.torch.quantization.layers import SQMultiply

    generator = torch.Generator().manual_seed(seed)
    hook = SQMultiply((1, 1, 64))
    hook.scale = torch.rand(1, 1, 64, generator=generator) + 0.5
    for op in op_names:  # one module shared by all consumers, as NNCF's AWQ registers it
        register_pre_function_hook(model, op, 0, hook)
    return hook.scale.detach().reshape(-1).clone()


def test_activation_scales_fold_into_the_norm_weights(tiny_model_dir, data):
    """For Activation → Linear patterns NNCF's AWQ inserts an SQMultiply in front of the
    Linears (none in Llama; emulated here, as AWQ would register it): it is folded into the
    producing RMSNorm weight, so the plain model computes what NNCF's model computes."""
    calibration, probe = data
    model = load(tiny_model_dir)
    keys = list(model.state_dict())
    norm_1 = model.model.layers[1].input_layernorm.weight.detach().clone()
    norm_0 = model.model.layers[0].post_attention_layernorm.weight.detach().clone()
    run = run_nncf(model, calibration, bits=4, group_size=32, symmetric=False, awq=False, scale_estimation=False)
    # NNCF op names: the n-th call of a module path (layer index = call count).
    scale_1 = _register_scale(model, [f"model/self_attn/{p}/linear/1" for p in ("q_proj", "k_proj", "v_proj")], seed=1)
    scale_0 = _register_scale(model, [f"model/mlp/{p}/linear/0" for p in ("gate_proj", "up_proj")], seed=2)
    nncf_logits = logits(model, probe)
    result = extract_and_restore(run)

    assert sorted(result.changed_float_params) == ["model.layers.0.post_attention_layernorm.weight", "model.layers.1.input_layernorm.weight"]
    torch.testing.assert_close(model.model.layers[1].input_layernorm.weight, norm_1 * scale_1, atol=0, rtol=1e-6)
    torch.testing.assert_close(model.model.layers[0].post_attention_layernorm.weight, norm_0 * scale_0, atol=0, rtol=1e-6)
    assert_plain(model, keys)
    torch.testing.assert_close(logits(model, probe), nncf_logits, atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize(
    "ops,reason",
    [
        (["model/self_attn/o_proj/linear/0"], "no float parameter"),  # behind a reshape
        (["model/self_attn/q_proj/linear/0"], "also feeds"),  # k_proj, v_proj read the same norm output unscaled
    ],
)
def test_unfoldable_activation_scale_is_refused(tiny_model_dir, data, ops, reason):
    calibration, _ = data
    model = load(tiny_model_dir)
    run = run_nncf(model, calibration, bits=4, group_size=32, symmetric=False, awq=False, scale_estimation=False)
    _register_scale(model, ops, seed=3)
    with pytest.raises(StageError, match=reason) as info:
        extract_and_restore(run)
    assert "To resolve," in str(info.value)
    assert "forward" not in model.__dict__  # unwrapped even so


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(bits=8, group_size=32, awq=False, scale_estimation=False), "per output channel only"),
        (dict(bits=8, group_size=0, awq=True, scale_estimation=False), "4-bit weights only"),
        (dict(bits=8, group_size=0, awq=False, scale_estimation=True), "4-bit weights only"),
        (dict(bits=3, group_size=32), "bits 3"),
        (dict(bits=4, group_size=48), "does not divide"),
    ],
)
def test_unsupported_settings_are_stage_errors(tiny_model_dir, data, kwargs, message):
    calibration, _ = data
    model = load(tiny_model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(StageError, match=message) as info:
        awq_quantize(model, calibration, symmetric=False, **kwargs)
    assert "quantize.method awq" in str(info.value) and "To resolve," in str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched
    with pytest.raises(StageError, match="calibration sample"):
        awq_quantize(model, [], bits=4, group_size=32, symmetric=False)


def test_zero_point_zero_groups_become_packable():
    """NNCF may give an asymmetric group zero point 0 with its top code in use; GPTQ v1
    cannot store zero 0, so such groups are refitted to zero 1 (others shift losslessly)."""
    import torch

    from edgekit.quantize.awq import _shift_zero_points
    from edgekit.weights.grid import QuantizedWeight
    from edgekit.weights.packing import pack_gptq

    # row 0: zero 0 with code 15 in use (must be refitted); rows 1-7: zero 0, top code unused
    codes = torch.tensor([[0, 3, 15, 7, 9, 2, 4, 1]] + [[0, 1, 2, 3, 4, 5, 6, 7]] * 7, dtype=torch.int32)
    qw = QuantizedWeight(
        qweight=codes.clone(), scales=torch.tensor([[0.5]] + [[0.25]] * 7), zeros=torch.zeros(8, 1, dtype=torch.int32),
        g_idx=torch.zeros(8, dtype=torch.int32), bits=4, group_size=8, symmetric=False,
    )
    before = qw.dequantize()
    shifted, refitted = _shift_zero_points(qw)
    assert (shifted, refitted) == (7, 1)
    assert bool((qw.zeros >= 1).all())
    after = qw.dequantize()
    assert torch.equal(after[1:], before[1:])  # shifted rows: not a value changed
    assert float((after[0] - before[0]).abs().max()) <= float(qw.scales[0, 0]) / 2 + 1e-6
    assert float(after[0].max()) == pytest.approx(float(before[0].max()), rel=1e-3)  # the top still reached
    pack_gptq(qw)  # packable now
