"""What a distillation reports: progress and log lines (to the stage context, or as JSON events on
stdout from a launched main process), the result record ``distill.json``, the stage's metrics
and the training curve."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Iterator

EVENT_PREFIX = "EDGEKIT_EVENT "
RESULT_FORMAT = "edgekit.distill/1"


class _NullTask:
    def advance(self, amount: float = 1) -> None:
        pass

    def update(self, **fields: Any) -> None:
        pass


class NullReporter:
    """What non-main processes (and callers without a stage context) report to."""

    def log(self, message: str) -> None:
        pass

    @contextlib.contextmanager
    def progress(self, total: int | None, description: str) -> Iterator[Any]:
        yield _NullTask()


def emit(event: str, **payload: Any) -> None:
    sys.stdout.write(EVENT_PREFIX + json.dumps({"event": event, **payload}) + "\n")
    sys.stdout.flush()


class _EventTask:
    def advance(self, amount: float = 1) -> None:
        emit("advance", amount=amount)

    def update(self, **fields: Any) -> None:
        emit("update", **{k: v for k, v in fields.items() if k == "description"})


class EventReporter:
    """The launched main process: progress and log lines as JSON events on stdout."""

    def log(self, message: str) -> None:
        emit("log", message=message)

    @contextlib.contextmanager
    def progress(self, total: int | None, description: str) -> Iterator[Any]:
        emit("progress_start", total=total, description=description)
        try:
            yield _EventTask()
        finally:
            emit("progress_end")


def model_shape(config: Any) -> dict[str, int]:
    return {
        "layers": int(config.num_hidden_layers),
        "hidden_size": int(config.hidden_size),
        "vocab_size": int(config.vocab_size),
    }


def plot_curve(path: Path, losses: list[dict[str, Any]], evals: list[dict[str, Any]], *, title: str) -> None:
    """Training loss and held-out perplexity against the step, as a PNG (deterministic bytes)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 3.6), dpi=100)
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    if losses:
        left.plot([e["step"] for e in losses], [e["loss"] for e in losses], color="tab:blue", linewidth=1)
    left.set_xlabel("step")
    left.set_ylabel("training loss")
    left.set_title("training loss")
    left.grid(alpha=0.3)
    right.plot([e["step"] for e in evals], [e["perplexity"] for e in evals], marker="o", color="tab:orange")
    right.set_xlabel("step")
    right.set_ylabel("perplexity")
    right.set_title("held-out perplexity")
    right.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, format="png", metadata={"Software": None})


def result_record(config: Any, *, teacher: Any, student: Any, layers: list[int], channels: list[int] | None, device: str,
                  precision: str, world: int, windows: int, steps: int, stopped: str, tokens_seen: int,
                  evals: list[dict[str, Any]], losses: list[dict[str, Any]],
                  generated: dict[str, Any] | None = None, qad: dict[str, Any] | None = None) -> dict[str, Any]:
    """The content of ``distill.json``: settings, shapes, evaluations and per-step losses (no
    timings, so a rerun hashes the same). ``teacher``/``student`` are the models' configs;
    ``generated`` the teacher-sampled data (settings, sha256, samples per source) or None;
    ``qad`` (mode qad) the grid and how many of the input checkpoint's integer codes and scales
    training changed (:func:`edgekit.distill.qad.grid_changes`)."""
    record = {
        "format": RESULT_FORMAT,
        "config": config.model_dump(mode="json"),
        "teacher": model_shape(teacher),
        "student": model_shape(student),
        "layer_map": layers,
        "hidden_channels": "all" if channels is None else len(channels),
        "device": device,
        "precision": precision,
        "processes": world,
        "train_windows": windows,
        "steps": steps,
        "stopped": stopped,
        "tokens_seen": tokens_seen,
        "perplexity_start": evals[0]["perplexity"],
        "perplexity_end": evals[-1]["perplexity"],
        "evals": evals,
        "losses": losses,
    }
    # Stated always (the config dump leaves them out at their defaults, to keep cache keys).
    record.update({"loss": config.loss, "generated_ratio": config.generated_ratio, "on_policy_ratio": config.on_policy_ratio,
                   "on_policy_steps": sum(1 for entry in losses if entry.get("on_policy")), "generated": generated,
                   "mode": config.mode})
    if qad is not None:
        record["qad"] = qad
    return record


def write_result(out: Path, record: dict[str, Any], *, title: str) -> None:
    """``distill.json`` and ``distill_curve.png`` into the stage's output directory."""
    (out / "distill.json").write_text(json.dumps(record, indent=1) + "\n")
    plot_curve(out / "distill_curve.png", record["losses"], record["evals"], title=title)


def stage_metrics(record: dict[str, Any], *, train_seconds: float, session_tokens: int, session_seconds: float,
                  resumed_from: int) -> dict[str, Any]:
    """The stage's metrics for the manifest: the record's start/end figures plus this session's speed."""
    evals, losses = record["evals"], record["losses"]
    return {
        "perplexity_start": round(evals[0]["perplexity"], 6),
        "perplexity_end": round(evals[-1]["perplexity"], 6),
        "kl_end": round(evals[-1]["kl"], 6),
        "steps": record["steps"],
        "kl_start": round(evals[0]["kl"], 6),
        "agreement_start": round(evals[0]["agreement"], 6),
        "agreement_end": round(evals[-1]["agreement"], 6),
        "train_loss_end": round(losses[-1]["loss"], 6) if losses else None,
        "tokens_seen": record["tokens_seen"],
        "train_seconds": round(float(train_seconds), 3),
        "tokens_per_second": round(session_tokens / session_seconds, 1) if session_seconds else None,
        "resumed_from": resumed_from,
        "stopped": record["stopped"],
        "processes": record["processes"],
        "device": record["device"],
        "precision": record["precision"],
        "loss": record["loss"],
        "generated_ratio": record["generated_ratio"],
        "on_policy_ratio": record["on_policy_ratio"],
        "on_policy_steps": record["on_policy_steps"],
        **({"generated_sha256": record["generated"]["sha256"], "generated_samples": record["generated"]["samples"]}
           if record["generated"] else {}),
        "mode": record["mode"],
        **({"qad_scales": record["qad"]["scales"], "qad_codes_changed": record["qad"]["codes_changed"],
            "qad_codes_changed_fraction": round(record["qad"]["codes_changed_fraction"], 6),
            "qad_scales_changed": record["qad"]["scales_changed"]} if record.get("qad") else {}),
        "curve": [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in e.items()} for e in evals],
    }
