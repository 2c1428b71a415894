"""A Llama decoder written directly as an ONNX Runtime graph of fused contrib operators.

optimum's export traces the PyTorch model, so one decode step of a 30-layer model runs about
1500 kernels: per layer the rotary embedding, the causal mask, the attention reshapes and the
RMS norms are each a dozen tiny operators, and on a CPU their dispatch costs more than the
matrix products (measured on SmolLM2-135M pruned + INT4: ~60 % of a decode step). This module
writes the same decoder the way ONNX Runtime's own model builder does, from the checkpoint's
weights, with ~11 nodes per layer:

* ``Gather`` embedding;
* ``SimplifiedLayerNormalization`` (first layer) / ``SkipSimplifiedLayerNormalization`` (the
  residual add fused into the next RMS norm);
* one ``MatMul`` for q/k/v together and one for gate/up together: ``com.microsoft.MatMulNBits``
  for quantized weights (our GPTQ/RTN codes, packed by
  :func:`edgekit.export.quantized.matmulnbits.matmulnbits_weight`) or a float ``MatMul`` (``W^T``
  initializers) for float weights;
* ``com.microsoft.GroupQueryAttention`` on the packed q/k/v with ``do_rotary=1``: the rotary
  embedding (non-interleaved, HF ``rotate_half``), the causal mask and the KV-cache append in
  one kernel, reading cos/sin caches stored as initializers (computed by the model's own
  rotary module, so rope theta and static rope scaling are exactly the checkpoint's);
* SiLU gate (``Sigmoid`` x ``Mul``, which ONNX Runtime fuses) x up, down projection;
* final RMS norm; ``lm_head``: a MatMul on the tied embedding through a ``Transpose`` that
  ONNX Runtime folds at load (one copy of the matrix on disk) or on its own weight, or an
  8-/4-bit ``MatMulNBits`` of it (``lm_head_bits``; round-to-nearest, group
  ``lm_head_group_size``).

The inputs and outputs are optimum's (``input_ids``, ``attention_mask``, ``position_ids``,
``past_key_values.<i>.key|value`` -> ``logits``, ``present.<i>.key|value``; float32, cache
``[batch, kv_heads, length, head_dim]``), so every consumer of an export (the runtime's
OnnxRuntimeBranch, perplexity, the parity check) reads it unchanged. The attention's sequence
lengths come from ``attention_mask`` inside the graph (``seqlens_k = sum(mask) - 1``, total =
its width); ``position_ids`` is accepted and unused (positions follow from the cache length,
which is what a left-to-right decoder feeds). Batch > 1 is exact when every row has the same
length (no padding); a multi-token step after a non-empty cache (speculative verification)
needs batch 1, as GroupQueryAttention requires.

Scope: ``LlamaForCausalLM`` (SmolLM2, Llama 2/3, pruned variants with any head counts and MLP
width), float32, ONNX Runtime's CPU execution provider. Heavy imports happen inside functions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgekit.errors import StageError

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx_data"
GRAPH_FORMAT = "ort-fused"
OPSET = 21  # default-domain opset of the graph (com.microsoft ops are version 1)
# Rotary variants whose cos/sin depend on the sequence length at run time: a static cache in
# the graph cannot express them.
_DYNAMIC_ROPE = ("dynamic", "longrope")
_SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)


def build_fused_decoder(
    source: Any,
    out_dir: Path,
    *,
    lm_head_bits: int | None = None,
    lm_head_group_size: int = 32,
    accuracy_level: int = 0,
    max_length: int | None = None,
    fuse_qkv: bool = True,
    fuse_gate_up: bool = True,
    trust_remote_code: bool = False,
    check: bool = True,
) -> dict[str, Any]:
    """Write ``out_dir/model.onnx`` + ``model.onnx_data`` for a Llama-family decoder.

    ``source``: a checkpoint directory (float, or GPTQ-format quantized: its codes become
    MatMulNBits) or a loaded model (a ``LlamaForCausalLM`` whose Linears are ``nn.Linear`` or
    edgekit's ``QuantLinear``). ``lm_head_bits`` (None, 4 or 8) quantizes a float lm_head
    round-to-nearest, symmetric, in groups of ``lm_head_group_size`` (an lm_head the checkpoint
    already quantized keeps its own codes). ``accuracy_level`` is MatMulNBits' compute type
    (0: float32, exact; 4: int8 activations, faster). ``max_length`` bounds the rotary cache
    (default: the config's ``max_position_embeddings``); a sequence longer than it fails at
    run time. ``fuse_qkv`` / ``fuse_gate_up`` pack those projections into one MatMul each.

    Returns a report: node counts per operator, bytes written, the lm_head form, notes.
    """
    import collections

    import onnx

    from edgekit.export.quantized.onnx_file import save_onnx

    if lm_head_bits not in (None, 4, 8):
        raise StageError(f"lm_head_bits must be 4, 8 or None, got {lm_head_bits!r}", where="build_fused_decoder",
                         how="use lm_head_bits 8 (or leave it unset for a float lm_head)")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise StageError(f"accuracy_level must be 0..4, got {accuracy_level!r}", where="build_fused_decoder",
                         how="use 0 (float32, exact) or 4 (int8 activations)")
    model = _load_model(source, trust_remote_code)
    spec = _decoder_spec(model, max_length)
    builder = _GraphBuilder(accuracy_level)
    notes: list[str] = []
    proto = _build(builder, model, spec, lm_head_bits, lm_head_group_size, fuse_qkv, fuse_gate_up, notes)
    out_dir = Path(out_dir)
    nbytes = save_onnx(proto, out_dir / MODEL_FILE)
    ops = collections.Counter(node.op_type for node in proto.graph.node)
    del proto
    if check:
        try:
            _check_loads(out_dir / MODEL_FILE, notes)
        except StageError:  # a graph ONNX Runtime cannot load is no result: leave nothing behind
            for name in (MODEL_FILE, DATA_FILE):
                (out_dir / name).unlink(missing_ok=True)
            raise
    return {
        "format": GRAPH_FORMAT,
        "opset": OPSET,
        "layers": spec["layers"],
        "nodes": sum(ops.values()),
        "ops": dict(sorted(ops.items())),
        "bytes": nbytes,
        "lm_head": spec["lm_head_form"],
        "linears": spec["linear_forms"],
        "rotary": {"type": spec["rope_type"], "cache_length": spec["max_length"]},
        "accuracy_level": accuracy_level,
        "notes": notes,
        "onnx_version": onnx.__version__,
    }


# --------------------------------------------------------------------------- the model


def _load_model(source: Any, trust_remote_code: bool) -> Any:
    if isinstance(source, (str, Path)):
        from edgekit.weights.checkpoint import load_checkpoint

        path = Path(source)
        if not (path / "config.json").is_file():
            raise StageError("no checkpoint here (config.json is missing)", where=str(path),
                             how="point at a checkpoint directory written by a load, prune, distill or quantize stage")
        model, _ = load_checkpoint(path, dtype="float32", trust_remote_code=trust_remote_code)
        return model
    return source


def _decoder_spec(model: Any, max_length: int | None) -> dict[str, Any]:
    """Shapes and settings read from the model (config and weights), checked for what the
    graph can express."""
    config = model.config
    architectures = list(getattr(config, "architectures", None) or [type(model).__name__])
    where = f"{architectures[0]} ({config.model_type})"
    if config.model_type != "llama" or not any(a in _SUPPORTED_ARCHITECTURES for a in architectures + [type(model).__name__]):
        raise StageError(
            f"the fused ONNX Runtime graph covers Llama-family decoders (LlamaForCausalLM), not {where}",
            where="export_onnx.onnxruntime_graph",
            how="use onnxruntime_graph: optimum for this architecture",
        )
    if getattr(config, "hidden_act", "silu") != "silu":
        raise StageError(f"hidden_act {config.hidden_act!r} is not SiLU", where=where, how="use onnxruntime_graph: optimum")
    rotary = model.model.rotary_emb
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type in _DYNAMIC_ROPE:
        raise StageError(
            f"rope scaling {rope_type!r} changes the rotary angles with the sequence length, which a static "
            "cos/sin cache cannot express",
            where=where,
            how="use onnxruntime_graph: optimum for this model",
        )
    attention = model.model.layers[0].self_attn
    head_dim = int(getattr(attention, "head_dim", 0) or config.hidden_size // config.num_attention_heads)
    if head_dim % 2:
        raise StageError(f"head_dim {head_dim} is odd; rotary embeddings need an even one", where=where,
                         how="use onnxruntime_graph: optimum")
    if getattr(config, "sliding_window", None):
        raise StageError("sliding-window attention is not expressed by this graph", where=where,
                         how="use onnxruntime_graph: optimum")
    positions = int(max_length or getattr(config, "max_position_embeddings", 0) or 4096)
    return {
        "layers": len(model.model.layers),
        "hidden": int(config.hidden_size),
        "heads": int(config.num_attention_heads),
        "kv_heads": int(config.num_key_value_heads),
        "head_dim": head_dim,
        "eps": float(config.rms_norm_eps),
        "vocab": int(model.get_output_embeddings().out_features),
        "rope_type": rope_type,
        "max_length": positions,
        "linear_forms": {},
        "lm_head_form": None,
    }


def _rotary_caches(model: Any, spec: dict[str, Any]) -> tuple[Any, Any]:
    """cos/sin [max_length, head_dim / 2] float32 from the model's own rotary module: the
    angles (and any static scaling, including the attention factor folded into cos/sin) are
    bit-for-bit what PyTorch applies."""
    import numpy as np
    import torch

    rotary = model.model.rotary_emb
    half = spec["head_dim"] // 2
    probe = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rotary(probe, torch.arange(spec["max_length"], dtype=torch.int64)[None, :])
    cos, sin = cos[0].float().numpy(), sin[0].float().numpy()
    halves_equal = np.array_equal(cos[:, :half], cos[:, half:]) and np.array_equal(sin[:, :half], sin[:, half:])
    if cos.shape[-1] != 2 * half or not halves_equal:
        raise StageError("the model's rotary embedding is not the rotate-half layout over the whole head",
                         where="model.model.rotary_emb", how="use onnxruntime_graph: optimum for this model")
    return np.ascontiguousarray(cos[:, :half]), np.ascontiguousarray(sin[:, :half])


def _linear_parts(module: Any, where: str) -> tuple[str, Any, Any]:
    """('quantized', QuantizedWeight, bias) or ('float', W [out, in] float32 numpy, bias)."""
    import numpy as np
    import torch

    from edgekit.weights.loader import QuantLinear

    bias = None if getattr(module, "bias", None) is None else module.bias.detach().float().cpu().numpy()
    if isinstance(module, QuantLinear):
        qw = module.quantized_weight()
        if not qw.contiguous_groups:
            raise StageError(f"quantized weight '{where}' uses act-order groups (g_idx is not arange(in) // group_size)",
                             how="quantize with static groups (edgekit's GPTQ always writes contiguous groups)")
        return "quantized", qw, bias
    if isinstance(module, torch.nn.Linear):
        return "float", module.weight.detach().float().cpu().numpy().astype(np.float32, copy=False), bias
    raise StageError(f"'{where}' is a {type(module).__name__}, which the fused graph cannot express",
                     how="export float or GPTQ/RTN-quantized (edgekit QuantLinear) checkpoints; "
                     "FP8 uses onnxruntime_graph: optimum")


def _concat_parts(parts: list[tuple[str, Any, Any]]) -> tuple[str, Any, Any] | None:
    """Several Linears reading the same input as one (outputs concatenated), or None when
    their forms differ (float next to quantized, other bits or group size)."""
    import numpy as np
    import torch

    from edgekit.weights.grid import QuantizedWeight

    kinds = {p[0] for p in parts}
    if len(kinds) != 1:
        return None
    biases = [p[2] for p in parts]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        biases = [b if b is not None else np.zeros(_out_features(p), np.float32) for b, p in zip(biases, parts)]
    bias = None if biases[0] is None else np.concatenate(biases)
    if kinds == {"float"}:
        return "float", np.concatenate([p[1] for p in parts], axis=0), bias
    qws = [p[1] for p in parts]
    if len({(q.bits, q.group_size, q.symmetric, q.in_features) for q in qws}) != 1:
        return None
    first = qws[0]
    merged = QuantizedWeight(
        qweight=torch.cat([q.qweight for q in qws]), scales=torch.cat([q.scales for q in qws]),
        zeros=torch.cat([q.zeros for q in qws]), g_idx=first.g_idx, bits=first.bits,
        group_size=first.group_size, symmetric=first.symmetric,
    )
    return "quantized", merged, bias


def _out_features(part: tuple[str, Any, Any]) -> int:
    return int(part[1].shape[0]) if part[0] == "float" else part[1].out_features


# --------------------------------------------------------------------------- the graph


class _GraphBuilder:
    """Nodes and initializers in graph order (names are unique by construction: layer prefixes)."""

    def __init__(self, accuracy_level: int):
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.accuracy_level = accuracy_level

    def node(self, op: str, inputs: list[str], outputs: list[str] | int = 1, *, name: str, domain: str = "",
             **attrs: Any) -> list[str]:
        from onnx import helper

        if isinstance(outputs, int):
            outputs = [f"{name}/output_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain or None, **attrs))
        return outputs

    def constant(self, name: str, array: Any) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(array, name=name))
        return name

    def raw(self, name: str, data_type: int, dims: list[int], raw: bytes) -> str:
        from edgekit.export.quantized.onnx_edit import raw_tensor

        self.initializers.append(raw_tensor(name, data_type, dims, raw))
        return name

    def linear(self, x: str, part: tuple[str, Any, Any], name: str) -> str:
        """y = x @ W^T (+ bias) as MatMulNBits (quantized) or MatMul (+ Add) (float)."""
        import numpy as np
        from onnx import TensorProto

        from edgekit.export.quantized.matmulnbits import matmulnbits_weight
        from edgekit.export.quantized.onnx_edit import MS_DOMAIN

        kind, weight, bias = part
        if kind == "float":
            w_t = self.constant(f"{name}.weight_t", np.ascontiguousarray(weight.T))
            (y,) = self.node("MatMul", [x, w_t], name=f"{name}/MatMul")
            if bias is not None:
                (y,) = self.node("Add", [y, self.constant(f"{name}.bias", bias.astype(np.float32))], name=f"{name}/Add")
            return y
        packed = matmulnbits_weight(weight, np.float32)
        inputs = [x, self.raw(f"{name}.qweight", TensorProto.UINT8, *packed.b),
                  self.raw(f"{name}.scales", TensorProto.FLOAT, *packed.scales)]
        inputs.append(self.raw(f"{name}.qzeros", TensorProto.UINT8, *packed.zero_points) if packed.zero_points else "")
        if bias is not None:
            inputs += ["", self.constant(f"{name}.bias", bias.astype(np.float32))]  # g_idx (deprecated) omitted
        while inputs[-1] == "":
            inputs.pop()
        attrs = dict(packed.attrs)
        if self.accuracy_level:
            attrs["accuracy_level"] = self.accuracy_level
        (y,) = self.node("MatMulNBits", inputs, name=f"{name}/MatMulNBits", domain=MS_DOMAIN, **attrs)
        return y


def _form(part: tuple[str, Any, Any]) -> str:
    if part[0] == "float":
        return "float32 MatMul"
    qw = part[1]
    return f"MatMulNBits {qw.bits}-bit group {qw.group_size}{' symmetric' if qw.symmetric else ''}"


def _build(b: _GraphBuilder, model: Any, spec: dict[str, Any], lm_head_bits: int | None, lm_head_group_size: int,
           fuse_qkv: bool, fuse_gate_up: bool, notes: list[str]) -> Any:
    import numpy as np
    from onnx import TensorProto, helper

    from edgekit.export.quantized.onnx_edit import MS_DOMAIN, set_opsets

    heads, kv_heads, head_dim, eps = spec["heads"], spec["kv_heads"], spec["head_dim"], spec["eps"]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", spec["vocab"]])]
    layers = model.model.layers
    for i, layer in enumerate(layers):
        layer_kv = int(layer.self_attn.k_proj.out_features) // head_dim
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(
                f"past_key_values.{i}.{kind}", TensorProto.FLOAT, ["batch_size", layer_kv, "past_sequence_length", head_dim]))
            outputs.append(helper.make_tensor_value_info(
                f"present.{i}.{kind}", TensorProto.FLOAT, ["batch_size", layer_kv, "total_sequence_length", head_dim]))

    # Sequence lengths for GroupQueryAttention, from the mask: seqlens_k = sum(mask) - 1 per
    # row (int32), total_sequence_length = the mask's width (int32 scalar).
    (mask_sum,) = b.node("ReduceSum", ["attention_mask", b.constant("axes_1", np.array([1], np.int64))],
                         name="/seqlens/ReduceSum", keepdims=0)
    (last,) = b.node("Sub", [mask_sum, b.constant("one_i64", np.array(1, np.int64))], name="/seqlens/Sub")
    (seqlens_k,) = b.node("Cast", [last], name="/seqlens/Cast", to=TensorProto.INT32)
    (mask_shape,) = b.node("Shape", ["attention_mask"], name="/total/Shape")
    (width,) = b.node("Gather", [mask_shape, b.constant("index_1", np.array(1, np.int64))], name="/total/Gather", axis=0)
    (total_len,) = b.node("Cast", [width], name="/total/Cast", to=TensorProto.INT32)

    cos, sin = _rotary_caches(model, spec)
    cos_name, sin_name = b.constant("rotary.cos_cache", cos), b.constant("rotary.sin_cache", sin)
    embedding = model.model.embed_tokens.weight.detach().float().cpu().numpy()
    embed_name = b.constant("model.embed_tokens.weight", embedding)
    (hidden,) = b.node("Gather", [embed_name, "input_ids"], name="/model/embed_tokens/Gather", axis=0)

    def norm_weight(module: Any, name: str) -> str:
        return b.constant(name, module.weight.detach().float().cpu().numpy())

    residual: str | None = None
    pending: str | None = None  # the last block's output, added to the residual by the next norm
    forms = spec["linear_forms"]

    def project(x: str, modules: list[tuple[str, Any]], fuse: bool, name: str, *, split: bool = True) -> list[str]:
        """Outputs of several Linears on ``x``; fused: one MatMul (and a Split when ``split``)."""
        parts = [_linear_parts(m, n) for n, m in modules]
        for (n, _), part in zip(modules, parts):
            forms[_form(part)] = forms.get(_form(part), 0) + 1
        merged = _concat_parts(parts) if fuse and len(parts) > 1 else None
        if merged is None:
            return [b.linear(x, part, n) for (n, _), part in zip(modules, parts)]
        y = b.linear(x, merged, name)
        if not split:
            return [y]
        sizes = b.constant(f"{name}.split", np.array([_out_features(p) for p in parts], np.int64))
        return b.node("Split", [y, sizes], len(parts), name=f"{name}/Split", axis=-1)

    for i, layer in enumerate(layers):
        prefix = f"model.layers.{i}"
        attn, mlp = layer.self_attn, layer.mlp
        w_in = norm_weight(layer.input_layernorm, f"{prefix}.input_layernorm.weight")
        if pending is None:
            (x,) = b.node("SimplifiedLayerNormalization", [hidden, w_in], name=f"/{prefix}/input_layernorm",
                          axis=-1, epsilon=eps, stash_type=1)
            residual = hidden
        else:
            x, _, _, residual = b.node("SkipSimplifiedLayerNormalization", [pending, residual, w_in],
                                       [f"/{prefix}/input_layernorm/output_0", "", "", f"/{prefix}/residual_0"],
                                       name=f"/{prefix}/input_layernorm", domain=MS_DOMAIN, epsilon=eps)
        q_heads = int(attn.q_proj.out_features) // head_dim
        layer_kv = int(attn.k_proj.out_features) // head_dim
        qkv_modules = [(f"{prefix}.self_attn.{p}", getattr(attn, p)) for p in ("q_proj", "k_proj", "v_proj")]
        qkv = project(x, qkv_modules, fuse_qkv, f"{prefix}.self_attn.qkv_proj", split=False)
        # A fused projection is one packed [q | k | v] tensor, GroupQueryAttention's packed form.
        gqa_inputs = (qkv if len(qkv) == 3 else [qkv[0], "", ""]) + [
            f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens_k, total_len, cos_name, sin_name]
        (context, _, _) = b.node(
            "GroupQueryAttention", gqa_inputs,
            [f"/{prefix}/attn/output_0", f"present.{i}.key", f"present.{i}.value"],
            name=f"/{prefix}/attn/GroupQueryAttention", domain=MS_DOMAIN,
            num_heads=q_heads, kv_num_heads=layer_kv, do_rotary=1, rotary_interleaved=0, local_window_size=-1,
            scale=float(getattr(attn, "scaling", head_dim ** -0.5)),
        )
        (attn_out,) = project(context, [(f"{prefix}.self_attn.o_proj", attn.o_proj)], False, "")
        w_post = norm_weight(layer.post_attention_layernorm, f"{prefix}.post_attention_layernorm.weight")
        x, _, _, residual = b.node("SkipSimplifiedLayerNormalization", [attn_out, residual, w_post],
                                   [f"/{prefix}/post_attention_layernorm/output_0", "", "", f"/{prefix}/residual_1"],
                                   name=f"/{prefix}/post_attention_layernorm", domain=MS_DOMAIN, epsilon=eps)
        gate, up = project(x, [(f"{prefix}.mlp.gate_proj", mlp.gate_proj), (f"{prefix}.mlp.up_proj", mlp.up_proj)],
                           fuse_gate_up, f"{prefix}.mlp.gate_up_proj")
        (sig,) = b.node("Sigmoid", [gate], name=f"/{prefix}/mlp/Sigmoid")
        (act,) = b.node("Mul", [gate, sig], name=f"/{prefix}/mlp/silu")
        (prod,) = b.node("Mul", [act, up], name=f"/{prefix}/mlp/Mul")
        (pending,) = project(prod, [(f"{prefix}.mlp.down_proj", mlp.down_proj)], False, "")

    w_final = norm_weight(model.model.norm, "model.norm.weight")
    x, _, _, _ = b.node("SkipSimplifiedLayerNormalization", [pending, residual, w_final],
                        ["/model/norm/output_0", "", "", ""], name="/model/norm", domain=MS_DOMAIN, epsilon=eps)
    _lm_head(b, model, spec, x, embed_name, embedding, lm_head_bits, lm_head_group_size, notes)
    del embedding

    graph = helper.make_graph(b.nodes, "edgekit-ort-fused-decoder", inputs, outputs, b.initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
                              producer_name="edgekit")
    set_opsets(proto, OPSET, ms=True)
    notes.append(f"{spec['layers']} layers: " + ", ".join(f"{count} x {form}" for form, count in sorted(forms.items())))
    notes.append(f"lm_head: {spec['lm_head_form']}")
    return proto


def _lm_head(b: _GraphBuilder, model: Any, spec: dict[str, Any], x: str, embed_name: str, embedding: Any,
             lm_head_bits: int | None, group_size: int, notes: list[str]) -> None:
    import numpy as np

    from edgekit.export.quantized.matmulnbits import ort_supports_matmulnbits

    head = model.get_output_embeddings()
    kind, weight, bias = _linear_parts(head, "lm_head")
    if kind == "quantized":
        if lm_head_bits is not None:
            raise StageError("lm_head_bits was given, but the checkpoint's lm_head is already quantized",
                             where="lm_head", how="leave lm_head_bits unset: the checkpoint's own codes are used")
        spec["lm_head_form"] = _form((kind, weight, bias))
        _rename_output(b, b.linear(x, (kind, weight, bias), "lm_head"), "logits")
        return
    if lm_head_bits is not None:
        if not ort_supports_matmulnbits(lm_head_bits):
            raise StageError(f"this onnxruntime cannot run {lm_head_bits}-bit MatMulNBits on CPU", where="lm_head_bits",
                             how="upgrade onnxruntime, or leave lm_head_bits unset")
        qw = _lm_head_codes(weight, lm_head_bits, group_size)
        spec["lm_head_form"] = f"MatMulNBits {lm_head_bits}-bit group {group_size} symmetric (round-to-nearest)"
        notes.append(f"lm_head quantized here ({spec['lm_head_form']}); the embedding stays float32")
        _rename_output(b, b.linear(x, ("quantized", qw, bias), "lm_head"), "logits")
        return
    tied = np.shares_memory(weight, embedding) or (weight.shape == embedding.shape and np.array_equal(weight, embedding))
    if not tied:
        spec["lm_head_form"] = "float32 MatMul on the lm_head weight"
        _rename_output(b, b.linear(x, (kind, weight, bias), "lm_head"), "logits")
        return
    # One copy of the tied matrix on disk; ONNX Runtime folds the Transpose of an initializer
    # at load time and prepacks the MatMul's constant B. (FusedMatMul with transB=1 would
    # avoid the in-memory copy, but its CPU kernel does not prepack B: measured 2x slower.)
    spec["lm_head_form"] = "float32 MatMul on the tied embedding (Transpose folded at load)"
    (transposed,) = b.node("Transpose", [embed_name], name="/lm_head/Transpose", perm=[1, 0])
    outputs = ["logits"] if bias is None else ["/lm_head/MatMul/output_0"]
    b.node("MatMul", [x, transposed], outputs, name="/lm_head/MatMul")
    if bias is not None:
        b.node("Add", [outputs[0], b.constant("lm_head.bias", bias.astype(np.float32))], ["logits"], name="/lm_head/Add")


def _lm_head_codes(weight: Any, bits: int, group_size: int) -> Any:
    """The lm_head's round-to-nearest codes (symmetric, ``group_size`` inputs per group):
    deterministic, so the graph and its parity reference agree bit for bit."""
    import torch

    from edgekit.weights.grid import rtn_quantize

    hidden = int(weight.shape[1])
    if group_size < 16 or group_size & (group_size - 1) or hidden % group_size:
        raise StageError(f"lm_head group size {group_size} must be a power of two >= 16 dividing the hidden size {hidden}",
                         where="lm_head_group_size", how="use 32 or 64")
    w = weight if isinstance(weight, torch.Tensor) else torch.from_numpy(weight)
    return rtn_quantize(w.detach().float(), bits=bits, group_size=group_size, symmetric=True)


@contextlib.contextmanager
def lm_head_reference(model: Any, bits: int, group_size: int) -> Iterator[Any]:
    """``model`` with its float lm_head replaced, for the duration, by the dequantized codes the
    fused graph's ``lm_head_bits`` uses (the embedding stays float): the PyTorch reference of
    such a graph. The original module is put back on exit."""
    import torch

    original = model.get_output_embeddings()
    qw = _lm_head_codes(original.weight, bits, group_size)
    head = torch.nn.Linear(qw.in_features, qw.out_features, bias=original.bias is not None)
    with torch.no_grad():
        head.weight.copy_(qw.dequantize())
        if original.bias is not None:
            head.bias.copy_(original.bias)
    model.set_output_embeddings(head)
    try:
        yield model
    finally:
        model.set_output_embeddings(original)


def _check_loads(path: Path, notes: list[str]) -> None:
    """The graph's consumer is ONNX Runtime: it must load there. (onnx.checker cannot judge it:
    SimplifiedLayerNormalization is ONNX Runtime's op in the default domain, unknown to onnx.)"""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph / NotImplemented
        raise StageError(
            f"the fused ONNX graph does not load in onnxruntime {ort.__version__}: {str(exc).strip().splitlines()[0][:300]}",
            where=str(path),
            how="report this as an edgekit bug with the model name, and use onnxruntime_graph: optimum meanwhile",
        ) from exc
    notes.append(f"loads in onnxruntime {ort.__version__} (CPU execution provider)")


def _rename_output(b: _GraphBuilder, produced: str, name: str) -> None:
    """Make the last node's output ``produced`` the graph output ``name``."""
    node = b.nodes[-1]
    for index, output in enumerate(node.output):
        if output == produced:
            node.output[index] = name
            return
    raise AssertionError(f"{produced} is not an output of the last node")  # pragma: no cover - internal invariant
