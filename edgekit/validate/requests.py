"""The measured requests of a validation run: closed-loop greedy generations on worker
threads, timed per token, and their latency summary (TTFT, TPOT, request time, tokens/s)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from edgekit.validate.prompts import Prompt
from edgekit.validate.statistics import rounded, summarize


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
    threads (closed loop: the :mod:`edgekit.validate` docstring). Returns the raw timings."""
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


def latency_report(raw: dict[str, Any], *, concurrency: int, max_new_tokens: int) -> tuple[dict[str, Any], list[dict[str, Any]],
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
        "ttft_ms": rounded(summarize(ttft_ms)),
        "tpot_ms": rounded(summarize(tpot_ms)),
        "request_ms": rounded(summarize(e2e_ms)),
        "decode_tokens_per_s_per_stream": rounded(summarize(decode_rates), 3),
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
