"""What the bundle stage copies into a bundle directory: the model files of the ONNX
artifact (every graph variant), the tokenizer, and the versions of the packages that made it.

The manifest, the file table and the reproducible tar are the format's
(:mod:`edgekit.bundle.manifest`).
"""

from __future__ import annotations

import importlib.metadata
import platform
import shutil
from pathlib import Path

# Files of an ONNX artifact that a runtime needs; parity.json and stage.json stay behind.
MODEL_FILES = ("model.onnx", "model.onnx_data", "config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "chat_template.jinja", "vocab.json", "merges.txt", "added_tokens.json")
PACKAGES = ("edgekit", "torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "tokenizers", "safetensors")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def copy_file(source: Path, dest: Path) -> None:
    # A copy, not a hard link: onnx (>= 1.23) refuses external data with several hard links
    # ("potential hardlink attack"), and a bundle must load anywhere.
    shutil.copyfile(source, dest)


def collect_model_files(onnx_dir: Path, bundle_dir: Path) -> list[str]:
    """The primary graph, tokenizer and configs at the top; other graph variants (e.g. the
    TensorRT Q/DQ graph next to the ONNX Runtime one) in their own subdirectories."""
    import json

    copied = []
    for name in MODEL_FILES + TOKENIZER_FILES + ("export.json",):
        if (onnx_dir / name).is_file():
            copy_file(onnx_dir / name, bundle_dir / name)
            copied.append(name)
    record = onnx_dir / "export.json"
    if record.is_file():
        for rel in json.loads(record.read_text())["variants"].values():
            variant_dir = (onnx_dir / rel).parent
            if variant_dir == onnx_dir:
                continue
            (bundle_dir / variant_dir.name).mkdir(exist_ok=True)
            for path in sorted(variant_dir.glob("model.onnx*")):
                copy_file(path, bundle_dir / variant_dir.name / path.name)
                copied.append(f"{variant_dir.name}/{path.name}")
    return copied
