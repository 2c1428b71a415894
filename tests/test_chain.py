"""The shape chain (edgekit.planning.chain): a recipe checked at full scale from the model's
config alone before any work — group sizes after pruning, distillation memory per GPU, the
engine against the target — with the table `edgekit recipe validate` prints; the prune
solver's width multiple; one memory model in decimal GB."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import REPO, run_cli

from edgekit.errors import RecipeError
from edgekit.models.source import model_shape_with_origin
from edgekit.planning import roofline as rf
from edgekit.planning.chain import build_chain, check_chain
from edgekit.planning.training import TrainingSetup, distill_memory
from edgekit.prune.shapes import ShapeError, plan_shape, solve_budget, total_parameters
from edgekit.sizing import GB, published_config, shape_from_config

R1_ID = "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"
R1_CONFIG = REPO / "edgekit" / "models" / "published" / "deepseek-ai--DeepSeek-R1-Distill-Qwen-7B" / "config.json"
#: the commit whose recipes/7b_to_orin.yaml is the recipe as shipped before issue #16
OLD_RECIPE_COMMIT = "124e6508bd7ab725f5c8f2973f639699ceee4bf8"
FSDP8 = "distributed_type: FSDP\nnum_processes: 8\nnum_machines: 1\nmixed_precision: bf16\nfsdp_config:\n  fsdp_sharding_strategy: FULL_SHARD\n"


def offline_env(tmp_path: Path) -> dict[str, str]:
    """An empty Hugging Face cache, offline: the published config is the only source."""
    return {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"), "HF_HUB_OFFLINE": "1"}


@pytest.fixture
def offline(tmp_path, monkeypatch):
    for key, value in offline_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))


def old_7b_recipe(tmp_path: Path) -> Path:
    """The shipped 7B recipe as it was before issue #16 (from git), with a local text large
    enough for its calibration (the data check is another part's) and allow_repeat."""
    text = subprocess.run(["git", "show", f"{OLD_RECIPE_COMMIT}:recipes/7b_to_orin.yaml"], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout
    (tmp_path / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog. " * 60_000)  # 2.7 MB
    text = text.replace("  source: builtin:python-docs\n", "  source: corpus.txt\n  allow_repeat: true\n")
    path = tmp_path / "old_7b.yaml"
    path.write_text(text)
    return path


def chain_of(path: Path):
    from edgekit.models.source import resolve_model_source
    from edgekit.preflight import load_recipe
    from edgekit.targets import load_target

    loaded = load_recipe(path, check_sources=False)
    source = resolve_model_source(loaded.recipe.model, base_dir=loaded.base_dir)
    return loaded, load_target(loaded.target_spec), source


# --------------------------------------------------------------------------- config lookup


def test_published_config_is_found_offline_and_counts_qwen2_biases(offline):
    from edgekit.models.source import resolve_model_source

    assert published_config(R1_ID) == R1_CONFIG and published_config("no/such-model") is None
    shape, origin = model_shape_with_origin(resolve_model_source(R1_ID))
    assert "published config.json" in origin
    assert (shape.hidden_size, shape.intermediate_size, shape.num_layers, shape.num_heads, shape.num_kv_heads,
            shape.vocab_size, shape.tie_word_embeddings, shape.qkv_bias) == (3584, 18944, 28, 28, 4, 152064, False, True)
    # Qwen2.5-7B's published parameter count, q/k/v biases included (without them: 7,615,283,712)
    assert total_parameters(shape) == 7_615_616_512


def test_a_config_in_the_hub_cache_takes_precedence(tmp_path, offline):
    from edgekit.models.source import resolve_model_source

    repo = tmp_path / "hf" / "hub" / "models--deepseek-ai--DeepSeek-R1-Distill-Qwen-7B"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    config = json.loads(R1_CONFIG.read_text())
    config["num_hidden_layers"] = 20
    (snapshot / "config.json").write_text(json.dumps(config))
    shape, origin = model_shape_with_origin(resolve_model_source(R1_ID))
    assert shape.num_layers == 20 and "Hugging Face cache" in origin


# --------------------------------------------------------------------------- the old 7B recipe


def test_old_7b_recipe_is_refused_up_front_for_distill_memory_and_group_size(tmp_path, offline):
    chain = build_chain(*chain_of(old_7b_recipe(tmp_path)))
    problems = {stage: str(error) for error, stage in chain.problems}
    assert list(problems) == ["distill", "quantize"], problems
    distill = problems["distill"]
    # 5.09B student: fp32 weights + gradients + DDP's gradient buckets + AdamW = 20 bytes/parameter, replicated
    assert "distill needs 149.6 GB per GPU (DDP x8" in distill and "5.09B-parameter student" in distill
    assert "weights 20.4, gradients 20.4, ddp buckets 20.4, optimizer 40.7, teacher 15.2" in distill
    assert "logits 29.9" in distill
    assert "the GPU (80 GB) has 76.0 GB usable" in distill and "stages[4]" in distill
    assert "To resolve, use FSDP FULL_SHARD over 8 GPUs" in distill
    quantize = problems["quantize"]
    assert "quantize.group_size 128 does not divide intermediate_size (down_proj input) = 15168" in quantize
    assert "after prune stage 'prune' (params 0.67" in quantize and "stages[6].group_size" in quantize
    assert "add 'width_multiple: 128' to the prune stage (stages[2])" in quantize and "group_size 64" in quantize
    rows = {row.stage: row for row in chain.rows}
    assert rows["prune"].shape.intermediate_size == 15168 and rows["distill"].tokens == 4000 * 4 * 8 * 8 * 2048


def test_old_7b_recipe_validate_exits_2_naming_both_stages(tmp_path):
    result = run_cli("recipe", "validate", str(old_7b_recipe(tmp_path)), env=offline_env(tmp_path))
    assert result.returncode == 2, result.stdout + result.stderr
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in result.stderr
    assert line.startswith("error: distill needs") and "(also refused: 'quantize')" in line


# --------------------------------------------------------------------------- a recipe that fits


def fixed_7b_recipe(tmp_path: Path) -> Path:
    path = old_7b_recipe(tmp_path)
    (tmp_path / "fsdp.yaml").write_text(FSDP8)
    text = path.read_text().replace("    processes: 8               # accelerate launch --num_processes 8 (DDP)\n",
                                    "    accelerate_config: fsdp.yaml\n")
    text = text.replace("    group_size: 128          # divides 3584 and 18944\n", "    group_size: 64\n")
    assert "accelerate_config: fsdp.yaml" in text and "group_size: 64" in text
    path.write_text(text)
    return path


def test_a_recipe_that_fits_passes_and_prints_the_chain(tmp_path):
    result = run_cli("recipe", "validate", str(fixed_7b_recipe(tmp_path)), env=offline_env(tmp_path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "published config.json" in out and "-> jetson-orin-agx-64gb" in out
    lines = {line.split()[0]: line for line in out.splitlines()[2:] if line.strip()}
    assert "3584/18944/28/28:4" in lines["load"] and "7.616B" in lines["load"]
    assert "2816/15168/28/28:4" in lines["prune"] and "5.091B" in lines["prune"]
    assert "per GPU (FSDP FULL_SHARD x8)" in lines["distill"] and "2.1B" in lines["distill"]
    assert "on jetson-orin-agx-64gb (usable 56)" in lines["build_engine"]
    per_gpu = float(lines["distill"].split("per GPU")[0].split()[-1])
    assert 40 < per_gpu < 76  # FSDP shards the 81 GB of student state 8 ways; teacher and logits stay


def test_fsdp_setup_is_read_from_the_accelerate_config(tmp_path, offline):
    path = fixed_7b_recipe(tmp_path)
    chain = build_chain(*chain_of(path))
    distill = next(r for r in chain.rows if r.stage == "distill")
    assert not chain.problems and "FSDP FULL_SHARD x8" in distill.memory_what
    # a hostile accelerate config is a one-line error at its line
    (tmp_path / "fsdp.yaml").write_text(FSDP8.replace("num_processes: 8", "num_processes: 1.0e+12"))
    with pytest.raises(RecipeError, match=r"num_processes must be an integer in 1\.\.65536") as info:
        check_chain(*chain_of(path))
    assert "fsdp.yaml line 2" in str(info.value)
    (tmp_path / "fsdp.yaml").unlink()
    with pytest.raises(RecipeError, match="accelerate config file 'fsdp.yaml' does not exist"):
        check_chain(*chain_of(path))


def test_explicit_pruned_width_that_a_group_does_not_divide(tmp_path, offline):
    path = fixed_7b_recipe(tmp_path)
    text = path.read_text().replace("    params: 0.67               # 7.6B -> ~5.1B\n    axes: [mlp, hidden]        # width only (Minitron: width beats depth at this scale)\n",
                                    "    intermediate_size: 15000\n")
    assert "intermediate_size: 15000" in text
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        check_chain(*chain_of(path))
    message = str(info.value)
    assert "group_size 64 does not divide intermediate_size (down_proj input) = 15000" in message
    assert "set the prune stage's intermediate_size so that 64 divides it (e.g. 14976 or 15040)" in message


# --------------------------------------------------------------------------- engine profiles


def test_engine_profile_that_overflows_the_target_names_build_engine(tmp_path, offline):
    path = fixed_7b_recipe(tmp_path)
    path.write_text(path.read_text().replace("    max_batch: 1\n", "    max_batch: 64\n"))
    with pytest.raises(RecipeError) as info:
        check_chain(*chain_of(path))
    message = str(info.value)
    assert "will not fit jetson-orin-agx-64gb" in message and "at context 4096 x batch 64" in message
    assert "stages[10]" in message and "lower build_engine max_batch" in message


# --------------------------------------------------------------------------- the solver


def test_solver_rounds_every_width_to_the_multiple():
    teacher = shape_from_config(json.loads(R1_CONFIG.read_text()))
    default = solve_budget(teacher, 0.67, ("mlp", "hidden"))
    assert default.intermediate_size == 15168 and default.intermediate_size % 128  # the 18944 -> 15168
    rounded = solve_budget(teacher, 0.67, ("mlp", "hidden"), 128)
    assert rounded.hidden_size % 128 == 0 and rounded.intermediate_size % 128 == 0
    assert abs(total_parameters(rounded) / total_parameters(teacher) - 0.67) < 0.03
    # plan_shape reads the prune stage's width_multiple
    config = SimpleNamespace(params=0.67, axes=["mlp", "hidden"], width_multiple=128)
    assert plan_shape(teacher, config) == rounded
    # heads: only layouts whose attention width (heads x head_dim) the multiple divides
    heads = solve_budget(teacher, 0.95, ("heads",), 512)
    assert (heads.num_heads * heads.head_dim) % 512 == 0 and heads.num_heads < 28
    with pytest.raises(ShapeError, match="width_multiple 4096 leaves no choice for the hidden axis"):
        solve_budget(teacher, 0.67, ("mlp", "hidden"), 4096)


def test_prune_config_width_multiple_reaches_the_solver():
    from edgekit.prune.stage import PruneConfig

    if "width_multiple" not in PruneConfig.model_fields:
        pytest.skip("PruneConfig has no width_multiple field yet (the lead adds it: see docs/validation.md)")
    teacher = shape_from_config(json.loads(R1_CONFIG.read_text()))
    shape = plan_shape(teacher, PruneConfig(params=0.67, width_multiple=128))
    assert shape.intermediate_size % 128 == 0 and shape.hidden_size % 128 == 0


# --------------------------------------------------------------------------- one memory model


def test_distill_memory_by_hand():
    student = shape_from_config(json.loads(R1_CONFIG.read_text()))
    params = total_parameters(student)
    ddp = distill_memory(student, student, TrainingSetup(processes=8, micro_batch=1, sequence_length=1024))
    assert ddp["weights"] == pytest.approx(params * 4 / 1e9) and ddp["optimizer"] == pytest.approx(params * 8 / 1e9)
    assert ddp["ddp_buckets"] == pytest.approx(params * 4 / 1e9)
    assert ddp["teacher"] == pytest.approx(params * 2 / 1e9)
    assert ddp["logits"] == pytest.approx(1024 * 152064 * 24 / 1e9)
    full = distill_memory(student, student, TrainingSetup(processes=8, sharding="full", micro_batch=1, sequence_length=1024))
    assert full["weights"] == pytest.approx(ddp["weights"] / 8) and full["gradients"] == pytest.approx(ddp["gradients"] / 8)
    assert full["ddp_buckets"] == 0
    grad_op = distill_memory(student, student, TrainingSetup(processes=8, sharding="grad_op", micro_batch=1))
    assert grad_op["weights"] == pytest.approx(ddp["weights"]) and grad_op["optimizer"] == pytest.approx(ddp["optimizer"] / 8)
    checkpointed = distill_memory(student, student, TrainingSetup(micro_batch=1, sequence_length=1024, gradient_checkpointing=True))
    assert checkpointed["activations"] < ddp["activations"] / 5


def test_one_memory_model_in_decimal_gb(tmp_path):
    """Plan and recipe validation agree on the largest context that fits (same breakdown,
    same allowance, decimal GB like the target); readiness uses the same constants."""
    from edgekit import api, sizing
    from edgekit.engine import readiness
    from edgekit.models.source import resolve_model_source
    from edgekit.models.source import model_shape
    from edgekit.targets import load_target

    assert readiness.GB == sizing.GB == rf.GB == 1e9
    assert readiness.RUNTIME_ALLOWANCE_GB is sizing.RUNTIME_ALLOWANCE_GB is rf.RUNTIME_ALLOWANCE_GB
    shape = model_shape(resolve_model_source("smollm2-135m"))
    fmt = rf.weight_format("fp16")
    workload = rf.Workload(context_length=4096, prefill_chunk=512)
    memory = rf.memory_breakdown(shape, fmt, workload)
    assert memory["weights_gb"] == pytest.approx(rf.weight_bytes(shape, fmt)["total"] / GB)
    assert memory["runtime_overhead_gb"] == sizing.RUNTIME_ALLOWANCE_GB
    usable = load_target("jetson-orin-nano-8gb").memory.usable_gb
    fixed = memory["total_gb"] - memory["kv_cache_gb"]
    boundary = int((usable - fixed) * GB // rf.kv_bytes_per_token(shape))
    for context, fits in ((boundary, True), (boundary + 1, False)):
        path = tmp_path / f"r{context}.yaml"
        path.write_text(textwrap.dedent(f"""\
            name: units
            model: smollm2-135m
            target: jetson-orin-nano-8gb
            context_length: {context}
            stages:
              - type: load
              - type: export_onnx
            """))
        assert api.plan(path)["targets"][0]["predicted_fits"] is fits
        if fits:
            api.validate_recipe(path)
        else:
            with pytest.raises(RecipeError, match="will not fit jetson-orin-nano-8gb"):
                api.validate_recipe(path)


def test_parameter_arithmetic_matches_a_qwen2_and_a_biased_llama():
    """total_parameters (what prune checks its result against) counts Qwen2's q/k/v biases and
    Llama's attention_bias, as transformers builds them."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=False)
    for config in (Qwen2Config(**common), LlamaConfig(**common, attention_bias=True), LlamaConfig(**common)):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        shape = shape_from_config(config.to_dict())
        assert sum(p.numel() for p in model.parameters()) == total_parameters(shape), config.model_type


def test_recipe_validate_walks_the_chain_once(tmp_path, monkeypatch):
    """`recipe validate` prints the chain its validation walked (one walk, not two), and the API
    still walks one for a LoadedRecipe that validation did not check that far."""
    from click.testing import CliRunner

    import edgekit.planning.chain as chain_module
    from edgekit import api
    from edgekit.cli import main

    path = fixed_7b_recipe(tmp_path)
    for key, value in offline_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    walks = []
    real = chain_module.build_chain
    monkeypatch.setattr(chain_module, "build_chain", lambda *a: walks.append(1) or real(*a))
    result = CliRunner().invoke(main, ["recipe", "validate", str(path)])
    assert result.exit_code == 0, result.output
    assert len(walks) == 1 and "5.091B" in result.output  # printed from that one walk
    loaded = api.validate_recipe(path)
    assert api.recipe_chain(loaded) is loaded.chain and len(walks) == 2
    loaded.chain_checked = False
    assert api.recipe_chain(loaded).rows and len(walks) == 3
