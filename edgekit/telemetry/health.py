"""The device's health as labelled numbers, from whichever sources this host has."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Iterator

from edgekit.telemetry import host

#: how often tegrastats prints a line while a server runs (its own process; a line costs ~nothing)
TEGRASTATS_INTERVAL_MS = 1000
#: a tegrastats sample older than this is not reported (tegrastats died or stalled)
TEGRASTATS_STALE_S = 10.0


@dataclass(frozen=True)
class Reading:
    name: str  # without the ``edgekit_`` prefix, e.g. ``device_temperature_celsius``
    labels: dict[str, str]
    value: float


class DeviceHealth:
    """Reads RAM and load from /proc, GPUs from NVML, a Jetson from tegrastats (see the package doc).

    ``nvml`` / ``tegrastats``: a module object standing in for ``pynvml`` and the tegrastats
    executable's path (tests; a Jetson whose tegrastats is not on PATH); ``False`` turns a
    source off."""

    def __init__(self, *, nvml: Any = None, tegrastats: str | bool | None = None):
        from edgekit.telemetry.nvml import Nvml
        from edgekit.telemetry.tegrastats import TegrastatsRecorder

        self.nvml = Nvml(nvml) if nvml is not False else None
        self.tegrastats = None
        if tegrastats is not False:
            recorder = TegrastatsRecorder(interval_ms=TEGRASTATS_INTERVAL_MS,
                                          executable=tegrastats if isinstance(tegrastats, str) else None, keep=1)
            if recorder.executable:
                self.tegrastats = recorder
        self._last_seen: float | None = None

    @property
    def sources(self) -> list[str]:
        """What this host reports, for /healthz and the start-up line."""
        found = ["proc"] if os.path.exists("/proc/meminfo") else []
        if self.nvml is not None and self.nvml.available:
            found.append("nvml")
        if self.tegrastats is not None:
            found.append("tegrastats")
        return found

    def start(self) -> None:
        if self.tegrastats is not None and not self.tegrastats.start():
            self.tegrastats = None

    def read(self) -> Iterator[Reading]:
        ram = None
        sample = self._tegrastats_sample()
        if sample is not None:
            yield from _tegrastats_readings(sample)
            if sample.get("ram_used_mb") is not None:  # Jetson: tegrastats' RAM is the GPU's memory too
                ram = (sample["ram_used_mb"] * 2**20, sample["ram_total_mb"] * 2**20)
        ram = ram or host.ram_bytes()
        if ram is not None:
            yield Reading("device_memory_used_bytes", {"memory": "ram"}, float(ram[0]))
            yield Reading("device_memory_total_bytes", {"memory": "ram"}, float(ram[1]))
        load = host.load_1m()
        if load is not None:
            yield Reading("device_load_1m", {}, load)
        if self.nvml is not None:
            for name, labels, value in self.nvml.read():
                yield Reading(name, labels, value)

    def _tegrastats_sample(self) -> dict | None:
        recorder = self.tegrastats
        if recorder is None or not recorder.samples:
            return None
        sample = recorder.samples[-1]
        if sample.get("_received") is not None and time.monotonic() - sample["_received"] > TEGRASTATS_STALE_S:
            return None
        return sample

    def close(self) -> None:
        if self.tegrastats is not None:
            self.tegrastats.stop()
            self.tegrastats = None
        if self.nvml is not None:
            self.nvml.close()


def _tegrastats_readings(sample: dict) -> Iterator[Reading]:
    for sensor, celsius in sorted(sample.get("temperatures_c", {}).items()):
        yield Reading("device_temperature_celsius", {"sensor": sensor.lower()}, float(celsius))
    if sample.get("gpu_load_pct") is not None:
        yield Reading("device_utilization_ratio", {"unit": "gpu"}, sample["gpu_load_pct"] / 100.0)
    if sample.get("cpu_load_pct") is not None:
        yield Reading("device_utilization_ratio", {"unit": "cpu"}, sample["cpu_load_pct"] / 100.0)
    for rail, (instant_mw, _average) in sorted(sample.get("rails_mw", {}).items()):
        yield Reading("device_power_watts", {"rail": rail}, instant_mw / 1000.0)
