"""Typed functions behind the CLI (and for use from Python).

Everything here raises :class:`edgekit.errors.EdgekitError` subclasses for problems a user
can fix; the CLI turns them into one line and exit code 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgekit.errors import EdgekitError
from edgekit.pipeline.progress import Reporter


def validate_recipe(path: str | Path, *, check_sources: bool = True):
    """Parse + validate a recipe (stages, target, model and data paths). Returns a LoadedRecipe."""
    from edgekit.recipe import load_recipe

    return load_recipe(path, check_sources=check_sources)


def show_recipe(path: str | Path, *, fmt: str = "yaml") -> str:
    """The fully resolved recipe (all defaults filled in) as YAML or JSON."""
    import json

    loaded = validate_recipe(path)
    if fmt == "json":
        return json.dumps(loaded.recipe.to_dict(), indent=2)
    return loaded.recipe.to_yaml()


def compress(
    path: str | Path,
    *,
    output: str | Path | None = None,
    force: bool = False,
    from_stage: str | None = None,
    until_stage: str | None = None,
    quiet: bool = False,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Run the recipe's pipeline, reusing valid cached stages. Returns the run manifest."""
    from edgekit.pipeline.runner import run_pipeline

    loaded = validate_recipe(path)
    return run_pipeline(
        loaded,
        output=Path(output) if output else None,
        force=force,
        from_stage=from_stage,
        until_stage=until_stage,
        reporter=Reporter(quiet=quiet),
        cache_dir=Path(cache_dir) if cache_dir else None,
    )


def list_targets():
    from edgekit.targets import list_targets as _list

    return _list()


def show_target(name: str):
    from edgekit.targets import load_target

    return load_target(name)


def list_stages():
    from edgekit.pipeline.registry import all_stages

    return all_stages()


def plan(
    source: str | Path,
    *,
    target: str | None = None,
    all_targets: bool = False,
    context_length: int | None = None,
    batch: int | None = None,
    precision: str | None = None,
    group_size: int | None = None,
    power_mode: str | None = None,
    prompt_tokens: int = 128,
    budget_ms: float | None = None,
    kv_fill: float = 0.5,
    prefill_chunk: int | None = None,
) -> dict[str, Any]:
    """Predicted memory fit, decode speed and time to first token on each target, from the
    model's config alone (see :mod:`edgekit.planning`). ``source`` is a recipe (.yaml) or a
    model spec (smollm2-135m, a checkpoint directory, a .gguf, a hub id with a cached config).
    Returns the plan as a JSON-ready dict (``edgekit.plan/1``)."""
    from edgekit.planning.request import plan_request

    request, targets = plan_request(
        source, target=target, all_targets=all_targets, context_length=context_length, batch=batch,
        precision=precision, group_size=group_size, power_mode=power_mode, prompt_tokens=prompt_tokens,
        budget_ms=budget_ms, kv_fill=kv_fill, prefill_chunk=prefill_chunk,
    )
    from edgekit.planning.report import build_plan

    return build_plan(request, targets)



# --------------------------------------------------------------------------- TensorRT engines


def _engine_inputs(path: str | Path) -> tuple[Path, str | None, dict[str, Any] | None]:
    """(bundle directory, ONNX path relative to it or None for the manifest's, manifest or None)
    for a bundle directory or a bare .onnx file."""
    from edgekit.engine.prepare import MANIFEST, read_manifest
    from edgekit.errors import EngineError

    path = Path(path)
    if path.is_dir():
        return path, None, read_manifest(path)
    if path.is_file() and path.suffix == ".onnx":
        # an .onnx inside a bundle is that bundle's graph; the engine files go into the bundle
        for parent in (path.parent, path.parent.parent):
            if (parent / MANIFEST).is_file():
                return parent, path.relative_to(parent).as_posix(), read_manifest(parent)
        return path.parent, path.name, None
    if path.is_file() and path.name.endswith((".tar", ".tar.gz")):
        raise EngineError("a bundle archive, not a bundle directory", where=str(path),
                          how=f"extract it first (tar -xf {path.name}) and pass the directory")
    raise EngineError("no bundle directory or .onnx file here", where=str(path),
                      how="pass a bundle directory written by `edgekit compress` (runs/<name>/stages/NN-build_engine/<name>) "
                      "or an exported .onnx file")


def _engine_target(target: str | Path | None, manifest: dict[str, Any] | None, where: Path):
    from edgekit.errors import EngineError
    from edgekit.targets import load_target

    name = target or (manifest or {}).get("target")
    if not name:
        raise EngineError("no target given and the ONNX file has no bundle manifest naming one", where=str(where),
                          how="pass --target NAME (see `edgekit targets list`)")
    return load_target(name, where="--target")


def build_engine(
    path: str | Path,
    *,
    target: str | Path | None = None,
    options: Any = None,
    build: str = "auto",
    check: bool = True,
    context_length: int | None = None,
    backend: str = "tensorrt",
    echo: Any = None,
) -> dict[str, Any]:
    """TensorRT engine for ``target`` from a bundle (in place) or a bare .onnx file.

    ``backend="tensorrt"``: readiness checks, the exact settings, the trtexec script and
    ``build_engine.sh``, and the engine when this machine has TensorRT and the target's GPU
    (``build``: auto | always | never). ``backend="ort-tensorrt"``: ONNX Runtime's TensorRT
    execution provider builds and caches its engines under ``engine/ort-<target>/`` (needs
    ``onnxruntime-gpu``). Returns a summary; see :mod:`edgekit.engine.prepare`."""
    from edgekit.engine.prepare import prepare_engine, settings_for
    from edgekit.engine.settings import BuildOptions
    from edgekit.errors import EngineError

    bundle_dir, onnx_rel, manifest = _engine_inputs(path)
    target_obj = _engine_target(target, manifest, Path(path))
    options = options or BuildOptions()
    if backend == "tensorrt":
        summary = prepare_engine(bundle_dir, target_obj, options, build=build, check=check,  # type: ignore[arg-type]
                                 context_length=context_length, onnx_rel=onnx_rel, echo=echo)
    elif backend == "ort-tensorrt":
        if manifest is None:
            raise EngineError("the ONNX Runtime TensorRT backend runs on a bundle", where=str(path),
                              how="pass the bundle directory (it holds manifest.json)")
        from edgekit.engine.ort_providers import warm_engine_cache
        from edgekit.engine.prepare import record_engine

        settings = settings_for(bundle_dir, target_obj, options, manifest=manifest, context_length=context_length)
        summary = warm_engine_cache(bundle_dir, settings, echo=echo)
        record_engine(bundle_dir, manifest, f"ort-{target_obj.name}", summary)
    else:
        raise EngineError(f"unknown backend {backend!r}", where="--backend", how="use tensorrt or ort-tensorrt")
    summary["bundle"] = str(bundle_dir)
    return summary


def check_tensorrt(
    path: str | Path,
    *,
    target: str | Path | None = None,
    options: Any = None,
    context_length: int | None = None,
) -> dict[str, Any]:
    """TensorRT readiness of a bundle's (or a bare .onnx file's) graph for ``target``: the same
    checks ``build-engine`` runs first, with the same profiles, but graph/target mismatches
    (FP8 on Orin, ...) are reported as findings instead of raised. Writes nothing."""
    from edgekit.engine.prepare import run_checks, settings_for
    from edgekit.engine.settings import BuildOptions

    bundle_dir, onnx_rel, manifest = _engine_inputs(path)
    target_obj = _engine_target(target, manifest, Path(path))
    options = options or BuildOptions()
    variants = ((manifest or {}).get("onnx") or {}).get("variants") or {}
    if onnx_rel is None and variants and not ({"tensorrt", "float"} & set(variants)):
        # an ONNX Runtime-only bundle: check its graph as it is (MatMulNBits -> ort-only-op errors)
        from edgekit.engine.readiness import check_bundle

        return check_bundle(bundle_dir, target=target_obj, max_batch=options.max_batch, workspace_gb=options.workspace_gb,
                            context_length=context_length)
    settings = settings_for(bundle_dir, target_obj, options, manifest=manifest, context_length=context_length,
                            onnx_rel=onnx_rel, strict=False)
    report = run_checks(bundle_dir, settings, target_obj, options)
    report["bundle"] = str(bundle_dir)
    report["profiles"] = {p.name: {name: [list(s) for s in triple] for name, triple in p.shapes.items()} for p in settings.profiles}
    report["notes"] = list(settings.notes)
    return report



# --------------------------------------------------------------------------- runtime


def run_prompt(
    bundle: str | Path,
    prompt: str,
    *,
    policy: str | None = None,
    large: str | None = None,
    backend: str | None = None,
    max_new_tokens: int | None = None,
    sampling: dict[str, Any] | None = None,
    threads: int | None = None,
    on_event: Any = None,
) -> dict[str, Any]:
    """Answer ``prompt`` with the bundle's runtime (its runtime.json; arguments override it for
    this call). ``on_event(StreamEvent)`` receives "text" pieces, "reset" and "done" as they
    happen. Returns the RouteResult as a dict (text, branch, fell_back, reason, ttft_s, ...)."""
    from edgekit.runtime.bundle import open_router, resolve_config

    config = resolve_config(Path(bundle), policy=policy, large=large, backend=backend, max_new_tokens=max_new_tokens,
                            sampling=sampling)
    router = open_router(Path(bundle), config, threads=threads)
    result = None
    for event in router.stream(prompt):
        if on_event is not None:
            on_event(event)
        if event.kind == "done":
            result = event.result
    return result.to_dict()


def calibrate_router(
    bundle: str | Path,
    *,
    large_rate: float = 0.3,
    policy: str | None = None,
    large: str | None = None,
    prompts: int = 64,
    max_new_tokens: int | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Fit the router threshold so that ``large_rate`` of held-out prompts (the calibration half
    of the built-in text's held-out split) reach the large branch; write it into the bundle's
    runtime.json. ``policy`` defaults to the bundle's when it is input_complexity or cascade,
    else cascade. Returns the calibration record (with the rate achieved on the evaluation half)."""
    from edgekit.runtime.bundle import open_router, resolve_config, write_calibration
    from edgekit.runtime.calibration import CALIBRATABLE, apply_calibration, calibrate, held_out_prompts

    bundle = Path(bundle)
    base = resolve_config(bundle, large=large)
    chosen = policy or (base.policy if base.policy in CALIBRATABLE else "cascade")
    config = resolve_config(bundle, policy=chosen, large=large, max_new_tokens=max_new_tokens)
    router = open_router(bundle, config, threads=threads)
    tokenizer = router.small.tokenizer
    record = calibrate(router, held_out_prompts(tokenizer, prompts, split="calibration"), policy=chosen, large_rate=large_rate)
    # The share that goes large on prompts the threshold was not fitted on (the evaluation
    # half), from the small branch's scores alone: the large branch is never called here.
    apply_calibration(router, record)
    held_out = held_out_prompts(tokenizer, prompts, split="evaluation")
    if chosen == "input_complexity":
        large_calls = sum(router.prompt_score(p) > router.thresholds.complexity for p in held_out)
    else:
        large_calls = sum(router.confidence_score(p) < router.thresholds.confidence for p in held_out)
    record["large_rate_held_out"] = large_calls / len(held_out)
    record["n_prompts_held_out"] = len(held_out)
    record["written"] = str(write_calibration(bundle, config, record))
    return record


__all__ = ["EdgekitError", "validate_recipe", "show_recipe", "compress", "list_targets", "show_target", "list_stages", "plan", "build_engine", "check_tensorrt", "run_prompt", "calibrate_router"]
