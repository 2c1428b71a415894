"""Peak memory of a validation run: the resident set of this process since the run started,
plus the GPU memory it uses where a GPU backend runs."""

from __future__ import annotations

import os
import re
import shutil
import sys
import threading
from typing import Any

from edgekit.validate.host import GIB, command_output, read_text


class PeakMemory:
    """Peak RSS of this process from :meth:`start` on, and the GPU memory it uses.

    Linux: writing ``5`` to ``/proc/self/clear_refs`` resets the peak-RSS watermark
    (``VmHWM``, which ``getrusage`` reports too) to the current RSS, so a validation run inside
    a longer-lived process (tests, a notebook) measures itself only. Where that is not possible
    the lifetime peak of the process is reported and said to be one."""

    def __init__(self) -> None:
        self.gpu = False
        self.source = "the lifetime peak RSS of this process (its watermark could not be reset here)"
        self.rss_at_start_gb: float | None = None
        self._smi_peak_mib: float | None = None
        self._smi_ok = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _status_kb(key: str) -> int | None:
        match = re.search(rf"^{key}:\s+(\d+) kB", read_text("/proc/self/status") or "", re.MULTILINE)
        return int(match.group(1)) if match else None

    def start(self) -> None:
        """Reset the RSS watermark (and torch's CUDA peak when CUDA is already in use)."""
        rss = self._status_kb("VmRSS")
        self.rss_at_start_gb = rss * 1024 / GIB if rss is not None else None
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            self.source = "VmHWM of this process since validation started (watermark reset through /proc/self/clear_refs)"
        except OSError:
            pass
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():  # never initialize CUDA just to reset a counter
            torch.cuda.reset_peak_memory_stats()

    def watch_gpu(self) -> None:
        """Count this process's GPU memory too (a GPU backend is loaded): nvidia-smi's
        per-process figure, sampled every 0.25 s, where it has one."""
        self.gpu = True
        if shutil.which("nvidia-smi"):
            self._thread = threading.Thread(target=self._poll_smi, name="nvidia-smi-poll", daemon=True)
            self._thread.start()

    def _poll_smi(self) -> None:
        pid = str(os.getpid())
        while not self._stop.is_set():
            out = command_output(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"], timeout=5)
            for line in (out or "").splitlines():
                parts = [p.strip() for p in line.split(",")]
                if len(parts) == 2 and parts[0] == pid and re.fullmatch(r"[\d.]+", parts[1]):
                    self._smi_ok = True
                    self._smi_peak_mib = max(self._smi_peak_mib or 0.0, float(parts[1]))
            self._stop.wait(0.25)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def stop(self) -> dict[str, Any]:
        import resource

        self.close()
        hwm = self._status_kb("VmHWM")
        if hwm is not None:
            peak_gb = hwm * 1024 / GIB
        else:  # macOS reports bytes, Linux kB
            maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peak_gb = maxrss / GIB if sys.platform == "darwin" else maxrss * 1024 / GIB
        gpu: dict[str, Any]
        if not self.gpu:
            gpu = {"gb": None,
                   "reason": "the backend runs on the CPU (ONNX Runtime's CPU execution provider): no GPU memory used"}
        elif self._smi_ok:
            gpu = {"gb": round(self._smi_peak_mib / 1024, 4), "source": "nvidia-smi --query-compute-apps: this process, peak of "
                                                                          "samples every 0.25 s"}
        elif "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized():
            torch = sys.modules["torch"]
            gpu = {"gb": round(torch.cuda.max_memory_allocated() / GIB, 4),
                   "source": "torch.cuda.max_memory_allocated (KV cache and I/O tensors; the TensorRT engine's own device "
                             "memory is not included: nvidia-smi reports no per-process memory here)"}
        else:
            gpu = {"gb": None,
                   "reason": "no per-process GPU memory source here (no nvidia-smi per-process figures, no torch CUDA)"}
        measured = peak_gb + (gpu["gb"] or 0.0)
        return {
            "peak_rss_gb": round(peak_gb, 4),
            "peak_rss_source": self.source,
            "rss_at_start_gb": round(self.rss_at_start_gb, 4) if self.rss_at_start_gb is not None else None,
            "gpu": gpu,
            "measured_gb": round(measured, 4),
            "measured_is": "peak RSS + GPU memory of this process" if gpu["gb"] is not None else "peak RSS of this process",
        }
