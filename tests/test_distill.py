"""The distill stage: losses (forward/reverse KL, JSD), schedule, data order, resumable state,
distillation on the tiny Llama (in this process and under `accelerate launch` with 2 CPU
processes), recipe errors, a kill -9 in the middle of training that resumes bit-identically,
teacher-generated data (sampled once, cached, mixed in a stated ratio) and on-policy steps."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from edgekit.recipe import DataConfig

import pytest
from conftest import python_docs_text, run_cli, write_recipe

from edgekit import api
from edgekit.errors import StageError

# A tiny model is fastest on one thread, and one thread is immune to a busy machine (OpenMP
# threads spinning against another process). Same setting for every run that is compared.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
DATA = {"source": "builtin:python-docs", "text_field": "text", "eval_tokens": 1024, "window": 128}


@pytest.fixture
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    """(teacher, student): the tiny Llama after 60 steps of next-token training (so its
    predictions carry structure worth distilling), and that model with its MLP cut from 128
    to 64 channels, plus the pruning.json the prune stage would write."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("pair")
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
        model.eval()
        teacher, student = root / "teacher", root / "student"
        model.save_pretrained(teacher)
        tokenizer.save_pretrained(teacher)
        config = model.config
        config.intermediate_size = 64
        small = AutoModelForCausalLM.from_config(config)
        cut = {}
        for name, tensor in model.state_dict().items():
            if "gate_proj" in name or "up_proj" in name:
                tensor = tensor[:64]
            elif "down_proj" in name:
                tensor = tensor[:, :64]
            cut[name] = tensor
        small.load_state_dict(cut)
        small.save_pretrained(student)
        tokenizer.save_pretrained(student)
    finally:
        torch.set_num_threads(threads)
    shape = {"layers": 2, "hidden_size": 64, "intermediate_size": 128}
    (student / "pruning.json").write_text(json.dumps({
        "teacher": shape,
        "student": dict(shape, intermediate_size=64),
        "kept": {"layers": [0, 1], "hidden": None, "channels": [list(range(64))] * 2},
    }))
    return teacher, student


def make_ctx(tmp: Path, teacher: Path, student: Path, **params):
    from edgekit.distill.stage import DistillConfig
    from edgekit.pipeline.context import StageContext
    from edgekit.pipeline.progress import Reporter

    defaults = dict(steps=30, learning_rate=1e-3, warmup_steps=3, batch_size=2, sequence_length=32,
                    checkpoint_every=10, eval_every=10, eval_windows=2)
    out = tmp / "out"
    out.mkdir(parents=True)
    return StageContext(
        name="distill", type="distill", index=1, config=DistillConfig(**{**defaults, **params}),
        recipe=SimpleNamespace(data=DataConfig(**DATA), trust_remote_code=False),
        recipe_dir=tmp, target=None, output_dir=out, inputs={"checkpoint": student}, history=[],
        cache_dir=tmp / "cache", work_dir=tmp / "work", references={"teacher": teacher}, reporter=Reporter(quiet=True),
    )


# -- losses ------------------------------------------------------------------------------------


def test_kl_is_zero_for_identical_logits_and_positive_otherwise():
    import torch

    from edgekit.distill.losses import kl_divergence

    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    assert float(kl_divergence(logits, logits.clone())) == pytest.approx(0.0, abs=1e-7)
    assert float(kl_divergence(logits + 3.0, logits)) == pytest.approx(0.0, abs=1e-6)  # a shift changes no softmax
    other = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(1))
    assert float(kl_divergence(other, logits)) > 0.05
    assert kl_divergence(other.half(), logits.half()).dtype == torch.float32


def test_kl_matches_float64_reference_with_temperature():
    import torch

    from edgekit.distill.losses import kl_divergence

    generator = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(3, 4, 7, generator=generator), torch.randn(3, 4, 7, generator=generator) * 2
    for t in (1.0, 2.0, 0.5):
        s, p = student.double() / t, teacher.double() / t
        ps, pt = torch.softmax(s, -1), torch.softmax(p, -1)
        expected = (pt * (pt.log() - ps.log())).sum(-1).mean() * t * t  # forward KL(teacher || student), mean over tokens
        assert float(kl_divergence(student, teacher, t)) == pytest.approx(float(expected), rel=1e-5)
    # direction: KL(teacher || student), not the reverse
    reverse = (torch.softmax(student.double(), -1) * (torch.log_softmax(student.double(), -1) - torch.log_softmax(teacher.double(), -1))).sum(-1).mean()
    assert abs(float(kl_divergence(student, teacher)) - float(reverse)) > 1e-3
    # the T² factor: at a high temperature the scaled KL tends to the mean squared logit gap / 2
    centred = lambda x: x - x.mean(-1, keepdim=True)  # noqa: E731
    limit = float(((centred(teacher.double()) - centred(student.double())) ** 2).mean(-1).mean() / 2)
    assert float(kl_divergence(student, teacher, 100.0)) == pytest.approx(limit, rel=0.05)


def test_cross_entropy_matches_torch():
    import torch

    from edgekit.distill.losses import next_token_cross_entropy

    generator = torch.Generator().manual_seed(3)
    logits, ids = torch.randn(2, 6, 13, generator=generator), torch.randint(0, 13, (2, 6), generator=generator)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 13), ids[:, 1:].reshape(-1))
    assert float(next_token_cross_entropy(logits, ids)) == pytest.approx(float(expected), rel=1e-6)
    # the targets are the *next* tokens: predicting the current one scores differently
    assert float(next_token_cross_entropy(logits, ids)) != pytest.approx(
        float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 13), ids[:, :-1].reshape(-1))), rel=1e-3)


def test_hidden_mse_on_mapped_layers_and_kept_channels():
    import torch

    from edgekit.distill.losses import hidden_state_mse

    generator = torch.Generator().manual_seed(4)
    teacher = [torch.randn(2, 3, 8, generator=generator) for _ in range(4)]
    channels = [1, 4, 6]
    student = [teacher[1][..., channels].clone(), teacher[3][..., channels].clone()]
    assert float(hidden_state_mse(student, teacher, [1, 3], channels)) == 0.0
    assert float(hidden_state_mse(student, teacher, [1, 3], torch.tensor(channels))) == 0.0
    assert float(hidden_state_mse(student, teacher, [0, 3], channels)) > 0.1  # wrong layer
    student[1] = student[1] + 0.5
    assert float(hidden_state_mse(student, teacher, [1, 3], channels)) == pytest.approx(0.25 / 2, rel=1e-6)
    full = [teacher[0] + 1.0]
    assert float(hidden_state_mse(full, teacher, [0])) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        hidden_state_mse(student, teacher, [1])


def test_even_layer_map_and_combine():
    from edgekit.distill.losses import combine, even_layer_map

    assert even_layer_map(4, 4) == [0, 1, 2, 3]
    assert even_layer_map(2, 4) == [1, 3]
    assert even_layer_map(3, 30) == [9, 19, 29]
    assert combine({"kl": 2.0, "ce": 3.0, "hidden": 5.0}, {"kl": 1.0, "ce": 0.5, "hidden": 0.0}) == 3.5
    with pytest.raises(ValueError):
        combine({"kl": 1.0}, {"kl": 0.0})


# -- schedule, data order, layer map ---------------------------------------------------------


def test_learning_rate_warmup_then_cosine_to_the_floor():
    from edgekit.distill.schedule import learning_rate_at

    lr = lambda s: learning_rate_at(s, peak=1e-3, steps=110, warmup=10, min_ratio=0.1)  # noqa: E731
    assert lr(0) == pytest.approx(1e-4) and lr(4) == pytest.approx(5e-4) and lr(9) == pytest.approx(1e-3)
    assert lr(10) == pytest.approx(1e-3)
    assert lr(109) == pytest.approx(1e-4)
    assert lr(59) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 49 / 99)))
    values = [lr(s) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert learning_rate_at(0, peak=1.0, steps=1, warmup=0, min_ratio=0.5) == pytest.approx(0.5)


def test_window_order_is_a_function_of_seed_and_step():
    from edgekit.distill.schedule import WindowOrder

    one = WindowOrder(10, seed=0, batch_size=2, accumulation=1, world=1)
    again = WindowOrder(10, seed=0, batch_size=2, accumulation=1, world=1)
    epoch = [i for step in range(5) for i in one.indices(step, 0, 0)]
    assert sorted(epoch) == list(range(10))  # an epoch visits every window once
    assert epoch != list(range(10))  # shuffled
    assert [again.indices(s, 0, 0) for s in (7, 3, 0)] == [one.indices(s, 0, 0) for s in (7, 3, 0)]  # any order, any time
    assert sorted(i for s in range(5, 10) for i in one.indices(s, 0, 0)) == list(range(10))
    assert [i for s in range(5, 10) for i in one.indices(s, 0, 0)] != epoch  # next epoch, new permutation
    assert WindowOrder(10, seed=1, batch_size=2, accumulation=1, world=1).indices(0, 0, 0) != one.indices(0, 0, 0) or \
        WindowOrder(10, seed=1, batch_size=2, accumulation=1, world=1).indices(1, 0, 0) != one.indices(1, 0, 0)
    # ranks take consecutive slices of the global batch; micro-batches follow each other
    two = WindowOrder(10, seed=0, batch_size=1, accumulation=1, world=2)
    assert [two.indices(s, 0, 0) + two.indices(s, 0, 1) for s in range(5)] == [one.indices(s, 0, 0) for s in range(5)]
    accumulated = WindowOrder(10, seed=0, batch_size=1, accumulation=2, world=1)
    assert [accumulated.indices(s, 0, 0) + accumulated.indices(s, 1, 0) for s in range(5)] == [one.indices(s, 0, 0) for s in range(5)]


def test_layer_map_from_pruning_json_or_even():
    from edgekit.distill.hidden import layer_map

    cfg = lambda layers, hidden: SimpleNamespace(num_hidden_layers=layers, hidden_size=hidden)  # noqa: E731
    pruning = {"kept": {"layers": [0, 2, 5], "hidden": [0, 2, 3, 7]}}
    assert layer_map(cfg(3, 4), cfg(6, 8), pruning, need_hidden=True, where="x") == ([0, 2, 5], [0, 2, 3, 7])
    assert layer_map(cfg(3, 8), cfg(6, 8), None, need_hidden=True, where="x") == ([1, 3, 5], None)
    assert layer_map(cfg(3, 8), cfg(3, 8), None, need_hidden=True, where="x") == ([0, 1, 2], None)
    with pytest.raises(StageError, match="hidden_weight"):
        layer_map(cfg(3, 4), cfg(6, 8), None, need_hidden=True, where="x")
    with pytest.raises(StageError, match="does not fit this teacher"):
        layer_map(cfg(3, 4), cfg(6, 8), {"kept": {"layers": [0, 2, 9], "hidden": [0, 1, 2, 3]}}, need_hidden=True, where="x")
    assert layer_map(cfg(3, 4), cfg(6, 8), None, need_hidden=False, where="x") == ([1, 3, 5], None)


# -- resumable state -----------------------------------------------------------------------------


def _tiny_training(steps: int, model=None, optimizer=None):
    import torch

    if model is None:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        model(torch.randn(5, 4, generator=generator)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def test_state_roundtrip_is_exact_and_pickle_free(tmp_path):
    import torch

    from edgekit.distill import state as saved

    model, optimizer = _tiny_training(3)
    names = [n for n, _ in model.named_parameters()]
    torch.manual_seed(123)
    snapshot = saved.TrainingState(step=3, model=dict(model.named_parameters()), optimizer=optimizer.state_dict(),
                                   rng=saved.rng_state(), scalars={"elapsed_seconds": 1.5, "losses": [{"step": 1, "loss": 0.1}]})
    path = saved.save_state(tmp_path, snapshot, names)
    assert path.name == "step-00000003"
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"]
    expected_next = torch.rand(3)

    loaded = saved.load_state(tmp_path, names)
    assert loaded.step == 3 and loaded.scalars["losses"] == [{"step": 1, "loss": 0.1}]
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    with torch.no_grad():
        for name, p in fresh.named_parameters():
            p.copy_(loaded.model[name])
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2, weight_decay=0.1)
    fresh_opt.load_state_dict(loaded.optimizer)
    saved.set_rng_state(loaded.rng)
    assert torch.equal(torch.rand(3), expected_next)
    # continuing from the loaded state matches continuing the original bit for bit
    _tiny_training(2, model, optimizer)
    _tiny_training(2, fresh, fresh_opt)
    for (_, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b)
    for pa, pb in zip(model.parameters(), fresh.parameters()):
        a, b = optimizer.state[pa], fresh_opt.state[pb]
        assert all(torch.equal(a[k], b[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    assert fresh_opt.param_groups[0]["betas"] == optimizer.param_groups[0]["betas"]


def test_state_ignores_half_written_checkpoints(tmp_path):
    from edgekit.distill import state as saved

    model, optimizer = _tiny_training(1)
    names = [n for n, _ in model.named_parameters()]
    snap = lambda step: saved.TrainingState(step=step, model=dict(model.named_parameters()),  # noqa: E731
                                            optimizer=optimizer.state_dict(), rng=saved.rng_state())
    saved.save_state(tmp_path, snap(5), names)
    saved.save_state(tmp_path, snap(10), names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000010"]  # older ones go once the new one is in place
    # what a kill leaves: a temp dir mid-write, and (by damage) a newer dir with a short file
    (tmp_path / ".tmp-step-00000015-999").mkdir()
    (tmp_path / ".tmp-step-00000015-999" / "model.safetensors").write_bytes(b"partial")
    damaged = tmp_path / "step-00000020"
    damaged.mkdir()
    for f in (tmp_path / "step-00000010").iterdir():
        damaged.joinpath(f.name).write_bytes(f.read_bytes())
    damaged.joinpath("optimizer.safetensors").write_bytes(b"truncated")
    assert saved.load_state(tmp_path, names).step == 10
    saved.clean_temporaries(tmp_path)
    assert not list(tmp_path.glob(".tmp-*"))
    assert saved.load_state(tmp_path / "missing", names) is None


# -- training ---------------------------------------------------------------------------------


def test_distillation_lowers_kl_and_writes_the_checkpoint(tmp_path, pair, one_thread):
    import torch
    from PIL import Image  # matplotlib depends on pillow
    from transformers import AutoModelForCausalLM

    from edgekit.distill.stage import run_distill
    from edgekit.measure.perplexity import perplexity_torch
    from edgekit.weights.checkpoint import load_tokenizer
    from edgekit.models.text import tokenize_splits

    teacher, student = pair
    ctx = make_ctx(tmp_path, teacher, student)
    metrics = run_distill(ctx)
    assert metrics["steps"] == 30 and metrics["resumed_from"] == 0 and metrics["stopped"] == "steps"
    assert metrics["kl_end"] < 0.5 * metrics["kl_start"]
    assert metrics["agreement_end"] > metrics["agreement_start"]
    assert metrics["tokens_seen"] == 30 * 2 * 32
    assert metrics["tokens_per_second"] > 0 and metrics["train_seconds"] > 0
    curve = metrics["curve"]
    assert [c["step"] for c in curve] == [0, 10, 20, 30]
    assert [c["windows"] for c in curve] == [8, 2, 2, 8]  # periodic: eval_windows; first and final: all
    assert curve[0]["train_loss"] is None and all(c["train_loss"] > 0 for c in curve[1:])
    assert metrics["perplexity_start"] == curve[0]["perplexity"] and metrics["perplexity_end"] == curve[-1]["perplexity"]

    out = ctx.output_dir
    assert {"config.json", "model.safetensors", "tokenizer.json", "pruning.json", "distill.json", "distill_curve.png"} <= {
        p.name for p in out.iterdir()}
    assert json.loads((out / "pruning.json").read_text()) == json.loads((student / "pruning.json").read_text())
    record = json.loads((out / "distill.json").read_text())
    assert record["steps"] == 30 and len(record["losses"]) == 30 and len(record["evals"]) == 4
    assert record["config"]["steps"] == 30 and record["layer_map"] == [0, 1]
    assert not any("second" in key or "time" in key for key in json.dumps(record).split('"'))  # nothing time-dependent
    with Image.open(out / "distill_curve.png") as image:
        assert image.size == (900, 360)
    # the checkpoint is a plain HF one, and the reported perplexity is the evaluate protocol's
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.intermediate_size == 64 and model.dtype == torch.float32
    splits = tokenize_splits(python_docs_text(), load_tokenizer(out), eval_tokens=1024, window=128)
    assert perplexity_torch(model, splits.evaluation, window=128)["perplexity"] == pytest.approx(metrics["perplexity_end"], rel=1e-6)
    assert sorted(p.name for p in ctx.work_dir.iterdir()) == ["step-00000020"]  # the runner deletes it on success


def test_hidden_state_loss_accumulation_and_frozen_embeddings(tmp_path, pair, one_thread):
    from safetensors.torch import load_file

    from edgekit.distill.stage import run_distill

    teacher, student = pair
    ctx = make_ctx(tmp_path, teacher, student, steps=4, kl_weight=1.0, ce_weight=0.5, hidden_weight=1.0, batch_size=1,
                   gradient_accumulation=2, freeze_embeddings=True, gradient_checkpointing=True, eval_every=100,
                   checkpoint_every=3)
    metrics = run_distill(ctx)
    # one optimizer step per step (not per micro-batch), and no optimizer state for frozen weights
    optimizer_state = load_file(ctx.work_dir / "step-00000003" / "optimizer.safetensors")
    assert float(optimizer_state["model.layers.0.mlp.up_proj.weight/step"]) == 3.0
    assert not any(k.startswith("model.embed_tokens") for k in optimizer_state)
    losses = json.loads((ctx.output_dir / "distill.json").read_text())["losses"]
    assert len(losses) == 4 and all(e["hidden"] > 0 and e["kl"] > 0 and e["ce"] > 0 for e in losses)
    for e in losses:
        assert e["loss"] == pytest.approx(e["kl"] + 0.5 * e["ce"] + e["hidden"], rel=1e-5)
    before, after = load_file(student / "model.safetensors"), load_file(ctx.output_dir / "model.safetensors")
    assert (before["model.embed_tokens.weight"] == after["model.embed_tokens.weight"]).all()
    assert not (before["model.layers.0.mlp.up_proj.weight"] == after["model.layers.0.mlp.up_proj.weight"]).all()
    assert metrics["tokens_seen"] == 4 * 2 * 32


def test_quantized_input_is_refused(tmp_path, tiny_model_dir, one_thread):
    stages = """\
stages:
  - type: load
  - type: quantize
    method: rtn
    group_size: 32
  - type: distill
    teacher: load
    steps: 2
"""
    from edgekit.errors import RecipeError

    recipe = write_recipe(tmp_path / "q.yaml", tiny_model_dir, stages=stages, output=tmp_path / "run")
    # refused when the recipe is read (the chain says the input is quantized), before any stage runs
    with pytest.raises(RecipeError, match="distill's input is quantized.*set 'mode: qad'.*or put distill before quantize"):
        api.compress(recipe, quiet=True)
    assert not (tmp_path / "run" / "stages").exists()


def test_teacher_auto_without_prune_is_a_recipe_error(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path / "d.yaml", tiny_model_dir, stages="stages:\n  - load\n  - type: distill\n    steps: 2\n")
    result = run_cli("recipe", "validate", str(recipe))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "distill has no teacher" in lines[0] and "put a prune stage before distill" in lines[0]
    assert "Traceback" not in result.stderr


KILL_STAGES = """\
stages:
  - type: load
  - type: distill
    teacher: load
    steps: 60
    ce_weight: 1.0
    learning_rate: 1.0e-3
    warmup_steps: 5
    batch_size: 2
    sequence_length: 32
    checkpoint_every: 5
    eval_every: 10
    eval_windows: 2
"""


def test_sigkill_mid_training_resumes_bit_identical(tmp_path, tiny_model_dir):
    """kill -9 a real `edgekit compress` once distill has saved a checkpoint; the rerun
    resumes from it and ends with exactly the files of an uninterrupted run."""
    env = dict(os.environ, **ONE_THREAD)
    reference = write_recipe(tmp_path / "ref.yaml", tiny_model_dir, stages=KILL_STAGES, output=tmp_path / "ref")
    result = run_cli("compress", str(reference), "-q", env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    expected = json.loads((tmp_path / "ref" / "manifest.json").read_text())["stages"][1]

    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "run.yaml", tiny_model_dir, stages=KILL_STAGES, output=out)
    proc = subprocess.Popen([sys.executable, "-m", "edgekit", "compress", str(recipe), "-q"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        saved = []
        while time.time() < deadline and proc.poll() is None and not saved:
            saved = list((out / "stages").glob(".work-02-distill/*/step-*"))
            time.sleep(0.005)
        assert saved and proc.poll() is None, "compress finished before distill could be interrupted"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "stages" / "02-distill").exists()
    checkpoints = list((out / "stages").glob(".work-02-distill/*/step-*"))
    assert checkpoints
    killed_at = max(int(c.name.split("-")[1]) for c in checkpoints)

    result = run_cli("compress", str(recipe), env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    assert "resuming from step" in result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    resumed = manifest["stages"][1]
    assert [s["status"] for s in manifest["stages"]] == ["cached", "done"]
    assert resumed["metrics"]["resumed_from"] == killed_at and 5 <= killed_at < 60
    assert resumed["cache_key"] == expected["cache_key"]
    assert resumed["files"]["model.safetensors"]["sha256"] == expected["files"]["model.safetensors"]["sha256"]
    assert resumed["files"]["distill.json"]["sha256"] == expected["files"]["distill.json"]["sha256"]
    assert {k: v["sha256"] for k, v in resumed["files"].items()} == {k: v["sha256"] for k, v in expected["files"].items()}
    assert resumed["metrics"]["curve"] == expected["metrics"]["curve"]
    assert not (out / "stages" / ".work-02-distill").exists()  # spent once the result is in place


def test_two_processes_under_accelerate_launch(tmp_path, pair, one_thread):
    """processes: 2 runs DDP over gloo on the CPU. Each rank takes its slice of the global
    batch, so 2 processes × batch 1 train on exactly the windows 1 process × batch 2 does:
    the results agree up to the order of floating-point sums."""
    from edgekit.distill.stage import run_distill

    teacher, student = pair
    ctx = make_ctx(tmp_path / "two", teacher, student, processes=2, batch_size=1)
    two = run_distill(ctx)
    assert two["processes"] == 2 and two["steps"] == 30
    assert two["kl_end"] < 0.5 * two["kl_start"]
    assert (ctx.output_dir / "model.safetensors").is_file() and (ctx.output_dir / "distill.json").is_file()
    assert json.loads((ctx.output_dir / "distill.json").read_text())["processes"] == 2
    one = run_distill(make_ctx(tmp_path / "one", teacher, student, processes=1, batch_size=2))
    assert two["perplexity_start"] == one["perplexity_start"]
    assert two["perplexity_end"] == pytest.approx(one["perplexity_end"], rel=1e-3)
    assert two["kl_end"] == pytest.approx(one["kl_end"], rel=2e-2, abs=1e-4)


@pytest.mark.slow  # another ~10 s of process start-up on 2 cores
def test_launch_failure_is_reported(tmp_path, pair):
    """A user error inside the launched processes comes back as one StageError."""
    from edgekit.distill.stage import run_distill

    teacher, student = pair
    ctx = make_ctx(tmp_path, teacher, student, processes=2, sequence_length=10_000_000, steps=2)
    with pytest.raises(StageError, match="fewer than one training sequence of 10000000.*lower sequence_length"):
        run_distill(ctx)


def test_config_needs_some_loss():
    from pydantic import ValidationError

    from edgekit.distill.stage import DistillConfig

    with pytest.raises(ValidationError, match="give at least one a positive weight"):
        DistillConfig(kl_weight=0)
    assert DistillConfig(kl_weight=0, hidden_weight=1.0).hidden_weight == 1.0


# -- FSDP: sharded, resumable checkpoints ------------------------------------------------------

FSDP_SCRIPT = r'''
import shutil, sys, functools
from pathlib import Path
import torch, torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, FullStateDictConfig, StateDictType
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from edgekit.distill import state as saved
from edgekit.distill.checkpoint import local_training_state, restore_local_state

work, out, total, stop = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, attention_dropout=0.2, max_position_embeddings=64)
model = LlamaForCausalLM(config).train()
named = [(n, p) for n, p in model.named_parameters()]
decay, no_decay = [(n, p) for n, p in named if p.ndim >= 2], [(n, p) for n, p in named if p.ndim < 2]
names = [n for n, _ in decay] + [n for n, _ in no_decay]
optimizer = torch.optim.AdamW([{"params": [p for _, p in decay], "weight_decay": 0.1},
                               {"params": [p for _, p in no_decay], "weight_decay": 0.0}], lr=3e-3)
# What accelerate builds from recipes/accelerate/fsdp_8gpu.yaml (FULL_SHARD, per-layer wrap, orig params),
# on the CPU: accelerate itself only enables FSDP on accelerators.
model = FSDP(model, auto_wrap_policy=functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer}),
             use_orig_params=True, device_id=torch.device("cpu"))
start = 0
shard = saved.load_state(work, names, rank=rank)
if shard is not None:
    restore_local_state(names, optimizer, shard, where=str(shard.path))
    saved.set_rng_state(shard.rng)
    start = shard.step
    print(f"rank {rank} resumed from {start}", flush=True)
data = torch.randint(0, 64, (total * world * 2, 16), generator=torch.Generator().manual_seed(1))
for step in range(start, stop):
    first = (step * world + rank) * 2
    batch = data[first:first + 2]
    model(input_ids=batch, labels=batch).loss.backward()
    model.clip_grad_norm_(1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if (step + 1) % 2 == 0 and step + 1 < total:
        tmp = saved.sharded_tmp_dir(work, step + 1)
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        saved.save_shard(tmp, rank, local_training_state(names, optimizer, step + 1, {"setup": "test"}), names)
        dist.barrier()
        if rank == 0:
            saved.seal_sharded(work, step + 1, world, {"setup": "test"})
        dist.barrier()
# (offload_to_cpu is for GPU ranks: on the CPU it crashes torch's state_dict hook)
with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=False, rank0_only=False)):
    full = {k: v.clone() for k, v in model.state_dict().items()}
if rank == 0:
    save_file({k: v.contiguous() for k, v in full.items()}, str(out))
dist.destroy_process_group()
'''


def _fsdp_run(tmp: Path, work: Path, out: Path, total: int, stop: int) -> subprocess.CompletedProcess:
    script = tmp / "fsdp_train.py"
    script.write_text(FSDP_SCRIPT)
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(script), str(work), str(out), str(total), str(stop)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, **ONE_THREAD))


def test_fsdp_sharded_checkpoint_resumes_bit_identical(tmp_path):
    """Two processes, torch FSDP (FULL_SHARD, one unit per decoder layer, use_orig_params, gloo on
    the CPU) with dropout, AdamW with two parameter groups and gradient clipping: a run resumed
    from the sharded checkpoint another run wrote at step 4 (as a preempted job restarted with
    the same command would) ends with exactly the weights of the uninterrupted run. The
    save/restore functions are the ones the distill loop calls under accelerate's FSDP on GPUs."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from edgekit.distill import state as saved

    straight = _fsdp_run(tmp_path, tmp_path / "work-a", tmp_path / "a.safetensors", 6, 6)
    assert straight.returncode == 0, straight.stderr[-3000:]
    found = saved.latest_checkpoint(tmp_path / "work-a")
    assert found is not None and found[1]["format"] == saved.SHARDED_FORMAT and found[1]["step"] == 4
    assert found[1]["world"] == 2 and (found[0] / "rank-00001" / "optimizer.safetensors").is_file()
    a = load_file(tmp_path / "a.safetensors")
    # each shard holds about half of every flat parameter (some pieces empty), never the whole model
    for rank in range(2):
        pieces = load_file(found[0] / f"rank-{rank:05d}" / "model.safetensors")
        assert sum(t.numel() for t in pieces.values()) < 0.75 * sum(t.numel() for t in a.values())
        assert all(t.dim() == 1 for t in pieces.values())
    assert saved.load_state(tmp_path / "work-a", ["x"], rank=None) is None  # not a whole-model checkpoint
    shutil.copytree(tmp_path / "work-a", tmp_path / "work-b")
    resumed = _fsdp_run(tmp_path, tmp_path / "work-b", tmp_path / "b.safetensors", 6, 6)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "rank 0 resumed from 4" in resumed.stdout and "rank 1 resumed from 4" in resumed.stdout
    b = load_file(tmp_path / "b.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_sharded_checkpoint_with_a_missing_shard_is_ignored(tmp_path):
    """A shard whose file is short (a kill during the write) makes the whole step invisible;
    the previous complete checkpoint is what resumes."""
    import torch

    from edgekit.distill import state as saved

    work = tmp_path / "work"
    names = ["w"]
    for step in (2, 4):
        tmp = saved.sharded_tmp_dir(work, step)
        for rank in range(2):
            w = torch.nn.Parameter(torch.full((3,), float(step + rank)))
            opt = torch.optim.AdamW([w])
            w.grad = torch.ones(3)
            opt.step()
            saved.save_shard(tmp, rank, saved.TrainingState(step, {"w": w.detach()}, opt.state_dict(), saved.rng_state()), names)
        if step == 2:
            saved.seal_sharded(work, step, 2, {"k": 1})
    with pytest.raises(ValueError, match="incomplete"):
        (saved.rank_dir(saved.sharded_tmp_dir(work, 4), 1) / "optimizer.safetensors").write_bytes(b"x")
        saved.seal_sharded(work, 4, 2, {"k": 1})
    state = saved.load_state(work, names, rank=1)
    assert state.step == 2 and float(state.model["w"][0]) < 3.0 and state.scalars == {"k": 1}
    final = work / "step-00000002"
    (final / "rank-00001" / "model.safetensors").write_bytes(b"short")
    assert saved.latest_checkpoint(work) is None and saved.load_state(work, names, rank=0) is None


# -- on a CUDA GPU (scripts/gpu_check.sh) --------------------------------------------------------

FSDP_1GPU = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
mixed_precision: bf16
num_machines: 1
num_processes: 1
machine_rank: 0
main_training_function: main
use_cpu: false
fsdp_config:
  fsdp_version: 1
  fsdp_sharding_strategy: FULL_SHARD
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer
  fsdp_use_orig_params: true
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_sync_module_states: true
  fsdp_cpu_ram_efficient_loading: true
  fsdp_activation_checkpointing: true
  fsdp_offload_params: false
"""


@pytest.mark.gpu
def test_distill_on_cuda_in_bf16(tmp_path, pair):
    """device auto on a GPU host: CUDA, precision auto = bf16 where the GPU has it; KL falls."""
    import torch

    from edgekit.distill.stage import run_distill

    teacher, student = pair
    metrics = run_distill(make_ctx(tmp_path, teacher, student))
    assert metrics["device"] == "cuda"
    assert metrics["precision"] == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    assert metrics["kl_end"] < 0.5 * metrics["kl_start"]


@pytest.mark.gpu
def test_fsdp_on_cuda_checkpoints_and_resumes(tmp_path, pair):
    """The 7B recipe's FSDP setup (accelerate config: FULL_SHARD, bf16, per-layer wrap, activation
    checkpointing, RAM-efficient loading) on one GPU: a run writes sharded checkpoints; a second
    run in the same work dir resumes from the last one and ends where the first did."""
    from edgekit.distill import state as saved
    from edgekit.distill.stage import run_distill

    teacher, student = pair
    params = dict(steps=12, checkpoint_every=4, eval_every=4, accelerate_config="fsdp.yaml")
    first_ctx = make_ctx(tmp_path / "a", teacher, student, **params)
    (tmp_path / "a" / "fsdp.yaml").write_text(FSDP_1GPU)  # accelerate_config is relative to the recipe dir
    first = run_distill(first_ctx)
    assert first["device"] == "cuda" and first["steps"] == 12 and first["kl_end"] < first["kl_start"]
    found = saved.latest_checkpoint(first_ctx.work_dir)
    assert found is not None and found[1]["format"] == saved.SHARDED_FORMAT and found[1]["step"] == 8
    import dataclasses

    out2 = tmp_path / "a" / "out2"
    out2.mkdir()
    ctx2 = dataclasses.replace(first_ctx, output_dir=out2)  # same work dir: what a restarted job finds
    second = run_distill(ctx2)
    assert second["resumed_from"] == 8 and second["steps"] == 12
    assert second["perplexity_end"] == pytest.approx(first["perplexity_end"], rel=0.02)


# -- the accelerate config, checked before any process starts -----------------------------------

REPO = Path(__file__).resolve().parent.parent
SHIPPED_FSDP = REPO / "recipes" / "accelerate" / "fsdp_8gpu.yaml"


def test_shipped_fsdp_config_is_standard_accelerate_yaml():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    config = load_config_from_file(str(SHIPPED_FSDP))
    assert config.distributed_type == DistributedType.FSDP and config.num_processes == 8 and config.mixed_precision == "bf16"
    fsdp = config.fsdp_config
    assert fsdp["fsdp_sharding_strategy"] == "FULL_SHARD" and fsdp["fsdp_version"] == 1
    assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == "Qwen2DecoderLayer"
    assert fsdp["fsdp_use_orig_params"] is True and fsdp["fsdp_activation_checkpointing"] is True
    assert fsdp["fsdp_cpu_ram_efficient_loading"] is True and fsdp["fsdp_sync_module_states"] is True


def test_fsdp_config_refused_up_front_where_it_cannot_run(tmp_path, pair, monkeypatch):
    """On this CPU-only machine the 7B recipe's FSDP config is one error before any process
    starts (accelerate would silently fall back to CPU DDP); with a (pretended) GPU, the checks
    behind it: too few GPUs, FSDP2, use_orig_params false."""
    import torch

    from edgekit import devices
    from edgekit.distill.stage import run_distill
    from edgekit.distill.launch import check_accelerate_config

    teacher, student = pair
    if not torch.cuda.is_available():
        ctx = make_ctx(tmp_path / "cpu", teacher, student, accelerate_config=str(SHIPPED_FSDP))
        with pytest.raises(StageError, match="asks for FSDP, which accelerate runs only on GPUs") as caught:
            run_distill(ctx)
        assert "processes: N (DDP over gloo)" in caught.value.how and not (ctx.work_dir / "SPEC.json").exists()
    monkeypatch.setattr(devices, "cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    config = make_ctx(tmp_path / "gpu", teacher, student, accelerate_config=str(SHIPPED_FSDP)).config
    with pytest.raises(StageError, match="starts 8 processes, one per GPU, but torch sees 2"):
        check_accelerate_config(config, tmp_path, "stage distill")
    for change, message in (("fsdp_version: 1", "fsdp_version 2"), ("fsdp_use_orig_params: true", "fsdp_use_orig_params: false")):
        bad = tmp_path / f"bad-{len(message)}.yaml"
        text = SHIPPED_FSDP.read_text().replace("num_processes: 8", "num_processes: 2")
        bad.write_text(text.replace(change, "fsdp_version: 2" if "version" in change else "fsdp_use_orig_params: false"))
        config = config.model_copy(update={"accelerate_config": str(bad)})
        with pytest.raises(StageError, match=message):
            check_accelerate_config(config, tmp_path, "stage distill")
    good = tmp_path / "good.yaml"
    good.write_text(SHIPPED_FSDP.read_text().replace("num_processes: 8", "num_processes: 2"))
    facts = check_accelerate_config(config.model_copy(update={"accelerate_config": str(good)}), tmp_path, "stage distill")
    assert facts == {"distributed_type": "FSDP", "num_processes": 2, "fsdp": True}


# -- distillation losses, teacher-generated data, the ratio of the two --------------------------


def test_reverse_kl_and_jsd_match_float64_references():
    import math

    import torch

    from edgekit.distill.config import DistillConfig
    from edgekit.distill.losses import DISTRIBUTION_LOSSES, jensen_shannon_divergence, kl_divergence, reverse_kl_divergence

    assert set(DISTRIBUTION_LOSSES) == set(DistillConfig.model_fields["loss"].annotation.__args__)
    assert DISTRIBUTION_LOSSES["forward_kl"] is kl_divergence
    generator = torch.Generator().manual_seed(5)
    student, teacher = torch.randn(2, 3, 9, generator=generator), torch.randn(2, 3, 9, generator=generator) * 2
    for t in (1.0, 2.0):
        ps, pt = torch.softmax(student.double() / t, -1), torch.softmax(teacher.double() / t, -1)
        reverse = (ps * (ps.log() - pt.log())).sum(-1).mean() * t * t  # KL(student || teacher)
        assert float(reverse_kl_divergence(student, teacher, t)) == pytest.approx(float(reverse), rel=1e-5)
        m = 0.5 * (ps + pt)
        jsd = (0.5 * (pt * (pt.log() - m.log())).sum(-1) + 0.5 * (ps * (ps.log() - m.log())).sum(-1)).mean() * t * t
        assert float(jensen_shannon_divergence(student, teacher, t)) == pytest.approx(float(jsd), rel=1e-5)
    # direction: reverse KL differs from forward KL; JSD at beta 0.5 is symmetric and at most ln 2
    assert abs(float(reverse_kl_divergence(student, teacher)) - float(kl_divergence(student, teacher))) > 1e-3
    assert float(jensen_shannon_divergence(student, teacher)) == pytest.approx(float(jensen_shannon_divergence(teacher, student)), rel=1e-6)
    far = torch.full((1, 1, 4), -30.0)
    assert float(jensen_shannon_divergence(far.index_fill(-1, torch.tensor([0]), 30.0), far.index_fill(-1, torch.tensor([1]), 30.0))) \
        == pytest.approx(math.log(2), rel=1e-4)
    for name, loss in DISTRIBUTION_LOSSES.items():
        assert float(loss(teacher, teacher.clone())) == pytest.approx(0.0, abs=1e-6), name  # zero when equal
        assert float(loss(student, teacher)) > 0.01, name
        # finite gradients, also where one distribution puts (almost) no mass on some tokens
        logits = (student * 40).requires_grad_(True)
        value = loss(logits, teacher * 40, 1.0)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(logits.grad).all() and float(logits.grad.abs().sum()) > 0, name
        assert loss(student.half(), teacher.half()).dtype == torch.float32, name


def test_mixed_order_keeps_the_ratio_in_every_prefix_and_is_a_function_of_the_step():
    import math

    from edgekit.distill.schedule import MixedOrder, WindowOrder

    text, made = 10, 6
    one = MixedOrder(text, made, ratio=0.25, seed=0, batch_size=2, accumulation=1, world=1)
    samples = [i for step in range(40) for i in one.indices(step, 0, 0)]
    for n in range(1, len(samples) + 1):  # floor(n * r) generated among the first n, always
        assert sum(i >= text for i in samples[:n]) == math.floor(n * 0.25)
    assert one.samples(40) == {"text": 60, "generated": 20}
    text_part, generated_part = [i for i in samples if i < text], [i - text for i in samples if i >= text]
    assert sorted(text_part[:text]) == list(range(text)) and sorted(generated_part[:made]) == list(range(made))  # an epoch each
    assert text_part[:text] != list(range(text))  # shuffled
    # the text windows come in the order WindowOrder gives them (the same seed, epoch by epoch)
    plain = WindowOrder(text, seed=0, batch_size=1, accumulation=1, world=1)
    assert text_part == [plain.indices(k, 0, 0)[0] for k in range(len(text_part))]
    again = MixedOrder(text, made, ratio=0.25, seed=0, batch_size=2, accumulation=1, world=1)
    assert [again.indices(s, 0, 0) for s in (31, 4, 0)] == [one.indices(s, 0, 0) for s in (31, 4, 0)]  # any order, any time
    other = MixedOrder(text, made, ratio=0.25, seed=1, batch_size=2, accumulation=1, world=1)
    assert [other.indices(s, 0, 0) for s in range(10)] != [one.indices(s, 0, 0) for s in range(10)]
    two = MixedOrder(text, made, ratio=0.25, seed=0, batch_size=1, accumulation=1, world=2)
    assert [two.indices(s, 0, 0) + two.indices(s, 0, 1) for s in range(20)] == [one.indices(s, 0, 0) for s in range(20)]
    only = MixedOrder(0, made, ratio=1.0, seed=0, batch_size=3, accumulation=1, world=1)
    assert all(i >= 0 for s in range(5) for i in only.indices(s, 0, 0)) and only.samples(5) == {"text": 0, "generated": 15}
    for bad in ({"ratio": 0.0}, {"ratio": 1.5}):
        with pytest.raises(ValueError):
            MixedOrder(text, made, seed=0, batch_size=1, accumulation=1, world=1, **bad)


def test_new_settings_leave_the_cache_key_alone_and_hostile_ones_are_refused(tmp_path, tiny_model_dir):
    from pydantic import ValidationError

    from edgekit.distill.config import DistillConfig

    # at their defaults the new settings are not in the dump the cache key and the resume check hash
    dump = DistillConfig().model_dump(mode="json")
    assert not {"loss", "generated_ratio", "generation", "on_policy_ratio"} & set(dump)
    assert DistillConfig.model_validate(dump) == DistillConfig()
    used = DistillConfig(loss="jsd", generated_ratio=0.5, generation={"sequences": 4, "prompts": [""]}).model_dump(mode="json")
    assert used["loss"] == "jsd" and used["generated_ratio"] == 0.5 and used["generation"]["sequences"] == 4
    assert DistillConfig.model_validate(used).generation.prompts == [""]
    for params, message in (
        ({"generated_ratio": 1.5}, "less than or equal to 1"),
        ({"generated_ratio": -0.1}, "greater than or equal to 0"),
        ({"generated_ratio": float("nan")}, "finite"),
        ({"on_policy_ratio": 2}, "less than or equal to 1"),
        ({"loss": "kl"}, "forward_kl"),
        ({"generation": {"temperature": 0}}, "greater than 0"),
        ({"generation": {"top_p": 1.5}}, "less than or equal to 1"),
        ({"generation": {"sequences": 0}}, "greater than or equal to 1"),
        ({"generation": {"sequences": 10**9}}, "less than or equal to"),
        ({"generation": {"prompts": []}}, "at least 1"),
        ({"generation": {"prompts": ["x" * 5000]}}, "seed prompts are short"),
        ({"generation": {"sampels": 3}}, "Extra inputs"),
        ({"generated_ratio": 0.5, "sequence_length": 64, "generation": {"length": 32}}, "shorter than one training window"),
        ({"generated_ratio": 0.5, "generation": {"sequences": 1_000_000, "length": 4096}}, "more than 1,000,000,000"),
        ({"on_policy_ratio": 0.5, "kl_weight": 0, "ce_weight": 1}, "on_policy_ratio needs kl_weight"),
    ):
        with pytest.raises(ValidationError, match=message):
            DistillConfig(**params)
    # as a user sees it: one line, no traceback
    stages = "stages:\n  - load\n  - type: distill\n    teacher: load\n    generated_ratio: 0.5\n    generation:\n      top_p: 0\n"
    result = run_cli("recipe", "validate", str(write_recipe(tmp_path / "g.yaml", tiny_model_dir, stages=stages)))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "top_p" in lines[0] and "Traceback" not in result.stderr


def test_teacher_sampling_is_seeded_batched_and_starts_from_the_prompts(pair, one_thread):
    import torch

    from edgekit.models.generated import DEFAULT_PROMPTS, prompt_ids, sample_sequences
    from edgekit.weights.checkpoint import load_checkpoint

    teacher, _ = pair
    model, tokenizer = load_checkpoint(teacher, dtype="float32")
    prompts = prompt_ids(tokenizer, ["", "def ", "The"], length=24, where="test")
    assert prompts[0] == [tokenizer.bos_token_id] and all(p[0] == tokenizer.bos_token_id for p in prompts)
    settings = dict(sequences=5, length=24, temperature=1.0, top_p=0.95, seed=3)
    one = sample_sequences(model, prompts, batch_size=2, **settings)
    assert one.shape == (5, 24) and one.dtype.str == "<u4"
    assert (sample_sequences(model, prompts, batch_size=2, **settings) == one).all()  # seeded
    assert not (sample_sequences(model, prompts, batch_size=2, **{**settings, "seed": 4}) == one).all()
    for row in range(5):  # sequence i continues prompt i mod 3
        prompt = prompts[row % 3]
        assert one[row, : len(prompt)].tolist() == prompt
    # top_p -> 0 keeps only the most likely token: greedy decoding, checked against the model's argmax
    greedy = sample_sequences(model, prompts[:1], sequences=1, length=12, temperature=1.0, top_p=1e-6, seed=0, batch_size=1)
    ids = torch.tensor(greedy[:1].astype("int64"))
    with torch.inference_mode():
        argmax = model(input_ids=ids).logits.argmax(-1)
    assert ids[0, 1:].tolist() == argmax[0, :-1].tolist()
    with pytest.raises(StageError, match="leaving nothing to sample"):
        prompt_ids(tokenizer, ["word " * 40], length=24, where="test")
    assert len(DEFAULT_PROMPTS) >= 8 and "" in DEFAULT_PROMPTS and len(set(DEFAULT_PROMPTS)) == len(DEFAULT_PROMPTS)


class _Killed(Exception):
    pass


def run_killed_after_checkpoint(run, step: int, monkeypatch) -> None:
    """Run the distill stage ``run`` and kill it right after it saved the checkpoint of ``step``
    (an exception out of save_checkpoint, where a SIGKILL would leave the same files); the
    patch is undone before returning, so the next run_distill resumes normally."""
    from edgekit.distill import loop as loop_module
    from edgekit.distill.stage import run_distill

    real_save = loop_module.save_checkpoint

    def save_then_die(at, **kwargs):
        real_save(at, **kwargs)
        if at == step:
            raise _Killed()

    with monkeypatch.context() as patch:
        patch.setattr(loop_module, "save_checkpoint", save_then_die)
        with pytest.raises(_Killed):
            run_distill(run)


def test_generated_data_is_sampled_once_mixed_in_the_ratio_and_resumes_bit_identical(tmp_path, pair, one_thread, monkeypatch):
    """generated_ratio 0.5: the teacher samples its sequences once into the run cache; a second
    run (here: one killed after its first checkpoint, then resumed) reuses the file without
    sampling again and ends bit-identical to the uninterrupted run; half the training windows
    are generated ones; the evaluation sets are never read, and their text never trained on."""
    import numpy as np

    from edgekit.models import generated as generated_module
    from edgekit.distill import loop as loop_module
    from edgekit.distill.stage import run_distill
    from edgekit.models import text as text_module
    from edgekit.recipe import DataConfig
    from edgekit.weights.checkpoint import load_tokenizer

    teacher, student = pair
    calls, batches = [], []
    real_sample = generated_module.sample_sequences
    monkeypatch.setattr(generated_module, "sample_sequences", lambda *a, **k: calls.append(k) or real_sample(*a, **k))

    class Spy(loop_module.MixedWindows):
        def __getitem__(self, indices):
            batch = super().__getitem__(indices)
            batches.append((list(indices), batch.clone()))
            return batch

    monkeypatch.setattr(loop_module, "MixedWindows", Spy)
    secret = "Zebra quartz vexillology: the unmistakable out-of-domain sentence. " * 30
    (tmp_path / "ood.txt").write_text(secret)

    def refuse(*args, **kwargs):
        raise AssertionError("distill read an evaluation set")

    for name in ("resolve_eval_sets", "read_eval_set", "eval_set_source"):
        monkeypatch.setattr(text_module, name, refuse)
    params = dict(steps=20, checkpoint_every=5, eval_every=10, loss="jsd", generated_ratio=0.5,
                  generation={"sequences": 6, "length": 64, "batch_size": 4, "seed": 1})
    cache = tmp_path / "cache"

    def ctx_in(name):
        ctx = make_ctx(tmp_path / name, teacher, student, **params)
        ctx.cache_dir = cache
        ctx.recipe.data = DataConfig(**DATA, eval_sets=[{"label": "secret", "source": str(tmp_path / "ood.txt")}])
        return ctx

    reference = ctx_in("ref")
    expected = run_distill(reference)
    assert len(calls) == 1 and calls[0]["sequences"] == 6 and calls[0]["length"] == 64
    files = list((cache / "teacher-samples").iterdir())
    assert len(files) == 1 and files[0].stat().st_size == 6 * 64 * 4
    inode, mtime = files[0].stat().st_ino, files[0].stat().st_mtime_ns
    record = json.loads((reference.output_dir / "distill.json").read_text())
    assert record["loss"] == "jsd" and record["generated_ratio"] == 0.5
    assert record["generated"]["sha256"] == sha256(files[0]) == expected["generated_sha256"]
    assert record["generated"]["settings"]["prompts"] == list(generated_module.DEFAULT_PROMPTS)
    assert record["generated"]["windows"] == 6 * 2  # each 64-token sequence is two 32-token windows
    assert record["generated"]["samples"] == expected["generated_samples"] == {"text": 20, "generated": 20}
    assert expected["kl_end"] < expected["kl_start"]
    # count the windows by source as the loop fetched them: half generated, and the generated
    # ones are the teacher's sampled tokens
    text_windows = record["train_windows"]
    fetched = [i for indices, _ in batches for i in indices]
    assert len(fetched) == 40 and sum(i >= text_windows for i in fetched) == 20
    sampled = np.fromfile(files[0], dtype="<u4").reshape(12, 32)
    for indices, batch in batches:
        for row, i in zip(batch, indices):
            if i >= text_windows:
                assert row.tolist() == sampled[i - text_windows].tolist()
    # the out-of-domain text never reaches training: no 8-token run of it in any batch
    ids = load_tokenizer(teacher)(secret, add_special_tokens=False)["input_ids"]
    grams = {tuple(ids[k: k + 8]) for k in range(len(ids) - 8)}
    assert not any(tuple(row[k: k + 8].tolist()) in grams for _, batch in batches for row in batch for k in range(32 - 8))

    # killed right after the checkpoint of step 10, then resumed: no new sampling, same bytes
    run = ctx_in("run")
    run_killed_after_checkpoint(run, 10, monkeypatch)
    resumed = run_distill(run)
    assert len(calls) == 1  # the cached file was reused, twice
    assert files[0].stat().st_ino == inode and files[0].stat().st_mtime_ns == mtime
    assert resumed["resumed_from"] == 10
    for name in ("model.safetensors", "distill.json"):
        assert sha256(run.output_dir / name) == sha256(reference.output_dir / name), name
    assert resumed["curve"] == expected["curve"]


def test_on_policy_steps_train_on_student_samples_scored_by_the_teacher_and_resume_bit_identical(tmp_path, pair, one_thread,
                                                                                               monkeypatch):
    """on_policy_ratio 0.5: every other step the student continues the first quarter of each
    window with its own samples and the teacher scores every position (reverse KL here); the
    steps are chosen and the samples seeded by the run position, so a resumed run is bit-identical."""
    import torch

    from edgekit.distill import loop as loop_module
    from edgekit.distill.schedule import on_policy_seed, on_policy_step
    from edgekit.distill.stage import run_distill

    assert [on_policy_step(s, 0.5) for s in range(6)] == [False, True] * 3
    assert sum(on_policy_step(s, 0.3) for s in range(100)) == 30 and not any(on_policy_step(s, 0.0) for s in range(10))
    assert on_policy_seed(0, 3, 0, 0) == on_policy_seed(0, 3, 0, 0) != on_policy_seed(0, 3, 1, 0)
    teacher, student = pair
    seen, real_samples = [], loop_module.student_samples

    def spy(model, batch, **kwargs):
        sampled = real_samples(model, batch, **kwargs)
        seen.append((batch.clone(), sampled.clone(), kwargs))
        return sampled

    monkeypatch.setattr(loop_module, "student_samples", spy)
    params = dict(steps=10, checkpoint_every=4, eval_every=5, on_policy_ratio=0.5, loss="reverse_kl", ce_weight=0.5)
    reference = make_ctx(tmp_path / "ref", teacher, student, **params)
    expected = run_distill(reference)
    record = json.loads((reference.output_dir / "distill.json").read_text())
    assert expected["on_policy_steps"] == record["on_policy_steps"] == 5 and record["loss"] == "reverse_kl"
    assert [e["step"] for e in record["losses"] if e.get("on_policy")] == [2, 4, 6, 8, 10]
    assert all(e["ce"] == 0.0 for e in record["losses"] if e.get("on_policy"))  # no cross-entropy on its own samples
    assert all(e["ce"] > 0 for e in record["losses"] if not e.get("on_policy"))
    assert len(seen) == 5
    for window, sampled, kwargs in seen:
        assert kwargs["prompt"] == 8 and sampled.shape == window.shape
        assert torch.equal(sampled[:, :8], window[:, :8]) and not torch.equal(sampled[:, 8:], window[:, 8:])
    assert expected["kl_end"] < expected["kl_start"]

    run = make_ctx(tmp_path / "run", teacher, student, **params)
    run_killed_after_checkpoint(run, 4, monkeypatch)
    assert run_distill(run)["resumed_from"] == 4
    for name in ("model.safetensors", "distill.json"):
        assert sha256(run.output_dir / name) == sha256(reference.output_dir / name), name
