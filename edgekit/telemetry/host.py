"""Host memory and load from ``/proc`` (Linux); nothing on other systems."""

from __future__ import annotations

import re

_MEMINFO = re.compile(r"^(MemTotal|MemAvailable):\s+(\d+) kB$", re.MULTILINE)


def read_proc(path: str, limit: int = 1 << 16) -> str | None:
    """A small ``/proc`` file's text (bounded), or None where it is not there."""
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("ascii", "replace")
    except OSError:
        return None


def ram_bytes(meminfo: str | None = None) -> tuple[int, int] | None:
    """(used, total) bytes of RAM: used is ``MemTotal - MemAvailable`` (what the kernel could not
    hand to a new allocation without swapping), as ``free`` reports it."""
    text = read_proc("/proc/meminfo") if meminfo is None else meminfo
    if not text:
        return None
    values = {name: int(kb) * 1024 for name, kb in _MEMINFO.findall(text)}
    if "MemTotal" not in values or "MemAvailable" not in values or values["MemTotal"] <= 0:
        return None
    return values["MemTotal"] - values["MemAvailable"], values["MemTotal"]


def load_1m(loadavg: str | None = None) -> float | None:
    """The 1-minute load average (runnable threads), or None."""
    text = read_proc("/proc/loadavg") if loadavg is None else loadavg
    try:
        return float(text.split()[0]) if text else None
    except (ValueError, IndexError):
        return None
