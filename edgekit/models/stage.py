"""The ``load`` stage: model source -> safetensors checkpoint + tokenizer."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from edgekit.pipeline.registry import CHECKPOINT, StageConfig, register_section_fingerprint, register_stage


class LoadConfig(StageConfig):
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="weight dtype of the checkpoint (float32 on CPU; bfloat16 for large models on GPU)"
    )


def run_load(ctx) -> dict:
    from edgekit.models.checkpoint import write_checkpoint
    from edgekit.models.source import check_gguf_supported, resolve_model_source

    recipe = ctx.recipe
    source = resolve_model_source(recipe.model, revision=recipe.revision, base_dir=ctx.recipe_dir)
    arch = check_gguf_supported(source.path) if source.kind == "gguf" else None
    proxy: dict = {}
    if source.kind == "proxy":  # a tiny random model of the real one's family (edgekit.models.proxy)
        from edgekit.models.proxy import write_proxy_checkpoint

        proxy = write_proxy_checkpoint(source, ctx.output_dir, dtype=ctx.config.dtype)
        ctx.log(f"proxy of {source.inner.spec} (config from {proxy['proxy_config_from']}): "
                + ", ".join(f"{m['field'].split('.', 1)[1]} {m['from']} -> {m['to']}" for m in proxy["proxy_mapping"]))
    else:
        write_checkpoint(
            source,
            ctx.output_dir,
            cache_dir=ctx.cache_dir,
            dtype=ctx.config.dtype,
            trust_remote_code=recipe.trust_remote_code,
            log=ctx.log,
        )
    import json

    config = json.loads((ctx.output_dir / "config.json").read_text())
    weights = sum(p.stat().st_size for p in ctx.output_dir.glob("*.safetensors"))
    metrics = {
        "source": source.kind,
        "architecture": (config.get("architectures") or [arch or config.get("model_type")])[0],
        "layers": config.get("num_hidden_layers"),
        "hidden_size": config.get("hidden_size"),
        "vocab_size": config.get("vocab_size"),
        "weights_bytes": weights,
    }
    metrics["parameters"] = _count_parameters(ctx.output_dir)
    metrics.update(proxy)
    return metrics


def _count_parameters(path) -> int:
    from safetensors import safe_open

    total = 0
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="numpy") as handle:
            for name in handle.keys():
                shape = handle.get_slice(name).get_shape()
                count = 1
                for dim in shape:
                    count *= dim
                total += count
    return total


register_stage(
    "load",
    config=LoadConfig,
    summary="model (hub id, directory, .gguf, smollm2-135m, proxy:<model>) -> safetensors checkpoint + tokenizer",
    run="edgekit.models.stage:run_load",
    produces=CHECKPOINT,
    uses=("model",),
)
# The recipe's model and data are read through this package (models.source, models.text), so it
# says what of them enters a cache key.
register_section_fingerprint("model", "edgekit.models.source:recipe_model_fingerprint")
register_section_fingerprint("data", "edgekit.models.text:recipe_data_fingerprint")
# The held-out sets from other sources: only the evaluate stage uses this section.
register_section_fingerprint("eval_sets", "edgekit.models.text:recipe_eval_sets_fingerprint")
