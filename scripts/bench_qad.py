#!/usr/bin/env python3
"""Quantization-aware distillation benchmark on SmolLM2-135M: float vs GPTQ W4 g64 vs GPTQ + QAD.

Runs one recipe (default recipes/smollm2_qad.yaml: load → evaluate_float → quantize (GPTQ W4
g64 sym, act-order) → evaluate_gptq → distill mode qad → evaluate_qad) with `edgekit compress`,
so the three models are scored in the same run on the same held-out sets: in_domain (the end
of the recipe's text) and ood (builtin:package-readmes, which no stage calibrates or trains
on). ``--collect RUN_DIR`` reports a finished run of such a recipe instead of running one.

Goals (issue #19): GPTQ W4 g64 + QAD within +4 % of the float parent in_domain and +6 % ood,
after ≤ 10 CPU-minutes of QAD on 2 cores; the float model's GPTQ W4 g64 alone ≤ +8 %.

    python scripts/bench_qad.py [--recipe recipes/smollm2_qad.yaml] [--collect runs/qad] [--name bench_qad]
                                [--also "text only=runs/qad/text" ...]

``--also LABEL=RUN_DIR`` adds the QAD result of another finished run that starts from the same
GPTQ checkpoint (checked: the quantize stage's weights have the same sha256 and the float and
GPTQ scores are equal), e.g. the same recipe with other QAD settings, as one more row.

Writes results/<name>.{json,md,png} (default bench_qad; the mixed-text recipe,
recipes/smollm2_qad_mixed.yaml, reports as bench_qad_mixed). Numbers are measured on the
machine that runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from bench_common import shown  # scripts/ is on sys.path when a script runs

REPO = Path(__file__).resolve().parent.parent
#: the stages whose scores the report compares, in order, and how it labels them
MODELS = (("evaluate_float", "float"), ("evaluate_gptq", "GPTQ W4 g64"), ("evaluate_qad", "GPTQ W4 g64 + QAD"))
GOALS = {"evaluate_gptq": {"in_domain": 8.0}, "evaluate_qad": {"in_domain": 4.0, "ood": 6.0}}


def qad_settings(run: Path, stage: dict) -> dict:
    """The distill stage's resolved settings (its distill.json): what a variant changes."""
    record = run / stage["dir"] / "distill.json" if stage.get("dir") else None
    config = json.loads(record.read_text()).get("config", {}) if record and record.is_file() else {}
    return {k: config.get(k) for k in ("steps", "learning_rate", "qad_weight_learning_rate", "qad_scales", "qad_scale_learning_rate",
                                       "generated_ratio")}


def variant(run: Path, label: str, main: dict) -> dict:
    """One more QAD row: a finished run from the same GPTQ checkpoint as ``main``'s."""
    other = collect(run)
    if other["quantize_sha256"] != main["quantize_sha256"] or other["models"][:2] != main["models"][:2]:
        raise SystemExit(f"--also {label}={run}: not the same float and GPTQ models as the main run (quantize weights or scores differ)")
    return {"label": label, "run": shown(run), "model": {**other["models"][2], "label": f"GPTQ W4 g64 + QAD ({label})"},
            "qad": other["qad"], "settings": other["settings"]}


def collect(run: Path) -> dict:
    manifest = json.loads((run / "manifest.json").read_text())
    stages = {s["name"]: s for s in manifest["stages"]}
    missing = [name for name, _ in MODELS if stages.get(name, {}).get("status") not in ("done", "cached")]
    if missing or stages.get("distill", {}).get("status") not in ("done", "cached"):
        raise SystemExit(f"{run}: the run has not finished {', '.join(missing) or 'distill'}")
    models = []
    for name, label in MODELS:
        metrics = stages[name]["metrics"]
        sets = {k: {"perplexity": v["perplexity"], "agreement": v.get("agreement"), "kl": v.get("kl"), "source": v.get("source")}
                for k, v in (metrics.get("sets") or {"in_domain": {"perplexity": metrics["perplexity"]}}).items()}
        models.append({"stage": name, "label": label, "sets": sets})
    distill = stages["distill"]["metrics"]
    quantize = stages["quantize"]["metrics"]
    return {
        "recipe": manifest["recipe"],
        "models": models,
        "quantize": {k: quantize.get(k) for k in ("method", "bits", "group_size", "symmetric", "act_order", "calibration_tokens",
                                                   "quantize_seconds")},
        "qad": {k: distill.get(k) for k in ("steps", "stopped", "train_seconds", "tokens_seen", "tokens_per_second", "precision",
                                             "qad_scales", "qad_codes_changed", "qad_codes_changed_fraction")},
        "curve": distill.get("curve", []),
        "settings": qad_settings(run, stages["distill"]),
        "quantize_sha256": stages["quantize"].get("files", {}).get("model.safetensors", {}).get("sha256"),
    }


def write_reports(out: Path, payload: dict, name: str = "bench_qad") -> None:
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    float_sets = payload["models"][0]["sets"]
    qad = payload["qad"]
    lines = [
        "# Quantization-aware distillation: SmolLM2-135M",
        "",
        f"Measured {payload['date']} on {payload['machine']} ({payload['cores']} cores), one run of "
        f"`{shown(payload['recipe'].get('file', '?'))}` (float, GPTQ and GPTQ + QAD scored in the same run). in_domain = the last "
        "8192 tokens of the recipe's text (calibration and QAD read only the text before it); ood = "
        "builtin:package-readmes, which no stage calibrates or trains on. Goals (#19): GPTQ alone ≤ +8 % in_domain; "
        "after QAD ≤ +4 % in_domain and ≤ +6 % ood.",
        "",
        "| model | set | perplexity | vs float | goal | agreement with float | KL to float (nats/token) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model in payload["models"] + [v["model"] for v in payload.get("variants", [])]:
        for label, score in model["sets"].items():
            base = float_sets.get(label, {}).get("perplexity")
            delta = (score["perplexity"] / base - 1) * 100 if base else None
            goal = GOALS.get(model["stage"], {}).get(label)
            verdict = "" if goal is None or delta is None else f"≤ +{goal:g} %: {'met' if delta <= goal else 'missed'}"
            agreement = f"{score['agreement']:.3f}" if score.get("agreement") is not None else ""
            kl = f"{score['kl']:.4f}" if score.get("kl") is not None else ""
            lines.append(f"| {model['label']} | {label} | {score['perplexity']:.3f} | "
                         f"{'' if delta is None or model['stage'] == 'evaluate_float' else f'{delta:+.1f}%'} | {verdict} | "
                         f"{agreement} | {kl} |")
    lines += [
        "",
        f"QAD: {qad.get('steps')} steps ({qad.get('stopped')}), {qad.get('tokens_seen')} tokens, "
        f"{(qad.get('train_seconds') or 0) / 60:.1f} min of training ({qad.get('precision')}), scales {qad.get('qad_scales')}; "
        f"{qad.get('qad_codes_changed')} integer codes changed "
        f"({100 * (qad.get('qad_codes_changed_fraction') or 0):.2f} % of all). GPTQ itself: "
        f"{payload['quantize'].get('quantize_seconds')} s. Agreement and KL are against the teacher each evaluate stage "
        "names (the float model loaded by the recipe).",
        "",
    ]
    if payload.get("variants"):
        lines += [
            "Other QAD settings from the same GPTQ checkpoint (each a finished run whose quantize weights and float/GPTQ scores "
            "equal the main run's; the same goal rule applies):",
            "",
            "| QAD run | settings | training | codes changed | run |",
            "| --- | --- | --- | --- | --- |",
        ]
        for v in [{"label": "recipe", "run": "", "qad": qad, "settings": payload.get("settings", {})}] + payload["variants"]:
            settings = ", ".join(f"{k} {val}" for k, val in v["settings"].items() if val is not None)
            lines.append(f"| {v['label']} | {settings} | {v['qad'].get('steps')} steps ({v['qad'].get('stopped')}), "
                         f"{(v['qad'].get('train_seconds') or 0) / 60:.1f} min | {v['qad'].get('qad_codes_changed')} | {v['run']} |")
        lines.append("")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    plot(out, payload, name)


def plot(out: Path, payload: dict, name: str = "bench_qad") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11 + 0.8 * len(payload.get("variants", [])), 4.6),
                                      gridspec_kw={"width_ratios": [1.6, 1]})
    import textwrap

    # perplexity over the float model's, per set: the goals are stated that way, and the
    # differences between QAD runs are too small to see on bars that start at zero
    floats = payload["models"][0]["sets"]
    models = payload["models"][1:] + [v["model"] for v in payload.get("variants", [])]
    recipe = " (the recipe)" if payload.get("variants") else ""
    labels = ["\n".join(textwrap.wrap(m["label"].replace("GPTQ W4 g64 + ", "+ ") + (recipe if m is payload["models"][-1] else ""), 16))
              for m in models]
    sets = list(floats)
    width = 0.8 / max(1, len(sets))
    for i, label in enumerate(sets):
        values = [(m["sets"].get(label, {}).get("perplexity", float("nan")) / floats[label]["perplexity"] - 1) * 100 for m in models]
        left.bar([x + i * width for x in range(len(labels))], values, width=width, label=label)
    left.set_xticks([x + width * (len(sets) - 1) / 2 for x in range(len(labels))], labels, fontsize=7)
    for goal, label in ((4, "QAD goal in_domain"), (6, "QAD goal ood")):
        left.axhline(goal, color="grey", linestyle=":" if goal == 4 else "--", linewidth=1, label=f"{label}: +{goal} %")
    left.set_ylabel("perplexity over the float model's (%)")
    left.set_title("GPTQ W4 g64 and GPTQ + QAD runs, vs float (lower is better)")
    left.legend(fontsize=7)
    curve = [c for c in payload["curve"] if c.get("perplexity")]
    if curve:
        right.plot([c["step"] for c in curve], [c["perplexity"] for c in curve], marker=".", label="QAD (in_domain, periodic windows)")
    float_ppl = payload["models"][0]["sets"]["in_domain"]["perplexity"]
    gptq_ppl = payload["models"][1]["sets"]["in_domain"]["perplexity"]
    right.axhline(float_ppl, color="black", linestyle="--", label=f"float ({float_ppl:.2f})")
    right.axhline(gptq_ppl, color="tab:red", linestyle=":", label=f"GPTQ alone ({gptq_ppl:.2f})")
    right.axhline(float_ppl * 1.04, color="grey", linestyle=":", label="goal: float +4 %")
    right.set_xlabel("QAD step")
    right.set_ylabel("held-out perplexity")
    right.set_title("during QAD (first and last points on all windows)")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=120, metadata={"Software": None})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "smollm2_qad.yaml")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench_qad")
    parser.add_argument("--collect", type=Path, help="report this finished run instead of running the recipe")
    parser.add_argument("--out", type=Path, default=REPO / "results")
    parser.add_argument("--name", default="bench_qad", help="stem of the result files")
    parser.add_argument("--also", action="append", default=[], metavar="LABEL=RUN_DIR",
                        help="another finished run from the same GPTQ checkpoint, reported as one more QAD row (repeatable)")
    args = parser.parse_args()
    also = []
    for entry in args.also:
        label, _, path = entry.partition("=")
        if not label or not path or len(label) > 40 or "|" in label or not label.isprintable() or not Path(path).is_dir():
            parser.error(f"--also {entry!r}: give LABEL=RUN_DIR (a label of at most 40 printable characters without '|', "
                         "an existing run directory)")
        also.append((label, Path(path)))
    if not args.name.replace("_", "").replace("-", "").isalnum() or len(args.name) > 64:
        parser.error("--name: letters, digits, '_' and '-' only (at most 64): it becomes a file name")
    run = args.collect
    if run is None:
        run = args.work
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "edgekit", "compress", str(args.recipe), "--output", str(run)], check=True)
        print(f"[qad] ran {args.recipe} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    try:
        # a collected run is dated by its manifest (the day it finished), not by the day of the report
        finished = (run / "manifest.json").stat().st_mtime if args.collect is not None else time.time()
        payload = {"date": time.strftime("%Y-%m-%d", time.gmtime(finished)), "machine": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                   **collect(run)}
        payload["variants"] = [variant(path, label, payload) for label, path in also]
    except (OSError, ValueError, KeyError, TypeError) as error:  # a missing or malformed manifest / distill.json
        raise SystemExit(f"bench_qad: a run's manifest.json or distill.json is unreadable or not a finished run's ({type(error).__name__}: "
                         f"{error}). To resolve, point --collect/--also at finished edgekit run directories.") from None
    args.out.mkdir(parents=True, exist_ok=True)
    write_reports(args.out, payload, args.name)
    print((args.out / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
