"""The budgets a validation run checks (from the manifest, overridden or added by the caller)
and what each is compared with."""

from __future__ import annotations

from typing import Any

BUDGET_KEYS = ("latency_p99_ms", "ttft_p99_ms", "memory_gb")
#: the command-line options that set them
BUDGET_FLAGS = {"latency_p99_ms": "--budget-latency-ms", "ttft_p99_ms": "--budget-ttft-ms", "memory_gb": "--budget-memory-gb"}
#: what each budget is compared with (report wording)
BUDGET_MEASURES = {
    "latency_p99_ms": "p99 time per output token (TPOT), ms",
    "ttft_p99_ms": "p99 time to first token (TTFT), ms",
    "memory_gb": "peak memory (RSS + GPU), GiB",
}


def check_budgets(manifest_budgets: dict[str, Any] | None, overrides: dict[str, float | None] | None,
                  measured: dict[str, float | None]) -> dict[str, dict[str, Any]]:
    """``{name: {budget, measured, meets, source, measure}}`` for every budget the manifest
    sets or ``overrides`` sets or replaces (None in ``overrides`` keeps the manifest's)."""
    checks: dict[str, dict[str, Any]] = {}
    for key in BUDGET_KEYS:
        override = (overrides or {}).get(key)
        value = override if override is not None else (manifest_budgets or {}).get(key)
        if value is None:
            continue
        got = measured.get(key)
        checks[key] = {
            "budget": float(value),
            "measured": round(got, 4) if got is not None else None,
            "meets": got is not None and got <= float(value),
            "source": "override" if override is not None else "manifest",
            "measure": BUDGET_MEASURES[key],
        }
    return checks
