"""Prune ``reconstruct``: the kept output-projection columns refitted by least squares."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli, write_recipe
from test_prune import _ids, _logits, _model


def _samples(count=4, length=32, seed=7):
    import torch

    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (1, length), generator=generator) for _ in range(count)]


def _half_kept(model):
    """Keep MLP channels 0..47 of 96 and the first query head of each KV group, in every layer."""
    from edgekit.prune.apply import KeptUnits

    layers = list(range(model.config.num_hidden_layers))
    return KeptUnits(layers=layers, hidden=None, heads=[[0, 2] for _ in layers], kv_heads=[[0, 1] for _ in layers],
                     channels=[list(range(48)) for _ in layers])


def test_removed_units_that_duplicate_kept_ones_are_taken_over_exactly():
    """MLP channel 48+i computes 0.5 x channel i, and query head 1 (3) attends exactly as head 0 (2)
    does: what they wrote is expressible by the kept units, so the refitted model must reproduce
    the teacher while the plain slice does not."""
    import torch

    from edgekit.prune.apply import prune_model
    from edgekit.prune.reconstruct import apply_reconstruction, reconstruct_outputs

    model = _model()  # llama, 4 heads / 2 kv, hidden 64, intermediate 96, head_dim 16
    with torch.no_grad():
        for layer in model.model.layers:
            mlp, attn = layer.mlp, layer.self_attn
            mlp.gate_proj.weight[48:] = mlp.gate_proj.weight[:48]
            mlp.up_proj.weight[48:] = 0.5 * mlp.up_proj.weight[:48]
            attn.q_proj.weight[16:32] = attn.q_proj.weight[:16]
            attn.q_proj.weight[48:64] = attn.q_proj.weight[32:48]
    kept = _half_kept(model)
    ids = _ids()
    reference = _logits(model, ids)
    sliced = prune_model(model, kept)
    reconstruction = reconstruct_outputs(model, kept, _samples(), ridge=1e-9)
    assert len(reconstruction.weights) == 2 * model.config.num_hidden_layers
    refitted = prune_model(model, kept)
    apply_reconstruction(refitted, kept, reconstruction)
    assert (_logits(sliced, ids) - reference).abs().max() > 0.05
    assert (_logits(refitted, ids) - reference).abs().max() < 1e-3
    for key in reconstruction.weights:
        assert reconstruction.error_sliced[key] > 0.05 and reconstruction.error_refit[key] < 1e-6, key


def test_refit_lowers_the_error_on_a_random_model_and_passes_do_not_matter():
    """On random weights (nothing duplicated) the refit still fits the calibration windows better
    than the slice, moves held-out logits closer to the teacher, and gives the same weights
    whether the statistics fit one pass or take one pass per linear."""
    import torch

    from edgekit.prune.apply import prune_model
    from edgekit.prune.reconstruct import apply_reconstruction, reconstruct_outputs, reconstruction_passes

    model = _model(seed=3)
    kept = _half_kept(model)
    samples = _samples(count=6, length=48)
    one_pass = reconstruct_outputs(model, kept, samples)
    per_linear = reconstruct_outputs(model, kept, samples, budget_bytes=1)
    assert one_pass.passes == 1 and per_linear.passes == len(one_pass.weights) == 6
    assert reconstruction_passes(model, kept) == 1 and reconstruction_passes(model, kept, budget_bytes=1) == 6
    for key, weight in one_pass.weights.items():
        assert torch.allclose(weight, per_linear.weights[key], rtol=0, atol=1e-6), key
        assert one_pass.error_refit[key] < one_pass.error_sliced[key], key
    ids = _ids(seed=11, length=48)
    reference = _logits(model, ids)
    sliced = prune_model(model, kept)
    refitted = prune_model(model, kept)
    apply_reconstruction(refitted, kept, one_pass)
    assert ((_logits(refitted, ids) - reference) ** 2).mean() < 0.8 * ((_logits(sliced, ids) - reference) ** 2).mean()
    summary = one_pass.summary()
    assert set(summary["linears"]) == {"self_attn.o_proj", "mlp.down_proj"}
    assert all(v["relative_error_refit"] < v["relative_error_sliced"] for v in summary["linears"].values())


def test_nothing_removed_nothing_refitted():
    from edgekit.prune.apply import KeptUnits
    from edgekit.prune.reconstruct import reconstruct_outputs

    model = _model()
    layers = list(range(model.config.num_hidden_layers))
    kept = KeptUnits(layers=layers[:2], hidden=list(range(48)), heads=[[0, 1, 2, 3] for _ in layers[:2]],
                     kv_heads=[[0, 1] for _ in layers[:2]], channels=[list(range(96)) for _ in layers[:2]])
    result = reconstruct_outputs(model, kept, _samples())
    assert result.weights == {} and result.passes == 0


@pytest.mark.parametrize("sizes", ["params: 0.75\n    axes: [mlp, heads]", "hidden_size: 48\n    intermediate_size: 96"])
def test_prune_stage_reconstruct_end_to_end(tmp_path, tiny_model_dir, sizes):
    """The stage records the refit, writes weights that differ from the plain slice exactly in
    the refitted linears, and its rows follow the kept hidden channels ([mlp, hidden])."""
    from safetensors.torch import load_file

    from edgekit import api

    def stages(extra):
        return ("stages:\n  - type: load\n  - type: prune\n    " + sizes +
                "\n    calibration_samples: 4\n    sequence_length: 64\n" + extra + "  - type: evaluate\n")

    plain = write_recipe(tmp_path / "plain.yaml", tiny_model_dir, stages=stages(""), output=tmp_path / "plain")
    refit = write_recipe(tmp_path / "refit.yaml", tiny_model_dir, stages=stages("    reconstruct: true\n"), output=tmp_path / "refit")
    plain_manifest = api.compress(plain, quiet=True)
    refit_manifest = api.compress(refit, quiet=True)
    prune_dir = "stages/02-prune"
    record = json.loads((tmp_path / "refit" / prune_dir / "pruning.json").read_text())
    assert "reconstruction" not in json.loads((tmp_path / "plain" / prune_dir / "pruning.json").read_text())
    linears = record["reconstruction"]["linears"]
    assert record["reconstruction"]["ridge"] == 1e-3 and record["reconstruction"]["passes"] == 1
    assert "mlp.down_proj" in linears and ("self_attn.o_proj" in linears) == ("heads" in sizes)
    for entry in linears.values():
        assert entry["relative_error_refit"] < entry["relative_error_sliced"]
    metrics = {s["name"]: s["metrics"] for s in refit_manifest["stages"]}
    assert metrics["prune"]["output_error_refit"] < metrics["prune"]["output_error_sliced"]
    assert "output_error_refit" not in {s["name"]: s["metrics"] for s in plain_manifest["stages"]}["prune"]
    # The same units are kept; only the refitted linears differ.
    assert record["kept"] == json.loads((tmp_path / "plain" / prune_dir / "pruning.json").read_text())["kept"]
    a = load_file(tmp_path / "plain" / prune_dir / "model.safetensors")
    b = load_file(tmp_path / "refit" / prune_dir / "model.safetensors")
    assert a.keys() == b.keys()
    refitted_names = {"mlp.down_proj"} | ({"self_attn.o_proj"} if "heads" in sizes else set())
    for name in a:
        changed = not bool((a[name] == b[name]).all())
        assert changed == any(f"{n}.weight" in name for n in refitted_names), name
    perplexity = {label: s["metrics"]["perplexity"] for label, s in (("plain", plain_manifest["stages"][-1]), ("refit", refit_manifest["stages"][-1]))}
    assert all(v == v and v > 1 for v in perplexity.values())  # the refitted checkpoint loads and scores


def test_reconstruct_off_keeps_cache_keys():
    from edgekit.prune.stage import PruneConfig

    dump = PruneConfig.model_validate({"params": 0.7}).model_dump()
    assert "reconstruct" not in dump and "reconstruct_ridge" not in dump
    dump = PruneConfig.model_validate({"params": 0.7, "reconstruct": True}).model_dump()
    assert dump["reconstruct"] is True and "reconstruct_ridge" not in dump
    dump = PruneConfig.model_validate({"params": 0.7, "reconstruct": True, "reconstruct_ridge": 0.01}).model_dump()
    assert dump["reconstruct_ridge"] == 0.01


@pytest.mark.parametrize("extra,message", [
    ("    reconstruct: true\n    reconstruct_ridge: 0\n", "reconstruct_ridge"),
    ("    reconstruct: true\n    reconstruct_ridge: -1\n", "reconstruct_ridge"),
    ("    reconstruct: true\n    reconstruct_ridge: .nan\n", "non-finite number"),  # refused by the loader, with its line
    ("    reconstruct: true\n    reconstruct_ridge: .inf\n", "non-finite number"),
    ("    reconstruct: true\n    reconstruct_ridge: lots\n", "reconstruct_ridge"),
    ("    reconstruct: maybe\n", "reconstruct"),
    ("    reconstruct: [true]\n", "reconstruct"),
    ("    reconstruct: true\n    axes: [hidden]\n", "removes neither"),
    ("    reconstruct: true\n    axes: [depth]\n", "removes neither"),
    ("    reconstruct_typo: true\n", "reconstruct_typo"),
])
def test_hostile_reconstruct_values_are_one_line_errors(tmp_path, tiny_model_dir, extra, message):
    stages = "stages:\n  - type: load\n  - type: prune\n    params: 0.75\n" + extra
    recipe = write_recipe(tmp_path / "bad.yaml", tiny_model_dir, stages=stages, output=tmp_path / "run")
    result = run_cli("recipe", "validate", str(recipe))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "bad.yaml" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_explicit_sizes_that_remove_no_mlp_or_head_refuse_reconstruct():
    from pydantic import ValidationError

    from edgekit.prune.stage import PruneConfig

    with pytest.raises(ValidationError, match="removes neither"):
        PruneConfig.model_validate({"hidden_size": 32, "reconstruct": True})
    for ridge in (float("nan"), float("inf"), 0.0, 1.5):  # the API path, without the YAML loader
        with pytest.raises(ValidationError, match="reconstruct_ridge"):
            PruneConfig.model_validate({"params": 0.7, "reconstruct": True, "reconstruct_ridge": ridge})
    assert PruneConfig.model_validate({"intermediate_size": 32, "reconstruct": True}).reconstruct
    assert PruneConfig.model_validate({"num_attention_heads": 2, "reconstruct": True}).reconstruct
    # magnitude importance reads no data, but the refit does: generated windows are then allowed
    assert PruneConfig.model_validate({"params": 0.7, "importance": "magnitude", "reconstruct": True, "generated_ratio": 0.5,
                                       "calibration_samples": 4, "sequence_length": 64}).reconstruct
