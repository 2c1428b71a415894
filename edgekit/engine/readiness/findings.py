"""What a readiness check reports: :class:`Finding`, and :class:`Tally`, which groups repeated
problems (one per op type or problem) into one finding with a count."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

Severity = Literal["error", "warning", "info"]
SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}


@dataclass(frozen=True)
class Finding:
    """One readiness result: what is wrong (or worth knowing) and how to fix it."""

    severity: Severity
    #: stable id: "unsupported-op", "opset", "dynamic-axis-without-profile", "fp8-needs-sm89", ...
    code: str
    #: names the node (name + op type), input or file
    message: str
    #: how to fix it, one sentence
    fix: str
    node: str | None = None


def label(node: Any) -> str:
    return f"{node.name or '<unnamed>'} ({node.op_type})"


class Tally:
    """Groups repeated findings (one per op type or problem) into one line with a count, so a
    graph with 210 identical problems reports one finding naming the first node."""

    def __init__(self) -> None:
        self._groups: dict[tuple[str, str], list[Any]] = {}
        self._order: list[tuple[str, str]] = []

    def add(self, key: tuple[str, str], node: Any, *details: Any) -> None:
        if key not in self._groups:
            self._groups[key] = [node, 0, details]
            self._order.append(key)
        self._groups[key][1] += 1

    def items(self) -> Iterator[tuple[tuple[str, str], Any, int, tuple[Any, ...]]]:
        for key in self._order:
            node, count, details = self._groups[key]
            yield key, node, count, details


def more(count: int, what: str = "node") -> str:
    """" (and 2 more nodes like it)" after the first of ``count`` grouped items."""
    return f" (and {count - 1} more {what}{'s' if count > 2 else ''} like it)" if count > 1 else ""
