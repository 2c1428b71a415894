"""The model a recipe deploys, read from the recipe and the model's shape alone: the shape
after its prune stages and the weight format after its last quantize stage. Shared by recipe
validation's shape chain (:mod:`edgekit.planning.chain`) and ``edgekit plan``
(:mod:`edgekit.planning.request`), so both read a recipe the same way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgekit.errors import RecipeError

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
