"""What the device says about itself: memory, temperatures, load and power, read where it is cheap.

    health = DeviceHealth()           # finds what this host has: /proc, NVML, tegrastats
    health.start()                    # tegrastats runs in the background (Jetson); others read on demand
    for reading in health.read():     # Reading(name, labels, value), names without the edgekit_ prefix
        ...
    health.close()

Sources, each used where it exists (none is required):

* ``/proc`` (any Linux host): RAM used/total (``MemTotal - MemAvailable``), the 1-minute load;
* NVML through ``nvidia-ml-py`` (workstation GPUs): per GPU temperature, utilisation, memory
  used/total, power draw;
* ``tegrastats`` (Jetson, where RAM is the GPU's memory too): CPU/GPU/junction temperatures,
  GPU load, RAM, every power rail (instant mW), read from its own background process.

Readings are plain numbers with labels; ``edgekit.serve.metrics`` turns them into Prometheus
gauges (docs/serve.md, "Device health") and the alert rules in
``edgekit/serve/prometheus/edgekit-alerts.yml`` read those gauges.
"""

from __future__ import annotations

from edgekit.telemetry.health import DeviceHealth, Reading

__all__ = ["DeviceHealth", "Reading"]
