"""FP8 (E4M3) calibration: replace a float model's decoder-layer Linears with
:class:`~edgekit.weights.fp8.Fp8Linear` (the format, its scheme, and its checkpoints live in
:mod:`edgekit.weights.fp8`, which the export stage reads too).

This module imports torch at import time; edgekit imports it only inside the quantize stage's
run function.
"""

from __future__ import annotations

from typing import Any

import torch

from edgekit.errors import StageError
from edgekit.weights.fp8 import E4M3_MAX, WHERE, Fp8Linear, _check_activations, _set_submodule


def _decoder_linears(model: Any) -> list[tuple[str, Any]]:
    from edgekit.weights.layers import decoder_linears

    try:
        return decoder_linears(model)
    except ValueError as exc:
        raise StageError(str(exc), where=WHERE, how="use a Llama-like causal LM (model.model.layers)") from exc


def fp8_quantize(model: Any, calibration: list[Any], *, activations: str = "static") -> dict[str, dict]:
    """Replace every decoder-layer Linear of ``model`` (not ``lm_head``) in place with an
    :class:`Fp8Linear`; return, per module name, what the ONNX exporter needs:
    ``{"weight": float32 ndarray [out, in] (= w8 * scale, exactly), "weight_scale": float32
    ndarray [out], "input_scale": float | None}``.

    Static activations: ``input_scale`` = max |input| of that Linear over all calibration
    samples (each a [1, seq] token-id tensor, run through the float model) / 448.
    """
    _check_activations(activations)
    targets = _decoder_linears(model)
    if not targets:
        raise StageError("the decoder layers contain no torch.nn.Linear", where=WHERE, how="use a Llama-like causal LM")
    amax: dict[str, Any] = {}
    if activations == "static":
        if not calibration:
            raise StageError("static FP8 activation scales need calibration samples", where=WHERE, how="give calibration samples, or use fp8 activations 'dynamic'")
        handles = []

        def observer(name: str) -> Any:
            def hook(_module: Any, args: tuple) -> None:
                value = args[0].detach().abs().amax().float()
                amax[name] = torch.maximum(amax[name], value) if name in amax else value

            return hook

        for name, module in targets:
            handles.append(module.register_forward_pre_hook(observer(name)))
        device = next(model.parameters()).device
        try:
            with torch.inference_mode():
                for ids in calibration:
                    model(input_ids=ids.to(device), use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
    exported: dict[str, dict] = {}
    with torch.no_grad():
        for name, linear in targets:
            input_scale = None
            if activations == "static":
                seen = float(amax[name]) if name in amax else 0.0
                input_scale = seen / E4M3_MAX if seen > 0 else 1.0
            module = Fp8Linear.from_linear(linear, activations=activations, input_scale=input_scale)
            _set_submodule(model, name, module)
            exported[name] = {
                "weight": module.dequantized_weight().cpu().numpy(),
                "weight_scale": module.weight_scale.detach().cpu().numpy().copy(),
                "input_scale": None if input_scale is None else float(module.input_scale),
            }
    return exported
