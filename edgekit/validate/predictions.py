"""``edgekit plan``'s predictions for a bundle (its config, weight format and target, and this
host's target profile), next to what a validation run measured."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgekit.errors import EdgekitError


def _weights_from_bundle(manifest: dict[str, Any], bundle_dir: Path) -> dict[str, Any]:
    """The deployed weight format, from the manifest's quantize record and the bundle's recipe."""
    import yaml

    quantize = next((s.get("metrics") or {} for s in reversed(manifest.get("stages") or []) if s.get("type") == "quantize"), None)
    recipe: dict[str, Any] = {}
    if (bundle_dir / "recipe.yaml").is_file():
        try:
            recipe = yaml.safe_load((bundle_dir / "recipe.yaml").read_text()) or {}
        except yaml.YAMLError:
            recipe = {}
    stages = [s for s in (recipe.get("stages") or []) if isinstance(s, dict)]
    quant_cfg = next((s for s in reversed(stages) if s.get("type") == "quantize"), {})
    engine_cfg = next((s for s in reversed(stages) if s.get("type") == "build_engine"), {})
    if not quantize:
        return {"precision": "fp16", "group_size": None, "quantize_lm_head": False,
                "from": "no quantize stage: the float graph, planned as TensorRT builds it (FP16)",
                "prefill_chunk": engine_cfg.get("max_prefill")}
    if quantize.get("method") == "fp8":
        precision, group = "fp8", None
    else:
        precision, group = f"int{quantize.get('bits', 4)}", quantize.get("group_size")
    return {"precision": precision, "group_size": group, "quantize_lm_head": bool(quant_cfg.get("quantize_lm_head", False)),
            "from": f"manifest: quantize {quantize.get('method')} {quantize.get('bits')}-bit, group {group}",
            "prefill_chunk": engine_cfg.get("max_prefill")}


def predictions(bundle_dir: Path, manifest: dict[str, Any], *, host_target: str | None, prompt_tokens: int,
                max_new_tokens: int, measured: dict[str, float | None], is_target: bool) -> dict[str, Any]:
    """``edgekit plan`` for the bundle's config.json, weight format and target (and the host's
    target profile when it is another one), next to what was measured."""
    from dataclasses import replace

    from edgekit.planning import roofline as rf
    from edgekit.planning.report import NOTE, plan_target
    from edgekit.planning.request import plan_request
    from edgekit.targets import load_target

    try:
        weights = _weights_from_bundle(manifest, bundle_dir)
        context = int(manifest.get("context_length") or 2048)
        # The cache holds prompt + (on average) half the generated tokens at a measured decode step.
        kv_fill = min(1.0, (prompt_tokens + max_new_tokens / 2) / context)
        # The bundle's own copy of its target profile (a custom target YAML travels with it).
        target_file = bundle_dir / "target.yaml"
        request, planned = plan_request(
            str(bundle_dir.resolve()), target=str(target_file) if target_file.is_file() else manifest.get("target"),
            context_length=context, batch=1, precision=weights["precision"], group_size=weights["group_size"],
            prompt_tokens=min(prompt_tokens, context), kv_fill=kv_fill, prefill_chunk=weights["prefill_chunk"],
        )
        if weights["quantize_lm_head"] and weights["precision"] in ("int8", "int4"):
            request = replace(request, fmt=rf.weight_format(weights["precision"], group_size=request.fmt.group_size,
                                                            quantize_lm_head=True, hidden_size=request.shape.hidden_size))
        budgets = manifest.get("budgets") or {}
        request = replace(request, latency_budget_ms=budgets.get("latency_p99_ms"), ttft_budget_ms=budgets.get("ttft_p99_ms"),
                          memory_budget_gb=budgets.get("memory_gb"))
        targets = [(planned[0], "bundle target")]
        if host_target and host_target != targets[0][0].name:
            targets.append((load_target(host_target), "this host's target profile"))
    except (EdgekitError, KeyError, ValueError, OSError) as exc:
        reason = exc.one_line() if isinstance(exc, EdgekitError) else f"{type(exc).__name__}: {exc}"
        return {"available": False, "reason": f"edgekit plan could not run for this bundle: {reason}"}

    entries = []
    for target, role in targets:
        entry = plan_target(request, target)
        row: dict[str, Any] = {"target": target.name, "role": role, "supported": entry.get("supported", False)}
        if not row["supported"]:
            row["reason"] = entry.get("unsupported_reason")
            entries.append(row)
            continue
        measured_here = is_target if role == "bundle target" else True
        decode, prefill = entry["predicted_decode"], entry["predicted_prefill"]
        row.update(
            power_mode=entry["hardware"]["power_mode"],
            measured_on_this_target=measured_here,
            predicted_decode_ms_per_token=decode["ms_per_token"],
            predicted_decode_extrapolated=decode["extrapolated"],
            predicted_ttft_ms=prefill["ttft_ms"],
            predicted_ttft_extrapolated=prefill["extrapolated"],
            predicted_memory_gb=entry["predicted_memory_gb"]["total"],
            predicted_within_budgets=entry["predicted_within_budgets"],
        )
        comparisons = []
        quantities = (("decode ms/token (mean TPOT)", decode["ms_per_token"], measured.get("tpot_mean_ms")),
                      (f"TTFT ms (mean, {prompt_tokens}-token prompt)", prefill["ttft_ms"], measured.get("ttft_mean_ms")),
                      # the plan predicts decimal GB (as targets state memory); peak memory is measured in GiB
                      ("peak memory GiB", round(entry["predicted_memory_gb"]["total"] * 1e9 / 1024**3, 4),
                       measured.get("memory_gb")))
        for name, predicted, got in quantities:
            comparisons.append({"quantity": name, "predicted": predicted, "measured": round(got, 4) if got is not None else None,
                                "measured_over_predicted": round(got / predicted, 3) if got is not None and predicted else None})
        row["comparison"] = comparisons
        entries.append(row)
    return {
        "available": True,
        "note": NOTE + " The measured column is from this run"
                + ("" if is_target else ", on this host, which is NOT the bundle's target: the ratio says how this host "
                                        "compares with the target's prediction, not how accurate the prediction is") + ".",
        "inputs": {"model_config": str(bundle_dir / "config.json"), "weights": weights["from"], "precision": weights["precision"],
                   "group_size": weights["group_size"], "quantize_lm_head": weights["quantize_lm_head"],
                   "context_length": context, "batch": 1, "prompt_tokens": prompt_tokens, "kv_fill": round(kv_fill, 4)},
        "targets": entries,
    }
