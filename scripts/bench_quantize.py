#!/usr/bin/env python3
"""Quantization benchmark on SmolLM2-135M, every method side by side in one run.

For each configuration it runs the real pipeline (`edgekit compress`: load → quantize →
evaluate, each configuration in its own process so peak RSS is its own) and collects
held-out perplexity (the README's protocol: last 8192 tokens of the stdlib docs, windows
of 512), bits per weight, size on disk, quantization wall time and peak RSS. Then it
exports the float model and the GPTQ W4 g64 model to ONNX and measures greedy decode
tokens/s of ONNX Runtime (float graph vs INT4 MatMulNBits) and PyTorch eager, on the same
prompt, one after the other.

Every evaluate stage also scores the out-of-domain set (builtin:package-readmes, which no
stage calibrates or trains on): the second table gives both sets, each against the float
model on the same set. Rows ending in ``-mixed`` calibrate on builtin:mixed (the stdlib's
reference, docstrings and source; their in_domain set is that text's held-out end, compared
with ``float-mixed``). Quantization-aware distillation after GPTQ: scripts/bench_qad.py.

    python scripts/bench_quantize.py [--out results] [--samples 32] [--only gptq-g64,rtn-g64-sym] [--skip-speed]

Writes <out>/bench_quantize.json, <out>/bench_quantize.md and <out>/bench_quantize.png
(perplexity vs bits per weight). Numbers are measured on the machine that runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from bench_common import shown  # scripts/ is on sys.path when a script runs

REPO = Path(__file__).resolve().parent.parent
FLOAT_PPL_NOTE = "float reference"


#: rows whose text is not builtin:python-docs
DATA = {"float-mixed": "mixed", "gptq-g64-sym-mixed": "mixed", "gptq-g64-sym-plain-mixed": "mixed"}


def configurations(samples: int) -> list[tuple[str, str, dict | None, dict | None]]:
    """(name, target, quantize parameters or None for the float reference, export_onnx
    parameters or None for no export); DATA names the rows calibrated on other text."""
    gptq = {"method": "gptq", "bits": 4, "calibration_samples": samples}
    head = {**gptq, "group_size": 64, "symmetric": True, "quantize_lm_head": True}
    orin, workstation = "jetson-orin-nano-8gb", "workstation-rtx4090"  # FP8 needs cc >= 8.9
    ort = {"format": "onnxruntime"}
    return [
        ("float", orin, None, ort),
        ("rtn-g64-sym", orin, {"method": "rtn", "bits": 4, "group_size": 64, "symmetric": True, "clip_search": False}, None),
        ("rtn-g64-asym", orin, {"method": "rtn", "bits": 4, "group_size": 64, "symmetric": False, "clip_search": False}, None),
        ("rtn-g64-asym-clip", orin, {"method": "rtn", "bits": 4, "group_size": 64, "symmetric": False}, None),
        ("gptq-g32", orin, {**gptq, "group_size": 32}, None),
        ("gptq-g64", orin, {**gptq, "group_size": 64}, ort),
        ("gptq-g64-sym", orin, {**gptq, "group_size": 64, "symmetric": True}, None),
        # float_target (default 0.25): 0 is plain GPTQ; 0.5 and 1 aim further at the float output
        ("gptq-g64-sym-plain", orin, {**gptq, "group_size": 64, "symmetric": True, "float_target": 0.0}, None),
        ("gptq-g64-sym-ft0.5", orin, {**gptq, "group_size": 64, "symmetric": True, "float_target": 0.5}, None),
        ("gptq-g64-sym-ft1", orin, {**gptq, "group_size": 64, "symmetric": True, "float_target": 1.0}, None),
        ("gptq-g64-noactorder", orin, {**gptq, "group_size": 64, "act_order": False}, None),
        ("float-mixed", orin, None, None),
        ("gptq-g64-sym-mixed", orin, {**gptq, "group_size": 64, "symmetric": True}, None),
        ("gptq-g64-sym-plain-mixed", orin, {**gptq, "group_size": 64, "symmetric": True, "float_target": 0.0}, None),
        ("gptq-g64-sym-s64", orin, {**gptq, "group_size": 64, "symmetric": True, "calibration_samples": 4 * samples}, None),
        ("gptq-g128", orin, {**gptq, "group_size": 128}, None),
        ("gptq-w8-g64", orin, {**gptq, "bits": 8, "group_size": 64}, None),
        # lm_head is the largest matrix of a 135M model (49152 x 576): quantizing it too is
        # what makes INT4 decode fast on CPU; accuracy_level 4 = int8 activations in MatMulNBits.
        ("gptq-g64-sym-head", orin, head, ort),
        ("gptq-g64-sym-head-acc4", orin, head, {**ort, "accuracy_level": 4, "quantized_parity_tolerance": 5.0}),
        ("awq-se-g64-sym", orin, {"method": "awq", "bits": 4, "group_size": 64, "symmetric": True, "calibration_samples": samples}, None),
        ("awq-se-g64-asym", orin, {"method": "awq", "bits": 4, "group_size": 64, "symmetric": False, "calibration_samples": samples}, None),
        ("fp8-static", workstation, {"method": "fp8", "fp8_activations": "static", "calibration_samples": samples}, None),
        ("fp8-dynamic", workstation, {"method": "fp8", "fp8_activations": "dynamic", "calibration_samples": samples}, None),
    ]


def recipe_yaml(name: str, target: str, quantize: dict | None, export: dict | None = None) -> str:
    stages = ["  - type: load"]
    if quantize:
        stages.append("  - type: quantize")
        stages += [f"    {k}: {json.dumps(v)}" for k, v in quantize.items()]
    stages.append("  - type: evaluate")
    if export:
        stages.append("  - type: export_onnx")
        stages += [f"    {k}: {json.dumps(v)}" for k, v in export.items()]
        stages.append("  - type: evaluate")  # the graph's own held-out perplexity
    return textwrap.dedent(
        f"""\
        name: bench-{name}
        model: smollm2-135m
        target: {target}
        data: builtin:{DATA.get(name, "python-docs")}
        stages:
        """
    ) + "\n".join(stages) + "\n"


def run_config(work: Path, name: str, target: str, quantize: dict | None, export: dict | None) -> dict:
    recipe = work / f"{name}.yaml"
    recipe.write_text(recipe_yaml(name, target, quantize, export))
    out = work / name
    base = work / "_base" / "stages" / "01-load"
    if base.exists() and not out.exists():  # share the converted checkpoint (hard links)
        (out / "stages").mkdir(parents=True)
        shutil.copytree(base, out / "stages" / "01-load", copy_function=os.link)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "edgekit", "compress", str(recipe), "-q", "--output", str(out)], capture_output=True, text=True)
    result = {"name": name, "target": target, "quantize": quantize, "wall_seconds": round(time.perf_counter() - started, 1),
              "date": time.strftime("%Y-%m-%d")}
    if proc.returncode != 0:
        result["error"] = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
        return result
    manifest = json.loads((out / "manifest.json").read_text())
    stages = {s["name"]: s for s in manifest["stages"]}
    final = stages["evaluate"]
    result["perplexity"] = final["metrics"]["perplexity"]
    result["data"] = f"builtin:{DATA.get(name, 'python-docs')}"
    # every held-out set the evaluate stage scored (in_domain, ood): perplexity, and the source
    result["sets"] = {label: {k: v for k, v in score.items() if k in ("perplexity", "source", "sha256")}
                      for label, score in (final["metrics"].get("sets") or {}).items()}
    if quantize:
        q = stages["quantize"]["metrics"]
        result.update({k: q[k] for k in ("bits_per_weight", "checkpoint_bytes", "quantize_seconds", "peak_rss_mb", "calibration_tokens")})
        if q.get("float_target") is not None:
            result["float_target"] = q["float_target"]
    else:
        result.update({"bits_per_weight": 32.0, "checkpoint_bytes": stages["load"]["metrics"]["weights_bytes"]})
    if export:
        result["onnx_dir"] = shown(out / stages["export_onnx"]["dir"])
        result["onnx_bytes"] = stages["export_onnx"]["metrics"]["onnx_bytes"]
        result["onnx_perplexity"] = stages["evaluate-2"]["metrics"]["perplexity"]
        result["onnx_logits_max_abs_diff"] = stages["export_onnx"]["metrics"]["logits_max_abs_diff"]
    return result


SPEED_LABELS = {
    "float": "ONNX Runtime fp32 (float graph)",
    "gptq-g64": "ONNX Runtime INT4 MatMulNBits (GPTQ g64; lm_head fp32)",
    "gptq-g64-sym-head": "ONNX Runtime INT4 MatMulNBits (GPTQ g64 + INT4 lm_head)",
    "gptq-g64-sym-head-acc4": "ONNX Runtime INT4 MatMulNBits, accuracy_level 4 (int8 activations)",
}


def speed(results: dict, work: Path, new_tokens: int) -> list[dict]:
    """Decode tokens/s of every exported graph and of PyTorch eager, one after the other."""
    from transformers import AutoTokenizer

    from edgekit.measure.speed import decode_speed_onnx, decode_speed_torch
    from edgekit.weights.checkpoint import load_checkpoint

    prompt = "The Jetson Orin module runs large language models at the edge because"
    ids = AutoTokenizer.from_pretrained(work / "_base" / "stages" / "01-load")(prompt)["input_ids"]
    rows = []
    for key, label in SPEED_LABELS.items():
        if "onnx_dir" in results.get(key, {}):
            r = decode_speed_onnx(REPO / results[key]["onnx_dir"] / "model.onnx", ids, new_tokens=new_tokens)
            rows.append({"backend": label, "config": key, **{k: v for k, v in r.items() if k != "tokens"}})
    model, _ = load_checkpoint(work / "_base" / "stages" / "01-load")
    r = decode_speed_torch(model, ids, new_tokens=new_tokens)
    rows.append({"backend": "PyTorch eager fp32", "config": "float", **{k: v for k, v in r.items() if k != "tokens"}})
    return rows


def _float_target(row: dict) -> str:
    """GPTQ rows: the float_target they ran with (rows from before the option: plain GPTQ, 0)."""
    if (row.get("quantize") or {}).get("method") != "gptq":
        return ""
    return f"{row.get('float_target', 0.0):g}"


def write_reports(out: Path, payload: dict) -> None:
    (out / "bench_quantize.json").write_text(json.dumps(payload, indent=2) + "\n")
    ref = next((r["perplexity"] for r in payload["quality"] if r["name"] == "float" and "perplexity" in r), None)
    lines = [
        "# Quantization benchmark: SmolLM2-135M",
        "",
        f"Run {payload['date']} on {payload['machine']} ({payload['cores']} cores); each row was measured on the date in "
        "its last column (rows are compared only within one date: the float reference is rerun with them). Held-out "
        "perplexity: last 8192 tokens of the stdlib docs, windows of 512; calibration only from the text before it "
        f"({payload['samples']} windows of 512 tokens). float target: GPTQ's `float_target` (docs/quantization.md; "
        "0 = plain GPTQ, the only kind before 2026-12-06).",
        "",
        "| configuration | perplexity | vs float | bits/weight | size (MB) | quantize (s) | peak RSS (MB) | float target | measured |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in payload["quality"]:
        if "error" in r:
            lines.append(f"| {r['name']} | — | {r['error']} | | | | | | {r.get('date', payload['date'])} |")
            continue
        delta = f"{(r['perplexity'] / ref - 1) * 100:+.1f}%" if ref else ""
        lines.append(
            f"| {r['name']} | {r['perplexity']:.3f} | {delta} | {r['bits_per_weight']:.2f} | {r['checkpoint_bytes'] / 1e6:.0f} | "
            f"{r.get('quantize_seconds', '')} | {r.get('peak_rss_mb', '')} | {_float_target(r)} | {r.get('date', payload['date'])} |"
        )
    with_sets = [r for r in payload["quality"] if r.get("sets")]
    if with_sets:
        floats = {r.get("data", "builtin:python-docs"): r["sets"] for r in with_sets if r["name"] in ("float", "float-mixed")}
        lines += ["", "Each held-out set against the float model on the same set (in_domain = the end of the row's own "
                  "text; ood = builtin:package-readmes, which no stage calibrates or trains on). Goals of issue #19 "
                  "for GPTQ W4 g64: ≤ +8 % in_domain on the float model (QAD: scripts/bench_qad.py).", "",
                  "| configuration | calibrated on | set | perplexity | vs float |",
                  "| --- | --- | --- | --- | --- |"]
        for r in with_sets:
            reference = floats.get(r.get("data", "builtin:python-docs"), {})
            for label, score in r["sets"].items():
                base = reference.get(label, {}).get("perplexity") or (floats.get("builtin:python-docs", {}).get(label, {}).get("perplexity"))
                delta = f"{(score['perplexity'] / base - 1) * 100:+.1f}%" if base else ""
                lines.append(f"| {r['name']} | {r.get('data', 'builtin:python-docs')} | {label} | {score['perplexity']:.3f} | "
                             f"{delta} |")
    lines += [
        "",
        f"Greedy decode of {payload['speed'][0]['new_tokens'] if payload['speed'] else ''} tokens after a "
        f"{payload['speed'][0]['prompt_tokens'] if payload['speed'] else ''}-token prompt, KV cache fed back each step "
        "(numpy in/out, no IO binding), all cores; held-out perplexity of the graph itself in ONNX Runtime.",
        "",
        "| decode backend | tokens/s | vs float ONNX | TTFT (ms) | graph perplexity |",
        "| --- | --- | --- | --- | --- |",
    ]
    base = next((r["decode_tokens_per_s"] for r in payload["speed"] if r["config"] == "float" and "ONNX" in r["backend"]), None)
    by_name = {r["name"]: r for r in payload["quality"]}
    for r in payload["speed"]:
        ratio = f"{r['decode_tokens_per_s'] / base:.2f}x" if base else ""
        graph_ppl = by_name.get(r["config"], {}).get("onnx_perplexity", "") if "ONNX" in r["backend"] else by_name["float"]["perplexity"]
        lines.append(f"| {r['backend']} | {r['decode_tokens_per_s']} | {ratio} | {r['ttft_ms']} | {graph_ppl} |")
    (out / "bench_quantize.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in payload["quality"]:
        if "perplexity" not in r or r["name"] == "float":
            continue
        family = r["name"].split("-")[0]
        marker = {"rtn": "x", "gptq": "o", "awq": "s", "fp8": "^"}.get(family, ".")
        ax.scatter(r["bits_per_weight"], r["perplexity"], marker=marker, label=r["name"])
    if ref:
        ax.axhline(ref, color="grey", linestyle="--", label=f"float ({ref:.2f})")
    ax.set_xlabel("bits per quantized weight (codes + scales + zeros)")
    ax.set_ylabel("held-out perplexity (lower is better)")
    ax.set_title("SmolLM2-135M: perplexity vs bits per weight")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "bench_quantize.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "results")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench_quantize")
    parser.add_argument("--samples", type=int, default=16, help="calibration windows of 512 tokens")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--only", default="", help="comma-separated configuration names")
    parser.add_argument("--skip-speed", action="store_true", help="keep the decode-speed rows of the previous results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    configs = configurations(args.samples)
    previous, previous_speed = {}, []
    if args.skip_speed and (args.out / "bench_quantize.json").is_file():
        previous_speed = json.loads((args.out / "bench_quantize.json").read_text()).get("speed", [])
    if args.only:  # rerun some configurations, keep the others' measured rows
        wanted = set(args.only.split(","))
        configs = [c for c in configs if c[0] in wanted]
        if (args.out / "bench_quantize.json").is_file():
            before = json.loads((args.out / "bench_quantize.json").read_text())
            # rows kept from an earlier run keep the date they were measured on
            previous = {r["name"]: {"date": before["date"], **r} for r in before["quality"]}
    base = args.work / "_base.yaml"
    base.write_text(recipe_yaml("base", "jetson-orin-nano-8gb", None))
    subprocess.run([sys.executable, "-m", "edgekit", "compress", str(base), "-q", "--output", str(args.work / "_base"), "--until", "load"], check=True)
    results = dict(previous)
    for name, target, quantize, export in configs:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        results[name] = run_config(args.work, name, target, quantize, export)
        print(f"[bench] {name}: {json.dumps({k: v for k, v in results[name].items() if k != 'quantize'})}", file=sys.stderr, flush=True)
    payload = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "samples": args.samples,
        "quality": [results[c[0]] for c in configurations(args.samples) if c[0] in results],
        "speed": previous_speed if args.skip_speed else speed(results, args.work, args.new_tokens),
    }
    write_reports(args.out, payload)
    print((args.out / "bench_quantize.md").read_text())


if __name__ == "__main__":
    main()
