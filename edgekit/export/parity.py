"""Parity of an exported decoder against its PyTorch reference.

For each fixed prompt: a prefill pass (empty KV cache) and one decode step fed with the
greedy next token and the returned cache. Every output (logits and each ``present.*``
tensor) is compared by max absolute difference; the worst over prompts is recorded per
output, and the logits' worst must stay within tolerance.

Half-precision graphs are compared with the PyTorch model in the same precision. ONNX
Runtime's CPU provider has no bfloat16 kernels for most operators (``Where``, ``MatMul``,
``Add``, ...), so a bfloat16 graph runs as its float16 twin (:func:`bfloat16_as_float16`:
every bfloat16 value is exactly a float16 value within float16's range; the same graph and
weights, stored with 3 more mantissa bits) and the result says so (``ran_as``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DEFAULT_PROMPTS = (
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The Jetson Orin module runs large language models at the edge because",
    "In Python, a generator is a function that",
)


def _cache_layers(past: Any) -> list[tuple[Any, Any]]:
    """(key, value) per layer from a transformers cache object (or a legacy tuple)."""
    if hasattr(past, "layers"):
        return [(layer.keys, layer.values) for layer in past.layers]
    if hasattr(past, "key_cache"):
        return list(zip(past.key_cache, past.value_cache))
    return [(k, v) for k, v in past]


def _bf16_inputs(onnx_path: Path) -> bool:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return any(v.type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16 for v in (*model.graph.input, *model.graph.output))


def bfloat16_as_float16(src: Path, dst: Path) -> int:
    """Write ``src`` with every bfloat16 type replaced by float16 (initializers and Constant
    values converted, Cast targets, graph inputs/outputs/value_info) to ``dst`` (+ its
    external data file). Returns how many tensors were converted; finite values beyond
    float16's range saturate to +-65504 (the attention mask's minimum)."""
    import ml_dtypes
    import numpy as np
    import onnx
    from onnx import TensorProto, numpy_helper

    bf16, f16 = TensorProto.BFLOAT16, TensorProto.FLOAT16
    model = onnx.load(str(src), load_external_data=True)
    converted = 0

    def convert(t: Any) -> None:
        nonlocal converted
        if t.data_type != bf16:
            return
        if t.HasField("raw_data"):
            values = np.frombuffer(t.raw_data, dtype=ml_dtypes.bfloat16).astype(np.float32)
        else:
            values = numpy_helper.to_array(t).astype(np.float32)
        # finite values beyond float16's range saturate to its largest: in a decoder graph those
        # are the attention mask's finfo(bfloat16).min, which the float16 export writes as
        # finfo(float16).min (weights never come near 65504)
        limit = float(np.finfo(np.float16).max)
        half = np.where(np.isfinite(values), np.clip(values, -limit, limit), values).astype(np.float16)
        del t.external_data[:]
        t.data_location = TensorProto.DEFAULT
        t.ClearField("int32_data")
        t.data_type = f16
        t.raw_data = half.tobytes()
        converted += 1

    def walk(graph: Any) -> None:
        for t in graph.initializer:
            convert(t)
        for v in (*graph.input, *graph.output, *graph.value_info):
            if v.type.tensor_type.elem_type == bf16:
                v.type.tensor_type.elem_type = f16
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    convert(attr.t)
                if node.op_type == "Cast" and attr.name == "to" and attr.i == bf16:
                    attr.i = f16
                for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                    walk(sub)

    walk(model.graph)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dst.name + "_data", size_threshold=1024, convert_attribute=False)
    return converted


def precision_gap(model: Any, half_model: Any, tokenizer: Any, *, prompts: tuple[str, ...] = DEFAULT_PROMPTS) -> dict[str, Any]:
    """How far the PyTorch model in half precision is from the same model in float32: max abs
    logits difference over the prompts (prefill and one greedy decode step), the largest logit,
    and whether the half logits are finite (float16 overflow shows up as inf/NaN)."""
    import numpy as np
    import torch

    worst, largest, finite = 0.0, 0.0, True
    for prompt in prompts:
        ids = torch.from_numpy(tokenizer(prompt, return_tensors="np")["input_ids"].astype(np.int64))
        with torch.inference_mode():
            ref = model(input_ids=ids, use_cache=True)
            half = half_model(input_ids=ids, use_cache=True)
            next_id = torch.tensor([[int(ref.logits[0, -1].argmax())]])
            ref_step = model(input_ids=next_id, past_key_values=ref.past_key_values, use_cache=True)
            half_step = half_model(input_ids=next_id, past_key_values=half.past_key_values, use_cache=True)
        for a, b in ((ref.logits, half.logits), (ref_step.logits, half_step.logits)):
            b = b.float()
            finite = finite and bool(torch.isfinite(b).all())
            if finite:
                worst = max(worst, float((a.float() - b).abs().max()))
            largest = max(largest, float(a.float().abs().max()))
    return {"logits_max_abs_diff": worst if finite else float("inf"), "max_abs_logit": largest, "finite": finite,
            "prompts": len(prompts)}


def check_parity(model: Any, tokenizer: Any, onnx_path: Path, *, prompts: tuple[str, ...] = DEFAULT_PROMPTS) -> dict[str, Any]:
    import tempfile

    onnx_path = Path(onnx_path)
    if not _bf16_inputs(onnx_path):
        return _check_parity(model, tokenizer, onnx_path, prompts=prompts)
    with tempfile.TemporaryDirectory(prefix=".parity-f16-", dir=onnx_path.parent) as tmp:
        twin = Path(tmp) / "model.onnx"
        bfloat16_as_float16(onnx_path, twin)
        result = _check_parity(model, tokenizer, twin, prompts=prompts)
    result["ran_as"] = ("float16 twin of the bfloat16 graph (ONNX Runtime's CPU provider has no bfloat16 kernels for "
                        "Where/MatMul/Add/...): same graph and weights, 3 more mantissa bits in storage")
    return result


def _check_parity(model: Any, tokenizer: Any, onnx_path: Path, *, prompts: tuple[str, ...]) -> dict[str, Any]:
    import numpy as np
    import torch

    from edgekit.measure.onnx_session import DecoderSession

    session = DecoderSession(onnx_path)
    worst: dict[str, dict[str, float]] = {"prefill": {}, "decode": {}}
    agree = 0
    def compare(phase: str, ref_out: Any, ort_out: dict[str, Any]) -> None:
        pairs = {"logits": ref_out.logits}
        for index, (key, value) in enumerate(_cache_layers(ref_out.past_key_values)):
            pairs[f"present.{index}.key"] = key
            pairs[f"present.{index}.value"] = value
        for name, reference in pairs.items():
            diff = float(np.abs(reference.float().numpy() - ort_out[name].astype(np.float32)).max())
            worst[phase][name] = max(worst[phase].get(name, 0.0), diff)

    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="np")["input_ids"].astype(np.int64)
        with torch.inference_mode():
            ref = model(input_ids=torch.from_numpy(ids), use_cache=True)
        ort_prefill = session.raw_outputs(ids)
        # Compare before the decode step: transformers' cache object grows in place.
        compare("prefill", ref, ort_prefill)
        next_id = int(ref.logits[0, -1].argmax())
        agree += int(int(ort_prefill["logits"][0, -1].argmax()) == next_id)
        with torch.inference_mode():
            ref_step = model(input_ids=torch.tensor([[next_id]]), past_key_values=ref.past_key_values, use_cache=True)
        past = {k.replace("present.", "past_key_values."): v for k, v in ort_prefill.items() if k.startswith("present.")}
        compare("decode", ref_step, session.raw_outputs(np.asarray([[next_id]], dtype=np.int64), past))
    return {
        "prompts": len(prompts),
        "greedy_agreement": agree / len(prompts),
        "max_abs_diff": worst,
        "logits_max_abs_diff": max(worst["prefill"]["logits"], worst["decode"]["logits"]),
        "present_max_abs_diff": max((v for phase in worst.values() for k, v in phase.items() if k != "logits"), default=0.0),
    }
