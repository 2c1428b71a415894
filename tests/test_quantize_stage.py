"""The quantize stage in the pipeline, on the tiny Llama: GPTQ/RTN checkpoints, quantized
ONNX variants checked against PyTorch, evaluation of every variant, bundle, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import hashlib

import pytest
from conftest import python_docs_text, run_cli, write_recipe

from edgekit import api

QUANT_STAGES = """\
stages:
  - type: load
  - type: evaluate
  - type: quantize
    method: {method}
    group_size: 32
    symmetric: true
    calibration_samples: 8
    sequence_length: 128
  - type: evaluate
  - type: export_onnx
    format: both
  - type: evaluate
  - type: bundle
"""


@pytest.fixture(scope="module")
def gptq_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("gptq")
    recipe = write_recipe(tmp / "q.yaml", tiny_model_dir, stages=QUANT_STAGES.format(method="gptq"), output=tmp / "run")
    return api.compress(recipe, quiet=True), tmp / "run", recipe


def by_name(manifest):
    return {s["name"]: s for s in manifest["stages"]}


def test_gptq_pipeline_end_to_end(gptq_run):
    manifest, out, _ = gptq_run
    stages = by_name(manifest)
    q = stages["quantize"]["metrics"]
    assert q["method"] == "gptq" and q["quantized_linears"] == 2 * 7 and q["calibration_tokens"] == 8 * 128
    assert 4 < q["bits_per_weight"] < 4.7  # 4-bit codes + fp16 scale and zero per 32 weights
    qdir = out / stages["quantize"]["dir"]
    # which text calibrated GPTQ: the source, the sha256 of its text, and the exact windows taken
    calibration = q["calibration_data"]
    assert calibration["source"] == "builtin:python-docs" and calibration["python"] == sys.version.split()[0]
    assert calibration["sha256"] == hashlib.sha256(python_docs_text().encode()).hexdigest()
    assert (calibration["samples"], calibration["sequence_length"], calibration["tokens"]) == (8, 128, 8 * 128)
    assert calibration["eval_tokens"] == 1024 and len(calibration["tokens_sha256"]) == 64
    assert json.loads((qdir / "quantization.json").read_text())["calibration_data"] == calibration
    config = json.loads((qdir / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gptq" and config["quantization_config"]["bits"] == 4
    # quality: the quantized checkpoint is evaluated through edgekit's loader
    float_ppl = stages["evaluate"]["metrics"]["perplexity"]
    quant_ppl = stages["evaluate-2"]["metrics"]["perplexity"]
    assert quant_ppl != float_ppl and quant_ppl < float_ppl * 1.5
    # both ONNX variants exist, were checked against PyTorch with the same quantized weights
    export = stages["export_onnx"]["metrics"]
    assert export["quantization"] == "gptq" and export["primary"] == "onnxruntime"
    assert export["logits_max_abs_diff"] < 2e-2 and export["logits_max_abs_diff_tensorrt"] < 2e-2
    edir = out / stages["export_onnx"]["dir"]
    record = json.loads((edir / "export.json").read_text())
    assert record["variants"] == {"onnxruntime": "model.onnx", "tensorrt": "tensorrt/model.onnx"}
    # each variant's held-out perplexity is recorded and agrees with PyTorch
    onnx_eval = stages["evaluate-3"]["metrics"]
    assert onnx_eval["graph"] == "onnxruntime"
    assert onnx_eval["perplexity"] == pytest.approx(quant_ppl, rel=2e-3)
    assert onnx_eval["perplexity_tensorrt"] == pytest.approx(quant_ppl, rel=2e-3)
    bundle = out / stages["bundle"]["dir"] / "tiny"
    bmanifest = json.loads((bundle / "manifest.json").read_text())
    assert "tensorrt/model.onnx" in bmanifest["files"] and "tensorrt/model.onnx_data" in bmanifest["files"]
    assert bmanifest["onnx"]["variants"]["tensorrt"] == "tensorrt/model.onnx"


def test_quantized_graph_operators(gptq_run):
    import onnx

    manifest, out, _ = gptq_run
    edir = out / by_name(manifest)["export_onnx"]["dir"]
    ort = onnx.load(str(edir / "model.onnx"), load_external_data=False)
    trt = onnx.load(str(edir / "tensorrt" / "model.onnx"), load_external_data=False)
    assert sum(n.op_type == "MatMulNBits" for n in ort.graph.node) == 14
    assert sum(n.op_type == "DequantizeLinear" for n in trt.graph.node) >= 14
    assert max(o.version for o in trt.opset_import if o.domain in ("", "ai.onnx")) >= 21
    onnx.checker.check_model(str(edir / "tensorrt" / "model.onnx"))


def test_rtn_and_rerun_cache(gptq_run, tmp_path, tiny_model_dir):
    manifest, _, recipe = gptq_run
    again = api.compress(recipe, quiet=True)
    assert [s["status"] for s in again["stages"]] == ["cached"] * 7
    rtn = write_recipe(tmp_path / "rtn.yaml", tiny_model_dir, stages=QUANT_STAGES.format(method="rtn"), output=tmp_path / "run")
    result = api.compress(rtn, quiet=True)
    q = by_name(result)["quantize"]["metrics"]
    assert q["method"] == "rtn" and q["calibration_samples"] == 0
    assert q["calibration_data"] is None  # RTN reads no text


def test_group_size_that_does_not_divide_is_a_clear_error(tmp_path, tiny_model_dir):
    stages = "stages:\n  - type: load\n  - type: quantize\n    method: rtn\n    group_size: 128\n"
    # the tiny model's hidden size is 64: 128 does not divide it
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, stages=stages, output=tmp_path / "run")
    result = run_cli("compress", str(recipe))
    assert result.returncode == 2 and "group_size" in result.stderr and "To resolve" in result.stderr
    assert not (tmp_path / "run" / "stages" / "02-quantize").exists()


def test_kill_during_quantize_resumes_cleanly(tmp_path, tiny_model_dir, gptq_run):
    reference, _, _ = gptq_run
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "q.yaml", tiny_model_dir, stages=QUANT_STAGES.format(method="gptq"), output=out)
    proc = subprocess.Popen([sys.executable, "-m", "edgekit", "compress", str(recipe), "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not list((out / "stages").glob(".tmp-03-quantize-*")):
            time.sleep(0.01)
        assert proc.poll() is None, "compress finished before quantize could be interrupted"
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not (out / "stages" / "03-quantize").exists()
    resumed = api.compress(recipe, quiet=True)
    assert [s["status"] for s in resumed["stages"]] == ["cached", "cached"] + ["done"] * 5
    hashes = lambda m: {s["name"]: {k: v["sha256"] for k, v in s["files"].items()} for s in m["stages"]}  # noqa: E731
    assert hashes(resumed)["quantize"] == hashes(reference)["quantize"]


def test_fp8_static_export_matches_the_fp8_model(tmp_path, tiny_model_dir):
    """The FP8 Q/DQ graph (activation Q/DQ included) is checked against the FP8-simulating
    PyTorch model, not its float twin, and scores the same perplexity."""
    stages = (
        "stages:\n  - type: load\n  - type: quantize\n    method: fp8\n    calibration_samples: 4\n"
        "    sequence_length: 128\n  - type: evaluate\n  - type: export_onnx\n    format: tensorrt\n"
        "  - type: evaluate\n"
    )
    recipe = write_recipe(tmp_path / "fp8.yaml", tiny_model_dir, stages=stages, output=tmp_path / "run")
    recipe.write_text(recipe.read_text().replace("jetson-orin-nano-8gb", "workstation-rtx4090"))
    stages_out = by_name(api.compress(recipe, quiet=True))
    assert stages_out["export_onnx"]["metrics"]["quantization"] == "fp8"
    assert stages_out["export_onnx"]["metrics"]["logits_max_abs_diff"] < 1e-3
    assert stages_out["evaluate-2"]["metrics"]["perplexity"] == pytest.approx(
        stages_out["evaluate"]["metrics"]["perplexity"], rel=1e-3
    )


def test_quantize_device_cuda_without_a_gpu_fails_before_loading(tmp_path, tiny_model_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    stages = "stages:\n  - type: load\n  - type: quantize\n    method: gptq\n    group_size: 32\n    device: cuda\n"
    recipe = write_recipe(tmp_path / "cuda.yaml", tiny_model_dir, stages=stages, output=tmp_path / "run")
    result = run_cli("compress", str(recipe), "-q")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "device cuda was requested" in lines[0] and "stage quantize" in lines[0], lines
    # EDGEKIT_DEVICE=cuda puts every `auto` stage on the GPU: the same refusal, naming the variable
    recipe = write_recipe(tmp_path / "auto.yaml", tiny_model_dir, stages=stages.replace("device: cuda", "device: auto"),
                          output=tmp_path / "run2")
    result = run_cli("compress", str(recipe), "-q", env={"EDGEKIT_DEVICE": "cuda"})
    assert result.returncode == 2 and "EDGEKIT_DEVICE=cuda" in result.stderr and "stage quantize" in result.stderr


def test_evaluate_dtype_and_device(tmp_path, tiny_model_dir):
    """evaluate in bfloat16 (what auto picks on a GPU for a bf16 checkpoint) scores within a
    percent of float32, and the metrics say which device and dtype scored."""
    stages = ("stages:\n  - type: load\n  - type: evaluate\n    name: fp32\n    max_windows: 4\n"
              "  - type: evaluate\n    name: bf16\n    dtype: bfloat16\n    max_windows: 4\n")
    recipe = write_recipe(tmp_path / "e.yaml", tiny_model_dir, stages=stages, output=tmp_path / "run")
    manifest = api.compress(recipe, quiet=True)
    fp32, bf16 = by_name(manifest)["fp32"]["metrics"], by_name(manifest)["bf16"]["metrics"]
    assert (fp32["device"], fp32["dtype"]) == ("cpu", "float32") and (bf16["device"], bf16["dtype"]) == ("cpu", "bfloat16")
    assert bf16["perplexity"] != fp32["perplexity"]  # it really ran in bf16
    assert bf16["perplexity"] == pytest.approx(fp32["perplexity"], rel=0.01)


@pytest.mark.gpu
def test_gptq_stage_on_cuda(tmp_path, tiny_model_dir):
    """The GPTQ stage with device cuda: runs, records the device and the GPU's peak memory, and
    the quantized model scores like the CPU run's (gptq_run) within 1 %."""
    stages = QUANT_STAGES.format(method="gptq").replace("    sequence_length: 128\n", "    sequence_length: 128\n    device: cuda\n")
    stages = stages.split("  - type: export_onnx")[0]
    recipe = write_recipe(tmp_path / "q.yaml", tiny_model_dir, stages=stages, output=tmp_path / "run")
    manifest = api.compress(recipe, quiet=True)
    q = by_name(manifest)["quantize"]["metrics"]
    assert q["device"] == "cuda" and q["peak_gpu_mb"] > 0
    cpu = write_recipe(tmp_path / "c.yaml", tiny_model_dir, stages=stages.replace("device: cuda", "device: cpu"),
                       output=tmp_path / "cpu")
    reference = api.compress(cpu, quiet=True)
    assert by_name(manifest)["evaluate-2"]["metrics"]["perplexity"] == pytest.approx(
        by_name(reference)["evaluate-2"]["metrics"]["perplexity"], rel=0.01)
