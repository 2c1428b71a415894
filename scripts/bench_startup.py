#!/usr/bin/env python3
"""Start-up of `edgekit run`: time from process start to the first token on stdout.

For each mode it starts ``python -m edgekit run BUNDLE --prompt P --stream`` ``--runs`` times
(one process after the other, the first run unmeasured to warm the page cache) and takes the
time from just before the process is spawned to the first byte of generated text on its stdout
(``--stream`` prints text as it is decoded; click flushes each piece). Modes:

* ``new``: the runtime as it is (the bundle tokenizer on ``tokenizers``, the graph inspected
  without ``onnx``);
* ``old``: the same command with the runtime's two former start-up paths put back in the
  child process before the CLI runs: the tokenizer from ``transformers.AutoTokenizer`` (which
  imports torch) and the graph inspection through ``onnx.load``. Everything else is identical,
  so the difference is what the change removed.

It also times, in fresh processes (median of ``--runs``), the import of the modules the run
path loads before the first token (the CLI, the runtime, onnxruntime, numpy, tokenizers), and
``from transformers import AutoTokenizer`` alone, the import the change removed.

    python scripts/bench_startup.py [--bundle DIR] [--runs 7] [--out results]

The default bundle is the default recipe's (``edgekit compress recipes/smollm2_to_orin_nano.yaml``).
Writes <out>/bench_startup.json and <out>/bench_startup.md. Goal: first token < 1.5 s after the
process starts on 2 cores. Numbers are from the machine that runs it and whatever else it runs
at the time (see load_average).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edgekit.yamlio import atomic_write_json, atomic_write_text  # noqa: E402

DEFAULT_BUNDLE = REPO / "runs" / "smollm2-to-orin-nano" / "stages" / "11-bundle" / "smollm2-to-orin-nano"
PROMPT = "The for statement is used to iterate over"
GOAL_S = 1.5

# The former start-up paths, reinstated in the child before the CLI runs (mode "old").
OLD_PATH = textwrap.dedent(
    """\
    import edgekit.runtime.backends.common as backends_common
    import edgekit.runtime.backends.ort as backends_ort

    def _load_tokenizer(bundle_dir):
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(bundle_dir), trust_remote_code=False)

    def _appends_in_place(graph, presents):
        import onnx
        if graph.stat().st_size > 64 << 20:
            return False
        model = onnx.load(str(graph), load_external_data=False)
        made = {o for n in model.graph.node if n.op_type == "GroupQueryAttention" for o in n.output}
        return bool(presents) and all(p in made for p in presents)

    backends_common.load_tokenizer = _load_tokenizer
    backends_ort.appends_in_place = _appends_in_place
    """
)
RUN_CLI = "import runpy, sys\nsys.argv = ['edgekit'] + sys.argv[1:]\nrunpy.run_module('edgekit', run_name='__main__')\n"
RUNTIME_IMPORTS = ("import edgekit.cli, edgekit.api, edgekit.recipe, edgekit.runtime.bundle, edgekit.runtime.backends, "
                   "edgekit.runtime.router, edgekit.runtime.tokenizer, edgekit.runtime.fastpath, onnxruntime, numpy, tokenizers")


def first_token_s(bundle: Path, mode: str, max_new_tokens: int) -> dict:
    code = (OLD_PATH if mode == "old" else "") + RUN_CLI
    argv = [sys.executable, "-c", code, "run", str(bundle), "--prompt", PROMPT, "--stream", "--max-new-tokens", str(max_new_tokens),
            "--backend", "onnxruntime"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)
    first = proc.stdout.read(1)
    first_at = time.perf_counter() - started
    rest, err = proc.communicate()
    total = time.perf_counter() - started
    if proc.returncode != 0 or not first:
        raise SystemExit(f"edgekit run failed ({mode}, exit {proc.returncode}): {err.decode(errors='replace')[-2000:]}")
    route = err.decode(errors="replace").strip().splitlines()[-1]
    return {"first_token_s": first_at, "total_s": total, "route": route}


def import_s(code: str) -> float:
    """Seconds a fresh interpreter spends on ``code`` (measured inside it, so the
    interpreter's own start-up is not counted)."""
    probe = f"import time\nt = time.perf_counter()\n{code}\nprint(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def interpreter_s() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - started


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--modes", default="new,old")
    parser.add_argument("--out", type=Path, default=REPO / "results")
    args = parser.parse_args()
    if not (args.bundle / "manifest.json").is_file():
        raise SystemExit(f"no bundle at {args.bundle}: run `edgekit compress recipes/smollm2_to_orin_nano.yaml` first")

    modes = [m for m in args.modes.split(",") if m]
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for mode in modes:
        first_token_s(args.bundle, mode, args.max_new_tokens)  # warm the page cache
    for _ in range(args.runs):  # interleaved, so a busy moment hits both modes alike
        for mode in modes:
            runs[mode].append(first_token_s(args.bundle, mode, args.max_new_tokens))
            print(f"{mode}: first token {runs[mode][-1]['first_token_s']:.3f} s", file=sys.stderr)

    imports = {
        "runtime_import_s": [import_s(RUNTIME_IMPORTS) for _ in range(args.runs)],
        "transformers_autotokenizer_import_s": [import_s("from transformers import AutoTokenizer") for _ in range(args.runs)],
        "interpreter_start_s": [interpreter_s() for _ in range(args.runs)],
    }
    summary = {mode: {"first_token_s_median": median([r["first_token_s"] for r in rs]),
                      "first_token_s_min": min(r["first_token_s"] for r in rs),
                      "first_token_s_max": max(r["first_token_s"] for r in rs),
                      "total_s_median": median([r["total_s"] for r in rs]),
                      "runs": rs}
               for mode, rs in runs.items()}
    report = {
        "benchmark": "edgekit run start-up: process start -> first token on stdout",
        "command": " ".join(["python", "scripts/bench_startup.py", "--bundle", str(args.bundle), "--runs", str(args.runs)]),
        "bundle": str(args.bundle),
        "prompt": PROMPT,
        "max_new_tokens": args.max_new_tokens,
        "goal_s": GOAL_S,
        "machine": {"cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                    "python": platform.python_version(), "platform": platform.platform(), "load_average": os.getloadavg()},
        "modes": summary,
        "imports": {k: {"median": median(v), "runs": v} for k, v in imports.items()},
        "goal_met": "new" in summary and summary["new"]["first_token_s_median"] < GOAL_S,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "bench_startup.json", report)
    atomic_write_text(args.out / "bench_startup.md", markdown(report))
    print(markdown(report))


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# `edgekit run` start-up: process start to first token",
        "",
        f"`{report['command']}` — {m['cpus']} CPUs (affinity {m['affinity']}), Python {m['python']}, "
        f"load average {', '.join(f'{x:.2f}' for x in m['load_average'])} at the end. Median of "
        f"{len(next(iter(report['modes'].values()))['runs'])} runs each, interleaved; the goal is < {report['goal_s']} s.",
        "",
        "| runtime | first token (median) | min | max | whole run (median) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    names = {"new": "now: bundle tokenizer on `tokenizers`, graph read without `onnx`",
             "old": "before: `AutoTokenizer` (transformers + torch) and `onnx.load`"}
    for mode, s in report["modes"].items():
        lines.append(f"| {names.get(mode, mode)} | {s['first_token_s_median']:.2f} s | {s['first_token_s_min']:.2f} s | "
                     f"{s['first_token_s_max']:.2f} s | {s['total_s_median']:.2f} s |")
    i = report["imports"]
    lines += [
        "",
        "| import, in a fresh interpreter (median) | seconds |",
        "| --- | ---: |",
        f"| the run path's modules now (CLI, runtime, onnxruntime, numpy, tokenizers) | {i['runtime_import_s']['median']:.3f} |",
        f"| `from transformers import AutoTokenizer` (what the old path added) | {i['transformers_autotokenizer_import_s']['median']:.3f} |",
        f"| the interpreter itself (`python -c pass`, whole process) | {i['interpreter_start_s']['median']:.3f} |",
        "",
        f"Goal met: **{'yes' if report['goal_met'] else 'no'}**. The first token is the first byte `edgekit run --stream` "
        f"writes; the time includes the interpreter's start, the imports, reading the bundle, creating the ONNX Runtime "
        f"session and the prefill of a {len(report['prompt'].split())}-word prompt.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
