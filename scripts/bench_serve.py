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
    return {"ttft_s": times[0] - t0, "client_tokens_per_s": (len(times) - 1) / (times[-1] - times[0]),
            "router_tokens_per_s": final["edgekit"]["tokens_per_s"], "completion_tokens": use["completion_tokens"],
            "seconds": end - t0}


def throughput(url: str, clients: int, duration: float, max_tokens: int) -> dict:
    stop_at = time.monotonic() + duration
    results, errors = [], []

    def client():
        while time.monotonic() < stop_at:
            try:
                results.append(stream_once(url, max_tokens))
            except Exception as exc:  # reported, not hidden
                errors.append(repr(exc))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(r["completion_tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "errors": errors, "wall_s": wall, "tokens": tokens,
            "tokens_per_s": tokens / wall, "per_request_tokens_per_s": statistics.mean(r["client_tokens_per_s"] for r in results),
            "ttft_p50_s": statistics.median(r["ttft_s"] for r in results)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--concurrency", default="1,2,4")
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args()
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
    print(f"| `edgekit serve`, one stream, client's measure | {med(s['client_tokens_per_s'] for s in single):.1f} | "
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
