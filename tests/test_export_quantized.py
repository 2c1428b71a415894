"""Quantized ONNX rewrites of a float export: MatMulNBits, block-wise DequantizeLinear, FP8 Q/DQ.

A tiny Llama's Linear weights are replaced by their RTN-dequantized values W_hat, the model is
exported with optimum, and each rewrite must run in ONNX Runtime (prefill + one cached decode
step) with the logits of the float export of W_hat and of PyTorch.
"""

from __future__ import annotations

import collections
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgekit.errors import StageError

IDS = np.array([[5, 17, 42, 99, 3, 250, 7, 8, 120, 64]], dtype=np.int64)
NEXT = np.array([[11]], dtype=np.int64)
TOL = 1e-3
N_MATMUL = 20  # MatMuls in the float export: 7 Linears x 2 layers, 2 attention x 2, rotary, lm_head
QDQ_EXACT = {"session.qdq_matmulnbits_accuracy_level": "0"}

CONFIGS = {
    # name: (bits, symmetric, quantize the tied lm_head too)
    "int4_sym": (4, True, True),
    "int4_asym": (4, False, False),
    "int8_sym": (8, True, False),
    "int8_asym": (8, False, True),
}


def _save_checkpoint(model, tiny_model_dir: Path, path: Path) -> Path:
    from transformers import AutoTokenizer

    model.save_pretrained(path, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path


def _pytorch_logits(model) -> tuple[np.ndarray, np.ndarray]:
    import torch

    with torch.inference_mode():
        out = model(input_ids=torch.from_numpy(IDS), use_cache=True)
        step = model(input_ids=torch.from_numpy(NEXT), past_key_values=out.past_key_values, use_cache=True)
    return out.logits.numpy(), step.logits.numpy()


def _ort_logits(path: Path, config: dict[str, str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Prefill + one decode step through DecoderSession (optionally with session config)."""
    from edgekit.measure.onnx_session import DecoderSession

    session = DecoderSession(path)
    if config:
        import onnxruntime as ort

        options = ort.SessionOptions()
        for key, value in config.items():
            options.add_session_config_entry(key, value)
        session.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    prefill, past = session.forward(IDS)
    step, _ = session.forward(NEXT, past)
    return prefill, step


def _diff(a, b) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


def _total_bytes(path: Path) -> int:
    return path.stat().st_size + (path.parent / "model.onnx_data").stat().st_size


def _op_counts(path: Path) -> collections.Counter:
    import onnx

    return collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


class Variant:
    def __init__(self, name, weights, float_onnx, torch_logits, float_logits):
        self.name, self.weights, self.float_onnx = name, weights, float_onnx
        self.torch_logits, self.float_logits = torch_logits, float_logits
        self.bits, self.symmetric, self.with_lm_head = CONFIGS[name]


@pytest.fixture(scope="module")
def variant_factory(tmp_path_factory, tiny_model_dir):
    cache: dict[str, Variant] = {}

    def make(name: str) -> Variant:
        if name in cache:
            return cache[name]
        import torch
        from transformers import AutoModelForCausalLM

        from edgekit.export.onnx_export import export_decoder
        from edgekit.weights.grid import rtn_quantize

        bits, symmetric, with_lm_head = CONFIGS[name]
        root = tmp_path_factory.mktemp(name)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        weights = {}
        for module_name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and (module_name.startswith("model.layers.") or with_lm_head):
                qw = rtn_quantize(module.weight.data, bits=bits, group_size=32, symmetric=symmetric)
                module.weight.data = qw.dequantize()  # tied lm_head: the embedding becomes W_hat too
                weights[module_name] = qw
        checkpoint = _save_checkpoint(model, tiny_model_dir, root / "checkpoint")
        export_decoder(checkpoint, root / "float", opset=18, trust_remote_code=False)
        float_onnx = root / "float" / "model.onnx"
        cache[name] = Variant(name, weights, float_onnx, _pytorch_logits(model), _ort_logits(float_onnx))
        return cache[name]

    return make


def _quantized_bytes(weights: dict, *, zero_points: bool) -> int:
    total = 0
    for qw in weights.values():
        total += qw.out_features * qw.in_features * qw.bits // 8 + qw.out_features * qw.n_groups * 4
        if zero_points:
            total += qw.out_features * qw.n_groups * qw.bits // 8
    return total


# --------------------------------------------------------------------------- matching


def test_match_finds_every_linear_including_the_tied_lm_head(variant_factory):
    import onnx

    from edgekit.export.quantized import match_quantized_linears

    variant = variant_factory("int4_sym")
    model = onnx.load(str(variant.float_onnx))
    matches = match_quantized_linears(model, variant.weights)
    assert set(matches) == set(variant.weights) and len(matches) == 15
    for module, found in matches.items():
        assert len(found) == 1, module
        match = found[0]
        assert len(match.nodes) == 1
        # node names carry the module path even though initializers are renamed (onnx::MatMul_N)
        assert match.nodes[0] == "/" + module.replace(".", "/").replace("/layers/", "/layers.") + "/MatMul", match
    lm_head = matches["lm_head"][0]
    assert lm_head.transposed and lm_head.initializer == "model.embed_tokens.weight"
    assert not any(m[0].transposed for name, m in matches.items() if name != "lm_head")


def test_values_not_in_the_graph_are_a_clear_error(variant_factory):
    import onnx
    import torch

    from edgekit.export.quantized import match_quantized_linears, to_matmulnbits
    from edgekit.weights.grid import rtn_quantize

    variant = variant_factory("int4_sym")
    values = torch.randn(64, 64, generator=torch.Generator().manual_seed(7))
    stranger = rtn_quantize(values, bits=4, group_size=32, symmetric=True)
    weights = dict(variant.weights, **{"model.layers.9.self_attn.q_proj": stranger})
    with pytest.raises(StageError, match=r"'model\.layers\.9\.self_attn\.q_proj'.*To resolve, ") as info:
        match_quantized_linears(onnx.load(str(variant.float_onnx)), weights)
    assert "dequantized" in str(info.value)
    with pytest.raises(StageError, match="model.layers.9.self_attn.q_proj"):
        to_matmulnbits(variant.float_onnx, variant.float_onnx.parent.parent / "never" / "model.onnx", weights)


def test_act_order_groups_are_refused(variant_factory, tmp_path):
    import torch

    from edgekit.export.quantized import to_blockwise_dq, to_matmulnbits

    variant = variant_factory("int4_sym")
    name = "model.layers.0.mlp.down_proj"
    qw = variant.weights[name]
    order = torch.randperm(qw.in_features, generator=torch.Generator().manual_seed(0))
    shuffled = type(qw)(**{**qw.__dict__, "g_idx": qw.g_idx[order]})
    assert not shuffled.contiguous_groups
    weights = dict(variant.weights, **{name: shuffled})
    for rewrite in (to_matmulnbits, to_blockwise_dq):
        with pytest.raises(StageError, match=rf"'{name}'.*act-order.*To resolve, "):
            rewrite(variant.float_onnx, tmp_path / rewrite.__name__ / "model.onnx", weights)


def _synthetic_graph(path: Path, shared, transposed) -> Path:
    """A -> MatMul(B) -> MatMul(B) -> MatMul(Transpose(W)): one initializer read by two
    MatMuls (a shared weight) and one [out, in] initializer behind a Transpose."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k, n = shared.in_features, transposed.out_features
    inits = [
        numpy_helper.from_array(np.ascontiguousarray(shared.dequantize().numpy().T), "onnx::MatMul_1"),
        numpy_helper.from_array(transposed.dequantize().numpy(), "head.weight"),
    ]
    nodes = [
        helper.make_node("MatMul", ["A", "onnx::MatMul_1"], ["Y1"], name="first"),
        helper.make_node("MatMul", ["Y1", "onnx::MatMul_1"], ["Y2"], name="second"),
        helper.make_node("Transpose", ["head.weight"], ["head.weight_t"], name="t", perm=[1, 0]),
        helper.make_node("MatMul", ["Y2", "head.weight_t"], ["Y"], name="head"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["batch", 5, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 5, n])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    path.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path / "model.onnx"))
    return path / "model.onnx"


@pytest.mark.parametrize(
    "bits,group_size,symmetric",
    [(4, 48, False), (4, 96, True), (3, 32, True), (2, 16, False), (8, 48, True), (5, 32, False)],
)
def test_shared_transposed_and_odd_grids_on_a_synthetic_graph(tmp_path, bits, group_size, symmetric):
    """Group sizes that are not powers of two (MatMulNBits blocks of 16/32 with repeated
    scales), 2/3/5-bit codes in 4/8-bit containers, a shared and a transposed weight."""
    import onnx
    import onnxruntime as ort
    import torch

    from edgekit.export.quantized import match_quantized_linears, to_blockwise_dq, to_matmulnbits
    from edgekit.weights.grid import rtn_quantize

    gen = torch.Generator().manual_seed(bits * 1000 + group_size)
    weights = {
        "shared": rtn_quantize(torch.randn(96, 96, generator=gen), bits=bits, group_size=group_size, symmetric=symmetric),
        "head": rtn_quantize(torch.randn(40, 96, generator=gen), bits=bits, group_size=group_size, symmetric=symmetric),
    }
    src = _synthetic_graph(tmp_path / "float", weights["shared"], weights["head"])
    matches = match_quantized_linears(onnx.load(str(src)), weights)
    assert matches["shared"] == [(("first", "second"), "onnx::MatMul_1", False)]  # both readers of the shared weight
    assert matches["head"] == [(("head",), "head.weight", True)]

    a = np.random.default_rng(0).standard_normal((2, 5, 96)).astype(np.float32)
    reference = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"A": a})[0]
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    for rewrite, op in ((to_matmulnbits, "MatMulNBits"), (to_blockwise_dq, "DequantizeLinear")):
        dst = tmp_path / rewrite.__name__ / "model.onnx"
        report = rewrite(src, dst, weights)
        assert report["replaced"] == 3
        counts = _op_counts(dst)
        assert counts[op] == (3 if op == "MatMulNBits" else 2) and counts["Transpose"] == 0
        got = ort.InferenceSession(str(dst), options, providers=["CPUExecutionProvider"]).run(None, {"A": a})[0]
        assert float(np.abs(got - reference).max()) < 1e-4 * float(np.abs(reference).max()), rewrite.__name__
        if rewrite is to_blockwise_dq:
            # symmetric grids of any width are signed codes without a zero point (TensorRT's form)
            assert report["tensorrt_compatible"] is symmetric


# --------------------------------------------------------------------------- MatMulNBits


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matmulnbits(variant_factory, tmp_path, name):
    import onnx

    from edgekit.export.quantized import match_quantized_linears, to_matmulnbits

    variant = variant_factory(name)
    dst = tmp_path / "nbits" / "model.onnx"
    report = to_matmulnbits(variant.float_onnx, dst, variant.weights)
    n = len(variant.weights)
    assert report["format"] == "matmulnbits" and report["replaced"] == n and report["bits"] == variant.bits
    assert report["opset"] == 18  # default domain untouched; com.microsoft added
    assert report["bytes"] == _total_bytes(dst)
    assert sorted(p.name for p in dst.parent.iterdir()) == ["model.onnx", "model.onnx_data"]
    onnx.checker.check_model(str(dst), full_check=True)

    model = onnx.load(str(dst))
    assert {o.domain: o.version for o in model.opset_import}.get("com.microsoft") == 1
    counts = collections.Counter(node.op_type for node in model.graph.node)
    assert counts["MatMulNBits"] == n and counts["MatMul"] == N_MATMUL - n
    assert counts["Transpose"] == 12 - variant.with_lm_head  # the tied lm_head's Transpose is gone
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            assert attrs["bits"] == variant.bits and attrs["block_size"] == 32
            # symmetric codes use the default zero point (8 / 128): no zero_points input
            assert len(node.input) == (3 if variant.symmetric else 4)
    # the float weights are gone: no MatMul reads W_hat any more (the tied embedding stays for Gather)
    with pytest.raises(StageError):
        match_quantized_linears(model, variant.weights)
    before = match_quantized_linears(onnx.load(str(variant.float_onnx)), variant.weights)
    float_names = {match.initializer for found in before.values() for match in found}
    names = {t.name for t in model.graph.initializer}
    assert names & float_names == ({"model.embed_tokens.weight"} if variant.with_lm_head else set())

    logits = _ort_logits(dst)
    assert _diff(logits, variant.float_logits) < TOL
    assert _diff(logits, variant.torch_logits) < TOL


@pytest.mark.parametrize("name", ["int4_sym", "int4_asym"])
def test_int4_shrinks_the_weights(variant_factory, tmp_path, name):
    from edgekit.export.quantized import to_blockwise_dq, to_matmulnbits

    variant = variant_factory(name)
    before = _total_bytes(variant.float_onnx)
    # the tied lm_head's float matrix stays (the embedding Gather reads it); the others go
    removed = sum(qw.out_features * qw.in_features * 4 for module, qw in variant.weights.items() if module != "lm_head")
    added = _quantized_bytes(variant.weights, zero_points=not variant.symmetric)
    decoder_only = {module: qw for module, qw in variant.weights.items() if module != "lm_head"}
    decoder = _quantized_bytes(decoder_only, zero_points=not variant.symmetric)
    assert decoder < removed / 5  # 4 bits + a float32 scale per 32 weights: 6.4x (5.8x with zero points)
    for rewrite in (to_matmulnbits, to_blockwise_dq):
        dst = tmp_path / rewrite.__name__ / "model.onnx"
        after = rewrite(variant.float_onnx, dst, variant.weights)["bytes"]
        # all that changed is float32 weights -> codes + scales (+ zero points); graph overhead is a few KiB
        assert abs((before - after) - (removed - added)) < 0.05 * removed, (rewrite.__name__, before, after, removed, added)
        data_before = (variant.float_onnx.parent / "model.onnx_data").stat().st_size
        assert (dst.parent / "model.onnx_data").stat().st_size < 0.6 * data_before


def test_8bit_falls_back_to_dequantize_linear_without_8bit_matmulnbits(variant_factory, tmp_path, monkeypatch):
    from edgekit.export.quantized import matmulnbits

    variant = variant_factory("int8_sym")
    monkeypatch.setattr(matmulnbits, "ort_supports_matmulnbits", lambda bits: bits != 8)
    dst = tmp_path / "model.onnx"
    report = matmulnbits.to_matmulnbits(variant.float_onnx, dst, variant.weights)
    assert report["opset"] == 21 and any("8-bit MatMulNBits" in note for note in report["notes"])
    counts = _op_counts(dst)
    assert counts["DequantizeLinear"] == len(variant.weights) and counts["MatMulNBits"] == 0
    assert _diff(_ort_logits(dst, QDQ_EXACT), variant.float_logits) < TOL


def test_the_matmulnbits_probe():
    """4-bit MatMulNBits runs on every supported onnxruntime; 8-bit on CPU only in newer ones (1.32
    here runs it, so to_matmulnbits emits 8-bit MatMulNBits rather than the fallback)."""
    import onnxruntime

    from edgekit.export.quantized import ort_supports_matmulnbits

    assert ort_supports_matmulnbits(4)
    if not ort_supports_matmulnbits(8):
        pytest.skip(f"onnxruntime {onnxruntime.__version__} has no 8-bit MatMulNBits on CPU (the fallback is tested above)")


def test_rewrite_in_place_and_rerun_do_not_grow_the_data_file(variant_factory, tmp_path):
    from edgekit.export.quantized import to_matmulnbits

    variant = variant_factory("int4_asym")
    work = tmp_path / "export"
    shutil.copytree(variant.float_onnx.parent, work)
    first = to_matmulnbits(work / "model.onnx", tmp_path / "out" / "model.onnx", variant.weights)["bytes"]
    again = to_matmulnbits(work / "model.onnx", tmp_path / "out" / "model.onnx", variant.weights)["bytes"]
    assert first == again == _total_bytes(tmp_path / "out" / "model.onnx")
    in_place = to_matmulnbits(work / "model.onnx", work / "model.onnx", variant.weights)["bytes"]
    assert in_place == first
    assert _diff(_ort_logits(work / "model.onnx"), variant.float_logits) < TOL


# --------------------------------------------------------------------------- block-wise DQ (TensorRT)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_blockwise_dq(variant_factory, tmp_path, name):
    import onnx
    from onnx import TensorProto

    from edgekit.export.quantized import to_blockwise_dq

    variant = variant_factory(name)
    dst = tmp_path / "dq" / "model.onnx"
    report = to_blockwise_dq(variant.float_onnx, dst, variant.weights)
    n = len(variant.weights)
    assert report["format"] == "qdq-blockwise" and report["replaced"] == n and report["opset"] == 21
    onnx.checker.check_model(str(dst), full_check=True)

    model = onnx.load(str(dst), load_external_data=False)
    assert {o.domain: o.version for o in model.opset_import}[""] == 21 and model.ir_version >= 10
    inits = {t.name: t for t in model.graph.initializer}
    counts = collections.Counter(node.op_type for node in model.graph.node)
    assert counts["DequantizeLinear"] == n and counts["MatMul"] == N_MATMUL
    assert counts["Transpose"] == 12 - variant.with_lm_head
    expected_type = {
        (4, True): TensorProto.INT4,
        (4, False): TensorProto.UINT4,
        (8, True): TensorProto.INT8,
        (8, False): TensorProto.UINT8,
    }[(variant.bits, variant.symmetric)]
    consumers = collections.defaultdict(list)
    for node in model.graph.node:
        for x in node.input:
            consumers[x].append(node.op_type)
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        attrs = {a.name: a.i for a in node.attribute}
        assert attrs == {"axis": 0, "block_size": 32}
        codes, scale = inits[node.input[0]], inits[node.input[1]]
        assert codes.data_type == expected_type
        assert scale.data_type == TensorProto.FLOAT and list(scale.dims) == [codes.dims[0] // 32, codes.dims[1]]
        # symmetric: signed codes and no zero point (what TensorRT accepts)
        assert len(node.input) == (2 if variant.symmetric else 3)
        if not variant.symmetric:
            assert inits[node.input[2]].data_type == expected_type
        assert consumers[node.output[0]] == ["MatMul"]
    assert report["tensorrt_compatible"] is variant.symmetric
    rejected = f"asymmetric INT{variant.bits} needs zero points, which TensorRT's DequantizeLinear does not accept"
    assert any(rejected in note for note in report["notes"]) is (not variant.symmetric)

    logits = _ort_logits(dst, QDQ_EXACT)
    assert _diff(logits, variant.float_logits) < TOL
    assert _diff(logits, variant.torch_logits) < TOL


def test_blockwise_dq_needs_opset_21(variant_factory, tmp_path):
    from edgekit.export.quantized import to_blockwise_dq

    variant = variant_factory("int4_sym")
    with pytest.raises(StageError, match="opset 21"):
        to_blockwise_dq(variant.float_onnx, tmp_path / "model.onnx", variant.weights, opset=19)


# --------------------------------------------------------------------------- FP8


@pytest.fixture(scope="module")
def fp8_variant(tmp_path_factory, tiny_model_dir):
    """Per-output-channel FP8 weights (W = w8 * scale) and calibrated per-tensor input scales."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgekit.export.onnx_export import export_decoder

    root = tmp_path_factory.mktemp("fp8")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    fp8, amax, hooks = {}, {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):
            scale = (module.weight.data.abs().amax(dim=1) / 448.0).float()
            w8 = (module.weight.data / scale[:, None]).to(torch.float8_e4m3fn)
            module.weight.data = w8.float() * scale[:, None]
            fp8[name] = {"weight": module.weight.data.clone(), "weight_scale": scale, "input_scale": None}

            def record(mod, args, name=name):
                amax[name] = max(amax.get(name, 0.0), float(args[0].abs().max()))

            hooks.append(module.register_forward_pre_hook(record))
    _pytorch_logits(model)  # calibration pass
    for hook in hooks:
        hook.remove()
    checkpoint = _save_checkpoint(model, tiny_model_dir, root / "checkpoint")
    export_decoder(checkpoint, root / "float", opset=18, trust_remote_code=False)
    float_onnx = root / "float" / "model.onnx"
    input_scales = {name: np.float32(amax[name] / 448.0) for name in fp8}
    return model, fp8, input_scales, float_onnx, _pytorch_logits(model), _ort_logits(float_onnx)


def _ort_or_skip(path: Path):
    try:
        return _ort_logits(path)
    except Exception as exc:  # e.g. NOT_IMPLEMENTED: no FLOAT8E4M3FN DequantizeLinear kernel on this CPU build
        if "NOT_IMPLEMENTED" in str(exc) or "kernel" in str(exc).lower():
            pytest.skip(f"ONNX Runtime CPU cannot run FLOAT8E4M3FN Q/DQ here: {str(exc).splitlines()[0]}")
        raise


def test_fp8_weight_only(fp8_variant, tmp_path):
    import onnx
    from onnx import TensorProto

    from edgekit.export.quantized import to_fp8_qdq

    model, fp8, _, float_onnx, torch_logits, float_logits = fp8_variant
    dst = tmp_path / "model.onnx"
    report = to_fp8_qdq(float_onnx, dst, fp8)
    assert report["format"] == "fp8-qdq" and report["replaced"] == 14 and report["opset"] == 21
    assert report["activation_qdq"] == 0
    onnx.checker.check_model(str(dst), full_check=True)
    graph = onnx.load(str(dst), load_external_data=False).graph
    inits = {t.name: t for t in graph.initializer}
    dqs = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 14 and not any(n.op_type == "QuantizeLinear" for n in graph.node)
    for node in dqs:
        assert inits[node.input[0]].data_type == TensorProto.FLOAT8E4M3FN
        assert {a.name: a.i for a in node.attribute} == {"axis": 1}
        assert list(inits[node.input[1]].dims) == [inits[node.input[0]].dims[1]]  # one scale per output channel
    # FP8 is 1 byte per weight: the Linear weights are ~4x smaller
    assert (dst.parent / "model.onnx_data").stat().st_size < (float_onnx.parent / "model.onnx_data").stat().st_size * 0.5

    logits = _ort_or_skip(dst)
    assert _diff(logits, float_logits) < TOL
    assert _diff(logits, torch_logits) < TOL


def test_fp8_with_input_scales_matches_fake_quantized_pytorch(fp8_variant, tmp_path):
    import onnx
    import torch

    from edgekit.export.quantized import to_fp8_qdq

    model, fp8, input_scales, float_onnx, _, float_logits = fp8_variant
    entries = {name: dict(entry, input_scale=input_scales[name]) for name, entry in fp8.items()}
    dst = tmp_path / "model.onnx"
    report = to_fp8_qdq(float_onnx, dst, entries)
    # q/k/v read one tensor with one scale, gate/up another: 4 shared Q/DQ pairs per layer
    assert report["activation_qdq"] == 8
    onnx.checker.check_model(str(dst), full_check=True)
    counts = _op_counts(dst)
    assert counts["QuantizeLinear"] == 8 and counts["DequantizeLinear"] == 14 + 8

    logits = _ort_or_skip(dst)
    assert _diff(logits, float_logits) > 1e-3  # activation quantization is really there

    def fake_quant(module, args, scale):
        s = torch.tensor(scale)
        return ((args[0] / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s,) + tuple(args[1:])

    hooks = [
        module.register_forward_pre_hook(lambda m, a, s=input_scales[name]: fake_quant(m, a, s))
        for name, module in model.named_modules()
        if name in entries
    ]
    try:
        reference = _pytorch_logits(model)
    finally:
        for hook in hooks:
            hook.remove()
    assert _diff(logits, reference) < TOL


def test_fp8_weight_that_is_not_fp8_is_refused(fp8_variant, tmp_path):
    from edgekit.export.quantized import to_fp8_qdq

    _, fp8, _, float_onnx, _, _ = fp8_variant
    name = "model.layers.0.mlp.up_proj"
    entries = dict(fp8, **{name: dict(fp8[name], weight_scale=fp8[name]["weight_scale"] * 1.37)})
    with pytest.raises(StageError, match=rf"'{name}' is not float8_e4m3fn.*To resolve, "):
        to_fp8_qdq(float_onnx, tmp_path / "model.onnx", entries)


# --------------------------------------------------------------------------- half-precision TensorRT graph

HALF_STAGES = """\
stages:
  - type: load
  - type: quantize
    method: rtn
    group_size: 64
    symmetric: true
  - type: export_onnx
    format: {format}
    tensorrt_dtype: {dtype}
  - type: bundle
"""


def build_tiny_qwen2(path: Path, tokenizer_dir: Path) -> Path:
    """A 2-layer Qwen2 (qkv bias, GQA 4:2, untied embeddings) with the tiny Llama's tokenizer."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False, rope_theta=10000.0,
        bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(1)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # visible biases (zero at init)
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def half_bundles(tmp_path_factory, tiny_model_dir):
    """name -> (bundle dir, export.json): compress runs of the tiny Llama and a tiny Qwen2."""
    import json

    from conftest import write_recipe
    from edgekit import api

    qwen = build_tiny_qwen2(tmp_path_factory.mktemp("qwen2") / "tiny-qwen2", tiny_model_dir)
    runs = {
        "llama-auto": (tiny_model_dir, "both", "auto"),
        "llama-float32": (tiny_model_dir, "tensorrt", "float32"),
        "qwen2-auto": (qwen, "tensorrt", "auto"),
        "qwen2-bfloat16": (qwen, "tensorrt", "bfloat16"),
    }
    out = {}
    for name, (model, fmt, dtype) in runs.items():
        root = tmp_path_factory.mktemp(name)
        recipe = write_recipe(root / "r.yaml", model, stages=HALF_STAGES.format(format=fmt, dtype=dtype), output=root / "run")
        manifest = api.compress(recipe, quiet=True)
        export_dir = root / "run" / manifest["stages"][2]["dir"]
        out[name] = (root / "run" / manifest["stages"][-1]["dir"] / "tiny", json.loads((export_dir / "export.json").read_text()))
    return out


def _graph(bundle: Path, variant: str = "tensorrt"):
    import json

    import onnx

    rel = json.loads((bundle / "manifest.json").read_text())["onnx"]["variants"][variant]
    return onnx.load(str(bundle / rel), load_external_data=False)


@pytest.mark.parametrize("name, dtype", [("llama-auto", "FLOAT16"), ("qwen2-auto", "FLOAT16"), ("qwen2-bfloat16", "BFLOAT16")])
def test_half_tensorrt_graph_types(half_bundles, name, dtype):
    """Inputs/outputs (KV cache, logits), every float initializer (embeddings, norms, lm_head,
    biases) and the Q/DQ scales are in the half type; weights stay INT4."""
    from onnx import TensorProto

    bundle, record = half_bundles[name]
    half = getattr(TensorProto, dtype)
    model = _graph(bundle)
    io = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)}
    assert io["logits"] == half
    kv = {n: t for n, t in io.items() if n.startswith(("past_key_values", "present"))}
    assert len(kv) == 8 and set(kv.values()) == {half}
    inits = {t.name: t for t in model.graph.initializer}
    float_types = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
    assert {t.data_type for t in inits.values() if t.data_type in float_types} == {half}
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 14
    for node in dq:
        assert inits[node.input[0]].data_type == TensorProto.INT4 and inits[node.input[1]].data_type == half
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    lm_head = [n for n in matmuls if "lm_head" in n.name]
    assert lm_head and all(inits.get(n.input[1]) is None or inits[n.input[1]].data_type == half for n in matmuls)
    if name.startswith("qwen2"):  # the q/k/v biases are half precision too
        assert sum(1 for t in inits.values() if "bias" in t.name and t.data_type == half) == 6
    assert record["rewrites"]["tensorrt"]["float_dtype"] == dtype.lower()
    assert record["rewrites"]["tensorrt"]["scale_dtypes"] == [dtype]
    # softmax runs in float32, as PyTorch's eager attention computes it
    for node in (n for n in model.graph.node if n.op_type == "Softmax"):
        producer = next(p for p in model.graph.node if node.input[0] in p.output)
        assert producer.op_type == "Cast" and producer.attribute[0].i == TensorProto.FLOAT


@pytest.mark.parametrize("name", ["llama-auto", "qwen2-auto", "qwen2-bfloat16"])
def test_half_tensorrt_parity_within_the_measured_tolerance(half_bundles, name):
    bundle, record = half_bundles[name]
    precision = record["tensorrt_precision"]
    gap = precision["pytorch_half_vs_float32"]
    assert gap["finite"] and 0 < gap["logits_max_abs_diff"] < 0.05
    assert precision["tolerance"] >= 2 * gap["logits_max_abs_diff"] and precision["tolerance_basis"].startswith("measured")
    parity = record["parity"]["tensorrt"]
    assert 0 < parity["logits_max_abs_diff"] <= parity["tolerance"] == precision["tolerance"]
    assert parity["greedy_agreement"] == 1.0
    assert ("ran_as" in parity) is (name == "qwen2-bfloat16")
    if name == "llama-auto":  # the ONNX Runtime variant is unchanged: float32 MatMulNBits, near-exact
        assert record["parity"]["onnxruntime"]["logits_max_abs_diff"] < 1e-4
        from onnx import TensorProto

        ort_graph = _graph(bundle, "onnxruntime")
        assert {v.type.tensor_type.elem_type for v in ort_graph.graph.input if v.name.startswith("past")} == {TensorProto.FLOAT}
        assert any(n.op_type == "MatMulNBits" for n in ort_graph.graph.node)


def test_half_tensorrt_graph_fails_parity_against_a_different_model(half_bundles, tiny_model_dir, tmp_path):
    """The check can fail: the fp16 graph against a differently seeded half model."""
    from conftest import build_tiny_model
    from edgekit.export.parity import check_parity
    from edgekit.weights.checkpoint import load_checkpoint

    bundle, record = half_bundles["llama-auto"]
    other, tokenizer = load_checkpoint(build_tiny_model(tmp_path / "other", seed=3), dtype="float16")
    parity = check_parity(other, tokenizer, bundle / "tensorrt" / "model.onnx")
    assert parity["logits_max_abs_diff"] > 10 * record["tensorrt_precision"]["tolerance"]


def test_float32_tensorrt_graph_on_request(half_bundles):
    from onnx import TensorProto

    bundle, record = half_bundles["llama-float32"]
    assert "tensorrt_precision" not in record and record["rewrites"]["tensorrt"]["scale_dtypes"] == ["FLOAT"]
    model = _graph(bundle)
    assert {v.type.tensor_type.elem_type for v in model.graph.output} == {TensorProto.FLOAT}


def test_readiness_of_the_half_graph(half_bundles):
    from edgekit.engine.readiness import check_bundle

    for name, fp32 in (("llama-auto", False), ("qwen2-auto", False), ("llama-float32", True)):
        bundle, _ = half_bundles[name]
        report = check_bundle(bundle, target="workstation-h100", workspace_gb=0)
        codes = {f["code"] for f in report["findings"]}
        assert report["passed"], report["findings"]
        assert ("fp32-activations" in codes) is fp32 and ("half-precision" in codes) is (not fp32)
        if not fp32:
            note = next(f for f in report["findings"] if f["code"] == "half-precision")
            assert "KV cache FP16, logits FP16" in note["message"] and "'FP32'" not in note["message"]


def test_plan_reads_the_kv_cache_type_from_the_graph(half_bundles):
    from edgekit import api

    plans = {name: api.plan(half_bundles[name][0], target="jetson-orin-nano-8gb", context_length=32768, batch=16)
             for name in ("llama-auto", "llama-float32")}
    half, full = plans["llama-auto"], plans["llama-float32"]
    assert half["inputs"]["kv_cache_bytes_per_value"] == 2.0 and full["inputs"]["kv_cache_bytes_per_value"] == 4.0
    assert half["model"]["kv_cache_dtype"] == "float16 (tensorrt/model.onnx)"
    kv = lambda p: p["targets"][0]["predicted_memory_gb"]["kv_cache"]  # noqa: E731
    assert kv(half) > 0.1 and kv(half) == pytest.approx(kv(full) / 2, rel=0.01)
