"""The tegrastats parser on real lines from each JetPack generation, its summary, and the
recorder running a stand-in tegrastats in the background (this machine is not a Jetson)."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import pytest

from edgekit.telemetry import tegrastats as tg

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


def stand_in_tegrastats(directory: Path, line: str) -> Path:
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


def test_cpu_load_is_the_mean_over_the_cores_that_are_on():
    assert tg.parse_line(XAVIER_NX_JP4)["cpu_load_pct"] == pytest.approx((9 + 6 + 6 + 5 + 4 + 8) / 6)
    assert tg.parse_line(TX2_JP4)["cpu_load_pct"] == pytest.approx((1 + 1 + 0 + 2) / 4)  # two cores "off"
    assert tg.parse_line(AGX_ORIN_JP6)["cpu_load_pct"] == pytest.approx(209 / 12)
    assert tg.parse_line("RAM 1/2MB CPU [off,off]")["cpu_load_pct"] is None


def test_a_server_keeps_only_the_latest_samples(tmp_path):
    import time

    recorder = tg.TegrastatsRecorder(interval_ms=50, executable=str(stand_in_tegrastats(tmp_path, ORIN_NANO_JP62)), keep=1)
    assert recorder.start()
    deadline = time.monotonic() + 20
    while recorder.samples.maxlen and not recorder.samples and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # several more lines arrive; one is kept
    assert len(recorder.samples) == 1 and recorder.samples[-1]["rails_mw"]["VDD_IN"] == [6626, 6625]
    assert recorder.stop()["samples"] == 1
