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

(d) Routing on mixed traffic (issue #20; `--only routing`): builtin:routing-mixed
    (edgekit.models.routing_set: prose, short and long prompts, code, CSV, JSON, arithmetic,
    non-English text; none of it the small branch's training text). The learned router is
    trained and every threshold calibrated on the calibration half; everything is measured on
    the evaluation half: teacher-forced perplexity of the answering branch on each prompt's
    reference continuation, and what a user sees: each branch's greedy answer (32 tokens),
    its token agreement and exact-match prefix with the large branch's answer, and the answer's
    perplexity under the large model. Curves for oracle, random, input_complexity, cascade and
    learned, per kind; at 30 % large calls the share of the oracle's gain and the multiple of
    random's; the calibrated thresholds' large-call share on the held-out half.
    Writes results/bench_routing_mixed.{json,md,png}.

Protocol: prompts come only from the evaluation half of the fixed held-out split (the last
8192 tokens of the stdlib docs; see edgekit.runtime.calibration). Speeds are medians over
prompts on this machine (2 CPU cores), measured one mode at a time.

    python scripts/bench_runtime.py [--prompts 120] [--speed-prompts 4] [--skip-a] [--skip-b] [--skip-c]
    python scripts/bench_runtime.py --only routing [--per-kind 75] [--answer-tokens 32]

Writes results/bench_runtime.{json,md,png}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from bench_common import shown  # scripts/ is on sys.path when a script runs

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "results"
SMALL_RECIPE = REPO / "recipes" / "smollm2_to_orin_nano.yaml"
LARGE_RECIPE = REPO / "recipes" / "smollm2_large_branch.yaml"
RESULT_NAME = "bench_runtime"


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
            "spin_wait": bool(getattr(small, "spin_wait", False)), "draft_graph": shown(draft.graph)}


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


# --------------------------------------------------------------------------- (d)


def _greedy_with_confidence(branch, ids: list[int], n: int):
    """(greedy answer ids, EOS excluded; max-probability confidence of every sampled token)."""
    import numpy as np

    from edgekit.runtime.answers import eos_ids

    eos = eos_ids(branch.tokenizer)
    session = branch.session()
    tokens, confidences = [], []
    try:
        logits = session.feed(list(ids))
        for _ in range(n):
            row = np.asarray(logits[-1], dtype=np.float64)
            p = np.exp(row - row.max())
            token = int(row.argmax())
            confidences.append(float(p.max() / p.sum()))
            if token in eos:
                break
            tokens.append(token)
            if len(tokens) < n:
                logits = session.feed([token])
    finally:
        session.close()
    return tokens, confidences


def _routing_record(small, large, item, answer_tokens: int, with_answers: bool) -> dict:
    """One prompt of the mixed set through both branches (the module docstring's (d))."""
    from edgekit.runtime.calibration import _encode_continuation, _token_nll
    from edgekit.runtime.learned import prompt_features
    from edgekit.runtime.scores import ConfidenceMonitor

    ids = [int(t) for t in small.tokenizer.encode(item.prompt)]
    ref = _encode_continuation(small.tokenizer, item.continuation)[:answer_tokens]
    rows, s_nll = _token_nll(small, ids + ref, len(ids))
    _, l_nll = _token_nll(large, ids + ref, len(ids))
    features = prompt_features(rows, ids, item.prompt)
    s_answer, confidences = _greedy_with_confidence(small, ids, answer_tokens)
    monitor = ConfidenceMonitor(0.0, quantile=0.1, min_tokens=8, check="incremental")  # the cascade's defaults
    for c in confidences:
        monitor.push(c)
    monitor.finish()
    record = {"kind": item.kind, "split": item.split, "prompt_tokens": len(ids), "features": features,
              "small_nll": float(s_nll.sum()), "large_nll": float(l_nll.sum()), "tokens": len(ref),
              "cascade": monitor.score if math.isfinite(monitor.score) else 1.0}
    if with_answers:
        l_answer, _ = _greedy_with_confidence(large, ids, answer_tokens)
        longest = max(len(s_answer), len(l_answer))
        same = [a == b for a, b in zip(s_answer, l_answer)]
        prefix = next((i for i, eq in enumerate(same) if not eq), len(same))
        s_under_large = _token_nll(large, ids + s_answer, len(ids))[1] if s_answer else []
        l_under_large = _token_nll(large, ids + l_answer, len(ids))[1] if l_answer else []
        record.update(small_answer=s_answer, large_answer=l_answer,
                      agreement=(sum(same) / longest) if longest else 1.0, prefix=prefix, large_prefix=len(l_answer),
                      small_answer_nll=float(sum(s_under_large)), small_answer_tokens=len(s_answer),
                      large_answer_nll=float(sum(l_under_large)), large_answer_tokens=len(l_answer))
    return record


def _routing_records(small, large, items, answer_tokens: int, cache: Path) -> list[dict]:
    """Every item's record, cached in ``cache`` (keyed by the set, the bundles and the settings),
    so the routers can be re-evaluated without running the models again."""
    records = json.loads(cache.read_text()) if cache.is_file() else []
    for i, item in enumerate(items[len(records):], start=len(records)):
        records.append(_routing_record(small, large, item, answer_tokens, item.split == "evaluation"))
        if (i + 1) % 25 == 0 or i + 1 == len(items):
            print(f"  routing (mixed): {i + 1}/{len(items)} prompts through both branches", flush=True)
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps(records))
            tmp.replace(cache)
    return records


def _route_metrics(per: list[dict], large_set: set[int]) -> dict:
    """Quality over ``per`` when the prompts in ``large_set`` are answered by the large branch."""
    n_tok = sum(p["tokens"] for p in per)
    nll = sum(p["large_nll"] if i in large_set else p["small_nll"] for i, p in enumerate(per))
    answer_nll = sum(p["large_answer_nll"] if i in large_set else p["small_answer_nll"] for i, p in enumerate(per))
    answer_tok = sum(p["large_answer_tokens"] if i in large_set else p["small_answer_tokens"] for i, p in enumerate(per))
    return {"large_share": len(large_set) / len(per), "perplexity": math.exp(nll / n_tok),
            "answer_agreement": sum(1.0 if i in large_set else p["agreement"] for i, p in enumerate(per)) / len(per),
            "exact_prefix": sum(p["large_prefix"] if i in large_set else p["prefix"] for i, p in enumerate(per)) / len(per),
            "answer_perplexity_under_large": math.exp(answer_nll / max(1, answer_tok))}


def _expected_random(per: list[dict], share: float) -> dict:
    """A random router's expectation: each prompt large with probability ``share``."""
    n_tok = sum(p["tokens"] for p in per)
    nll = sum((1 - share) * p["small_nll"] + share * p["large_nll"] for p in per)
    answer_nll = sum((1 - share) * p["small_answer_nll"] + share * p["large_answer_nll"] for p in per)
    answer_tok = sum((1 - share) * p["small_answer_tokens"] + share * p["large_answer_tokens"] for p in per)
    return {"large_share": share, "perplexity": math.exp(nll / n_tok),
            "answer_agreement": sum((1 - share) * p["agreement"] + share for p in per) / len(per),
            "exact_prefix": sum((1 - share) * p["prefix"] + share * p["large_prefix"] for p in per) / len(per),
            "answer_perplexity_under_large": math.exp(answer_nll / max(1.0, answer_tok))}


def bench_routing_mixed(small, large, *, per_kind: int, answer_tokens: int, share: float = 0.3, hidden: int = 8) -> dict:
    import numpy as np

    from edgekit.models.routing_set import build_routing_set
    from edgekit.runtime.calibration import calibrate_learned, quantile_threshold
    from edgekit.runtime.config import FEATURE_NAMES, LearnedScorer
    from edgekit.runtime.learned import score_many

    items, fingerprint = build_routing_set(per_kind)
    key = hashlib.sha256(json.dumps([fingerprint["sha256"], shown(small.bundle_dir), shown(large.bundle_dir), answer_tokens,
                                     _bundle_digest(small), _bundle_digest(large)]).encode()).hexdigest()[:16]
    records = _routing_records(small, large, items, answer_tokens, REPO / "runs" / "bench_routing_mixed" / f"records-{key}.json")
    cal = [r for r in records if r["split"] == "calibration"]
    per = [r for r in records if r["split"] == "evaluation"]
    # the routers' scores: calibrated (thresholds, the learned scorer) on the calibration half only
    examples = [{"features": r["features"], "gain": (r["small_nll"] - r["large_nll"]) / r["tokens"], "kind": r["kind"]}
                for r in cal]
    learned = calibrate_learned(examples, large_rate=share, hidden=hidden)
    scorer = LearnedScorer.model_validate(learned["learned"])
    eval_learned = [float(v) for v in score_many(scorer, [r["features"] for r in per])]
    nll_mean = FEATURE_NAMES.index("nll_mean")
    escalation = {  # larger = send large
        "input_complexity": ([r["features"][nll_mean] for r in cal], [r["features"][nll_mean] for r in per]),
        "cascade": ([-r["cascade"] for r in cal], [-r["cascade"] for r in per]),
        "learned": (learned["scores"], eval_learned),
    }
    calibrated = {}
    for name, (cal_scores, eval_scores) in escalation.items():
        t = learned["threshold"] if name == "learned" else quantile_threshold(cal_scores, share)[0]
        large_set = {i for i, v in enumerate(eval_scores) if v > t}
        calibrated[name] = {"threshold_escalation_units": t, "large_rate_held_out": len(large_set) / len(per),
                            "within_5_points": abs(len(large_set) / len(per) - share) <= 0.05,
                            **_route_metrics(per, large_set)}
    orders = {name: sorted(range(len(per)), key=lambda i, s=scores[1]: -s[i]) for name, scores in escalation.items()}
    orders["oracle (perplexity; not a router)"] = sorted(range(len(per)), key=lambda i: -(per[i]["small_nll"] - per[i]["large_nll"]))
    orders["oracle (answer agreement; not a router)"] = sorted(
        range(len(per)), key=lambda i: (per[i]["agreement"], -(per[i]["small_answer_nll"] - per[i]["large_answer_nll"])))
    curves = {name: [_route_metrics(per, set(order[:k])) for k in range(len(per) + 1)] for name, order in orders.items()}
    curves["random"] = [_expected_random(per, k / len(per)) for k in range(len(per) + 1)]
    small_only, large_only = curves["random"][0], curves["random"][-1]
    k30 = round(share * len(per))

    def gains(point: dict) -> dict:
        return {"perplexity_gain": small_only["perplexity"] - point["perplexity"],
                "agreement_gain": point["answer_agreement"] - small_only["answer_agreement"]}

    at = {name: {**points[k30], **gains(points[k30])} for name, points in curves.items()}
    oracle_ppl, oracle_agree = at["oracle (perplexity; not a router)"], at["oracle (answer agreement; not a router)"]
    for name, point in at.items():
        point["share_of_large_only_perplexity_gain"] = point["perplexity_gain"] / (small_only["perplexity"] - large_only["perplexity"])
        point["share_of_large_only_agreement_gain"] = point["agreement_gain"] / (1 - small_only["answer_agreement"])
        point["fraction_of_oracle_perplexity_gain"] = point["perplexity_gain"] / oracle_ppl["perplexity_gain"]
        point["fraction_of_oracle_agreement_gain"] = point["agreement_gain"] / oracle_agree["agreement_gain"]
        point["multiple_of_random_perplexity_gain"] = point["perplexity_gain"] / at["random"]["perplexity_gain"]
        point["multiple_of_random_agreement_gain"] = point["agreement_gain"] / at["random"]["agreement_gain"]
    kinds = sorted({r["kind"] for r in per})
    per_kind = {}
    for kind in kinds:
        idx = [i for i, r in enumerate(per) if r["kind"] == kind]
        sub = [per[i] for i in idx]
        row = {"prompts": len(sub), "small_only": _route_metrics(sub, set()), "large_only": _route_metrics(sub, set(range(len(sub))))}
        for name in ("learned", "input_complexity", "cascade", "oracle (perplexity; not a router)"):
            chosen = set(orders[name][:k30])
            local = {j for j, i in enumerate(idx) if i in chosen}
            row[name] = {"large_share": len(local) / len(sub), **_route_metrics(sub, local)}
        per_kind[kind] = row
    best = max(("learned", "input_complexity", "cascade"), key=lambda n: min(at[n]["fraction_of_oracle_perplexity_gain"],
                                                                            at[n]["fraction_of_oracle_agreement_gain"]))
    b = at[best]
    goal = {"router": best, "share": share,
            "fraction_of_oracle_perplexity_gain": b["fraction_of_oracle_perplexity_gain"],
            "fraction_of_oracle_agreement_gain": b["fraction_of_oracle_agreement_gain"],
            "multiple_of_random_perplexity_gain": b["multiple_of_random_perplexity_gain"],
            "multiple_of_random_agreement_gain": b["multiple_of_random_agreement_gain"],
            "calibrated_large_rate_held_out": calibrated[best]["large_rate_held_out"]}
    goal["met"] = bool(goal["fraction_of_oracle_perplexity_gain"] >= 0.8 and goal["fraction_of_oracle_agreement_gain"] >= 0.8
                       and goal["multiple_of_random_perplexity_gain"] >= 2 and goal["multiple_of_random_agreement_gain"] >= 2
                       and abs(goal["calibrated_large_rate_held_out"] - share) <= 0.05)
    return {"set": fingerprint, "answer_tokens": answer_tokens, "calibration_prompts": len(cal), "evaluation_prompts": len(per),
            "learned": {k: v for k, v in learned.items() if k != "scores"}, "calibrated": calibrated, "at_share": at,
            "share": share, "curves": curves, "per_kind": per_kind, "goal": goal,
            "mean_gain_per_kind_calibration": {k: float(np.mean([e["gain"] for e in examples if e["kind"] == k]))
                                               for k in kinds}}


def _bundle_digest(branch) -> str:
    manifest = Path(branch.bundle_dir) / "manifest.json"
    return hashlib.sha256(manifest.read_bytes()).hexdigest()[:16] if manifest.is_file() else "?"


def write_routing_report(ro: dict, machine: str, small: str, large: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    stem = "bench_routing_mixed"
    (RESULTS / f"{stem}.json").write_text(json.dumps({"machine": machine, "small": small, "large": large, **ro}, indent=1) + "\n")
    pct = ro["share"]
    lines = ["# Routing on mixed traffic (issue #20)", "",
             f"{machine}. Small: `{small}`; large: `{large}`. Generated by `scripts/bench_runtime.py --only routing`.", "",
             f"Set: builtin:routing-mixed, {ro['set']['prompts']} prompts (sha256 {ro['set']['sha256'][:12]}), kinds "
             + ", ".join(f"{k} {v}" for k, v in ro["set"]["kinds"].items())
             + f"; {ro['calibration_prompts']} calibration / {ro['evaluation_prompts']} evaluation prompts (disjoint). "
             f"Answers: greedy, {ro['answer_tokens']} tokens. The learned router ({ro['learned']['hidden']} hidden units) and "
             "every threshold are fitted on the calibration half; all numbers below are on the evaluation half.", "",
             f"## At {pct:.0%} large calls", "",
             "| router | perplexity | answer agreement | exact prefix (tokens) | answer ppl under large | of oracle's ppl gain | "
             "of oracle's agreement gain | x random (ppl) | x random (agreement) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    s0, l1 = ro["curves"]["random"][0], ro["curves"]["random"][-1]
    lines.append(f"| small only (0 %) | {s0['perplexity']:.2f} | {s0['answer_agreement']:.3f} | {s0['exact_prefix']:.1f} | "
                 f"{s0['answer_perplexity_under_large']:.2f} | | | | |")
    for name, p in ro["at_share"].items():
        lines.append(f"| {name} | {p['perplexity']:.2f} | {p['answer_agreement']:.3f} | {p['exact_prefix']:.1f} | "
                     f"{p['answer_perplexity_under_large']:.2f} | {p['fraction_of_oracle_perplexity_gain']:.0%} | "
                     f"{p['fraction_of_oracle_agreement_gain']:.0%} | {p['multiple_of_random_perplexity_gain']:.2f} | "
                     f"{p['multiple_of_random_agreement_gain']:.2f} |")
    lines.append(f"| large only (100 %) | {l1['perplexity']:.2f} | {l1['answer_agreement']:.3f} | {l1['exact_prefix']:.1f} | "
                 f"{l1['answer_perplexity_under_large']:.2f} | | | | |")
    g = ro["goal"]
    lines += ["", f"Goal (issue #20): the best router ({g['router']}) recovers {g['fraction_of_oracle_perplexity_gain']:.0%} / "
              f"{g['fraction_of_oracle_agreement_gain']:.0%} of the oracle's perplexity / answer-agreement gain (goal >= 80 %), "
              f"{g['multiple_of_random_perplexity_gain']:.2f}x / {g['multiple_of_random_agreement_gain']:.2f}x random's (goal >= 2x), "
              f"and its calibrated threshold sends {g['calibrated_large_rate_held_out']:.1%} of held-out prompts large (goal "
              f"{pct:.0%} ± 5 points): **{'met' if g['met'] else 'not met'}**.", "",
              "## Calibrated thresholds on the held-out half", "",
              "| router | large calls (target %.0f %%) | within ±5 points | perplexity | answer agreement |" % (100 * pct),
              "|---|---:|---|---:|---:|"]
    for name, c in ro["calibrated"].items():
        lines.append(f"| {name} | {c['large_rate_held_out']:.1%} | {'yes' if c['within_5_points'] else 'no'} | "
                     f"{c['perplexity']:.2f} | {c['answer_agreement']:.3f} |")
    lines += ["", f"Learned scorer: out-of-fold correlation with the per-prompt gain on the calibration half "
              f"{ro['learned']['out_of_fold_correlation_with_gain']:+.2f}.", "",
              f"## Per kind (each router's {pct:.0%} cut over the whole evaluation half)", "",
              "| kind | prompts | small ppl | large ppl | small agreement | learned: large share / ppl / agreement | "
              "input_complexity: large share | cascade: large share | oracle (ppl): large share |",
              "|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for kind, row in ro["per_kind"].items():
        le = row["learned"]
        lines.append(f"| {kind} | {row['prompts']} | {row['small_only']['perplexity']:.2f} | {row['large_only']['perplexity']:.2f} | "
                     f"{row['small_only']['answer_agreement']:.3f} | {le['large_share']:.0%} / {le['perplexity']:.2f} / "
                     f"{le['answer_agreement']:.3f} | {row['input_complexity']['large_share']:.0%} | "
                     f"{row['cascade']['large_share']:.0%} | {row['oracle (perplexity; not a router)']['large_share']:.0%} |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, key, label in ((axes[0], "perplexity", "perplexity of the answering branch (reference continuation)"),
                           (axes[1], "answer_agreement", "token agreement of the answer with the large branch's")):
        for name, points in ro["curves"].items():
            style = ":" if name.startswith("oracle") else ("--" if name == "random" else "-")
            ax.plot([p["large_share"] for p in points], [p[key] for p in points], style, label=name)
        ax.axvline(pct, color="grey", lw=0.8)
        ax.set_xlabel("share of prompts answered by the large branch")
        ax.set_ylabel(label, fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle("routing on mixed traffic (evaluation half of builtin:routing-mixed)")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{stem}.png", dpi=120)


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
    parser.add_argument("--only", choices=("routing",), help="routing: only (d), routing on builtin:routing-mixed "
                        "(results/bench_routing_mixed.*)")
    parser.add_argument("--per-kind", type=int, default=75, help="(d): prompts per kind of the mixed set")
    parser.add_argument("--answer-tokens", type=int, default=32, help="(d): greedy answer and reference tokens per prompt")
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
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    if args.only == "routing":
        print("(d) routing on mixed traffic", flush=True)
        ro = bench_routing_mixed(small, large, per_kind=args.per_kind, answer_tokens=args.answer_tokens)
        write_routing_report(ro, machine, shown(small_dir), shown(large_dir))
        print((RESULTS / "bench_routing_mixed.md").read_text())
        return
    path = RESULTS / f"{RESULT_NAME}.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(machine=f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
                small=shown(small_dir), large=shown(large_dir))
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
