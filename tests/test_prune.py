"""Structured pruning: exactness on zeroed units, GQA layouts, shapes, the stage end to end."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli, write_recipe


def _model(model_type="llama", heads=4, kv=2, hidden=64, layers=3, intermediate=96, tied=True, seed=0):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type, vocab_size=97, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=hidden // heads, max_position_embeddings=64,
        tie_word_embeddings=tied, rms_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random norms and biases: nothing passes a test by being all ones / zeros
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def _ids(seed=1, length=24):
    import torch

    return torch.randint(0, 97, (2, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits


def _zero_units(model, *, heads=(), channels=(), hidden=(), layers=()):
    """Zero the weights through which the given units write into the model: removing them
    afterwards must not change anything."""
    import torch

    head_dim = model.config.head_dim
    with torch.no_grad():
        for layer in model.model.layers:
            for h in heads:
                layer.self_attn.o_proj.weight[:, h * head_dim : (h + 1) * head_dim] = 0
            for c in channels:
                layer.mlp.down_proj.weight[:, c] = 0
            for c in hidden:
                layer.self_attn.o_proj.weight[c] = 0
                layer.mlp.down_proj.weight[c] = 0
                if layer.self_attn.o_proj.bias is not None:
                    layer.self_attn.o_proj.bias[c] = 0
        for c in hidden:
            model.model.embed_tokens.weight[:, c] = 0
            if not model.config.tie_word_embeddings:
                model.lm_head.weight[:, c] = 0
        for index in layers:
            model.model.layers[index].self_attn.o_proj.weight.zero_()
            model.model.layers[index].mlp.down_proj.weight.zero_()
            if model.model.layers[index].self_attn.o_proj.bias is not None:
                model.model.layers[index].self_attn.o_proj.bias.zero_()


@pytest.mark.parametrize("model_type,tied", [("llama", True), ("llama", False), ("qwen2", False)])
def test_pruning_zeroed_units_leaves_outputs_unchanged(model_type, tied):
    """Units whose output weights are zero are found by activation importance (they score 0)
    and pruned; the pruned model's logits equal the unpruned model's."""
    import torch

    from edgekit.prune.apply import prune_model, select_units
    from edgekit.prune.importance import activation_importance
    from edgekit.prune.shapes import check_explicit
    from edgekit.sizing import shape_from_config

    model = _model(model_type, heads=4, kv=2, hidden=64, layers=3, intermediate=96, tied=tied)
    # Heads 1 and 3 (one per kv group), MLP channels 5..36, hidden channels 10..25, layer 1.
    _zero_units(model, heads=(1, 3), channels=range(5, 37), hidden=range(10, 26), layers=(1,))
    ids = _ids()
    reference = _logits(model, ids)
    teacher = shape_from_config(model.config.to_dict())
    shape = check_explicit(teacher, hidden_size=48, intermediate_size=64, num_layers=2, num_attention_heads=2, num_key_value_heads=2)
    samples = [_ids(seed=s, length=32)[:1] for s in range(3)]
    importance = activation_importance(model, samples)
    kept = select_units(model, importance, shape)
    assert kept.layers == [0, 2]
    assert kept.hidden == [c for c in range(64) if not 10 <= c < 26]
    assert kept.heads == [[0, 2], [0, 2]] and kept.kv_heads == [[0, 1], [0, 1]]
    assert kept.channels[0] == [c for c in range(96) if not 5 <= c < 37]
    student = prune_model(model, kept)
    assert student.config.hidden_size == 48 and student.config.num_hidden_layers == 2
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(_logits(student, ids), reference, atol=2e-5, rtol=1e-5)


def test_whole_kv_group_removed_exactly():
    import torch

    from edgekit.prune.apply import KeptUnits, prune_model

    model = _model(heads=6, kv=3, hidden=48, layers=2)
    _zero_units(model, heads=(2, 3))  # group 1 = query heads 2, 3
    kept = KeptUnits(layers=[0, 1], hidden=None, heads=[[0, 1, 4, 5]] * 2, kv_heads=[[0, 2]] * 2, channels=[list(range(96))] * 2)
    student = prune_model(model, kept)
    assert (student.config.num_attention_heads, student.config.num_key_value_heads) == (4, 2)
    ids = _ids()
    torch.testing.assert_close(_logits(student, ids), _logits(model, ids), atol=2e-5, rtol=1e-5)


def test_a_unit_that_matters_changes_outputs():
    """The converse (so the exactness test can fail): pruning a live head changes logits."""
    from edgekit.prune.apply import KeptUnits, prune_model

    model = _model()
    kept = KeptUnits(layers=[0, 1, 2], hidden=None, heads=[[0, 2]] * 3, kv_heads=[[0, 1]] * 3, channels=[list(range(96))] * 3)
    ids = _ids()
    assert (prune_model(model, kept)(input_ids=ids).logits - _logits(model, ids)).abs().max() > 1e-3


@pytest.mark.parametrize("heads,kv", [(8, 2), (6, 3), (4, 4), (8, 1)])
def test_every_valid_gqa_layout_builds_and_reloads(tmp_path, heads, kv):
    import torch
    from transformers import AutoModelForCausalLM

    from edgekit.prune.apply import prune_model, select_units
    from edgekit.prune.importance import magnitude_importance
    from edgekit.prune.shapes import check_explicit, total_parameters, valid_head_layouts
    from edgekit.sizing import shape_from_config

    model = _model(heads=heads, kv=kv, hidden=64, layers=2)
    teacher = shape_from_config(model.config.to_dict())
    assert total_parameters(teacher) == sum(p.numel() for p in model.parameters())
    importance = magnitude_importance(model)
    ids = _ids()
    for new_heads, new_kv in valid_head_layouts(teacher):
        shape = check_explicit(teacher, num_attention_heads=new_heads, num_key_value_heads=new_kv)
        student = prune_model(model, select_units(model, importance, shape))
        assert total_parameters(shape) == sum(p.numel() for p in student.parameters())
        assert student(input_ids=ids).logits.shape == (2, 24, 97)
    student.save_pretrained(tmp_path, safe_serialization=True)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(reloaded, ids), _logits(student, ids))


def test_explicit_shapes_refused_with_nearest_valid():
    from edgekit.prune.shapes import ShapeError, check_explicit
    from edgekit.sizing import ModelShape

    teacher = ModelShape(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                         num_kv_heads=3, head_dim=64, tie_word_embeddings=True)
    with pytest.raises(ShapeError) as info:
        check_explicit(teacher, num_attention_heads=8)
    assert "not a valid head layout" in str(info.value) and "6/3" in info.value.how and "9/3" in info.value.how
    with pytest.raises(ShapeError) as info:
        check_explicit(teacher, num_attention_heads=6, num_key_value_heads=4)
    assert info.value.field == "num_attention_heads"
    with pytest.raises(ShapeError) as info:
        check_explicit(teacher, hidden_size=600)
    assert "larger than the teacher's 576" in str(info.value) and "576" in info.value.how
    assert check_explicit(teacher, num_attention_heads=6).num_kv_heads == 3  # 2 per group
    assert check_explicit(teacher, num_key_value_heads=2).num_heads == 6


def test_budget_is_met_evenly_and_unreachable_budgets_refused():
    from edgekit.prune.shapes import ShapeError, solve_budget, total_parameters
    from edgekit.sizing import ModelShape

    smollm = ModelShape(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                        num_kv_heads=3, head_dim=64, tie_word_embeddings=True)
    full = total_parameters(smollm)
    assert full == 134_515_008  # SmolLM2-135M's real parameter count
    for fraction in (0.8, 0.67, 0.5):
        for axes in (("mlp", "hidden"), ("mlp",), ("depth",), ("mlp", "hidden", "heads", "depth")):
            shape = solve_budget(smollm, fraction, axes)
            assert fraction - 0.03 <= total_parameters(shape) / full <= fraction, (fraction, axes, shape)
            assert shape.hidden_size % 64 == 0 and shape.intermediate_size % 64 == 0
    width = solve_budget(smollm, 0.67, ("mlp", "hidden"))
    assert (width.hidden_size, width.intermediate_size, width.num_layers) == (448, 1152, 30)
    with pytest.raises(ShapeError) as info:
        solve_budget(smollm, 0.2, ("mlp",))  # attention + embeddings alone are 43%
    assert "unreachable" in str(info.value) and "params >= 0.433" in info.value.how and "hidden" in info.value.how


def test_bad_prune_shapes_refused_at_validation(tmp_path, tiny_model_dir):
    cases = [
        ("    num_attention_heads: 3\n", "not a valid head layout", "use one of these (heads/kv): 2/1, 2/2, 4/2"),
        ("    params: 0.05\n    axes: [mlp]\n", "unreachable by shrinking mlp", "ask for params >="),
        ("    hidden_size: 80\n", "larger than the teacher's 64", "pick hidden_size <= 64"),
    ]
    for params, what, how in cases:
        stages = "stages:\n  - type: load\n  - type: prune\n" + params
        recipe = write_recipe(tmp_path / "bad.yaml", tiny_model_dir, stages=stages, output=tmp_path / "run")
        result = run_cli("recipe", "validate", str(recipe))
        assert result.returncode == 2, result.stderr
        assert what in result.stderr and how in result.stderr, result.stderr
        assert "bad.yaml" in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("axes", ["[mlp, heads]", "[mlp, hidden]"])
def test_prune_stage_writes_a_standard_checkpoint_that_exports(tmp_path, tiny_model_dir, axes):
    """load -> prune (params budget) -> export_onnx (parity-checked against PyTorch) -> evaluate.
    [mlp, hidden] gives hidden 48 with 4 heads of 16: head_dim no longer equals hidden/heads."""
    from transformers import AutoModelForCausalLM

    from edgekit import api

    stages = (
        f"stages:\n  - type: load\n  - type: prune\n    params: 0.75\n    axes: {axes}\n"
        "    calibration_samples: 4\n    sequence_length: 64\n  - type: evaluate\n  - type: export_onnx\n  - type: evaluate\n    name: evaluate_onnx\n"
    )
    recipe = write_recipe(tmp_path / "prune.yaml", tiny_model_dir, stages=stages, output=tmp_path / "run")
    manifest = api.compress(recipe, quiet=True)
    pruned = tmp_path / "run" / "stages" / "02-prune"
    record = json.loads((pruned / "pruning.json").read_text())
    assert 0.72 <= record["parameter_fraction"] <= 0.75
    model = AutoModelForCausalLM.from_pretrained(pruned)
    assert sum(p.numel() for p in model.parameters()) == record["student"]["parameters"]
    assert model.config.num_attention_heads % model.config.num_key_value_heads == 0
    if "hidden" in axes:
        assert model.config.hidden_size == 48 and model.config.head_dim == 16
    metrics = {s["name"]: s["metrics"] for s in manifest["stages"]}
    assert metrics["prune"]["parameters_after"] < metrics["prune"]["parameters_before"]
    torch_ppl = metrics["evaluate"]["perplexity"]
    onnx_ppl = metrics["evaluate_onnx"]["perplexity"]
    assert abs(torch_ppl - onnx_ppl) / torch_ppl < 1e-3


def test_magnitude_and_depth_options(tmp_path, tiny_model_dir):
    from edgekit import api

    stages = (
        "stages:\n  - type: load\n  - type: prune\n    importance: magnitude\n    depth_metric: perplexity_drop\n"
        "    num_layers: 1\n    calibration_samples: 2\n    sequence_length: 64\n"
    )
    recipe = write_recipe(tmp_path / "depth.yaml", tiny_model_dir, stages=stages, output=tmp_path / "run")
    api.compress(recipe, quiet=True)
    record = json.loads((tmp_path / "run" / "stages" / "02-prune" / "pruning.json").read_text())
    assert record["importance"] == "magnitude" and record["depth_metric"] == "perplexity_drop"
    assert len(record["kept"]["layers"]) == 1
    # The kept layer is the one whose removal costs more calibration loss.
    scores = record["layer_scores"]
    assert record["kept"]["layers"] == [max(range(2), key=lambda i: scores[i])]


def test_prune_then_distill_with_the_auto_teacher(tmp_path, tiny_model_dir):
    """The default recipe's shape on the tiny model: the teacher is what prune read, the work
    dir is gone once distill is done, and a rerun is fully cached."""
    from edgekit import api

    stages = (
        "stages:\n  - type: load\n  - type: prune\n    params: 0.75\n    axes: [mlp, hidden]\n    calibration_samples: 2\n"
        "    sequence_length: 64\n  - type: distill\n    steps: 6\n    batch_size: 2\n    sequence_length: 32\n"
        "    learning_rate: 1.0e-3\n    warmup_steps: 1\n    eval_every: 3\n    eval_windows: 1\n    checkpoint_every: 3\n"
        "    precision: fp32\n  - type: evaluate\n"
    )
    recipe = write_recipe(tmp_path / "pd.yaml", tiny_model_dir, stages=stages, output=tmp_path / "run")
    manifest = api.compress(recipe, quiet=True)
    stages_dir = tmp_path / "run" / "stages"
    assert not list(stages_dir.glob(".work-*")) and not list(stages_dir.glob(".tmp-*"))
    distill = manifest["stages"][2]["metrics"]
    assert distill["steps"] == 6  # that distillation lowers KL is tests/test_distill.py's job (a random tiny
    # model's pruned twin is already within KL 0.004 of it: too close to show progress in 6 steps)
    assert manifest["stages"][3]["metrics"]["perplexity"] == pytest.approx(distill["perplexity_end"], rel=1e-6)
    record = json.loads((stages_dir / "03-distill" / "distill.json").read_text())
    assert record["layer_map"] == [0, 1]  # from pruning.json: no layer was removed
    # the teacher is the unpruned model (hidden 64), the student the pruned one (hidden 48)
    assert record["teacher"]["hidden_size"] == 64 and record["student"]["hidden_size"] == 48
    again = api.compress(recipe, quiet=True)
    assert [s["status"] for s in again["stages"]] == ["cached"] * 4


# -- device and dtype (GPU paths, tested here up to the device boundary) -----------------------


def test_device_rules(monkeypatch):
    """auto -> CPU here; EDGEKIT_DEVICE replaces auto (never an explicit setting); cuda without
    a GPU is one line naming the stage; dtype auto is float32 on the CPU, half on a GPU."""
    from edgekit import devices
    from edgekit.errors import StageError

    monkeypatch.delenv("EDGEKIT_DEVICE", raising=False)
    monkeypatch.setattr(devices, "cuda_available", lambda: False)
    assert devices.resolve_device("auto", stage="prune") == "cpu"
    assert devices.resolve_device("cpu", stage="prune") == "cpu"
    with pytest.raises(StageError) as caught:
        devices.resolve_device("cuda", stage="prune")
    assert "device cuda" in caught.value.what and caught.value.where == "stage prune"
    assert "device: auto or cpu" in caught.value.how and "\n" not in caught.value.one_line()
    monkeypatch.setenv("EDGEKIT_DEVICE", "cuda")
    with pytest.raises(StageError, match="EDGEKIT_DEVICE=cuda"):
        devices.resolve_device("auto", stage="prune")
    assert devices.resolve_device("cpu", stage="prune") == "cpu"  # explicit wins
    monkeypatch.setenv("EDGEKIT_DEVICE", "tpu")
    with pytest.raises(StageError, match="not a device"):
        devices.resolve_device("auto", stage="prune")
    monkeypatch.setattr(devices, "cuda_available", lambda: True)
    monkeypatch.setenv("EDGEKIT_DEVICE", "cpu")
    assert devices.resolve_device("auto", stage="prune") == "cpu"
    monkeypatch.delenv("EDGEKIT_DEVICE")
    assert devices.resolve_device("auto", stage="prune") == "cuda"

    assert devices.compute_dtype("auto", device="cpu", checkpoint_dtype="bfloat16") == "float32"
    assert devices.compute_dtype("bfloat16", device="cpu") == "bfloat16"
    for half, ckpt, expected in (("bfloat16", "bfloat16", "bfloat16"), ("bfloat16", "float32", "bfloat16"),
                                 ("float16", "bfloat16", "float16"), ("bfloat16", "float16", "float16")):
        monkeypatch.setattr(devices, "half_dtype", lambda half=half: half)
        assert devices.compute_dtype("auto", device="cuda", checkpoint_dtype=ckpt) == expected
    with pytest.raises(StageError, match="float16 needs a CUDA GPU"):
        devices.check_dtype_on_device("float16", device="cpu", stage="prune")


def test_half_precision_importance_selects_nearly_the_same_units():
    """The GPU path measures importance with the teacher in bf16 (statistics in float32): run
    here on the CPU in bf16, it keeps nearly the units the float32 measurement keeps, and the
    scores come back on the CPU in float32."""
    import torch

    from edgekit.prune.importance import activation_importance

    model = _model(layers=2, intermediate=128)
    samples = [torch.randint(0, 97, (1, 48), generator=torch.Generator().manual_seed(s)) for s in range(4)]
    full = activation_importance(model, samples)
    half = activation_importance(model.to(torch.bfloat16), samples)
    assert half.channels[0].dtype == torch.float32 and half.channels[0].device.type == "cpu"
    for layer in range(2):
        top_full = set(torch.topk(full.channels[layer], 64).indices.tolist())
        top_half = set(torch.topk(half.channels[layer], 64).indices.tolist())
        assert len(top_full & top_half) >= 58  # >= 90 % of the kept MLP channels agree
        assert torch.corrcoef(torch.stack([full.heads[layer], half.heads[layer]]))[0, 1] > 0.99
    hidden_full = set(torch.topk(full.hidden, 48).indices.tolist())
    assert len(hidden_full & set(torch.topk(half.hidden, 48).indices.tolist())) >= 44
    assert torch.allclose(full.layers, half.layers, atol=0.02)


def test_prune_device_cuda_without_a_gpu_is_one_line(tmp_path, tiny_model_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    stages = "stages:\n  - type: load\n  - type: prune\n    params: 0.75\n    device: cuda\n"
    recipe = write_recipe(tmp_path / "cuda.yaml", tiny_model_dir, stages=stages, output=tmp_path / "run")
    result = run_cli("compress", str(recipe), "-q")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "device cuda was requested" in lines[0] and "stage prune" in lines[0]
    assert "set device: auto or cpu" in lines[0]


def test_prune_in_bfloat16_writes_the_checkpoints_dtype(tmp_path, tiny_model_dir):
    """dtype: bfloat16 (what auto picks on a GPU) on a float32 checkpoint: importance in bf16,
    the pruned weights sliced from the float32 teacher (exactly its values), recorded."""
    import torch
    from safetensors.torch import load_file

    from edgekit import api

    stages = ("stages:\n  - type: load\n  - type: prune\n    params: 0.75\n    axes: [mlp]\n    dtype: bfloat16\n"
              "    calibration_samples: 2\n    sequence_length: 64\n")
    recipe = write_recipe(tmp_path / "bf16.yaml", tiny_model_dir, stages=stages, output=tmp_path / "run")
    manifest = api.compress(recipe, quiet=True)
    metrics = manifest["stages"][1]["metrics"]
    assert metrics["device"] == "cpu" and metrics["dtype"] == "bfloat16"
    pruned = tmp_path / "run" / "stages" / "02-prune"
    record = json.loads((pruned / "pruning.json").read_text())
    assert record["importance_dtype"] == "bfloat16"
    weights = load_file(pruned / "model.safetensors")
    teacher = load_file(tiny_model_dir / "model.safetensors")
    assert weights["model.layers.0.mlp.gate_proj.weight"].dtype == torch.float32
    kept = record["kept"]["channels"][0]
    assert torch.equal(weights["model.layers.0.mlp.gate_proj.weight"], teacher["model.layers.0.mlp.gate_proj.weight"][kept])


def test_width_multiple_rounds_the_solved_widths():
    """width_multiple: 128 (the 7B recipe's quantize group size) makes every solved width a
    multiple of 128; a value that is not a multiple of 16 is refused in the config."""
    from pydantic import ValidationError

    from edgekit.prune.shapes import plan_shape
    from edgekit.prune.stage import PruneConfig
    from edgekit.sizing import shape_from_config

    teacher = shape_from_config({"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                                 "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                                 "tie_word_embeddings": False})
    shape = plan_shape(teacher, PruneConfig(params=0.67, axes=["mlp", "hidden"], width_multiple=128))
    assert shape.hidden_size % 128 == 0 and shape.intermediate_size % 128 == 0
    with pytest.raises(ValidationError, match="not a multiple of 16"):
        PruneConfig(params=0.67, width_multiple=100)
