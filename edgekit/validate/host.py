"""What machine a validation run measures: platform, CPU, memory, GPUs, Jetson model and
L4T/JetPack release, library versions, and which built-in target profile (if any) it is."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

GIB = 1024**3


def parse_l4t_release(text: str) -> str | None:
    """``"# R36 (release), REVISION: 4.3, ..."`` (/etc/nv_tegra_release) -> ``"36.4.3"``."""
    match = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def read_text(path: str) -> str | None:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return None


def command_output(args: list[str], timeout: float = 10.0) -> str | None:
    if shutil.which(args[0]) is None:
        return None
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _cpu_model() -> str:
    info = read_text("/proc/cpuinfo") or ""
    for key in ("model name", "Hardware", "Model", "cpu model"):
        match = re.search(rf"^{key}\s*:\s*(.+)$", info, re.MULTILINE)
        if match:
            return match.group(1).strip()
    return platform.processor() or platform.machine()


def _memory_gb() -> float | None:
    match = re.search(r"^MemTotal:\s+(\d+) kB", read_text("/proc/meminfo") or "", re.MULTILINE)
    return round(int(match.group(1)) * 1024 / GIB, 2) if match else None


def _package_version(*names: str) -> str | None:
    from importlib import metadata

    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def host_info() -> dict[str, Any]:
    """What this machine is: platform, CPU, cores, memory, GPUs, Jetson model and L4T/JetPack
    release, ONNX Runtime and TensorRT versions (None where absent)."""
    from edgekit import __version__

    jetson_model = (read_text("/proc/device-tree/model") or "").replace("\x00", "").strip() or None
    if jetson_model and "jetson" not in jetson_model.lower():
        jetson_model = None  # another board with a device tree (a Raspberry Pi, ...)
    l4t_text = read_text("/etc/nv_tegra_release")
    gpus = []
    smi = command_output(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"])
    for line in (smi or "").splitlines():
        parts = [p.strip() for p in line.split(",")]
        if parts and parts[0]:
            memory = float(parts[1]) / 1024 if len(parts) > 1 and re.fullmatch(r"[\d.]+", parts[1]) else None
            gpus.append({"name": parts[0], "memory_gb": round(memory, 2) if memory else None})
    if not gpus and jetson_model:
        gpus.append({"name": f"{jetson_model} integrated GPU (shares system memory)", "memory_gb": None})
    jetpack = command_output(["dpkg-query", "-W", "-f=${Version}", "nvidia-jetpack"]) if l4t_text else None
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    tensorrt = _package_version("tensorrt", "tensorrt-cu12", "tensorrt_cu12")
    if tensorrt is None and l4t_text:  # JetPack installs TensorRT's Python module with apt, without pip metadata
        from edgekit.devices import tensorrt_available

        tensorrt = tensorrt_available()
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "memory_gb": _memory_gb(),
        "gpus": gpus,
        "jetson_model": jetson_model,
        "l4t": parse_l4t_release(l4t_text) if l4t_text else None,
        "jetpack": (jetpack or "").strip() or None,
        # Other work on the cores makes latencies noisy: the load says how busy the host was.
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "onnxruntime": _package_version("onnxruntime", "onnxruntime-gpu"),
        "tensorrt": tensorrt,
        "edgekit": __version__,
    }


def detect_host_target(host: dict[str, Any]) -> tuple[str | None, str]:
    """(the built-in target profile this host is, or None; why)."""
    model = (host.get("jetson_model") or "").lower()
    memory = host.get("memory_gb") or 0.0
    if model:
        if "orin nano" in model:
            return ("jetson-orin-nano-8gb", f"{host['jetson_model']} with {memory} GiB") if memory > 6 else \
                (None, f"{host['jetson_model']} with {memory} GiB: an Orin Nano 4GB, which no target profile describes")
        if "orin nx" in model:
            return ("jetson-orin-nx-16gb", f"{host['jetson_model']} with {memory} GiB") if memory > 10 else \
                (None, f"{host['jetson_model']} with {memory} GiB: an Orin NX 8GB, which no target profile describes")
        if "agx orin" in model:
            if memory > 40:
                return "jetson-orin-agx-64gb", f"{host['jetson_model']} with {memory} GiB"
            if memory > 20:
                return "jetson-orin-agx-32gb", f"{host['jetson_model']} with {memory} GiB"
        return None, f"{host['jetson_model']} ({memory} GiB) is not a device any target profile describes"
    for gpu in host.get("gpus") or []:
        name = gpu["name"].lower()
        if "rtx 4090" in name:
            return "workstation-rtx4090", gpu["name"]
        if "h100" in name and ("hbm3" in name or "sxm" in name):
            return "workstation-h100", gpu["name"]
    gpu_text = ", ".join(g["name"] for g in host.get("gpus") or []) or "no NVIDIA GPU"
    return None, f"{host.get('machine')} host, {host.get('cpu')}, {gpu_text}: no target profile describes it"


def host_words(host: dict[str, Any]) -> str:
    gpus = ", ".join(g["name"] for g in host.get("gpus") or []) or "no GPU"
    return f"{host.get('machine')}, {host.get('cpu')}, {host.get('cores_usable')} usable cores, {gpus}"
