"""Export a checkpoint to ONNX with optimum-onnx (text generation with a KV cache).

The graph's weights always go to one external-data file (``model.onnx_data``): that is
the layout TensorRT's parser and ONNX Runtime read directly, and models over 2 GiB have no
other choice (protobuf's limit), so small and large models share one code path.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from edgekit.errors import StageError

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx_data"
TASK = "text-generation-with-past"


#: graph float types ``export_decoder`` writes (the torch dtype the model is traced in)
DTYPES = ("float32", "float16", "bfloat16")


def export_decoder(
    checkpoint: Path, out_dir: Path, *, opset: int, trust_remote_code: bool, dtype: str = "float32"
) -> None:
    """Write model.onnx + model.onnx_data + tokenizer/config files into ``out_dir``.

    ``dtype`` float16/bfloat16: the model is loaded and traced in that precision, so
    activations, the KV cache inputs/outputs, logits and every weight initializer are half
    precision, and the casts PyTorch itself makes (RMSNorm's variance and the rotary tables in
    float32) stay in the graph. Half-precision graphs are traced with eager attention: the SDPA
    ONNX symbolic computes attention in float32 and leaves ``o_proj`` a float32 MatMul, and
    eager's ``softmax(dtype=float32)``, which the symbolic writes as a half Softmax followed by
    a Cast, is put back into float32 (:func:`_softmax_in_float32`)."""
    import warnings

    from optimum.exporters.onnx import main_export

    from edgekit.weights.hf import quiet_transformers

    if dtype not in DTYPES:
        raise StageError(f"unknown export dtype {dtype!r}", where=str(checkpoint), how=f"use one of {', '.join(DTYPES)}")
    quiet_transformers()
    staging = out_dir / ".optimum"
    try:
        with warnings.catch_warnings():
            # torch.jit tracing warnings about python control flow on shapes: expected for
            # decoders, covered by the parity check below.
            warnings.simplefilter("ignore")
            if dtype == "float32":
                main_export(
                    str(checkpoint),
                    output=str(staging),
                    task=TASK,
                    opset=opset,
                    device="cpu",
                    do_validation=False,  # we run our own parity check, with recorded diffs
                    trust_remote_code=trust_remote_code,
                )
            else:
                _export_half(checkpoint, staging, opset=opset, trust_remote_code=trust_remote_code, dtype=dtype)
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise StageError(
            f"optimum cannot export this model: {str(exc).splitlines()[0]}",
            where=str(checkpoint),
            how="check that the architecture is supported by optimum-onnx (text-generation-with-past), or change opset",
        ) from exc
    _to_external_data(staging / MODEL_FILE, out_dir, fix_softmax=dtype != "float32")
    for path in sorted(staging.iterdir()):
        if path.name not in (MODEL_FILE, DATA_FILE) and path.is_file():
            shutil.move(str(path), out_dir / path.name)
    shutil.rmtree(staging)


def _export_half(checkpoint: Path, staging: Path, *, opset: int, trust_remote_code: bool, dtype: str) -> None:
    """optimum's export of the model loaded in ``dtype`` with eager attention (on the CPU:
    torch runs float16/bfloat16 there, slowly, which tracing a few tokens does not notice)."""
    from optimum.exporters.onnx import onnx_export_from_model
    from transformers import AutoModelForCausalLM

    from edgekit.weights.hf import torch_dtype

    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=torch_dtype(dtype), attn_implementation="eager", trust_remote_code=trust_remote_code
    ).eval()
    import contextlib
    from unittest import mock

    from optimum.exporters.onnx.base import OnnxConfig

    # optimum renames output axes by running the graph in ONNX Runtime, whose CPU provider has
    # no bfloat16 kernels (Where, MatMul, ...): a bfloat16 graph keeps the axis names the
    # tracer gave (the float16 export of the same model needs no renaming either).
    skip_fix = mock.patch.object(OnnxConfig, "fix_dynamic_axes", lambda *a, **k: None) if dtype == "bfloat16" \
        else contextlib.nullcontext()
    with skip_fix:
        onnx_export_from_model(model, output=str(staging), task=TASK, opset=opset, device="cpu", do_validation=False)
    from transformers import AutoTokenizer

    # main_export saves the tokenizer (its preprocessors) next to the graph; from a model object, we do
    AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=trust_remote_code).save_pretrained(staging)


def _softmax_in_float32(model: Any) -> int:
    """``Softmax(x) -> Cast(float32) -> Cast(half)`` (how torch.onnx writes eager attention's
    ``softmax(x, dtype=float32).to(half)``) becomes ``Cast(x, float32) -> Softmax -> Cast(half)``,
    the order PyTorch computes it in. Returns how many were moved."""
    import onnx

    graph = model.graph
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}

    def cast_to(node: Any) -> int | None:
        if node.op_type != "Cast" or node.domain not in ("", "ai.onnx"):
            return None
        return next((a.i for a in node.attribute if a.name == "to"), None)

    moved = 0
    gone: set[str] = set()
    order = list(graph.node)
    for softmax in list(order):
        if softmax.op_type != "Softmax" or softmax.output[0] in outputs:
            continue
        users = consumers.get(softmax.output[0], [])
        if len(users) != 1 or cast_to(users[0]) != onnx.TensorProto.FLOAT:
            continue
        cast = users[0]
        x, y = softmax.input[0], cast.output[0]
        gone.add(softmax.output[0])
        # Cast(x) -> Softmax -> (the Cast's old output name, read by the Cast back to half)
        cast.input[0], cast.output[0] = x, f"{softmax.output[0]}_float32_in"
        softmax.input[0], softmax.output[0] = cast.output[0], y
        order.remove(cast)
        order.insert(order.index(softmax), cast)
        moved += 1
    if moved:
        del graph.node[:]
        graph.node.extend(order)
        kept = [v for v in graph.value_info if v.name not in gone]
        del graph.value_info[:]
        graph.value_info.extend(kept)
    return moved


def _to_external_data(model_path: Path, out_dir: Path, *, fix_softmax: bool = False) -> None:
    import onnx

    model = onnx.load(str(model_path), load_external_data=True)
    if fix_softmax:
        _softmax_in_float32(model)
    # onnx appends to an existing external-data file: start from none.
    (out_dir / DATA_FILE).unlink(missing_ok=True)
    onnx.save_model(
        model,
        str(out_dir / MODEL_FILE),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=DATA_FILE,
        size_threshold=1024,
        convert_attribute=False,
    )


def describe(model_path: Path) -> dict[str, Any]:
    """Opset, inputs/outputs with dims, node count: what TensorRT/readiness checks read."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)

    def dims(value_info):
        return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {
        "opset": opset,
        "nodes": len(model.graph.node),
        "inputs": {i.name: dims(i) for i in model.graph.input},
        "outputs": {o.name: dims(o) for o in model.graph.output},
    }


#: bytes per value of the graph float types (ONNX TensorProto codes)
_FLOAT_BYTES = {1: ("float32", 4), 10: ("float16", 2), 16: ("bfloat16", 2), 11: ("float64", 8)}


def kv_cache_dtype(model_path: Path) -> tuple[str, int] | None:
    """(type name, bytes per value) of a decoder graph's KV cache; None without a float KV
    cache (:func:`edgekit.runtime.onnx_graph.kv_cache_dtype`: read from the wire format, so
    planning and the runtime need no onnx import)."""
    from edgekit.runtime.onnx_graph import kv_cache_dtype as read

    return read(model_path)
