"""`edgekit calibrate-router --prompt-set` on two real tiny bundles (a small and a large tiny Llama
sharing a tokenizer): a jsonl set with kinds, the learned policy trained and stored in the
bundle's runtime.json, routing by it afterwards, and hostile runtime.json values refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import build_tiny_model, run_cli
from test_runtime_cli import compress_ort_bundle

@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("routing-calibrate")
    large = compress_ort_bundle(tmp, build_tiny_model(tmp / "large-llama", seed=1), "large")
    small = compress_ort_bundle(tmp, tiny_model_dir, "small", extra="runtime:\n  policy: small_only\n  max_new_tokens: 6\n")
    return small, large


def _prompt_set(path: Path) -> Path:
    """Three kinds (prose from the docs the tiny tokenizer knows, digits, symbols), 24 prompts each."""
    import random

    from edgekit.models.routing_set import PromptItem, write_prompt_set

    rng = random.Random(0)
    words = "the for statement is used to iterate over elements of a sequence such as list tuple or string".split()
    items = []
    for i in range(24):
        items.append(PromptItem(" ".join(rng.choice(words) for _ in range(rng.randint(3, 30))), "prose",
                                " ".join(rng.choice(words) for _ in range(12))))
        items.append(PromptItem(" ".join(str(rng.randint(0, 9999)) for _ in range(rng.randint(2, 12))), "digits",
                                " ".join(str(rng.randint(0, 99)) for _ in range(8))))
        items.append(PromptItem("".join(rng.choice("{}[]();:=<>!?") for _ in range(rng.randint(3, 40))), "symbols"))
    return write_prompt_set(path, items)


def test_learned_calibration_trains_stores_and_routes(bundles, tmp_path):
    from edgekit import api

    small, large = bundles
    bundle = tmp_path / "tiny"
    shutil.copytree(small, bundle)
    shutil.copytree(large, bundle / "large")  # inside the bundle: stored with the policy
    prompts = _prompt_set(tmp_path / "set.jsonl")
    result = run_cli("calibrate-router", str(bundle), "--policy", "learned", "--large", "large", "--prompt-set", str(prompts),
                     "--hidden", "4", "--large-rate", "0.3")
    assert result.returncode == 0, result.stderr
    assert "learned: threshold" in result.stdout and "runtime.json" in result.stdout
    for kind in ("digits", "prose", "symbols"):
        assert f"  {kind}: large" in result.stdout
    runtime = json.loads((bundle / "runtime.json").read_text())
    cal = runtime["calibration"]
    assert runtime["policy"] == "learned" and runtime["large"] == "large"
    assert runtime["thresholds"]["learned"] == cal["threshold"] and len(runtime["learned"]["hidden_weights"]) == 4
    assert cal["n_prompts"] == 36 and cal["n_prompts_held_out"] == 36 and abs(cal["large_rate_achieved"] - 0.3) <= 0.05
    assert set(cal["per_kind"]) == {"digits", "prose", "symbols"} and cal["prompt_set"]["prompts"] == 72
    assert 0.0 <= cal["large_rate_held_out"] <= 1.0 and "learned" not in cal  # the weights live in runtime.json's learned
    data = api.run_prompt(bundle, "the for statement is", max_new_tokens=3)
    assert data["policy"] == "learned" and data["threshold"] == pytest.approx(cal["threshold"])
    assert data["branch"] == ("large" if data["score"] > data["threshold"] else "small")
    # hostile values in runtime.json's learned: a one-line error, exit 2
    for bad in ({"output_weights": [1.0] * 3}, {"mean": [1e308] * 17}, {"hidden_weights": [[0.0] * 17] * 65},
                {"features": ["x"] * 17}):
        broken = json.loads((bundle / "runtime.json").read_text())
        broken["learned"] = {**broken["learned"], **bad}
        (bundle / "runtime.json").write_text(json.dumps(broken))
        out = run_cli("run", str(bundle), "--prompt", "the for")
        assert out.returncode == 2 and "Traceback" not in out.stderr and "runtime.json: learned" in out.stderr, out.stderr
    (bundle / "runtime.json").write_text(" " * (5 * 1024 * 1024))  # read whole: bounded first
    out = run_cli("run", str(bundle), "--prompt", "the for")
    assert out.returncode == 2 and "over" in out.stderr and "Traceback" not in out.stderr


def test_a_prompt_set_calibrates_the_other_policies_and_reports_per_kind(bundles, tmp_path):
    from edgekit import api

    small, large = bundles
    bundle = tmp_path / "tiny"
    shutil.copytree(small, bundle)
    prompts = _prompt_set(tmp_path / "set.jsonl")
    record = api.calibrate_router(bundle, policy="input_complexity", large=str(large), prompt_set=prompts, large_rate=0.3)
    assert record["n_prompts"] == 36 and abs(record["large_rate_achieved"] - 0.3) <= 0.05
    assert {k: v["calibration_prompts"] for k, v in record["per_kind"].items()} == {"digits": 12, "prose": 12, "symbols": 12}
    large_cal = sum(round(v["large_rate_calibration"] * v["calibration_prompts"]) for v in record["per_kind"].values())
    assert large_cal == round(record["large_rate_achieved"] * 36)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": "x", "kind": "../etc"}\n')
    out = run_cli("calibrate-router", str(bundle), "--policy", "input_complexity", "--large", str(large), "--prompt-set", str(bad))
    assert out.returncode == 2 and f"{bad}:2" in out.stderr and "Traceback" not in out.stderr
    # learned needs the large branch's logits: a remote one is refused up front
    out = run_cli("calibrate-router", str(bundle), "--policy", "learned", "--large", "http://127.0.0.1:9", "--prompt-set", str(prompts))
    assert out.returncode == 2 and "large branch's logits" in out.stderr and "Traceback" not in out.stderr
