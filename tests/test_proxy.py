"""`edgekit compress RECIPE --proxy`: the shipped 7B recipe run end to end on a tiny random
Qwen2 of the same architecture family (edgekit.models.proxy, docs/proxy.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgekit.errors import ModelError, OutputError, RecipeError

REPO = Path(__file__).resolve().parent.parent
RECIPE_7B = REPO / "recipes" / "7b_to_orin.yaml"
R1 = "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"
PUBLISHED = REPO / "edgekit" / "models" / "published" / "deepseek-ai--DeepSeek-R1-Distill-Qwen-7B"


def _published_config() -> dict:
    return json.loads((PUBLISHED / "config.json").read_text())


# ----------------------------------------------------------------------------- pure rules


def test_proxy_config_of_the_7b_keeps_the_family_and_the_divisibility():
    from edgekit.models.proxy import PROXY_MAX_POSITIONS, prune_step, proxy_model_config, width_shift

    real = _published_config()
    proxy, mapping = proxy_model_config(real)
    assert width_shift(real) == 2
    assert proxy["model_type"] == "qwen2" and proxy["architectures"] == ["Qwen2ForCausalLM"]
    assert (proxy["hidden_size"], proxy["intermediate_size"], proxy["num_hidden_layers"]) == (896, 4736, 2)
    # GQA 28/4 = 7:1 kept exactly (so every head layout the pruner may pick), head_dim scaled with the widths
    assert (proxy["num_attention_heads"], proxy["num_key_value_heads"]) == (28, 4)
    assert proxy["num_attention_heads"] * proxy.get("head_dim", proxy["hidden_size"] // 28) == proxy["hidden_size"]
    assert proxy["tie_word_embeddings"] is False and proxy["rope_theta"] == real["rope_theta"]
    assert proxy["max_position_embeddings"] == PROXY_MAX_POSITIONS and proxy["vocab_size"] == 512
    # every group size divides a proxy width exactly when it divides the real one; the prune step is the same
    for key in ("hidden_size", "intermediate_size"):
        for group in (16, 32, 64, 128):
            assert (real[key] % group == 0) == (proxy[key] % group == 0), (key, group)
        assert prune_step(real[key]) == prune_step(proxy[key]) == 64
    fields = {m["field"]: (m["from"], m["to"]) for m in mapping}
    assert fields["config.hidden_size"] == (3584, 896) and fields["config.num_hidden_layers"] == (28, 2)


@pytest.mark.parametrize(
    "hidden, inter, heads, head_dim, shift",
    [
        (576, 1536, 9, 64, 0),      # SmolLM2-135M: 576 = 64 x 9 is not a multiple of 128: nothing to scale
        (8192, 28672, 64, 128, 3),  # Llama-70B: 1024 / 3584, head_dim 128 -> 16 (the floor stops it there)
        (64, 128, 4, 16, 0),        # a test model: head_dim already at the floor
    ],
)
def test_width_shift_rule(hidden, inter, heads, head_dim, shift):
    from edgekit.models.proxy import width_shift

    config = {"hidden_size": hidden, "intermediate_size": inter, "num_attention_heads": heads, "head_dim": head_dim}
    assert width_shift(config) == shift


def _loaded_7b(tmp_path: Path):
    from edgekit.preflight import load_recipe

    text = RECIPE_7B.read_text()
    path = tmp_path / "7b.yaml"
    path.write_text(text)
    return load_recipe(path, check_sources=False)


def test_proxy_recipe_scales_the_costs_and_records_every_change(tmp_path):
    from edgekit.proxy_run import proxy_loaded_recipe

    loaded = _loaded_7b(tmp_path)
    proxied = proxy_loaded_recipe(loaded, processes=2)
    recipe = proxied.recipe
    assert recipe.name == loaded.recipe.name + "-proxy" and recipe.output_dir == Path("runs") / recipe.name
    assert recipe.model == "proxy:" + R1
    assert recipe.data.source == "builtin:python-docs" and recipe.data.eval_tokens <= 1024
    assert recipe.context_length <= 2048
    by_type = {spec.type: recipe.stage_config(i) for i, spec in enumerate(recipe.stages)}
    assert by_type["distill"].steps == 4 and by_type["distill"].processes == 2
    assert by_type["distill"].accelerate_config is None
    assert by_type["prune"].calibration_samples == 4 and by_type["quantize"].calibration_samples == 4
    # the group size is the recipe's own: the proxy's widths carry the real divisibility instead
    real_quantize = next(loaded.recipe.stage_config(i) for i, s in enumerate(loaded.recipe.stages) if s.type == "quantize")
    assert by_type["quantize"].group_size == real_quantize.group_size
    assert [s.type for s in recipe.stages] == [s.type for s in loaded.recipe.stages]
    record = proxied.proxy
    assert record["proxy"] is True and record["of"]["model"] == R1 and record["width_factor"] == 4
    changed = {m["field"] for m in record["recipe"]}
    assert {"name", "model", "data.source"} <= changed or {"name", "model"} <= changed
    steps = next(m for m in record["recipe"] if m["field"].endswith(".steps"))
    assert steps["from"] == loaded.recipe.stage_config([s.type for s in loaded.recipe.stages].index("distill")).steps
    assert steps["to"] == 4


def test_proxy_recipe_maps_accelerate_config_and_local_data(tmp_path):
    from edgekit.proxy_run import proxy_loaded_recipe
    from edgekit.preflight import load_recipe

    (tmp_path / "corpus.txt").write_text("some text " * 100)
    (tmp_path / "fsdp.yaml").write_text("distributed_type: FSDP\nnum_processes: 8\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"name: r\nmodel: {R1}\ntarget: jetson-orin-agx-64gb\ndata: corpus.txt\noutput: out/r\nstages:\n"
        "  - type: load\n  - type: prune\n    hidden_size: 2048\n    intermediate_size: 8192\n    num_layers: 20\n"
        "  - type: distill\n    steps: 100\n    accelerate_config: fsdp.yaml\n    device: cuda\n"
    )
    proxied = proxy_loaded_recipe(load_recipe(recipe, check_sources=False), processes=2).recipe
    assert proxied.data.source == "builtin:python-docs" and proxied.output == "out/r-proxy"
    prune, distill = proxied.stage_config(1), proxied.stage_config(2)
    assert (prune.hidden_size, prune.intermediate_size, prune.num_layers) == (512, 2048, 1)
    assert distill.accelerate_config is None and distill.processes == 2 and distill.device == "auto"


def test_proxy_source_kind_and_cache_keys():
    from edgekit.models.source import resolve_model_source

    real = resolve_model_source(R1)
    proxy = resolve_model_source("proxy:" + R1)
    assert proxy.kind == "proxy" and proxy.inner == real and not proxy.is_gguf
    fingerprint = proxy.fingerprint()
    assert fingerprint != real.fingerprint() and fingerprint["of"] == real.fingerprint()
    assert fingerprint["config"]["hidden_size"] == 896 and fingerprint["seed"] == 0
    assert fingerprint == resolve_model_source("proxy:" + R1).fingerprint()  # stable: a rerun reuses its cache
    with pytest.raises(ModelError, match="names no model"):
        resolve_model_source("proxy:proxy:" + R1)
    with pytest.raises(ModelError, match="no config.json for 'nobody-here/no-such-model'") as exc:
        resolve_model_source("proxy:nobody-here/no-such-model")
    assert "huggingface-cli download" in exc.value.how


def test_proxy_of_a_local_checkpoint_dir(tmp_path, tiny_model_dir):
    from edgekit.models.proxy import write_proxy_checkpoint
    from edgekit.models.source import resolve_model_source

    source = resolve_model_source(f"proxy:{tiny_model_dir}")
    assert source.inner.kind == "dir"
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    out_a.mkdir(), out_b.mkdir()
    metrics = write_proxy_checkpoint(source, out_a, dtype="float32")
    write_proxy_checkpoint(source, out_b, dtype="float32")
    assert metrics["proxy"] is True and metrics["proxy_of"] == str(tiny_model_dir)
    config = json.loads((out_a / "config.json").read_text())
    assert config["model_type"] == "llama" and config["hidden_size"] == 64 and config["tie_word_embeddings"] is True
    # deterministic: the same seed and rules give the same bytes (so the load stage's cache is stable)
    for name in ("model.safetensors", "tokenizer.json"):
        assert (out_a / name).read_bytes() == (out_b / name).read_bytes(), name


def test_proxy_and_real_runs_never_share_a_directory(tmp_path):
    from edgekit.proxy_run import check_output_kind

    check_output_kind(tmp_path, proxy=True)  # empty: fine either way
    (tmp_path / "manifest.json").write_text(json.dumps({"stages": []}))
    check_output_kind(tmp_path, proxy=False)
    with pytest.raises(OutputError, match="holds a real run"):
        check_output_kind(tmp_path, proxy=True)
    (tmp_path / "manifest.json").write_text(json.dumps({"stages": [], "proxy": {"proxy": True}}))
    with pytest.raises(OutputError, match="holds a proxy run"):
        check_output_kind(tmp_path, proxy=False)


def test_a_proxy_recipe_cannot_be_proxied_again(tmp_path):
    from edgekit.proxy_run import proxy_loaded_recipe
    from edgekit.preflight import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nmodel: proxy:{R1}\ntarget: jetson-orin-agx-64gb\nstages:\n  - type: load\n")
    with pytest.raises(RecipeError, match="already a proxy"):
        proxy_loaded_recipe(load_recipe(recipe, check_sources=False))


def test_proxy_module_is_light():
    code = "import sys, edgekit.models.proxy, edgekit.models.source; print(sorted(m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow  # ~30 s on 2 cores
def test_compress_7b_recipe_with_proxy_end_to_end(tmp_path):
    from edgekit import api

    recipe = RECIPE_7B
    out = tmp_path / "run"
    manifest = api.compress(recipe, proxy=True, output=out, quiet=True)
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["stages"] == manifest["stages"]
    stages = {s["name"]: s for s in manifest["stages"]}
    shipped_types = [s.type for s in api.validate_recipe(recipe, check_sources=False).recipe.stages]
    assert [s["type"] for s in manifest["stages"]] == shipped_types  # every stage of the shipped recipe ...
    assert all(s["status"] == "done" for s in manifest["stages"]), [(s["name"], s["status"]) for s in manifest["stages"]]
    # ... on a proxy, recorded as one
    proxy = manifest["proxy"]
    assert proxy["proxy"] is True and proxy["of"]["model"] == R1 and manifest["model"] == "proxy:" + R1
    assert manifest["recipe"]["name"].endswith("-proxy")
    assert any(m["field"] == "config.hidden_size" and m["to"] == 896 for m in proxy["model"])
    load = stages["load"]["metrics"]
    assert load["source"] == "proxy" and load["proxy"] is True and load["architecture"] == "Qwen2ForCausalLM"
    assert load["proxy_sampling"] == {"do_sample": True, "temperature": 0.6, "top_p": 0.95}  # R1's generation_config
    prune = stages["prune"]["metrics"]
    assert 0.6 < prune["parameter_fraction"] < 0.7  # the recipe's params: 0.67
    distill = stages["distill"]["metrics"]
    assert distill["steps"] == 4 and distill["processes"] == 2 and distill["stopped"] == "steps"
    quantize = stages["quantize"]["metrics"]
    assert quantize["method"] == "gptq" and quantize["bits"] == 4 and quantize["quantized_linears"] == 14
    export = stages["export_onnx"]["metrics"]
    assert export["greedy_agreement"] == 1.0
    engine = stages["build_engine"]["metrics"]
    assert engine["engine"] in ("planned", "built")
    # the bundle: graphs for both runtimes, the tokenizer, the device's build script, and its manifest
    bundle_name = manifest["recipe"]["name"]
    bundle = out / stages["build_engine"]["dir"] / bundle_name
    for rel in ("model.onnx", "tensorrt/model.onnx", "tokenizer.json", "config.json", "generation_config.json",
                "runtime.json", "recipe.yaml", "build_engine.sh", "manifest.json"):
        assert (bundle / rel).is_file(), rel
    bundle_manifest = json.loads((bundle / "manifest.json").read_text())
    assert bundle_manifest["model"]["source"] == "proxy:" + R1
    assert bundle_manifest["stages"][0]["metrics"]["proxy"] is True
    config = json.loads((bundle / "config.json").read_text())
    assert config["model_type"] == "qwen2" and (config["num_attention_heads"], config["num_key_value_heads"]) == (28, 4)
    assert config["tie_word_embeddings"] is False and config["hidden_size"] % quantize["group_size"] == 0
    assert config["intermediate_size"] % quantize["group_size"] == 0
    assert "proxy:" in (bundle / "recipe.yaml").read_text()
    # R1's sampling settings survive pruning and reach the bundle's runtime config; the reasoning
    # split is on (the proxy tokenizer has <think> and </think>)
    runtime = json.loads((bundle / "runtime.json").read_text())
    assert runtime["sampling"]["temperature"] == 0.6 and runtime["sampling"]["top_p"] == 0.95
    assert runtime["reasoning"] == "auto" and runtime["max_new_tokens"] == 1024
    # a rerun reuses every stage (stable cache keys), and a real run may not write over it
    again = api.compress(recipe, proxy=True, output=out, quiet=True)
    assert [s["status"] for s in again["stages"]] == ["cached"] * len(shipped_types)
    with pytest.raises(OutputError, match="holds a proxy run"):
        api.compress(recipe, output=out, quiet=True)
