"""Read the float ONNX export, write a rewritten model (``dst`` + one ``model.onnx_data`` next to
it) and run ``onnx.checker`` on the result."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from edgekit.errors import StageError

DATA_FILE = "model.onnx_data"


def load_onnx(src: Path) -> Any:
    import onnx

    if not Path(src).is_file():
        raise StageError(f"ONNX model not found: {src}", how="point to the model.onnx written by the export_onnx stage")
    return onnx.load(str(src), load_external_data=True)


def save_onnx(model: Any, dst: Path) -> int:
    """model -> dst + dst.parent/model.onnx_data (all initializers over 1 KiB); returns bytes."""
    import onnx

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = dst.parent / f".tmp-quantized-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        for t in model.graph.initializer:  # saved fresh: no stale references to the source file
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
        onnx.save_model(
            model,
            str(staging / dst.name),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=DATA_FILE,
            size_threshold=1024,
            convert_attribute=False,
        )
        os.replace(staging / dst.name, dst)
        if (staging / DATA_FILE).exists():
            os.replace(staging / DATA_FILE, dst.parent / DATA_FILE)
        elif (dst.parent / DATA_FILE).exists():
            (dst.parent / DATA_FILE).unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    data = dst.parent / DATA_FILE
    return dst.stat().st_size + (data.stat().st_size if data.exists() else 0)


def check_onnx(dst: Path, notes: list[str]) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(dst), full_check=True)
    except Exception as exc:  # onnx raises ValidationError / InferenceError
        raise StageError(
            f"the rewritten ONNX model fails onnx.checker: {str(exc).splitlines()[0]}",
            where=str(dst),
            how="report this as an edgekit bug with the model name; the float export itself is unchanged",
        ) from exc
    notes.append("onnx.checker.check_model(full_check=True) passed")
