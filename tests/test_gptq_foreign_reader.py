"""An edgekit GPTQ checkpoint read by a GPTQ reader that is not edgekit's: onnxruntime-genai's.

onnxruntime-genai's model builder reads ``quantization_config.desc_act`` to decide whether a
layer's ``g_idx`` goes into ``MatMulNBits`` (``use_g_idx``), repacks the GPTQ tensors into ONNX
Runtime's block layout, and runs them with ``MatMulNBits``. Its loader is used here as it
ships (the builder's own rule for ``use_g_idx``), the repacked tensors are run by ONNX
Runtime's real ``MatMulNBits`` kernel, and the product must equal ``x @ W_hat.T`` with
edgekit's own dequantized weights: the file says what the weights are.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gptq_loader = pytest.importorskip(
    "onnxruntime_genai.models.loaders.gptq", reason="onnxruntime-genai (the test extra, x86-64 only) is not installed")


def _quantized_checkpoint(model_dir, out, *, symmetric: bool):
    from transformers import AutoModelForCausalLM

    from edgekit.quantize.gptq import accumulate_hessian, gptq_quantize
    from edgekit.weights.loader import save_quantized_checkpoint
    from edgekit.weights.packing import gptq_quantization_config

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    state: dict = {}
    hooks = [m.register_forward_pre_hook(
        lambda module, args, name=n: state.__setitem__(name, (accumulate_hessian(state.get(name, (None, 0))[0], args[0], state.get(name, (None, 0))[1]))))
        for n, m in linears.items()]
    with torch.no_grad():
        model(torch.randint(3, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0)))
    for hook in hooks:
        hook.remove()
    quantized = {name: gptq_quantize(module.weight, state[name][0], bits=4, group_size=32, symmetric=symmetric,
                                     act_order=True)[0]
                 for name, module in linears.items()}
    config = gptq_quantization_config(bits=4, group_size=32, symmetric=symmetric, act_order=True, damp=0.01)
    save_quantized_checkpoint(model, quantized, out, quantization_config=config)
    return model, quantized


def _genai_read(path, model):
    """What onnxruntime-genai's builder does with the checkpoint: its quant_attrs rule, its loader."""
    config = json.loads((path / "config.json").read_text())
    qconfig = config["quantization_config"]
    quant_attrs = {"config": qconfig, "use_g_idx": qconfig.get("desc_act", False)}  # builders/base.py's rule
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    return gptq_loader.GPTQModel(
        "gptq", str(path), quant_attrs,
        q_size=model.config.num_attention_heads * head_dim,
        kv_size=model.config.num_key_value_heads * head_dim,
        intermediate_size=model.config.intermediate_size,
        num_layers=model.config.num_hidden_layers)


def _matmulnbits(module, x: np.ndarray) -> np.ndarray:
    """Run the repacked tensors with ONNX Runtime's MatMulNBits (com.microsoft), as the builder wires it."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k, n = module.in_features, module.out_features
    inits = [numpy_helper.from_array(module.qweight.numpy(), "B"),
             numpy_helper.from_array(module.scales.to(torch.float32).numpy(), "scales")]
    inputs = ["A", "B", "scales"]
    if module.qzeros is not None:
        inits.append(numpy_helper.from_array(module.qzeros.numpy(), "zero_points"))
        inputs.append("zero_points")
    if module.g_idx is not None:
        inits.append(numpy_helper.from_array(module.g_idx.to(torch.int32).numpy(), "g_idx"))
        inputs += [""] * (4 - len(inputs)) + ["g_idx"]
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=k, N=n, bits=module.bits,
                            block_size=module.group_size)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"A": x})[0]


@pytest.mark.parametrize("symmetric", [False, True], ids=["asymmetric", "symmetric"])
def test_onnxruntime_genai_reads_the_weights_edgekit_wrote(tiny_model_dir, tmp_path, symmetric):
    out = tmp_path / "gptq"
    model, quantized = _quantized_checkpoint(tiny_model_dir, out, symmetric=symmetric)
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["desc_act"] is False and qconfig["edgekit_act_order"] is True  # act-order GPTQ, static layout

    reader = _genai_read(out, model)
    x = np.random.default_rng(0).standard_normal((3, model.config.hidden_size)).astype(np.float32)
    checked = 0
    for index, layer in enumerate(reader.layers):
        for part, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj"))):
            for name in names:
                module = getattr(getattr(layer, part), name)
                assert module.g_idx is None  # desc_act false: the builder leaves g_idx out of MatMulNBits
                expected = x @ quantized[f"model.layers.{index}.{part}.{name}"].dequantize().to(torch.float32).numpy().T
                got = _matmulnbits(module, x)
                np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-3)
                checked += 1
    assert checked == 6 * model.config.num_hidden_layers
