"""Calibration windows a checkpoint samples itself (prune and quantize ``generated_ratio``):
which windows are taken, the settings refused, the pipeline on the tiny Llama (sampled once per
sampling model and settings, reused on a rerun, said in the stage records, and the
out-of-domain evaluation text never among the windows)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from conftest import run_cli, write_recipe
from pydantic import ValidationError

from edgekit import api


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_generated_windows_span_every_sequence_before_a_second_window(tmp_path):
    from edgekit.models.generated import generated_windows

    tokens = np.arange(4 * 8, dtype="<u4").reshape(4, 8)  # 4 sequences of 8 tokens, 2 windows of 4 each
    path = tmp_path / "g.u32"
    tokens.tofile(path)
    windows = generated_windows(path, sequences=4, length=8, window=4, count=6)
    assert [w.shape for w in windows] == [(1, 4)] * 6
    # the first window of sequences 0..3, then the second window of sequences 0 and 1
    expected = [tokens[0, :4], tokens[1, :4], tokens[2, :4], tokens[3, :4], tokens[0, 4:], tokens[1, 4:]]
    assert [w[0].tolist() for w in windows] == [e.tolist() for e in expected]
    assert windows[0].dtype.is_floating_point is False and str(windows[0].dtype) == "torch.int64"
    # a short file is refused, not read as garbage
    (tmp_path / "short.u32").write_bytes(tokens.tobytes()[:-4])
    with pytest.raises(Exception, match="delete it"):
        generated_windows(tmp_path / "short.u32", sequences=4, length=8, window=4, count=2)


@pytest.mark.parametrize("stage", ["prune", "quantize"])
def test_generated_calibration_settings_and_hostile_values(stage):
    from edgekit.prune.stage import PruneConfig
    from edgekit.quantize.stage import QuantizeConfig

    base = {"prune": {"params": 0.67}, "quantize": {}}[stage]
    config_type = {"prune": PruneConfig, "quantize": QuantizeConfig}[stage]
    # at the defaults neither field reaches the config dump: existing recipes keep their cache keys
    assert not {"generated_ratio", "generation"} & set(config_type(**base).model_dump(mode="json"))
    used = config_type(**base, generated_ratio=0.5, generation={"sequences": 300}).model_dump(mode="json")
    assert used["generated_ratio"] == 0.5 and used["generation"]["sequences"] == 300
    assert config_type(**base, calibration_samples=10, generated_ratio=0.25).generated_windows_needed() == 2  # round(2.5)
    for params, message in (
        ({"generated_ratio": 1.5}, "less than or equal to 1"),
        ({"generated_ratio": -0.1}, "greater than or equal to 0"),
        ({"generated_ratio": float("nan")}, "finite"),
        ({"generated_ratio": float("inf")}, "finite"),
        ({"generated_ratio": "half"}, "valid number"),
        ({"generated_ratio": 0.5, "generation": {"sequences": 0}}, "greater than or equal to 1"),
        ({"generated_ratio": 0.5, "generation": {"sequences": 10**9}}, "less than or equal to"),
        ({"generated_ratio": 0.5, "generation": {"temperature": 0}}, "greater than 0"),
        ({"generated_ratio": 0.5, "generation": {"prompts": ["x" * 2001]}}, "at most 2000"),
        ({"generated_ratio": 0.5, "generation": {"prompts": []}}, "at least 1"),
        ({"generated_ratio": 0.5, "generation": {"path": "/etc/passwd"}}, "Extra inputs"),
        ({"generated_ratio": 0.5, "sequence_length": 64, "generation": {"length": 32}}, "shorter than one calibration window"),
        ({"generated_ratio": 1, "calibration_samples": 9, "sequence_length": 64,
          "generation": {"sequences": 4, "length": 128}}, "gives 8: raise generation.sequences"),
        ({"generated_ratio": 0.01, "calibration_samples": 16}, "rounds to no generated window"),
        ({"generated_ratio": 0.5, "generation": {"sequences": 1_000_000, "length": 65536}}, "more than 1,000,000,000"),
    ):
        with pytest.raises(ValidationError, match=message):
            config_type(**base, **params)
    if stage == "quantize":
        with pytest.raises(ValidationError, match="rtn reads no calibration data"):
            QuantizeConfig(method="rtn", generated_ratio=0.5)
    else:
        with pytest.raises(ValidationError, match="magnitude reads no calibration data"):
            PruneConfig(params=0.67, importance="magnitude", generated_ratio=0.5)
        # skipping layers one by one reads calibration windows even with magnitude importance
        PruneConfig(num_layers=1, importance="magnitude", depth_metric="perplexity_drop", generated_ratio=0.5)


def test_a_bad_generated_ratio_is_one_line_naming_the_field(tmp_path, tiny_model_dir):
    stages = "stages:\n  - load\n  - type: quantize\n    method: rtn\n    generated_ratio: 0.5\n"
    result = run_cli("recipe", "validate", str(write_recipe(tmp_path / "q.yaml", tiny_model_dir, stages=stages)))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "generated_ratio" in lines[0] and "Traceback" not in result.stderr


GENERATED_STAGES = """\
stages:
  - type: load
  - type: prune
    intermediate_size: 96
    calibration_samples: 4
    sequence_length: 32
    generated_ratio: 0.5
    generation: {{sequences: 3, length: 64, batch_size: 2, seed: 3}}
  - type: quantize
    method: gptq
    group_size: 32
    symmetric: true
    calibration_samples: 4
    sequence_length: 32
    generated_ratio: 1
    generation: {{sequences: 3, length: 64, batch_size: 2, seed: 3}}
  - type: evaluate
data:
  source: builtin:python-docs
  eval_tokens: 1024
  window: 128
  eval_sets:
    - label: secret
      source: {secret}
      tokens: 128
"""


def test_prune_and_quantize_calibrate_on_their_inputs_samples_once_and_never_on_the_eval_sets(tmp_path, tiny_model_dir,
                                                                                                monkeypatch):
    from edgekit.models import generated as generated_module
    from edgekit.quantize.stage import _calibration_record
    from edgekit.weights.checkpoint import load_tokenizer

    calls, windows_used = [], []
    real_sample, real_calibration = generated_module.sample_sequences, generated_module.calibration_with_generated
    monkeypatch.setattr(generated_module, "sample_sequences", lambda *a, **k: calls.append(k) or real_sample(*a, **k))

    def spy(*args, **kwargs):
        samples, record = real_calibration(*args, **kwargs)
        windows_used.append(samples)
        return samples, record

    monkeypatch.setattr(generated_module, "calibration_with_generated", spy)
    monkeypatch.setenv("EDGEKIT_CACHE_DIR", str(tmp_path / "cache"))
    secret = "Zebra quartz vexillology: the unmistakable out-of-domain sentence. " * 40
    (tmp_path / "secret.txt").write_text(secret)
    recipe = tmp_path / "g.yaml"
    recipe.write_text(f"name: tiny\nmodel: {tiny_model_dir}\ntarget: jetson-orin-nano-8gb\noutput: {tmp_path / 'run'}\n"
                      + GENERATED_STAGES.format(secret=tmp_path / "secret.txt"))
    manifest = api.compress(recipe, quiet=True, cache_dir=tmp_path / "cache")
    stages = {s["name"]: s for s in manifest["stages"]}
    assert "secret" in stages["evaluate"]["metrics"]["sets"]  # the set exists and was scored: by evaluate only
    # one sampling per sampling model: prune's input (the loaded model), quantize's (the pruned one)
    assert len(calls) == 2 and all(k["sequences"] == 3 and k["length"] == 64 for k in calls)
    files = sorted((tmp_path / "cache" / "teacher-samples").iterdir())
    assert len(files) == 2 and all(f.stat().st_size == 3 * 64 * 4 for f in files)
    stamps = {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in files}

    pruning = json.loads((tmp_path / "run" / stages["prune"]["dir"] / "pruning.json").read_text())
    prune_generated = pruning["generated_calibration"]
    assert (prune_generated["ratio"], prune_generated["windows"], prune_generated["text_windows"]) == (0.5, 2, 2)
    assert pruning["calibration_samples"] == 4
    quantization = json.loads((tmp_path / "run" / stages["quantize"]["dir"] / "quantization.json").read_text())
    calibration = quantization["calibration_data"]
    generated = calibration["generated"]
    assert (generated["ratio"], generated["windows"], generated["text_windows"]) == (1.0, 4, 0)
    assert generated["settings"]["prompts"] == list(generated_module.DEFAULT_PROMPTS) and generated["settings"]["seed"] == 3
    by_sha = {sha256(f): f for f in files}
    assert prune_generated["sha256"] in by_sha and generated["sha256"] in by_sha and prune_generated["sha256"] != generated["sha256"]
    # quantize calibrated on exactly the sampled tokens: the first window of each of the 3
    # sequences, then the second window of the first
    sampled = np.fromfile(by_sha[generated["sha256"]], dtype="<u4").reshape(3, 64)
    expected = [sampled[0, :32], sampled[1, :32], sampled[2, :32], sampled[0, 32:]]
    assert [w[0].tolist() for w in windows_used[1]] == [e.tolist() for e in expected]
    assert calibration["tokens_sha256"] == _calibration_record({}, windows_used[1])["tokens_sha256"]
    # prune: two windows of the text, then two of the loaded model's samples
    prune_sampled = np.fromfile(by_sha[prune_generated["sha256"]], dtype="<u4").reshape(3, 64)
    assert [w[0].tolist() for w in windows_used[0][2:]] == [prune_sampled[0, :32].tolist(), prune_sampled[1, :32].tolist()]
    # the out-of-domain text is in no calibration window: no 8-token run of it anywhere
    ids = load_tokenizer(tiny_model_dir)(secret, add_special_tokens=False)["input_ids"]
    grams = {tuple(ids[k: k + 8]) for k in range(len(ids) - 8)}
    rows = [w[0].tolist() for samples in windows_used for w in samples]
    assert not any(tuple(row[k: k + 8]) in grams for row in rows for k in range(len(row) - 8))

    # a forced rerun samples nothing: both files are reused, and both stages write the same bytes
    before = {name: sha256(tmp_path / "run" / stages[name]["dir"] / f) for name, f in
              (("prune", "model.safetensors"), ("quantize", "model.safetensors"), ("quantize", "quantization.json"))}
    manifest = api.compress(recipe, quiet=True, force=True, cache_dir=tmp_path / "cache")
    stages = {s["name"]: s for s in manifest["stages"]}
    assert len(calls) == 2
    assert {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in (tmp_path / "cache" / "teacher-samples").iterdir()} == stamps
    after = {name: sha256(tmp_path / "run" / stages[name]["dir"] / f) for name, f in
             (("prune", "model.safetensors"), ("quantize", "model.safetensors"), ("quantize", "quantization.json"))}
    assert after == before


def test_token_files_sampled_before_the_move_are_reused(tmp_path, tiny_model_dir, monkeypatch):
    """distill kept its samples in <cache>/distill-generated; the first run that wants the same
    key moves the file into <cache>/teacher-samples instead of sampling again."""
    from edgekit.models import generated as generated_module
    from edgekit.models.generated import GenerationSettings, generated_data
    from edgekit.pipeline.context import StageContext
    from edgekit.pipeline.progress import Reporter
    from types import SimpleNamespace

    ctx = StageContext(name="quantize", type="quantize", index=1, config=SimpleNamespace(device="cpu"),
                       recipe=SimpleNamespace(trust_remote_code=False), recipe_dir=tmp_path, target=None,
                       output_dir=tmp_path / "out", inputs={}, history=[], cache_dir=tmp_path / "cache",
                       work_dir=tmp_path / "work", references={}, reporter=Reporter(quiet=True))
    settings = GenerationSettings(sequences=2, length=16, batch_size=2)
    first = generated_data(ctx, tiny_model_dir, settings, length=16, role="input checkpoint")
    moved_from = tmp_path / "cache" / "distill-generated" / first["path"].rsplit("/", 1)[1]
    moved_from.parent.mkdir(parents=True)
    (tmp_path / "cache" / "teacher-samples" / moved_from.name).rename(moved_from)
    monkeypatch.setattr(generated_module, "sample_sequences", lambda *a, **k: pytest.fail("sampled again"))
    again = generated_data(ctx, tiny_model_dir, settings, length=16, role="input checkpoint")
    assert again["reused"] and again["path"] == first["path"] and again["sha256"] == first["sha256"]
    assert not moved_from.exists()
