"""scripts/bench_prune_distill.py part (b): the recipes it writes are valid, and with
--prune-generated-ratio the prune stage samples exactly the sequences distillation samples
(one cached file), so the importance windows cost no second sampling."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_prune_distill", REPO / "scripts" / "bench_prune_distill.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stages(bench, tmp_path, **kwargs):
    from edgekit import api

    path = tmp_path / "b.yaml"
    path.write_text(bench.recipe_b("mlp", ("mlp",), 15, 200, **kwargs))
    recipe = api.validate_recipe(path, check_sources=False).recipe
    return {spec.name: recipe.stage_config(i) for i, spec in enumerate(recipe.stages)}


def test_prune_importance_from_the_teachers_samples_shares_distills_token_file(bench, tmp_path):
    from edgekit.models.generated import generation_settings

    stages = _stages(bench, tmp_path, generated_ratio=0.5, prune_generated_ratio=0.5)
    prune, distill = stages["prune"], stages["distill"]
    assert (prune.generated_ratio, prune.calibration_samples, prune.sequence_length) == (0.5, 32, 256)
    assert prune.generated_windows_needed() == 16 and distill.generated_ratio == 0.5
    # the same sampling model (both read the loaded teacher) and the same resolved settings: one key
    assert (generation_settings(prune.generation, length=prune.sequence_length)
            == generation_settings(distill.generation, length=distill.sequence_length))
    plain = _stages(bench, tmp_path)["prune"]
    assert (plain.generated_ratio, plain.calibration_samples, plain.sequence_length) == (0.0, 16, 512)


def test_a_prune_generated_ratio_outside_0_1_is_refused(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_prune_distill.py"), "--skip-a", "--skip-b",
                             "--prune-generated-ratio", "1.5", "--out", str(tmp_path), "--work", str(tmp_path / "w")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--prune-generated-ratio" in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_reconstruct_reaches_the_prune_stage_alone(bench, tmp_path):
    stages = _stages(bench, tmp_path, reconstruct=True)
    assert stages["prune"].reconstruct and stages["prune"].calibration_samples == 16
    assert not _stages(bench, tmp_path)["prune"].reconstruct
    # with teacher-sampled importance windows the refit reads the same windows
    both = _stages(bench, tmp_path, reconstruct=True, prune_generated_ratio=0.5)["prune"]
    assert both.reconstruct and both.generated_ratio == 0.5
