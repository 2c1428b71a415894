#!/usr/bin/env python3
"""Prompt-prefix KV reuse (issue #18): time to first token of a request whose first N tokens
are a cached prefix, against the same request with no cache, on the default bundle.

Each trial builds one prompt: an N-token prefix (the same in every trial: a system prompt)
followed by a short suffix that differs from trial to trial (the user's question). The
router (edgekit.runtime.bundle.open_router with the bundle's runtime.json, small_only, greedy)
answers it twice, alternating which goes first: once with the branch's prefix cache removed
(a full prefill) and once with the cache, which holds the prefix from the warm-up request.
TTFT is the router's own (request start -> first token: prefill plus the first sample,
``RouteResult.ttft_s``); both answers must be token for token the same (checked, and
recorded). The last prompt-logits row of both paths is compared too (max |difference|).

    python scripts/bench_prefix.py [BUNDLE] [--prefix 256] [--suffix 16] [--trials 15] [--curve 64,128,256,512]
                                   [--long-suffix 80]

Goal: cached TTFT <= 30 % of uncached at a 256-token prefix. The curve repeats the
measurement for other prefix lengths, and once more with a suffix longer than a block (fewer
trials). Writes results/bench_prefix.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "results"
DEFAULT_BUNDLE = REPO / "runs" / "smollm2-to-orin-nano" / "stages" / "11-bundle" / "smollm2-to-orin-nano"
RESULT_NAME = "bench_prefix"
NEW_TOKENS = 8


def _texts(tokenizer, count: int, prefix: int, suffix: int) -> tuple[list[int], list[list[int]]]:
    """The prefix ids and ``count`` different suffixes, from the held-out half of the stdlib
    docs (edgekit.runtime.calibration's split)."""
    from edgekit.models.text import resolve_text_source, tokenize_splits

    text = resolve_text_source("builtin:python-docs").read()
    held = tokenize_splits(text, tokenizer, eval_tokens=8192, window=1).evaluation
    ids = [int(t) for t in held]
    head = ids[:prefix]
    tails = [ids[prefix + 64 + i * (suffix + 7): prefix + 64 + i * (suffix + 7) + suffix] for i in range(count)]
    assert len(head) == prefix and all(len(t) == suffix for t in tails)
    return head, tails


def _measure(router, cache, head: list[int], tails: list[list[int]]) -> dict:
    import numpy as np

    small = router.small
    # warm-up: the prefix goes into the cache (and ONNX Runtime's first-run allocations happen)
    small.prefix_cache = cache
    router.generate(head + tails[0], max_new_tokens=2)
    rows = {"uncached": [], "cached": []}
    same, reused, worst = 0, [], 0.0
    for i, tail in enumerate(tails[1:]):
        prompt = head + tail
        answers = {}
        for mode in (("uncached", "cached") if i % 2 == 0 else ("cached", "uncached")):
            small.prefix_cache = cache if mode == "cached" else None
            before = cache.tokens_reused
            result = router.generate(prompt, max_new_tokens=NEW_TOKENS)
            rows[mode].append(result.ttft_s)
            answers[mode] = result.tokens
            if mode == "cached":
                reused.append(cache.tokens_reused - before)
        same += answers["cached"] == answers["uncached"]
        # the last prompt row of each path, outside the timed runs (this prompt's own blocks
        # are cached by now: the row is the one after the most reuse)
        small.prefix_cache = cache
        session = small.session()
        cached_row = session.feed(prompt)[-1]
        session.close()
        small.prefix_cache = None
        session = small.session()
        plain_row = session.feed(prompt)[-1]
        session.close()
        worst = max(worst, float(np.abs(cached_row - plain_row).max()))
    small.prefix_cache = cache

    def summary(values):
        ms = sorted(v * 1000 for v in values)
        return {"median_ms": statistics.median(ms), "p90_ms": ms[min(len(ms) - 1, int(0.9 * len(ms)))],
                "min_ms": ms[0], "all_ms": [round(v, 2) for v in ms]}

    out = {mode: summary(values) for mode, values in rows.items()}
    out.update(ratio=out["cached"]["median_ms"] / out["uncached"]["median_ms"], identical=f"{same}/{len(tails) - 1}",
               tokens_reused=sorted(set(reused)), max_logits_diff=worst, prompt_tokens=len(head) + len(tails[0]),
               cache=cache.stats(), kv_bytes_per_token=cache.bytes_per_token)
    return out


def _plot(data: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = data["curve"]
    lengths = sorted(int(k) for k in curve)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for mode, style in (("uncached", "o-"), ("cached", "s-")):
        ax.plot(lengths, [curve[str(n)][mode]["median_ms"] for n in lengths], style, label=f"{mode} (median)")
    ax.set_xlabel(f"shared prefix tokens (+ {data['suffix_tokens']}-token suffix)")
    ax.set_ylabel("time to first token (ms)")
    ax.set_title("Prompt-prefix KV reuse, default bundle, ONNX Runtime CPU")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"{RESULT_NAME}.png", dpi=120)


def _markdown(data: dict) -> str:
    main = data["main"]
    lines = [
        "# Prompt-prefix KV reuse: time to first token",
        "",
        f"Bundle `{data['bundle']}` ({data['kv_cache']} KV cache), {data['machine']}. {data['note']}",
        "",
        f"Main: {data['prefix_tokens']}-token cached prefix + {data['suffix_tokens']}-token suffix, {data['trials']} trials, "
        f"alternating. Cached TTFT / uncached TTFT (medians) = **{main['ratio']:.1%}** (goal <= 30 %: "
        f"{'met' if main['ratio'] <= 0.30 else 'not met'}). Tokens taken from the cache per cached request: "
        f"{main['tokens_reused']}. Greedy answers identical: {main['identical']}; max |last logits difference| "
        f"{main['max_logits_diff']:.2e}. Load average before / after: {data['load_average_before'][0]:.2f} / "
        f"{data['load_average_after'][0]:.2f}.",
        "",
        "| prefix tokens | uncached TTFT median (p90) ms | cached TTFT median (p90) ms | cached / uncached | identical | "
        "max logits diff |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for n in sorted(data["curve"], key=int):
        row = data["curve"][n]
        lines.append(f"| {n} | {row['uncached']['median_ms']:.1f} ({row['uncached']['p90_ms']:.1f}) | "
                     f"{row['cached']['median_ms']:.1f} ({row['cached']['p90_ms']:.1f}) | {row['ratio']:.1%} | "
                     f"{row['identical']} | {row['max_logits_diff']:.1e} |")
    long = data["long_suffix"]
    lines += ["", f"With a {long['suffix_tokens']}-token suffix (longer than a block: each prompt also stores blocks of "
              f"its own) at the {data['prefix_tokens']}-token prefix: uncached {long['uncached']['median_ms']:.1f} ms, "
              f"cached {long['cached']['median_ms']:.1f} ms ({long['ratio']:.1%}); tokens reused {long['tokens_reused']}; "
              f"identical {long['identical']}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", nargs="?", default=str(DEFAULT_BUNDLE))
    parser.add_argument("--prefix", type=int, default=256, choices=range(64, 1537), metavar="64..1536")
    parser.add_argument("--suffix", type=int, default=16, choices=range(1, 257), metavar="1..256")
    parser.add_argument("--trials", type=int, default=15, choices=range(3, 201), metavar="3..200")
    parser.add_argument("--curve", default="64,128,256,512", help="other prefix lengths (comma-separated), 6 trials each")
    parser.add_argument("--long-suffix", type=int, default=80, choices=range(1, 513), metavar="1..512",
                        help="a second measurement at --prefix with this longer suffix (6 trials)")
    parser.add_argument("--note", default="", help="the machine's state, for the report")
    args = parser.parse_args(argv)

    from edgekit.runtime.bundle import open_router, resolve_config
    from edgekit.runtime.config import PrefixCacheConfig
    from edgekit.runtime.prefix_cache import PrefixCache

    bundle = Path(args.bundle)
    config = resolve_config(bundle, policy="small_only")
    router = open_router(bundle, config, threads=None)
    small = router.small
    settings = PrefixCacheConfig()

    def fresh_cache() -> PrefixCache:
        return PrefixCache(max_bytes=int(settings.max_mb * 2**20), max_blocks=settings.max_blocks,
                           block_tokens=settings.block_tokens, min_tokens=settings.min_tokens)

    data = {
        "bundle": str(bundle.relative_to(REPO)) if bundle.resolve().is_relative_to(REPO) else str(bundle),
        "kv_cache": getattr(small, "kv_cache", small.backend), "backend": small.backend,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "load_average_before": os.getloadavg(), "note": args.note, "prefix_tokens": args.prefix,
        "suffix_tokens": args.suffix, "trials": args.trials, "new_tokens": NEW_TOKENS,
        "settings": settings.model_dump(), "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    head, tails = _texts(small.tokenizer, args.trials + 1, args.prefix, args.suffix)
    data["main"] = _measure(router, fresh_cache(), head, tails)
    curve = {str(args.prefix): data["main"]}
    for n in sorted({int(x) for x in args.curve.split(",") if x.strip()} - {args.prefix}):
        head_n, tails_n = _texts(small.tokenizer, 7, n, args.suffix)  # a warm-up and 6 trials
        curve[str(n)] = _measure(router, fresh_cache(), head_n, tails_n)
        print(f"prefix {n}: ratio {curve[str(n)]['ratio']:.1%}", file=sys.stderr)
    data["curve"] = curve
    # a question longer than a block: the prompt's own blocks go past the shared prefix, and the
    # next prompt still reuses the shared ones
    head_l, tails_l = _texts(small.tokenizer, 7, args.prefix, args.long_suffix)
    data["long_suffix"] = {"suffix_tokens": args.long_suffix, **_measure(router, fresh_cache(), head_l, tails_l)}
    data["load_average_after"] = os.getloadavg()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{RESULT_NAME}.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / f"{RESULT_NAME}.md").write_text(_markdown(data))
    _plot(data)
    print(_markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
