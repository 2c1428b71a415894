"""A thin ONNX Runtime wrapper for decoders exported with a KV cache (optimum layout).

Inputs: ``input_ids``, ``attention_mask``, ``position_ids`` (when present) and
``past_key_values.<i>.key|value``; outputs: ``logits`` and ``present.<i>.key|value``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16"}


class DecoderSession:
    def __init__(self, model_path: Path, *, providers: list[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        # By default ONNX Runtime replaces DequantizeLinear -> MatMul (the TensorRT weight-only
        # pattern) by its own kernel with int8 *activations*; that is not what TensorRT
        # computes (on SmolLM2-135M logits moved by 1.4). Level 0 keeps activations in float.
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(model_path), options, providers=providers or ["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]

    def empty_past(self, batch: int) -> dict[str, Any]:
        import numpy as np

        past = {}
        for name in self.past_names:
            shape = self.inputs[name].shape  # [batch, kv_heads, past_len, head_dim]
            dtype = _ORT_TYPES.get(self.inputs[name].type, "float32")
            past[name] = np.zeros((batch, int(shape[1]), 0, int(shape[3])), dtype=dtype)
        return past

    def forward(self, input_ids: Any, past: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        """One forward pass; returns (logits, present) where present maps to the next past."""
        import numpy as np

        batch, length = input_ids.shape
        past = past if past is not None else self.empty_past(batch)
        past_len = next(iter(past.values())).shape[2] if past else 0
        feeds = {"input_ids": input_ids.astype(np.int64)}
        if "attention_mask" in self.inputs:
            feeds["attention_mask"] = np.ones((batch, past_len + length), dtype=np.int64)
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.broadcast_to(np.arange(past_len, past_len + length, dtype=np.int64), (batch, length)).copy()
        feeds.update(past)
        outputs = dict(zip(self.output_names, self.session.run(self.output_names, feeds)))
        present = {
            name.replace("present.", "past_key_values."): value for name, value in outputs.items() if name.startswith("present.")
        }
        return outputs["logits"], present

    def raw_outputs(self, input_ids: Any, past: dict[str, Any] | None = None) -> dict[str, Any]:
        """All named outputs (for parity checks)."""
        logits, present = self.forward(input_ids, past)
        out = {"logits": logits}
        out.update({name.replace("past_key_values.", "present."): value for name, value in present.items()})
        return out
