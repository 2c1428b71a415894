"""Load a state dict into a model strictly (the one mismatch wording every checkpoint reader
uses), with tied weights stored once."""

from __future__ import annotations

from typing import Any

from edgekit.errors import ModelError


def _storage_key(tensor: Any) -> tuple:
    return (str(tensor.device), tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))


REBUILD_HOW = "re-create the checkpoint with the quantize stage (it is damaged or from another model)"


def _shared_groups(state: dict[str, Any]) -> list[set[str]]:
    """Names of state-dict entries that share storage (tied weights), grouped."""
    groups: dict[tuple, set[str]] = {}
    for name, tensor in state.items():
        groups.setdefault(_storage_key(tensor), set()).add(name)
    return [g for g in groups.values() if len(g) > 1]


def load_state_strict(model: Any, tensors: dict[str, Any], where: str, *, how: str = REBUILD_HOW) -> None:
    """``load_state_dict`` that accepts only an exact match (tied weights may be stored once,
    under either name) and reports a mismatch as one ModelError line."""
    tied = {n for g in _shared_groups(model.state_dict()) if g & set(tensors) for n in g}
    try:
        result = model.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:  # shape mismatches
        detail = " ".join(str(exc).split())
        raise ModelError(f"checkpoint tensors do not fit the model: {detail[:300]}", where=where, how=how) from exc
    missing = sorted(set(result.missing_keys) - tied)
    unexpected = sorted(result.unexpected_keys)
    if missing or unexpected:

        def listed(names: list[str]) -> str:
            return ", ".join(names[:5]) + (" …" if len(names) > 5 else "")

        parts = []
        if missing:
            parts.append(f"lacks {len(missing)} tensor(s) the model needs (missing {listed(missing)})")
        if unexpected:
            parts.append(f"has {len(unexpected)} tensor(s) the model does not use (unexpected {listed(unexpected)})")
        raise ModelError(f"checkpoint tensors do not match the model: it {' and '.join(parts)}", where=where, how=how)
