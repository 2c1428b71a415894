"""`edgekit validate` on a real tiny bundle (ONNX Runtime), its statistics, prompts files,
budgets and exit codes, and the report files (the tegrastats parser: test_telemetry_tegrastats.py).

The tiny bundle is built from a config (load -> export_onnx -> bundle, a few seconds). One
test marked slow runs validate on the real default bundle (SmolLM2-135M INT4) where
`make demo` has built it (or EDGEKIT_DEFAULT_BUNDLE points at one).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import compress_tiny_bundle, REPO, run_cli
from test_telemetry_tegrastats import ORIN_NANO_JP62, stand_in_tegrastats

from edgekit.cli import main
from edgekit.errors import ValidateError
from edgekit.validate.budgets import BUDGET_MEASURES, check_budgets
from edgekit.validate.host import detect_host_target, host_info, parse_l4t_release
from edgekit.validate.prompts import (DEFAULT_PROMPT_TOKENS, DEFAULT_PROMPTS, HELD_OUT_SOURCE, HELD_OUT_TOKENS, default_prompts,
                                      held_out_source, read_prompts_file)
from edgekit.validate.statistics import summarize

GENEROUS = {"latency_p99_ms": 1e6, "ttft_p99_ms": 1e6, "memory_gb": 1e6}

# --- statistics, host, budgets ------------------------------------------------------------------


def test_quantiles_are_numpy_linear():
    values = [float(v) for v in range(100, 0, -1)]  # unsorted input
    summary = summarize(values)
    assert (summary["p50"], summary["p90"], summary["p99"]) == pytest.approx((50.5, 90.1, 99.01))
    assert summary["mean"] == pytest.approx(50.5) and (summary["min"], summary["max"], summary["count"]) == (1.0, 100.0, 100)
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 7, 64, 1000):
        data = list(rng.lognormal(3.0, 0.5, size=n))
        s = summarize(data)
        expected = np.quantile(data, [0.5, 0.9, 0.99])  # numpy's default method: linear
        assert [s["p50"], s["p90"], s["p99"]] == pytest.approx(list(expected), rel=1e-12)
    # a hand-checked one: 4 samples, p90 at h = 2.7 -> 30 + 0.7 * (40 - 30)
    assert summarize([40.0, 10.0, 30.0, 20.0])["p90"] == pytest.approx(37.0)
    assert summarize([]) is None


def test_l4t_release_and_host_target():
    assert parse_l4t_release("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8 "
                               "01:49:37 UTC 2025\n# KERNEL_VARIANT: oot\n") == "36.4.3"
    assert parse_l4t_release("# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t210ref, EABI: aarch64") == "32.7.1"
    assert parse_l4t_release("something else") is None
    nano = {"jetson_model": "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super", "memory_gb": 7.44, "gpus": []}
    assert detect_host_target(nano)[0] == "jetson-orin-nano-8gb"
    assert detect_host_target({**nano, "memory_gb": 3.4})[0] is None  # a 4GB Orin Nano: no profile
    assert detect_host_target({"jetson_model": "NVIDIA Jetson AGX Orin Developer Kit", "memory_gb": 61.3})[0] == "jetson-orin-agx-64gb"
    assert detect_host_target({"jetson_model": "NVIDIA Jetson AGX Orin", "memory_gb": 29.9})[0] == "jetson-orin-agx-32gb"
    assert detect_host_target({"gpus": [{"name": "NVIDIA GeForce RTX 4090"}]})[0] == "workstation-rtx4090"
    assert detect_host_target({"gpus": [{"name": "NVIDIA H100 80GB HBM3"}]})[0] == "workstation-h100"
    cpu = {"machine": "x86_64", "cpu": "AMD EPYC", "gpus": []}
    name, why = detect_host_target(cpu)
    assert name is None and "no target profile" in why
    host = host_info()  # this machine: the fields exist and describe it
    assert host["cores"] >= 1 and host["machine"] and host["onnxruntime"]


def test_budget_checks_use_the_manifest_and_overrides():
    measured = {"latency_p99_ms": 30.0, "ttft_p99_ms": 200.0, "memory_gb": 0.7}
    checks = check_budgets({"latency_p99_ms": 25.0, "ttft_p99_ms": 250.0, "memory_gb": None}, {"memory_gb": 0.5}, measured)
    assert set(checks) == {"latency_p99_ms", "ttft_p99_ms", "memory_gb"}
    assert checks["latency_p99_ms"]["meets"] is False and checks["latency_p99_ms"]["source"] == "manifest"
    assert checks["ttft_p99_ms"]["meets"] is True
    assert checks["memory_gb"] == {"budget": 0.5, "measured": 0.7, "meets": False, "source": "override",
                                   "measure": BUDGET_MEASURES["memory_gb"]}
    assert check_budgets({}, {"latency_p99_ms": None}, measured) == {}


# --- prompts files ------------------------------------------------------------------------------


def test_default_prompts_come_from_the_bundles_own_held_out_text(tmp_path):
    """The recipe in the bundle names a built-in text: its held-out end gives the prompts. A file,
    a hub dataset, or a hostile recipe.yaml falls back to the docs and says why."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: x\ndata:\n  source: builtin:mixed\n  eval_tokens: 4096\n")
    held = held_out_source(tmp_path)
    assert (held.source, held.tokens) == ("builtin:mixed", 4096) and "recipe" in held.reason
    recipe.write_text("data: builtin:mixed\n")  # the short form
    assert (held_out_source(tmp_path).source, held_out_source(tmp_path).tokens) == ("builtin:mixed", HELD_OUT_TOKENS)
    hostile = {
        "no recipe.yaml": None,
        "is not in the bundle": "data:\n  source: /etc/passwd\n",
        "hf:": "data:\n  source: hf:org/name\n",
        "not a built-in text": "data:\n  source: [1, 2]\n",
        "eval_tokens": "data:\n  source: builtin:mixed\n  eval_tokens: 100000000000\n",
        "eval_tokens is not": "data:\n  source: builtin:mixed\n  eval_tokens: true\n",
        "does not parse": "data: [unclosed\n",
        "is over 1 MiB": "#" * (1 << 20) + "\n",
        "builtin:unknown": "data: builtin:unknown\n",
        "python-docs, edgekit": "- a list, not a mapping\n",
    }
    for reason, content in hostile.items():
        if content is None:
            recipe.unlink(missing_ok=True)
        else:
            recipe.write_text(content)
        held = held_out_source(tmp_path)
        assert (held.source, held.tokens) == (HELD_OUT_SOURCE, HELD_OUT_TOKENS), reason
        assert reason.split(":")[0] in held.reason or reason in held.reason, (reason, held.reason)


def test_default_prompts_are_the_held_out_end_of_the_named_text():
    from edgekit.models.text import resolve_text_source, tokenize_splits

    class Words:  # a tokenizer: one id per character (default_prompts only calls it through tokenize_splits)
        def __call__(self, text, **_):
            return {"input_ids": [ord(c) % 1000 for c in text]}

        def encode(self, text, **_):
            return self(text)["input_ids"]

    from edgekit.validate.prompts import HeldOut

    tokenizer = Words()
    prompts = default_prompts(tokenizer, context_length=256, max_new_tokens=16, count=4, length=32,
                              held_out=HeldOut("builtin:python-docs", 1000, "test"))
    held = tokenize_splits(resolve_text_source("builtin:python-docs").read(), tokenizer, eval_tokens=1000, window=1).evaluation
    assert len(prompts) == 4 and all(len(p.ids) == 32 for p in prompts)
    assert prompts[0].ids == [int(t) for t in held[:32]] and prompts[-1].ids == [int(t) for t in held[-32:]]


def test_prompts_file_parsing(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("A for statement\n\n  iterates over a sequence\n")
    assert read_prompts_file(text) == [("A for statement", f"{text}:1"), ("  iterates over a sequence", f"{text}:3")]
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "first\\nline two"}\n\n{"prompt": "second", "id": 7}\n')
    assert read_prompts_file(jsonl) == [("first\nline two", f"{jsonl}:1"), ("second", f"{jsonl}:3")]
    detected = tmp_path / "records.txt"  # JSON records in a .txt: detected by the first line
    detected.write_text('{"prompt": "x"}\n')
    assert read_prompts_file(detected) == [("x", f"{detected}:1")]
    cases = [
        ('{"prompt": "ok"}\n{"prompt": "ok"}\n{"prompt": broken}\n', r"invalid JSON.*\(.*prompts\.jsonl:3\)"),
        ('{"prompt": "ok"}\n{"text": "no prompt key"}\n', r'no "prompt" field \(.*prompts\.jsonl:2\)'),
        ('{"prompt": ""}\n', r'"prompt" must be a non-empty string \(.*prompts\.jsonl:1\)'),
        ("\n\n", r"holds no prompt"),
    ]
    for content, pattern in cases:
        jsonl.write_text(content)
        with pytest.raises(ValidateError, match=pattern):
            read_prompts_file(jsonl)
    binary = tmp_path / "latin1.txt"
    binary.write_bytes(b"caf\xe9\n")
    with pytest.raises(ValidateError, match="not UTF-8"):
        read_prompts_file(binary)
    with pytest.raises(ValidateError, match="prompts file not found"):
        read_prompts_file(tmp_path / "nope.txt")


# --- the tiny bundle ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_model_dir) -> Path:
    return compress_tiny_bundle(tmp_path_factory.mktemp("validate"), tiny_model_dir)


@pytest.fixture(scope="module")
def report(bundle, tmp_path_factory) -> dict:
    """One run at concurrency 2 with default prompts, generous budgets, and a stand-in
    tegrastats on PATH (this machine is not a Jetson)."""
    from edgekit import api

    tmp = tmp_path_factory.mktemp("validate-run")
    fake_bin = tmp / "bin"
    stand_in_tegrastats(fake_bin, ORIN_NANO_JP62)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
        return api.validate_bundle(bundle, concurrency=2, requests=6, warmup=1, max_new_tokens=5, threads=1,
                                   output_dir=tmp / "out", budgets=GENEROUS)


def test_report_files_and_structure(report, bundle):
    out = Path(report["report"]["json"]).parent
    assert sorted(p.name for p in out.iterdir()) == ["validate.html", "validate.json"]  # no temp files left
    on_disk = json.loads((out / "validate.json").read_text())
    assert on_disk["format"] == "edgekit.validate/1" and on_disk["passed"] is True and on_disk["breached"] == []
    assert on_disk["bundle"]["name"] == "tiny" and on_disk["bundle"]["target"] == "jetson-orin-nano-8gb"
    assert on_disk["settings"]["backend"] == "onnxruntime" and on_disk["settings"]["concurrency"] == 2
    assert not any(p.name.startswith("validate") for p in bundle.iterdir())  # the bundle is never written to
    # every request generated exactly max_new_tokens tokens: 1 TTFT + 4 TPOTs each
    requests = on_disk["requests"]
    assert [r["request"] for r in requests] == list(range(6))
    assert all(len(r["tpot_ms"]) == 4 and r["ttft_ms"] > 0 and all(t > 0 for t in r["tpot_ms"]) for r in requests)
    latency = on_disk["latency"]
    assert latency["generated_tokens"] == 6 * 5 and latency["tpot_ms"]["count"] == 24 and latency["ttft_ms"]["count"] == 6
    # the summaries are the quantiles of the raw numbers in the same file
    tpot = [t for r in requests for t in r["tpot_ms"]]
    ttft = [r["ttft_ms"] for r in requests]
    assert latency["tpot_ms"]["p99"] == pytest.approx(float(np.quantile(tpot, 0.99)), abs=1e-3)
    assert latency["ttft_ms"]["p50"] == pytest.approx(float(np.quantile(ttft, 0.5)), abs=1e-3)
    assert latency["tpot_ms"]["p50"] <= latency["tpot_ms"]["p90"] <= latency["tpot_ms"]["p99"] <= latency["tpot_ms"]["max"]
    # concurrency 2: two streams, each ran requests, together all of them
    streams = on_disk["streams"]
    assert [s["stream"] for s in streams] == [0, 1] and all(s["requests"] >= 1 for s in streams)
    assert sum(s["requests"] for s in streams) == 6 and {r["stream"] for r in requests} == {0, 1}
    assert 1 <= latency["max_in_flight"] <= 2
    assert latency["aggregate_tokens_per_s"] == pytest.approx(30 / latency["wall_seconds"], rel=1e-3)
    # budgets (overrides: the tiny recipe sets none) with the measured values they were checked against
    budgets = on_disk["budgets"]
    assert budgets["latency_p99_ms"]["measured"] == pytest.approx(latency["tpot_ms"]["p99"], abs=1e-3)
    assert budgets["ttft_p99_ms"]["measured"] == pytest.approx(latency["ttft_ms"]["p99"], abs=1e-3)
    assert all(b["meets"] and b["source"] == "override" for b in budgets.values())
    memory = on_disk["memory"]
    assert 0 < memory["peak_rss_gb"] == memory["measured_gb"] and memory["gpu"]["gb"] is None and memory["gpu"]["reason"]
    # prompts: the default held-out windows, lengths recorded
    prompts = on_disk["settings"]["prompts"]
    assert prompts["source"] == "held-out" and prompts["count"] == DEFAULT_PROMPTS
    assert prompts["tokens"]["min"] == prompts["tokens"]["max"] == DEFAULT_PROMPT_TOKENS
    assert all(r["prompt_tokens"] == DEFAULT_PROMPT_TOKENS for r in requests)


def test_report_host_power_and_predictions(report):
    host = report["host"]
    assert host["is_target"] is False and "NOT of the bundle's target jetson-orin-nano-8gb" in host["note"]
    # the stand-in tegrastats ran during the measurement and its real line was parsed
    power = report["power"]
    assert power["available"] and power["samples"] >= 1 and power["input_rail"] == "VDD_IN"
    assert power["input_power_w"]["max"] == pytest.approx(6.626) and power["temperature_c"]["junction"]["max"] == pytest.approx(50.562)
    predicted = report["predicted"]
    assert predicted["available"], predicted
    entry = predicted["targets"][0]
    assert entry["target"] == "jetson-orin-nano-8gb" and entry["role"] == "bundle target" and not entry["measured_on_this_target"]
    assert predicted["inputs"]["precision"] == "fp16" and predicted["inputs"]["prompt_tokens"] == DEFAULT_PROMPT_TOKENS
    rows = {c["quantity"].split(" ")[0]: c for c in entry["comparison"]}
    assert rows["decode"]["predicted"] == entry["predicted_decode_ms_per_token"] > 0
    assert rows["decode"]["measured"] == pytest.approx(report["latency"]["tpot_ms"]["mean"], abs=1e-3)
    assert rows["decode"]["measured_over_predicted"] == pytest.approx(rows["decode"]["measured"] / rows["decode"]["predicted"],
                                                                      rel=1e-2)
    assert rows["TTFT"]["measured"] == pytest.approx(report["latency"]["ttft_ms"]["mean"], abs=1e-3)
    # the same prediction edgekit plan makes for this config, weights and target
    from edgekit import api

    plan = api.plan(str(report["bundle"]["path"]), target="jetson-orin-nano-8gb", prompt_tokens=DEFAULT_PROMPT_TOKENS,
                    kv_fill=predicted["inputs"]["kv_fill"])
    assert plan["targets"][0]["predicted_decode"]["ms_per_token"] == entry["predicted_decode_ms_per_token"]
    assert plan["targets"][0]["predicted_prefill"]["ttft_ms"] == entry["predicted_ttft_ms"]


def test_html_report_is_self_contained(report):
    html = Path(report["report"]["html"]).read_text()
    assert html.startswith("<!DOCTYPE html>") and "ALL BUDGETS MET" in html
    # the two histograms, inline SVG; their bars count every TTFT / every TPOT of the run
    svgs = dict(re.findall(r'<svg id="hist-(ttft|tpot)"(.*?)</svg>', html, flags=re.S))
    assert set(svgs) == {"ttft", "tpot"}
    count = {key: sum(int(c) for c in re.findall(r'data-count="(\d+)"', body)) for key, body in svgs.items()}
    assert count == {"ttft": len(report["requests"]), "tpot": sum(len(r["tpot_ms"]) for r in report["requests"])}
    assert all('class="p99"' in body and 'class="budget"' not in body for body in svgs.values())  # budget 1e6: off the axis
    assert 'id="predicted-vs-measured"' in html and "measured / predicted" in html and "jetson-orin-nano-8gb (bundle target)" in html
    assert 'class="warning"' in html and "NOT of the bundle&#x27;s target" in html
    assert "tegrastats" in html and "VDD_IN" in html
    assert not re.search(r'(src|href)="(https?:)?//', html)  # nothing fetched from elsewhere


def test_histogram_draws_the_budget_when_in_view():
    from edgekit.validate.report import histogram_svg

    values = [10.0, 11.0, 12.0, 30.0]
    svg = histogram_svg(values, element_id="h", title="t", summary=summarize(values), budget=25.0)
    assert 'class="budget"' in svg and "budget 25 ms" in svg
    assert sum(int(c) for c in re.findall(r'data-count="(\d+)"', svg)) == 4
    same = histogram_svg([5.0, 5.0], element_id="h", title="<t>", summary=None, budget=None)
    assert re.findall(r'data-count="(\d+)"', same) == ["2"] and "&lt;t&gt;" in same  # one bar; text escaped
    assert histogram_svg([], element_id="h", title="t", summary=None, budget=None) is None


def test_prompts_file_run_and_breached_budget(bundle, tmp_path):
    from edgekit import api

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "A for statement iterates over"}\n{"prompt": "The import system"}\n'
                       '{"prompt": "Exceptions are raised when"}\n')
    result = api.validate_bundle(bundle, prompts=prompts, warmup=0, max_new_tokens=3, threads=1, output_dir=tmp_path / "out",
                                 budgets={"latency_p99_ms": 0.001, "memory_gb": 1e6})
    assert result["settings"]["requests"] == 3  # one request per prompt by default
    assert result["settings"]["prompts"]["origins"] == [f"{prompts}:1", f"{prompts}:2", f"{prompts}:3"]
    tokenizer_lengths = [r["prompt_tokens"] for r in result["requests"]]
    assert tokenizer_lengths == [len(p) for p in _encode(bundle, ["A for statement iterates over", "The import system",
                                                                  "Exceptions are raised when"])]
    assert result["passed"] is False and result["breached"] == ["latency_p99_ms"]
    assert result["budgets"]["memory_gb"]["meets"] and not result["budgets"]["latency_p99_ms"]["meets"]
    assert json.loads((tmp_path / "out" / "validate.json").read_text())["breached"] == ["latency_p99_ms"]
    assert "BUDGET BREACHED: latency_p99_ms" in (tmp_path / "out" / "validate.html").read_text()


def _encode(bundle: Path, texts: list[str]) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(bundle))
    return [tokenizer.encode(t) for t in texts]


# --- the command line ---------------------------------------------------------------------------


def test_cli_breached_budget_exits_1(bundle, tmp_path):
    """Exit 1 on a breached budget, the JSON names it (the slow test below runs the same
    command as `edgekit deploy --validate` does on a device: python -m edgekit validate
    BUNDLE --output DIR)."""
    out = tmp_path / "report"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("A for statement iterates over\nThe import system\n")
    result = CliRunner().invoke(main, ["validate", str(bundle), "--output", str(out), "--prompts", str(prompts), "--warmup", "0",
                                       "--max-new-tokens", "3", "--threads", "1", "--budget-latency-ms", "0.001",
                                       "--budget-ttft-ms", "1e6"])
    assert result.exit_code == 1, result.output
    saved = json.loads((out / "validate.json").read_text())
    assert saved["breached"] == ["latency_p99_ms"] and saved["budgets"]["ttft_p99_ms"]["meets"]
    assert "BUDGET BREACHED: latency_p99_ms" in result.stdout and "validate.html" in result.stdout


def test_cli_generous_budgets_exit_0_and_json(bundle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    args = ["validate", str(bundle), "--requests", "2", "--warmup", "0", "--max-new-tokens", "3", "--threads", "1", "--json",
            "--budget-latency-ms", "1e6", "--budget-ttft-ms", "1e6", "--budget-memory-gb", "1e6"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["passed"] and set(printed["budgets"]) == {"latency_p99_ms", "ttft_p99_ms", "memory_gb"}
    assert (tmp_path / "validate-tiny" / "validate.json").is_file()  # the default output directory, in the cwd


def test_cli_bad_input_exits_2_with_one_line(bundle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": 3}\n')
    cases = [
        (["--prompts", str(bad)], f'"prompt" must be a non-empty string ({bad}:2)'),
        (["--max-new-tokens", "1"], "--max-new-tokens must be an integer >= 2"),
        (["--concurrency", "3", "--requests", "2"], "--requests 2 is fewer than --concurrency 3"),
        (["--output", str(bundle / "reports")], "would be written inside the bundle"),
        (["--budget-memory-gb", "-1"], "Invalid value for '--budget-memory-gb': -1.0 is not in the range"),
        (["--budget-memory-gb", "nan"], "'nan' is not a finite number"),
    ]
    for extra, message in cases:
        result = runner.invoke(main, ["validate", str(bundle), *extra])
        assert result.exit_code == 2, (extra, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0] and "To resolve" in lines[0], lines
    assert not (bundle / "reports").exists() and not (tmp_path / "validate-tiny").exists()  # nothing written on bad input
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:  # this machine: asking for TensorRT is an error, never a CPU fallback
        result = runner.invoke(main, ["validate", str(bundle), "--backend", "tensorrt", "--output", str(tmp_path / "trt")])
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]  # after the "loading" progress line
        assert result.exit_code == 2 and len(errors) == 1 and "backend tensorrt needs the TensorRT Python package" in errors[0]
        assert not (tmp_path / "trt").exists()  # nothing written for a run that did not happen
    tar = tmp_path / "tiny.tar"
    tar.write_bytes(b"")
    result = runner.invoke(main, ["validate", str(tar)])
    assert result.exit_code == 2 and "unpack it first (edgekit unpack" in result.stderr


# --- the real default bundle --------------------------------------------------------------------


def check_default_bundle_validates(bundle: Path, out: Path) -> dict:
    """validate runs on the default bundle (SmolLM2-135M pruned + INT4, ONNX Runtime) through the
    command line a device runs (python -m edgekit validate BUNDLE --output DIR) and writes its
    report; cheap: 2 requests x 8 tokens after 1 warm-up request. Returns the saved report."""
    result = run_cli("validate", str(bundle), "--output", str(out), "--requests", "2", "--warmup", "1", "--max-new-tokens", "8")
    assert result.returncode in (0, 1), result.stderr[-2000:]  # 1: a budget of the Orin Nano breached on a CPU host
    saved = json.loads((out / "validate.json").read_text())
    assert saved["bundle"]["target"] == "jetson-orin-nano-8gb" and saved["settings"]["backend"] == "onnxruntime"
    assert set(saved["budgets"]) == {"latency_p99_ms", "ttft_p99_ms", "memory_gb"}  # the manifest's, from the recipe
    assert (result.returncode == 1) == bool(saved["breached"])
    assert saved["latency"]["tpot_ms"]["count"] == 2 * 7 and 0 < saved["latency"]["tpot_ms"]["p50"] < 1000
    assert 0.1 < saved["memory"]["peak_rss_gb"] < 8  # a 150 MB INT4 model and its runtime
    entry = saved["predicted"]["targets"][0]
    assert saved["predicted"]["inputs"]["precision"] == "int4" and saved["predicted"]["inputs"]["group_size"] == 64
    assert entry["target"] == "jetson-orin-nano-8gb" and 0 < entry["predicted_decode_ms_per_token"] < 100
    assert saved["host"]["is_target"] is (saved["host"]["target"] == "jetson-orin-nano-8gb")
    html = (out / "validate.html").read_text()
    assert 'id="hist-tpot"' in html and 'id="predicted-vs-measured"' in html
    assert saved["latency"]["aggregate_tokens_per_s"] > 0
    return saved

