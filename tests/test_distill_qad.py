"""Quantization-aware distillation (``distill`` with ``mode: qad``) on the tiny Llama: the
fake-quantized linear reproduces the GPTQ model at step 0 (any g_idx, symmetric or not) with a
straight-through gradient; training moves codes and lowers the KL to the float teacher; the
written checkpoint is the fake-quantized model, in the quantize stage's format; the chain
load -> quantize -> distill(qad) -> evaluate -> export_onnx runs; hostile settings and
mismatched inputs are one-line errors; a killed run resumes bit-identically."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import python_docs_text, run_cli, write_recipe
from test_distill import make_ctx as distill_ctx, one_thread, run_killed_after_checkpoint, sha256  # noqa: F401 (one_thread: a fixture)

from edgekit import api
from edgekit.errors import StageError

ROOT = Path(__file__).resolve().parents[1]

GPTQ_STAGES = """\
stages:
  - type: load
  - type: quantize
    method: gptq
    bits: 4
    group_size: 32
    symmetric: {symmetric}
    act_order: true
    calibration_samples: 8
    sequence_length: 64
"""


@pytest.fixture(scope="module")
def parent(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny Llama after 60 steps of next-token training: a float model whose predictions
    carry structure, so 4-bit rounding costs something QAD can win back."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("parent") / "float"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        ids = tokenizer(python_docs_text()[:100_000])["input_ids"]
        data = torch.tensor(ids[: len(ids) // 64 * 64]).view(-1, 64)
        generator = torch.Generator().manual_seed(0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(60):
            batch = data[torch.randint(0, len(data), (8,), generator=generator)]
            model(input_ids=batch, labels=batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        model.save_pretrained(root)
        tokenizer.save_pretrained(root)
    finally:
        torch.set_num_threads(threads)
    return root


# Round to nearest, one scale per output row, no clipping: the coarsest integer grid, whose cost
# on the tiny model is large enough for a few steps of QAD to win part of it back.
COARSE_STAGES = """\
stages:
  - type: load
  - type: quantize
    method: rtn
    bits: 4
    group_size: null
    symmetric: true
    clip_search: false
"""


def _quantized(tmp_path_factory, parent: Path, stages: str) -> Path:
    import torch

    root = tmp_path_factory.mktemp("quantized")
    recipe = write_recipe(root / "q.yaml", parent, stages=stages, output=root / "run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        manifest = api.compress(recipe, quiet=True)
    finally:
        torch.set_num_threads(threads)
    return root / "run" / manifest["stages"][-1]["dir"]


@pytest.fixture(scope="module")
def gptq_sym(tmp_path_factory, parent) -> Path:
    return _quantized(tmp_path_factory, parent, GPTQ_STAGES.format(symmetric="true"))


@pytest.fixture(scope="module")
def gptq_asym(tmp_path_factory, parent) -> Path:
    return _quantized(tmp_path_factory, parent, GPTQ_STAGES.format(symmetric="false"))


@pytest.fixture(scope="module")
def rtn_coarse(tmp_path_factory, parent) -> Path:
    return _quantized(tmp_path_factory, parent, COARSE_STAGES)


#: distill settings of the qad runs here (tests override some)
QAD_DEFAULTS = dict(mode="qad", steps=20, learning_rate=1e-3, warmup_steps=2, batch_size=2, sequence_length=32,
                    checkpoint_every=10, eval_every=10, eval_windows=2, precision="fp32")


def make_ctx(tmp: Path, teacher: Path, student: Path, **params):
    return distill_ctx(tmp, teacher, student, **{**QAD_DEFAULTS, **params})


def _batch(checkpoint: Path):
    import torch

    from edgekit.weights.checkpoint import load_tokenizer

    ids = load_tokenizer(checkpoint)(python_docs_text()[-4000:])["input_ids"][:96]
    return torch.tensor([ids[:48], ids[48:96]])


# -- the fake-quantized linear -------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quantized_weight_is_the_dequantized_codes_with_a_straight_through_gradient(symmetric):
    """Any group assignment (a permuted g_idx, as act-order with dynamic groups writes), either
    zero-point scheme: at init the fake weight is dequantize() bit for bit and re-derives the
    same codes; the gradient reaches the latent weight inside the code range only, and the
    scales (trainable) get the LSQ gradient."""
    import torch

    from edgekit.distill.qad import FakeQuantLinear
    from edgekit.weights.grid import QuantizedWeight, rtn_quantize

    torch.manual_seed(0)
    qw = rtn_quantize(torch.randn(16, 64) * 0.05, bits=4, group_size=16, symmetric=symmetric)
    permutation = torch.randperm(64)
    qw = QuantizedWeight(qweight=qw.qweight[:, permutation], scales=qw.scales, zeros=qw.zeros,
                         g_idx=qw.g_idx[permutation].clone(), bits=4, group_size=16, symmetric=symmetric)
    assert not qw.contiguous_groups
    layer = FakeQuantLinear(qw, trainable_scales=True)
    assert torch.equal(layer.fake_weight(), qw.dequantize(torch.float32))
    assert torch.equal(layer.quantized_weight().qweight, qw.qweight)
    x = torch.randn(3, 64)
    assert torch.equal(layer(x), x @ qw.dequantize(torch.float32).T)

    with torch.no_grad():  # push one weight far past the grid's top, one inside it
        layer.weight[0, 0] = 100.0
        layer.weight[1, 1] += 0.3 * layer.scales[1, int(qw.g_idx[1])]
    layer.fake_weight().sum().backward()
    assert layer.weight.grad[0, 0] == 0  # clamped: no gradient
    assert layer.weight.grad[1, 1] == 1  # straight through the round
    group = int(qw.g_idx[1])
    inside = (qw.g_idx == group)
    zero = float(qw.zeros[1, group])
    w, s = layer.weight.detach()[1, inside], float(layer.scales.detach()[1, group])
    codes = torch.clamp(torch.round(w / s) + zero, 0, 15)
    in_range = (torch.round(w / s) + zero >= 0) & (torch.round(w / s) + zero <= 15)
    expected = torch.where(in_range, torch.round(w / s) - w / s, codes - zero).sum()
    assert float(layer.scales.grad[1, group]) == pytest.approx(float(expected), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("symmetric", [True, False])
def test_frozen_scales_take_the_fused_pass_with_the_same_weight_and_gradient(symmetric):
    """With frozen scales the layer runs one fused pass (fake_quantize_frozen): bit for bit the
    weight fake_quantize gives, and the same straight-through gradient (zero past the grid)."""
    import torch

    from edgekit.distill.qad import FakeQuantLinear, fake_quantize, fake_quantize_frozen
    from edgekit.weights.grid import QuantizedWeight, rtn_quantize

    torch.manual_seed(1)
    qw = rtn_quantize(torch.randn(24, 96) * 0.05, bits=4, group_size=32, symmetric=symmetric)
    permutation = torch.randperm(96)
    qw = QuantizedWeight(qweight=qw.qweight[:, permutation], scales=qw.scales, zeros=qw.zeros,
                         g_idx=qw.g_idx[permutation].clone(), bits=4, group_size=32, symmetric=symmetric)
    latent = qw.dequantize(torch.float32) + torch.randn(24, 96) * 0.02  # codes move, some past the ends
    latent[0, :4] = torch.tensor([100.0, -100.0, 0.0, 1e-4])
    a, b = latent.clone().requires_grad_(True), latent.clone().requires_grad_(True)
    reference = fake_quantize(a, qw.scales.float(), qw.zeros, qw.g_idx, 4)
    fused = fake_quantize_frozen(b, qw.scales.float(), qw.zeros, qw.g_idx, 4)
    assert torch.equal(fused, reference)
    upstream = torch.randn(24, 96)
    reference.backward(upstream)
    fused.backward(upstream)
    assert torch.equal(b.grad == 0, a.grad == 0) and b.grad[0, 0] == 0 and b.grad[0, 1] == 0
    assert torch.allclose(b.grad, a.grad, rtol=1e-6, atol=0)

    layer = FakeQuantLinear(qw, trainable_scales=False)
    with torch.no_grad():
        layer.weight.copy_(latent)
    assert torch.equal(layer.fake_weight(), reference.detach())
    x = torch.randn(5, 96)
    layer(x).sum().backward()
    assert layer.weight.grad is not None and not layer.scales.requires_grad



def test_step_zero_is_the_gptq_model(gptq_asym, one_thread):
    """The GPTQ checkpoint loaded with QuantLinear and the same checkpoint swapped to
    fake-quantized layers give the same logits, bit for bit (act-order, asymmetric)."""
    import torch

    from edgekit.distill.qad import FakeQuantLinear, to_fake_quant
    from edgekit.weights.checkpoint import load_checkpoint

    batch = _batch(gptq_asym)
    quantized, _ = load_checkpoint(gptq_asym, dtype="float32")
    fake, _ = load_checkpoint(gptq_asym, dtype="float32")
    original = to_fake_quant(fake, trainable_scales=False)
    assert len(original) == 14 and sum(isinstance(m, FakeQuantLinear) for m in fake.modules()) == 14
    trainable = {n for n, p in fake.named_parameters() if p.requires_grad}
    assert "model.layers.0.self_attn.q_proj.weight" in trainable and not any(n.endswith(".scales") for n in trainable)
    with torch.no_grad():
        assert torch.equal(quantized(input_ids=batch).logits, fake(input_ids=batch).logits)


# -- training and the written checkpoint -----------------------------------------------------------


def test_qad_moves_codes_lowers_the_kl_and_writes_the_fake_quantized_model(tmp_path, parent, rtn_coarse, one_thread):
    import torch
    from safetensors.torch import load_file

    from edgekit.distill.stage import run_distill
    from edgekit.measure.perplexity import perplexity_torch
    from edgekit.models.text import tokenize_splits
    from edgekit.weights.checkpoint import load_checkpoint, load_tokenizer
    from edgekit.weights.loader import QuantLinear, read_quantized_weights

    ctx = make_ctx(tmp_path, parent, rtn_coarse, steps=30, learning_rate=3e-4)
    metrics = run_distill(ctx)
    assert metrics["mode"] == "qad" and metrics["qad_scales"] == "frozen"
    assert metrics["kl_end"] < 0.8 * metrics["kl_start"]
    assert metrics["qad_codes_changed"] > 0 and metrics["qad_scales_changed"] == 0
    out = ctx.output_dir
    # the quantize stage's format, unchanged: same config.json, same tensors and dtypes
    assert (out / "config.json").read_text() == (rtn_coarse / "config.json").read_text()
    before, after = load_file(rtn_coarse / "model.safetensors"), load_file(out / "model.safetensors")
    assert {k: (v.dtype, v.shape) for k, v in before.items()} == {k: (v.dtype, v.shape) for k, v in after.items()}
    assert (out / "quantization.json").read_text() == (rtn_coarse / "quantization.json").read_text()
    old, new = read_quantized_weights(rtn_coarse), read_quantized_weights(out)
    changed = sum(int((old[n].qweight != new[n].qweight).sum()) for n in old)
    record = json.loads((out / "distill.json").read_text())
    assert record["mode"] == "qad" and record["qad"]["codes_changed"] == changed == metrics["qad_codes_changed"]
    assert record["qad"]["codes_total"] == sum(int(q.qweight.numel()) for q in old.values())
    assert all(torch.equal(old[n].scales, new[n].scales) and torch.equal(old[n].zeros, new[n].zeros) for n in old)
    # the written checkpoint loads with QuantLinear and scores what the fake-quantized model scored last
    model, _ = load_checkpoint(out, dtype="float32")
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    splits = tokenize_splits(python_docs_text(), load_tokenizer(out), eval_tokens=1024, window=128)
    assert perplexity_torch(model, splits.evaluation, window=128)["perplexity"] == record["evals"][-1]["perplexity"]


def test_trained_scales_are_written_as_float16_and_the_checkpoint_equals_the_fake_model(tmp_path, gptq_asym, one_thread):
    """Any latent weights and scales (here: perturbed as training would) round to codes and
    float16 scales whose QuantLinear model has exactly the fake-quantized model's logits."""
    import torch

    from edgekit.distill.qad import fake_quant_layers, snap_all_scales, to_fake_quant, to_linears
    from edgekit.weights.checkpoint import load_checkpoint, load_tokenizer
    from edgekit.weights.loader import read_quantization_config, save_quantized_checkpoint

    batch = _batch(gptq_asym)
    model, _ = load_checkpoint(gptq_asym, dtype="float32")
    to_fake_quant(model, trainable_scales=True)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in fake_quant_layers(model):
            layer.weight.add_(torch.randn(layer.weight.shape, generator=generator) * layer.weight.std() * 0.3)
            layer.scales.mul_(1 + 0.05 * torch.randn(layer.scales.shape, generator=generator))
    snap_all_scales(model)
    with torch.no_grad():
        expected = model(input_ids=batch).logits
    quantized = to_linears(model)
    save_quantized_checkpoint(model, quantized, tmp_path, quantization_config=read_quantization_config(gptq_asym))
    load_tokenizer(gptq_asym).save_pretrained(tmp_path)
    written, _ = load_checkpoint(tmp_path, dtype="float32")
    with torch.no_grad():
        assert torch.equal(written(input_ids=batch).logits, expected)


def test_latent_weights_and_scales_get_their_own_peak_learning_rate(gptq_sym):
    """With qad_weight_learning_rate / qad_scale_learning_rate the latent weights and the scales
    are AdamW groups of their own (weights decay, scales never); unset, the groups are the two
    of standard distillation. Each group's peak is what the loop's schedule scales."""
    from edgekit.distill.config import DistillConfig
    from edgekit.distill.loop import optimizer_groups
    from edgekit.distill.qad import fake_quant_layers, to_fake_quant
    from edgekit.weights.checkpoint import load_checkpoint

    model, _ = load_checkpoint(gptq_sym, dtype="float32")
    to_fake_quant(model, trainable_scales=True)
    model.get_input_embeddings().weight.requires_grad_(False)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    layers = fake_quant_layers(model)
    latent = {id(m.weight) for _, m in layers}
    scales = {id(m.scales) for _, m in layers}

    def by_peak(config):
        groups, names = optimizer_groups(named, layers, config)
        name_of = {id(p): n for n, p in named}
        assert names == [name_of[id(p)] for g in groups for p in g["params"]]  # the order checkpoints name the state in
        assert sorted(names) == sorted(n for n, _ in named)  # every trainable parameter, once
        return {(g["peak"], g["weight_decay"]): {id(p) for p in g["params"]} for g in groups}

    plain = by_peak(DistillConfig(mode="qad", qad_scales="trainable", learning_rate=1e-3, weight_decay=0.1))
    assert len(plain) == 2 and latent <= plain[(1e-3, 0.1)] and scales <= plain[(1e-3, 0.0)]
    split = by_peak(DistillConfig(mode="qad", qad_scales="trainable", learning_rate=1e-3, weight_decay=0.1,
                                  qad_weight_learning_rate=2e-3, qad_scale_learning_rate=1e-5))
    assert split[(2e-3, 0.1)] == latent and split[(1e-5, 0.0)] == scales
    norms = {id(p) for _, p in named if p.ndim == 1}
    assert norms and split[(1e-3, 0.0)] == norms
    assert (1e-3, 0.1) not in split or not split[(1e-3, 0.1)] & (latent | scales)


def test_a_separate_weight_learning_rate_moves_codes_that_one_small_rate_does_not(tmp_path, parent, rtn_coarse, one_thread):
    """learning_rate tiny for everything, then the same with qad_weight_learning_rate large: only
    the latter changes integer codes (the norms' rate alone cannot move a weight half a grid step)."""
    from edgekit.distill.stage import run_distill

    small = run_distill(make_ctx(tmp_path / "small", parent, rtn_coarse, steps=10, learning_rate=1e-7))
    split = run_distill(make_ctx(tmp_path / "split", parent, rtn_coarse, steps=10, learning_rate=1e-7, qad_weight_learning_rate=2e-3))
    assert small["qad_codes_changed"] == 0 < split["qad_codes_changed"]


def test_trainable_scales_resume_bit_identical_after_a_kill(tmp_path, parent, gptq_sym, one_thread, monkeypatch):
    """qad with trainable scales (weights and scales at their own learning rates), killed right
    after the checkpoint of step 10 and resumed: the same checkpoint bytes and distill.json as
    the uninterrupted run."""
    from edgekit.distill.stage import run_distill

    params = dict(steps=20, checkpoint_every=5, qad_scales="trainable", learning_rate=3e-4, qad_weight_learning_rate=1e-3,
                  qad_scale_learning_rate=1e-5)
    reference = make_ctx(tmp_path / "ref", parent, gptq_sym, **params)
    expected = run_distill(reference)
    assert expected["qad_scales"] == "trainable" and expected["qad_scales_changed"] > 0

    run = make_ctx(tmp_path / "run", parent, gptq_sym, **params)
    run_killed_after_checkpoint(run, 10, monkeypatch)
    resumed = run_distill(run)
    assert resumed["resumed_from"] == 10
    for name in ("model.safetensors", "config.json", "distill.json"):
        assert sha256(run.output_dir / name) == sha256(reference.output_dir / name), name
    assert resumed["curve"] == expected["curve"]


# -- the chain -----------------------------------------------------------------------------------


QAD_CHAIN = """\
stages:
  - type: load
  - type: quantize
    method: rtn
    bits: 4
    group_size: 32
    symmetric: true
  - type: export_onnx
    name: export_quantized
  - type: distill
    mode: qad
    steps: 4
    batch_size: 2
    sequence_length: 32
    warmup_steps: 0
    eval_windows: 2
    precision: fp32
  - type: evaluate
    name: evaluate_qad
  - type: export_onnx
    name: export_qad
"""


def test_chain_quantize_qad_evaluate_export(tmp_path, parent, one_thread):
    import onnx

    recipe = write_recipe(tmp_path / "c.yaml", parent, stages=QAD_CHAIN, output=tmp_path / "run")
    manifest = api.compress(recipe, quiet=True)
    stages = {s["name"]: s for s in manifest["stages"]}
    assert [s["status"] for s in manifest["stages"]] == ["done"] * 6
    assert stages["distill"]["metrics"]["mode"] == "qad"
    assert stages["evaluate_qad"]["metrics"]  # the evaluate stage scored the quantized checkpoint
    graphs = {}
    for name in ("export_quantized", "export_qad"):
        graph = onnx.load(str(tmp_path / "run" / stages[name]["dir"] / "model.onnx"), load_external_data=False).graph
        graphs[name] = sorted(node.op_type for node in graph.node)
    assert "MatMulNBits" in graphs["export_qad"] and graphs["export_qad"] == graphs["export_quantized"]


# -- errors --------------------------------------------------------------------------------------


def _validate_one_line(tmp_path, model, stages: str, *, extra: str = "") -> str:
    recipe = write_recipe(tmp_path / "r.yaml", model, stages=stages, extra=extra)
    result = run_cli("recipe", "validate", str(recipe))
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_wrong_inputs_and_hostile_settings_are_one_line_recipe_errors(tmp_path, tiny_model_dir):
    from pydantic import ValidationError

    from edgekit.distill.config import DistillConfig

    # at their defaults the settings stay out of the dump (cache keys of standard recipes unchanged)
    assert not {"mode", "qad_scales", "qad_weight_learning_rate", "qad_scale_learning_rate"} & set(DistillConfig().model_dump(mode="json"))
    assert DistillConfig(mode="qad", qad_scales="trainable").model_dump(mode="json")["qad_scales"] == "trainable"
    for params, message in (({"mode": "qat"}, "standard"), ({"mode": "qad", "qad_scales": "learned"}, "frozen"),
                            ({"qad_scales": "trainable"}, "applies to mode qad only"), ({"mode": None}, "standard"),
                            ({"mode": "qad", "qad_scales": 1}, "frozen"),
                            ({"qad_weight_learning_rate": 1e-3}, "applies to mode qad only"),
                            ({"mode": "qad", "qad_scale_learning_rate": 1e-5}, "set 'qad_scales: trainable'"),
                            *(({"mode": "qad", "qad_scales": "trainable", field: value}, field_message)
                              for field in ("qad_weight_learning_rate", "qad_scale_learning_rate")
                              for value, field_message in ((0, "greater than 0"), (-1e-3, "greater than 0"), (2.0, "less than or equal"),
                                                           (float("nan"), "greater than 0|finite"), (float("inf"), "finite"),
                                                           ("fast", "valid number")))):
        with pytest.raises(ValidationError, match=message):
            DistillConfig(**params)

    line = _validate_one_line(tmp_path, tiny_model_dir, "stages:\n  - load\n  - type: distill\n    mode: qad\n")
    assert "no quantize stage comes before it" in line and "put a quantize stage" in line
    quantize = "  - type: quantize\n    method: rtn\n    group_size: 32\n"
    line = _validate_one_line(tmp_path, tiny_model_dir, "stages:\n  - load\n" + quantize + "  - type: distill\n    teacher: load\n")
    assert "standard distillation trains float weights" in line and "mode: qad" in line
    line = _validate_one_line(tmp_path, tiny_model_dir, "stages:\n  - load\n" + quantize + "  - type: distill\n    mode: qad\n"
                              "    qad_scales: sometimes\n")
    assert "qad_scales" in line
    # fp8 (a target that has it, so only the qad rule refuses the recipe)
    fp8 = "stages:\n  - load\n  - type: quantize\n    method: fp8\n  - type: distill\n    mode: qad\n    steps: 10\n"
    recipe = write_recipe(tmp_path / "f.yaml", tiny_model_dir, stages=fp8)
    recipe.write_text(recipe.read_text().replace("jetson-orin-nano-8gb", "workstation-h100"))
    result = run_cli("recipe", "validate", str(recipe))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "fp8" in lines[0] and "To resolve, quantize with method gptq, rtn or awq" in lines[0]


def test_run_time_checks_of_the_inputs(tmp_path, parent, gptq_sym):
    """What the stage checks again when it runs (a direct caller, or a checkpoint swapped on
    disk): qad on a float or fp8 student, standard on a GPTQ one, qad with a quantized teacher."""
    from edgekit.distill.spec import TrainSpec, check_checkpoints

    fp8 = tmp_path / "fp8"
    fp8.mkdir()
    config = json.loads((parent / "config.json").read_text())
    (fp8 / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "fp8"}}))

    def check(student: Path, teacher: Path, mode: str) -> str:
        spec = TrainSpec(student=str(student), teacher=str(teacher), output_dir="", work_dir="", config={"mode": mode}, data={})
        with pytest.raises(StageError) as caught:
            check_checkpoints(spec)
        return caught.value.one_line()

    assert "student checkpoint is a float one" in check(parent, parent, "qad")
    assert "student checkpoint is fp8" in check(fp8, parent, "qad")
    assert "To resolve, set 'mode: qad'" in check(gptq_sym, parent, "standard")
    assert "teacher checkpoint is quantized" in check(gptq_sym, gptq_sym, "qad")
    check_checkpoints(TrainSpec(student=str(gptq_sym), teacher=str(parent), output_dir="", work_dir="",
                                config={"mode": "qad"}, data={}))  # the right pair passes


def test_profile_script_times_the_three_paths_on_the_same_loss(tmp_path, parent, gptq_sym, one_thread):
    """scripts/profile_distill_step.py: the reference, heap and fused paths alternate on the same
    batches and compute the same loss; every phase is timed and both reports are written."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("profile_distill_step", ROOT / "scripts" / "profile_distill_step.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "profile"
    assert script.main(["--student", str(gptq_sym), "--teacher", str(parent), "--batch-size", "2", "--length", "32",
                        "--steps", "2", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    rows = {row["variant"]: row for row in report["rows"]}
    assert set(rows) == {"reference", "heap", "fused"}
    for row in rows.values():
        assert set(row["seconds_per_step"]) == set(script.PHASES) and all(v > 0 for v in row["seconds_per_step"].values())
        assert row["loss_first_step"] == pytest.approx(rows["reference"]["loss_first_step"], rel=1e-4)
    assert "| fused |" in out.with_suffix(".md").read_text()
    for hostile in (["--length", "5"], ["--threads", "-1"], ["--steps", "1000000"]):
        with pytest.raises(SystemExit):
            script.main(["--student", str(gptq_sym), "--teacher", str(parent), *hostile])
    with pytest.raises(SystemExit):
        script.main(["--student", str(tmp_path / ".." / "nowhere"), "--teacher", str(parent)])
