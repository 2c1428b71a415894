"""``edgekit validate``: measure a bundle where it runs and check it against its budgets.

    report = validate_bundle("bundles/smollm2", concurrency=2)     # writes validate.json + .html
    report["passed"], report["budgets"]["latency_p99_ms"]

What one run does, in order:

1. **Prompts.** ``--prompts FILE`` (one prompt per line, or JSON Lines with ``{"prompt": ...}``),
   encoded with the bundle's tokenizer as ``edgekit run`` encodes a prompt; or, by default,
   :data:`DEFAULT_PROMPTS` windows of :data:`DEFAULT_PROMPT_TOKENS` tokens cut at evenly spaced
   offsets from the held-out split of the built-in text (the last 8192 tokens of
   ``builtin:python-docs``, the split ``evaluate`` scores perplexity on), fed as token ids.
2. **Load** the bundle's branch (``edgekit.runtime.backends.load_branch``: ONNX Runtime, or
   the TensorRT engine where it is built and loads).
3. **Warm-up**: ``warmup`` requests at the same concurrency, not measured (first-call
   allocations, thread pools, caches).
4. **Measured requests**, closed loop: ``concurrency`` worker threads, each with its own
   sessions (own KV cache) on the one loaded branch; each takes a first request, all start
   together, and each takes the next request as soon as its previous one ends, until none is
   left. Request *i* uses prompt *i mod #prompts*.
   Decoding is greedy (the runtime's C sampler at temperature 0) for exactly
   ``max_new_tokens`` tokens: end-of-sequence is ignored so every request does the same work.
   Per request: **TTFT** = from the request's start (a new session, empty cache) to the first
   token chosen (prefill + first sampling step); **TPOT** = the time between consecutive
   tokens (one decode step + sampling each, ``max_new_tokens - 1`` per request); decode
   tokens/s = (max_new_tokens - 1) / the sum of its TPOTs. Throughput = all generated tokens /
   wall time of the measured phase. Quantiles (p50/p90/p99) are numpy's default ``linear``
   definition, computed by the runtime's latency statistics (:class:`fastpath.LatencyStats`,
   the same code ``serve`` reports with): over the sorted samples ``s`` of ``n``,
   ``h = (n - 1) q``, result ``s[floor h] + (h - floor h) (s[floor h + 1] - s[floor h])``.
5. **Memory**: the peak resident set of this process from the moment validation starts (Linux:
   ``VmHWM`` after resetting the watermark through ``/proc/self/clear_refs``; elsewhere the
   lifetime peak from ``getrusage``), plus the GPU memory of this process where a GPU backend
   runs (``nvidia-smi`` per-process, else torch's peak allocation). On a Jetson,
   ``tegrastats`` runs in the background for power, temperatures and device RAM.
6. **Budgets** from the manifest (``latency_p99_ms`` vs TPOT p99, ``ttft_p99_ms`` vs TTFT
   p99, ``memory_gb`` vs peak memory), overridden or added by the caller.
7. **Predicted vs measured**: ``edgekit plan``'s predictions for the bundle's model config,
   weight format and target (and this host's target profile when it matches one), next to
   the measurements.
8. **Report**: ``validate.json`` (``edgekit.validate/1``, every raw latency included) and a
   self-contained ``validate.html``, written atomically into ``output_dir`` (never into the
   bundle: bundles are not modified once written).

On a machine that is not the bundle's target the numbers describe this machine; the report
says so in ``host.note`` and at the top of the HTML.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgekit.errors import EdgekitError, OutputError, ValidateError
from edgekit.names import check_name

FORMAT = "edgekit.validate/1"
DEFAULT_REQUESTS = 16
DEFAULT_WARMUP = 2
DEFAULT_MAX_NEW_TOKENS = 64
#: default prompts: this many windows of DEFAULT_PROMPT_TOKENS held-out tokens
DEFAULT_PROMPTS = 16
DEFAULT_PROMPT_TOKENS = 128
#: the held-out split the default prompts come from (edgekit's evaluation default)
HELD_OUT_SOURCE = "builtin:python-docs"
HELD_OUT_TOKENS = 8192
TEGRASTATS_INTERVAL_MS = 200
BUDGET_KEYS = ("latency_p99_ms", "ttft_p99_ms", "memory_gb")
#: the command-line options that set them
BUDGET_FLAGS = {"latency_p99_ms": "--budget-latency-ms", "ttft_p99_ms": "--budget-ttft-ms", "memory_gb": "--budget-memory-gb"}
#: what each budget is compared with (report wording)
BUDGET_MEASURES = {
    "latency_p99_ms": "p99 time per output token (TPOT), ms",
    "ttft_p99_ms": "p99 time to first token (TTFT), ms",
    "memory_gb": "peak memory (RSS + GPU), GiB",
}
GIB = 1024**3
QUANTILE_DEFINITION = ("numpy's default 'linear' quantile: over the n sorted samples s, h = (n - 1) * q, "
                       "result s[floor(h)] + (h - floor(h)) * (s[floor(h) + 1] - s[floor(h)])")


# --------------------------------------------------------------------------- statistics


def summarize(values: list[float]) -> dict[str, float | int] | None:
    """count, mean, p50, p90, p99, min, max of ``values`` (None when empty); the quantiles
    are the runtime's (:class:`edgekit.runtime.fastpath.LatencyStats`, numpy 'linear')."""
    if not values:
        return None
    from edgekit.runtime import fastpath

    stats = fastpath.LatencyStats(window=max(1, len(values)))
    for value in values:
        stats.record_token(float(value))
    summary = stats.summary()["token"]
    return {"count": summary["count"], "mean": summary["mean"], "p50": summary["p50"], "p90": summary["p90"],
            "p99": summary["p99"], "min": min(values), "max": max(values)}


def _rounded(summary: dict[str, Any] | None, digits: int = 4) -> dict[str, Any] | None:
    if summary is None:
        return None
    return {k: (round(v, digits) if isinstance(v, float) else v) for k, v in summary.items()}


# --------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    origin: str  # "FILE:LINE" or "held-out tokens A..B"
    text: str | None = None


def read_prompts_file(path: str | Path) -> list[tuple[str, str]]:
    """``[(text, "FILE:LINE"), ...]`` from a prompts file: one prompt per non-blank line, or
    JSON Lines (a ``.jsonl`` file, or one whose first non-blank line starts with ``{``) whose
    records each hold a non-empty string ``"prompt"``. Raises :class:`ValidateError` naming
    the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ValidateError("prompts file not found", where=str(path), how="pass an existing file with one prompt per line")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValidateError(f"the prompts file is not UTF-8 text (byte {exc.start})", where=str(path),
                            how="save it as UTF-8") from None
    except OSError as exc:
        raise ValidateError(f"cannot read the prompts file: {exc.strerror or exc}", where=str(path),
                            how="check its permissions") from None
    lines = raw.splitlines()
    first = next((line.strip() for line in lines if line.strip()), "")
    as_jsonl = path.suffix.lower() == ".jsonl" or first.startswith("{")
    prompts: list[tuple[str, str]] = []
    for number, line in enumerate(lines, 1):
        where = f"{path}:{number}"
        if not line.strip():
            continue
        if not as_jsonl:
            prompts.append((line, where))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValidateError(f"invalid JSON: {exc.msg} (column {exc.colno})", where=where,
                                how='make each line one JSON object like {"prompt": "..."}') from None
        if not isinstance(record, dict) or "prompt" not in record:
            raise ValidateError('the record has no "prompt" field', where=where,
                                how='give every line {"prompt": "..."} (or use a plain text file, one prompt per line)')
        text = record["prompt"]
        if not isinstance(text, str) or not text.strip():
            raise ValidateError('"prompt" must be a non-empty string', where=where, how="put the prompt text there")
        prompts.append((text, where))
    if not prompts:
        raise ValidateError("the prompts file holds no prompt", where=str(path), how="put one prompt per line")
    return prompts


def encode_prompts(texts: list[tuple[str, str]], tokenizer: Any, *, context_length: int, max_new_tokens: int) -> list[Prompt]:
    """Encode each prompt as ``edgekit run`` does (``tokenizer.encode``) and check that it plus
    ``max_new_tokens`` fits the context."""
    prompts = []
    for text, where in texts:
        ids = [int(t) for t in tokenizer.encode(text)]
        if not ids:
            raise ValidateError("the prompt encodes to no tokens", where=where, how="give a non-empty prompt")
        if len(ids) + max_new_tokens > context_length:
            raise ValidateError(
                f"the prompt has {len(ids)} tokens; with {max_new_tokens} new tokens it needs {len(ids) + max_new_tokens}, "
                f"more than the bundle's context of {context_length}", where=where,
                how="shorten the prompt or lower --max-new-tokens")
        prompts.append(Prompt(ids=ids, origin=where, text=text))
    return prompts


def default_prompts(tokenizer: Any, *, context_length: int, max_new_tokens: int, count: int = DEFAULT_PROMPTS,
                    length: int = DEFAULT_PROMPT_TOKENS) -> list[Prompt]:
    """``count`` windows of ``length`` tokens (fewer when the context needs it) from the
    held-out split, the i-th starting at ``round(i * (L - length) / (count - 1))`` of its L
    tokens: evenly spread over the split, overlapping only when ``count * length > L``."""
    from edgekit.models.text import resolve_text_source, tokenize_splits

    length = min(length, context_length - max_new_tokens)
    if length < 1:
        raise ValidateError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the context of {context_length}",
                            where="--max-new-tokens", how=f"use at most {context_length - 1}")
    text = resolve_text_source(HELD_OUT_SOURCE).read()
    held = tokenize_splits(text, tokenizer, eval_tokens=HELD_OUT_TOKENS, window=1, where=HELD_OUT_SOURCE).evaluation
    length = min(length, len(held))
    span = len(held) - length
    prompts = []
    for i in range(count):
        start = round(i * span / (count - 1)) if count > 1 else 0
        ids = [int(t) for t in held[start:start + length]]
        prompts.append(Prompt(ids=ids, origin=f"held-out tokens {start}..{start + length}"))
    return prompts


# --------------------------------------------------------------------------- host


def parse_l4t_release(text: str) -> str | None:
    """``"# R36 (release), REVISION: 4.3, ..."`` (/etc/nv_tegra_release) -> ``"36.4.3"``."""
    match = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return None


def _command(args: list[str], timeout: float = 10.0) -> str | None:
    if shutil.which(args[0]) is None:
        return None
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _cpu_model() -> str:
    info = _read("/proc/cpuinfo") or ""
    for key in ("model name", "Hardware", "Model", "cpu model"):
        match = re.search(rf"^{key}\s*:\s*(.+)$", info, re.MULTILINE)
        if match:
            return match.group(1).strip()
    return platform.processor() or platform.machine()


def _memory_gb() -> float | None:
    match = re.search(r"^MemTotal:\s+(\d+) kB", _read("/proc/meminfo") or "", re.MULTILINE)
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

    jetson_model = (_read("/proc/device-tree/model") or "").replace("\x00", "").strip() or None
    if jetson_model and "jetson" not in jetson_model.lower():
        jetson_model = None  # another board with a device tree (a Raspberry Pi, ...)
    l4t_text = _read("/etc/nv_tegra_release")
    gpus = []
    smi = _command(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"])
    for line in (smi or "").splitlines():
        parts = [p.strip() for p in line.split(",")]
        if parts and parts[0]:
            memory = float(parts[1]) / 1024 if len(parts) > 1 and re.fullmatch(r"[\d.]+", parts[1]) else None
            gpus.append({"name": parts[0], "memory_gb": round(memory, 2) if memory else None})
    if not gpus and jetson_model:
        gpus.append({"name": f"{jetson_model} integrated GPU (shares system memory)", "memory_gb": None})
    jetpack = _command(["dpkg-query", "-W", "-f=${Version}", "nvidia-jetpack"]) if l4t_text else None
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


def _host_words(host: dict[str, Any]) -> str:
    gpus = ", ".join(g["name"] for g in host.get("gpus") or []) or "no GPU"
    return f"{host.get('machine')}, {host.get('cpu')}, {host.get('cores_usable')} usable cores, {gpus}"


# --------------------------------------------------------------------------- memory


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
        match = re.search(rf"^{key}:\s+(\d+) kB", _read("/proc/self/status") or "", re.MULTILINE)
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
            out = _command(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"], timeout=5)
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


# --------------------------------------------------------------------------- requests


def _one_request(branch: Any, sampler: Any, prompt: list[int], max_new_tokens: int) -> dict[str, Any]:
    start = time.perf_counter()
    session = branch.session()
    try:
        logits = session.feed(prompt)
        token = sampler.sample(logits[-1])
        last = time.perf_counter()
        ttft = last - start
        gaps = []
        for _ in range(max_new_tokens - 1):
            logits = session.feed([token])
            token = sampler.sample(logits[-1])
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
    finally:
        session.close()
    return {"start": start, "end": last, "ttft": ttft, "tpot": gaps}


def run_requests(branch: Any, prompts: list[Prompt], *, requests: int, concurrency: int, max_new_tokens: int,
                 on_done: Callable[[], None] | None = None) -> dict[str, Any]:
    """``requests`` greedy generations of ``max_new_tokens`` tokens on ``concurrency`` worker
    threads (closed loop, module docstring). Returns the raw timings."""
    import queue

    from edgekit.runtime import fastpath

    if not 1 <= concurrency <= requests:
        raise ValueError(f"need 1 <= concurrency <= requests, got concurrency {concurrency}, requests {requests}")
    jobs: queue.SimpleQueue[int] = queue.SimpleQueue()
    for index in range(requests):
        jobs.put(index)
    results: list[dict[str, Any] | None] = [None] * requests
    errors: list[BaseException] = []
    abort = threading.Event()
    barrier = threading.Barrier(concurrency)
    lock = threading.Lock()
    flight = {"now": 0, "max": 0}

    def worker(worker_id: int) -> None:
        try:
            # One sampler per stream: it holds RNG state and scratch buffers (fastpath docs).
            sampler = fastpath.Sampler(int(branch.vocab_size), temperature=0.0)
            # Every stream takes its first request before all are released together, so each of
            # the N streams runs (requests >= concurrency is checked by the caller).
            index: int | None = jobs.get_nowait()
            barrier.wait()
        except threading.BrokenBarrierError:
            return
        except BaseException as exc:  # re-raised in the caller's thread
            errors.append(exc)
            abort.set()
            barrier.abort()
            return
        while index is not None and not abort.is_set():
            prompt = prompts[index % len(prompts)]
            with lock:
                flight["now"] += 1
                flight["max"] = max(flight["max"], flight["now"])
            try:
                record = _one_request(branch, sampler, prompt.ids, max_new_tokens)
            except BaseException as exc:  # re-raised in the caller's thread
                errors.append(exc)
                abort.set()
                return
            finally:
                with lock:
                    flight["now"] -= 1
            record.update(index=index, worker=worker_id, prompt_index=index % len(prompts), prompt_tokens=len(prompt.ids))
            results[index] = record
            if on_done is not None:
                with lock:
                    on_done()
            try:
                index = jobs.get_nowait()
            except queue.Empty:
                index = None

    threads = [threading.Thread(target=worker, args=(w,), name=f"validate-stream-{w}", daemon=True) for w in range(concurrency)]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join()
    except BaseException:  # Ctrl-C: the streams stop after their current request
        abort.set()
        raise
    if errors:
        raise errors[0]
    done = [r for r in results if r is not None]
    return {"requests": done, "max_in_flight": flight["max"]}


def _latency_report(raw: dict[str, Any], *, concurrency: int, max_new_tokens: int) -> tuple[dict[str, Any], list[dict[str, Any]],
                                                                                              list[dict[str, Any]]]:
    records = raw["requests"]
    origin = min(r["start"] for r in records)
    wall = max(r["end"] for r in records) - origin
    ttft_ms = [r["ttft"] * 1000 for r in records]
    tpot_ms = [g * 1000 for r in records for g in r["tpot"]]
    e2e_ms = [(r["end"] - r["start"]) * 1000 for r in records]
    decode_rates = [len(r["tpot"]) / sum(r["tpot"]) for r in records if r["tpot"] and sum(r["tpot"]) > 0]
    generated = len(records) * max_new_tokens
    streams = []
    for worker in range(concurrency):
        mine = [r for r in records if r["worker"] == worker]
        busy = sum(r["end"] - r["start"] for r in mine)
        streams.append({"stream": worker, "requests": len(mine), "generated_tokens": len(mine) * max_new_tokens,
                        "busy_seconds": round(busy, 4),
                        "tokens_per_s": round(len(mine) * max_new_tokens / busy, 3) if busy > 0 else None})
    latency = {
        "ttft_ms": _rounded(summarize(ttft_ms)),
        "tpot_ms": _rounded(summarize(tpot_ms)),
        "request_ms": _rounded(summarize(e2e_ms)),
        "decode_tokens_per_s_per_stream": _rounded(summarize(decode_rates), 3),
        "aggregate_tokens_per_s": round(generated / wall, 3) if wall > 0 else None,
        "generated_tokens": generated,
        "wall_seconds": round(wall, 6),
        "max_in_flight": raw["max_in_flight"],
    }
    per_request = [{
        "request": r["index"], "stream": r["worker"], "prompt": r["prompt_index"], "prompt_tokens": r["prompt_tokens"],
        "start_s": round(r["start"] - origin, 6), "ttft_ms": round(r["ttft"] * 1000, 4),
        "request_ms": round((r["end"] - r["start"]) * 1000, 4),
        "decode_tokens_per_s": round(len(r["tpot"]) / sum(r["tpot"]), 3) if r["tpot"] and sum(r["tpot"]) > 0 else None,
        "tpot_ms": [round(g * 1000, 4) for g in r["tpot"]],
    } for r in sorted(records, key=lambda r: r["index"])]
    return latency, streams, per_request


# --------------------------------------------------------------------------- budgets


def check_budgets(manifest_budgets: dict[str, Any] | None, overrides: dict[str, float | None] | None,
                  measured: dict[str, float | None]) -> dict[str, dict[str, Any]]:
    """``{name: {budget, measured, meets, source, measure}}`` for every budget the manifest
    sets or ``overrides`` sets or replaces (None in ``overrides`` keeps the manifest's)."""
    checks: dict[str, dict[str, Any]] = {}
    for key in BUDGET_KEYS:
        override = (overrides or {}).get(key)
        value = override if override is not None else (manifest_budgets or {}).get(key)
        if value is None:
            continue
        got = measured.get(key)
        checks[key] = {
            "budget": float(value),
            "measured": round(got, 4) if got is not None else None,
            "meets": got is not None and got <= float(value),
            "source": "override" if override is not None else "manifest",
            "measure": BUDGET_MEASURES[key],
        }
    return checks


# --------------------------------------------------------------------------- predictions


def _weights_from_bundle(manifest: dict[str, Any], bundle_dir: Path) -> dict[str, Any]:
    """The deployed weight format, from the manifest's quantize record and the bundle's recipe."""
    import yaml

    quantize = next((s.get("metrics") or {} for s in reversed(manifest.get("stages") or []) if s.get("type") == "quantize"), None)
    recipe: dict[str, Any] = {}
    if (bundle_dir / "recipe.yaml").is_file():
        try:
            recipe = yaml.safe_load((bundle_dir / "recipe.yaml").read_text()) or {}
        except yaml.YAMLError:
            recipe = {}
    stages = [s for s in (recipe.get("stages") or []) if isinstance(s, dict)]
    quant_cfg = next((s for s in reversed(stages) if s.get("type") == "quantize"), {})
    engine_cfg = next((s for s in reversed(stages) if s.get("type") == "build_engine"), {})
    if not quantize:
        return {"precision": "fp16", "group_size": None, "quantize_lm_head": False,
                "from": "no quantize stage: the float graph, planned as TensorRT builds it (FP16)",
                "prefill_chunk": engine_cfg.get("max_prefill")}
    if quantize.get("method") == "fp8":
        precision, group = "fp8", None
    else:
        precision, group = f"int{quantize.get('bits', 4)}", quantize.get("group_size")
    return {"precision": precision, "group_size": group, "quantize_lm_head": bool(quant_cfg.get("quantize_lm_head", False)),
            "from": f"manifest: quantize {quantize.get('method')} {quantize.get('bits')}-bit, group {group}",
            "prefill_chunk": engine_cfg.get("max_prefill")}


def predictions(bundle_dir: Path, manifest: dict[str, Any], *, host_target: str | None, prompt_tokens: int,
                max_new_tokens: int, measured: dict[str, float | None], is_target: bool) -> dict[str, Any]:
    """``edgekit plan`` for the bundle's config.json, weight format and target (and the host's
    target profile when it is another one), next to what was measured."""
    from dataclasses import replace

    from edgekit.planning import roofline as rf
    from edgekit.planning.report import NOTE, plan_target
    from edgekit.planning.request import plan_request
    from edgekit.targets import load_target

    try:
        weights = _weights_from_bundle(manifest, bundle_dir)
        context = int(manifest.get("context_length") or 2048)
        # The cache holds prompt + (on average) half the generated tokens at a measured decode step.
        kv_fill = min(1.0, (prompt_tokens + max_new_tokens / 2) / context)
        # The bundle's own copy of its target profile (a custom target YAML travels with it).
        target_file = bundle_dir / "target.yaml"
        request, planned = plan_request(
            str(bundle_dir.resolve()), target=str(target_file) if target_file.is_file() else manifest.get("target"),
            context_length=context, batch=1, precision=weights["precision"], group_size=weights["group_size"],
            prompt_tokens=min(prompt_tokens, context), kv_fill=kv_fill, prefill_chunk=weights["prefill_chunk"],
        )
        if weights["quantize_lm_head"] and weights["precision"] in ("int8", "int4"):
            request = replace(request, fmt=rf.weight_format(weights["precision"], group_size=request.fmt.group_size,
                                                            quantize_lm_head=True, hidden_size=request.shape.hidden_size))
        budgets = manifest.get("budgets") or {}
        request = replace(request, latency_budget_ms=budgets.get("latency_p99_ms"), ttft_budget_ms=budgets.get("ttft_p99_ms"),
                          memory_budget_gb=budgets.get("memory_gb"))
        targets = [(planned[0], "bundle target")]
        if host_target and host_target != targets[0][0].name:
            targets.append((load_target(host_target), "this host's target profile"))
    except (EdgekitError, KeyError, ValueError, OSError) as exc:
        reason = exc.one_line() if isinstance(exc, EdgekitError) else f"{type(exc).__name__}: {exc}"
        return {"available": False, "reason": f"edgekit plan could not run for this bundle: {reason}"}

    entries = []
    for target, role in targets:
        entry = plan_target(request, target)
        row: dict[str, Any] = {"target": target.name, "role": role, "supported": entry.get("supported", False)}
        if not row["supported"]:
            row["reason"] = entry.get("unsupported_reason")
            entries.append(row)
            continue
        measured_here = is_target if role == "bundle target" else True
        decode, prefill = entry["predicted_decode"], entry["predicted_prefill"]
        row.update(
            power_mode=entry["hardware"]["power_mode"],
            measured_on_this_target=measured_here,
            predicted_decode_ms_per_token=decode["ms_per_token"],
            predicted_decode_extrapolated=decode["extrapolated"],
            predicted_ttft_ms=prefill["ttft_ms"],
            predicted_ttft_extrapolated=prefill["extrapolated"],
            predicted_memory_gb=entry["predicted_memory_gb"]["total"],
            predicted_within_budgets=entry["predicted_within_budgets"],
        )
        comparisons = []
        quantities = (("decode ms/token (mean TPOT)", decode["ms_per_token"], measured.get("tpot_mean_ms")),
                      (f"TTFT ms (mean, {prompt_tokens}-token prompt)", prefill["ttft_ms"], measured.get("ttft_mean_ms")),
                      # the plan predicts decimal GB (as targets state memory); peak memory is measured in GiB
                      ("peak memory GiB", round(entry["predicted_memory_gb"]["total"] * 1e9 / 1024**3, 4),
                       measured.get("memory_gb")))
        for name, predicted, got in quantities:
            comparisons.append({"quantity": name, "predicted": predicted, "measured": round(got, 4) if got is not None else None,
                                "measured_over_predicted": round(got / predicted, 3) if got is not None and predicted else None})
        row["comparison"] = comparisons
        entries.append(row)
    return {
        "available": True,
        "note": NOTE + " The measured column is from this run"
                + ("" if is_target else ", on this host, which is NOT the bundle's target: the ratio says how this host "
                                        "compares with the target's prediction, not how accurate the prediction is") + ".",
        "inputs": {"model_config": str(bundle_dir / "config.json"), "weights": weights["from"], "precision": weights["precision"],
                   "group_size": weights["group_size"], "quantize_lm_head": weights["quantize_lm_head"],
                   "context_length": context, "batch": 1, "prompt_tokens": prompt_tokens, "kv_fill": round(kv_fill, 4)},
        "targets": entries,
    }


# --------------------------------------------------------------------------- the run


def _check_options(*, backend: str, concurrency: int, requests: int | None, warmup: int, max_new_tokens: int,
                   threads: int | None, budgets: dict[str, float | None] | None) -> None:
    from edgekit.runtime.backends import BACKENDS

    if backend not in BACKENDS:
        raise ValidateError(f"unknown backend {backend!r}", where="--backend", how=f"use one of: {', '.join(BACKENDS)}")
    for name, value, low in (("--concurrency", concurrency, 1), ("--warmup", warmup, 0), ("--max-new-tokens", max_new_tokens, 2),
                             ("--requests", requests, 1), ("--threads", threads, 1)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            why = " (TPOT needs a second token)" if name == "--max-new-tokens" else ""
            raise ValidateError(f"{name} must be an integer >= {low}{why}, not {value!r}", where=name,
                                how=f"pass {name} {max(low, 1)} or more")
    if requests is not None and requests < concurrency:
        raise ValidateError(f"--requests {requests} is fewer than --concurrency {concurrency}: some streams would never run",
                            where="--requests", how=f"pass --requests {concurrency} or more")
    for key, value in (budgets or {}).items():
        if key not in BUDGET_KEYS:
            raise ValidateError(f"unknown budget {key!r}", where="budgets", how=f"use one of: {', '.join(BUDGET_KEYS)}")
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
            flag = BUDGET_FLAGS[key]
            raise ValidateError(f"{flag} must be a number > 0, not {value!r}", where=flag, how="pass a positive budget")


def _bundle(bundle_dir: str | Path) -> Any:
    """The bundle directory opened once (edgekit.bundle.manifest.Bundle): its manifest is read
    and checked here, and the branch loads from the same handle."""
    from edgekit.bundle.manifest import Bundle

    path = Path(bundle_dir)
    if path.is_file() and path.name.endswith((".tar", ".tar.gz")):
        raise ValidateError("a bundle archive, not a bundle directory", where=str(path),
                            how=f"unpack it first (edgekit unpack {path.name}: it refuses unsafe members and checks every sha256) and pass the directory")
    if not path.is_dir():
        raise ValidateError("no bundle directory here", where=str(path),
                            how="pass a bundle directory written by edgekit compress (runs/<name>/stages/<n>-bundle/<name>)")
    return Bundle.open(path, error_cls=ValidateError)


def _output_dir(output_dir: str | Path | None, bundle_dir: Path, name: str) -> Path:
    """The report directory, checked now (before minutes of measuring) and created only when
    the report is written, so a run that fails leaves nothing behind."""
    if output_dir is None:  # the name comes from the bundle's manifest: checked before it becomes a path
        check_name(name, what="bundle name in manifest.json", where=f"{bundle_dir / 'manifest.json'}: name", error_cls=ValidateError)
    out = Path(output_dir) if output_dir is not None else Path.cwd() / f"validate-{name}"
    resolved, bundle = out.resolve(), bundle_dir.resolve()
    if resolved == bundle or bundle in resolved.parents:
        raise ValidateError("the report would be written inside the bundle, and bundles are not modified once written",
                            where=str(out), how="pass --output with a directory outside the bundle")
    if out.exists() and not out.is_dir():
        raise OutputError("the output path is a file, not a directory", where=str(out), how="pass --output with a directory")
    existing = next(p for p in (resolved, *resolved.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write the report here ({existing} is not a writable directory)", where=str(out),
                          how="pass --output with a writable directory")
    return out


def validate_bundle(
    bundle_dir: str | Path,
    *,
    backend: str = "auto",
    prompts: str | Path | None = None,
    concurrency: int = 1,
    requests: int | None = None,
    warmup: int = DEFAULT_WARMUP,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    threads: int | None = None,
    output_dir: str | Path | None = None,
    budgets: dict[str, float | None] | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Measure the bundle here and write ``validate.json`` + ``validate.html`` into
    ``output_dir`` (default ``./validate-<bundle name>``). ``requests`` defaults to one per
    prompt of a ``prompts`` file, else :data:`DEFAULT_REQUESTS`; ``budgets`` (keys of
    :data:`BUDGET_KEYS`) replace or add to the manifest's. Returns the report; ``passed`` is
    False when a budget is breached. Raises :class:`ValidateError` / :class:`OutputError`
    for bad input (nothing is written then)."""
    _check_options(backend=backend, concurrency=concurrency, requests=requests, warmup=warmup, max_new_tokens=max_new_tokens,
                   threads=threads, budgets=budgets)
    handle = _bundle(bundle_dir)
    bundle, manifest, name = handle.dir, handle.manifest.raw, handle.name
    out = _output_dir(output_dir, bundle, name)
    prompt_texts = read_prompts_file(prompts) if prompts is not None else None
    n_requests = requests if requests is not None else (len(prompt_texts) if prompt_texts else DEFAULT_REQUESTS)
    if n_requests < concurrency:
        raise ValidateError(f"{n_requests} request(s) (one per prompt) are fewer than --concurrency {concurrency}",
                            where="--requests", how=f"pass --requests {concurrency} or more")

    from rich.console import Console

    console = Console(stderr=True, quiet=quiet)
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    host = host_info()
    host_target, host_reason = detect_host_target(host)

    # The backend decides whether GPU memory counts; the watermark must be reset before loading.
    from edgekit.runtime.backends import load_branch

    memory = PeakMemory()
    memory.start()  # before loading: the model's weights and session are part of the peak
    console.print(f"validate: loading {bundle} (backend {backend})")
    started = time.perf_counter()
    branch = load_branch(handle, name="small", backend=backend, threads=threads)
    load_seconds = time.perf_counter() - started
    try:
        return _measure_and_report(
            branch, bundle, manifest, name=name, out=out, memory=memory, load_seconds=load_seconds, host=host,
            host_target=host_target, host_reason=host_reason, created=created, console=console, quiet=quiet, backend=backend,
            prompts=prompts, prompt_texts=prompt_texts, n_requests=n_requests, concurrency=concurrency, warmup=warmup,
            max_new_tokens=max_new_tokens, threads=threads, budgets=budgets,
        )
    finally:
        memory.close()  # stops the GPU-memory poller on every path


def _measure_and_report(branch: Any, bundle: Path, manifest: dict[str, Any], *, name: str, out: Path, memory: PeakMemory,
                        load_seconds: float, host: dict[str, Any], host_target: str | None, host_reason: str, created: str,
                        console: Any, quiet: bool, backend: str, prompts: str | Path | None,
                        prompt_texts: list[tuple[str, str]] | None, n_requests: int, concurrency: int, warmup: int,
                        max_new_tokens: int, threads: int | None, budgets: dict[str, float | None] | None) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from edgekit.evaluate.tegrastats import TegrastatsRecorder
    from edgekit.evaluate.validate_report import write_report

    bundle_target = manifest.get("target")
    is_target = host_target is not None and host_target == bundle_target
    if branch.backend != "onnxruntime":  # ONNX Runtime branches run on the CPU provider
        memory.watch_gpu()

    if prompt_texts is not None:
        prompt_list = encode_prompts(prompt_texts, branch.tokenizer, context_length=branch.context_length,
                                     max_new_tokens=max_new_tokens)
        prompt_source = {"source": "file", "file": str(prompts)}
    else:
        prompt_list = default_prompts(branch.tokenizer, context_length=branch.context_length, max_new_tokens=max_new_tokens)
        prompt_source = {"source": "held-out", "text": HELD_OUT_SOURCE, "held_out_tokens": HELD_OUT_TOKENS,
                         "description": f"{len(prompt_list)} windows of {len(prompt_list[0].ids)} tokens at evenly spaced "
                                        f"offsets of the held-out split (the last {HELD_OUT_TOKENS} tokens of "
                                        f"{HELD_OUT_SOURCE}), fed as token ids"}
    lengths = [len(p.ids) for p in prompt_list]
    used_lengths = [len(prompt_list[i % len(prompt_list)].ids) for i in range(n_requests)]

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False, disable=quiet) as progress:
        if warmup:
            task = progress.add_task(f"warm-up ({min(concurrency, warmup)} stream(s))", total=warmup)
            run_requests(branch, prompt_list, requests=warmup, concurrency=min(concurrency, warmup),
                         max_new_tokens=max_new_tokens, on_done=lambda: progress.advance(task))
        recorder = TegrastatsRecorder(TEGRASTATS_INTERVAL_MS)
        recorder.start()
        task = progress.add_task(f"measuring: {n_requests} requests × {max_new_tokens} tokens, {concurrency} stream(s)",
                                 total=n_requests)
        try:
            raw = run_requests(branch, prompt_list, requests=n_requests, concurrency=concurrency,
                               max_new_tokens=max_new_tokens, on_done=lambda: progress.advance(task))
        except BaseException:
            recorder.stop()  # never leave tegrastats running
            raise
    latency, streams, per_request = _latency_report(raw, concurrency=concurrency, max_new_tokens=max_new_tokens)
    power = recorder.stop(seconds=latency["wall_seconds"], generated_tokens=latency["generated_tokens"])
    memory_report = memory.stop()

    measured = {"latency_p99_ms": latency["tpot_ms"]["p99"] if latency["tpot_ms"] else None,
                "ttft_p99_ms": latency["ttft_ms"]["p99"], "memory_gb": memory_report["measured_gb"]}
    checks = check_budgets(manifest.get("budgets"), budgets, measured)
    breached = [key for key, check in checks.items() if not check["meets"]]
    median_prompt = int(summarize([float(n) for n in used_lengths])["p50"])
    predicted = predictions(bundle, manifest, host_target=host_target, prompt_tokens=median_prompt,
                            max_new_tokens=max_new_tokens, is_target=is_target,
                            measured={"tpot_mean_ms": latency["tpot_ms"]["mean"] if latency["tpot_ms"] else None,
                                      "ttft_mean_ms": latency["ttft_ms"]["mean"], "memory_gb": memory_report["measured_gb"]})

    if is_target:
        host_note = f"This host is the bundle's target ({bundle_target}: {host_reason}); the measurements are the target's."
    else:
        host_note = (f"These measurements are of THIS HOST ({_host_words(host)}), NOT of the bundle's target {bundle_target}. "
                     f"Run edgekit validate on a {bundle_target} (edgekit deploy --validate) to measure the target. "
                     f"Host: {host_reason}.")
    backend_note = None
    if branch.backend == "onnxruntime":
        backend_note = ("ONNX Runtime ran on the CPU (its CPU execution provider). The bundle's target runs a TensorRT engine on "
                        "its GPU, which is what the budgets and edgekit plan's predictions are for: build the engine on the "
                        "target (./build_engine.sh in the bundle, or edgekit build-engine) and validate with --backend tensorrt.")
    report: dict[str, Any] = {
        "format": FORMAT,
        "created": created,
        "passed": not breached,
        "breached": breached,
        "bundle": {"path": str(bundle.resolve()), "name": name, "model": manifest.get("model"), "target": bundle_target,
                   "context_length": branch.context_length, "edgekit_version": manifest.get("edgekit_version")},
        "budgets": checks,
        "host": {**host, "load_average_end": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
                 "target": host_target, "is_target": is_target, "target_match": host_reason, "note": host_note},
        "settings": {
            "backend_requested": backend, "backend": branch.backend, "backend_note": backend_note, "threads": threads,
            "concurrency": concurrency,
            "requests": n_requests, "warmup": warmup, "max_new_tokens": max_new_tokens,
            "decoding": "greedy (C sampler, temperature 0); end-of-sequence ignored: every request generates max_new_tokens",
            "prompts": {**prompt_source, "count": len(prompt_list), "tokens": _rounded(summarize([float(n) for n in lengths]), 2),
                        "origins": [p.origin for p in prompt_list]},
            "quantiles": QUANTILE_DEFINITION,
            "ttft": "from a request's start (new session, empty KV cache) to its first token chosen: prefill + first sampling",
            "tpot": "time between consecutive tokens of a request: one decode step + sampling",
            "concurrency_semantics": "closed loop: N worker threads, each with its own sessions on the one loaded branch; "
                                     "all start together with one request each, then each starts its next request as soon as "
                                     "its previous one ends",
        },
        "load_seconds": round(load_seconds, 3),
        "latency": latency,
        "streams": streams,
        "memory": memory_report,
        "power": power,
        "predicted": predicted,
        "requests": per_request,
    }
    write_report(report, out)  # adds report["report"]: the paths written
    return report


__all__ = [
    "BUDGET_KEYS", "DEFAULT_MAX_NEW_TOKENS", "DEFAULT_PROMPTS", "DEFAULT_PROMPT_TOKENS", "DEFAULT_REQUESTS", "DEFAULT_WARMUP",
    "FORMAT", "PeakMemory", "Prompt", "ValidateError", "check_budgets", "default_prompts", "detect_host_target",
    "encode_prompts", "host_info", "parse_l4t_release", "predictions", "read_prompts_file", "run_requests", "summarize",
    "validate_bundle",
]
