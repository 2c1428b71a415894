"""Power, temperature and device memory on a Jetson, from NVIDIA's ``tegrastats``.

    recorder = TegrastatsRecorder(interval_ms=200)
    recorder.start()             # no-op (recorded as not available) where tegrastats is absent
    ...                          # the measured work
    power = recorder.stop()      # {"available": True, "samples": 37, "input_power_w": {...}, ...}

``tegrastats --interval N`` prints one line every N ms. It runs in the background on a
pseudo-terminal: tegrastats writes with C stdio, which buffers whole blocks into a pipe (the
lines would arrive late and the last ones be lost when it is stopped) but flushes every line
to a terminal.

What a line holds depends on the board and the JetPack release (the parser is tested on
lines from each, ``tests/test_telemetry_tegrastats.py``):

* JetPack 4 (Nano, TX1/TX2, Xavier): rails as ``NAME instant/average`` in mW without a unit
  (``POM_5V_IN 1022/1022`` on the Nano, ``VDD_IN 4067/4067`` on Xavier NX), temperatures
  ``CPU@36.5C GPU@36C``.
* JetPack 5 (Orin, L4T 35): ``VDD_IN 5299mW/5299mW``, temperatures ``CPU@47.937C tj@48.875C``;
  a sensor that is off reads ``-256C``.
* JetPack 6 (Orin, L4T 36): a date and time first, lower-case ``cpu@``/``gpu@``/``tj@``; the
  Orin Nano/NX report ``VDD_IN``, the AGX Orin only the ``VDD_GPU_SOC``, ``VDD_CPU_CV`` and
  ``VIN_SYS_5V0`` rails (no board-input rail).

The board's input power is ``VDD_IN`` (module input: Orin Nano/NX, Xavier NX, TX1/TX2) or
``POM_5V_IN`` (Jetson Nano). Where neither is reported (AGX Xavier, AGX Orin) the rails are
recorded one by one and ``input_power_w`` is None: their sum is not the board's input.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from collections import deque
from typing import Any

#: board input rails, in order of preference
INPUT_RAILS = ("VDD_IN", "POM_5V_IN")
#: temperature sensors summarized (names compared lower-case); others stay in the samples
CPU_SENSORS = ("cpu", "bcpu", "mcpu")
GPU_SENSORS = ("gpu",)
JUNCTION_SENSORS = ("tj",)
#: how long stop() waits for a first sample when the measured run was shorter than tegrastats' start-up
FIRST_SAMPLE_WAIT_S = 3.0
#: below this a temperature is a sensor that is off (tegrastats prints -256C), not a reading
_MIN_VALID_C = -100.0

_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_TEMP = re.compile(r"(?<![\w%@])([A-Za-z][A-Za-z0-9_]*)@(-?\d+(?:\.\d+)?)C\b")
# "VDD_IN 4761mW/4777mW" or "POM_5V_IN 1022/1022": instant/average in mW. The lookahead
# keeps "RAM 534/3964MB" and "SWAP 0/1982MB" (megabytes, not milliwatts) out.
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?=\s|$)")
_GPU_LOAD = re.compile(r"\bGR3D_FREQ (\d+)%")
# "CPU [16%@204,9%@204,off,off]": per core load (a core that is off is left out)
_CPU = re.compile(r"\bCPU \[([^\]]{0,2000})\]")
_CORE_LOAD = re.compile(r"^(\d+)%")


def parse_line(line: str) -> dict[str, Any] | None:
    """One tegrastats line as numbers; None for a line that is not a tegrastats sample.

    ``{"ram_used_mb", "ram_total_mb", "gpu_load_pct", "temperatures_c": {name: C},
    "rails_mw": {name: [instant, average]}, "input_rail", "input_power_w"}`` (absent
    fields are None / empty)."""
    text = line.strip()
    ram = _RAM.search(text)
    rails = {m.group(1): [int(m.group(2)), int(m.group(3))] for m in _RAIL.finditer(text)}
    temperatures = {m.group(1): float(m.group(2)) for m in _TEMP.finditer(text) if float(m.group(2)) > _MIN_VALID_C}
    if ram is None and not rails and not temperatures:
        return None
    input_rail = next((name for name in INPUT_RAILS if name in rails), None)
    gpu = _GPU_LOAD.search(text)
    cpu = _CPU.search(text)
    cores = [int(m.group(1)) for part in (cpu.group(1).split(",") if cpu else ()) if (m := _CORE_LOAD.match(part.strip()))]
    return {
        "ram_used_mb": int(ram.group(1)) if ram else None,
        "ram_total_mb": int(ram.group(2)) if ram else None,
        "gpu_load_pct": int(gpu.group(1)) if gpu else None,
        "cpu_load_pct": sum(cores) / len(cores) if cores else None,  # mean over the cores that are on
        "temperatures_c": temperatures,
        "rails_mw": rails,
        "input_rail": input_rail,
        "input_power_w": rails[input_rail][0] / 1000.0 if input_rail else None,
    }


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"mean": round(sum(values) / len(values), 3), "max": round(max(values), 3), "min": round(min(values), 3)}


def _sensor(samples: list[dict[str, Any]], names: tuple[str, ...]) -> dict[str, float] | None:
    """The hottest of the named sensors in each sample, summarized over the samples."""
    per_sample = []
    for sample in samples:
        values = [c for name, c in sample["temperatures_c"].items() if name.lower() in names]
        if values:
            per_sample.append(max(values))
    return _stats(per_sample)


def summarize(samples: list[dict[str, Any]], *, interval_ms: int, seconds: float | None = None,
              generated_tokens: int | None = None) -> dict[str, Any]:
    """Power, temperatures and device RAM over the parsed samples (instantaneous readings;
    tegrastats' own running average is ignored: it starts when tegrastats does).

    With ``seconds`` (the measured phase) and ``generated_tokens``, the energy per token is
    the mean input power x seconds / tokens."""
    if not samples:
        return {"available": False, "reason": "tegrastats printed no sample during the measurement", "samples": 0}
    rails = sorted({name for s in samples for name in s["rails_mw"]})
    inputs = [s["input_power_w"] for s in samples if s["input_power_w"] is not None]
    input_rail = next((s["input_rail"] for s in samples if s["input_rail"]), None)
    ram = [s["ram_used_mb"] / 1024.0 for s in samples if s["ram_used_mb"] is not None]
    out: dict[str, Any] = {
        "available": True,
        "source": "tegrastats",
        "interval_ms": interval_ms,
        "samples": len(samples),
        "input_rail": input_rail,
        "input_power_w": _stats(inputs),
        "rails_w": {name: _stats([s["rails_mw"][name][0] / 1000.0 for s in samples if name in s["rails_mw"]]) for name in rails},
        "temperature_c": {"cpu": _sensor(samples, CPU_SENSORS), "gpu": _sensor(samples, GPU_SENSORS),
                          "junction": _sensor(samples, JUNCTION_SENSORS)},
        "device_ram_used_gb": _stats(ram),
        "gpu_load_pct": _stats([float(s["gpu_load_pct"]) for s in samples if s["gpu_load_pct"] is not None]),
    }
    if input_rail is None:
        out["note"] = ("this board's tegrastats reports no board-input rail (VDD_IN / POM_5V_IN); the rails are listed one by "
                       "one and their sum is not the board's input power")
    if inputs and seconds and generated_tokens:
        out["joules_per_token"] = round(out["input_power_w"]["mean"] * seconds / generated_tokens, 4)
    return out


class TegrastatsRecorder:
    """``tegrastats --interval N`` in the background while the measured requests run."""

    def __init__(self, interval_ms: int = 200, executable: str | None = None, keep: int | None = None):
        """``keep``: hold only the last ``keep`` samples (a server reads the latest one for hours;
        a validation run keeps them all for its summary)."""
        self.interval_ms = int(interval_ms)
        self.executable = executable or shutil.which("tegrastats")
        self.samples: list[dict[str, Any]] | deque = deque(maxlen=keep) if keep else []
        self.reason: str | None = None
        self._process: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self._fd: int | None = None

    def start(self) -> bool:
        """Start tegrastats; False (with ``reason``) when it is not there or does not start."""
        if not self.executable:
            self.reason = "tegrastats is not on PATH (not a Jetson, or JetPack's tools are not installed)"
            return False
        command = [self.executable, "--interval", str(self.interval_ms)]
        try:
            import pty

            master, slave = pty.openpty()
        except (ImportError, OSError):  # no pseudo-terminals here: a pipe (lines may arrive in blocks)
            master, slave = None, None
        try:
            self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                             stdout=slave if slave is not None else subprocess.PIPE, close_fds=True)
        except OSError as exc:
            for fd in (master, slave):
                if fd is not None:
                    os.close(fd)
            self.reason = f"tegrastats did not start: {exc}"
            return False
        if slave is not None:
            os.close(slave)  # the child holds its own copy; EOF/EIO reaches us when it exits
            self._fd = master
        else:
            self._fd = self._process.stdout.fileno()
        self._reader = threading.Thread(target=self._read, name="tegrastats-reader", daemon=True)
        self._reader.start()
        return True

    def _read(self) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(self._fd, 65536)
            except OSError:  # EIO on the pty master once the child has exited
                break
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                sample = parse_line(raw.decode("utf-8", "replace").replace("\r", ""))
                if sample is not None:
                    sample["_received"] = time.monotonic()  # how fresh it is, for a reader of the latest one
                    self.samples.append(sample)
        if pending.strip():
            sample = parse_line(pending.decode("utf-8", "replace"))
            if sample is not None:
                self.samples.append(sample)

    def stop(self, *, seconds: float | None = None, generated_tokens: int | None = None) -> dict[str, Any]:
        """Stop tegrastats and summarize what it printed."""
        if self._process is None:
            return {"available": False, "reason": self.reason or "tegrastats was not started"}
        # One more interval so the last measured stretch has its sample; a run shorter than
        # tegrastats' start-up waits (a little) for its first one.
        time.sleep(self.interval_ms / 1000.0)
        deadline = time.monotonic() + FIRST_SAMPLE_WAIT_S
        while not self.samples and self._process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        self._process.terminate()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)
        if self._fd is not None and self._process.stdout is None:
            os.close(self._fd)
        elif self._process.stdout is not None:
            self._process.stdout.close()
        self._fd = None
        summary = summarize(list(self.samples), interval_ms=self.interval_ms, seconds=seconds, generated_tokens=generated_tokens)
        summary["executable"] = self.executable
        return summary


__all__ = ["INPUT_RAILS", "TegrastatsRecorder", "parse_line", "summarize"]
