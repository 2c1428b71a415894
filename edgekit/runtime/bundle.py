"""A bundle's runtime: its ``runtime.json`` (:class:`edgekit.runtime.config.RuntimeConfig`) turned into a
:class:`~edgekit.runtime.router.Router`, and calibration results written back.

``runtime.json`` is written by the bundle stage from the recipe's ``runtime:`` section and
updated by ``edgekit calibrate-router``. The small branch is the bundle itself; the large
branch is ``runtime.large``: an OpenAI-compatible endpoint or a bundle directory, relative
to this bundle. Command-line options override the file for one run without changing it.

A bundle is data from elsewhere, so what its runtime.json names is checked where it enters
(:func:`read_runtime_config`): ``large`` is an ``http(s)://`` URL, or a relative path whose
every component is a safe name (:mod:`edgekit.names`) and that stays inside the bundle once
symbolic links are followed. A large branch elsewhere on the machine is the caller's choice,
given with ``--large`` (``large=``), never read from the bundle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgekit.errors import EdgekitError

#: runtime.json is settings and a learned router's few hundred weights: far below this
RUNTIME_JSON_MAX_BYTES = 4 * 1024 * 1024


def read_runtime_config(bundle_dir: Path) -> Any:
    """The bundle's RuntimeConfig (defaults when the bundle predates runtime.json)."""
    from pydantic import ValidationError

    from edgekit.bundle.manifest import MANIFEST_NAME, RUNTIME_NAME
    from edgekit.runtime.config import RuntimeConfig, problem

    handle, bundle_dir = bundle_dir, Path(bundle_dir)
    if not (bundle_dir / MANIFEST_NAME).is_file():
        raise EdgekitError("not a bundle (no manifest.json)", where=str(bundle_dir),
                           how="pass a bundle directory written by `edgekit compress` (runs/<name>/stages/NN-bundle/<name>)")
    path = bundle_dir / RUNTIME_NAME
    if not path.is_file():
        return complete_config(handle, RuntimeConfig())
    if path.stat().st_size > RUNTIME_JSON_MAX_BYTES:  # the file is read whole: bound it first
        raise EdgekitError(f"runtime.json is over {RUNTIME_JSON_MAX_BYTES} bytes", where=str(path), how="rebuild the bundle")
    try:
        data = json.loads(path.read_text())
    except ValueError:
        raise EdgekitError("runtime.json is not valid JSON", where=str(path), how="rebuild the bundle") from None
    if not isinstance(data, dict):
        raise EdgekitError("runtime.json is not a JSON object", where=str(path), how="rebuild the bundle")
    data.pop("format", None)
    data.pop("calibration", None)
    data.pop("sources", None)  # where the bundle stage took each value from (a record, not a setting)
    if data.get("large") is not None:
        check_bundle_large(bundle_dir, data["large"], where=f"{path}: large")
    try:
        config = RuntimeConfig.model_validate(data)
    except ValidationError as exc:
        raise EdgekitError(f"runtime.json: {problem(exc)}", where=str(path),
                           how="fix the file or rebuild the bundle from its recipe") from None
    return complete_config(handle, config)


def complete_config(bundle_dir: Path, config: Any) -> Any:
    """``config`` with the values it leaves unset (sampling, ``max_new_tokens``: a runtime.json
    written by hand, or no runtime.json) filled in as the bundle stage fills them: the bundle's
    generation_config.json, else the defaults (edgekit.runtime.generation_config)."""
    from edgekit.runtime.config import RuntimeConfig
    from edgekit.runtime.generation_config import GENERATION_CONFIG, needs_resolving, read_generation_config, resolve_runtime

    data = config.model_dump()
    if not needs_resolving(data):
        return config
    handle, bundle_dir = bundle_dir, Path(bundle_dir)
    gen = read_generation_config(bundle_dir / GENERATION_CONFIG)
    reasoning_model = False
    if data.get("max_new_tokens") is None and "max_new_tokens" not in gen and config.reasoning != "off":
        reasoning_model = _bundle_reasons(bundle_dir, config.reasoning)
    context = _manifest_context(handle)
    resolved, _ = resolve_runtime(data, gen, reasoning_model=reasoning_model, context_length=context)
    return RuntimeConfig.model_validate(resolved)


def _bundle_reasons(bundle_dir: Path, mode: str) -> bool:
    from edgekit.runtime.reasoning import reasoning_enabled
    from edgekit.runtime.tokenizer import BundleTokenizer

    try:
        tokenizer = BundleTokenizer.from_dir(bundle_dir)
    except EdgekitError:
        return mode == "split"  # the branch's own load reports the tokenizer's problem
    return reasoning_enabled(mode, tokenizer, where=f"{bundle_dir / 'runtime.json'}: reasoning")


def _manifest_context(bundle_dir: Any) -> int:
    from edgekit.bundle.manifest import Bundle

    value = Bundle.open(bundle_dir).context_length  # a handle's own manifest: not read again
    return value if value is not None and value <= 1_048_576 else 2048


def resolve_config(bundle_dir: Path, **overrides: Any) -> Any:
    """The bundle's RuntimeConfig with the non-None ``overrides`` applied (and validated);
    ``sampling`` overrides are merged key by key."""
    from pydantic import ValidationError

    from edgekit.runtime.config import RuntimeConfig

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


def _recorded_sources(path: Path) -> dict | None:
    try:
        sources = json.loads(path.read_text()).get("sources")
    except (OSError, ValueError, AttributeError):
        return None
    return sources if isinstance(sources, dict) else None


_URL_MAX = 2048


def _url_problem(value: str) -> str | None:
    if len(value) > _URL_MAX:
        return f"the URL is {len(value)} characters long (at most {_URL_MAX})"
    if any(ord(c) < 33 or ord(c) == 127 for c in value):
        return "the URL contains whitespace, NUL or control characters"
    return None


def check_bundle_large(bundle_dir: Path, value: object, *, where: str) -> str:
    """``value`` if a bundle may name it as its large branch (module docstring): an http(s)
    URL, or a relative path inside the bundle; else a one-line :class:`EdgekitError`."""
    from edgekit.runtime.backends import bundle_file

    how = ("name an http(s):// endpoint or a bundle directory inside this bundle; give a large branch elsewhere "
           "with --large (edgekit run / serve)")
    if not isinstance(value, str) or not value:
        raise EdgekitError("invalid runtime.large: " + ("it is empty" if value == "" else f"a {type(value).__name__}, not a string"),
                           where=where, how=how)
    if value.startswith(("http://", "https://")):
        problem = _url_problem(value)
        if problem:
            raise EdgekitError(f"invalid runtime.large: {problem}", where=where, how=how)
        return value
    try:
        bundle_file(Path(bundle_dir), value, what="runtime.large (a bundle directory relative to this bundle)", where=where)
    except EdgekitError as exc:
        raise EdgekitError(exc.what, where=where, how=how) from None
    return value


def large_spec(bundle_dir: Path, large: str | None) -> str | None:
    """A URL as it is; a path relative to the bundle (absolute paths as they are: a value from
    runtime.json was checked by :func:`read_runtime_config`, one from the caller is theirs)."""
    if not large or large.startswith(("http://", "https://")):
        if large and _url_problem(large):
            raise EdgekitError(f"invalid large branch: {_url_problem(large)}", where="--large", how="pass a plain http(s):// URL")
        return large
    if "\x00" in large or len(large) > 4096:
        raise EdgekitError("invalid large branch: the path contains a NUL byte or is over 4096 characters", where="--large",
                           how="pass a bundle directory or an http(s):// URL")
    path = Path(large).expanduser()
    return str(path if path.is_absolute() else (Path(bundle_dir) / path).resolve())


def draft_variant(bundle_dir: Path, config: Any) -> str | None:
    """The ONNX variant the small branch loads: the bundle's draft graph when the policy is
    speculative (the small branch only proposes tokens there) and ``draft_graph`` is auto.
    ``bundle_dir`` may be a Bundle handle (its manifest is not read again)."""
    from edgekit.bundle.manifest import Bundle

    if config.policy != "speculative" or config.draft_graph != "auto":
        return None
    key, _ = Bundle.open(bundle_dir).graph_variant("draft")
    return key


def open_router(bundle_dir: Path, config: Any, *, threads: int | None = None) -> Any:
    """A Router over the bundle (small) and ``config.large`` per ``config``. ``bundle_dir`` may
    be a Bundle handle: the bundle's manifest is read once (here, or by whoever opened it)."""
    from edgekit.bundle.manifest import Bundle
    from edgekit.runtime.backends import load_branch
    from edgekit.runtime.router import Router

    bundle = Bundle.open(bundle_dir)
    small = load_branch(bundle, name="small", backend=config.backend, threads=threads, spin_wait=config.spin_wait,
                        variant=draft_variant(bundle, config))
    large = None
    spec = large_spec(bundle.dir, config.large)
    if spec:
        large = load_branch(spec, name="large", backend=config.backend if not spec.startswith("http") else "auto",
                            timeout=config.timeout_s, threads=threads, spin_wait=config.spin_wait)
    load = None
    if config.policy == "degrade":  # its budgets: runtime.degrade's, else the manifest's (budgets: in the recipe)
        from edgekit.runtime.load import load_monitor

        load = load_monitor(config.degrade, bundle.manifest.budgets)
    return Router(
        small, large, config.policy, thresholds=dict(config.thresholds), sampler_params=config.sampling.model_dump(),
        max_new_tokens=config.max_new_tokens, draft_tokens=config.draft_tokens, timeout_s=config.timeout_s,
        seed=config.sampling.seed, draft_min_confidence=config.draft_min_confidence, degrade=config.degrade, load=load,
        learned=config.learned,
    )


def write_calibration(bundle_dir: Path, config: Any, calibration: dict[str, Any]) -> Path:
    """Write ``config`` with the calibrated thresholds into the bundle's runtime.json (temp
    file + rename) with the calibration record, and refresh the manifest's sha256 list."""
    from edgekit.bundle.manifest import MANIFEST_NAME, RUNTIME_FORMAT, RUNTIME_NAME, bundle_files
    from edgekit.yamlio import atomic_write_json

    bundle_dir = Path(bundle_dir)
    stored = config
    if config.large:
        try:
            check_bundle_large(bundle_dir, config.large, where="large")
        except EdgekitError:
            # A large branch outside the bundle is the caller's, not the bundle's (module
            # docstring): keep runtime.json's own policy and large; store the thresholds.
            stored = read_runtime_config(bundle_dir)
            calibration["large_not_stored"] = config.large  # the caller's record says so too
    thresholds = dict(stored.thresholds)
    learned = stored.learned.model_dump(mode="json") if stored.learned is not None else None
    if calibration["policy"] == "input_complexity":
        thresholds.update(complexity=calibration["threshold"], length_weight=calibration["length_weight"])
    elif calibration["policy"] == "learned":
        thresholds.update(learned=calibration["threshold"])
        learned = calibration["learned"]
    else:
        thresholds.update(confidence=calibration["threshold"], quantile=calibration["quantile"],
                          min_tokens=calibration["min_tokens"], check=calibration["check"])
    policy = calibration["policy"] if stored is config else stored.policy
    data = {"format": RUNTIME_FORMAT, **stored.model_dump(mode="json"), "policy": policy, "thresholds": thresholds,
            "learned": learned, "calibration": {k: v for k, v in calibration.items() if k not in ("scores", "learned")}}
    sources = _recorded_sources(bundle_dir / RUNTIME_NAME)
    if sources is not None:  # where the bundle stage took each value from stays on record
        data["sources"] = sources
    atomic_write_json(bundle_dir / RUNTIME_NAME, data)
    manifest_path = bundle_dir / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["runtime"] = RUNTIME_NAME
    manifest["files"] = bundle_files(bundle_dir)
    atomic_write_json(manifest_path, manifest)
    return bundle_dir / RUNTIME_NAME
