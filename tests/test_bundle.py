"""Bundle layout, manifest hashes and the reproducible tar (from a tiny pipeline run)."""

from __future__ import annotations

import hashlib
import json
import tarfile

import pytest
from conftest import write_recipe

from edgekit import api


@pytest.fixture(scope="module")
def bundle_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("bundle")
    recipe = write_recipe(tmp / "tiny.yaml", tiny_model_dir, output=tmp / "run")
    manifest = api.compress(recipe, quiet=True)
    stage_dir = tmp / "run" / manifest["stages"][-1]["dir"]
    return manifest, stage_dir


def test_bundle_contents_and_manifest(bundle_run):
    run_manifest, stage_dir = bundle_run
    bundle = stage_dir / "tiny"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["format"] == "edgekit.bundle/1" and manifest["target"] == "jetson-orin-nano-8gb"
    for name in ("model.onnx", "model.onnx_data", "tokenizer.json", "config.json", "generation_config.json", "recipe.yaml", "target.yaml"):
        assert name in manifest["files"], name
    on_disk = sorted(p.name for p in bundle.iterdir() if p.name != "manifest.json")
    assert on_disk == sorted(manifest["files"])  # every file is listed, none invented
    for name, meta in manifest["files"].items():
        data = (bundle / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == meta["sha256"] and len(data) == meta["size"]
    assert {"python", "torch", "transformers", "onnx", "onnxruntime"} <= set(manifest["packages"])
    assert [s["name"] for s in manifest["stages"]] == ["load", "evaluate", "export_onnx", "evaluate-2"]
    assert manifest["stages"][1]["metrics"]["perplexity"] == run_manifest["stages"][1]["metrics"]["perplexity"]
    assert manifest["context_length"] == 2048


def test_tar_is_safe_and_reproducible(bundle_run, tmp_path):
    from edgekit.bundle.manifest import write_tar

    _, stage_dir = bundle_run
    tar_path = stage_dir / "tiny.tar"
    with tarfile.open(tar_path) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names[0] == "tiny" and all(n == "tiny" or n.startswith("tiny/") for n in names)
    assert all(not m.issym() and not m.islnk() and m.mtime == 0 and m.uid == 0 for m in members)
    assert "tiny/manifest.json" in names
    again = tmp_path / "again.tar"
    write_tar(stage_dir / "tiny", again)
    assert again.read_bytes() == tar_path.read_bytes()
