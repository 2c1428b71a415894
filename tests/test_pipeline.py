"""The runner on a tiny model: cache, resume, --force/--from/--until, atomic outputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli, write_recipe

from edgekit import api
from edgekit.errors import OutputError, StageError


def statuses(manifest):
    return [s["status"] for s in manifest["stages"]]


def file_hashes(manifest):
    return {s["name"]: {k: v["sha256"] for k, v in s["files"].items()} for s in manifest["stages"]}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_model_dir):
    """One uninterrupted run to compare against."""
    tmp = tmp_path_factory.mktemp("reference")
    recipe = write_recipe(tmp / "tiny.yaml", tiny_model_dir, output=tmp / "run")
    return api.compress(recipe, quiet=True), tmp / "run"


def test_full_run_writes_manifest(reference_run):
    manifest, out = reference_run
    assert statuses(manifest) == ["done"] * 5
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    assert on_disk["format"] == "edgekit.manifest/1" and on_disk["target"] == "jetson-orin-nano-8gb"
    for stage in on_disk["stages"]:
        assert {"name", "type", "status", "seconds", "metrics", "cache_key", "files"} <= set(stage)
        stage_dir = out / stage["dir"]
        for rel, meta in stage["files"].items():
            assert (stage_dir / rel).stat().st_size == meta["size"]
    by_name = {s["name"]: s for s in on_disk["stages"]}
    # quality stage by stage: the checkpoint and the ONNX export score the same
    ppl_torch = by_name["evaluate"]["metrics"]["perplexity"]
    ppl_onnx = by_name["evaluate-2"]["metrics"]["perplexity"]
    assert by_name["evaluate"]["metrics"]["backend"] == "pytorch"
    assert by_name["evaluate-2"]["metrics"]["backend"] == "onnxruntime"
    assert ppl_onnx == pytest.approx(ppl_torch, rel=1e-4)
    assert by_name["export_onnx"]["metrics"]["logits_max_abs_diff"] < 1e-4
    assert not list((out / "stages").glob(".tmp-*"))


def test_rerun_reuses_everything(reference_run):
    manifest, out = reference_run
    recipe = out.parent / "tiny.yaml"
    again = api.compress(recipe, quiet=True)
    assert statuses(again) == ["cached"] * 5
    assert file_hashes(again) == file_hashes(manifest)


def test_changed_parameter_reruns_only_downstream(tmp_path, tiny_model_dir, reference_run):
    manifest, _ = reference_run
    stages = (
        "stages:\n  - type: load\n  - type: evaluate\n  - type: export_onnx\n    parity_tolerance: 0.01\n"
        "  - type: evaluate\n  - type: bundle\n"
    )
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_model_dir, stages=stages, output=tmp_path / "run")
    # seed the run dir with the reference results, then change one export parameter
    import shutil

    shutil.copytree(reference_run[1], tmp_path / "run")
    changed = api.compress(recipe, quiet=True)
    assert statuses(changed) == ["cached", "cached", "done", "done", "done"]


def test_force_from_until(reference_run, tmp_path):
    _, out = reference_run
    recipe = out.parent / "tiny.yaml"
    partial = api.compress(recipe, quiet=True, output=tmp_path / "partial", until_stage="evaluate")
    assert statuses(partial) == ["done", "done", "pending", "pending", "pending"]
    resumed = api.compress(recipe, quiet=True, output=tmp_path / "partial", from_stage="export_onnx")
    assert statuses(resumed) == ["cached", "cached", "done", "done", "done"]
    forced = api.compress(recipe, quiet=True, output=tmp_path / "partial", force=True)
    assert statuses(forced) == ["done"] * 5
    with pytest.raises(StageError, match="no valid cached result"):
        api.compress(recipe, quiet=True, output=tmp_path / "fresh", from_stage="bundle")
    result = run_cli("compress", str(recipe), "--output", str(tmp_path / "x"), "--from", "nope")
    assert result.returncode == 2 and "no stage named 'nope'" in result.stderr


def test_damaged_artifact_is_rebuilt_not_trusted(reference_run, tmp_path):
    import shutil

    _, out = reference_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    onnx_data = next((copy / "stages").glob("03-export_onnx")) / "model.onnx_data"
    data = bytearray(onnx_data.read_bytes())
    data[100] ^= 0xFF
    onnx_data.unlink()  # write a new file rather than through any other name of it
    onnx_data.write_bytes(bytes(data))
    again = api.compress(out.parent / "tiny.yaml", quiet=True, output=copy)
    assert statuses(again)[:2] == ["cached", "cached"]
    assert again["stages"][2]["status"] == "done"
    assert file_hashes(again) == file_hashes(reference_run[0])


def test_output_not_writable(tmp_path, tiny_model_dir):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_model_dir, output=blocker / "run")
    with pytest.raises(OutputError):
        api.compress(recipe, quiet=True)
    result = run_cli("compress", str(recipe))
    assert result.returncode == 2 and "output directory is not writable" in result.stderr
    if os.geteuid() != 0:  # root ignores permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(OutputError):
            api.compress(recipe, quiet=True, output=locked / "run")


def test_stage_failure_leaves_no_partial_output(tmp_path, tiny_model_dir):
    stages = "stages:\n  - type: load\n  - type: export_onnx\n    parity_tolerance: 1.0e-12\n"
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_model_dir, stages=stages, output=tmp_path / "run")
    result = run_cli("compress", str(recipe))
    assert result.returncode == 2
    assert "ONNX graph's logits differ from PyTorch" in result.stderr and "parity_tolerance" in result.stderr
    stages_dir = tmp_path / "run" / "stages"
    assert sorted(p.name for p in stages_dir.iterdir()) == ["01-load"]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["stages"][1]["status"] == "failed"


def test_sigkill_mid_stage_resumes_with_same_hashes(tmp_path, tiny_model_dir, reference_run):
    """Kill -9 a real `edgekit compress` while stage 3 runs; the rerun redoes only stage 3
    onwards and ends with exactly the reference run's file hashes."""
    reference, _ = reference_run
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_model_dir, output=out)
    proc = subprocess.Popen([sys.executable, "-m", "edgekit", "compress", str(recipe), "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        tmp_dirs = []
        while time.time() < deadline and proc.poll() is None and not tmp_dirs:
            tmp_dirs = list((out / "stages").glob(".tmp-03-export_onnx-*"))
            time.sleep(0.01)
        assert tmp_dirs and proc.poll() is None, "compress finished before stage 3 could be interrupted"
        # Kill while optimum is writing the graph (its staging dir exists), or shortly after
        # the stage started: either way in the middle of the stage.
        started = time.time()
        while time.time() - started < 1.0 and not (tmp_dirs[0] / ".optimum").exists():
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "stages" / "03-export_onnx").exists()
    assert list((out / "stages").glob(".tmp-03-export_onnx-*"))  # the half-written dir
    resumed = api.compress(recipe, quiet=True)
    assert statuses(resumed) == ["cached", "cached", "done", "done", "done"]
    assert file_hashes(resumed) == file_hashes(reference)
    assert [s["cache_key"] for s in resumed["stages"]] == [s["cache_key"] for s in reference["stages"]]
    assert not list((out / "stages").glob(".tmp-*"))


def test_concurrent_run_is_refused(tmp_path, tiny_model_dir):
    import fcntl

    out = tmp_path / "run"
    (out / "stages").mkdir(parents=True)
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_model_dir, output=out)
    with open(out / ".edgekit.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(OutputError, match="another edgekit run"):
            api.compress(recipe, quiet=True)


def test_short_evaluation_text(tmp_path, tiny_model_dir):
    text = tmp_path / "short.txt"
    text.write_text("def f():\n    return 1\n")
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_model_dir, stages="stages: [load, evaluate]\n", output=tmp_path / "run")
    recipe.write_text(recipe.read_text().replace("builtin:python-docs", str(text)))
    result = run_cli("compress", str(recipe))
    assert result.returncode == 2
    assert "shorter than one window of 128" in result.stderr
    assert not (tmp_path / "run" / "stages" / "02-evaluate").exists()


def test_a_stage_on_a_gpu_gets_a_cache_key_of_its_own(monkeypatch):
    """A stage with a device setting that runs on CUDA here (auto resolved, EDGEKIT_DEVICE
    applied) folds "cuda" into its key: a GPU result is never taken for a CPU one or the
    reverse. On the CPU the key has no device part (keys of CPU runs stay what they were)."""
    import types

    import edgekit.devices as devices
    from edgekit.pipeline.runner import _computes_on_gpu

    monkeypatch.delenv("EDGEKIT_DEVICE", raising=False)
    for gpu, device, expected in [(False, "auto", False), (True, "auto", True), (True, "cpu", False), (False, "cpu", False),
                                  (False, "cuda", True), (True, "cuda", True)]:
        monkeypatch.setattr(devices, "cuda_available", lambda gpu=gpu: gpu)
        assert _computes_on_gpu(types.SimpleNamespace(device=device)) is expected, (gpu, device)
    monkeypatch.setattr(devices, "cuda_available", lambda: True)
    assert _computes_on_gpu(types.SimpleNamespace()) is False  # a stage without a device setting
    assert _computes_on_gpu(types.SimpleNamespace(device="tpu")) is False  # the stage's own validation reports it
    monkeypatch.setenv("EDGEKIT_DEVICE", "cpu")
    assert _computes_on_gpu(types.SimpleNamespace(device="auto")) is False
    monkeypatch.setenv("EDGEKIT_DEVICE", "bogus")
    assert _computes_on_gpu(types.SimpleNamespace(device="auto")) is False
