"""A bundle's runtime: its ``runtime.json`` (``edgekit.recipe.RuntimeConfig``) turned into a
:class:`~edgekit.runtime.router.Router`, and calibration results written back.

``runtime.json`` is written by the bundle stage from the recipe's ``runtime:`` section and
updated by ``edgekit calibrate-router``. The small branch is the bundle itself; the large
branch is ``runtime.large``: an OpenAI-compatible endpoint or a bundle directory, relative
to this bundle. Command-line options override the file for one run without changing it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgekit.errors import EdgekitError


def read_runtime_config(bundle_dir: Path) -> Any:
    """The bundle's RuntimeConfig (defaults when the bundle predates runtime.json)."""
    from pydantic import ValidationError

    from edgekit.bundle.writer import MANIFEST_NAME, RUNTIME_NAME
    from edgekit.recipe import RuntimeConfig

    bundle_dir = Path(bundle_dir)
    if not (bundle_dir / MANIFEST_NAME).is_file():
        raise EdgekitError("not a bundle (no manifest.json)", where=str(bundle_dir),
                           how="pass a bundle directory written by `edgekit compress` (runs/<name>/stages/NN-bundle/<name>)")
    path = bundle_dir / RUNTIME_NAME
    if not path.is_file():
        return RuntimeConfig()
    try:
        data = json.loads(path.read_text())
    except ValueError:
        raise EdgekitError("runtime.json is not valid JSON", where=str(path), how="rebuild the bundle") from None
    data.pop("format", None)
    data.pop("calibration", None)
    try:
        return RuntimeConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise EdgekitError(f"runtime.json: {'.'.join(map(str, first['loc'])) or 'value'}: {first['msg']}", where=str(path),
                           how="fix the file or rebuild the bundle from its recipe") from None


def resolve_config(bundle_dir: Path, **overrides: Any) -> Any:
    """The bundle's RuntimeConfig with the non-None ``overrides`` applied (and validated);
    ``sampling`` overrides are merged key by key."""
    from pydantic import ValidationError

    from edgekit.recipe import RuntimeConfig

    config = read_runtime_config(bundle_dir).model_dump()
    sampling = overrides.pop("sampling", None) or {}
    config.update({k: v for k, v in overrides.items() if v is not None})
    config["sampling"].update({k: v for k, v in sampling.items() if v is not None})
    try:
        return RuntimeConfig.model_validate(config)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(map(str, first["loc"])) or "runtime"
        raise EdgekitError(f"{field}: {first['msg'].removeprefix('Value error, ')}", where=f"--{field.replace('_', '-')}",
                           how="fix the option (see edgekit run --help)") from None


def large_spec(bundle_dir: Path, large: str | None) -> str | None:
    """A URL as it is; a path relative to the bundle (absolute paths as they are)."""
    if not large or large.startswith(("http://", "https://")):
        return large
    path = Path(large).expanduser()
    return str(path if path.is_absolute() else (Path(bundle_dir) / path).resolve())


def draft_variant(bundle_dir: Path, config: Any) -> str | None:
    """The ONNX variant the small branch loads: the bundle's draft graph when the policy is
    speculative (the small branch only proposes tokens there) and ``draft_graph`` is auto."""
    from edgekit.export.stage import DRAFT_VARIANT
    from edgekit.runtime.backends import _read_manifest

    if config.policy != "speculative" or config.draft_graph != "auto":
        return None
    variants = (_read_manifest(Path(bundle_dir)).get("onnx") or {}).get("variants") or {}
    return DRAFT_VARIANT if DRAFT_VARIANT in variants else None


def open_router(bundle_dir: Path, config: Any, *, threads: int | None = None) -> Any:
    """A Router over the bundle (small) and ``config.large`` per ``config``."""
    from edgekit.runtime.backends import load_branch
    from edgekit.runtime.router import Router

    bundle_dir = Path(bundle_dir)
    small = load_branch(bundle_dir, name="small", backend=config.backend, threads=threads, spin_wait=config.spin_wait,
                        variant=draft_variant(bundle_dir, config))
    large = None
    spec = large_spec(bundle_dir, config.large)
    if spec:
        large = load_branch(spec, name="large", backend=config.backend if not spec.startswith("http") else "auto",
                            timeout=config.timeout_s, threads=threads, spin_wait=config.spin_wait)
    return Router(
        small, large, config.policy, thresholds=dict(config.thresholds), sampler_params=config.sampling.model_dump(),
        max_new_tokens=config.max_new_tokens, draft_tokens=config.draft_tokens, timeout_s=config.timeout_s,
        seed=config.sampling.seed, draft_min_confidence=config.draft_min_confidence,
    )


def write_calibration(bundle_dir: Path, config: Any, calibration: dict[str, Any]) -> Path:
    """Write ``config`` with the calibrated thresholds into the bundle's runtime.json (temp
    file + rename) with the calibration record, and refresh the manifest's sha256 list."""
    from edgekit.bundle.writer import MANIFEST_NAME, RUNTIME_FORMAT, RUNTIME_NAME, bundle_files
    from edgekit.yamlio import atomic_write_json

    bundle_dir = Path(bundle_dir)
    thresholds = dict(config.thresholds)
    if calibration["policy"] == "input_complexity":
        thresholds.update(complexity=calibration["threshold"], length_weight=calibration["length_weight"])
    else:
        thresholds.update(confidence=calibration["threshold"], quantile=calibration["quantile"],
                          min_tokens=calibration["min_tokens"], check=calibration["check"])
    data = {"format": RUNTIME_FORMAT, **config.model_dump(mode="json"), "policy": calibration["policy"], "thresholds": thresholds,
            "calibration": {k: v for k, v in calibration.items() if k != "scores"}}
    atomic_write_json(bundle_dir / RUNTIME_NAME, data)
    manifest_path = bundle_dir / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["runtime"] = RUNTIME_NAME
    manifest["files"] = bundle_files(bundle_dir)
    atomic_write_json(manifest_path, manifest)
    return bundle_dir / RUNTIME_NAME
