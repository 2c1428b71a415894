"""From what the user typed (a recipe or a model spec, plus options) to a :class:`PlanRequest`.

A recipe supplies the model, target, context length, budgets, the pruned shape (its prune
stages, solved exactly as recipe validation does) and the deployed precision (its quantize
stage); options override. A model spec is planned as it is (fp16 unless ``--precision``).
No weights are read: the shape comes from config.json, a GGUF header, or a hub config already
in the local Hugging Face cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgekit.engine.options import BuildOptions
from edgekit.errors import EdgekitError, ModelError, TargetError
from edgekit.planning import roofline as rf
from edgekit.planning.report import PlanRequest, shape_dict

DEFAULT_CONTEXT = 2048
#: The engine's default largest prefill call (the build_engine stage's max_prefill default).
DEFAULT_PREFILL_CHUNK = BuildOptions.model_fields["max_prefill"].default
DEFAULT_GROUP_SIZE = 128
_RECIPE_SUFFIXES = (".yaml", ".yml")


class PlanError(EdgekitError):
    """An ``edgekit plan`` option is out of range or inconsistent."""


def _check_positive(name: str, value: float | None, *, minimum: float = 1, integer: bool = True) -> None:
    if value is None:
        return
    if value < minimum or (integer and int(value) != value):
        kind = "an integer" if integer else "a number"
        raise PlanError(f"{name} must be {kind} >= {minimum:g}, not {value:g}", where=name,
                        how=f"pass {name} with a value of at least {minimum:g}")


def _model_shape(source: Any, spec: str) -> Any:
    from edgekit.models.source import model_shape

    try:
        shape = model_shape(source)
    except KeyError as exc:
        raise ModelError(
            f"the model's config lacks {exc.args[0]!r}, which planning needs", where=spec,
            how="point at a decoder-only Hugging Face checkpoint (Llama/Qwen/Mistral-style config.json)",
        ) from None
    except (ValueError, OSError) as exc:
        raise ModelError(f"cannot read the model's config: {exc}", where=spec,
                         how="check that config.json (or the .gguf header) is complete and valid JSON") from None
    if shape is None:  # a hub id whose config.json is not in the local cache
        raise ModelError(
            f"no config.json for hub model '{spec}' in the local Hugging Face cache (plan downloads nothing)",
            where=f"model {spec}",
            how=f"pass a local directory holding the model's config.json, or fetch it once into the cache "
                f"(huggingface-cli download {spec} config.json)",
        )
    return shape


def _targets(target: str | None, all_targets: bool, default: str | None) -> list[Any]:
    from edgekit.targets import list_targets, load_target

    if target and all_targets:
        raise PlanError("--target and --all-targets exclude each other", where="options",
                        how="pass one target with --target NAME, or --all-targets")
    if all_targets or (target is None and default is None):
        return list_targets()
    return [load_target(target or default)]


def graph_kv_bytes(bundle_dir: Path) -> tuple[float, str] | None:
    """KV cache bytes per value of a bundle's deployed graph (the manifest's ``tensorrt``
    variant, else ``float``, else its primary graph), read from the graph's input types; None
    when ``bundle_dir`` is not a bundle."""
    from edgekit.bundle.manifest import Bundle
    from edgekit.runtime.onnx_graph import kv_cache_dtype  # the wire format: no onnx import on the runtime path

    if not (Path(bundle_dir) / "manifest.json").is_file():
        return None
    try:  # any problem with the manifest or the graph's path: plan from the config alone
        bundle = Bundle.open(bundle_dir, error_cls=ModelError)
        graph = bundle.graph("deployed", error_cls=ModelError)
    except EdgekitError:
        return None
    rel = graph.relative_to(bundle.dir).as_posix()
    if not graph.is_file():
        return None
    try:
        found = kv_cache_dtype(graph)
    except Exception:  # a damaged graph: plan from the config alone (edgekit check reports the file)
        return None
    return (float(found[1]), f"{found[0]} ({rel})") if found else None


def _recipe_kv_bytes(recipe: Any) -> float | None:
    """A recipe whose TensorRT graph stays float32 (export_onnx tensorrt_dtype: float32 after
    quantization) deploys a float32 KV cache: 4 bytes per value; None = the default (half)."""
    for index, stage in enumerate(recipe.stages):
        if stage.type == "export_onnx":
            config = recipe.stage_config(index)
            if getattr(config, "tensorrt_dtype", "auto") == "float32" and config.format != "onnxruntime":
                return 4.0
    return None


def _is_recipe(source: str | Path) -> bool:
    return str(source).lower().endswith(_RECIPE_SUFFIXES)


def plan_request(
    source: str | Path, *, target: str | None = None, all_targets: bool = False, context_length: int | None = None,
    batch: int | None = None, precision: str | None = None, group_size: int | None = None,
    power_mode: str | None = None, prompt_tokens: int = 128, budget_ms: float | None = None, kv_fill: float = 0.5,
    prefill_chunk: int | None = None,
) -> tuple[PlanRequest, list[Any]]:
    """Resolve a recipe or model spec and the options. Raises EdgekitError subclasses (one
    line: what, where, how) for anything the user can fix."""
    for name, value in (("--context", context_length), ("--batch", batch), ("--prompt-tokens", prompt_tokens),
                        ("--group-size", group_size), ("--prefill-chunk", prefill_chunk)):
        _check_positive(name, value)
    _check_positive("--budget-ms", budget_ms, minimum=1e-3, integer=False)
    if not 0 <= kv_fill <= 1:
        raise PlanError(f"--kv-fill must lie in [0, 1], not {kv_fill:g}", where="--kv-fill",
                        how="pass the fraction of the context the KV cache holds at an average decode step")
    if precision is not None and precision not in rf.PRECISIONS:
        raise PlanError(f"unknown precision '{precision}'", where="--precision",
                        how=f"use one of: {', '.join(rf.PRECISIONS)}")

    budgets: dict[str, float | None] = {"latency": None, "ttft": None, "memory": None}
    recipe_info: dict[str, Any] = {}
    graph_info: dict[str, Any] = {}  # a bundle's graph: its real KV cache type
    if _is_recipe(source):
        from edgekit.models.source import resolve_model_source
        from edgekit.planning.deployed import pruned_shape, recipe_weights
        from edgekit.recipe import read_recipe

        # the schema only: recipe validation refuses a model that does not fit; a plan reports it
        loaded = read_recipe(source)
        recipe = loaded.recipe
        model_spec = recipe.model
        try:
            model = resolve_model_source(model_spec, revision=recipe.revision, base_dir=loaded.base_dir)
        except EdgekitError as exc:
            raise type(exc)(exc.what, where=loaded.where("model"), how=exc.how) from None
        try:
            teacher = _model_shape(model, model_spec)
        except ModelError as exc:
            raise ModelError(exc.what, where=loaded.where("model"), how=exc.how) from None
        shape = pruned_shape(loaded, teacher)
        weights = recipe_weights(recipe, shape)
        default_precision = weights.precision
        default_group = weights.group_size if weights.method not in (None, "fp8") else None
        quantize_lm_head = weights.quantize_lm_head
        default_context = recipe.context_length
        default_target = loaded.target_spec
        engine = [recipe.stage_config(i) for i, s in enumerate(recipe.stages) if s.type == "build_engine"]
        default_batch = engine[-1].max_batch if engine else 1
        default_chunk = engine[-1].max_prefill if engine else DEFAULT_PREFILL_CHUNK
        budgets = {"latency": recipe.budgets.latency_p99_ms, "ttft": recipe.budgets.ttft_p99_ms,
                   "memory": recipe.budgets.memory_gb}
        recipe_info = {"recipe": str(source), "recipe_name": recipe.name,
                       "teacher_shape": shape_dict(teacher) if shape != teacher else None,
                       "deployed_weights": weights.label + (" (TensorRT builds the float graph in FP16)"
                                                            if weights.method is None else "")}
        shape_origin = "recipe: the model's config, then the recipe's prune stages" if shape != teacher else \
            "recipe: the model's config"
        kv_bytes = _recipe_kv_bytes(recipe)
        if kv_bytes is not None:
            recipe_info["kv_cache_dtype"] = "float32 (export_onnx tensorrt_dtype: float32)"
    else:
        from edgekit.models.source import resolve_model_source

        model_spec = str(source)
        model = resolve_model_source(model_spec)
        shape = _model_shape(model, model_spec)
        default_precision, default_group, quantize_lm_head = "fp16", None, False
        default_context, default_target, default_batch = DEFAULT_CONTEXT, None, 1
        default_chunk = DEFAULT_PREFILL_CHUNK
        shape_origin = {"builtin": "GGUF header (embedded default model)", "gguf": "GGUF header",
                        "dir": "config.json", "hub": "config.json in the local Hugging Face cache"}[model.kind]
        kv_bytes = None
        graph_kv = graph_kv_bytes(Path(model_spec)) if model.kind == "dir" else None
        if graph_kv is not None:  # a bundle: its graph's real KV cache type
            kv_bytes = graph_kv[0]
            graph_info = {"kv_cache_dtype": graph_kv[1]}

    chosen = precision or default_precision
    if chosen in ("int8", "int4"):
        # the recipe's group size also when --precision changes the bits
        group = group_size or default_group or DEFAULT_GROUP_SIZE
    else:
        group = None
    fmt = rf.weight_format(chosen, group_size=group, quantize_lm_head=quantize_lm_head and chosen in ("int8", "int4"),
                           hidden_size=shape.hidden_size)
    context = context_length or default_context
    if prompt_tokens > context:
        raise PlanError(f"--prompt-tokens {prompt_tokens} exceeds the context length {context}", where="--prompt-tokens",
                        how="pass a shorter prompt or a longer --context")
    workload = rf.Workload(
        context_length=context, batch=batch or default_batch, kv_fill=kv_fill, prompt_tokens=prompt_tokens,
        **({"kv_bytes": kv_bytes} if kv_bytes is not None else {}),
        prefill_chunk=min(prefill_chunk or default_chunk, context),
    )
    try:
        targets = _targets(target, all_targets, default_target)
    except TargetError as exc:
        if target is None and recipe_info:  # the recipe's own target: point at its line
            raise TargetError(exc.what, where=loaded.where("target"), how=exc.how) from None
        raise
    if power_mode is not None and len(targets) != 1:
        raise PlanError("--power-mode applies to one target (power mode names differ per device)",
                        where="--power-mode", how="add --target NAME")
    if power_mode is not None:
        targets[0].power_mode(power_mode)  # TargetError naming the modes when unknown
    if len(targets) == 1 and not targets[0].supports(rf.TARGET_PRECISION[fmt.precision]):
        t = targets[0]
        usable = [p for p in rf.PRECISIONS if t.supports(rf.TARGET_PRECISION[p])]
        raise TargetError(f"{t.name} does not support {fmt.precision}", where=f"target {t.name}",
                          how=f"pass --precision with one of {', '.join(usable)}")
    from edgekit.prune.shapes import total_parameters

    model_info = {"spec": model_spec, "source_kind": model.kind, "shape_from": shape_origin,
                  "shape": shape_dict(shape), "parameters": total_parameters(shape), **recipe_info,
                  **graph_info}
    request = PlanRequest(
        model=model_info, shape=shape, fmt=fmt, workload=workload,
        latency_budget_ms=budget_ms if budget_ms is not None else budgets["latency"],
        ttft_budget_ms=budgets["ttft"], memory_budget_gb=budgets["memory"], power_mode=power_mode,
    )
    return request, targets


__all__ = ["PlanError", "plan_request"]
