"""One validation run (:func:`validate_bundle`): options and bundle checked, the branch loaded,
warm-up and measured requests, memory, power, budgets and predictions, the report written.
The steps are described in the :mod:`edgekit.validate` docstring."""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgekit.errors import OutputError, ValidateError
from edgekit.names import check_name
from edgekit.validate.budgets import BUDGET_FLAGS, BUDGET_KEYS, check_budgets
from edgekit.validate.host import detect_host_target, host_info, host_words
from edgekit.validate.memory import PeakMemory
from edgekit.validate.predictions import predictions
from edgekit.validate.prompts import default_prompts, encode_prompts, held_out_source, read_prompts_file
from edgekit.validate.requests import latency_report, run_requests
from edgekit.validate.statistics import QUANTILE_DEFINITION, rounded, summarize

FORMAT = "edgekit.validate/1"
DEFAULT_REQUESTS = 16
DEFAULT_WARMUP = 2
DEFAULT_MAX_NEW_TOKENS = 64
TEGRASTATS_INTERVAL_MS = 200


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

    from edgekit.telemetry.tegrastats import TegrastatsRecorder
    from edgekit.validate.report import write_report

    bundle_target = manifest.get("target")
    is_target = host_target is not None and host_target == bundle_target
    if branch.backend != "onnxruntime":  # ONNX Runtime branches run on the CPU provider
        memory.watch_gpu()

    if prompt_texts is not None:
        prompt_list = encode_prompts(prompt_texts, branch.tokenizer, context_length=branch.context_length,
                                     max_new_tokens=max_new_tokens)
        prompt_source = {"source": "file", "file": str(prompts)}
    else:
        held_out = held_out_source(bundle)
        prompt_list = default_prompts(branch.tokenizer, context_length=branch.context_length, max_new_tokens=max_new_tokens,
                                      held_out=held_out)
        prompt_source = {"source": "held-out", "text": held_out.source, "held_out_tokens": held_out.tokens,
                         "chosen_by": held_out.reason,
                         "description": f"{len(prompt_list)} windows of {len(prompt_list[0].ids)} tokens at evenly spaced "
                                        f"offsets of the held-out split (the last {held_out.tokens} tokens of "
                                        f"{held_out.source}), fed as token ids"}
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
    latency, streams, per_request = latency_report(raw, concurrency=concurrency, max_new_tokens=max_new_tokens)
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
        host_note = (f"These measurements are of THIS HOST ({host_words(host)}), NOT of the bundle's target {bundle_target}. "
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
            "prompts": {**prompt_source, "count": len(prompt_list), "tokens": rounded(summarize([float(n) for n in lengths]), 2),
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
