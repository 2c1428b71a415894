#!/usr/bin/env python3
"""Where a CPU distillation step spends its time: the reference path against what the loop runs.

One process, the variants alternating (so a slow minute of the host hits each alike): per
round each variant runs one untimed step (after a switch the heap must grow back) and one timed
step; the batches are random token ids, the same sequence for every variant.

- ``reference``: autograd through the reference formulas (``fake_quantize``, the
  ``DISTRIBUTION_LOSSES`` KL) with glibc's default malloc (a fresh ``mmap`` per large block);
- ``heap``: the same with freed memory reused (edgekit/heap.py);
- ``fused``: what the training loop runs now: heap reuse, the fused KL
  (``TRAINING_LOSSES``) and, for a quantized student, the fused frozen-grid fake quantization.

Each step is timed in phases: teacher forward, student forward, loss, backward, AdamW.
Writes ``<out>.json`` and ``<out>.md``.

    python scripts/profile_distill_step.py --student runs/qad/stages/03-quantize \\
        --teacher runs/qad/stages/01-load --out results/profile_distill_step
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHASES = ("teacher_forward", "student_forward", "loss", "backward", "adamw")
VARIANTS = ("reference", "heap", "fused")


def _student(path: Path, *, fused: bool):
    import torch

    from edgekit.distill import qad
    from edgekit.weights.checkpoint import load_checkpoint

    model, _ = load_checkpoint(path, dtype="float32")
    qad.to_fake_quant(model, trainable_scales=False)
    if not fused:  # the reference: autograd through every elementwise op of the grid
        for _, layer in qad.fake_quant_layers(model):
            layer.fake_weight = (lambda m: lambda: qad.fake_quantize(
                m.weight, m.scales.clamp(min=qad.SMALLEST_SCALE), m.zeros, m.g_idx, m.bits))(layer)
    model.get_input_embeddings().weight.requires_grad_(False)  # as the qad recipe (freeze_embeddings)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    return model, optimizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", type=Path, required=True, help="a quantized (GPTQ-format) checkpoint dir")
    parser.add_argument("--teacher", type=Path, required=True, help="the float checkpoint dir")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="rounds: timed steps per variant (each after an untimed one)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "profile_distill_step")
    args = parser.parse_args(argv)
    if not (1 <= args.batch_size <= 64 and 16 <= args.length <= 4096 and 1 <= args.steps <= 100):
        parser.error("--batch-size 1..64, --length 16..4096, --steps 1..100")
    if args.threads is not None and not 1 <= args.threads <= 256:
        parser.error("--threads 1..256")
    for option, path in (("--student", args.student), ("--teacher", args.teacher)):
        if not (path / "config.json").is_file():
            parser.error(f"{option} {path}: not a checkpoint directory (no config.json)")

    import torch

    from edgekit.distill.losses import DISTRIBUTION_LOSSES, TRAINING_LOSSES
    from edgekit.heap import reuse_freed_memory
    from edgekit.weights.checkpoint import load_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    teacher, _ = load_checkpoint(args.teacher, dtype="bfloat16")
    teacher.eval().requires_grad_(False)
    students = {v: _student(args.student, fused=v == "fused") for v in VARIANTS}
    losses = {"reference": DISTRIBUTION_LOSSES["forward_kl"], "heap": DISTRIBUTION_LOSSES["forward_kl"],
              "fused": TRAINING_LOSSES["forward_kl"]}
    generator = torch.Generator().manual_seed(0)
    vocab = teacher.config.vocab_size
    seconds = {v: dict.fromkeys(PHASES, 0.0) for v in VARIANTS}

    first_loss: dict[str, float] = {}

    def step(variant: str, batch, timed: bool) -> None:
        model, optimizer = students[variant]
        marks = [time.perf_counter()]
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            t_logits = teacher(input_ids=batch, use_cache=False).logits
        marks.append(time.perf_counter())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            s_logits = model(input_ids=batch, use_cache=False).logits
        marks.append(time.perf_counter())
        loss = losses[variant](s_logits, t_logits, 1.0)
        marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        first_loss.setdefault(variant, float(loss.detach()))  # same weights, same batch: the same loss
        if timed:
            for phase, a, b in zip(PHASES, marks, marks[1:]):
                seconds[variant][phase] += b - a

    for _ in range(args.steps):
        batches = [torch.randint(0, vocab, (args.batch_size, args.length), generator=generator) for _ in range(2)]
        for variant in VARIANTS:  # alternating; each variant's first step after a switch is not timed
            with reuse_freed_memory() if variant != "reference" else contextlib.nullcontext():
                step(variant, batches[0], timed=False)  # the heap grows back (a switch trims it)
                step(variant, batches[1], timed=True)

    tokens = args.batch_size * args.length
    rows = []
    for variant in VARIANTS:
        per_step = {p: seconds[variant][p] / args.steps for p in PHASES}
        total = sum(per_step.values())
        rows.append({"variant": variant, "seconds_per_step": per_step, "total_seconds_per_step": total,
                     "tokens_per_second": tokens / total, "loss_first_step": first_loss[variant]})
    base = rows[0]["total_seconds_per_step"]
    report = {
        "measured": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "student": str(args.student), "teacher": str(args.teacher), "batch_size": args.batch_size,
        "length": args.length, "timed_steps": args.steps, "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.out.with_suffix(".json"))
    lines = [
        "# One distillation step on the CPU, by phase",
        "",
        f"Measured {report['measured']} on {report['machine']}: QAD of `{args.student}` from `{args.teacher}`, "
        f"batch {args.batch_size} × {args.length} tokens, bf16 autocast, {args.steps} timed steps per variant, "
        "alternating (scripts/profile_distill_step.py). Seconds per step.",
        "",
        "| variant | " + " | ".join(PHASES) + " | total | tokens/s | vs reference |",
        "| --- | " + " | ".join("---" for _ in PHASES) + " | --- | --- | --- |",
    ]
    for row in rows:
        cells = " | ".join(f"{row['seconds_per_step'][p]:.2f}" for p in PHASES)
        lines.append(f"| {row['variant']} | {cells} | {row['total_seconds_per_step']:.2f} | {row['tokens_per_second']:.0f} | "
                     f"{base / row['total_seconds_per_step']:.2f}× |")
    first_losses = ", ".join(f"{r['loss_first_step']:.5f}" for r in rows)
    lines += ["", "reference: autograd through the grid and the KL, glibc's default malloc; heap: freed memory "
              "reused (edgekit/heap.py); fused: what the loop runs (heap, fused KL, fused frozen-grid fake quantization). "
              f"The first step's loss per variant: {first_losses} (the same batch and weights: equal up to rounding)."]
    tmp = args.out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(args.out.with_suffix(".md"))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
