#!/usr/bin/env python3
"""Runtime benchmark (issue #6) on the default models, CPU, side by side.

Branches: small = the default bundle (SmolLM2-135M pruned to 2/3, distilled, GPTQ INT4,
ONNX Runtime MatMulNBits: `recipes/smollm2_to_orin_nano.yaml`); large = SmolLM2-135M itself,
float, ONNX Runtime (`recipes/smollm2_large_branch.yaml`). Both are built (or reused from the
run cache) with `edgekit compress` first.

(a) Fast path: one sampling step (top-k 50 + top-p 0.9 + repetition penalty, T 0.8) and the
    confidence statistics, C extension vs NumPy reference, at vocabularies 32000 / 49152 /
    151936, and the C step as a share of one decode step of the small bundle.
    Goals: >= 3x faster than the reference; < 1 % of a decode step.
(b) Decode tokens/s, greedy, 96 new tokens after held-out prompts: small-only, large-only and
    speculative (small drafts, large verifies) for draft lengths 1..6 and with rounds that end
    early where the draft is unsure (draft_min_confidence), with the acceptance rate and a
    token-for-token comparison with large-only. Goal: speculative >= 1.5x
    large-only with identical output.
(c) Routing curve on held-out prompts with their true continuations (teacher-forced): each
    prompt is answered by the branch a router picks, and quality is the perplexity of the
    answering branch on the continuation (and its top-1 agreement with the large branch),
    against the share of prompts sent to the large branch, for `input_complexity` (the small
    branch's prompt NLL), `cascade` (the low quantile of the small branch's own generation
    confidence) and a random router (its expectation). Goal: at 30 % large calls, >= 90 % of
    the large-only quality gain.

Protocol: prompts come only from the evaluation half of the fixed held-out split (the last
8192 tokens of the stdlib docs; see edgekit.runtime.calibration). Speeds are medians over
prompts on this machine (2 CPU cores), measured one mode at a time.

    python scripts/bench_runtime.py [--prompts 120] [--speed-prompts 4] [--skip-a] [--skip-b] [--skip-c]

Writes results/bench_runtime.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "results"
SMALL_RECIPE = REPO / "recipes" / "smollm2_to_orin_nano.yaml"
LARGE_RECIPE = REPO / "recipes" / "smollm2_large_branch.yaml"
RESULT_NAME = "bench_runtime"


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def _bundle(recipe: Path) -> Path:
    """Build (or reuse from the run cache) the recipe's run under runs/; its final bundle."""
    from edgekit import api

    manifest = api.compress(recipe)
    run_dir = REPO / "runs" / api.validate_recipe(recipe).recipe.name
    last = next(s for s in reversed(manifest["stages"]) if s["type"] in ("build_engine", "bundle"))
    found = sorted((run_dir / last["dir"]).glob("*/manifest.json"))
    if not found:
        raise SystemExit(f"no bundle in {run_dir / last['dir']}")
    return found[0].parent


def _eval_windows(tokenizer, n: int, *, seed: int = 0, continuation: int = 64):
    """(prompt ids, continuation ids) pairs from the evaluation half of the held-out split."""
    import numpy as np

    from edgekit.models.text import resolve_text_source, tokenize_splits

    text = resolve_text_source("builtin:python-docs").read()
    held = tokenize_splits(text, tokenizer, eval_tokens=8192, window=1).evaluation
    region = held[len(held) // 2:]
    rng = np.random.default_rng(seed)
    lengths = rng.integers(32, 65, size=n)
    span = len(region) - 64 - continuation
    pairs = []
    for i, length in enumerate(lengths):
        start = round(i * span / max(1, n - 1))
        pairs.append((list(region[start:start + int(length)]), list(region[start + int(length):start + int(length) + continuation])))
    return pairs


# --------------------------------------------------------------------------- (a)


def bench_fastpath(small) -> dict:
    sys.path.insert(0, str(REPO / "scripts"))
    import bench_fastpath

    rows = []
    for vocab in (32000, 49152, 151936):
        rows += bench_fastpath.bench_vocab(vocab, repeats=200)
    # one decode step of the small bundle (median over 48 steps)
    session = small.session()
    session.feed(small.tokenizer.encode("The for statement is used to iterate over the elements of a sequence"))
    token, steps = 0, []
    for _ in range(48):
        start = time.perf_counter()
        logits = session.feed([token])
        steps.append(time.perf_counter() - start)
        token = int(logits[-1].argmax())
    session.close()
    step_us = statistics.median(steps) * 1e6
    sample_row = next(r for r in rows if r["vocab"] == small.vocab_size and r["what"].startswith("sample: top-k"))
    return {"rows": rows, "decode_step_us": round(step_us, 1), "vocab": small.vocab_size,
            "c_sampling_share_of_step": sample_row["c_us"] / step_us}


# --------------------------------------------------------------------------- (b)


SPECULATIVE_CONFIGS = [(k, 0.0) for k in range(1, 7)] + [(6, 0.5), (8, 0.5), (8, 0.7)]


def bench_speed(small, large, prompts: list[list[int]], new_tokens: int, rounds: int, draft=None) -> dict:
    """Every mode answers every prompt once per round, the modes taking turns prompt by prompt
    (whatever else the machine does hits them alike); medians over rounds x prompts. ``draft``:
    the small branch's draft graph, which drafts in speculative mode (as `edgekit run` does)."""
    from edgekit.runtime.router import Router

    draft = draft or small
    modes = [("small_only", 4, 0.0), ("large_only", 4, 0.0)] + [("speculative", k, c) for k, c in SPECULATIVE_CONFIGS]
    if draft is not small:
        modes.insert(1, ("small_only (draft graph)", 4, 0.0))
    # small_only runs the exact graph; everything else (the draft-graph row, speculative) the draft
    routers = {m: Router(small if m[0] == "small_only" else draft, large, m[0].split(" ")[0], max_new_tokens=new_tokens,
                         draft_tokens=m[1], draft_min_confidence=m[2])
               for m in modes}
    for router in routers.values():
        router.generate(prompts[0][:8], max_new_tokens=4)  # warm-up: first calls allocate
    results: dict = {m: [] for m in modes}
    for round_ in range(rounds):
        for i, prompt in enumerate(prompts):
            order = modes[(i + round_) % len(modes):] + modes[:(i + round_) % len(modes)]
            for mode in order:
                results[mode].append((i, routers[mode].generate(prompt)))
    rows = []
    reference = {i: r.tokens for i, r in results[("large_only", 4, 0.0)]}  # the exact large graph
    for (policy, draft_tokens, confidence), runs in results.items():
        done = [r for _, r in runs]
        row = {
            "policy": policy,
            "decode_tokens_per_s": statistics.median(r.tokens_per_s for r in done),
            "ttft_ms": statistics.median(r.ttft_s * 1000 for r in done),
            "new_tokens": statistics.mean(len(r.tokens) for r in done),
        }
        if policy == "speculative":
            row.update(draft_tokens=draft_tokens, draft_min_confidence=confidence,
                       acceptance_rate=statistics.mean(r.acceptance_rate for r in done),
                       tokens_per_large_call=statistics.mean(len(r.tokens) / max(1, r.speculative["large_calls"] - 1) for r in done),
                       drafted_per_round=statistics.mean(r.speculative["drafted"] / max(1, r.speculative["large_calls"] - 1)
                                                         for r in done),
                       identical_to_large_only=all(r.tokens == reference[i] for i, r in runs))
        rows.append(row)
    large_rate = next(r for r in rows if r["policy"] == "large_only")["decode_tokens_per_s"]
    for row in rows:
        row["speedup_vs_large_only"] = row["decode_tokens_per_s"] / large_rate
    return {"rows": rows, "prompts": len(prompts), "rounds": rounds, "max_new_tokens": new_tokens,
            "spin_wait": bool(getattr(small, "spin_wait", False)), "draft_graph": _shown(draft.graph)}


# --------------------------------------------------------------------------- (c)


def _teacher_forced(branch, prompt: list[int], cont: list[int]):
    """(NLL per continuation token, argmax per continuation position, prompt mean NLL)."""
    import numpy as np

    session = branch.session()
    logits = session.feed(prompt + cont).astype(np.float64)
    session.close()
    logp = logits - logits.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    n = len(prompt)
    rows = logp[n - 1:n - 1 + len(cont)]
    nll = -rows[np.arange(len(cont)), cont]
    prompt_nll = float(-logp[np.arange(n - 1), prompt[1:]].mean()) if n > 1 else 0.0
    return nll, rows.argmax(axis=1), prompt_nll


def bench_routing(small, large, pairs, *, cascade_tokens: int) -> dict:
    import numpy as np

    from edgekit.runtime.router import Router

    per = []
    scorer = Router(small, None, "small_only", max_new_tokens=cascade_tokens)
    for i, (prompt, cont) in enumerate(pairs):
        s_nll, s_arg, s_prompt = _teacher_forced(small, prompt, cont)
        l_nll, l_arg, _ = _teacher_forced(large, prompt, cont)
        per.append({
            "small_nll": float(s_nll.sum()), "large_nll": float(l_nll.sum()), "tokens": len(cont),
            "small_agree": float((s_arg == l_arg).mean()),
            "complexity": s_prompt,
            "cascade": scorer.confidence_score(prompt),
        })
        if (i + 1) % 20 == 0:
            print(f"  routing: {i + 1}/{len(pairs)} prompts scored", flush=True)
    n_tok = sum(p["tokens"] for p in per)
    small_ppl = math.exp(sum(p["small_nll"] for p in per) / n_tok)
    large_ppl = math.exp(sum(p["large_nll"] for p in per) / n_tok)

    def curve(order: list[int]) -> list[dict]:
        points = []
        for k in range(len(per) + 1):
            chosen = set(order[:k])  # the k prompts the router sends large
            nll = sum(p["large_nll"] if i in chosen else p["small_nll"] for i, p in enumerate(per))
            agree = sum(p["tokens"] * (1.0 if i in chosen else p["small_agree"]) for i, p in enumerate(per)) / n_tok
            points.append({"large_share": k / len(per), "perplexity": math.exp(nll / n_tok), "agreement": agree})
        return points

    by_complexity = sorted(range(len(per)), key=lambda i: -per[i]["complexity"])  # hardest first
    by_cascade = sorted(range(len(per)), key=lambda i: per[i]["cascade"])  # least confident first
    oracle = sorted(range(len(per)), key=lambda i: -(per[i]["small_nll"] - per[i]["large_nll"]))
    oracle_agreement = sorted(range(len(per)), key=lambda i: per[i]["tokens"] * (per[i]["small_agree"] - 1))
    random_curve = []
    for k in range(len(per) + 1):
        r = k / len(per)  # a random router's expectation: each prompt large with probability r
        nll = sum((1 - r) * p["small_nll"] + r * p["large_nll"] for p in per)
        agree = sum(p["tokens"] * ((1 - r) * p["small_agree"] + r) for p in per) / n_tok
        random_curve.append({"large_share": r, "perplexity": math.exp(nll / n_tok), "agreement": agree})
    curves = {"input_complexity": curve(by_complexity), "cascade": curve(by_cascade), "random": random_curve,
              "oracle (not a router: knows the answer)": curve(oracle),
              "agreement oracle (not a router: knows where the branches disagree)": curve(oracle_agreement)}
    small_agreement = sum(p["tokens"] * p["small_agree"] for p in per) / n_tok

    def at(points, share=0.3):
        point = min(points, key=lambda p: abs(p["large_share"] - share))
        gain = (small_ppl - point["perplexity"]) / (small_ppl - large_ppl) if small_ppl != large_ppl else float("nan")
        agreement_gain = (point["agreement"] - small_agreement) / (1 - small_agreement) if small_agreement < 1 else float("nan")
        return {**point, "gain_fraction": gain, "agreement_gain_fraction": agreement_gain}

    return {"prompts": len(per), "continuation_tokens": per[0]["tokens"], "cascade_tokens": cascade_tokens,
            "small_only_perplexity": small_ppl, "large_only_perplexity": large_ppl, "small_only_agreement": small_agreement,
            "at_30_percent": {name: at(points) for name, points in curves.items()}, "curves": curves,
            "score_correlation_with_gain": {
                name: float(np.corrcoef([p[key] for p in per], [p["small_nll"] - p["large_nll"] for p in per])[0, 1])
                for name, key in (("input_complexity", "complexity"), ("cascade", "cascade"))}}


# --------------------------------------------------------------------------- report


def _draft_label(row: dict) -> str:
    confidence = row.get("draft_min_confidence") or 0.0
    return f"{row['draft_tokens']}" + (f", stop below p {confidence:g}" if confidence else "")


def write_report(data: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{RESULT_NAME}.json").write_text(json.dumps(data, indent=2) + "\n")
    lines = ["# Runtime benchmark (issue #6)", "",
             f"{data['machine']}. Small: `{data['small']}`; large: `{data['large']}`. Generated by `scripts/bench_runtime.py`.", ""]
    if "fastpath" in data:
        fp = data["fastpath"]
        lines += ["## (a) Fast path per decode step", "", "| vocab | step | C µs | NumPy reference µs | speedup |", "|---:|---|---:|---:|---:|"]
        lines += [f"| {r['vocab']} | {r['what']} | {r['c_us']:.1f} | {r['reference_us']:.1f} | {r['speedup']:.1f}x |" for r in fp["rows"]]
        lines += ["", f"One decode step of the small bundle: {fp['decode_step_us'] / 1000:.2f} ms; the C sampling step "
                  f"(vocab {fp['vocab']}) is {fp['c_sampling_share_of_step']:.2%} of it (goal < 1 %).", ""]
    if "speed" in data:
        sp = data["speed"]
        lines += ["## (b) Decode speed, greedy", "",
                  f"{sp['prompts']} held-out prompts, up to {sp['max_new_tokens']} new tokens, {sp.get('rounds', 1)} round(s), the "
                  f"modes taking turns prompt by prompt; medians over rounds x prompts. ONNX Runtime workers "
                  f"{'spin within a run' if sp.get('spin_wait') else 'sleep between kernels'} (runtime.json spin_wait). "
                  f"Speculative modes draft with `{sp.get('draft_graph', '?')}`.", "",
                  "| mode | decode tok/s | TTFT ms | vs large-only | acceptance | drafted per round | tokens per large call | "
                  "same tokens as large-only |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]
        nan = float("nan")
        for r in sp["rows"]:
            mode = r["policy"] + (f" (draft {_draft_label(r)})" if "draft_tokens" in r else "")
            lines.append(f"| {mode} | {r['decode_tokens_per_s']:.1f} | {r['ttft_ms']:.0f} | {r['speedup_vs_large_only']:.2f}x | "
                         f"{r.get('acceptance_rate', nan):.2f} | {r.get('drafted_per_round', nan):.2f} | "
                         f"{r.get('tokens_per_large_call', nan):.2f} | {'yes' if r.get('identical_to_large_only', True) else 'NO'} |")
        best = max((r for r in sp["rows"] if r["policy"] == "speculative"), key=lambda r: r["speedup_vs_large_only"])
        lines += ["", f"Best speculative: draft {_draft_label(best)}, {best['speedup_vs_large_only']:.2f}x large-only "
                  f"(goal >= 1.5x).", ""]
    if "routing" in data:
        ro = data["routing"]
        lines += ["## (c) Routing: quality vs share of large calls", "",
                  f"{ro['prompts']} held-out prompts, {ro['continuation_tokens']}-token true continuations; small-only perplexity "
                  f"{ro['small_only_perplexity']:.2f}, large-only {ro['large_only_perplexity']:.2f}; top-1 agreement of the small "
                  f"branch with the large one (teacher-forced, per continuation token) {ro.get('small_only_agreement', float('nan')):.3f}, "
                  "of the large branch 1 by definition.", "",
                  "| router | perplexity at 30 % large | share of the perplexity gain | top-1 agreement with large | "
                  "share of the agreement gain |", "|---|---:|---:|---:|---:|"]
        for name, point in ro["at_30_percent"].items():
            lines.append(f"| {name} | {point['perplexity']:.2f} | {point['gain_fraction']:.0%} | {point['agreement']:.3f} | "
                         f"{point.get('agreement_gain_fraction', float('nan')):.0%} |")
        lines += ["", "Correlation of each score with the per-prompt gain (small NLL − large NLL): "
                  + ", ".join(f"{k} {v:+.2f}" for k, v in ro["score_correlation_with_gain"].items()) + ". Goal: >= 90 % of the gain at 30 %.", ""]
    (RESULTS / f"{RESULT_NAME}.md").write_text("\n".join(lines))
    _plot(data)


def _plot(data: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in ("speed", "routing") if k in data]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, key in zip(axes[0], panels):
        if key == "speed":
            rows = data["speed"]["rows"]
            labels = [(f"spec.\nk={r['draft_tokens']}" + (f"\np<{r['draft_min_confidence']:g}" if r.get("draft_min_confidence") else ""))
                      if "draft_tokens" in r else r["policy"].replace("_only", "").replace(" (draft graph)", "\n(draft\ngraph)")
                      for r in rows]
            colors = {"small_only": "#4c72b0", "large_only": "#dd8452", "speculative": "#55a868"}
            ax.bar(labels, [r["decode_tokens_per_s"] for r in rows], color=[colors.get(r["policy"], "#8172b3") for r in rows])
            large_rate = next(r for r in rows if r["policy"] == "large_only")["decode_tokens_per_s"]
            ax.axhline(1.5 * large_rate, color="grey", ls="--", lw=0.8, label="1.5x large-only (goal)")
            ax.legend(fontsize=8)
            ax.set_ylabel("decode tokens/s (CPU, greedy)")
            ax.set_title("speculative decoding vs each branch alone")
            ax.tick_params(axis="x", labelsize=7)
        else:
            ro = data["routing"]
            for name, points in ro["curves"].items():
                style = ":" if name.startswith("oracle") else ("--" if name == "random" else "-")
                ax.plot([p["large_share"] for p in points], [p["perplexity"] for p in points], style, label=name)
            ax.axvline(0.3, color="grey", lw=0.8)
            ax.set_xlabel("share of prompts answered by the large branch")
            ax.set_ylabel("held-out perplexity of the answer branch")
            ax.set_title("routing curve")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{RESULT_NAME}.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=120, help="routing prompts")
    parser.add_argument("--speed-prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=2, help="decode-speed rounds (modes take turns prompt by prompt)")
    parser.add_argument("--no-spin", action="store_true", help="ONNX Runtime workers sleep between kernels (runtime.json spin_wait false)")
    parser.add_argument("--no-draft-graph", action="store_true", help="draft with the small bundle's main graph (runtime.json draft_graph off)")
    parser.add_argument("--cascade-tokens", type=int, default=32)
    parser.add_argument("--skip-a", action="store_true")
    parser.add_argument("--skip-b", action="store_true")
    parser.add_argument("--skip-c", action="store_true")
    parser.add_argument("--small-bundle", type=Path, help="another small branch (a bundle directory) instead of the default recipe's")
    parser.add_argument("--large-bundle", type=Path, help="another large branch (a bundle directory) instead of the large recipe's")
    parser.add_argument("--name", default="bench_runtime", help="results/<name>.{json,md,png}")
    args = parser.parse_args()
    os.environ.setdefault("OPENVINO_TELEMETRY_OPT_OUT", "1")
    os.chdir(REPO)  # runs/ lands in the repository, where `edgekit compress` would put it

    from edgekit.graph_variants import DRAFT_VARIANT
    from edgekit.runtime.backends import OnnxRuntimeBranch

    global RESULT_NAME
    RESULT_NAME = args.name
    small_dir = args.small_bundle.resolve() if args.small_bundle else _bundle(SMALL_RECIPE)
    large_dir = args.large_bundle.resolve() if args.large_bundle else _bundle(LARGE_RECIPE)
    small = OnnxRuntimeBranch(small_dir, name="small", spin_wait=not args.no_spin)
    variants = (small.manifest.get("onnx") or {}).get("variants") or {}
    draft = small
    if DRAFT_VARIANT in variants and not args.no_draft_graph:  # what `edgekit run --policy speculative` drafts with
        draft = OnnxRuntimeBranch(small_dir, name="small", spin_wait=not args.no_spin, variant=DRAFT_VARIANT)
    large = OnnxRuntimeBranch(large_dir, name="large", spin_wait=not args.no_spin)
    path = RESULTS / f"{RESULT_NAME}.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(machine=f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
                small=_shown(small_dir), large=_shown(large_dir))
    pairs = _eval_windows(small.tokenizer, max(args.prompts, args.speed_prompts))
    if not args.skip_a:
        print("(a) fast path", flush=True)
        data["fastpath"] = bench_fastpath(small)
    if not args.skip_b:
        print("(b) decode speed", flush=True)
        step = max(1, len(pairs) // args.speed_prompts)
        data["speed"] = bench_speed(small, large, [pairs[i * step][0] for i in range(args.speed_prompts)], args.new_tokens,
                                    args.rounds, draft)
    if not args.skip_c:
        print("(c) routing curve", flush=True)
        data["routing"] = bench_routing(small, large, pairs[:args.prompts], cascade_tokens=args.cascade_tokens)
    write_report(data)
    print((RESULTS / f"{RESULT_NAME}.md").read_text())


if __name__ == "__main__":
    main()
