"""Device health in /metrics, and the shipped alert rules under a real Prometheus.

* the rules: ``promtool check rules`` and ``promtool test rules`` (tests/prometheus/
  edgekit-alerts.test.yml: for every alert, series that fire and series that do not);
* the gauges: a server whose device is a stand-in Jetson (a tegrastats that prints real Orin
  lines) and a stand-in NVML (the ``pynvml`` calls this code makes, answered by an object);
* the loop: a real Prometheus scrapes a running ``edgekit serve`` on loopback with the rule file
  loaded, and its query API sees the series the rules read, evaluates the rules and puts the
  GPU-temperature alert into ``pending`` for the stand-in's 90 °C.

Debian's ``prometheus`` package has the server and promtool (``make system-deps`` installs it;
``EDGEKIT_REQUIRE_PROMETHEUS=1``, set by ``make test``, turns the skips into failures).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_serve import bundle, call, start  # noqa: F401
from test_telemetry_tegrastats import ORIN_NANO_JP62, stand_in_tegrastats

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "edgekit" / "serve" / "prometheus" / "edgekit-alerts.yml"
RULE_TESTS = REPO / "tests" / "prometheus" / "edgekit-alerts.test.yml"
HOT_LINE = ORIN_NANO_JP62.replace("gpu@50.562C", "gpu@90.5C")


def _tool(name: str) -> str:
    found = shutil.which(name) or (f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None)
    if found is None:
        if os.environ.get("EDGEKIT_REQUIRE_PROMETHEUS") == "1":
            pytest.fail(f"{name} is not installed (make system-deps installs Debian's prometheus package)")
        pytest.skip(f"{name} is not installed (Debian: apt-get install prometheus)")
    return found


class FakeNvml:
    """The pynvml calls edgekit.telemetry.nvml makes, for one 80 GB GPU; power is not supported."""

    NVML_TEMPERATURE_GPU = 0

    def __init__(self):
        self.shut = False

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        self.shut = True

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("gpu", index)

    def nvmlDeviceGetTemperature(self, handle, sensor):
        assert sensor == self.NVML_TEMPERATURE_GPU
        return 61

    def nvmlDeviceGetUtilizationRates(self, handle):
        return SimpleNamespace(gpu=37, memory=12)

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(used=20 * 10**9, total=80 * 10**9, free=60 * 10**9)

    def nvmlDeviceGetPowerUsage(self, handle):
        raise RuntimeError("NVMLError_NotSupported")


def _wait_for(predicate, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


# --------------------------------------------------------------------------- the rules


def test_the_alert_rules_are_valid_and_fire_when_they_should():
    promtool = _tool("promtool")
    checked = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "8 rules found" in checked.stdout
    tested = subprocess.run([promtool, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True, timeout=120)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_is_labelled_and_documented():
    import yaml

    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    tested = RULE_TESTS.read_text()
    docs = (REPO / "docs" / "serve.md").read_text()
    for rule in rules:
        assert rule["labels"]["severity"] in ("page", "ticket") and rule["labels"]["component"], rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        assert f"alertname: {rule['alert']}" in tested, f"{rule['alert']} has no promtool test"
        assert rule["alert"] in docs, f"{rule['alert']} is not in docs/serve.md"


# --------------------------------------------------------------------------- the gauges


def test_device_health_reads_tegrastats_nvml_and_proc(tmp_path):
    from edgekit.telemetry import DeviceHealth

    nvml = FakeNvml()
    health = DeviceHealth(nvml=nvml, tegrastats=str(stand_in_tegrastats(tmp_path / "bin", HOT_LINE)))
    assert health.sources == ["proc", "nvml", "tegrastats"]
    health.start()
    try:
        readings = _wait_for(lambda: (r := list(health.read())) and any(x.labels.get("sensor") == "gpu" for x in r) and r,
                             "a tegrastats sample")
    finally:
        health.close()
    got = {(r.name, tuple(sorted(r.labels.items()))): r.value for r in readings}
    assert got[("device_temperature_celsius", (("sensor", "gpu"),))] == 90.5  # tegrastats
    assert got[("device_temperature_celsius", (("sensor", "tj"),))] == 50.562
    assert got[("device_temperature_celsius", (("sensor", "gpu0"),))] == 61.0  # NVML
    assert got[("device_power_watts", (("rail", "VDD_IN"),))] == 6.626
    assert ("device_power_watts", (("rail", "gpu0"),)) not in got  # not supported by this board: left out
    assert got[("device_utilization_ratio", (("unit", "gpu0"),))] == 0.37
    assert got[("device_utilization_ratio", (("unit", "cpu"),))] == 0.0
    # a Jetson's RAM (the GPU's memory too) comes from tegrastats, not /proc
    assert got[("device_memory_used_bytes", (("memory", "ram"),))] == 779 * 2**20
    assert got[("device_memory_total_bytes", (("memory", "ram"),))] == 7620 * 2**20
    assert got[("device_memory_total_bytes", (("memory", "gpu0"),))] == 80e9
    assert nvml.shut


def test_proc_memory_and_a_host_without_sensors():
    from edgekit.telemetry import DeviceHealth, host

    assert host.ram_bytes("MemTotal:  8000 kB\nMemFree: 1 kB\nMemAvailable:  2000 kB\n") == (6000 * 1024, 8000 * 1024)
    assert host.ram_bytes("MemTotal: 0 kB\nMemAvailable: 0 kB\n") is None and host.ram_bytes("garbage") is None
    assert host.load_1m("0.52 0.40 0.30 1/234 5678\n") == 0.52 and host.load_1m("") is None

    class NoDriver(FakeNvml):
        def nvmlInit(self):
            raise RuntimeError("NVML Shared Library Not Found")

    health = DeviceHealth(nvml=NoDriver(), tegrastats=False)
    assert "NVML did not start" in health.nvml.reason and health.sources == ["proc"]
    names = {r.name for r in health.read()}
    assert names == {"device_memory_used_bytes", "device_memory_total_bytes", "device_load_1m"}
    health.close()


def test_metrics_export_health_budgets_process_and_branch_latency(start, tmp_path):
    from edgekit.telemetry import DeviceHealth

    health = DeviceHealth(nvml=FakeNvml(), tegrastats=str(stand_in_tegrastats(tmp_path / "bin", HOT_LINE)))
    server = start(health=health)
    status, _, body = call(server.url, "POST", "/v1/completions", {"prompt": "def f(x):", "max_tokens": 4})
    assert status == 200
    text = _wait_for(lambda: (t := call(server.url, "GET", "/metrics")[2]) and 'sensor="gpu"' in t and t,
                     "tegrastats gauges in /metrics")
    samples = _samples(text)
    assert samples['edgekit_device_temperature_celsius{sensor="gpu"}'] == 90.5
    assert samples['edgekit_device_memory_total_bytes{memory="gpu0"}'] == 80e9
    assert samples['edgekit_device_power_watts{rail="VDD_IN"}'] == 6.626
    assert samples["process_resident_memory_bytes"] > 10 * 2**20
    branch = body["edgekit"]["branch"]
    assert samples[f'edgekit_branch_time_per_output_token_seconds_count{{branch="{branch}"}}'] == 1
    # the tiny bundle's recipe sets no budgets: no budget series, so no latency alert can fire
    assert not any(k.startswith("edgekit_budget_seconds{") for k in samples)
    assert call(server.url, "GET", "/healthz")[2]["device_health"] == ["proc", "nvml", "tegrastats"]


def test_budgets_come_from_the_bundle(bundle, tmp_path):
    from edgekit.serve.metrics import ServeMetrics

    metrics = ServeMetrics(queue_depth=lambda: 0, in_flight=lambda: 0, info={"model": "m", "policy": "small_only"},
                           budgets={"latency_p99_ms": 25.0, "ttft_p99_ms": 250.0, "memory_gb": 2.0})
    samples = _samples(metrics.render())
    assert samples['edgekit_budget_seconds{kind="time_per_output_token",quantile="0.99"}'] == 0.025
    assert samples['edgekit_budget_seconds{kind="time_to_first_token",quantile="0.99"}'] == 0.25
    assert samples["edgekit_budget_memory_bytes"] == 2 * 2**30
    # a manifest is input: a budget that is not a positive finite number exports nothing
    hostile = ServeMetrics(queue_depth=lambda: 0, in_flight=lambda: 0, info={"model": "m", "policy": "small_only"},
                           budgets={"latency_p99_ms": float("nan"), "ttft_p99_ms": "250", "memory_gb": -1})
    assert not any(k.startswith("edgekit_budget") for k in _samples(hostile.render()))


# --------------------------------------------------------------------------- a real Prometheus


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _query(base: str, path: str) -> dict:
    with urllib.request.urlopen(f"{base}{path}", timeout=10) as response:
        return json.loads(response.read())


def test_a_real_prometheus_scrapes_serve_and_evaluates_the_rules(start, tmp_path):
    from urllib.parse import quote, urlsplit

    from edgekit.telemetry import DeviceHealth

    prometheus = _tool("prometheus")
    health = DeviceHealth(nvml=False, tegrastats=str(stand_in_tegrastats(tmp_path / "bin", HOT_LINE)))
    server = start(health=health)
    assert call(server.url, "POST", "/v1/completions", {"prompt": "def f(x):", "max_tokens": 4})[0] == 200
    target = urlsplit(server.url).netloc
    port = _free_port()
    config = tmp_path / "prometheus.yml"
    shutil.copy(RULES, tmp_path / "edgekit-alerts.yml")
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "rule_files: [edgekit-alerts.yml]\n"
        f"scrape_configs:\n  - job_name: edgekit\n    static_configs: [{{targets: ['{target}']}}]\n")
    log = (tmp_path / "prometheus.log").open("w")
    process = subprocess.Popen(
        [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}/api/v1"
    try:
        def ready():
            try:
                return _query(base, "/query?query=" + quote('up{job="edgekit"}'))["data"]["result"]
            except OSError:
                return None

        up = _wait_for(ready, "Prometheus to scrape edgekit serve", timeout=90)
        assert up[0]["value"][1] == "1" and up[0]["metric"]["instance"] == target
        served = _query(base, "/query?query=" + quote('edgekit_requests_total{endpoint="/v1/completions",code="200"}'))
        assert served["data"]["result"][0]["value"][1] == "1"
        groups = _wait_for(lambda: _query(base, "/rules")["data"]["groups"], "the rules to load")
        rules = {r["name"]: r for g in groups for r in g["rules"]}
        assert len(rules) == 8 and all(r["health"] != "err" for r in rules.values()), rules
        # the stand-in Jetson's GPU reads 90.5 °C: the alert is pending (it fires after 5 min)
        alerts = _wait_for(lambda: [a for a in _query(base, "/alerts")["data"]["alerts"] if a["labels"]["alertname"] == "EdgekitGPUHot"],
                           "EdgekitGPUHot to be pending", timeout=60)
        assert alerts[0]["state"] == "pending" and alerts[0]["labels"]["sensor"] == "gpu"
        assert alerts[0]["labels"]["instance"] == target and float(alerts[0]["value"]) == 90.5
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
