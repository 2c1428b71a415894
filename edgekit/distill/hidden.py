"""The hidden-state loss's plumbing: which teacher layer (and hidden channels) each student layer
is compared with, and forward hooks that capture the decoder layers' outputs."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from edgekit.errors import StageError


def layer_map(student_config: Any, teacher_config: Any, pruning: dict[str, Any] | None, *, need_hidden: bool, where: str) -> tuple[list[int], list[int] | None]:
    """(teacher layer per student layer, kept teacher hidden channels or None) for the
    hidden-state loss: from prune's ``pruning.json`` when it fits this teacher, else by
    identity/even spread when the widths match."""
    from edgekit.distill.losses import even_layer_map

    s_layers, t_layers = student_config.num_hidden_layers, teacher_config.num_hidden_layers
    s_hidden, t_hidden = student_config.hidden_size, teacher_config.hidden_size
    kept = (pruning or {}).get("kept") or {}
    layers, hidden = kept.get("layers"), kept.get("hidden")
    fits = (
        isinstance(layers, list)
        and len(layers) == s_layers
        and all(isinstance(i, int) and 0 <= i < t_layers for i in layers)
        and (
            (hidden is None and s_hidden == t_hidden)
            or (isinstance(hidden, list) and len(hidden) == s_hidden and all(isinstance(c, int) and 0 <= c < t_hidden for c in hidden))
        )
    )
    if fits:
        return list(layers), (None if hidden is None else list(hidden))
    if s_hidden != t_hidden and need_hidden:
        reason = "its pruning.json does not fit this teacher" if pruning else "there is no pruning.json to map the channels"
        raise StageError(
            f"hidden_weight > 0 but the student's hidden size {s_hidden} differs from the teacher's {t_hidden} and {reason}",
            where=where,
            how="set hidden_weight: 0, or distill from the checkpoint the prune stage read (teacher: auto)",
        )
    return even_layer_map(s_layers, t_layers), None


def decoder_layers(model: Any) -> Any:
    """The decoder's list of transformer blocks (``model.model.layers`` for Llama-likes)."""
    from edgekit.weights.layers import decoder_layers as find_decoder_layers

    try:
        return find_decoder_layers(model)
    except ValueError:
        raise StageError("cannot find the model's decoder layers", how="use a Llama-style architecture (or set hidden_weight: 0)") from None


class HiddenCapture:
    """Forward hooks that keep the outputs of chosen decoder layers while ``active``."""

    def __init__(self, model: Any, indices: list[int]):
        self.outputs: dict[int, Any] = {}
        self.active = False
        self._handles = []
        layers = decoder_layers(model)
        for index in sorted(set(indices)):
            self._handles.append(layers[index].register_forward_hook(self._hook(index)))

    def _hook(self, index: int):
        def hook(_module, _args, output):
            if self.active:
                self.outputs[index] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    @contextlib.contextmanager
    def capturing(self) -> Iterator[dict[int, Any]]:
        self.outputs = {}
        self.active = True
        try:
            yield self.outputs
        finally:
            self.active = False

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
