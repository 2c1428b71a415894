"""The ``bundle`` stage: ONNX export + tokenizer + configs + manifest -> directory and .tar."""

from __future__ import annotations

import json

from pydantic import Field

from edgekit.names import SafeName
from edgekit.pipeline.registry import BUNDLE, ONNX, StageConfig, register_stage


class BundleConfig(StageConfig):
    name: SafeName | None = Field(None, description="bundle name (default: the recipe's name)")
    tar: bool = Field(True, description="also write <name>.tar next to the directory")


def run_bundle(ctx) -> dict:
    from edgekit import __version__
    from edgekit.bundle.manifest import BUNDLE_FORMAT, MANIFEST_NAME, RUNTIME_FORMAT, RUNTIME_NAME, bundle_files, write_tar
    from edgekit.pack.writer import collect_model_files, package_versions
    from edgekit.yamlio import atomic_write_json, dump_yaml, finite_json

    recipe = ctx.recipe
    name = ctx.config.name or recipe.name
    bundle_dir = ctx.output_dir / name
    bundle_dir.mkdir()
    collect_model_files(ctx.inputs[ONNX], bundle_dir)
    (bundle_dir / "recipe.yaml").write_text(dump_yaml(recipe.portable_dict()))
    (bundle_dir / "target.yaml").write_text(dump_yaml(ctx.target.model_dump(mode="json")))
    # How the bundle answers prompts (edgekit run / calibrate-router read and update it), with
    # what the recipe leaves unset taken from the model's generation_config.json.
    atomic_write_json(bundle_dir / RUNTIME_NAME, _runtime_json(recipe, bundle_dir, RUNTIME_FORMAT))
    export = next((r for r in reversed(ctx.history) if r.produces == ONNX), None)
    manifest = {
        "format": BUNDLE_FORMAT,
        "name": name,
        "edgekit_version": __version__,
        "model": {"source": recipe.model, "revision": recipe.revision},
        "target": ctx.target.name,
        "context_length": recipe.context_length,
        "budgets": recipe.budgets.model_dump(),
        "runtime": RUNTIME_NAME,
        "onnx": {
            "file": "model.onnx",
            "external_data": "model.onnx_data",
            "variants": _variants(ctx.inputs[ONNX]),
            **({"export": export.metrics} if export else {}),
        },
        # Quality and cost stage by stage, as the pipeline measured them.
        "stages": [{"name": r.name, "type": r.type, "metrics": r.metrics} for r in ctx.history],
        "packages": package_versions(),
        "files": bundle_files(bundle_dir),
    }
    # strict JSON: a non-finite metric (a diverged perplexity) is written as null, never NaN/Infinity
    (bundle_dir / MANIFEST_NAME).write_text(json.dumps(finite_json(manifest), indent=2, allow_nan=False) + "\n")
    if ctx.config.tar:
        write_tar(bundle_dir, ctx.output_dir / f"{name}.tar")
    size = sum(meta["size"] for meta in manifest["files"].values())
    return {"bundle": name, "files": len(manifest["files"]) + 1, "bundle_bytes": size, "tar": ctx.config.tar}


def _runtime_json(recipe, bundle_dir, runtime_format: str) -> dict:
    """runtime.json: the recipe's runtime section, its unset sampling fields and max_new_tokens
    resolved (recipe > the model's generation_config.json > default;
    edgekit.runtime.generation_config), and ``sources`` saying where each value came from."""
    from edgekit.errors import ModelError
    from edgekit.runtime.config import RuntimeConfig
    from edgekit.runtime.generation_config import GENERATION_CONFIG, read_generation_config, resolve_runtime
    from edgekit.runtime.reasoning import reasoning_enabled
    from edgekit.runtime.tokenizer import BundleTokenizer

    runtime = recipe.runtime
    gen = read_generation_config(bundle_dir / GENERATION_CONFIG, error_cls=ModelError)
    tokenizer = BundleTokenizer.from_dir(bundle_dir) if (bundle_dir / "tokenizer.json").is_file() else None
    split = reasoning_enabled(runtime.reasoning, tokenizer, where="recipe: runtime.reasoning")
    resolved, sources = resolve_runtime(runtime.model_dump(mode="json"), gen, reasoning_model=split,
                                        context_length=recipe.context_length)
    RuntimeConfig.model_validate(resolved)  # what the runtime will read back
    sources["reasoning"] = f"{runtime.reasoning}: {'split' if split else 'off'} for this tokenizer"
    return {"format": runtime_format, **resolved, "sources": sources}


def _variants(onnx_dir) -> dict:
    record = onnx_dir / "export.json"
    return json.loads(record.read_text())["variants"] if record.is_file() else {"float": "model.onnx"}


register_stage(
    "bundle",
    config=BundleConfig,
    summary="ONNX + tokenizer + configs + manifest (sha256 of every file) -> directory and reproducible .tar",
    run="edgekit.pack.stage:run_bundle",
    requires=(ONNX,),
    produces=BUNDLE,
    uses=("recipe", "target"),
)
