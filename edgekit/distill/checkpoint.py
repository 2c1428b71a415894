"""Resumable checkpoints of the live training state (model, optimizer, RNG, scalars), written and
read through :mod:`edgekit.distill.state`: one file set from the main process, or under FSDP
one shard per process (each parameter's local piece and its optimizer state, as in memory)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from edgekit.distill import state as saved
from edgekit.distill.watchdog import watchdog
from edgekit.errors import StageError


def trainable_parameters(optimizer: Any) -> list[Any]:
    """The optimizer's parameters in param_groups order: the order of the ``names`` list."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def local_training_state(names: list[str], optimizer: Any, step: int, scalars: dict[str, Any]) -> Any:
    """This process's shard of the training state under FSDP (``use_orig_params``): each
    parameter's local piece (a flat view of its share of the flat parameter, possibly empty),
    the optimizer state as it is in memory (local pieces too), this process's RNG."""
    params = trainable_parameters(optimizer)
    if len(params) != len(names):
        raise StageError(f"the optimizer holds {len(params)} parameters, the student {len(names)}",
                         how="report this as a bug (an FSDP wrapping edgekit does not know?)")
    return saved.TrainingState(step=step, model={n: p.detach() for n, p in zip(names, params)},
                               optimizer=optimizer.state_dict(), rng=saved.rng_state(), scalars=scalars)


def restore_local_state(names: list[str], optimizer: Any, shard: Any, *, where: str) -> None:
    """The inverse of :func:`local_training_state`, after the model is sharded the same way."""
    import torch

    params = trainable_parameters(optimizer)
    if set(shard.model) != set(names) or len(params) != len(names):
        raise StageError("the sharded checkpoint does not match the student's parameters", where=where,
                         how="delete the stage's work dir and run again")
    with torch.no_grad():
        for name, param in zip(names, params):
            tensor = shard.model[name]
            if tuple(tensor.shape) != tuple(param.shape):
                raise StageError(f"the sharded checkpoint's piece of {name} has shape {tuple(tensor.shape)}, this process "
                                 f"holds {tuple(param.shape)}", where=where,
                                 how="resume with the same accelerate config and process count, or delete the work dir")
            param.copy_(tensor)
    optimizer.load_state_dict(shard.optimizer)


def find_resumable(work_dir: Path, names: list[str], setup: dict[str, Any], *, accelerator: Any, fsdp: bool,
                   report: Any) -> Any:
    """The newest complete checkpoint this run wrote (this process's shard under FSDP), or None.

    A checkpoint resumes only the run that wrote it: one whose ``setup`` (process count,
    precision, device, config, ...) differs is ignored, with a log line."""
    if accelerator.is_main_process:
        saved.clean_temporaries(work_dir)
    if fsdp:
        accelerator.wait_for_everyone()  # rank 0 cleaned half-written checkpoints first
    resumed = saved.load_state(work_dir, names, rank=accelerator.process_index if fsdp else None)
    if resumed is not None and resumed.scalars.get("setup") != setup:
        report.log(f"ignoring the checkpoint at step {resumed.step} in {work_dir}: another configuration or process count wrote it")
        resumed = None
    return resumed


def restore_state(student: Any, optimizer: Any, resumed: Any, work_dir: Path) -> None:
    """Load an unsharded checkpoint's weights and optimizer state, before accelerate wraps them."""
    import torch

    params = dict(student.named_parameters())
    if set(resumed.model) != set(params):
        raise StageError("the resumable checkpoint does not match the student's parameters", where=str(resumed.path),
                         how=f"delete {work_dir} and run again")
    with torch.no_grad():
        for name, tensor in resumed.model.items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(resumed.optimizer)


def save_checkpoint(step: int, *, accelerator: Any, fsdp: bool, work_dir: Path, names: list[str], optimizer: Any,
                    unwrapped: Any, scalars: dict[str, Any], setup: dict[str, Any], where: str) -> None:
    """Write the resumable state after ``step``; every process calls it (it synchronizes them)."""
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    if fsdp:
        # Every rank writes its own shard (no process holds the whole optimizer state).
        scalars_now = dict(scalars, setup=setup)
        if accelerator.scaler is not None:
            scalars_now["scaler"] = accelerator.scaler.state_dict()
        tmp = saved.sharded_tmp_dir(work_dir, step)
        if main:
            watchdog.check()
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        saved.save_shard(tmp, rank, local_training_state(names, optimizer, step, scalars_now), names)
        accelerator.wait_for_everyone()
        if main:
            try:
                saved.seal_sharded(work_dir, step, world, scalars_now)
            except ValueError as exc:
                raise StageError(f"cannot write the sharded checkpoint: {exc}", where=where,
                                 how="put the stage's work dir (the recipe's output) on a filesystem every process sees") from None
        accelerator.wait_for_everyone()
        return
    if main:
        watchdog.check()
        scalars_now = dict(scalars, setup=setup)
        if accelerator.scaler is not None:
            scalars_now["scaler"] = accelerator.scaler.state_dict()
        state = saved.TrainingState(
            step=step,
            model={n: p for n, p in unwrapped.named_parameters()},
            optimizer=optimizer.state_dict(),
            rng=saved.rng_state(),
            scalars=scalars_now,
        )
        saved.save_state(work_dir, state, names)
    accelerator.wait_for_everyone()
