"""`edgekit validate` on a real tiny bundle (ONNX Runtime), its statistics, prompts files,
budgets and exit codes, the report files, and the tegrastats parser on real lines.

The tiny bundle is built from a config (load -> export_onnx -> bundle, a few seconds). One
test marked slow runs validate on the real default bundle (SmolLM2-135M INT4) where
`make demo` has built it (or EDGEKIT_DEFAULT_BUNDLE points at one).
"""

from __future__ import annotations

import json
import os
import re
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import compress_tiny_bundle, REPO, run_cli

from edgekit.cli import main
from edgekit.evaluate import tegrastats as tg
from edgekit.evaluate import validate as v

GENEROUS = {"latency_p99_ms": 1e6, "ttft_p99_ms": 1e6, "memory_gb": 1e6}

# --- real tegrastats lines --------------------------------------------------------------------
# Captured on the devices; JetPack 4 and the AGX/NX Orin lines are the fixtures of Datadog's
# Jetson check (DataDog/datadog-agent, pkg/collector/corechecks/nvidia/jetson/jetson_test.go),
# the Orin Nano JetPack 6.2.1 line is from a published Orin Nano setup guide.
NANO_JP4 = ("RAM 534/3964MB (lfb 98x4MB) SWAP 5/1982MB (cached 1MB) IRAM 0/252kB(lfb 252kB) CPU [16%@204,9%@204,0%@204,0%@204] "
            "EMC_FREQ 0%@204 GR3D_FREQ 0%@76 APE 25 PLL@34C CPU@36.5C PMIC@100C GPU@36C AO@39.5C thermal@36.25C "
            "POM_5V_IN 1022/1022 POM_5V_GPU 0/0 POM_5V_CPU 204/204")
XAVIER_NX_JP4 = ("RAM 4412/7772MB (lfb 237x4MB) SWAP 139/3886MB (cached 2MB) CPU [9%@1190,6%@1190,6%@1190,5%@1190,4%@1190,8%@1267] "
                 "EMC_FREQ 10%@1600 GR3D_FREQ 62%@306 APE 150 MTS fg 0% bg 0% AO@41.5C GPU@43C PMIC@100C AUX@41.5C CPU@43.5C "
                 "thermal@42.55C VDD_IN 4067/4067 VDD_CPU_GPU_CV 738/738 VDD_SOC 1353/1353")
TX2_JP4 = ("RAM 2344/7852MB (lfb 1154x4MB) SWAP 0/3926MB (cached 0MB) CPU [1%@345,off,off,1%@345,0%@345,2%@345] EMC_FREQ 4%@1600 "
           "GR3D_FREQ 0%@624 APE 150 PLL@37.5C MCPU@37.5C PMIC@100C Tboard@32C GPU@35C BCPU@37.5C thermal@36.5C Tdiode@34.25C "
           "VDD_SYS_GPU 152/152 VDD_SYS_SOC 687/687 VDD_4V0_WIFI 0/0 VDD_IN 3056/3056 VDD_SYS_CPU 152/152 VDD_SYS_DDR 883/883")
AGX_XAVIER_JP4 = ("RAM 721/31927MB (lfb 7291x4MB) SWAP 0/15963MB (cached 0MB) CPU [2%@1190,0%@1190,0%@1190,0%@1190,off,off,off,off] "
                  "EMC_FREQ 0%@665 GR3D_FREQ 0%@318 APE 150 MTS fg 0% bg 0% AO@37.5C GPU@37.5C Tdiode@40C PMIC@100C AUX@36C "
                  "CPU@37.5C thermal@36.9C Tboard@37C GPU 0/0 CPU 311/311 SOC 932/932 CV 0/0 VDDRQ 621/621 SYS5V 1482/1482")
ORIN_JP5 = ("RAM 6334/15388MB (lfb 1770x4MB) SWAP 491/7694MB (cached 0MB) CPU [6%@729,9%@729,5%@729,16%@729,off,off,off,off] "
            "EMC_FREQ 0%@2133 GR3D_FREQ 0%@611 VIC_FREQ 729 APE 174 CV0@45.812C CPU@47.937C SOC2@46.093C SOC0@46.968C CV1@46.406C "
            "GPU@45.875C tj@48.875C SOC1@48.875C CV2@45.75C VDD_IN 5299mW/5299mW VDD_CPU_GPU_CV 773mW/773mW VDD_SOC 1424mW/1424mW")
AGX_ORIN_JP6 = ("RAM 29114/30697MB (lfb 3x4MB)    SWAP 4915/15348MB (cached 1MB) CPU [3%@729,4%@729,0%@729,1%@729,0%@2201,100%@2201,"
                "1%@2201,0%@2201,100%@2201,0%@2201,0%@2201,0%@2201] EMC_FREQ 1%@2133 GR3D_FREQ 0%@[305,305] NVENC      off  NVDEC    "
                "off NVJPG off NVJPG1    off         VIC        off          OFA           off          NVDLA0    off       NVDLA1     "
                "off          PVA0_FREQ off         APE           174        cpu@53.062C soc2@48.25C soc0@48.843C  gpu@47.812C "
                "tj@53.062C soc1@48.968C    VDD_GPU_SOC 3205mW/3205mW VDD_CPU_CV 4405mW/4405mW VIN_SYS_5V0 4767mW/4767mW")
ORIN_NANO_JP62 = ("04-27-2026 15:00:54 RAM 779/7620MB (lfb 2x4MB) SWAP 0/3810MB (cached 0MB) CPU [0%@1344,0%@1344,0%@1344,0%@1344,"
                  "0%@1344,0%@1344] GR3D_FREQ 0% cpu@50.125C soc2@49.125C soc0@49.25C gpu@50.562C tj@50.562C soc1@50.437C "
                  "VDD_IN 6626mW/6625mW VDD_CPU_GPU_CV 1228mW/1230mW VDD_SOC 2380mW/2380mW ")


@pytest.mark.parametrize(
    "line, ram, rail, watts, cpu, gpu, tj, rails",
    [
        (NANO_JP4, (534, 3964), "POM_5V_IN", 1.022, 36.5, 36.0, None, {"POM_5V_IN", "POM_5V_GPU", "POM_5V_CPU"}),
        (XAVIER_NX_JP4, (4412, 7772), "VDD_IN", 4.067, 43.5, 43.0, None, {"VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"}),
        (TX2_JP4, (2344, 7852), "VDD_IN", 3.056, 37.5, 35.0, None,
         {"VDD_SYS_GPU", "VDD_SYS_SOC", "VDD_4V0_WIFI", "VDD_IN", "VDD_SYS_CPU", "VDD_SYS_DDR"}),
        (AGX_XAVIER_JP4, (721, 31927), None, None, 37.5, 37.5, None, {"GPU", "CPU", "SOC", "CV", "VDDRQ", "SYS5V"}),
        (ORIN_JP5, (6334, 15388), "VDD_IN", 5.299, 47.937, 45.875, 48.875, {"VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"}),
        (AGX_ORIN_JP6, (29114, 30697), None, None, 53.062, 47.812, 53.062, {"VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0"}),
        (ORIN_NANO_JP62, (779, 7620), "VDD_IN", 6.626, 50.125, 50.562, 50.562, {"VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"}),
    ],
    ids=["nano-jp4", "xavier-nx-jp4", "tx2-jp4", "agx-xavier-jp4", "orin-jp5", "agx-orin-jp6", "orin-nano-jp6.2"],
)
def test_tegrastats_parser_on_real_lines(line, ram, rail, watts, cpu, gpu, tj, rails):
    sample = tg.parse_line(line)
    assert (sample["ram_used_mb"], sample["ram_total_mb"]) == ram
    assert sample["input_rail"] == rail
    assert sample["input_power_w"] == (pytest.approx(watts) if watts is not None else None)
    assert set(sample["rails_mw"]) == rails  # RAM/SWAP megabytes and IRAM kB are never taken for rails
    summary = tg.summarize([sample], interval_ms=200)
    temps = summary["temperature_c"]
    assert (temps["cpu"] or {}).get("max") == (pytest.approx(cpu) if cpu is not None else None)
    assert (temps["gpu"] or {}).get("max") == (pytest.approx(gpu) if gpu is not None else None)
    assert (temps["junction"] or {}).get("max") == (pytest.approx(tj) if tj is not None else None)
    if rail is None:  # AGX boards: no board-input rail, and the rails are not summed into one
        assert summary["input_power_w"] is None and "no board-input rail" in summary["note"]


def test_tegrastats_parser_details():
    off = tg.parse_line(ORIN_JP5.replace("CV0@45.812C", "CV0@-256C"))
    assert "CV0" not in off["temperatures_c"] and off["temperatures_c"]["CPU"] == pytest.approx(47.937)
    assert tg.parse_line(XAVIER_NX_JP4)["rails_mw"]["VDD_IN"] == [4067, 4067]
    assert tg.parse_line(ORIN_NANO_JP62)["rails_mw"]["VDD_IN"] == [6626, 6625]  # instant, tegrastats' running average
    assert tg.parse_line(XAVIER_NX_JP4)["gpu_load_pct"] == 62
    assert tg.parse_line("") is None and tg.parse_line("tegrastats: permission denied") is None
    samples = [tg.parse_line(ORIN_NANO_JP62), tg.parse_line(ORIN_NANO_JP62.replace("VDD_IN 6626mW", "VDD_IN 4626mW"))]
    summary = tg.summarize(samples, interval_ms=100, seconds=2.0, generated_tokens=40)
    assert summary["input_power_w"] == {"mean": 5.626, "max": 6.626, "min": 4.626}
    assert summary["joules_per_token"] == pytest.approx(5.626 * 2.0 / 40)
    assert summary["device_ram_used_gb"]["max"] == pytest.approx(779 / 1024, abs=1e-3)
    assert tg.summarize([], interval_ms=100)["available"] is False


def _stand_in_tegrastats(directory: Path, line: str) -> Path:
    """An executable named tegrastats that prints a real line every 50 ms, as tegrastats does
    every --interval ms (this machine has no Jetson)."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "tegrastats"
    script.write_text(f"#!/bin/sh\nwhile true; do echo '{line}'; sleep 0.05; done\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return script


def test_tegrastats_recorder_runs_in_the_background(tmp_path):
    """tegrastats writes with C stdio, block-buffered into a pipe: the recorder gives it a
    pseudo-terminal. The stand-in here is a Python script, buffered the same way (it would
    deliver nothing before it is killed through a pipe), printing a real line every 50 ms."""
    import time

    script = tmp_path / "tegrastats"
    # open() buffers like C stdio: whole blocks into a pipe, line by line to a terminal (whatever PYTHONUNBUFFERED says)
    script.write_text(f"#!{sys.executable} -S\nimport time\nout = open(1, 'w', closefd=False)\nwhile True:\n"
                      f"    out.write({ORIN_NANO_JP62!r} + '\\n')\n    time.sleep(0.05)\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    recorder = tg.TegrastatsRecorder(interval_ms=50, executable=str(script))
    assert recorder.start()
    deadline = time.monotonic() + 20
    while len(recorder.samples) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    summary = recorder.stop(seconds=0.4, generated_tokens=10)
    assert summary["available"] and summary["samples"] >= 3  # lines arrived while it ran
    assert summary["input_rail"] == "VDD_IN" and summary["input_power_w"]["mean"] == pytest.approx(6.626)
    assert recorder._process.poll() is not None  # stopped, not left running
    missing = tg.TegrastatsRecorder(executable=None)
    missing.executable = None
    assert not missing.start() and missing.stop()["available"] is False and "not on PATH" in missing.stop()["reason"]


# --- statistics, host, budgets ------------------------------------------------------------------


def test_quantiles_are_numpy_linear():
    values = [float(v) for v in range(100, 0, -1)]  # unsorted input
    summary = v.summarize(values)
    assert (summary["p50"], summary["p90"], summary["p99"]) == pytest.approx((50.5, 90.1, 99.01))
    assert summary["mean"] == pytest.approx(50.5) and (summary["min"], summary["max"], summary["count"]) == (1.0, 100.0, 100)
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 7, 64, 1000):
        data = list(rng.lognormal(3.0, 0.5, size=n))
        s = v.summarize(data)
        expected = np.quantile(data, [0.5, 0.9, 0.99])  # numpy's default method: linear
        assert [s["p50"], s["p90"], s["p99"]] == pytest.approx(list(expected), rel=1e-12)
    # a hand-checked one: 4 samples, p90 at h = 2.7 -> 30 + 0.7 * (40 - 30)
    assert v.summarize([40.0, 10.0, 30.0, 20.0])["p90"] == pytest.approx(37.0)
    assert v.summarize([]) is None


def test_l4t_release_and_host_target():
    assert v.parse_l4t_release("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8 "
                               "01:49:37 UTC 2025\n# KERNEL_VARIANT: oot\n") == "36.4.3"
    assert v.parse_l4t_release("# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t210ref, EABI: aarch64") == "32.7.1"
    assert v.parse_l4t_release("something else") is None
    nano = {"jetson_model": "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super", "memory_gb": 7.44, "gpus": []}
    assert v.detect_host_target(nano)[0] == "jetson-orin-nano-8gb"
    assert v.detect_host_target({**nano, "memory_gb": 3.4})[0] is None  # a 4GB Orin Nano: no profile
    assert v.detect_host_target({"jetson_model": "NVIDIA Jetson AGX Orin Developer Kit", "memory_gb": 61.3})[0] == "jetson-orin-agx-64gb"
    assert v.detect_host_target({"jetson_model": "NVIDIA Jetson AGX Orin", "memory_gb": 29.9})[0] == "jetson-orin-agx-32gb"
    assert v.detect_host_target({"gpus": [{"name": "NVIDIA GeForce RTX 4090"}]})[0] == "workstation-rtx4090"
    assert v.detect_host_target({"gpus": [{"name": "NVIDIA H100 80GB HBM3"}]})[0] == "workstation-h100"
    cpu = {"machine": "x86_64", "cpu": "AMD EPYC", "gpus": []}
    name, why = v.detect_host_target(cpu)
    assert name is None and "no target profile" in why
    host = v.host_info()  # this machine: the fields exist and describe it
    assert host["cores"] >= 1 and host["machine"] and host["onnxruntime"]


def test_budget_checks_use_the_manifest_and_overrides():
    measured = {"latency_p99_ms": 30.0, "ttft_p99_ms": 200.0, "memory_gb": 0.7}
    checks = v.check_budgets({"latency_p99_ms": 25.0, "ttft_p99_ms": 250.0, "memory_gb": None}, {"memory_gb": 0.5}, measured)
    assert set(checks) == {"latency_p99_ms", "ttft_p99_ms", "memory_gb"}
    assert checks["latency_p99_ms"]["meets"] is False and checks["latency_p99_ms"]["source"] == "manifest"
    assert checks["ttft_p99_ms"]["meets"] is True
    assert checks["memory_gb"] == {"budget": 0.5, "measured": 0.7, "meets": False, "source": "override",
                                   "measure": v.BUDGET_MEASURES["memory_gb"]}
    assert v.check_budgets({}, {"latency_p99_ms": None}, measured) == {}


# --- prompts files ------------------------------------------------------------------------------


def test_prompts_file_parsing(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("A for statement\n\n  iterates over a sequence\n")
    assert v.read_prompts_file(text) == [("A for statement", f"{text}:1"), ("  iterates over a sequence", f"{text}:3")]
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "first\\nline two"}\n\n{"prompt": "second", "id": 7}\n')
    assert v.read_prompts_file(jsonl) == [("first\nline two", f"{jsonl}:1"), ("second", f"{jsonl}:3")]
    detected = tmp_path / "records.txt"  # JSON records in a .txt: detected by the first line
    detected.write_text('{"prompt": "x"}\n')
    assert v.read_prompts_file(detected) == [("x", f"{detected}:1")]
    cases = [
        ('{"prompt": "ok"}\n{"prompt": "ok"}\n{"prompt": broken}\n', r"invalid JSON.*\(.*prompts\.jsonl:3\)"),
        ('{"prompt": "ok"}\n{"text": "no prompt key"}\n', r'no "prompt" field \(.*prompts\.jsonl:2\)'),
        ('{"prompt": ""}\n', r'"prompt" must be a non-empty string \(.*prompts\.jsonl:1\)'),
        ("\n\n", r"holds no prompt"),
    ]
    for content, pattern in cases:
        jsonl.write_text(content)
        with pytest.raises(v.ValidateError, match=pattern):
            v.read_prompts_file(jsonl)
    binary = tmp_path / "latin1.txt"
    binary.write_bytes(b"caf\xe9\n")
    with pytest.raises(v.ValidateError, match="not UTF-8"):
        v.read_prompts_file(binary)
    with pytest.raises(v.ValidateError, match="prompts file not found"):
        v.read_prompts_file(tmp_path / "nope.txt")


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
    _stand_in_tegrastats(fake_bin, ORIN_NANO_JP62)
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
    assert prompts["source"] == "held-out" and prompts["count"] == v.DEFAULT_PROMPTS
    assert prompts["tokens"]["min"] == prompts["tokens"]["max"] == v.DEFAULT_PROMPT_TOKENS
    assert all(r["prompt_tokens"] == v.DEFAULT_PROMPT_TOKENS for r in requests)


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
    assert predicted["inputs"]["precision"] == "fp16" and predicted["inputs"]["prompt_tokens"] == v.DEFAULT_PROMPT_TOKENS
    rows = {c["quantity"].split(" ")[0]: c for c in entry["comparison"]}
    assert rows["decode"]["predicted"] == entry["predicted_decode_ms_per_token"] > 0
    assert rows["decode"]["measured"] == pytest.approx(report["latency"]["tpot_ms"]["mean"], abs=1e-3)
    assert rows["decode"]["measured_over_predicted"] == pytest.approx(rows["decode"]["measured"] / rows["decode"]["predicted"],
                                                                      rel=1e-2)
    assert rows["TTFT"]["measured"] == pytest.approx(report["latency"]["ttft_ms"]["mean"], abs=1e-3)
    # the same prediction edgekit plan makes for this config, weights and target
    from edgekit import api

    plan = api.plan(str(report["bundle"]["path"]), target="jetson-orin-nano-8gb", prompt_tokens=v.DEFAULT_PROMPT_TOKENS,
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
    from edgekit.evaluate.validate_report import histogram_svg

    values = [10.0, 11.0, 12.0, 30.0]
    svg = histogram_svg(values, element_id="h", title="t", summary=v.summarize(values), budget=25.0)
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

