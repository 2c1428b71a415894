"""Model sources: classification, the embedded default, and the hub path (offline cache)."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import run_cli, write_recipe

from edgekit.errors import ModelError
from edgekit.models.source import DEFAULT_GGUF, resolve_model_source


def test_classification(tmp_path, tiny_model_dir):
    assert resolve_model_source("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B").kind == "hub"
    assert resolve_model_source("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", revision="abc").fingerprint() == {
        "hub": "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
        "revision": "abc",
    }
    local = resolve_model_source(tiny_model_dir.name, base_dir=tiny_model_dir.parent)
    assert local.kind == "dir" and local.path == tiny_model_dir.resolve()
    assert "model.safetensors" in local.fingerprint()["dir"]
    builtin = resolve_model_source("smollm2-135m")
    assert builtin.kind == "builtin" and builtin.path.name == DEFAULT_GGUF and builtin.is_gguf
    for missing in ("./nope", "nope.gguf", "a/b/c", "/abs/nope"):
        with pytest.raises(ModelError, match="does not exist"):
            resolve_model_source(missing, base_dir=tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="not a .gguf file"):
        resolve_model_source("weights.bin", base_dir=tmp_path)


def test_embedded_default_is_supported_gguf():
    from edgekit.models.source import check_gguf_supported

    assert check_gguf_supported(resolve_model_source("smollm2-135m").path) == "llama"


def test_hub_id_loads_from_the_local_hub_cache(tmp_path, tiny_model_dir):
    """The hub code path for real, offline: a hub id resolved from a prepared HF cache."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--edgekit-test--tiny-llama"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    recipe = write_recipe(tmp_path / "hub.yaml", "edgekit-test/tiny-llama", stages="stages: [load, evaluate]\n", output=tmp_path / "run")
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "TRANSFORMERS_OFFLINE": "1"}
    result = run_cli("compress", str(recipe), "-q", env=env)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["stages"][0]["metrics"]["source"] == "hub"
    assert manifest["stages"][1]["metrics"]["perplexity"] > 1
    # An id the cache does not have is a one-line model error, not a traceback.
    recipe.write_text(recipe.read_text().replace("edgekit-test/tiny-llama", "edgekit-test/absent"))
    result = run_cli("compress", str(recipe), "-q", env=env)
    assert result.returncode == 2 and "cannot load the model" in result.stderr and "Traceback" not in result.stderr
