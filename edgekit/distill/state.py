"""Resumable training state on disk, without pickle.

One checkpoint is a directory ``step-NNNNNNNN/`` in the stage's work dir::

    model.safetensors      the trainable model's parameters (float32 master weights)
    optimizer.safetensors  per-parameter optimizer tensors, keyed "<param name>/<field>"
    rng.safetensors        torch RNG states as uint8 tensors ("cpu", "cuda.0", ...)
    state.json             everything else: step, optimizer hyper-parameters, scheduler,
                           elapsed time, history; plus the size of every file above

It is written into ``.tmp-step-…`` first (every file fsynced, state.json last) and renamed
into place, then older checkpoints are removed: a kill -9 at any moment leaves the previous
complete checkpoint or the new complete one. Loading takes the newest directory whose
state.json parses and whose files have their recorded sizes.

Under FSDP no process holds the whole model or optimizer: each rank writes its own shard
(the local pieces of its parameters and their optimizer tensors, exactly as they are in
memory, plus its RNG state) into ``rank-NNNNN/`` of the same temporary directory; once every
rank is done, rank 0 writes ``state.json`` (format ``…sharded/1``: the world size and every
shard's file sizes) and renames the directory into place. Resuming needs the same number of
processes and the same FSDP wrapping (the setup check in the training loop), which is what a
preempted job restarted with the same command has. The work dir must be on a filesystem every
rank sees (one node: any local disk). No pickle and no torch.distributed.checkpoint (whose
metadata is a pickle) either way.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATE_FORMAT = "edgekit.distill.state/1"
SHARDED_FORMAT = "edgekit.distill.state.sharded/1"
PREFIX = "step-"
FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors")


@dataclass
class TrainingState:
    step: int
    model: dict[str, Any]  # parameter name -> tensor
    optimizer: dict[str, Any]  # an optimizer state_dict (torch's layout, index keyed)
    rng: dict[str, Any]  # "cpu" / "cuda.N" -> uint8 tensor
    scalars: dict[str, Any] = field(default_factory=dict)  # JSON: scheduler, elapsed, history, ...
    path: Path | None = None


# -- optimizer state <-> (tensors, JSON) --------------------------------------------------


def optimizer_to_files(state_dict: dict[str, Any], names: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into safetensors-able tensors and JSON.

    ``names[i]`` is the name of the parameter the optimizer calls ``i`` (param_groups order).
    Tensors are keyed ``"<name>/<field>"``; non-tensor per-parameter values go to JSON.
    """
    import torch

    tensors: dict[str, Any] = {}
    extra: dict[str, dict[str, Any]] = {}
    for index, values in state_dict["state"].items():
        name = names[int(index)]
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{name}/{key}"] = value.detach().contiguous().cpu()
            else:
                extra.setdefault(name, {})[key] = value
    groups = []
    for group in state_dict["param_groups"]:
        group = dict(group)
        group["params"] = [names[int(i)] for i in group["params"]]
        groups.append(group)
    return tensors, {"param_groups": groups, "extra": extra}


def optimizer_from_files(tensors: dict[str, Any], meta: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The inverse of :func:`optimizer_to_files`: a state_dict for ``optimizer.load_state_dict``."""
    index_of = {name: i for i, name in enumerate(names)}
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        name, _, entry = key.rpartition("/")
        if name not in index_of:
            raise ValueError(f"optimizer state for unknown parameter {name!r}")
        state.setdefault(index_of[name], {})[entry] = value
    for name, values in meta.get("extra", {}).items():
        state.setdefault(index_of[name], {}).update(values)
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        group["params"] = [index_of[n] for n in group["params"]]
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


def rng_state() -> dict[str, Any]:
    import torch

    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda.{i}"] = s
    return states


def set_rng_state(states: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(states["cpu"])
    if torch.cuda.is_available():
        cuda = [states[f"cuda.{i}"] for i in range(torch.cuda.device_count()) if f"cuda.{i}" in states]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


# -- save / load -------------------------------------------------------------------------


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def save_state(work_dir: Path, state: TrainingState, names: list[str]) -> Path:
    """Write ``state`` atomically as ``work_dir/step-NNNNNNNN``; remove older checkpoints."""
    from safetensors.torch import save_file

    work_dir.mkdir(parents=True, exist_ok=True)
    final = work_dir / checkpoint_name(state.step)
    tmp = work_dir / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model = {k: v.detach().contiguous().cpu() for k, v in state.model.items()}
    opt_tensors, opt_meta = optimizer_to_files(state.optimizer, names)
    save_file(model, tmp / "model.safetensors", metadata={"format": "pt"})
    save_file(opt_tensors, tmp / "optimizer.safetensors", metadata={"format": "pt"})
    save_file({k: v.contiguous().cpu() for k, v in state.rng.items()}, tmp / "rng.safetensors")
    record = {
        "format": STATE_FORMAT,
        "step": state.step,
        "optimizer": opt_meta,
        "scalars": state.scalars,
        "files": {name: (tmp / name).stat().st_size for name in FILES},
    }
    (tmp / "state.json").write_text(json.dumps(record, indent=1) + "\n")
    for name in (*FILES, "state.json"):
        _fsync(tmp / name)
    _fsync(tmp)
    return _swap_in(tmp, final, work_dir)


def _swap_in(tmp: Path, final: Path, work_dir: Path) -> Path:
    """Rename a complete checkpoint into place (an existing one of the same step, from a
    resumed run replaying it, moves aside first) and drop every older checkpoint."""
    from edgekit.names import remove_tree, rename_inside

    if final.exists():
        old = work_dir / f".old-{final.name}-{os.getpid()}"
        rename_inside(final, old, root=work_dir)
        remove_tree(old, root=work_dir)
    rename_inside(tmp, final, root=work_dir)
    _fsync(work_dir)
    for other in work_dir.glob(f"{PREFIX}*"):
        if other != final:
            remove_tree(other, root=work_dir)
    return final


def _files_complete(path: Path, sizes: Any) -> bool:
    if not isinstance(sizes, dict):
        return False
    for name in FILES:
        file = path / name
        if not file.is_file() or file.stat().st_size != sizes.get(name):
            return False
    return True


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((path / "state.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    if record.get("format") == STATE_FORMAT:
        return record if _files_complete(path, record.get("files")) else None
    if record.get("format") == SHARDED_FORMAT:
        shards = record.get("shards")
        world = record.get("world")
        if not isinstance(world, int) or not isinstance(shards, list) or len(shards) != world or world < 1:
            return None
        for rank, shard in enumerate(shards):
            if not isinstance(shard, dict) or not _files_complete(rank_dir(path, rank), shard.get("files")):
                return None
        return record
    return None


def latest_checkpoint(work_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest complete checkpoint directory and its state.json, or None."""
    if not work_dir.is_dir():
        return None
    candidates = sorted((p for p in work_dir.glob(f"{PREFIX}*") if p.is_dir()), reverse=True)
    for path in candidates:
        record = _read_record(path)
        if record is not None:
            return path, record
    return None


def load_state(work_dir: Path, names: list[str], *, rank: int | None = None) -> TrainingState | None:
    """The newest complete checkpoint in ``work_dir`` (tensors on CPU), or None.

    ``rank`` None reads a whole-model checkpoint (a sharded one is skipped: None); a rank
    number reads that rank's shard of a sharded checkpoint (a whole-model one: None)."""
    from safetensors.torch import load_file

    found = latest_checkpoint(work_dir)
    if found is None:
        return None
    path, record = found
    if (record["format"] == SHARDED_FORMAT) != (rank is not None):
        return None
    if rank is not None:
        if rank >= record["world"]:
            return None
        shard = rank_dir(path, rank)
        meta = record["shards"][rank]
        return TrainingState(
            step=int(record["step"]),
            model=load_file(shard / "model.safetensors"),
            optimizer=optimizer_from_files(load_file(shard / "optimizer.safetensors"), meta["optimizer"], names),
            rng=load_file(shard / "rng.safetensors"),
            scalars=record.get("scalars", {}),
            path=path,
        )
    optimizer = optimizer_from_files(load_file(path / "optimizer.safetensors"), record["optimizer"], names)
    return TrainingState(
        step=int(record["step"]),
        model=load_file(path / "model.safetensors"),
        optimizer=optimizer,
        rng=load_file(path / "rng.safetensors"),
        scalars=record.get("scalars", {}),
        path=path,
    )


# -- sharded (FSDP): every rank writes its shard, rank 0 seals the checkpoint ------------------


def rank_dir(path: Path, rank: int) -> Path:
    return path / f"rank-{rank:05d}"


def sharded_tmp_dir(work_dir: Path, step: int) -> Path:
    """The directory every rank writes step ``step``'s shard into (one name for all ranks)."""
    return work_dir / f".tmp-{checkpoint_name(step)}-sharded"


def save_shard(tmp: Path, rank: int, state: TrainingState, names: list[str]) -> None:
    """Rank ``rank``'s part of a sharded checkpoint: its local parameter pieces, optimizer
    tensors and RNG, fsynced, then ``shard.json`` (optimizer metadata and the file sizes)."""
    from safetensors.torch import save_file

    directory = rank_dir(tmp, rank)
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    model = {k: v.detach().contiguous().cpu() for k, v in state.model.items()}
    opt_tensors, opt_meta = optimizer_to_files(state.optimizer, names)
    save_file(model, directory / "model.safetensors", metadata={"format": "pt"})
    save_file(opt_tensors, directory / "optimizer.safetensors", metadata={"format": "pt"})
    save_file({k: v.contiguous().cpu() for k, v in state.rng.items()}, directory / "rng.safetensors")
    shard = {"rank": rank, "optimizer": opt_meta, "files": {name: (directory / name).stat().st_size for name in FILES}}
    (directory / "shard.json").write_text(json.dumps(shard, indent=1) + "\n")
    for name in (*FILES, "shard.json"):
        _fsync(directory / name)
    _fsync(directory)


def seal_sharded(work_dir: Path, step: int, world: int, scalars: dict[str, Any]) -> Path:
    """Rank 0, after every rank's :func:`save_shard` returned: write state.json, rename the
    directory into place, remove older checkpoints. Raises ValueError for a missing shard."""
    tmp = sharded_tmp_dir(work_dir, step)
    shards = []
    for rank in range(world):
        try:
            shard = json.loads((rank_dir(tmp, rank) / "shard.json").read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"rank {rank} wrote no complete shard into {tmp} ({exc}); is the work dir shared by every rank?") from None
        if not _files_complete(rank_dir(tmp, rank), shard.get("files")):
            raise ValueError(f"rank {rank}'s shard in {tmp} is incomplete")
        shards.append({"optimizer": shard["optimizer"], "files": shard["files"]})
    record = {"format": SHARDED_FORMAT, "step": step, "world": world, "shards": shards, "scalars": scalars}
    (tmp / "state.json").write_text(json.dumps(record, indent=1) + "\n")
    _fsync(tmp / "state.json")
    _fsync(tmp)
    return _swap_in(tmp, work_dir / checkpoint_name(step), work_dir)


def clean_temporaries(work_dir: Path) -> None:
    """Remove half-written checkpoints a killed run left (call while holding the run lock)."""
    if work_dir.is_dir():
        for leftover in [*work_dir.glob(".tmp-*"), *work_dir.glob(".old-*")]:
            shutil.rmtree(leftover, ignore_errors=True)
