#!/usr/bin/env python3
"""The fused ONNX Runtime graph (edgekit.export.ort_fused) against optimum's export, CPU.

Models: small = the default bundle's GPTQ INT4 checkpoint (SmolLM2-135M pruned to MLP 640,
`runs/smollm2-to-orin-nano/stages/07-quantize`); large = SmolLM2-135M float
(`runs/smollm2-135m-large/stages/01-load`). The optimum graphs are the existing bundles'
(`11-bundle`, `04-bundle`), read as they are. The fused graphs are built from the same
checkpoints into a scratch directory (`--work`, default /tmp/edgekit-bench-fused; never
runs/), each next to a copy of its bundle's small files so the runtime loads it as a bundle.

Fused variants of the small model: ``acc0`` (float32 MatMulNBits compute and float lm_head:
the same numbers as the optimum graph), ``acc4`` (int8 activations in MatMulNBits, as
ONNX Runtime GenAI's CPU INT4 models do), ``acc4+lm8`` (and an 8-bit lm_head).

Measured:
(1) decode tokens/s, greedy, 96 new tokens after 4 held-out prompts (those of
    scripts/bench_runtime.py), one branch at a time through the Router, ONNX Runtime
    intra-op threads as OnnxRuntimeBranch sets them (ONNX Runtime's default). The machine
    is shared: the graphs take turns prompt by prompt (the order rotates), the number is
    the median over rounds x prompts, and the load average is recorded.
(1b) paired decode-step latency: one step of each graph in turn, so that all see the same
    load (the most robust comparison on a busy machine).
(2) held-out perplexity (the recipe's protocol: last 8192 tokens, windows of 512) of every
    graph, fused vs optimum.
(3) speculative decoding (fused small drafts, fused large verifies; Router "speculative",
    draft 1..6): tokens/s, acceptance, and whether the output is token-identical to
    large-only. Goal (issue #6): >= 1.5x large-only with identical output.

    python scripts/bench_fused.py [--rounds 3] [--work /tmp/edgekit-bench-fused] [--skip-build]

Writes results/bench_fused.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

from bench_common import shown  # scripts/ is on sys.path when a script runs

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "results"
SMALL_CHECKPOINT = REPO / "runs/smollm2-to-orin-nano/stages/07-quantize"
SMALL_BUNDLE = REPO / "runs/smollm2-to-orin-nano/stages/11-bundle/smollm2-to-orin-nano"
LARGE_CHECKPOINT = REPO / "runs/smollm2-135m-large/stages/01-load"
LARGE_BUNDLE = REPO / "runs/smollm2-135m-large/stages/04-bundle/smollm2-135m-large"
RESULT_NAME = "bench_fused"

# name -> (checkpoint, bundle whose tokenizer/configs it borrows, build_fused_decoder options)
FUSED = {
    "fused-small": (SMALL_CHECKPOINT, SMALL_BUNDLE, {}),
    "fused-small acc4": (SMALL_CHECKPOINT, SMALL_BUNDLE, {"accuracy_level": 4}),
    "fused-small acc4+lm8": (SMALL_CHECKPOINT, SMALL_BUNDLE, {"accuracy_level": 4, "lm_head_bits": 8}),
    "fused-large": (LARGE_CHECKPOINT, LARGE_BUNDLE, {}),
}
OPTIMUM = {"optimum-small": SMALL_BUNDLE, "optimum-large": LARGE_BUNDLE}


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def build(work: Path, skip: bool) -> dict:
    """Each fused graph as a scratch bundle: <work>/<slug>/ with the bundle's small files and a
    manifest whose only ONNX variant is the fused graph."""
    from edgekit.export.ort_fused import build_fused_decoder

    reports = {}
    for name, (checkpoint, bundle, options) in FUSED.items():
        target = work / name.replace(" ", "_").replace("+", "_")
        report_path = target / "fused-report.json"
        if skip and report_path.is_file():
            reports[name] = json.loads(report_path.read_text())
            continue
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        for path in bundle.iterdir():
            if path.is_file() and not path.name.startswith("model.onnx") and path.suffix != ".tar":
                shutil.copy2(path, target / path.name)
        start = time.perf_counter()
        report = build_fused_decoder(checkpoint, target, **options)
        report["build_seconds"] = round(time.perf_counter() - start, 1)
        report["options"] = options
        report["checkpoint"] = shown(checkpoint)
        manifest = json.loads((target / "manifest.json").read_text())
        manifest["onnx"]["variants"] = {"onnxruntime": "model.onnx"}
        manifest.pop("files", None)  # the copied file table no longer describes this directory
        (target / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        report_path.write_text(json.dumps(report, indent=2) + "\n")
        reports[name] = report
        print(f"  built {name}: {report['nodes']} nodes, {report['bytes'] / 1e6:.1f} MB in {report['build_seconds']} s", flush=True)
    return reports


def _prompts(tokenizer, count: int) -> list[list[int]]:
    sys.path.insert(0, str(REPO / "scripts"))
    from bench_runtime import _eval_windows

    pairs = _eval_windows(tokenizer, 120)  # the same prompts as scripts/bench_runtime.py (b)
    step = max(1, len(pairs) // count)
    return [pairs[i * step][0] for i in range(count)]


def _rotated(items: list, shift: int) -> list:
    shift %= len(items)
    return items[shift:] + items[:shift]


def _interleaved(routers: dict, prompts: list[list[int]], rounds: int, label) -> tuple[dict, list]:
    """Every router on every prompt, ``rounds`` times; the order of the routers rotates per
    (round, prompt), so a change in the machine's load hits every configuration alike."""
    results: dict = {key: [] for key in routers}
    loads = []
    for router in routers.values():
        router.generate(prompts[0][:8], max_new_tokens=4)  # warm-up: first calls allocate
    for r in range(rounds):
        for index, prompt in enumerate(prompts):
            for key in _rotated(list(routers), r * len(prompts) + index):
                results[key].append((index, routers[key].generate(prompt)))
            loads.append(_load())
        print(f"  round {r + 1}: " + ", ".join(f"{label(k)} {statistics.median(x.tokens_per_s for _, x in v):.1f}"
                                             for k, v in results.items()) + f" tok/s (load {loads[-1][0]})", flush=True)
    return results, loads


def bench_decode(branches: dict, prompts: list[list[int]], rounds: int, new_tokens: int) -> dict:
    from edgekit.runtime.router import Router

    routers = {name: Router(branch, None, "small_only", max_new_tokens=new_tokens) for name, branch in branches.items()}
    results, loads = _interleaved(routers, prompts, rounds, str)
    tokens = {name: [x.tokens for i, x in sorted(runs, key=lambda item: item[0])[::rounds]] for name, runs in results.items()}
    rows = []
    for name, runs in results.items():
        rates = [x.tokens_per_s for _, x in runs]
        rows.append({
            "graph": name,
            "decode_tokens_per_s": round(statistics.median(rates), 2),
            "min": round(min(rates), 2), "max": round(max(rates), 2),
            "ttft_ms": round(statistics.median(x.ttft_s * 1000 for _, x in runs), 1),
            "samples": len(rates),
            "same_tokens_as": [other for other in results if other != name and tokens[other] == tokens[name]],
        })
    return {"rows": rows, "prompts": len(prompts), "max_new_tokens": new_tokens, "rounds": rounds, "load_average": loads}


def bench_steps(branches: dict, prompt: list[int], steps: int) -> dict:
    """Paired step latency: one greedy decode step of each graph in turn, ``steps`` times
    (each graph continues its own sequence): the load seen by each graph is nearly the same."""
    import numpy as np

    sessions = {name: branch.session() for name, branch in branches.items()}
    times: dict[str, list[float]] = {name: [] for name in branches}
    last = {}
    for name, session in sessions.items():
        last[name] = int(session.feed(prompt)[-1].argmax())
    loads = [_load()]
    for step in range(steps):
        for name in _rotated(list(sessions), step):
            start = time.perf_counter()
            logits = sessions[name].feed([last[name]])
            times[name].append(time.perf_counter() - start)
            last[name] = int(logits[-1].argmax())
    loads.append(_load())
    for session in sessions.values():
        session.close()
    return {"steps": steps, "prompt_tokens": len(prompt), "load_average": loads,
            "rows": [{"graph": name, "step_ms_median": round(statistics.median(t) * 1000, 2),
                      "step_ms_p10": round(float(np.percentile(t, 10)) * 1000, 2),
                      "step_ms_p90": round(float(np.percentile(t, 90)) * 1000, 2)} for name, t in times.items()]}


def bench_perplexity(paths: dict[str, Path]) -> dict:
    from edgekit.measure.perplexity import perplexity_onnx
    from edgekit.weights.checkpoint import load_tokenizer
    from edgekit.models.text import resolve_text_source, tokenize_splits

    tokenizer = load_tokenizer(SMALL_BUNDLE)
    text = resolve_text_source("builtin:python-docs").read()
    held = tokenize_splits(text, tokenizer, eval_tokens=8192, window=512).evaluation
    out = {}
    for name, path in paths.items():
        start = time.perf_counter()
        result = perplexity_onnx(path, held, window=512)
        out[name] = {"perplexity": result["perplexity"], "tokens": result["tokens"], "seconds": round(time.perf_counter() - start, 1)}
        print(f"  perplexity {name}: {result['perplexity']:.5f}", flush=True)
    return out


def bench_speculative(drafts: dict, large, prompts: list[list[int]], rounds: int, new_tokens: int, drafts_k: range,
                      optimum_large=None) -> dict:
    from edgekit.runtime.router import Router

    routers = {("large_only", None, 0): Router(None, large, "large_only", max_new_tokens=new_tokens)}
    if optimum_large is not None:  # the baseline before this work: optimum's large graph alone
        routers[("large_only", "optimum-large", 0)] = Router(None, optimum_large, "large_only", max_new_tokens=new_tokens)
    for draft, branch in drafts.items():
        for k in drafts_k:
            routers[("speculative", draft, k)] = Router(branch, large, "speculative", max_new_tokens=new_tokens, draft_tokens=k)
    results, loads = _interleaved(routers, prompts, rounds, lambda key: (
        f"large-only ({key[1] or 'fused-large'})" if key[0] == "large_only" else f"{key[1]} k={key[2]}"))

    def tokens_of(runs):
        return [x.tokens for _, x in sorted(runs, key=lambda item: item[0])[::rounds]]

    reference = tokens_of(results[("large_only", None, 0)])
    base = statistics.median(x.tokens_per_s for _, x in results[("large_only", None, 0)])
    rows = []
    for (policy, draft, k), runs in results.items():
        rate = statistics.median(x.tokens_per_s for _, x in runs)
        row = {"policy": policy, "draft": draft if policy == "speculative" else None,
               "large": draft if policy == "large_only" and draft else "fused-large", "draft_tokens": k or None,
               "decode_tokens_per_s": round(rate, 2),
               "speedup_vs_large_only": round(rate / base, 3), "identical_to_large_only": tokens_of(runs) == reference,
               "ttft_ms": round(statistics.median(x.ttft_s * 1000 for _, x in runs), 1), "samples": len(runs)}
        if policy == "speculative":
            row["acceptance_rate"] = round(statistics.mean(x.acceptance_rate for _, x in runs), 3)
            row["tokens_per_large_call"] = round(statistics.mean(
                len(x.tokens) / max(1, x.speculative["large_calls"] - 1) for _, x in runs), 2)
        rows.append(row)
    return {"rows": rows, "large": "fused-large", "rounds": rounds, "load_average": loads, "reference_tokens": reference}


def _optimum_of(graph: str) -> str:
    """The optimum graph of the same model: what every table compares a graph with."""
    return "optimum-large" if "large" in graph else "optimum-small"


def write_report(data: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{RESULT_NAME}.json").write_text(json.dumps(data, indent=2) + "\n")
    lines = ["# Fused ONNX Runtime graph vs optimum's export (CPU)", "",
             f"{data['machine']}; onnxruntime {data['onnxruntime']}, intra-op threads as OnnxRuntimeBranch sets them (ONNX "
             "Runtime's default, one per physical core), no spinning. Generated by `scripts/bench_fused.py`. Configurations "
             "alternate in rounds so that whatever else the machine runs hits them alike; numbers are medians over rounds x "
             f"prompts; load averages (1 min) during the runs: {data['load_summary']}.", ""]
    lines += ["## Graphs", "", "| graph | nodes | MB on disk | lm_head | MatMulNBits accuracy_level | built from |",
              "|---|---:|---:|---|---:|---|"]
    for name, g in data["graphs"].items():
        lines.append(f"| {name} | {g['nodes']} | {g['bytes'] / 1e6:.1f} | {g['lm_head']} | {g.get('accuracy_level', 0)} | `{g['source']}` |")
    if "decode" in data:
        d = data["decode"]
        lines += ["", "## (1) Decode speed, greedy, one branch", "",
                  f"{d['prompts']} held-out prompts, {d['max_new_tokens']} new tokens, {d['rounds']} rounds; the graphs take "
                  "turns prompt by prompt (rotating order); medians (min-max) over rounds x prompts.", "",
                  "| graph | decode tok/s | range | TTFT ms | vs optimum of the same model | same tokens as |", "|---|---:|---|---:|---:|---|"]
        rate = {r["graph"]: r["decode_tokens_per_s"] for r in d["rows"]}
        for r in d["rows"]:
            base = rate[_optimum_of(r["graph"])]
            lines.append(f"| {r['graph']} | {r['decode_tokens_per_s']:.1f} | {r['min']:.1f}-{r['max']:.1f} | {r['ttft_ms']:.0f} | "
                         f"{r['decode_tokens_per_s'] / base:.2f}x | {', '.join(r['same_tokens_as']) or '-'} |")
    if "steps" in data:
        st = data["steps"]
        lines += ["", "## (1b) Paired decode-step latency", "",
                  f"One greedy step of each graph in turn, {st['steps']} times after a {st['prompt_tokens']}-token prompt "
                  "(each graph continues its own sequence), so every graph sees nearly the same load.", "",
                  "| graph | step ms (median) | p10-p90 | tok/s at the median | vs optimum of the same model |", "|---|---:|---|---:|---:|"]
        step = {r["graph"]: r["step_ms_median"] for r in st["rows"]}
        for r in st["rows"]:
            base = step[_optimum_of(r["graph"])]
            lines.append(f"| {r['graph']} | {r['step_ms_median']:.2f} | {r['step_ms_p10']:.1f}-{r['step_ms_p90']:.1f} | "
                         f"{1000 / r['step_ms_median']:.1f} | {base / r['step_ms_median']:.2f}x |")
    if "perplexity" in data:
        p = data["perplexity"]
        lines += ["", "## (2) Held-out perplexity", "", "Last 8192 tokens of the stdlib docs, windows of 512 (the recipes' protocol).", "",
                  "| graph | perplexity | relative to optimum of the same model |", "|---|---:|---:|"]
        for name, r in p.items():
            base = p[_optimum_of(name)]["perplexity"]
            lines.append(f"| {name} | {r['perplexity']:.4f} | {r['perplexity'] / base - 1:+.2e} |")
    if "speculative" in data:
        s = data["speculative"]
        lines += ["", "## (3) Speculative decoding (fused large verifies)", "",
                  f"Same prompts, {s['rounds']} rounds, configurations taking turns prompt by prompt; medians. \"vs large-only\" "
                  "is against the fused large graph alone (the same model and graph that verifies); optimum's large graph alone "
                  "is listed too. Goal (issue #6): >= 1.5x large-only with identical output.", "",
                  "| mode | draft graph | decode tok/s | vs large-only | TTFT ms | acceptance | tokens per large call | identical to large-only |",
                  "|---|---|---:|---:|---:|---:|---:|---|"]
        for r in s["rows"]:
            mode = f"large-only ({r.get('large', 'fused-large')})" if r["policy"] == "large_only" else f"speculative k={r['draft_tokens']}"
            lines.append(f"| {mode} | {r['draft'] or '-'} | {r['decode_tokens_per_s']:.1f} | {r['speedup_vs_large_only']:.2f}x | "
                         f"{r['ttft_ms']:.0f} | {r.get('acceptance_rate', float('nan')):.2f} | {r.get('tokens_per_large_call', float('nan')):.2f} | "
                         f"{'yes' if r['identical_to_large_only'] else 'NO'} |")
        best = max((r for r in s["rows"] if r["policy"] == "speculative"), key=lambda r: r["speedup_vs_large_only"])
        optimum = next((r for r in s["rows"] if r.get("large") == "optimum-large"), None)
        lines += ["", f"Best: {best['draft']} drafting k={best['draft_tokens']}: {best['speedup_vs_large_only']:.2f}x the fused large "
                  f"graph alone" + (f", {best['decode_tokens_per_s'] / optimum['decode_tokens_per_s']:.2f}x optimum's large graph alone"
                                    if optimum else "")
                  + f" ({'identical' if best['identical_to_large_only'] else 'NOT identical'} output; goal >= 1.5x)."]
    (RESULTS / f"{RESULT_NAME}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgekit-bench-fused"), help="scratch directory (not runs/)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--skip-build", action="store_true", help="reuse graphs already built in --work")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--skip-steps", action="store_true")
    parser.add_argument("--steps", type=int, default=64, help="paired decode steps per graph")
    parser.add_argument("--skip-perplexity", action="store_true")
    parser.add_argument("--skip-speculative", action="store_true")
    parser.add_argument("--drafts", default="fused-small,fused-small acc4+lm8", help="comma-separated fused small graphs to draft with")
    args = parser.parse_args()
    os.environ.setdefault("OPENVINO_TELEMETRY_OPT_OUT", "1")
    work = args.work.resolve()
    if work.is_relative_to(REPO / "runs"):
        raise SystemExit("--work must not be inside runs/")
    import onnxruntime

    from edgekit.runtime.backends import OnnxRuntimeBranch

    path = RESULTS / f"{RESULT_NAME}.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(machine=f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
                onnxruntime=onnxruntime.__version__)
    print("building fused graphs", flush=True)
    reports = build(work, args.skip_build)
    dirs = {name: work / name.replace(" ", "_").replace("+", "_") for name in FUSED}
    graphs = {}
    for name, bundle in OPTIMUM.items():
        from edgekit.export.onnx_export import describe

        info = describe(bundle / "model.onnx")
        graphs[name] = {"nodes": info["nodes"], "bytes": sum(p.stat().st_size for p in bundle.glob("model.onnx*")),
                        "lm_head": "float32 MatMul (Transpose of the tied embedding)", "source": shown(bundle)}
    for name, report in reports.items():
        graphs[name] = {"nodes": report["nodes"], "bytes": report["bytes"], "lm_head": report["lm_head"],
                        "accuracy_level": report["accuracy_level"], "ops": report["ops"], "source": report["checkpoint"],
                        "build_seconds": report.get("build_seconds")}
    data["graphs"] = graphs
    branches = {name: OnnxRuntimeBranch(bundle, name=name) for name, bundle in OPTIMUM.items()}
    branches.update({name: OnnxRuntimeBranch(d, name=name) for name, d in dirs.items()})
    prompts = _prompts(branches["optimum-small"].tokenizer, args.prompts)
    loads = []
    if not args.skip_decode:
        print("(1) decode speed", flush=True)
        data["decode"] = bench_decode(branches, prompts, args.rounds, args.new_tokens)
        loads += data["decode"]["load_average"]
    if not args.skip_steps:
        print("(1b) paired step latency", flush=True)
        data["steps"] = bench_steps(branches, prompts[0], args.steps)
        loads += data["steps"]["load_average"]
    if not args.skip_perplexity:
        print("(2) perplexity", flush=True)
        paths = {name: bundle / "model.onnx" for name, bundle in OPTIMUM.items()}
        paths.update({name: d / "model.onnx" for name, d in dirs.items()})
        data["perplexity"] = bench_perplexity(paths)
    if not args.skip_speculative:
        print("(3) speculative", flush=True)
        drafts = {name: branches[name] for name in args.drafts.split(",")}
        data["speculative"] = bench_speculative(drafts, branches["fused-large"], prompts, args.rounds, args.new_tokens, range(1, 7),
                                                optimum_large=branches["optimum-large"])
        loads += data["speculative"]["load_average"]
    if loads:
        ones = [load[0] for load in loads]
        data["load_summary"] = f"median {statistics.median(ones):.2f}, range {min(ones):.2f}-{max(ones):.2f} on {os.cpu_count()} cores"
    data.setdefault("load_summary", "not measured")
    write_report(data)
    print((RESULTS / f"{RESULT_NAME}.md").read_text())


if __name__ == "__main__":
    main()
