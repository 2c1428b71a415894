"""Typed functions behind the CLI (and for use from Python).

Everything here raises :class:`edgekit.errors.EdgekitError` subclasses for problems a user
can fix; the CLI turns them into one line and exit code 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgekit.errors import EdgekitError
from edgekit.pipeline.progress import Reporter

if TYPE_CHECKING:
    from edgekit.engine.options import BuildMode, BuildOptions


def validate_recipe(path: str | Path, *, check_sources: bool = True):
    """Parse + validate a recipe (stages, target, model and data paths). Returns a LoadedRecipe."""
    from edgekit.preflight import load_recipe

    return load_recipe(path, check_sources=check_sources)


def recipe_chain(loaded: Any) -> Any:
    """The recipe walked stage by stage from the model's config (shape, parameters, memory,
    tokens per stage: :class:`edgekit.planning.chain.Chain`), or None when the model's
    config is not reachable offline. ``loaded``: what :func:`validate_recipe` returned."""
    from edgekit.models.source import resolve_model_source
    from edgekit.planning.chain import build_chain
    from edgekit.targets import load_target

    if getattr(loaded, "chain_checked", False):  # validation walked it already
        return loaded.chain
    recipe = loaded.recipe
    source = resolve_model_source(recipe.model, revision=recipe.revision, base_dir=loaded.base_dir)
    return build_chain(loaded, load_target(loaded.target_spec), source)


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
    proxy: bool = False,
) -> dict[str, Any]:
    """Run the recipe's pipeline, reusing valid cached stages. Returns the run manifest.

    ``proxy``: run the same recipe on a tiny random model of the same architecture family and
    a local text, with the stages' costs scaled down, into ``runs/<name>-proxy`` (see
    :mod:`edgekit.proxy_run`, docs/proxy.md); the manifest records the mapping."""
    from edgekit.pipeline.runner import run_pipeline

    from edgekit.preflight import check_recipe_sources
    from edgekit.proxy_run import check_output_kind, proxy_loaded_recipe, proxy_processes

    loaded = validate_recipe(path, check_sources=False)
    if proxy:  # the sources checked are the proxy's (its model, the local text)
        loaded = proxy_loaded_recipe(loaded, processes=proxy_processes())
    check_output_kind(Path(output) if output else loaded.recipe.output_dir, proxy=proxy)
    check_recipe_sources(loaded)
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


def _engine_inputs(path: str | Path) -> tuple[Path, str | None, Any]:
    """(bundle directory, ONNX path relative to it or None for the manifest's, the opened
    :class:`~edgekit.bundle.manifest.Bundle` or None) for a bundle directory or a bare .onnx file."""
    from edgekit.bundle.manifest import MANIFEST_NAME, Bundle
    from edgekit.errors import EngineError

    path = Path(path)
    if path.is_dir():
        return path, None, Bundle.open(path, error_cls=EngineError)
    if path.is_file() and path.suffix == ".onnx":
        # an .onnx inside a bundle is that bundle's graph; the engine files go into the bundle
        for parent in (path.parent, path.parent.parent):
            if (parent / MANIFEST_NAME).is_file():
                return parent, path.relative_to(parent).as_posix(), Bundle.open(parent, error_cls=EngineError)
        return path.parent, path.name, None
    if path.is_file() and path.name.endswith((".tar", ".tar.gz")):
        raise EngineError("a bundle archive, not a bundle directory", where=str(path),
                          how=f"unpack it first (edgekit unpack {path.name}: it refuses unsafe members and checks every sha256) and pass the directory")
    raise EngineError("no bundle directory or .onnx file here", where=str(path),
                      how="pass a bundle directory written by `edgekit compress` (runs/<name>/stages/NN-build_engine/<name>) "
                      "or an exported .onnx file")


def _engine_target(target: str | Path | None, bundle: Any, where: Path):
    from edgekit.errors import EngineError
    from edgekit.targets import load_target

    name = target or (bundle.manifest.target if bundle is not None else None)
    if not name:
        raise EngineError("no target given and the ONNX file has no bundle manifest naming one", where=str(where),
                          how="pass --target NAME (see `edgekit targets list`)")
    return load_target(name, where="--target")


def build_engine(
    path: str | Path,
    *,
    target: str | Path | None = None,
    options: BuildOptions | None = None,
    build: BuildMode = "auto",
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
    ``onnxruntime-gpu``). ``options``: :class:`edgekit.engine.options.BuildOptions` (default:
    its defaults). Returns a summary; see :mod:`edgekit.engine.prepare`."""
    from edgekit.engine.options import BuildOptions
    from edgekit.engine.prepare import prepare_engine, settings_for
    from edgekit.errors import EngineError

    bundle_dir, onnx_rel, bundle = _engine_inputs(path)
    _require_trusted_bundle(bundle_dir, bundle)  # a device with trusted keys builds only from signed, unmodified bundles
    target_obj = _engine_target(target, bundle, Path(path))
    options = options or BuildOptions()
    if backend == "tensorrt":
        summary = prepare_engine(bundle if bundle is not None else bundle_dir, target_obj, options, build=build, check=check,  # type: ignore[arg-type]
                                 context_length=context_length, onnx_rel=onnx_rel, echo=echo)
    elif backend == "ort-tensorrt":
        if bundle is None:
            raise EngineError("the ONNX Runtime TensorRT backend runs on a bundle", where=str(path),
                              how="pass the bundle directory (it holds manifest.json)")
        from edgekit.engine.ort_providers import warm_engine_cache
        from edgekit.engine.prepare import record_engine

        settings = settings_for(bundle_dir, target_obj, options, manifest=bundle.manifest, context_length=context_length)
        summary = warm_engine_cache(bundle, settings, echo=echo)
        record_engine(bundle_dir, bundle.manifest, f"ort-{target_obj.name}", summary)
    else:
        raise EngineError(f"unknown backend {backend!r}", where="--backend", how="use tensorrt or ort-tensorrt")
    summary["bundle"] = str(bundle_dir)
    return summary


def check_tensorrt(
    path: str | Path,
    *,
    target: str | Path | None = None,
    options: BuildOptions | None = None,
    context_length: int | None = None,
) -> dict[str, Any]:
    """TensorRT readiness of a bundle's (or a bare .onnx file's) graph for ``target``: the same
    checks ``build-engine`` runs first, with the same profiles, but graph/target mismatches
    (FP8 on Orin, ...) are reported as findings instead of raised. Writes nothing."""
    from edgekit.engine.options import BuildOptions
    from edgekit.engine.prepare import run_checks, settings_for

    bundle_dir, onnx_rel, bundle = _engine_inputs(path)
    _require_trusted_bundle(bundle_dir, bundle)  # a device with trusted keys checks only signed, unmodified bundles
    target_obj = _engine_target(target, bundle, Path(path))
    options = options or BuildOptions()
    manifest = bundle.manifest if bundle is not None else None
    variants = manifest.variants if manifest is not None else {}
    if onnx_rel is None and variants and not ({"tensorrt", "float"} & set(variants)):
        # an ONNX Runtime-only bundle: check its graph as it is (MatMulNBits -> ort-only-op errors)
        from edgekit.engine.readiness import check_bundle

        return check_bundle(bundle, target=target_obj, max_batch=options.max_batch, workspace_gb=options.workspace_gb,
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
    draft_tokens: int | None = None,
    draft_min_confidence: float | None = None,
    reasoning: str | None = None,
    stop: str | list[str] | None = None,
) -> dict[str, Any]:
    """Answer ``prompt`` with the bundle's runtime (its runtime.json; arguments override it for
    this call). ``on_event(StreamEvent)`` receives "text" pieces, "reset" and "done" as they
    happen. Returns the RouteResult as a dict (text, branch, fell_back, reason, ttft_s, ...).
    ``stop``: stop sequences (the answer ends before the first, finish_reason "stop").

    When the runtime splits a reasoning model's ``<think>`` block (``reasoning``: auto | off |
    split, default the bundle's; edgekit.runtime.reasoning), the block's pieces arrive as
    "reasoning" events and the answer's as "text", and the dict's ``text`` is the answer and
    ``reasoning`` the block (None when there was none); ``reasoning`` is None when not split."""
    from edgekit.bundle.manifest import Bundle
    from edgekit.runtime.answers import StreamEvent
    from edgekit.runtime.bundle import open_router, resolve_config
    from edgekit.runtime.reasoning import ReasoningParser, prompt_opens_reasoning, reasoning_enabled

    handle = Bundle.open(bundle)  # manifest.json is read here, once: the handle goes everywhere below
    config = resolve_config(handle, policy=policy, large=large, backend=backend, max_new_tokens=max_new_tokens,
                            sampling=sampling, draft_tokens=draft_tokens, draft_min_confidence=draft_min_confidence,
                            reasoning=reasoning)
    router = open_router(handle, config, threads=threads)
    split = reasoning_enabled(config.reasoning, getattr(router.small, "tokenizer", None),
                              where="--reasoning" if reasoning else f"{bundle}/runtime.json: reasoning")
    parser = ReasoningParser(in_reasoning=prompt_opens_reasoning(prompt)) if split else None
    result = None
    for event in router.stream(prompt, stop=stop):
        if event.kind == "done":
            result = event.result
        if on_event is None:
            continue
        if parser is None or event.kind not in ("text", "reset", "done"):
            on_event(event)
        elif event.kind == "reset":
            parser.reset()
            on_event(event)
        else:
            pieces = parser.push(event.text) if event.kind == "text" else parser.finish()
            for kind, text in pieces:
                on_event(StreamEvent("reasoning" if kind == "reasoning" else "text", text, event.branch))
            if event.kind == "done":
                on_event(event)
    out = result.to_dict()
    out["reasoning"] = None
    if split:
        final = ReasoningParser(in_reasoning=prompt_opens_reasoning(prompt))
        thought, out["text"] = final.split(result.text)
        out["reasoning"] = thought if final.saw_reasoning else None
    return out


def calibrate_router(
    bundle: str | Path,
    *,
    large_rate: float = 0.3,
    policy: str | None = None,
    large: str | None = None,
    prompts: int = 64,
    max_new_tokens: int | None = None,
    threads: int | None = None,
    prompt_set: str | Path | None = None,
    hidden: int = 8,
    progress: Any = None,
) -> dict[str, Any]:
    """Fit the router threshold so that ``large_rate`` of held-out prompts reach the large branch;
    write it into the bundle's runtime.json. ``policy`` defaults to the bundle's when it is
    calibratable, else cascade. Prompts: ``prompt_set`` (a jsonl file or builtin:routing-mixed,
    edgekit.models.routing_set: fitted on its calibration half, checked on its evaluation half;
    the default for policy learned), else ``prompts`` prompts of each half of the built-in
    text's held-out split. Policy learned trains its scorer (``hidden`` units) with the large
    branch, which must be local. Returns the calibration record (with the rate achieved on the
    held-out half, and per kind for a prompt set)."""
    from edgekit.runtime.bundle import open_router, resolve_config, write_calibration
    from edgekit.runtime.calibration import apply_calibration, calibrate, calibrate_learned, held_out_prompts, routing_examples
    from edgekit.runtime.config import CALIBRATABLE

    bundle = Path(bundle)
    _refuse_if_signed(bundle, "calibrate-router rewrites its runtime.json")  # calibrate before signing, not after
    base = resolve_config(bundle, large=large)
    chosen = policy or (base.policy if base.policy in CALIBRATABLE else "cascade")
    # a bundle without a scorer yet validates as small_only until the scorer is trained
    config = resolve_config(bundle, policy=chosen if chosen != "learned" else "small_only", large=large,
                            max_new_tokens=max_new_tokens)
    router = open_router(bundle, config, threads=threads)
    tokenizer = router.small.tokenizer
    items_cal = items_eval = None
    set_record = None
    if prompt_set is None and chosen == "learned":
        from edgekit.models.routing_set import BUILTIN_ROUTING_MIXED

        prompt_set = BUILTIN_ROUTING_MIXED
    if prompt_set is not None:
        from edgekit.models.routing_set import load_prompt_set, split_halves

        items, set_record = load_prompt_set(prompt_set)
        items_cal, items_eval = split_halves(items)
        if not items_cal or not items_eval:
            raise EdgekitError("the prompt set needs prompts in both halves", where=str(prompt_set),
                               how="give at least two prompts per kind, or set 'split' on its lines")
        cal_prompts, eval_prompts = [i.prompt for i in items_cal], [i.prompt for i in items_eval]
    else:
        cal_prompts = held_out_prompts(tokenizer, prompts, split="calibration")
        eval_prompts = held_out_prompts(tokenizer, prompts, split="evaluation")
    if chosen == "learned":
        examples = routing_examples(router.small, router.large, items_cal, progress=progress)
        record = calibrate_learned(examples, large_rate=large_rate, hidden=hidden)
        config = config.model_copy(update={"policy": "learned"})
    else:
        record = calibrate(router, cal_prompts, policy=chosen, large_rate=large_rate)
    # The share that goes large on prompts the threshold was not fitted on (the held-out half),
    # from the small branch's scores alone: the large branch is not called here.
    apply_calibration(router, record)
    if chosen == "input_complexity":
        held_scores = [router.prompt_score(p) for p in eval_prompts]
        goes_large = [v > router.thresholds.complexity for v in held_scores]
    elif chosen == "learned":
        goes_large = [router.learned_score(p) > router.thresholds.learned for p in eval_prompts]
    else:
        goes_large = [router.confidence_score(p) < router.thresholds.confidence for p in eval_prompts]
    record["large_rate_held_out"] = sum(goes_large) / len(eval_prompts)
    record["n_prompts_held_out"] = len(eval_prompts)
    if set_record is not None:
        cal_large = [(v > record["threshold"]) if chosen != "cascade" else (v < record["threshold"]) for v in record["scores"]]
        kinds = sorted({i.kind for i in items_cal + items_eval})
        record["prompt_set"] = set_record
        record["per_kind"] = {k: {
            "calibration_prompts": sum(i.kind == k for i in items_cal),
            "large_rate_calibration": _share([g for i, g in zip(items_cal, cal_large) if i.kind == k]),
            "held_out_prompts": sum(i.kind == k for i in items_eval),
            "large_rate_held_out": _share([g for i, g in zip(items_eval, goes_large) if i.kind == k]),
        } for k in kinds}
        if chosen == "learned":
            record["mean_gain_per_kind"] = {k: _mean([e["gain"] for e in examples if e["kind"] == k]) for k in kinds}
    record["written"] = str(write_calibration(bundle, config, record))
    return record


def _share(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


__all__ = ["EdgekitError", "validate_recipe", "show_recipe", "compress", "list_targets", "show_target", "list_stages", "plan", "build_engine", "check_tensorrt", "run_prompt", "calibrate_router"]


# --------------------------------------------------------------------------- signed bundles


def keygen(out: str | Path, *, public: str | Path | None = None, force: bool = False) -> dict[str, str]:
    """A new Ed25519 signing key: ``out`` (private, PKCS#8 PEM, mode 0600) and ``out.pub``
    (or ``public``; one OpenSSH line). Returns ``{"key_id", "private", "public"}``."""
    from edgekit.bundle.signing import generate_keypair

    return generate_keypair(out, public, force=force)


def sign_bundle(bundle: str | Path, key: str | Path) -> dict[str, Any]:
    """Sign a bundle directory with the private key file ``key`` (writes ``signature.json``;
    rewrites ``<bundle>.tar`` beside it when there is one). See :mod:`edgekit.bundle.signing`."""
    from edgekit.bundle.signing import sign_bundle as _sign

    return _sign(bundle, key)


def verify_bundle(bundle: str | Path, *, keys: list[str | Path] | None = None) -> dict[str, Any]:
    """Verify a bundle's signature and files under ``keys`` (public key files or directories),
    else under this machine's trusted keys. Raises SignatureError naming what failed, or
    EdgekitError when there is nothing to verify against. Returns the VerifyReport as a dict."""
    from edgekit.bundle.signing import trusted_keys, verify_bundle as _verify

    return _verify(bundle, list(keys) if keys else trusted_keys()).to_dict()


def unpack_bundle(archive: str | Path, dest: str | Path | None = None) -> dict[str, Any]:
    """Extract a bundle .tar safely into ``dest`` (default: the current directory), check every
    file against the manifest's sha256 table and, where trusted keys are configured, the
    signature, before the bundle appears at ``dest/<name>``. Returns what was checked."""
    from edgekit.bundle.archive import safe_extract, verify_manifest_files
    from edgekit.bundle.signing import require_trusted

    checked: dict[str, Any] = {}

    def check(bundle_dir: Path) -> None:
        checked["files"], checked["bytes"] = verify_manifest_files(bundle_dir)
        report = require_trusted(bundle_dir, report_unsigned=False)  # the caller names unsigned files
        checked["signature"] = report.to_dict() if report else None

    final = safe_extract(archive, Path(dest) if dest is not None else Path.cwd(), check=check)
    if checked.get("signature"):
        checked["signature"]["bundle"] = str(final)
    return {"bundle": str(final), **checked}


def _require_trusted_bundle(bundle_dir: Path, bundle: Any) -> None:
    """The engine commands' signature hook: a bundle (not a bare .onnx) must verify under this
    machine's trusted keys, when it has any, before it is checked or built."""
    if bundle is not None:
        from edgekit.bundle.signing import require_trusted

        require_trusted(bundle_dir)


def _refuse_if_signed(bundle_dir: Path, change: str) -> None:
    """The hook of commands that rewrite a bundle's signed files: refuse a signed bundle rather
    than silently invalidate its signature."""
    from edgekit.bundle.signing import refuse_if_signed

    refuse_if_signed(bundle_dir, change)


__all__ += ["keygen", "sign_bundle", "verify_bundle", "unpack_bundle"]


# --------------------------------------------------------------------------- serving


def serve(
    bundle: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    policy: str | None = None,
    large: str | None = None,
    backend: str | None = None,
    api_key: str | None = None,
    auth_metrics: bool = False,
    max_concurrency: int = 1,
    max_queue: int = 16,
    max_tokens_limit: int | None = None,
    max_prompt_tokens: int | None = None,
    max_body_bytes: int = 1 << 20,
    request_timeout_s: float = 300.0,
    grace_period_s: float = 30.0,
    branch_timeout_s: float | None = None,
    threads: int | None = None,
    access_log: bool = True,
    on_ready: Any = None,
    log: Any = None,
    max_connections: int = 64,
    header_timeout_s: float = 10.0,
    keep_alive_timeout_s: float = 5.0,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_client_ca: str | None = None,
) -> dict[str, Any]:
    """Serve the bundle over HTTP (OpenAI-compatible /v1/completions and /v1/chat/completions,
    /v1/models, /healthz, Prometheus /metrics) until SIGINT/SIGTERM, then drain for up to
    ``grace_period_s``. ``on_ready(server)`` is called once the branches are loaded
    (``server.url``). The routing options (and ``branch_timeout_s``, the runtime's
    ``timeout_s``) override the bundle's runtime.json as in :func:`run_prompt`. ``tls_cert`` and
    ``tls_key`` serve HTTPS; ``tls_client_ca`` also requires client certificates (mutual TLS).
    Returns ``{"url", "drained", "in_flight_at_signal", "unfinished"}``. See docs/serve.md."""
    from edgekit.runtime.bundle import resolve_config
    from edgekit.serve.server import ServeOptions, serve as _serve

    options = ServeOptions(
        host=host, port=port, api_key=api_key, auth_metrics=auth_metrics, max_concurrency=max_concurrency, max_queue=max_queue,
        max_tokens_limit=max_tokens_limit, max_prompt_tokens=max_prompt_tokens, max_body_bytes=max_body_bytes,
        request_timeout_s=request_timeout_s, grace_period_s=grace_period_s, access_log=access_log,
        max_connections=max_connections, header_timeout_s=header_timeout_s, keep_alive_timeout_s=keep_alive_timeout_s,
        tls_cert=tls_cert, tls_key=tls_key, tls_client_ca=tls_client_ca,
    )
    options.validate()
    config = resolve_config(Path(bundle), policy=policy, large=large, backend=backend, timeout_s=branch_timeout_s)
    return _serve(bundle, options, config=config, threads=threads, on_ready=on_ready, log=log)


__all__ += ["serve"]


# --------------------------------------------------------------------------- on-device validation


def validate_bundle(
    bundle: str | Path,
    *,
    backend: str = "auto",
    prompts: str | Path | None = None,
    concurrency: int = 1,
    requests: int | None = None,
    warmup: int = 2,
    max_new_tokens: int = 64,
    threads: int | None = None,
    output_dir: str | Path | None = None,
    budgets: dict[str, float | None] | None = None,
    quiet: bool = True,
) -> dict[str, Any]:
    """Measure the bundle on this machine (TTFT, per-token latency p50/p90/p99, tokens/s, peak
    memory; power and temperature from tegrastats on a Jetson) at ``concurrency`` streams,
    check it against the manifest's budgets (``budgets`` replaces or adds
    ``latency_p99_ms`` / ``ttft_p99_ms`` / ``memory_gb``), put ``edgekit plan``'s predictions
    next to the measurements, and write ``validate.json`` + ``validate.html`` into
    ``output_dir`` (default ``./validate-<bundle name>``). Returns the report
    (``edgekit.validate/1``); ``report["passed"]`` is False when a budget is breached. See
    docs/validate.md."""
    from edgekit.validate import validate_bundle as _validate

    return _validate(bundle, backend=backend, prompts=prompts, concurrency=concurrency, requests=requests, warmup=warmup,
                     max_new_tokens=max_new_tokens, threads=threads, output_dir=output_dir, budgets=budgets, quiet=quiet)


__all__ += ["validate_bundle"]


# --------------------------------------------------------------------------- deploy


def deploy(
    bundle: str | Path,
    *,
    hosts: list[str] | tuple[str, ...] = (),
    hosts_file: str | Path | None = None,
    port: int | None = None,
    identity: str | None = None,
    known_hosts: str | None = None,
    remote_root: str = "~/edgekit",
    python: str = "python3",
    build_engine: bool = False,
    validate: bool = False,
    validate_args: list[str] | tuple[str, ...] = (),
    runtime: str | Path | None = None,
    reinstall_runtime: bool = False,
    keep: int = 3,
    jobs: int = 4,
    reports_dir: str | Path = "deploy-reports",
    connect_timeout: int = 10,
    bwlimit: int | None = None,
    rsync_path: str | None = None,
    rollback: bool = False,
    console: Any = None,
    cache_dir: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Deploy a bundle over SSH to every host (``hosts``: ``[user@]host[:port]``; ``hosts_file``:
    a fleet), in parallel, ``jobs`` at a time; or, with ``rollback``, point each device's
    ``current`` back at its previous version (``bundle`` may then be just the bundle's name).
    Bad input raises DeployError; a device's failure is its record's ``error`` (the others go
    on). Returns one record per host (see edgekit.deploy.deploy.HostResult). ``console``: a
    rich Console for progress (None: silent). See docs/deploy.md."""
    from edgekit.deploy.deploy import DeployOptions
    from edgekit.deploy.fleet import resolve_hosts, run_fleet
    from edgekit.deploy.ssh import require_tools
    from edgekit.errors import DeployError
    from edgekit.pipeline.runner import default_cache_dir

    if keep < 2:
        raise DeployError(f"--keep {keep} would delete the previous version", where="--keep", how="keep at least 2 versions")
    for name, value in (("--identity", identity), ("--known-hosts", known_hosts)):
        if value and not Path(value).expanduser().is_file():
            raise DeployError(f"{name} file not found", where=str(value), how="check the path")
    options = DeployOptions(remote_root=remote_root, python=python, port=port, identity=identity, known_hosts=known_hosts,
                            connect_timeout=connect_timeout, build_engine=build_engine, validate=validate,
                            validate_args=tuple(validate_args), reinstall_runtime=reinstall_runtime, keep=keep,
                            reports_dir=Path(reports_dir), bwlimit=bwlimit, rsync_path=rsync_path)
    specs = resolve_hosts(list(hosts), str(hosts_file) if hosts_file else None, options)
    require_tools()
    results = run_fleet(bundle, specs, options, runtime=str(runtime) if runtime else None,
                        cache_dir=Path(cache_dir) if cache_dir else default_cache_dir(), jobs=jobs, rollback=rollback,
                        console=console)
    return [r.to_dict() for r in results]


__all__ += ["deploy"]
