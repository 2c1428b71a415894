"""Target rules at recipe validation: FP8 needs compute capability ≥ 8.9; the model must fit."""

from __future__ import annotations

import textwrap

import pytest
from conftest import run_cli

from edgekit.errors import RecipeError
from edgekit.models.source import model_shape
from edgekit.preflight import load_recipe
from edgekit.sizing import estimate_memory_gb, shape_from_config
from edgekit.targets import target_names


def recipe_text(target: str, quantize: str = "", context: int = 2048) -> str:
    return textwrap.dedent(
        f"""\
        name: rules
        model: smollm2-135m
        target: {target}
        context_length: {context}
        stages:
          - type: load
        """
    ) + quantize + "  - type: export_onnx\n"


FP8 = "  - type: quantize\n    method: fp8\n"


@pytest.mark.parametrize("target", [n for n in target_names() if n.startswith("jetson-orin")])
def test_fp8_refused_on_every_orin(tmp_path, target):
    path = tmp_path / "r.yaml"
    path.write_text(recipe_text(target, FP8))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert f"quantize.method fp8 needs compute capability ≥ 8.9 but {target} has 8.7" in message
    assert "line 8" in message and message.endswith("To resolve, use method gptq with bits 4 or 8.")


def test_fp8_accepted_where_supported(tmp_path):
    for target in ("workstation-rtx4090", "workstation-h100"):
        path = tmp_path / f"{target}.yaml"
        path.write_text(recipe_text(target, FP8))
        load_recipe(path)


def test_model_that_does_not_fit_is_refused_with_numbers(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(recipe_text("jetson-orin-nano-8gb", context=1_000_000))
    result = run_cli("recipe", "validate", str(path))
    assert result.returncode == 2
    line = result.stderr.strip()
    # decimal GB, as the target states its memory: 2 x 30 layers x 3 kv heads x 64 x 2 bytes x 1e6 tokens = 23.04e9
    # bytes (21.46 GiB before the units were unified)
    assert "will not fit jetson-orin-nano-8gb" in line and "KV cache 23.04 GB at context 1000000" in line
    assert "> 5.5 GB usable" in line and "To resolve, " in line
    # 4-bit weights do not rescue a KV cache that size, but a shorter context does
    path.write_text(recipe_text("jetson-orin-nano-8gb", "  - type: quantize\n    method: gptq\n", context=1_000_000))
    with pytest.raises(RecipeError, match="at 4-bit gptq"):
        load_recipe(path)
    path.write_text(recipe_text("jetson-orin-nano-8gb", "  - type: quantize\n    method: gptq\n", context=4096))
    load_recipe(path)


def test_memory_arithmetic_on_known_configs():
    # Qwen2.5-7B / DeepSeek-R1-Distill-Qwen-7B shape (config.json of the published model)
    qwen7b = shape_from_config({
        "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "tie_word_embeddings": False,
    })
    total = qwen7b.linear_parameters + qwen7b.embedding_parameters
    assert 7.6e9 < total < 7.62e9  # the published 7.61B (norms and biases are ~1M more)
    fp16 = estimate_memory_gb(qwen7b, linear_bits=16, other_bits=16, context_length=4096)
    # KV: 2 (K,V) x 28 layers x 4 heads x 128 dims x 4096 tokens x 2 bytes = 235 MB (224 MiB): decimal GB
    assert fp16["kv_cache_gb"] == pytest.approx(0.235, abs=1e-3)
    assert fp16["weights_gb"] == pytest.approx(total * 2 / 1e9, rel=1e-3)
    int4 = estimate_memory_gb(qwen7b, linear_bits=4 + 20 / 128, other_bits=16, context_length=4096)
    assert int4["weights_gb"] < fp16["weights_gb"] / 2.5


def test_shape_of_the_embedded_gguf():
    from edgekit.models.source import resolve_model_source

    shape = model_shape(resolve_model_source("smollm2-135m"))
    assert (shape.num_layers, shape.hidden_size, shape.num_heads, shape.num_kv_heads, shape.vocab_size) == (30, 576, 9, 3, 49152)
    assert shape.tie_word_embeddings


def test_asymmetric_int4_refused_for_tensorrt(tmp_path):
    quantize = "  - type: quantize\n    method: gptq\n    symmetric: false\n"
    path = tmp_path / "r.yaml"
    path.write_text(recipe_text("jetson-orin-nano-8gb", quantize).replace("- type: export_onnx\n", "- type: export_onnx\n    format: both\n"))
    with pytest.raises(RecipeError, match="needs symmetric weights") as info:
        load_recipe(path)
    assert "line 9" in str(info.value) and "symmetric: true" in str(info.value)
    path.write_text(path.read_text().replace("symmetric: false", "symmetric: true"))
    load_recipe(path)
    path.write_text(recipe_text("jetson-orin-nano-8gb", quantize))  # onnxruntime only: zero points are fine
    load_recipe(path)
