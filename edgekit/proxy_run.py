"""A proxy run: the same recipe with the model replaced by the proxy model
(:mod:`edgekit.models.proxy`), the data by a local text and the parameters that set the run's
cost capped, run into its own output directory (``runs/<name>-proxy``).

``edgekit compress RECIPE --proxy`` (``api.compress(..., proxy=True)``) rewrites the recipe
with :func:`proxy_loaded_recipe`; :func:`proxy_recipe` is the pure rewrite (recipe -> proxied
recipe, and its mapping). Every rule is listed in docs/proxy.md.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from edgekit.errors import ModelError, OutputError, RecipeError
from edgekit.models.proxy import (GROUP_DIVISORS, PROXY_FORMAT, PROXY_LAYERS, PROXY_MAX_POSITIONS, PROXY_PREFIX,
                                  PROXY_SEED, inner_spec, is_proxy_spec, proxy_model_config, real_model_config,
                                  width_shift)
from edgekit.models.source import resolve_model_source
from edgekit.recipe import DataConfig, LoadedRecipe, Recipe

# Stage parameters: capped (by field name, in any stage that has the field) so the whole run
# takes a minute or two on 2 CPU cores.
FIELD_CAPS = {
    "calibration_samples": 4,   # prune, quantize
    "sequence_length": 128,     # prune, distill, quantize
    "steps": 4,                 # distill
    "batch_size": 2,            # distill
    "gradient_accumulation": 2,  # distill
    "warmup_steps": 1,          # distill
    "checkpoint_every": 2,      # distill: a resumable checkpoint is written during the run
    "eval_every": 2,            # distill
    "eval_windows": 2,          # distill
    "max_windows": 4,           # evaluate
}
FIELD_CLEARED = ("max_minutes",)  # distill: a time limit would make the proxy step-irreproducible
DATA_EVAL_TOKENS = 1024
DATA_WINDOW = 128
PROXY_DATA = "builtin:python-docs"
SUFFIX = "-proxy"


def proxy_name(name: str) -> str:
    return name[: 128 - len(SUFFIX)] + SUFFIX


def proxy_recipe(recipe: Any, *, width_factor: int, real_layers: int, processes: int = 2) -> tuple[Any, list[dict[str, Any]]]:
    """(proxied Recipe, mapping): the same stages with the model, data and the parameters that
    set the run's cost replaced (pure; see docs/proxy.md for each rule)."""
    data = recipe.to_dict()
    mapping: list[dict[str, Any]] = []

    def change(container: dict[str, Any], key: str, value: Any, where: str, rule: str) -> None:
        if container.get(key) != value:
            mapping.append({"field": where, "from": container.get(key), "to": value, "rule": rule})
            container[key] = value

    change(data, "name", proxy_name(data["name"]), "name", "+ '-proxy': its own output directory and bundle name")
    change(data, "model", PROXY_PREFIX + inner_spec(PROXY_PREFIX + data["model"]), "model",
           "a random model of the same family built from the real config (load stage)")
    if data.get("output"):
        change(data, "output", data["output"].rstrip("/") + SUFFIX, "output", "+ '-proxy'")
    context = min(data["context_length"], PROXY_MAX_POSITIONS)
    change(data, "context_length", context, "context_length", f"<= {PROXY_MAX_POSITIONS} (max_position_embeddings cap)")
    old_data = data["data"]
    eval_tokens = min(old_data.get("eval_tokens", DATA_EVAL_TOKENS), DATA_EVAL_TOKENS)
    new_data = {"source": PROXY_DATA, "eval_tokens": eval_tokens,
                "window": min(old_data.get("window", DATA_WINDOW), DATA_WINDOW, eval_tokens)}
    if "allow_repeat" in DataConfig.model_fields:
        new_data["allow_repeat"] = True
    for key in sorted(set(old_data) | set(new_data)):
        field = DataConfig.model_fields.get(key)
        after = new_data.get(key, field.get_default(call_default_factory=True) if field is not None else None)
        if old_data.get(key) != after:
            mapping.append({"field": f"data.{key}", "from": old_data.get(key), "to": after,
                            "rule": "local text (builtin:python-docs); other data settings at their defaults"})
    data["data"] = new_data
    runtime = data.get("runtime") or {}
    if isinstance(runtime.get("max_new_tokens"), int) and runtime["max_new_tokens"] > context // 2:
        change(runtime, "max_new_tokens", context // 2, "runtime.max_new_tokens", "<= half the proxy's context")
    for index, stage in enumerate(data["stages"]):
        kind = stage["type"]
        where = f"stages[{index}]"
        for key, cap in FIELD_CAPS.items():
            if isinstance(stage.get(key), int) and not isinstance(stage[key], bool) and stage[key] > cap:
                change(stage, key, cap, f"{where}.{key}", f"<= {cap}")
        for key in FIELD_CLEARED:
            if stage.get(key) is not None:
                change(stage, key, None, f"{where}.{key}", "cleared")
        if stage.get("device") == "cuda":
            change(stage, "device", "auto", f"{where}.device", "cuda -> auto (the proxy runs where CI runs)")
        if kind == "distill":
            if stage.get("accelerate_config") or stage.get("processes", 1) > 1:
                change(stage, "accelerate_config", None, f"{where}.accelerate_config",
                       f"-> {processes}-process DDP (gloo on CPU)")
                change(stage, "processes", processes, f"{where}.processes", f"{processes} processes")
        if kind == "prune":
            multiple = stage.get("width_multiple")
            if isinstance(multiple, int) and multiple > max(GROUP_DIVISORS):
                change(stage, "width_multiple", max(max(GROUP_DIVISORS), multiple // width_factor),
                       f"{where}.width_multiple", f"/ {width_factor}, at least {max(GROUP_DIVISORS)}")
            for key in ("hidden_size", "intermediate_size"):
                if isinstance(stage.get(key), int):
                    change(stage, key, max(1, stage[key] // width_factor), f"{where}.{key}", f"/ {width_factor}")
            if isinstance(stage.get("num_layers"), int):
                layers = min(real_layers, PROXY_LAYERS)
                scaled = max(1, min(layers, math.ceil(stage["num_layers"] * layers / real_layers)))
                if stage["num_layers"] < real_layers:
                    scaled = min(scaled, max(1, layers - 1))
                change(stage, "num_layers", scaled, f"{where}.num_layers", "scaled to the proxy's layers")
        if kind == "bundle" and stage.get("name") and stage.get("name") != recipe.name:
            change(stage, "name", proxy_name(stage["name"]), f"{where}.name", "+ '-proxy'")
        if kind == "build_engine":
            if isinstance(stage.get("max_prefill"), int) and stage["max_prefill"] > context:
                change(stage, "max_prefill", context, f"{where}.max_prefill", "<= the proxy's context")
            if isinstance(stage.get("opt_prefill"), int) and stage["opt_prefill"] > stage.get("max_prefill", context):
                change(stage, "opt_prefill", stage["max_prefill"], f"{where}.opt_prefill", "<= max_prefill")
    try:
        return Recipe.model_validate(data), mapping
    except Exception as exc:  # a rule above produced an invalid recipe: a bug in the proxy, said plainly
        raise RecipeError(f"the proxied recipe is invalid: {str(exc).splitlines()[0]}", where="--proxy",
                          how="report it; meanwhile run the proxy on a copy of the recipe") from None


class ProxyLoadedRecipe(LoadedRecipe):
    """A LoadedRecipe whose recipe is the proxied one; ``proxy`` goes into the run manifest,
    and every place an error names says so."""

    def __init__(self, loaded: LoadedRecipe, recipe: Any, proxy: dict[str, Any]):
        super().__init__(recipe, loaded.path, loaded.lines, list(loaded.warnings))
        self.proxy = proxy

    def where(self, *loc: str | int) -> str:
        return super().where(*loc) + " (--proxy)"


def proxy_loaded_recipe(loaded: Any, *, processes: int = 2) -> ProxyLoadedRecipe:
    """The proxied version of a parsed recipe, with the full mapping (model and recipe)."""
    recipe = loaded.recipe
    if is_proxy_spec(recipe.model):
        raise RecipeError("the recipe's model is already a proxy", where=loaded.where("model"),
                          how="run it without --proxy, or name the real model in the recipe")
    try:
        source = resolve_model_source(recipe.model, revision=recipe.revision, base_dir=loaded.base_dir)
        config, _, origin = real_model_config(source)
    except ModelError as exc:
        raise ModelError(exc.what, where=loaded.where("model"), how=exc.how) from None
    factor = 1 << width_shift(config)
    proxied, recipe_mapping = proxy_recipe(recipe, width_factor=factor, real_layers=config["num_hidden_layers"],
                                           processes=processes)
    _, model_mapping = proxy_model_config(config)
    record = {
        "format": PROXY_FORMAT,
        "proxy": True,
        "of": {"recipe": recipe.name, "model": recipe.model, "config_from": origin},
        "seed": PROXY_SEED,
        "width_factor": factor,
        "model": model_mapping,
        "recipe": recipe_mapping,
    }
    return ProxyLoadedRecipe(loaded, proxied, record)


def proxy_processes() -> int:
    """Distillation processes of a proxy run: 2 (DDP over gloo) on the CPU; on a CUDA host one
    per GPU, at most 2 (a 1-GPU check host trains in one process)."""
    try:
        import torch

        if torch.cuda.is_available():
            return max(1, min(2, torch.cuda.device_count()))
    except ImportError:
        pass
    return 2


def check_output_kind(out: Path, *, proxy: bool) -> None:
    """Refuse to write a proxy run over a real run's directory, and the other way round."""
    manifest = Path(out) / "manifest.json"
    if not manifest.is_file():
        return
    try:
        recorded = json.loads(manifest.read_text()).get("proxy")
    except (OSError, ValueError, AttributeError, RecursionError):
        return  # the runner deals with an unreadable manifest (it rewrites it)
    if bool(recorded) != proxy:
        kind, other = ("a proxy", "real") if proxy else ("a real", "proxy")
        raise OutputError(f"this directory holds a {other} run; {kind} run must not write over it", where=str(out),
                          how="use another --output (proxy runs default to runs/<name>-proxy)")
