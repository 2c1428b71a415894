"""`edgekit run` / `edgekit calibrate-router` on two real tiny bundles (a small and a large
tiny Llama sharing a tokenizer), the recipe's `runtime:` section and the bundle's runtime.json."""

from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path

import pytest
from conftest import build_tiny_model, run_cli, write_recipe

STAGES = textwrap.dedent(
    """\
    stages:
      - type: load
      - type: export_onnx
      - type: bundle
    """
)
PROMPT = "The for statement is used to iterate over"


def compress_ort_bundle(tmp: Path, model: Path, name: str, extra: str = "") -> Path:
    """A tiny ONNX Runtime bundle of ``model`` under ``tmp/name`` (load, export_onnx, bundle)."""
    from edgekit import api

    recipe = write_recipe(tmp / f"{name}.yaml", model, stages=STAGES, output=tmp / name, extra=extra)
    manifest = api.compress(recipe, quiet=True)
    return tmp / name / manifest["stages"][-1]["dir"] / "tiny"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("runtime-cli")
    large_model = build_tiny_model(tmp / "large-llama", seed=1)  # same tokenizer, other weights
    large = compress_ort_bundle(tmp, large_model, "large")
    small = compress_ort_bundle(tmp, tiny_model_dir, "small", extra="runtime:\n  policy: small_only\n  max_new_tokens: 12\n")
    return small, large


def test_the_bundle_carries_its_runtime_config(bundles):
    small, _ = bundles
    runtime = json.loads((small / "runtime.json").read_text())
    assert runtime["format"] == "edgekit.runtime/1" and runtime["policy"] == "small_only" and runtime["max_new_tokens"] == 12
    manifest = json.loads((small / "manifest.json").read_text())
    assert manifest["runtime"] == "runtime.json" and "runtime.json" in manifest["files"]


def test_run_prints_text_and_which_branch_answered(bundles):
    small, _ = bundles
    result = run_cli("run", str(small), "--prompt", PROMPT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()  # the (untrained model's) text
    route = result.stderr.strip().splitlines()[-1]
    assert route.startswith("[answered by small (small)") and "tok/s" in route and "TTFT" in route
    from edgekit import api

    data = api.run_prompt(small, PROMPT)
    assert data["branch"] == "small" and len(data["tokens"]) <= 12 and not data["fell_back"]
    assert result.stdout.strip() == data["text"].strip()  # greedy: the same answer in and out of process


def test_speculative_output_equals_the_large_branch_alone(bundles):
    from edgekit import api

    small, large = bundles
    alone = api.run_prompt(small, PROMPT, policy="large_only", large=str(large), max_new_tokens=16)
    spec = api.run_prompt(small, PROMPT, policy="speculative", large=str(large), max_new_tokens=16)
    assert alone["branch"] == "large" and spec["branch"] == "speculative"
    assert spec["tokens"] == alone["tokens"] and spec["text"] == alone["text"]
    assert spec["acceptance_rate"] is not None and spec["speculative"]["large_calls"] <= len(spec["tokens"]) + 1


def test_draft_options_keep_the_output_and_bad_values_are_one_line_errors(bundles):
    from edgekit import api

    small, large = bundles
    alone = api.run_prompt(small, PROMPT, policy="large_only", large=str(large), max_new_tokens=16)
    spec = api.run_prompt(small, PROMPT, policy="speculative", large=str(large), max_new_tokens=16, draft_tokens=6,
                          draft_min_confidence=0.5)
    assert spec["tokens"] == alone["tokens"] and spec["speculative"]["drafted"] <= 6 * spec["speculative"]["large_calls"]
    bad = run_cli("run", str(small), "--prompt", PROMPT, "--policy", "speculative", "--large", str(large),
                  "--draft-min-confidence", "1.5")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "draft-min-confidence" in bad.stderr and "To resolve" in bad.stderr


def test_an_unreachable_large_endpoint_falls_back_to_the_small_branch(bundles):
    from edgekit import api

    small, _ = bundles
    events = []
    data = api.run_prompt(small, PROMPT, policy="large_only", large="http://127.0.0.1:9/v1x", on_event=events.append)
    assert events[-1].kind == "done" and "".join(e.text for e in events if e.kind == "text") == data["text"]
    assert data["branch"] == "small" and data["fell_back"] and "127.0.0.1:9" in data["reason"]


def test_calibrate_router_writes_thresholds_that_hit_the_rate(bundles, tmp_path):
    import shutil

    small, large = bundles
    bundle = tmp_path / "tiny"
    shutil.copytree(small, bundle)
    result = run_cli("calibrate-router", str(bundle), "--policy", "input_complexity", "--large", str(large),
                     "--large-rate", "0.3", "--prompts", "40")
    assert result.returncode == 0, result.stderr
    assert "input_complexity: threshold" in result.stdout and "runtime.json" in result.stdout
    runtime = json.loads((bundle / "runtime.json").read_text())
    cal = runtime["calibration"]
    # a large branch outside the bundle is the caller's (--large), never written into it: the
    # bundle keeps its own policy and large, and takes the thresholds
    assert runtime["policy"] == "small_only" and runtime["large"] is None and cal["large_not_stored"] == str(large)
    assert cal["policy"] == "input_complexity" and runtime["thresholds"]["complexity"] == cal["threshold"]
    assert abs(cal["large_rate_achieved"] - 0.3) <= 0.05 and cal["n_prompts"] == 40
    assert 0.0 <= cal["large_rate_held_out"] <= 1.0 and cal["n_prompts_held_out"] == 40
    # the manifest still describes every file as it is
    manifest = json.loads((bundle / "manifest.json").read_text())
    digest = hashlib.sha256((bundle / "runtime.json").read_bytes()).hexdigest()
    assert manifest["files"]["runtime.json"]["sha256"] == digest
    # and the router now routes by it
    from edgekit import api

    data = api.run_prompt(bundle, PROMPT, max_new_tokens=4, policy="input_complexity", large=str(large))
    assert data["policy"] == "input_complexity" and data["threshold"] == pytest.approx(cal["threshold"])
    # a large bundle inside the bundle is stored with the policy
    inner = tmp_path / "tiny-with-large"
    shutil.copytree(small, inner)
    shutil.copytree(large, inner / "large")
    result = run_cli("calibrate-router", str(inner), "--policy", "input_complexity", "--large", "large",
                     "--large-rate", "0.3", "--prompts", "8")
    assert result.returncode == 0, result.stderr
    runtime = json.loads((inner / "runtime.json").read_text())
    assert runtime["policy"] == "input_complexity" and runtime["large"] == "large"
    data = api.run_prompt(inner, PROMPT, max_new_tokens=4)
    assert data["policy"] == "input_complexity"


def test_runtime_section_errors_name_the_field(tiny_model_dir, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, stages=STAGES, extra="runtime:\n  policy: cascade\n")
    result = run_cli("recipe", "validate", str(recipe))
    assert result.returncode == 2 and "runtime" in result.stderr and "needs a large branch" in result.stderr
    recipe = write_recipe(tmp_path / "s.yaml", tiny_model_dir, stages=STAGES,
                          extra="runtime:\n  policy: small_only\n  thresholds:\n    confidance: 0.2\n")
    result = run_cli("recipe", "validate", str(recipe))
    assert result.returncode == 2 and "confidance" in result.stderr
    bundle = tmp_path / "nope"
    bundle.mkdir()
    result = run_cli("run", str(bundle), "--prompt", "x")
    assert result.returncode == 2 and "not a bundle" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_cli_choices_and_bounds_are_the_runtime_settings():
    from edgekit import cli
    from edgekit.runtime.config import CALIBRATABLE, POLICIES, RuntimeConfig, choices

    def option(command, name):
        return next(p for p in cli.main.commands[command].params if p.name == name)

    assert choices(RuntimeConfig, "policy") == POLICIES
    for command in ("run", "serve"):
        assert tuple(option(command, "policy").type.choices) == POLICIES
        assert tuple(option(command, "backend").type.choices) == choices(RuntimeConfig, "backend")
    assert tuple(option("run", "reasoning").type.choices) == choices(RuntimeConfig, "reasoning")
    assert tuple(option("calibrate-router", "policy").type.choices) == CALIBRATABLE and set(CALIBRATABLE) < set(POLICIES)
    draft, tokens = option("run", "draft_min_confidence").type, option("run", "draft_tokens").type
    assert (draft.min, draft.max, draft.min_open, draft.max_open) == (0, 1, False, True)
    assert (tokens.min, tokens.max) == (1, 32)
