"""Quantized checkpoints on disk: write them, read them back, and simulate them in PyTorch.

A checkpoint directory is a normal Hugging Face one (config.json, generation_config.json,
model.safetensors, tokenizer files) whose ``config.json`` carries a ``quantization_config``
and whose quantized linear layers are stored in the GPTQ v1 layout
(:mod:`edgekit.weights.packing`) instead of a float ``.weight``.

:class:`QuantLinear` is a *simulation* for evaluation (perplexity, parity references): it
dequantizes the packed weight once (cached per dtype/device) and runs ``F.linear`` on it. The
numbers equal what an integer kernel computes up to float accumulation order; the speed and
memory are those of the float model. Deployment runs the exported ONNX/TensorRT kernels.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch  # QuantLinear subclasses nn.Module (edgekit/__init__ never imports this module)
from torch import nn

from edgekit.yamlio import atomic_write
from edgekit.errors import ModelError
from edgekit.weights.grid import QuantizedWeight
from edgekit.weights.packing import pack_gptq, unpack_gptq
from edgekit.weights.state import _storage_key, load_state_strict

WEIGHTS_FILE = "model.safetensors"
PACKED_KEYS = ("qweight", "qzeros", "scales", "g_idx")


# ----------------------------------------------------------------------------- reading config


def read_quantization_config(path: Path) -> dict | None:
    """The ``quantization_config`` block of ``path/config.json`` (None if absent)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read config.json: {exc}", where=str(config_file),
                         how="re-create the checkpoint (its config.json is damaged)") from exc
    qc = config.get("quantization_config")
    return qc if isinstance(qc, dict) else None


def is_quantized_checkpoint(path: Path) -> str | None:
    """The checkpoint's ``quant_method`` ("gptq", "fp8", ...) or None for a float checkpoint."""
    qc = read_quantization_config(path)
    return str(qc.get("quant_method")) if qc and qc.get("quant_method") else None


# ----------------------------------------------------------------------------- saving


def _dedupe_tied(state: dict[str, Any]) -> dict[str, Any]:
    """Keep one name per shared storage (tied embeddings), the first in module order, as
    transformers does when it saves (``model.embed_tokens.weight``, not ``lm_head.weight``)."""
    seen: set[tuple] = set()
    kept = {}
    for name, tensor in state.items():
        key = _storage_key(tensor)
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        kept[name] = tensor
    return kept


def save_quantized_checkpoint(model: Any, quantized: dict[str, QuantizedWeight], out_dir: Path, *,
                              quantization_config: dict) -> None:
    """Write config.json (+ quantization_config), generation_config.json and model.safetensors.

    Each layer named in ``quantized`` is stored as ``.qweight/.qzeros/.scales/.g_idx`` (+ its
    ``.bias``), never as ``.weight``; every other tensor is stored as is (the model's dtype).
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    modules = dict(model.named_modules())
    for name in quantized:
        if not isinstance(modules.get(name), nn.Linear):
            raise ValueError(f"{name!r} is not a torch.nn.Linear of the model")

    state = {k: v for k, v in model.state_dict().items() if not _is_quantized_weight(k, quantized)}
    tensors = {k: v.detach().cpu().contiguous() for k, v in _dedupe_tied(state).items()}
    for name, qw in quantized.items():
        module = modules[name]
        if (qw.out_features, qw.in_features) != (module.out_features, module.in_features):
            raise ValueError(f"{name}: quantized shape {(qw.out_features, qw.in_features)} does not match "
                             f"the layer's {(module.out_features, module.in_features)}")
        for key, tensor in pack_gptq(qw).items():
            tensors[f"{name}.{key}"] = tensor.cpu().contiguous()

    config = json.loads(model.config.to_json_string(use_diff=True))
    config["quantization_config"] = dict(quantization_config)
    if not all(qw.contiguous_groups for qw in quantized.values()):
        # the file must say what the weights are: a permuted g_idx is desc_act with dynamic groups
        config["quantization_config"].update(desc_act=True, static_groups=False)
    if _output_embedding_name(model) in quantized:
        config["tie_word_embeddings"] = False  # the float embedding stays, lm_head is packed
    atomic_write(out_dir / "config.json", lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        atomic_write(out_dir / "generation_config.json", lambda p: p.write_text(generation.to_json_string()))
    atomic_write(out_dir / WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))


def _is_quantized_weight(key: str, quantized: dict) -> bool:
    return key.endswith(".weight") and key[: -len(".weight")] in quantized


# ----------------------------------------------------------------------------- the module


class QuantLinear(nn.Module):
    """A Linear whose weight is stored packed (GPTQ v1 buffers), for evaluation in PyTorch.

    A simulation: ``forward`` is ``F.linear(x, W_hat)`` with ``W_hat`` the dequantized weight,
    computed once and cached per (dtype, device); integer kernels are the exporters' business.
    The buffers carry the checkpoint's names, so a safetensors state dict loads straight in.
    """

    def __init__(self, in_features: int, out_features: int, *, bits: int, group_size: int | None,
                 symmetric: bool, bias: bool, dtype: Any = None, device: Any = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.symmetric = bits, symmetric
        self.group_size = in_features if group_size in (None, -1) else int(group_size)
        self.dtype = dtype or torch.float32
        n_groups = -(-in_features // self.group_size)
        if (in_features * bits) % 32 or (out_features * bits) % 32:
            raise ValueError(f"{bits}-bit codes of a [{out_features}, {in_features}] layer do not fill 32-bit words")
        i32 = dict(dtype=torch.int32, device=device)
        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features, **i32))
        self.register_buffer("qzeros", torch.zeros(n_groups, out_features * bits // 32, **i32))
        self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=torch.float16, device=device))
        self.register_buffer("g_idx", torch.arange(in_features, **i32) // self.group_size)
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=self.dtype, device=device))
        else:
            self.bias = None
        self._cache: dict[tuple, Any] = {}

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: Any = None, dtype: Any = None) -> "QuantLinear":
        layer = cls(qw.in_features, qw.out_features, bits=qw.bits, group_size=qw.group_size,
                    symmetric=qw.symmetric, bias=bias is not None, dtype=dtype)
        with torch.no_grad():
            for key, tensor in pack_gptq(qw).items():
                getattr(layer, key).copy_(tensor)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def quantized_weight(self) -> QuantizedWeight:
        """The unpacked codes/grid (on the CPU, for exporters)."""
        return self._unpack("cpu")

    def _unpack(self, device: Any) -> QuantizedWeight:
        return unpack_gptq({k: getattr(self, k).to(device) for k in PACKED_KEYS}, bits=self.bits,
                           group_size=self.group_size, symmetric=self.symmetric)

    def dequantized_weight(self, dtype: Any = None, device: Any = None) -> Any:
        """``W_hat`` [out, in] in ``dtype`` (default: the layer's float dtype), cached."""
        dtype = dtype or self.dtype
        device = torch.device(device) if device is not None else self.qweight.device
        key = (dtype, str(device))
        if key not in self._cache:
            w = self._unpack(self.qweight.device).dequantize(torch.float32)
            self._cache[key] = w.to(device=device, dtype=dtype)
        return self._cache[key]

    def forward(self, x: Any) -> Any:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return torch.nn.functional.linear(x, self.dequantized_weight(x.dtype, x.device), bias)

    # Any change of the buffers (load_state_dict, .to(), .cuda()) invalidates the cache.
    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._cache.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``model.to(dtype/device)``: the bias follows, the scales move but stay float16 (a
        cast to bfloat16 would silently change the quantized weight)."""
        self._cache.clear()
        scales = self.scales
        result = super()._apply(fn, *args, **kwargs)
        probe = fn(torch.zeros(0, dtype=self.dtype, device=scales.device))  # where fn sends a float tensor
        self.scales = scales.to(device=probe.device)
        if probe.is_floating_point():
            self.dtype = probe.dtype
        return result

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, sym={self.symmetric}, bias={self.bias is not None}")


# ----------------------------------------------------------------------------- loading


def _torch_dtype(dtype: Any) -> Any:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    return dtype


def _weight_files(path: Path) -> list[Path]:
    """model.safetensors, or the shards listed in model.safetensors.index.json."""
    index = path / f"{WEIGHTS_FILE}.index.json"
    if not (path / WEIGHTS_FILE).is_file() and index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"cannot read {index.name}: {exc}", where=str(index),
                             how="re-create the checkpoint with the quantize stage") from exc
        return [path / shard for shard in shards]
    return [path / WEIGHTS_FILE]


def _read_tensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    tensors: dict[str, Any] = {}
    for weights in _weight_files(Path(path)):
        if not weights.is_file():
            raise ModelError(f"no {weights.name} in the quantized checkpoint", where=str(path),
                             how="re-create the checkpoint with the quantize stage")
        try:
            tensors.update(load_file(str(weights)))
        except Exception as exc:  # safetensors raises its own SafetensorError for damaged files
            raise ModelError(f"cannot read {weights.name}: {exc}", where=str(weights),
                             how="re-create the checkpoint with the quantize stage (the file is damaged)") from exc
    return tensors


def _quantized_layer_names(tensors: dict[str, Any]) -> list[str]:
    return sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))


def _gptq_settings(qc: dict, where: str) -> tuple[int, int | None, bool]:
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt != "gptq":
        raise ModelError(f"GPTQ checkpoint_format {fmt!r} is not supported", where=where,
                         how="convert it to the v1 'gptq' format (e.g. with GPTQModel) or re-quantize with edgekit")
    try:
        bits, group_size, sym = int(qc["bits"]), int(qc.get("group_size", -1)), bool(qc.get("sym", True))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"quantization_config is incomplete ({exc})", where=where,
                         how="re-create the checkpoint with the quantize stage") from exc
    return bits, (None if group_size == -1 else group_size), sym


def read_quantized_weights(path: Path) -> dict[str, QuantizedWeight]:
    """Every quantized layer of a GPTQ-format checkpoint, unpacked (for the ONNX exporter)."""
    path = Path(path)
    qc = read_quantization_config(path)
    if not qc or qc.get("quant_method") != "gptq":
        raise ModelError("not a GPTQ-format quantized checkpoint", where=str(path),
                         how="point at the output of a quantize stage that writes the gptq format")
    bits, group_size, sym = _gptq_settings(qc, str(path))
    tensors = _read_tensors(path)
    result = {}
    for name in _quantized_layer_names(tensors):
        try:
            result[name] = unpack_gptq({k: tensors[f"{name}.{k}"] for k in PACKED_KEYS if f"{name}.{k}" in tensors},
                                       bits=bits, group_size=group_size, symmetric=sym)
        except (KeyError, ValueError) as exc:
            raise ModelError(f"quantized layer {name} is damaged: {exc}", where=str(path / WEIGHTS_FILE),
                             how="re-create the checkpoint with the quantize stage") from exc
    return result


def _build_empty_model(config: Any, dtype: Any) -> Any:
    """The architecture with allocated but uninitialised parameters (they are all loaded next;
    random init would cost seconds for nothing). Non-persistent buffers (rotary inv_freq) are
    computed normally, which a meta-device build would not do."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_utils import no_init_weights

    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # post_init skips tying under no_init_weights
    return model


def _replace_linears(model: Any, names: list[str], tensors: dict[str, Any], *, bits: int,
                     group_size: int | None, sym: bool, dtype: Any, where: str) -> None:
    modules = dict(model.named_modules())
    for name in names:
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            raise ModelError(f"the checkpoint quantizes {name!r}, which is not a Linear layer of this architecture",
                             where=where, how="re-create the checkpoint from the matching model")
        layer = QuantLinear(module.in_features, module.out_features, bits=bits, group_size=group_size,
                            symmetric=sym, bias=module.bias is not None or f"{name}.bias" in tensors, dtype=dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, layer)


def load_quantized_model(path: Path, *, dtype: Any = None) -> Any:
    """A quantized checkpoint as an eval-mode causal LM (QuantLinear simulation for GPTQ-format
    checkpoints; FP8 checkpoints go to :func:`edgekit.weights.fp8.load_fp8_model`).

    ``dtype`` (torch dtype or "float32"/"float16"/"bfloat16") is the compute dtype of the float
    parts; default float32, like ``from_pretrained``.
    """
    path = Path(path)
    qc = read_quantization_config(path)
    method = qc.get("quant_method") if qc else None
    if method == "fp8":
        from edgekit.weights.fp8 import load_fp8_model

        return load_fp8_model(path, dtype=dtype)
    if method != "gptq":
        raise ModelError(f"unsupported quantization method {method!r}" if method else "not a quantized checkpoint",
                         where=str(path), how="load float checkpoints with the load stage; edgekit reads 'gptq' and 'fp8'")
    from edgekit.weights.hf import quiet_transformers
    from transformers import AutoConfig

    quiet_transformers()
    where = str(path / WEIGHTS_FILE)
    bits, group_size, sym = _gptq_settings(qc, str(path))
    dtype = _torch_dtype(dtype)
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # build a plain float model; we swap in QuantLinear ourselves

    tensors = _read_tensors(path)
    names = _quantized_layer_names(tensors)
    model = _build_empty_model(config, dtype)
    if _output_embedding_name(model) in names:
        model.config.tie_word_embeddings = False  # a quantized lm_head cannot share the float embedding
    _replace_linears(model, names, tensors, bits=bits, group_size=group_size, sym=sym, dtype=dtype, where=where)
    load_state_strict(model, tensors, where)
    model.tie_weights()
    for module in model.modules():
        if isinstance(module, QuantLinear):
            _check_g_idx(module, where)
    model.edgekit_quantization_config = dict(qc)
    return model.eval()


def _output_embedding_name(model: Any) -> str | None:
    out = model.get_output_embeddings()
    return next((n for n, m in model.named_modules() if m is out), None) if out is not None else None


def _check_g_idx(module: QuantLinear, where: str) -> None:
    n_groups = module.scales.shape[0]
    g = module.g_idx
    if int(g.min()) < 0 or int(g.max()) >= n_groups:
        raise ModelError(f"g_idx holds group indices outside [0, {n_groups})", where=where,
                         how="re-create the checkpoint with the quantize stage (it is damaged)")


def dequantize_model(model: Any) -> Any:
    """Replace every QuantLinear by an nn.Linear holding its dequantized weight (in place,
    e.g. before a float ONNX export). Returns the model."""
    replacements = [(name, m) for name, m in model.named_modules() if isinstance(m, QuantLinear)]
    modules = dict(model.named_modules())
    # The float dtype the model runs in now (it may have been cast since loading).
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    for name, layer in replacements:
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                           dtype=dtype or layer.dtype, device=layer.qweight.device)
        with torch.no_grad():
            linear.weight.copy_(layer.dequantized_weight(torch.float32))
            if layer.bias is not None:
                linear.bias.copy_(layer.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, linear)
    return model
