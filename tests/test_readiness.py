"""TensorRT readiness checks (edgekit.engine.readiness): planted problems in small decoder-shaped
graphs built with onnx.helper, each reported with its code, the node or input it concerns and a
fix; and the TensorRT variant of a real (tiny Llama) export passing for the Orin Nano."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

ORIN = "jetson-orin-nano-8gb"  # TensorRT 10.3, compute capability 8.7, 5.5 GB usable
H100 = "workstation-h100"  # TensorRT 10.16, compute capability 9.0, 76 GB usable

VOCAB, HIDDEN, HEADS, HEAD_DIM = 128, 64, 2, 8
TOTAL = "past_sequence_length + sequence_length"


# --------------------------------------------------------------------------- graph builders


def _tensor(name, data_type, dims, fill=0):
    from onnx import helper

    from edgekit.engine.readiness.graph import bits  # one size rule for 4-bit packing

    numel = int(np.prod(dims)) if dims else 1
    nbytes = (numel * bits(data_type) + 7) // 8
    return helper.make_tensor(name, data_type, dims, bytes([fill]) * nbytes, raw=True)


def _float(name, dims, value=0.01):
    from onnx import TensorProto, helper

    return helper.make_tensor(name, TensorProto.FLOAT, dims, np.full(dims, value, np.float32).tobytes(), raw=True)


def _io(layers=1, heads=HEADS, head_dim=HEAD_DIM):
    from onnx import TensorProto, helper

    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", TOTAL]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", VOCAB])]
    nodes = []
    for i in range(layers):
        for kind in ("key", "value"):
            past, present = f"past_key_values.{i}.{kind}", f"present.{i}.{kind}"
            inputs.append(helper.make_tensor_value_info(
                past, TensorProto.FLOAT, ["batch_size", heads, "past_sequence_length", head_dim]))
            outputs.append(helper.make_tensor_value_info(present, TensorProto.FLOAT, ["batch_size", heads, TOTAL, head_dim]))
            nodes.append(helper.make_node("Identity", [past], [present], name=f"/layers.{i}/{kind}/Identity"))
    return inputs, outputs, nodes


def _int4_lm_head(block=64, codes_type=None, zero_point=None):
    """DequantizeLinear(INT4 [in, out] codes, block-wise scale, axis 0) -> MatMul, as edgekit's
    tensorrt export writes it."""
    from onnx import TensorProto, helper

    codes_type = codes_type or TensorProto.INT4
    inits = [_tensor("lm_head_Q4", codes_type, [HIDDEN, VOCAB]), _float("lm_head_Q4_scale", [HIDDEN // block, VOCAB])]
    dq_inputs = ["lm_head_Q4", "lm_head_Q4_scale"]
    if zero_point is not None:
        inits.append(_tensor("lm_head_Q4_zero_point", codes_type, [HIDDEN // block, VOCAB], fill=zero_point))
        dq_inputs.append("lm_head_Q4_zero_point")
    nodes = [
        helper.make_node("DequantizeLinear", dq_inputs, ["lm_head_w"], name="/lm_head/DequantizeLinear", axis=0,
                         block_size=block),
        helper.make_node("MatMul", ["hidden", "lm_head_w"], ["logits"], name="/lm_head/MatMul"),
    ]
    return nodes, inits


def _decoder(tmp_path, *, name="model", opset=21, lm_head=None, extra_nodes=(), extra_inits=(), layers=1,
             heads=HEADS, head_dim=HEAD_DIM, extra_opsets=(), external=True):
    """A decoder-shaped graph (optimum's inputs/outputs) saved as tmp_path/name/model.onnx with its
    weights in model.onnx_data."""
    import onnx
    from onnx import helper

    inputs, outputs, nodes = _io(layers, heads, head_dim)
    lm_nodes, lm_inits = lm_head if lm_head is not None else _int4_lm_head()
    nodes = [
        helper.make_node("Gather", ["embed_tokens", "input_ids"], ["hidden"], name="/embed_tokens/Gather"),
        *nodes, *lm_nodes, *extra_nodes,
    ]
    graph = helper.make_graph(nodes, "decoder", inputs, outputs, [_float("embed_tokens", [VOCAB, HIDDEN]),
                                                                  *lm_inits, *extra_inits])
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, v) for d, v in extra_opsets)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    path = tmp_path / name / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx_data", size_threshold=0)
    else:
        onnx.save_model(model, str(path))
    return path


def _check(path, target=ORIN, profiles=None, context_length=256, **kwargs):
    from edgekit.engine.readiness import check_onnx

    return check_onnx(path, target=target, profiles=profiles, context_length=context_length, **kwargs)


def _errors(findings, code=None):
    return [f for f in findings if f.severity == "error" and (code is None or f.code == code)]


def _one(findings, code, severity="error"):
    hits = [f for f in findings if f.code == code and f.severity == severity]
    assert len(hits) == 1, (code, [(f.severity, f.code, f.message) for f in findings])
    assert hits[0].fix and hits[0].fix.strip(), hits[0]
    return hits[0]


# --------------------------------------------------------------------------- the baseline


def test_a_clean_int4_decoder_passes_on_the_orin_nano(tmp_path):
    findings = _check(_decoder(tmp_path))
    assert _errors(findings) == [], [(f.code, f.message) for f in findings]
    assert not [f for f in findings if f.severity == "warning"], findings
    summary = _one(findings, "quantization", "info")
    assert "INT4 weight-only, block 64 on axis 0, symmetric" in summary.message and "-> MatMul" in summary.message
    # opset 21 is past TensorRT 10.3's documented 20, but only by revisions the parser reads
    opset = _one(findings, "opset", "info")
    assert "DequantizeLinear-21" in opset.message and "Identity-21" in opset.message
    assert _one(findings, "engine-memory", "info").message.startswith("engine memory estimate")


# --------------------------------------------------------------------------- operators


def test_unsupported_and_onnxruntime_only_ops_name_their_nodes(tmp_path):
    from onnx import TensorProto, helper

    extra = [
        helper.make_node("Unique", ["input_ids"], ["uniq"], name="/dedup/Unique"),
        *(helper.make_node("MatMulNBits", ["hidden", "nbits_B", "nbits_S"], [f"nb{i}"], name=f"/layers.{i}/MatMulNBits",
                           domain="com.microsoft", K=HIDDEN, N=HIDDEN, bits=4, block_size=32) for i in range(3)),
    ]
    inits = [_tensor("nbits_B", TensorProto.UINT8, [HIDDEN, 2, 16]), _float("nbits_S", [HIDDEN * 2])]
    findings = _check(_decoder(tmp_path, extra_nodes=extra, extra_inits=inits, extra_opsets=[("com.microsoft", 1)]))
    unsupported = _one(findings, "unsupported-op")
    assert unsupported.node == "/dedup/Unique" and "/dedup/Unique (Unique)" in unsupported.message
    assert "TensorRT 10.3" in unsupported.message
    ort = _one(findings, "ort-only-op")  # three identical nodes: one finding with the count
    assert ort.node == "/layers.0/MatMulNBits" and "and 2 more nodes" in ort.message
    assert ort.fix == "use the tensorrt variant (export_onnx format: tensorrt or both)"


def test_an_op_added_in_a_later_tensorrt_is_unsupported_only_before_it(tmp_path):
    from onnx import helper

    attention = helper.make_node("Attention", ["q", "k", "v"], ["attn"], name="/layers.0/self_attn/Attention")
    path = _decoder(tmp_path, opset=23, extra_nodes=[attention])
    on_orin = _one(_check(path), "unsupported-op")
    assert on_orin.node == "/layers.0/self_attn/Attention" and "TensorRT 10.14 added one" in on_orin.message
    assert "build with TensorRT 10.14 or newer" in on_orin.fix
    assert not _errors(_check(path, target=H100), "unsupported-op")


# --------------------------------------------------------------------------- opset


def test_an_opset_newer_than_the_parser_documents_is_an_error_when_an_op_changed_meaning(tmp_path):
    from onnx import helper

    group_norm = helper.make_node("GroupNormalization", ["hidden", "gn_scale", "gn_bias"], ["normed"],
                                  name="/norm/GroupNormalization", num_groups=4)
    inits = [_float("gn_scale", [HIDDEN]), _float("gn_bias", [HIDDEN])]
    path = _decoder(tmp_path, extra_nodes=[group_norm], extra_inits=inits)
    finding = _one(_check(path), "opset")
    assert finding.node == "/norm/GroupNormalization" and "GroupNormalization-21" in finding.message
    assert "documents opsets up to 20" in finding.message
    # the INT4 weights need opset 21, so the fix is the TensorRT that reads the new definition
    assert "TensorRT 10.9 or newer" in finding.fix and "opset-20 form" in finding.fix
    # TensorRT 10.9 learned opset 21's GroupNormalization; 10.16 documents opset 24
    assert not _errors(_check(path, target=H100), "opset")


def test_int4_needs_opset_21(tmp_path):
    finding = _one(_check(_decoder(tmp_path, opset=20)), "opset")
    assert finding.node == "/lm_head/DequantizeLinear" and "opset 21" in finding.fix


# --------------------------------------------------------------------------- FP8


def _fp8_lm_head():
    from onnx import TensorProto, helper

    inits = [
        _tensor("lm_head_F8", TensorProto.FLOAT8E4M3FN, [HIDDEN, VOCAB]),
        _float("lm_head_F8_scale", [VOCAB]),
        _float("hidden_F8_scale", []),
        _tensor("hidden_F8_zero_point", TensorProto.FLOAT8E4M3FN, []),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["hidden", "hidden_F8_scale", "hidden_F8_zero_point"], ["hidden_q"],
                         name="/lm_head/input/QuantizeLinear", saturate=1),
        helper.make_node("DequantizeLinear", ["hidden_q", "hidden_F8_scale", "hidden_F8_zero_point"], ["hidden_dq"],
                         name="/lm_head/input/DequantizeLinear"),
        helper.make_node("DequantizeLinear", ["lm_head_F8", "lm_head_F8_scale"], ["lm_head_w"],
                         name="/lm_head/DequantizeLinear", axis=1),
        helper.make_node("MatMul", ["hidden_dq", "lm_head_w"], ["logits"], name="/lm_head/MatMul"),
    ]
    return nodes, inits


def test_fp8_is_an_error_on_orin_and_fine_on_h100(tmp_path):
    path = _decoder(tmp_path, lm_head=_fp8_lm_head())
    finding = _one(_check(path), "fp8-needs-sm89")
    assert finding.node == "/lm_head/input/QuantizeLinear" and "8.7" in finding.message
    assert "(QuantizeLinear)" in finding.message and "gptq" in finding.fix
    on_h100 = _check(path, target=H100)
    assert _errors(on_h100) == [], [(f.code, f.message) for f in on_h100]
    assert "FP8" in _one(on_h100, "quantization", "info").message


# --------------------------------------------------------------------------- weight-only INT4 patterns


def test_int4_feeding_something_other_than_a_matmul(tmp_path):
    from onnx import helper

    lm_nodes, lm_inits = _int4_lm_head()
    lm_nodes[1] = helper.make_node("Add", ["hidden", "lm_head_w"], ["logits"], name="/lm_head/Add")
    finding = _one(_check(_decoder(tmp_path, lm_head=(lm_nodes, lm_inits))), "int4-consumer")
    assert finding.node == "/lm_head/DequantizeLinear" and "/lm_head/Add (Add)" in finding.message


def test_int4_with_a_zero_point_is_asymmetric(tmp_path):
    from onnx import TensorProto

    path = _decoder(tmp_path, lm_head=_int4_lm_head(zero_point=0x11))
    finding = _one(_check(path), "zero-point")
    assert finding.node == "/lm_head/DequantizeLinear" and "symmetric: true" in finding.fix
    # an all-zero zero point is symmetric: TensorRT accepts it
    assert not _errors(_check(_decoder(tmp_path, name="zero", lm_head=_int4_lm_head(zero_point=0))))
    # UINT4 codes with a zero point (edgekit's asymmetric export) are the same problem
    uint4 = _decoder(tmp_path, name="uint4", lm_head=_int4_lm_head(codes_type=TensorProto.UINT4, zero_point=0x88))
    assert _one(_check(uint4), "zero-point").node == "/lm_head/DequantizeLinear"


def test_uint4_codes_are_not_a_tensorrt_type(tmp_path):
    from onnx import TensorProto

    path = _decoder(tmp_path, lm_head=_int4_lm_head(codes_type=TensorProto.UINT4))
    finding = _one(_check(path), "qdq-dtype")
    assert "UINT4" in finding.message and finding.node == "/lm_head/DequantizeLinear"


def test_quantizing_activations_to_int4(tmp_path):
    from onnx import TensorProto, helper

    nodes = [helper.make_node("QuantizeLinear", ["hidden", "act_scale", "act_zp"], ["hidden_q4"],
                              name="/layers.0/act/QuantizeLinear")]
    inits = [_float("act_scale", []), _tensor("act_zp", TensorProto.INT4, [])]
    finding = _one(_check(_decoder(tmp_path, extra_nodes=nodes, extra_inits=inits)), "int4-not-weight-only")
    assert finding.node == "/layers.0/act/QuantizeLinear" and "'hidden'" in finding.message


@pytest.mark.parametrize("block,expected", [(32, "block_size 32"), (48, "does not divide")])
def test_int4_block_sizes(tmp_path, block, expected):
    lm_nodes, lm_inits = _int4_lm_head(block=64)
    lm_nodes[0].attribute[1].i = block  # block_size attribute, scale shape kept for 64
    if block == 32:  # a consistent layout, just a block size TensorRT's INT4 GEMMs lack
        lm_inits[1] = _float("lm_head_Q4_scale", [HIDDEN // 32, VOCAB])
    finding = _one(_check(_decoder(tmp_path, lm_head=(lm_nodes, lm_inits))), "block-size")
    assert finding.node == "/lm_head/DequantizeLinear" and expected in finding.message
    assert "group_size 64 or 128" in finding.fix


# --------------------------------------------------------------------------- profiles


def test_a_dynamic_axis_without_a_profile(tmp_path):
    from edgekit.engine.readiness import default_profiles

    path = _decoder(tmp_path)
    profiles = default_profiles(path, context_length=256, max_batch=1, max_prefill=128)
    assert set(profiles) == {"prefill", "decode"}
    assert profiles["decode"]["attention_mask"] == ((1, 2), (1, 129), (1, 256))  # past + 1
    del profiles["decode"]["past_key_values.0.value"]
    finding = _one(_check(path, profiles=profiles), "dynamic-axis-without-profile")
    assert finding.node == "past_key_values.0.value" and "'decode'" in finding.message
    assert "batch_size, past_sequence_length" in finding.message


def test_inconsistent_profiles(tmp_path):
    from edgekit.engine.readiness import default_profiles

    path = _decoder(tmp_path)
    profiles = default_profiles(path, context_length=256, max_batch=2, max_prefill=128)
    decode = profiles["decode"]
    decode["position_ids"] = ((1, 1), (1, 1), (4, 1))  # batch_size up to 4 here, 2 elsewhere
    decode["attention_mask"] = ((1, 2), (1, 129), (2, 200))  # past max 255 + 1 = 256 > 200
    decode["cache_position"] = ((1,), (1,), (1,))  # not an input of this graph
    messages = [f.message for f in _errors(_check(path, profiles=profiles), "profile")]
    assert any("dim 'batch_size' is 1/1/4" in m for m in messages), messages
    assert any("allows 2..200" in m and "2..256" in m for m in messages), messages
    assert any("'cache_position', which is not an input" in m for m in messages), messages


def test_profiles_from_the_build_settings_are_accepted(tmp_path):
    """The CLI passes the lead's BuildSettings profiles (objects with .name and .shapes)."""
    settings = pytest.importorskip("edgekit.engine.settings")
    path = _decoder(tmp_path)
    graph = settings.read_graph(path)
    profiles = settings.make_profiles(graph.inputs, context_length=256, max_batch=2, max_prefill=128)
    findings = _check(path, profiles=profiles)
    assert _errors(findings) == [] and not [f for f in findings if f.severity == "warning"], findings


# --------------------------------------------------------------------------- memory


def test_an_engine_too_large_for_the_orin_nano(tmp_path):
    # 16 layers x 8 KV heads x 128 head dims in FP32 at 32k context and batch 4: ~34 GB of KV cache
    path = _decoder(tmp_path, layers=16, heads=8, head_dim=128)
    findings = _check(path, context_length=32768, max_batch=4)
    finding = _one(findings, "engine-memory")
    assert "of 5.5 GB usable" in finding.message and ORIN in finding.message
    assert "KV cache: past inputs" in finding.message and "max_batch" in finding.fix
    # the same engine fits an H100 at a smaller batch; the Orin Nano gets the plain numbers right
    assert not _errors(_check(path, target=H100, context_length=32768, max_batch=1), "engine-memory")


def test_memory_counts_the_workspace_and_warns_near_the_limit(tmp_path):
    from edgekit.engine.readiness import RUNTIME_ALLOWANCE_GB

    path = _decoder(tmp_path)
    # 5.5 GB usable: a workspace that leaves ~3% headroom after the allowance is a warning
    workspace_gib = (5.5 - RUNTIME_ALLOWANCE_GB - 0.15) * 1e9 / 1024**3
    finding = _one(_check(path, workspace_gb=workspace_gib), "engine-memory", "warning")
    assert "workspace" in finding.message and "over 90%" in finding.message


# --------------------------------------------------------------------------- external data


def test_external_data_outside_the_model_directory(tmp_path):
    import onnx

    path = _decoder(tmp_path)
    model = onnx.load(str(path), load_external_data=False)
    (path.parent.parent / "stolen.bin").write_bytes((path.parent / "model.onnx_data").read_bytes())
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../stolen.bin"
    onnx.save_model(model, str(path))
    finding = _one(_check(path), "external-data")
    assert "'../stolen.bin'" in finding.message and "outside the model's directory" in finding.message
    assert finding.node == "embed_tokens" and "more initializers like it" in finding.message


def test_external_data_through_a_symlink_that_leaves_the_directory(tmp_path):
    path = _decoder(tmp_path)
    data = path.parent / "model.onnx_data"
    outside = tmp_path / "elsewhere.bin"
    outside.write_bytes(data.read_bytes())
    data.unlink()
    data.symlink_to(outside)
    finding = _one(_check(path), "external-data")
    assert "through a symlink" in finding.message and finding.node == "embed_tokens"


def test_a_model_over_2_gib_without_external_data(tmp_path):
    path = tmp_path / "huge" / "model.onnx"
    path.parent.mkdir()
    with open(path, "wb") as handle:  # sparse: the size is all the check reads
        handle.truncate(2**31)
    finding = _one(_check(path), "external-data")
    assert "model.onnx is 2.15 GB" in finding.message and "save_as_external_data=True" in finding.fix


def test_external_data_truncated_or_missing(tmp_path):
    path = _decoder(tmp_path)
    data = path.parent / "model.onnx_data"
    data.write_bytes(data.read_bytes()[:100])
    assert "truncated" in _one(_check(path), "external-data").message
    data.unlink()
    assert "does not exist" in _one(_check(path), "external-data").message


# --------------------------------------------------------------------------- inputs that are not findings


def test_unreadable_inputs_raise_edgekit_errors(tmp_path):
    from edgekit.engine.readiness import check_bundle
    from edgekit.errors import EngineError

    with pytest.raises(EngineError, match="ONNX model not found"):
        _check(tmp_path / "missing" / "model.onnx")
    (tmp_path / "broken.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(EngineError, match="cannot read the ONNX graph"):
        _check(tmp_path / "broken.onnx")
    with pytest.raises(EngineError, match="manifest.json"):
        check_bundle(tmp_path, target=ORIN)


# --------------------------------------------------------------------------- a real export


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny Llama with INT4 symmetric group-64 weights, exported like the default recipe:
    model.onnx (MatMulNBits) + tensorrt/model.onnx (block-wise Q/DQ) + manifest.json."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgekit.export.onnx_export import export_decoder
    from edgekit.export.quantized import to_blockwise_dq, to_matmulnbits
    from edgekit.weights.grid import rtn_quantize

    root = tmp_path_factory.mktemp("readiness")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):  # includes the tied lm_head (in_features 64)
            weights[name] = rtn_quantize(module.weight.data, bits=4, group_size=64, symmetric=True)
            module.weight.data = weights[name].dequantize()
    model.save_pretrained(root / "checkpoint", safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(root / "checkpoint")
    export_decoder(root / "checkpoint", root / "float", opset=18, trust_remote_code=False)
    bundle = root / "bundle"
    to_matmulnbits(root / "float" / "model.onnx", bundle / "model.onnx", weights, check=False)
    to_blockwise_dq(root / "float" / "model.onnx", bundle / "tensorrt" / "model.onnx", weights, check=False)
    manifest = {"onnx": {"variants": {"onnxruntime": "model.onnx", "tensorrt": "tensorrt/model.onnx"}},
                "context_length": 256, "target": ORIN}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return bundle


def test_the_tensorrt_variant_of_a_real_export_passes_on_the_orin_nano(tiny_bundle):
    from edgekit.engine.readiness import check_bundle, check_onnx

    start = time.perf_counter()
    report = check_bundle(tiny_bundle, target=ORIN)
    assert time.perf_counter() - start < 2.0
    assert report["onnx"] == "tensorrt/model.onnx" and report["tensorrt"] == "10.3"
    assert report["passed"] and report["errors"] == 0, report["findings"]
    assert report["warnings"] == 0, report["findings"]
    codes = {f["code"] for f in report["findings"]}
    assert {"quantization", "engine-memory", "external-data", "fp32-activations"} <= codes
    findings = check_onnx(tiny_bundle / "tensorrt" / "model.onnx", target=ORIN, profiles=None, context_length=256)
    assert _errors(findings) == []
    assert check_bundle(tiny_bundle, target=H100)["passed"]


def test_an_onnxruntime_only_bundle_reports_its_matmulnbits(tiny_bundle, tmp_path):
    import shutil

    from edgekit.engine.readiness import check_bundle

    only_ort = tmp_path / "ort-only"
    shutil.copytree(tiny_bundle, only_ort, ignore=shutil.ignore_patterns("tensorrt"))
    manifest = json.loads((only_ort / "manifest.json").read_text())
    manifest["onnx"]["variants"] = {"onnxruntime": "model.onnx"}
    (only_ort / "manifest.json").write_text(json.dumps(manifest))
    report = check_bundle(only_ort, target=ORIN)
    assert report["onnx"] == "model.onnx" and not report["passed"]
    ort = [f for f in report["findings"] if f["code"] == "ort-only-op"]
    assert len(ort) == 1 and "MatMulNBits" in ort[0]["message"] and "more nodes" in ort[0]["message"]


# --------------------------------------------------------------------------- the support data


def test_parser_support_per_version():
    from edgekit.engine.trt_onnx_support import first_version_handling, parser_support

    orin, h100 = parser_support("10.3"), parser_support("10.16.1")
    assert orin.max_opset == 20 and not orin.opset_verified and orin.opset_documented_by == "10.1"
    assert h100.max_opset == 24 and h100.opset_verified
    assert {"IsNaN", "Trilu", "Range", "Where", "MatMul", "DequantizeLinear"} <= set(orin.operators)
    assert "Attention" not in orin.operators and "Attention" in h100.operators
    assert "FP4" not in orin.quantized_types and "FP4" in h100.quantized_types
    assert "Unique" not in h100.operators
    assert first_version_handling("GroupNormalization", 21) == "10.9"
    assert not parser_support("12.0").opset_verified  # newer than the data: a lower bound
    with pytest.raises(ValueError):
        parser_support("8.6")


def test_type_only_revisions_exist_in_onnx():
    """Every revision listed as type-only is a real revision of that operator (onnx.defs)."""
    import onnx.defs

    from edgekit.engine.trt_onnx_support import TYPE_ONLY_REVISIONS

    revisions = {(s.name, s.since_version) for s in onnx.defs.get_all_schemas_with_history() if s.domain == ""}
    for opset, ops in TYPE_ONLY_REVISIONS.items():
        missing = sorted(op for op in ops if (op, opset) not in revisions)
        assert not missing, (opset, missing)


# --------------------------------------------------------------------------- the command


def test_check_command_on_a_bare_onnx_file(tmp_path):
    """`edgekit check` on an .onnx without a bundle: FP8 on an Orin is an error (exit 1, the node
    and the fix printed); the same graph is ready for the H100 (exit 0); no files are written."""
    from conftest import run_cli

    path = _decoder(tmp_path, lm_head=_fp8_lm_head())
    before = sorted(p.name for p in path.parent.iterdir())
    result = run_cli("check", str(path), "--target", ORIN, "--context-length", "256", "--max-prefill", "128")
    assert result.returncode == 1, result.stderr
    assert "error   fp8-needs-sm89: node /lm_head/input/QuantizeLinear (QuantizeLinear) is FP8" in result.stdout
    assert "fix: " in result.stdout and "NOT ready: 1 error(s)" in result.stdout
    result = run_cli("check", str(path), "--target", H100, "--context-length", "256", "--max-prefill", "128", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] and report["target"] == H100 and set(report["profiles"]) == {"prefill", "decode"}
    assert report["profiles"]["decode"]["input_ids"] == [[1, 1], [1, 1], [1, 1]]
    assert sorted(p.name for p in path.parent.iterdir()) == before
    # a bare .onnx has no manifest naming a context length: a one-line error saying which option
    result = run_cli("check", str(path), "--target", ORIN)
    assert result.returncode == 2 and "--context-length" in result.stderr and len(result.stderr.strip().splitlines()) == 1
