"""NVIDIA GPUs through NVML (the ``nvidia-ml-py`` package, module ``pynvml``), where both exist.

NVML is the library ``nvidia-smi`` reads; one call per value, microseconds each, so it is read
at scrape time instead of polled. A GPU whose query fails (a value the board does not report,
e.g. power on some laptop GPUs) leaves that value out rather than failing the scrape.
"""

from __future__ import annotations

from typing import Any, Iterator


class Nvml:
    """An NVML session over every GPU the driver shows; ``available`` False (with ``reason``) otherwise."""

    def __init__(self, module: Any = None):
        self.available, self.reason, self._nvml, self._handles = False, None, None, []
        try:
            nvml = module if module is not None else __import__("pynvml")
        except ImportError:
            self.reason = "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
            return
        try:
            nvml.nvmlInit()
            self._handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        except Exception as exc:  # NVMLError: no driver, no GPU, a container without the device
            self.reason = f"NVML did not start: {exc}"
            return
        self._nvml, self.available = nvml, True

    def read(self) -> Iterator[tuple[str, dict[str, str], float]]:
        """(name, labels, value) per GPU and quantity."""
        nvml = self._nvml
        if nvml is None:
            return
        for index, handle in enumerate(self._handles):
            gpu = f"gpu{index}"
            for name, labels, query in (
                ("device_temperature_celsius", {"sensor": gpu},
                 lambda h: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU)),
                ("device_utilization_ratio", {"unit": gpu}, lambda h: nvml.nvmlDeviceGetUtilizationRates(h).gpu / 100.0),
                ("device_memory_used_bytes", {"memory": gpu}, lambda h: nvml.nvmlDeviceGetMemoryInfo(h).used),
                ("device_memory_total_bytes", {"memory": gpu}, lambda h: nvml.nvmlDeviceGetMemoryInfo(h).total),
                ("device_power_watts", {"rail": gpu}, lambda h: nvml.nvmlDeviceGetPowerUsage(h) / 1000.0),
            ):
                try:
                    yield name, labels, float(query(handle))
                except Exception:  # NVMLError_NotSupported and friends: this board does not report it
                    continue

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
            self._nvml, self.available = None, False
