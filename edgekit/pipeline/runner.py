"""Runs a recipe's stages in order with a content-addressed cache.

Layout of a run directory::

    <output>/manifest.json            what ran, how long, metrics, file hashes
    <output>/stages/01-load/          one directory per stage, written by that stage
    <output>/stages/01-load/stage.json    its record: cache key, metrics, file table

A stage writes into ``stages/.tmp-<NN>-<name>-<pid>`` and the runner renames that into
place only after the stage returned and its file table was written, so a directory under
``stages/`` is always complete. A stage's cache key hashes its type, its resolved
parameters, the content hashes of its input artifacts, the recipe sections it declares
(model, data, target, recipe) and the edgekit version. A rerun reuses every stage whose
key matches and whose files still hash to what its record says; a run killed (even with
SIGKILL) in stage k therefore redoes stage k and what follows, nothing before.
"""

from __future__ import annotations

import fcntl
import importlib
import json
import os
import time
from pathlib import Path
from typing import Any

from edgekit import __version__
from edgekit.errors import EdgekitError, OutputError, RecipeError, StageError
from edgekit.hashing import file_table, sha256_file, sha256_json
from edgekit.names import check_name, is_inside, remove_tree, rename_inside
from edgekit.pipeline.context import StageContext, StageRecord
from edgekit.pipeline.progress import Reporter
from edgekit.pipeline.registry import EarlierStage, ReferenceProblem, get_stage, section_fingerprint
from edgekit.yamlio import atomic_write_json

STAGES_DIR = "stages"
STAGE_RECORD = "stage.json"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "edgekit.manifest/1"


def default_cache_dir() -> Path:
    """Long-lived cache (converted checkpoints); ``EDGEKIT_CACHE_DIR`` overrides it."""
    env = os.environ.get("EDGEKIT_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgekit"


def stage_dir_name(index: int, name: str) -> str:
    # The recipe checked the name (edgekit.names); checked again here, where it becomes a path.
    check_name(name, what="stage name", error_cls=RecipeError)
    return f"{index + 1:02d}-{name}"


def artifact_hash(files: dict[str, dict[str, Any]]) -> str:
    return sha256_json(files)


class _Fingerprints:
    """Recipe sections folded into cache keys, computed at most once per run."""

    def __init__(self, loaded: Any, target: Any):
        self._loaded, self._target, self._cache = loaded, target, {}

    def host(self, function: str) -> Any:
        key = f"host:{function}"
        if key not in self._cache:
            module_name, func_name = function.split(":")
            self._cache[key] = getattr(importlib.import_module(module_name), func_name)()
        return self._cache[key]

    def get(self, section: str) -> Any:
        if section not in self._cache:
            recipe, base = self._loaded.recipe, self._loaded.base_dir
            if section == "target":
                value = self._target.model_dump(mode="json")
            elif section == "recipe":
                value = recipe.portable_dict()
            else:  # the model, the data: hashed by the package that reads them (edgekit.models)
                fingerprint = section_fingerprint(section)
                if fingerprint is None:
                    raise ValueError(f"unknown cache section {section!r}")
                value = fingerprint(recipe, base)
            self._cache[section] = value
        return self._cache[section]


def _computes_on_gpu(config: Any) -> bool:
    """Whether a stage with a ``device`` setting runs on a CUDA GPU here (``auto`` resolved,
    EDGEKIT_DEVICE applied): its result differs from the CPU's (other kernels, half precision),
    so a GPU run gets a key of its own and never reuses a CPU result or the reverse. CPU runs
    keep the key they always had."""
    from edgekit.devices import cuda_available, requested_device

    value = getattr(config, "device", None)
    if not isinstance(value, str):
        return False
    try:
        wanted = requested_device(value)
    except (ValueError, EdgekitError):
        return False  # the stage reports the bad setting itself, with its one-line error
    if wanted == "cpu":
        return False
    return wanted == "cuda" or cuda_available()


def _verify(stage_dir: Path, key: str) -> tuple[dict[str, Any] | None, str | None]:
    """The stage record if the directory is a complete result for ``key``; else why not."""
    record_path = stage_dir / STAGE_RECORD
    if not record_path.is_file():
        return None, None
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError, RecursionError):
        return None, "its stage.json is unreadable"
    if not isinstance(record, dict) or record.get("cache_key") != key:
        return None, None  # inputs or settings changed: simply stale
    files = record.get("files")
    if not isinstance(files, dict):
        return None, "its stage.json has no file table"
    for rel, meta in files.items():
        path = stage_dir / rel
        if not isinstance(meta, dict) or "\x00" in rel or not is_inside(path, stage_dir):
            return None, f"its stage.json has a bad entry ({rel[:60]!r})"
        if not path.is_file() or path.stat().st_size != meta.get("size"):
            return None, f"{rel} is missing or has the wrong size"
        if sha256_file(path) != meta.get("sha256"):
            return None, f"{rel} does not match its recorded sha256"
    return record, None


def _prepare_output(out: Path) -> None:
    try:
        (out / STAGES_DIR).mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise OutputError(
            f"output directory is not writable ({exc.strerror or exc})",
            where=str(out),
            how="set 'output' in the recipe or pass --output to a directory you can write",
        ) from None


def _lock(out: Path) -> Any:
    handle = open(out / ".edgekit.lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise OutputError(
            "another edgekit run is using this output directory",
            where=str(out),
            how="wait for it to finish, or use a different --output",
        ) from None
    return handle  # the OS drops the lock when the process dies, SIGKILL included


def _clean_leftovers(stages_dir: Path) -> None:
    # Temp dirs of a killed run (safe: we hold the lock, so nobody else writes here).
    for leftover in [*stages_dir.glob(".tmp-*"), *stages_dir.glob(".old-*")]:
        remove_tree(leftover, root=stages_dir)


def _stage_index(loaded: Any, name: str | None, option: str) -> int | None:
    if name is None:
        return None
    names = [spec.name for spec in loaded.recipe.stages]
    if name not in names:
        raise RecipeError(
            f"no stage named '{name}' for {option}",
            where=str(loaded.path),
            how=f"use one of: {', '.join(names)}",
        )
    return names.index(name)


def run_pipeline(
    loaded: Any,
    *,
    output: Path | None = None,
    force: bool = False,
    from_stage: str | None = None,
    until_stage: str | None = None,
    reporter: Reporter | None = None,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Run (or resume) the recipe's pipeline; returns the manifest (also written to disk)."""
    from edgekit.targets import load_target

    reporter = reporter or Reporter()
    recipe = loaded.recipe
    for warning in loaded.warnings:
        reporter.log(f"[yellow]warning:[/] {warning}")
    first = _stage_index(loaded, from_stage, "--from")
    last = _stage_index(loaded, until_stage, "--until")
    if first is not None and last is not None and last < first:
        raise RecipeError(
            f"--until {until_stage} comes before --from {from_stage}", where=str(loaded.path), how="swap them"
        )
    target = load_target(loaded.target_spec)
    out = Path(output) if output else recipe.output_dir
    _prepare_output(out)
    lock = _lock(out)
    try:
        return _run_locked(loaded, target, out, force, first, last, reporter, cache_dir or default_cache_dir())
    finally:
        lock.close()


def _run_locked(loaded, target, out, force, first, last, reporter, cache_dir) -> dict[str, Any]:
    recipe = loaded.recipe
    stages_dir = out / STAGES_DIR
    _clean_leftovers(stages_dir)
    fingerprints = _Fingerprints(loaded, target)
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "edgekit_version": __version__,
        "recipe": {"name": recipe.name, "file": str(loaded.path), "sha256": sha256_file(loaded.path)},
        "model": recipe.model,
        "target": target.name,
        "stages": [{"name": s.name, "type": s.type, "status": "pending"} for s in recipe.stages],
    }
    if getattr(loaded, "proxy", None):  # edgekit compress --proxy: what was scaled, so it is never taken for the real run
        manifest["proxy"] = loaded.proxy
    history: list[StageRecord] = []
    stop = last if last is not None else len(recipe.stages) - 1
    for index, spec in enumerate(recipe.stages[: stop + 1]):
        stage = get_stage(spec.type)
        config = stage.config.model_validate(spec.params)
        inputs: dict[str, str] = {}
        for alternatives in stage.requires:
            record = next(r for r in reversed(history) if r.produces in alternatives)
            inputs[record.produces] = record.artifact_hash
        references = _references(stage, config, history, spec)
        key_parts = {
            "edgekit": __version__,
            "type": spec.type,
            "params": config.model_dump(mode="json"),
            "inputs": inputs,
            "uses": {section: fingerprints.get(section) for section in stage.uses},
        }
        if references:
            key_parts["references"] = {role: r.artifact_hash for role, r in references.items()}
        if stage.host:
            key_parts["host"] = fingerprints.host(stage.host)
        if _computes_on_gpu(config):
            key_parts["device"] = "cuda"
        key = sha256_json(key_parts)
        final = stages_dir / stage_dir_name(index, spec.name)
        rerun = force or (first is not None and index >= first)
        record, damage = (None, None) if rerun else _verify(final, key)
        if damage:
            reporter.log(f"[yellow]cached result of stage '{spec.name}' is damaged ({damage}); running it again[/]")
        if record is None and first is not None and index < first:
            raise StageError(
                f"cannot start from '{recipe.stages[first].name}': stage '{spec.name}' before it has no valid cached result",
                where=str(final),
                how="run without --from (earlier stages are reused when their cache is valid)",
            )
        if record is not None:
            status = "cached"
            reporter.log(f"[green]✓[/] {spec.name:<14} cached  ({record['seconds']:.1f}s originally){_summary(record['metrics'])}")
        else:
            status = "done"
            record = _run_stage(index, spec, stage, config, key, final, loaded, target, history, cache_dir, reporter, manifest, out,
                                references)
        entry = {
            "name": spec.name,
            "type": spec.type,
            "status": status,
            "seconds": record["seconds"],
            "cache_key": key,
            "dir": final.relative_to(out).as_posix(),
            "metrics": record["metrics"],
            "files": record["files"],
        }
        manifest["stages"][index] = entry
        history.append(
            StageRecord(spec.name, spec.type, final, stage.produces, record["metrics"], artifact_hash(record["files"]))
        )
        atomic_write_json(out / MANIFEST, manifest)
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def _summary(metrics: dict[str, Any]) -> str:
    shown = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items() if not isinstance(v, (dict, list))]
    return ("  " + " ".join(shown[:4])) if shown else ""


def _references(stage, config, history, spec) -> dict[str, StageRecord]:
    if stage.references is None:
        return {}
    earlier = [EarlierStage(r.name, r.type, r.produces) for r in history]
    try:
        return {role: history[i] for role, i in stage.references(config, earlier).items()}
    except ReferenceProblem as exc:  # validation catches this earlier; --until can still get here
        raise StageError(str(exc), where=f"stage {spec.name}", how=exc.how) from None


def _work_dir(final: Path, key: str) -> Path:
    """A resumable-work directory for this stage and cache key; other keys' leftovers go."""
    root = final.parent / f".work-{final.name}"
    for stale in root.glob("*"):
        if stale.name != key[:20]:
            remove_tree(stale, root=final.parent)
    return root / key[:20]


def _run_stage(index, spec, stage, config, key, final, loaded, target, history, cache_dir, reporter, manifest, out, references):
    stages_dir = final.parent
    tmp = stages_dir / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir(parents=True)
    work_dir = _work_dir(final, key)
    ctx = StageContext(
        name=spec.name,
        type=spec.type,
        index=index,
        config=config,
        recipe=loaded.recipe,
        recipe_dir=loaded.base_dir,
        target=target,
        output_dir=tmp,
        inputs={r.produces: r.dir for r in history if r.produces},
        history=list(history),
        cache_dir=cache_dir,
        reporter=reporter,
        work_dir=work_dir,
        references={role: r.dir for role, r in references.items()},
    )
    reporter.log(f"[bold]▶ {spec.name}[/] ({spec.type})")
    started = time.perf_counter()
    try:
        metrics = stage.load_function()(ctx) or {}
    except BaseException as exc:
        remove_tree(tmp, root=stages_dir)
        manifest["stages"][index] = {"name": spec.name, "type": spec.type, "status": "failed", "error": str(exc)}
        atomic_write_json(out / MANIFEST, manifest)
        if isinstance(exc, EdgekitError) and not exc.where:
            raise type(exc)(exc.what, where=f"stage {spec.name}", how=exc.how) from exc
        raise
    seconds = round(time.perf_counter() - started, 3)
    files = file_table(tmp)
    record = {"name": spec.name, "type": spec.type, "cache_key": key, "seconds": seconds, "metrics": metrics, "files": files}
    atomic_write_json(tmp / STAGE_RECORD, record)
    # Swap into place: the old result (if any) moves aside first, so `final` is never half-written.
    if final.exists():
        old = stages_dir / f".old-{final.name}-{os.getpid()}"
        rename_inside(final, old, root=stages_dir)
        rename_inside(tmp, final, root=stages_dir)
        remove_tree(old, root=stages_dir)
    else:
        rename_inside(tmp, final, root=stages_dir)
    remove_tree(work_dir.parent, root=stages_dir)  # resumable state is spent once the result is in place
    reporter.log(f"[green]✓[/] {spec.name:<14} done    ({seconds:.1f}s){_summary(metrics)}")
    return record
