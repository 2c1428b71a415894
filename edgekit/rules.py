"""Target rules checked when a recipe is validated, before any work starts.

The fp8 and TensorRT-symmetry rules, then the shape chain (:mod:`edgekit.planning.chain`):
the recipe walked stage by stage from the model's config — pruned shape, distillation
memory per GPU, quantize group sizes after pruning, the deployed model and its engine
profiles against the target's memory (decimal GB, one allowance: :mod:`edgekit.sizing`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgekit.errors import RecipeError

FP8_MIN_CC = (8, 9)
_BITS = {"float32": 32, "float16": 16, "bfloat16": 16}


@dataclass(frozen=True)
class RecipeWeights:
    """How a recipe leaves the weights: the load dtype and the last quantize stage's choices.

    Shared by recipe validation (memory fit) and ``edgekit plan``, so both read a recipe the
    same way."""

    #: bits of the float weights as loaded (32, 16)
    float_bits: int
    #: the last quantize stage's method (gptq, rtn, awq, fp8), None without one
    method: str | None = None
    #: integer bits (4, 8); 8 for fp8
    bits: int | None = None
    #: input channels per scale, resolved (a ``null`` group size is one group per row: the hidden size)
    group_size: int | None = None
    quantize_lm_head: bool = False

    @property
    def quantized(self) -> bool:
        return self.method is not None

    @property
    def linear_bits(self) -> float:
        """Stored bits per linear weight: codes + an fp16 scale and packed zero per group."""
        if self.method is None:
            return float(self.float_bits)
        if self.method == "fp8":
            return 8.0
        return self.bits + (16 + self.bits) / self.group_size

    @property
    def label(self) -> str:
        if self.method is None:
            return f"{self.float_bits}-bit float"
        return "fp8" if self.method == "fp8" else f"{self.bits}-bit {self.method}"

    @property
    def precision(self) -> str:
        """The ``edgekit plan`` precision the deployed engine has: a float graph is built in
        FP16 by TensorRT (weak typing), integer formats are weight-only."""
        if self.method is None:
            return "fp16"
        return "fp8" if self.method == "fp8" else f"int{self.bits}"


def recipe_weights(recipe: Any, shape: Any) -> RecipeWeights:
    """The weight format a recipe deploys (``shape``: the model's shape after pruning, for a
    per-channel group size)."""
    loads = [recipe.stage_config(i) for i, s in enumerate(recipe.stages) if s.type == "load"]
    float_bits = _BITS[loads[0].dtype] if loads else 32
    quantize = [recipe.stage_config(i) for i, s in enumerate(recipe.stages) if s.type == "quantize"]
    if not quantize:
        return RecipeWeights(float_bits)
    config = quantize[-1]
    if config.method == "fp8":
        return RecipeWeights(float_bits, "fp8", 8)
    return RecipeWeights(float_bits, config.method, config.bits, config.group_size or shape.hidden_size,
                         config.quantize_lm_head)


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

    check_chain(loaded, target, source)


def pruned_shape(loaded: Any, shape: Any) -> Any:
    """Refuse an impossible pruned shape now (with the nearest valid ones); return the shape
    the model will have after the last prune stage."""
    from edgekit.prune.shapes import ShapeError, plan_shape

    recipe = loaded.recipe
    for index, spec in enumerate(recipe.stages):
        if spec.type != "prune":
            continue
        try:
            shape = plan_shape(shape, recipe.stage_config(index))
        except ShapeError as exc:
            raise RecipeError(str(exc), where=loaded.where("stages", index, *((exc.field,) if exc.field else ())), how=exc.how) from None
    return shape


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
