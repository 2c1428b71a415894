"""FP8 (E4M3) weights and activations, *simulated* in PyTorch.

This module reproduces FP8 numerics for evaluation on any machine (CPU included): weights
are stored as ``torch.float8_e4m3fn`` codes with one float32 scale per output channel,
activations are rounded through E4M3 with a per-tensor scale from calibration ("static") or
a per-token scale computed at run time ("dynamic"), and the matmul itself runs in float32.
It does **not** run FP8 kernels: the speed and memory of FP8 come from the TensorRT engine
built from the exported graph (compute capability >= 8.9), never from :class:`Fp8Linear`.

Scheme (what the ONNX exporter and the engine must reproduce):

    weight_scale[o] = max_i |W[o, i]| / 448                 (448 = largest finite e4m3fn)
    w8[o, i]        = e4m3(W[o, i] / weight_scale[o])       (saturated to ±448)
    x_hat           = e4m3(x / s_x) * s_x                   s_x = input_scale (static, per tensor)
                                                            or max_k |x[t, k]| / 448 (dynamic, per token)
    y               = x_hat @ (w8 * weight_scale[:, None]).T + bias

The checkpoint (``save_fp8_checkpoint``) keeps the float8 codes and scales as they are
(``<name>.weight`` float8_e4m3fn, ``<name>.weight_scale`` float32 [out], ``<name>.input_scale``
float32 scalar for static activations), the layout vLLM/ModelOpt-style FP8 checkpoints use,
with a per-channel ``weight_scale``. Its ``quantization_config`` says ``quant_method: fp8``
but transformers' own FP8 loader (block-wise ``weight_scale_inv``) cannot read it: load it
with :func:`load_fp8_model`.

The calibration that turns a float model into this format is
:func:`edgekit.quantize.fp8.fp8_quantize`; the export stage reads the format from here.

This module imports torch at import time (it defines an ``nn.Module``); edgekit imports it
only inside the stage functions that need it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from edgekit.yamlio import atomic_write
from edgekit.errors import ModelError, StageError

E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
# Smallest scale we divide by: keeps all-zero rows/tokens finite (they quantize to 0 anyway).
MIN_SCALE = 1e-12
ACTIVATION_SCHEMES = ("static", "dynamic")
WHERE = "quantize.method fp8"
SAFETENSORS_FILE = "model.safetensors"


def quantize_weight_fp8(weight: Any) -> tuple[Any, Any]:
    """``(w8, scale)``: float8_e4m3fn codes [out, in] and float32 per-output-channel scales."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    w8 = (w / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return w8, scale


def fp8_roundtrip(x: Any, scale: Any) -> Any:
    """``e4m3(x / scale) * scale`` in float32 (scale broadcast against x)."""
    x = x.float()
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * scale


def dynamic_scale(x: Any) -> Any:
    """Per-token scale: max |x| over the last (channel) axis / 448, shape [..., 1]."""
    return (x.float().abs().amax(dim=-1, keepdim=True) / E4M3_MAX).clamp_min(MIN_SCALE)


def _check_activations(activations: str) -> None:
    if activations not in ACTIVATION_SCHEMES:
        raise StageError(
            f"unknown FP8 activation scheme {activations!r}", where=WHERE, how="use 'static' (per-tensor, from calibration) or 'dynamic' (per token)"
        )


class Fp8Linear(torch.nn.Module):
    """A Linear with E4M3 weights (per-output-channel scale) and E4M3-rounded inputs.

    Simulates FP8 numerics in float32; it does not run FP8 kernels. Buffers: ``weight``
    (float8_e4m3fn [out, in]), ``weight_scale`` (float32 [out]), ``input_scale`` (float32
    scalar, static activations only; ``None`` for dynamic); ``bias`` is an ordinary
    parameter. ``.to(dtype)`` / ``.half()`` move these buffers between devices but never
    change their dtypes (a float16 ``weight_scale`` would change the model).
    """

    _KEEP_DTYPE = ("weight", "weight_scale", "input_scale")

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, activations: str = "static", dtype: Any = None, device: Any = None):
        super().__init__()
        _check_activations(activations)
        self.in_features = in_features
        self.out_features = out_features
        self.activations = activations
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.float8_e4m3fn, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        if activations == "static":
            self.register_buffer("input_scale", torch.ones((), dtype=torch.float32, device=device))
        else:
            self.input_scale = None
        if bias:
            self.bias = torch.nn.Parameter(torch.zeros(out_features, dtype=dtype or torch.float32, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: Any, *, activations: str, input_scale: float | None = None) -> Any:
        if activations == "static" and input_scale is None:
            raise ValueError("static activations need an input_scale")
        module = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None, activations=activations,
            dtype=linear.weight.dtype, device=linear.weight.device,
        )
        w8, scale = quantize_weight_fp8(linear.weight)
        module.weight.copy_(w8)
        module.weight_scale.copy_(scale)
        if activations == "static":
            module.input_scale.fill_(float(input_scale))
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    def dequantized_weight(self) -> Any:
        """``w8 * weight_scale`` in float32 [out, in]: the weight this layer computes with."""
        return self.weight.float() * self.weight_scale[:, None]

    def forward(self, x: Any) -> Any:
        scale = self.input_scale if self.activations == "static" else dynamic_scale(x)
        x_hat = fp8_roundtrip(x, scale)
        bias = None if self.bias is None else self.bias.float()
        return torch.nn.functional.linear(x_hat, self.dequantized_weight(), bias).to(x.dtype)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        kept = {name: self._buffers[name] for name in self._KEEP_DTYPE if self._buffers.get(name) is not None}
        for name in kept:
            self._buffers[name] = None
        super()._apply(fn, recurse)
        for name, tensor in kept.items():
            moved = fn(tensor)  # e.g. .cuda() / .to(device, dtype): take only the device
            self._buffers[name] = tensor.to(device=moved.device)
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, activations={self.activations}"


def _set_submodule(model: Any, name: str, module: Any) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _quantization_config(activations: str) -> dict:
    return {
        "quant_method": "fp8",
        "activation_scheme": activations,
        "weight_scheme": "per_channel",
        "fmt": "e4m3",
        "quantized_by": "edgekit",
        "ignored_layers": ["lm_head"],
    }


def save_fp8_checkpoint(model: Any, out_dir: Path, *, activations: str) -> None:
    """config.json (with ``quantization_config``) + generation_config.json + model.safetensors
    (FP8 codes and scales as they are, every other tensor as it is; a tied embedding once).
    Each file is written to a temporary name and renamed into place."""
    from safetensors.torch import save_file

    _check_activations(activations)
    fp8_modules = {name: m for name, m in model.named_modules() if isinstance(m, Fp8Linear)}
    if not fp8_modules:
        raise StageError("the model has no Fp8Linear to save", where=WHERE, how="run fp8_quantize on it first")
    wrong = [name for name, m in fp8_modules.items() if m.activations != activations]
    if wrong:
        raise StageError(
            f"{wrong[0]} was quantized with {fp8_modules[wrong[0]].activations} activations, not {activations}",
            where=WHERE,
            how="save with the activation scheme fp8_quantize used",
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["quantization_config"] = _quantization_config(activations)
    if not config.get("architectures"):
        config["architectures"] = [type(model).__name__]
    atomic_write(out_dir / "config.json", lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))

    generation = getattr(model, "generation_config", None)
    if generation is None:
        from transformers import GenerationConfig

        generation = GenerationConfig.from_model_config(model.config)
    atomic_write(out_dir / "generation_config.json", lambda p: generation.to_json_file(p))

    tensors: dict[str, Any] = {}
    stored: set[tuple] = set()
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and key in stored:  # tied (lm_head = embed_tokens): stored once
            continue
        stored.add(key)
        tensors[name] = tensor.detach().to("cpu").contiguous()
    with torch.no_grad():
        atomic_write(out_dir / SAFETENSORS_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))


def load_fp8_model(path: Path, *, dtype: Any = None) -> Any:
    """The model :func:`save_fp8_checkpoint` wrote, with :class:`Fp8Linear` modules where the
    file has a ``weight_scale``. Strict: a missing or unexpected tensor is a ModelError."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.modeling_utils import no_init_weights

    from edgekit.weights.hf import quiet_transformers

    quiet_transformers()
    path = Path(path)
    weights_file = path / SAFETENSORS_FILE
    config = AutoConfig.from_pretrained(path)
    qconfig = getattr(config, "quantization_config", None)
    if not isinstance(qconfig, dict) or qconfig.get("quant_method") != "fp8" or not weights_file.is_file():
        raise ModelError(
            f"{path} is not an edgekit FP8 checkpoint (config.json quantization_config.quant_method fp8 + {SAFETENSORS_FILE})",
            where=str(path),
            how="point at the output of a quantize stage with method fp8",
        )
    activations = qconfig.get("activation_scheme", "static")
    if activations not in ACTIVATION_SCHEMES:
        raise ModelError(f"unknown activation_scheme {activations!r} in config.json", where=str(path / "config.json"), how="use 'static' or 'dynamic'")
    del config.quantization_config  # transformers' own fp8 quantizer must not touch this model
    if dtype is None:
        dtype = getattr(config, "dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)

    with safe_open(str(weights_file), framework="pt") as handle:
        keys = list(handle.keys())
    for key in keys:
        if not key.endswith(".weight_scale"):
            continue
        name = key.removesuffix(".weight_scale")
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            linear = None
        if not isinstance(linear, torch.nn.Linear):
            raise ModelError(
                f"{SAFETENSORS_FILE} has FP8 scales for {name}, which is not a Linear of {type(model).__name__}",
                where=str(weights_file),
                how="re-create the checkpoint with edgekit's quantize stage (method fp8) for this config.json",
            )
        _set_submodule(
            model, name,
            Fp8Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, activations=activations, dtype=linear.weight.dtype),
        )

    from edgekit.weights.state import load_state_strict

    model.tie_weights()
    load_state_strict(
        model, load_file(str(weights_file)), str(weights_file),
        how="re-create the checkpoint with edgekit's quantize stage (method fp8); a file edited by hand cannot be loaded",
    )
    model.tie_weights()
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    model.config.quantization_config = qconfig  # for readers of the config; the modules are already Fp8Linear
    model.eval()
    return model
