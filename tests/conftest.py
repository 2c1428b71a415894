"""Shared fixtures: a tiny Llama built from a config (no download), recipes, CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Converted checkpoints are cached across test sessions here (fresh on CI, reused locally).
os.environ.setdefault("EDGEKIT_CACHE_DIR", str(REPO / ".cache" / "edgekit-test"))


def pytest_collection_modifyitems(config, items):
    """`gpu` / `tensorrt` tests run where those exist (scripts/gpu_check.sh) and are skipped,
    with the reason, everywhere else (our dev and CI machines have neither)."""
    import importlib.util

    wanted = {m for item in items for m in ("gpu", "tensorrt") if item.get_closest_marker(m)}
    if not wanted:
        return
    reasons = {}
    if "tensorrt" in wanted and importlib.util.find_spec("tensorrt") is None:
        reasons["tensorrt"] = "needs the TensorRT Python package (pip install 'edgekit[gpu]'; run scripts/gpu_check.sh)"
    if "gpu" in wanted:
        import torch

        if not torch.cuda.is_available():
            reasons["gpu"] = "needs a CUDA GPU (run scripts/gpu_check.sh on one)"
    for item in items:
        for marker, reason in reasons.items():
            if item.get_closest_marker(marker):
                item.add_marker(pytest.mark.skip(reason=reason))


def python_docs_text() -> str:
    from pydoc_data import topics

    return "\n".join(topics.topics.values())


def build_tiny_model(path: Path, *, vocab: int = 384, seed: int = 0) -> Path:
    """A 2-layer GQA Llama with a BPE tokenizer trained on the stdlib's docs, saved as a
    standard Hugging Face checkpoint directory. Deterministic for a given seed."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tokenizer.train_from_iterator([python_docs_text()[:200_000]], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def write_recipe(path: Path, model: str | Path, *, stages: str | None = None, extra: str = "", output: Path | None = None) -> Path:
    stages = stages or textwrap.dedent(
        """\
        stages:
          - type: load
          - type: evaluate
          - type: export_onnx
          - type: evaluate
          - type: bundle
        """
    )
    text = textwrap.dedent(
        f"""\
        name: tiny
        model: {model}
        target: jetson-orin-nano-8gb
        data:
          source: builtin:python-docs
          eval_tokens: 1024
          window: 128
        """
    )
    if output is not None:
        text += f"output: {output}\n"
    text += extra + stages
    path.write_text(text)
    return path


@pytest.fixture
def tiny_recipe(tmp_path, tiny_model_dir) -> Path:
    return write_recipe(tmp_path / "tiny.yaml", tiny_model_dir, output=tmp_path / "run")



BUNDLE_STAGES = "stages:\n  - type: load\n  - type: export_onnx\n  - type: bundle\n"


def compress_tiny_bundle(tmp: Path, model: str | Path, *, extra: str = "") -> Path:
    """The smallest real bundle (load -> export_onnx -> bundle of ``model``, no evaluation), built
    under ``tmp``; returns the bundle directory. ``extra`` goes into the recipe (e.g. runtime:)."""
    from edgekit import api

    recipe = write_recipe(tmp / "tiny.yaml", model, stages=BUNDLE_STAGES, output=tmp / "run", extra=extra)
    manifest = api.compress(recipe, quiet=True)
    return tmp / "run" / manifest["stages"][-1]["dir"] / "tiny"

def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """The real console entry point in a subprocess (exit codes and stderr as a user sees them)."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "edgekit", *args], capture_output=True, text=True, cwd=cwd, env=full_env, timeout=timeout
    )
