"""Measure `edgekit serve` against `edgekit run` on a bundle (docs/serve.md, "Measured").

    python scripts/bench_serve.py runs/smollm2-to-orin-nano/stages/11-bundle/smollm2-to-orin-nano

1. `edgekit serve BUNDLE --port 0 --max-concurrency 4` runs as a subprocess throughout.
2. ``--repeats`` times, interleaved: `edgekit run BUNDLE --prompt P --max-new-tokens 64
   --temperature 0 --json` (the router's decode tokens/s and TTFT; a fresh process, so a cold
   model), the same generation on a warm router in this process (no HTTP), then the same
   request to the server, streamed: the router's tokens/s (the response's ``edgekit.tokens_per_s``, the
   same measure as `run`) and the client's own, (chunks - 1) / (last chunk - first chunk), and
   TTFT as the client sees it.
3. Throughput: C = 1, 2, 4 clients each sending that request back to back for ``--duration``
   seconds: generated tokens per second over all clients, per-request decode rate, TTFT.

Prints a Markdown table and writes the raw numbers as JSON (``--json``).

``--curve``: batched decoding (docs/serve.md, "Batched decoding"). Two servers on the bundle,
``--max-concurrency 8`` both, one with ``batching.max_batch 8`` and one with batching off
(``max_batch 1``), each a subprocess of this script (``--child``). For 1, 2, 4 and 8 streams
(``--streams``), ``--rounds`` times, the two take turns: each stream sends the request back
to back for ``--curve-duration`` seconds; measured are the aggregate tokens/s (completion tokens
of all streams / wall time) and every request's TPOT as its client sees it ((last chunk - first
chunk) / (chunks - 1)), p50 and p99 over the requests. Writes results/<name>.{json,md,png}
(``--name``, default bench_serve_batching).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

PROMPT = "A for statement iterates over"


def run_cli(bundle: str, max_tokens: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "edgekit", "run", bundle, "--prompt", PROMPT, "--max-new-tokens", str(max_tokens),
                          "--temperature", "0", "--json"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def stream_once(url: str, max_tokens: int) -> dict:
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
    times, final, use = [], None, None
    for line in resp:
        line = line.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        if event.get("usage"):
            use = event["usage"]
        if event["choices"] and event["choices"][0]["text"]:
            times.append(time.perf_counter())
        if event["choices"] and event["choices"][0]["finish_reason"]:
            final = event
    conn.close()
    end = time.perf_counter()
    # client-side time per output token: (last chunk - first chunk) / (chunks - 1)
    tpot = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
    return {"ttft_s": times[0] - t0, "client_tokens_per_s": 1.0 / tpot if tpot else None, "tpot_s": tpot,
            "router_tokens_per_s": final["edgekit"]["tokens_per_s"], "completion_tokens": use["completion_tokens"],
            "seconds": end - t0}


def drive(clients: int, duration: float, request) -> tuple[list, list, float]:
    """``clients`` threads each calling ``request()`` back to back for ``duration`` seconds:
    (results, errors, wall seconds)."""
    stop_at = time.monotonic() + duration
    results, errors = [], []

    def client():
        while time.monotonic() < stop_at:
            try:
                results.append(request())
            except Exception as exc:  # reported, not hidden
                errors.append(repr(exc))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors, time.perf_counter() - t0


def throughput(url: str, clients: int, duration: float, max_tokens: int) -> dict:
    results, errors, wall = drive(clients, duration, lambda: stream_once(url, max_tokens))
    tokens = sum(r["completion_tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "errors": errors, "wall_s": wall, "tokens": tokens,
            "tokens_per_s": tokens / wall, "per_request_tokens_per_s": statistics.mean(r["client_tokens_per_s"] for r in results if r["client_tokens_per_s"]),
            "ttft_p50_s": statistics.median(r["ttft_s"] for r in results)}


def child_server(bundle: str, max_batch: int, streams: int) -> None:
    """``--child``: serve the bundle with batching.max_batch = ``max_batch``; prints the URL."""
    from edgekit.runtime.bundle import resolve_config
    from edgekit.runtime.config import BatchingConfig
    from edgekit.serve.server import ServeOptions, serve

    config = resolve_config(bundle)
    config = config.model_copy(update={"batching": BatchingConfig(max_batch=max_batch, max_wait_ms=config.batching.max_wait_ms)})
    options = ServeOptions(port=0, max_concurrency=streams, max_queue=64, access_log=False)
    serve(bundle, options, config=config, on_ready=lambda server: print(server.url, flush=True))


def start_child(bundle: str, max_batch: int, streams: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, __file__, bundle, "--child", "--max-batch", str(max_batch),
                             "--child-streams", str(streams)], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    match = re.search(r"http://\S+", line)
    if match is None:
        proc.kill()
        raise RuntimeError(f"the server with max_batch {max_batch} did not start: {line!r}")
    return proc, match.group(0)


def timed_stream(url: str, max_tokens: int) -> dict:
    """One streamed request: its completion tokens and client-side TPOT."""
    once = stream_once(url, max_tokens)
    return {"completion_tokens": once["completion_tokens"], "tpot_s": once["tpot_s"]}


def closed_loop(url: str, streams: int, duration: float, max_tokens: int) -> dict:
    """``streams`` clients sending the request back to back for ``duration`` seconds."""
    results, errors, wall = drive(streams, duration, lambda: timed_stream(url, max_tokens))
    tokens = sum(r["completion_tokens"] for r in results)
    return {"requests": len(results), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "tpot_s": [r["tpot_s"] for r in results if r["tpot_s"] is not None], "errors": errors}


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def curve(args) -> None:
    from pathlib import Path

    streams = [int(c) for c in args.streams.split(",")]
    modes = {"on": 8, "off": 1}
    report: dict = {"bundle": args.bundle, "cpus": os.cpu_count(), "load_average_start": os.getloadavg(),
                    "max_tokens": args.max_tokens, "duration_s": args.curve_duration, "rounds": args.rounds,
                    "streams": streams, "max_batch": modes, "runs": []}
    servers = {mode: start_child(args.bundle, max_batch, max(streams)) for mode, max_batch in modes.items()}
    try:
        for mode, (_, url) in servers.items():  # warm-up, and the two must answer alike
            report.setdefault("warmup_tokens", {})[mode] = stream_once(url, 16)["completion_tokens"]
        for round_index in range(args.rounds):
            for count in streams:
                order = list(modes) if round_index % 2 == 0 else list(reversed(modes))  # alternate who goes first
                for mode in order:
                    run = closed_loop(servers[mode][1], count, args.curve_duration, args.max_tokens)
                    run.update(mode=mode, streams=count, round=round_index)
                    report["runs"].append(run)
                    print(f"round {round_index} streams {count} batching {mode}: {run['tokens_per_s']:.1f} tok/s, "
                          f"{run['requests']} requests, {len(run['errors'])} errors", flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(60)
    report["load_average_end"] = os.getloadavg()
    summary = []
    for count in streams:
        for mode in modes:
            runs = [r for r in report["runs"] if r["streams"] == count and r["mode"] == mode]
            tpots = [t for r in runs for t in r["tpot_s"]]
            summary.append({"streams": count, "batching": mode, "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
                            "tpot_p50_ms": _quantile(tpots, 0.5) * 1000, "tpot_p99_ms": _quantile(tpots, 0.99) * 1000,
                            "requests": sum(r["requests"] for r in runs), "errors": sum(len(r["errors"]) for r in runs)})
    report["summary"] = summary
    one = {row["batching"]: row["tokens_per_s"] for row in summary if row["streams"] == 1}
    for row in summary:
        row["vs_one_stream"] = row["tokens_per_s"] / one[row["batching"]] if row["batching"] in one else None

    results = Path(__file__).resolve().parent.parent / "results"
    (results / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Batched decoding in `edgekit serve` (issue #18)", "",
        f"{report['cpus']} CPUs, load average {report['load_average_start'][0]:.1f} at start / "
        f"{report['load_average_end'][0]:.1f} at end. Bundle `{args.bundle}`; generated by "
        f"`python scripts/bench_serve.py BUNDLE --curve`. Two servers (`--max-concurrency {max(streams)}`): batching on "
        f"(`batching.max_batch 8`, `max_wait_ms` the bundle's) and off (`max_batch 1`), taking turns; per point "
        f"{args.rounds} round(s) of {args.curve_duration:g} s, each stream sending a {args.max_tokens}-token greedy request "
        "back to back. tok/s: completion tokens of all streams / wall time (median over rounds); TPOT: per request, "
        "(last chunk - first chunk) / (chunks - 1) at the client, quantiles over all requests.", "",
        "| streams | batching | aggregate tok/s | vs 1 stream | TPOT p50 ms | TPOT p99 ms | requests | errors |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in summary:
        lines.append(f"| {row['streams']} | {row['batching']} | {row['tokens_per_s']:.1f} | {row['vs_one_stream']:.2f}x | "
                     f"{row['tpot_p50_ms']:.1f} | {row['tpot_p99_ms']:.1f} | {row['requests']} | {row['errors']} |")
    four = next((row for row in summary if row["streams"] == 4 and row["batching"] == "on"), None)
    if four is not None:
        lines += ["", f"Goal (aggregate at 4 streams >= 2.5x one stream, batching on): "
                  f"{four['vs_one_stream']:.2f}x — {'met' if four['vs_one_stream'] >= 2.5 else 'missed'}."]
    lines += ["", f"![aggregate tokens/s and TPOT p99 by streams]({args.name}.png)", ""]
    (results / f"{args.name}.md").write_text("\n".join(lines))
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, style in (("on", "o-"), ("off", "s--")):
        rows = [row for row in summary if row["batching"] == mode]
        left.plot([r["streams"] for r in rows], [r["tokens_per_s"] for r in rows], style, label=f"batching {mode}")
        right.plot([r["streams"] for r in rows], [r["tpot_p99_ms"] for r in rows], style, label=f"batching {mode}")
    left.set(xlabel="concurrent streams", ylabel="aggregate tokens/s", xscale="log", title="throughput")
    right.set(xlabel="concurrent streams", ylabel="TPOT p99 (ms)", xscale="log", title="per-stream latency")
    for axis in (left, right):
        axis.set_xticks(streams, [str(c) for c in streams])
        axis.grid(True, alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(results / f"{args.name}.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--concurrency", default="1,2,4")
    ap.add_argument("--json", dest="json_path")
    ap.add_argument("--curve", action="store_true", help="batched decoding: the curve over --streams, batching on vs off")
    ap.add_argument("--streams", default="1,2,4,8")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--curve-duration", type=float, default=8.0)
    ap.add_argument("--name", default="bench_serve_batching", help="results/<name>.{json,md,png}")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--max-batch", type=int, default=8, help=argparse.SUPPRESS)
    ap.add_argument("--child-streams", type=int, default=8, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_server(args.bundle, args.max_batch, args.child_streams)
        return
    if args.curve:
        curve(args)
        return
    report: dict = {"load_average_start": os.getloadavg(), "cpus": os.cpu_count()}

    server = subprocess.Popen([sys.executable, "-m", "edgekit", "serve", args.bundle, "--port", "0", "--max-concurrency", "4",
                               "--max-queue", "16", "-q"], stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        url = re.search(r"http://\S+", line).group(0)
        stream_once(url, 8)  # warm-up
        from edgekit.runtime.bundle import open_router, resolve_config

        router = open_router(args.bundle, resolve_config(args.bundle))
        router.generate(PROMPT, max_new_tokens=8)  # warm-up
        # interleaved, so that all three see the same background load (the machine is shared)
        runs, warm, single = [], [], []
        for _ in range(args.repeats):
            runs.append(run_cli(args.bundle, args.max_tokens))
            warm.append(router.generate(PROMPT, max_new_tokens=args.max_tokens))
            single.append(stream_once(url, args.max_tokens))
        assert all(len(r["tokens"]) == args.max_tokens for r in runs), "the prompt must not end early (EOS)"
        assert all(s["completion_tokens"] == args.max_tokens for s in single)
        report["run"] = [{"tokens_per_s": r["tokens_per_s"], "ttft_s": r["ttft_s"]} for r in runs]
        report["router_warm"] = [{"tokens_per_s": r.tokens_per_s, "ttft_s": r.ttft_s} for r in warm]
        report["serve_single"] = single
        report["throughput"] = [throughput(url, int(c), args.duration, args.max_tokens) for c in args.concurrency.split(",")]
    finally:
        server.terminate()
        server.wait(60)
    report["load_average_end"] = os.getloadavg()

    med = statistics.median
    print(f"load average at start / end: {report['load_average_start'][0]:.1f} / {report['load_average_end'][0]:.1f} "
          f"({report['cpus']} CPUs)")
    print("| what | decode tok/s (median) | TTFT ms (median) |\n| --- | --- | --- |")
    print(f"| `edgekit run` ({args.repeats} runs, {args.max_tokens} tokens, greedy) | "
          f"{med(r['tokens_per_s'] for r in report['run']):.1f} | {med(r['ttft_s'] for r in report['run']) * 1000:.0f} |")
    print(f"| the router in-process, warm (no HTTP) | {med(r['tokens_per_s'] for r in report['router_warm']):.1f} | "
          f"{med(r['ttft_s'] for r in report['router_warm']) * 1000:.0f} |")
    print(f"| `edgekit serve`, one stream, router's measure | {med(s['router_tokens_per_s'] for s in single):.1f} | |")
    print(f"| `edgekit serve`, one stream, client's measure | {med(s['client_tokens_per_s'] for s in single if s['client_tokens_per_s']):.1f} | "
          f"{med(s['ttft_s'] for s in single) * 1000:.0f} |")
    print("\n| clients | requests | generated tok/s (all clients) | per-request tok/s | TTFT p50 ms | errors |\n"
          "| --- | --- | --- | --- | --- | --- |")
    for t in report["throughput"]:
        print(f"| {t['clients']} | {t['requests']} | {t['tokens_per_s']:.1f} | {t['per_request_tokens_per_s']:.1f} | "
              f"{t['ttft_p50_s'] * 1000:.0f} | {len(t['errors'])} |")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
