"""The report every quantized rewrite returns: counts, format, opset, bytes and the notes on
shared, tied and de-duplicated weights."""

from __future__ import annotations

from typing import Any

from edgekit.export.quantized.match import LinearMatch


def rewrite_report(fmt: str, replaced: int, opset: int, bits: Any, nbytes: int, notes: list[str], **extra: Any) -> dict[str, Any]:
    out = {"replaced": replaced, "format": fmt, "opset": opset, "bits": bits, "bytes": nbytes, "notes": notes}
    out.update(extra)
    return out


def bits_field(bits: set[int]) -> Any:
    return next(iter(bits)) if len(bits) == 1 else sorted(bits)


def shared_notes(public: dict[str, list[LinearMatch]]) -> list[str]:
    notes = []
    by_init: dict[str, list[str]] = {}
    for module, matches in public.items():
        for m in matches:
            by_init.setdefault(m.initializer, []).append(module)
            if len(m.nodes) > 1:
                notes.append(f"'{module}': initializer {m.initializer} is read by {len(m.nodes)} MatMuls; all replaced")
            if m.transposed:
                notes.append(f"'{module}': found as Transpose({m.initializer}) (a tied weight); stored pre-transposed")
    for init, modules in sorted(by_init.items()):
        if len(modules) > 1:
            names = sorted(modules)
            notes.append(f"modules {', '.join(names)} have identical values (one initializer {init}); encoded from '{names[0]}'")
    return notes


def matches_json(public: dict[str, list[LinearMatch]]) -> dict[str, list[dict[str, Any]]]:
    return {module: [m._asdict() | {"nodes": list(m.nodes)} for m in matches] for module, matches in public.items()}
