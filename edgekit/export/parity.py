"""Parity of an exported decoder against its PyTorch reference.

For each fixed prompt: a prefill pass (empty KV cache) and one decode step fed with the
greedy next token and the returned cache. Every output (logits and each ``present.*``
tensor) is compared by max absolute difference; the worst over prompts is recorded per
output, and the logits' worst must stay within tolerance.
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


def check_parity(model: Any, tokenizer: Any, onnx_path: Path, *, prompts: tuple[str, ...] = DEFAULT_PROMPTS) -> dict[str, Any]:
    import numpy as np
    import torch

    from edgekit.evaluate.onnx_session import DecoderSession

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
