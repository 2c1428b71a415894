"""Target rules checked when a recipe is validated, before any work starts
(:func:`edgekit.preflight.check_recipe_sources` calls :func:`check_target_rules`).

The fp8 and TensorRT-symmetry rules, then the shape chain (:mod:`edgekit.planning.chain`):
the recipe walked stage by stage from the model's config — pruned shape, distillation
memory per GPU, quantize group sizes after pruning, the deployed model and its engine
profiles against the target's memory (decimal GB, one allowance: :mod:`edgekit.sizing`)."""

from __future__ import annotations

from typing import Any

from edgekit.errors import RecipeError

FP8_MIN_CC = (8, 9)


def check_target_rules(loaded: Any, target: Any, source: Any) -> None:
    recipe = loaded.recipe
    quantize = [(i, loaded.recipe.stage_config(i)) for i, s in enumerate(recipe.stages) if s.type == "quantize"]
    for index, config in quantize:
        if config.method == "fp8" and target.compute_capability_tuple < FP8_MIN_CC:
            raise RecipeError(
                f"quantize.method fp8 needs compute capability ≥ 8.9 but {target.name} has {target.compute_capability}",
                where=loaded.where("stages", index, "method"),
                how="use method gptq with bits 4 or 8",
            )
    _check_tensorrt_weights(loaded, quantize)
    from edgekit.planning.chain import check_chain

    loaded.chain, loaded.chain_checked = check_chain(loaded, target, source), True


def _check_tensorrt_weights(loaded: Any, quantize: list) -> None:
    """TensorRT's DequantizeLinear takes no zero point: its INT4/INT8 weight-only path
    needs symmetric weights. Refuse an asymmetric integer quantization exported for it."""
    recipe = loaded.recipe
    for index, spec in enumerate(recipe.stages):
        if spec.type != "export_onnx":
            continue
        fmt = recipe.stage_config(index).format
        earlier = [(i, c) for i, c in quantize if i < index]
        if fmt in ("tensorrt", "both") and earlier:
            q_index, config = earlier[-1]
            if config.method != "fp8" and not config.symmetric:
                raise RecipeError(
                    f"export_onnx.format {fmt} needs symmetric weights, but quantize ({config.method}, "
                    f"{config.bits}-bit) is asymmetric: TensorRT's DequantizeLinear takes no zero point",
                    where=loaded.where("stages", q_index, "symmetric"),
                    how="set 'symmetric: true' in the quantize stage, or export with format: onnxruntime",
                )
