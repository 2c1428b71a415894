"""Recipe parsing, resolution and every bad input the issue lists (one line, exit 2)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import REPO, run_cli, write_recipe

from edgekit.errors import DataError, ModelError, RecipeError, TargetError
from edgekit.preflight import load_recipe


def assert_one_line_error(result, *fragments: str) -> str:
    assert result.returncode == 2, result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("error: ") and "To resolve, " in line
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in line, line
    return line


def test_shipped_recipes_validate():
    default = load_recipe(REPO / "recipes" / "smollm2_to_orin_nano.yaml")
    assert default.recipe.model == "smollm2-135m" and not default.warnings
    flagship = load_recipe(REPO / "recipes" / "7b_to_orin.yaml")
    assert flagship.recipe.target == "jetson-orin-agx-64gb"
    types = [s.type for s in flagship.recipe.stages]
    assert types.index("prune") < types.index("distill") < types.index("quantize") < types.index("export_onnx")
    assert types[-1] == "build_engine" and not flagship.warnings
    # every shipped recipe validates (the runtime's large branch and the draft experiment too)
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        loaded = load_recipe(path)
        assert not loaded.warnings, (path.name, loaded.warnings)


def test_cli_validate_and_show():
    result = run_cli("recipe", "validate", str(REPO / "recipes" / "7b_to_orin.yaml"))
    assert result.returncode == 0 and "valid" in result.stdout and "build_engine" in result.stdout
    assert result.stderr == ""
    result = run_cli("recipe", "show", str(REPO / "recipes" / "smollm2_to_orin_nano.yaml"))
    shown = yaml.safe_load(result.stdout)
    assert shown["data"]["window"] == 512
    assert shown["trust_remote_code"] is False
    # defaults are filled in for every stage
    export = next(s for s in shown["stages"] if s["type"] == "export_onnx")
    assert export["parity_prompts"] is None and export["opset"] == 18


def test_round_trip(tmp_path):
    import shutil

    shutil.copytree(REPO / "recipes" / "accelerate", tmp_path / "accelerate")  # the 7B recipe's FSDP config, relative
    for name in ("smollm2_to_orin_nano.yaml", "7b_to_orin.yaml"):
        first = load_recipe(REPO / "recipes" / name).recipe
        again = tmp_path / name
        again.write_text(first.to_yaml())
        second = load_recipe(again).recipe
        assert second.to_dict() == first.to_dict()
        assert [s.name for s in second.stages] == [s.name for s in first.stages]


def test_duplicate_stage_types_get_unique_names(tmp_path, tiny_model_dir):
    loaded = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_model_dir))
    assert [s.name for s in loaded.recipe.stages] == ["load", "evaluate", "export_onnx", "evaluate-2", "bundle"]


def test_shorthand_stage_strings(tmp_path, tiny_model_dir):
    path = write_recipe(tmp_path / "r.yaml", tiny_model_dir, stages="stages: [load, evaluate]\n")
    assert [s.type for s in load_recipe(path).recipe.stages] == ["load", "evaluate"]


# --- bad input: each gives one line, exit 2, and names the place ---------------------------


def test_unknown_top_level_key(tmp_path, tiny_model_dir):
    path = write_recipe(tmp_path / "r.yaml", tiny_model_dir, extra="contxt_length: 4096\n")
    line = assert_one_line_error(run_cli("recipe", "validate", str(path)), "unknown key 'contxt_length'", "line 8")
    assert "rename it to 'context_length'" in line


def test_misspelled_stage_parameter(tmp_path, tiny_model_dir):
    stages = "stages:\n  - type: load\n  - type: export_onnx\n    opst: 18\n"
    path = write_recipe(tmp_path / "r.yaml", tiny_model_dir, stages=stages)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert "unknown key 'opst'" in str(info.value) and "line 11" in str(info.value)
    assert "rename it to 'opset'" in str(info.value) and "stages[1].opst" in str(info.value)


def test_bad_stage_value(tmp_path, tiny_model_dir):
    stages = "stages:\n  - type: load\n    dtype: float8\n"
    path = write_recipe(tmp_path / "r.yaml", tiny_model_dir, stages=stages)
    assert_one_line_error(run_cli("recipe", "validate", str(path)), "float8", "stages[0].dtype", "line 10")


@pytest.mark.parametrize("value", ["-0.1", "1.5", ".nan", ".inf", "'a lot'"])
def test_hostile_float_target(tmp_path, tiny_model_dir, value):
    """quantize.float_target is a fraction: anything outside [0, 1] (or not a number) is refused
    where it enters, naming the field (non-finite numbers already at the YAML line)."""
    stages = f"stages:\n  - type: load\n  - type: quantize\n    float_target: {value}\n"
    path = write_recipe(tmp_path / "r.yaml", tiny_model_dir, stages=stages)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert "stages[1].float_target" in str(info.value) or ("non-finite" in str(info.value) and "line 11" in str(info.value))


def test_unknown_stage_type(tmp_path, tiny_model_dir):
    path = write_recipe(tmp_path / "r.yaml", tiny_model_dir, stages="stages:\n  - type: laod\n")
    assert_one_line_error(run_cli("recipe", "validate", str(path)), "unknown stage type 'laod'", "did you mean 'load'")


def test_malformed_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nmodel: [unclosed\ntarget: jetson-orin-nano-8gb\n")
    line = assert_one_line_error(run_cli("recipe", "validate", str(path)), "malformed YAML", str(path))
    assert "line " in line


def test_recipe_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- load\n- bundle\n")
    assert_one_line_error(run_cli("recipe", "validate", str(path)), "must be a YAML mapping")


def test_missing_recipe_file(tmp_path):
    assert_one_line_error(run_cli("compress", str(tmp_path / "nope.yaml")), "recipe not found")


def test_unknown_target(tmp_path, tiny_model_dir):
    path = write_recipe(tmp_path / "r.yaml", tiny_model_dir)
    path.write_text(path.read_text().replace("jetson-orin-nano-8gb", "jetson-orin-nano-8g"))
    line = assert_one_line_error(run_cli("recipe", "validate", str(path)), "unknown target 'jetson-orin-nano-8g'", "line 3")
    assert "jetson-orin-nano-8gb" in line
    with pytest.raises(TargetError):
        load_recipe(path)


def test_missing_model_path(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", "./models/does-not-exist")
    line = assert_one_line_error(run_cli("recipe", "validate", str(path)), "does not exist", "line 2")
    assert "does-not-exist" in line
    with pytest.raises(ModelError):
        load_recipe(path)


def test_model_dir_without_config(tmp_path):
    (tmp_path / "empty-model").mkdir()
    path = write_recipe(tmp_path / "r.yaml", tmp_path / "empty-model")
    assert_one_line_error(run_cli("recipe", "validate", str(path)), "no config.json")


def test_gguf_of_unsupported_architecture(tmp_path):
    import gguf
    import numpy as np

    weird = tmp_path / "weird.gguf"
    writer = gguf.GGUFWriter(str(weird), "rwkv7")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    path = write_recipe(tmp_path / "r.yaml", weird)
    line = assert_one_line_error(run_cli("recipe", "validate", str(path)), "GGUF architecture 'rwkv7' is not supported")
    assert "llama" in line  # lists what is supported


def test_truncated_gguf(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF\x03\x00")
    path = write_recipe(tmp_path / "r.yaml", broken)
    assert_one_line_error(run_cli("recipe", "validate", str(path)), "cannot read the GGUF header")


def test_impossible_stage_order(tmp_path, tiny_model_dir):
    stages = "stages:\n  - type: export_onnx\n  - type: load\n"
    path = write_recipe(tmp_path / "r.yaml", tiny_model_dir, stages=stages)
    line = assert_one_line_error(run_cli("recipe", "validate", str(path)), "stage 'export_onnx' needs a checkpoint", "line 9")
    assert "load" in line
    stages = "stages:\n  - type: load\n  - type: bundle\n"
    path = write_recipe(tmp_path / "r2.yaml", tiny_model_dir, stages=stages)
    assert_one_line_error(run_cli("recipe", "validate", str(path)), "needs a onnx artifact", "export_onnx")


def test_duplicate_stage_names(tmp_path, tiny_model_dir):
    stages = "stages:\n  - type: load\n  - type: evaluate\n    name: q\n  - type: evaluate\n    name: q\n"
    path = write_recipe(tmp_path / "r.yaml", tiny_model_dir, stages=stages)
    assert_one_line_error(run_cli("recipe", "validate", str(path)), "stage name 'q' is used twice")


def test_missing_data_file(tmp_path, tiny_model_dir):
    path = write_recipe(tmp_path / "r.yaml", tiny_model_dir)
    path.write_text(path.read_text().replace("builtin:python-docs", "corpus/missing.txt"))
    with pytest.raises(DataError) as info:
        load_recipe(path)
    assert "missing.txt" in str(info.value) and "line 5" in str(info.value)


def test_window_longer_than_eval(tmp_path, tiny_model_dir):
    path = write_recipe(tmp_path / "r.yaml", tiny_model_dir)
    path.write_text(path.read_text().replace("window: 128", "window: 4096"))
    assert_one_line_error(run_cli("recipe", "validate", str(path)), "window (4096) is longer than eval_tokens")


def test_debug_shows_traceback(tmp_path):
    result = run_cli("--debug", "recipe", "validate", str(tmp_path / "nope.yaml"))
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_trust_remote_code_defaults_off(tmp_path, tiny_model_dir):
    loaded = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_model_dir))
    assert loaded.recipe.trust_remote_code is False
    assert "trust_remote_code: false" in loaded.recipe.to_yaml()


def test_recipe_reference_is_up_to_date():
    """docs/recipe_reference.md is generated from the field descriptions: regenerate it with
    `python scripts/gen_recipe_reference.py` when a recipe or stage field changes."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, str(REPO / "scripts" / "gen_recipe_reference.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
