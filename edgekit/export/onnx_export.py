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


def export_decoder(checkpoint: Path, out_dir: Path, *, opset: int, trust_remote_code: bool) -> None:
    """Write model.onnx + model.onnx_data + tokenizer/config files into ``out_dir``."""
    import warnings

    from optimum.exporters.onnx import main_export

    from edgekit.models.checkpoint import quiet_transformers

    quiet_transformers()
    staging = out_dir / ".optimum"
    try:
        with warnings.catch_warnings():
            # torch.jit tracing warnings about python control flow on shapes: expected for
            # decoders, covered by the parity check below.
            warnings.simplefilter("ignore")
            main_export(
                str(checkpoint),
                output=str(staging),
                task=TASK,
                opset=opset,
                device="cpu",
                do_validation=False,  # we run our own parity check, with recorded diffs
                trust_remote_code=trust_remote_code,
            )
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise StageError(
            f"optimum cannot export this model: {str(exc).splitlines()[0]}",
            where=str(checkpoint),
            how="check that the architecture is supported by optimum-onnx (text-generation-with-past), or change opset",
        ) from exc
    _to_external_data(staging / MODEL_FILE, out_dir)
    for path in sorted(staging.iterdir()):
        if path.name not in (MODEL_FILE, DATA_FILE) and path.is_file():
            shutil.move(str(path), out_dir / path.name)
    shutil.rmtree(staging)


def _to_external_data(model_path: Path, out_dir: Path) -> None:
    import onnx

    model = onnx.load(str(model_path), load_external_data=True)
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
