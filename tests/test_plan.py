"""``edgekit plan``: roofline arithmetic on known configs (checked against numbers worked out by
hand here), memory fit at the boundary, recipe and model-spec inputs, the largest shape within a
latency budget, peak-compute selection and the calibration against published figures.
Fast: no torch, no weights."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace

import pytest
from conftest import REPO, run_cli

from edgekit import api
from edgekit.planning import roofline as rf
from edgekit.planning.calibration import MEASUREMENTS, calibration_rows, fitted
from edgekit.planning.hardware import hardware, peak_tflops
from edgekit.prune.shapes import total_parameters
from edgekit.sizing import ModelShape, shape_from_config
from edgekit.targets import load_target, target_names

# meta-llama/Llama-2-7b-hf config.json (the fields planning reads)
LLAMA2_7B_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000, "hidden_size": 4096,
    "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
    "tie_word_embeddings": False, "torch_dtype": "float16",
}
RECIPE = REPO / "recipes" / "smollm2_to_orin_nano.yaml"


@pytest.fixture
def llama_dir(tmp_path):
    """A model directory holding only config.json: no weights, no tokenizer."""
    (tmp_path / "llama-2-7b").mkdir()
    (tmp_path / "llama-2-7b" / "config.json").write_text(json.dumps(LLAMA2_7B_CONFIG))
    return tmp_path / "llama-2-7b"


def one_line_error(result) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "To resolve, " in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_llama2_7b_arithmetic_by_hand():
    shape = shape_from_config(LLAMA2_7B_CONFIG)
    # per layer: q, k, v, o 4096x4096 each + gate, up, down 4096x11008 each
    assert shape.linear_parameters == 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) == 6_476_005_376
    assert rf.lm_head_parameters(shape) == 32000 * 4096 == 131_072_000
    assert total_parameters(shape) == 6_738_415_616  # the published "6.74B": + embeddings, lm_head, 65 norms

    fp16 = rf.weight_format("fp16")
    weights = rf.weight_bytes(shape, fp16)
    assert weights["total"] == 6_738_415_616 * 2
    # K and V x 32 layers x 32 heads x 128 dims x 2 bytes
    assert rf.kv_bytes_per_token(shape) == 2 * 32 * 32 * 128 * 2 == 524_288

    # one decode step at context 2048, half full: linear + lm_head + one embedding row + norms
    # + 1024 cached tokens' K/V read + the new token's K/V written
    workload = rf.Workload(context_length=2048, kv_fill=0.5)
    step = rf.decode_step_bytes(shape, fp16, workload)
    by_hand = 6_476_005_376 * 2 + 131_072_000 * 2 + 4096 * 2 + 4096 * 65 * 2 + 1024 * 524_288 + 524_288
    assert step["total"] == by_hand == 13_752_090_624
    # at 1000 GB/s the step needs 13.75 ms of bandwidth; 1/0.8 of that plus 2 ms at efficiency 0.8
    hw = rf.Hardware(bandwidth_gbps=1000, peak_tflops=100)
    assert rf.decode_roofline_ms(shape, fp16, workload, hw) == pytest.approx(13.752090624)
    eff = rf.Efficiency(slope=1 / 0.8, overhead_ms=2.0)
    ms = rf.decode_ms(shape, fp16, workload, hw, eff)
    assert ms == pytest.approx(13.752090624 / 0.8 + 2.0)
    assert 1000 / ms == pytest.approx(52.11, abs=0.01)  # tokens/s

    # int4, group 128: 4-bit codes + an fp16 scale and a 4-bit zero per 128 weights
    int4 = rf.weight_format("int4", group_size=128)
    assert int4.linear_bits == 4 + 20 / 128 and int4.lm_head_bits == 16 and int4.compute == "fp16"
    assert rf.weight_bytes(shape, int4)["linear"] == 6_476_005_376 * 4.15625 / 8

    # prefill of 128 tokens: 2 FLOPs per weight per token (lm_head at every position) + causal attention
    flops = rf.prefill_flops(shape, 128)
    assert flops == 2 * (6_476_005_376 + 131_072_000) * 128 + 4 * 32 * 32 * 128 * (128 * 129 / 2)


def test_tied_embeddings_are_stored_once_unless_lm_head_is_quantized():
    smollm = ModelShape(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                        num_kv_heads=3, head_dim=64, tie_word_embeddings=True)
    table = 49152 * 576
    plain = rf.weight_bytes(smollm, rf.weight_format("int4", group_size=64))
    assert plain["embedding"] == table * 2 and plain["lm_head"] == 0
    quantized_head = rf.weight_bytes(smollm, rf.weight_format("int4", group_size=64, quantize_lm_head=True))
    assert quantized_head["lm_head"] == table * (4 + 20 / 64) / 8  # untied: its own 4-bit copy


def test_memory_fit_flips_at_the_boundary(llama_dir):
    """KV cache is the only term that grows with the context once it exceeds the prefill chunk:
    the largest context that fits is (usable - everything else) / KV bytes per token."""
    shape = shape_from_config(LLAMA2_7B_CONFIG)
    fmt = rf.weight_format("int4", group_size=128)
    usable = load_target("jetson-orin-nano-8gb").memory.usable_gb
    base = rf.memory_breakdown(shape, fmt, rf.Workload(context_length=512, prefill_chunk=512))
    fixed = base["total_gb"] - base["kv_cache_gb"]
    boundary = math.floor((usable - fixed) * rf.GB / rf.kv_bytes_per_token(shape))  # decimal GB, as targets state it
    assert boundary > 512
    for context, fits in ((boundary, True), (boundary + 1, False)):
        plan = api.plan(str(llama_dir), target="jetson-orin-nano-8gb", precision="int4", context_length=context,
                        prompt_tokens=128)
        entry = plan["targets"][0]
        assert entry["predicted_fits"] is fits, (context, entry["predicted_memory_gb"])
        assert (entry["predicted_headroom_gb"] >= 0) is fits or abs(entry["predicted_headroom_gb"]) < 1e-3
    assert rf.fits(5.5, 5.5) and not rf.fits(5.5 + 1e-9, 5.5)
    # fp16 weights alone (13.48 GB = 12.55 GiB) overflow the Orin Nano; int4 fits
    fp16 = api.plan(str(llama_dir), target="jetson-orin-nano-8gb")["targets"][0]
    assert fp16["predicted_fits"] is False and fp16["predicted_memory_gb"]["weights"] == pytest.approx(13.477, abs=1e-3)


def test_recipe_supplies_pruned_shape_precision_target_and_budgets():
    from edgekit.prune.shapes import plan_shape
    from edgekit.models.source import model_shape
    from edgekit.preflight import load_recipe
    from edgekit.models.source import resolve_model_source

    result = run_cli("plan", str(RECIPE), "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    loaded = load_recipe(RECIPE, check_sources=False)
    prune_index = next(i for i, s in enumerate(loaded.recipe.stages) if s.type == "prune")
    expected = plan_shape(model_shape(resolve_model_source("smollm2-135m")), loaded.recipe.stage_config(prune_index))
    shape = plan["model"]["shape"]
    assert (shape["hidden_size"], shape["intermediate_size"], shape["num_layers"]) == (
        expected.hidden_size, expected.intermediate_size, expected.num_layers) == (576, 640, 30)
    assert plan["model"]["teacher_shape"]["intermediate_size"] == 1536
    inputs = plan["inputs"]
    assert inputs["precision"] == "int4" and inputs["weight_format"]["group_size"] == 64
    assert inputs["weight_format"]["linear_bits_per_weight"] == 4 + 20 / 64
    assert inputs["context_length"] == 2048 and inputs["prefill_chunk"] == 512  # build_engine max_prefill
    assert inputs["budgets"] == {"latency_p99_ms": 25.0, "ttft_p99_ms": 250.0, "memory_gb": 2.0}
    assert [t["target"] for t in plan["targets"]] == ["jetson-orin-nano-8gb"]
    entry = plan["targets"][0]
    assert entry["predicted_within_budgets"]["latency_p99_ms"]["meets"] is True
    # the recipe's memory budget (2 GiB, as validate measures it) caps it: 2.147 GB
    assert entry["predicted_largest_shape"]["memory_cap_gb"] == round(2 * 1024**3 / 1e9, 3)
    # options override the recipe
    plan = api.plan(RECIPE, precision="int8", context_length=1024, target="jetson-orin-nx-16gb")
    assert plan["inputs"]["precision"] == "int8" and plan["inputs"]["weight_format"]["group_size"] == 64
    assert plan["inputs"]["context_length"] == 1024 and plan["targets"][0]["target"] == "jetson-orin-nx-16gb"


def test_model_directory_with_only_config_json(llama_dir):
    result = run_cli("plan", str(llama_dir), "--target", "jetson-orin-agx-64gb", "--precision", "int4", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["model"]["parameters"] == 6_738_415_616 and plan["model"]["shape_from"] == "config.json"
    entry = plan["targets"][0]
    assert entry["predicted_fits"] and entry["hardware"]["memory_bandwidth_gbps"] == 204.8
    assert 15 < entry["predicted_decode"]["tokens_per_s"] < 60  # a 4-bit 7B on a 205 GB/s module


def test_hub_id_without_cached_config_is_a_one_line_error(tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"), "HF_HUB_OFFLINE": "1"}
    line = one_line_error(run_cli("plan", "example-org/no-such-model", env=env))
    assert "no config.json for hub model 'example-org/no-such-model'" in line
    assert "local directory holding the model's config.json" in line


def test_bad_options_are_one_line_errors():
    assert "--power-mode applies to one target" in one_line_error(run_cli("plan", "smollm2-135m", "--power-mode", "15W"))
    assert "unknown precision 'int3'" in one_line_error(run_cli("plan", "smollm2-135m", "--precision", "int3"))
    line = one_line_error(run_cli("plan", "smollm2-135m", "-t", "jetson-orin-nano-8gb", "--precision", "fp8"))
    assert "does not support fp8" in line and "int4" in line


def test_all_targets_table_and_json_labels():
    result = run_cli("plan", "smollm2-135m", "--all-targets", "--precision", "int4", "--budget-ms", "10")
    assert result.returncode == 0, result.stderr
    for name in target_names():
        assert name in result.stdout
    assert len(target_names()) == 6
    words = " ".join(result.stdout.split())
    assert "numbers are predictions" in words and words.count("predicted") >= 6  # every column labelled

    plan = api.plan("smollm2-135m", all_targets=True, precision="int4", budget_ms=10)
    assert len(plan["targets"]) == 6
    # every number of a target entry sits under a 'predicted...' key, except the figures the
    # prediction used (hardware, calibration), which are inputs
    unlabelled = []

    def walk(node, path):
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, path + (key,))
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, path + (i,))
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            if path[0] not in ("hardware", "calibration") and not any(
                    isinstance(p, str) and p.startswith("predicted") for p in path):
                unlabelled.append(path)

    for entry in plan["targets"]:
        walk(entry, ())
    assert not unlabelled, unlabelled
    assert "prediction" in plan["note"] and plan["format"] == "edgekit.plan/1"


@pytest.mark.parametrize("target,budget", [("jetson-orin-nano-8gb", 30.0), ("workstation-rtx4090", 12.0)])
def test_largest_shape_meets_the_budget_and_one_layer_more_does_not(llama_dir, target, budget):
    plan = api.plan(str(llama_dir), target=target, precision="int4", budget_ms=budget)
    entry = plan["targets"][0]
    largest = entry["predicted_largest_shape"]
    depth = largest["num_layers"]
    assert depth and largest["shape"]["hidden_size"] == 4096  # width kept, depth varied

    shape = shape_from_config(LLAMA2_7B_CONFIG)
    t = load_target(target)
    fmt = rf.weight_format("int4", group_size=128)
    workload = rf.Workload(context_length=2048, prompt_tokens=128, prefill_chunk=512)
    hw, _ = hardware(t, "fp16")
    eff = fitted(t.kind, "decode").efficiency

    def step(layers):
        return rf.decode_ms(replace(shape, num_layers=layers), fmt, workload, hw, eff)

    def memory(layers):
        return rf.memory_breakdown(replace(shape, num_layers=layers), fmt, workload)["total_gb"]

    assert step(depth) <= budget and memory(depth) <= t.memory.usable_gb
    assert step(depth + 1) > budget or memory(depth + 1) > t.memory.usable_gb
    assert largest["ms_per_token"] == pytest.approx(step(depth), abs=1e-3)
    assert largest["parameters"] == total_parameters(replace(shape, num_layers=depth))


def test_peak_compute_selection_rules():
    nano = load_target("jetson-orin-nano-8gb")
    assert peak_tflops(nano, "fp16").tflops == 67 / 2 / 2  # sparse int8 GPU TOPS -> dense -> fp16
    assert peak_tflops(nano, "fp16", "15W").tflops == 20 / 2  # the 15 W mode's own dense figure
    borrowed = peak_tflops(nano, "fp16", "25W")  # no 25 W figure: the reference mode's, flagged
    assert borrowed.tflops == 16.75 and borrowed.upper_bound
    agx = load_target("jetson-orin-agx-64gb")
    assert peak_tflops(agx, "fp16").tflops == 170 / 4 and not peak_tflops(agx, "fp16").upper_bound  # GPU-only first
    nx = peak_tflops(load_target("jetson-orin-nx-16gb"), "fp16")
    assert nx.tflops == 157 / 4 and nx.upper_bound and "DLA" in nx.derivation  # only GPU+DLA is quoted
    rtx = load_target("workstation-rtx4090")
    assert peak_tflops(rtx, "fp16").tflops == 165.2  # FP32 accumulate, not the GeForce FP16-accumulate rate
    assert peak_tflops(rtx, "fp8").tflops == 330.3
    assert peak_tflops(load_target("workstation-h100"), "fp8").tflops == 1978.9
    assert hardware(nano, "fp16", "15W")[0].bandwidth_gbps == 68


def test_calibration_is_fitted_from_the_table_and_predicts_the_published_figures():
    for kind in ("jetson", "workstation"):
        for phase in ("decode", "prefill"):
            fit = fitted(kind, phase)
            assert 0.3 <= fit.efficiency.efficiency <= 1.0, (kind, phase, fit)
            assert fit.efficiency.overhead_ms >= 0, (kind, phase, fit)
            assert fit.measurements
    rows = calibration_rows()
    assert len(rows) == len(MEASUREMENTS)
    assert all(row["source"].startswith("https://") and row["quoted"] for row in rows)
    fitted_rows = [r for r in rows if r["fitted"]]
    # the stated band (docs/planning.md): every fitted figure within a factor 1.6, four in five within 25%
    assert all(1 / 1.6 <= r["ratio"] <= 1.6 for r in fitted_rows), [(r["key"], r["ratio"]) for r in fitted_rows]
    close = [r for r in fitted_rows if 0.75 <= r["ratio"] <= 1.25]
    assert len(close) >= 0.8 * len(fitted_rows)
    # out of sample: NVIDIA's Orin Nano (Super) MLC figures, not fitted, within 20%
    cross = [r for r in rows if not r["fitted"]]
    assert cross and all(0.8 <= r["ratio"] <= 1.2 for r in cross), [(r["key"], r["ratio"]) for r in cross]


def test_plan_never_imports_torch():
    code = (
        "import sys; from edgekit import api; api.plan(%r); api.plan('smollm2-135m', all_targets=True);"
        "heavy = [m for m in ('torch', 'transformers', 'onnx', 'onnxruntime') if m in sys.modules]; assert not heavy, heavy"
    ) % str(RECIPE)
    subprocess.run([sys.executable, "-c", code], check=True)
