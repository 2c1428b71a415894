"""Hostile input through the entry points of recipes, targets and model configs: names that
would become paths, YAML/JSON that would exhaust the machine, values no setting means.
Each must end in the one-line error (exit 2 through the CLI), never a traceback, and leave
nothing written outside its folder. (Bundles, deploys, serve and the runtime's own files have
their hostile-input tests beside their modules' tests.)"""

from __future__ import annotations

import json
import os
import textwrap
import tracemalloc
from pathlib import Path

import pytest
from conftest import run_cli, write_recipe

from edgekit.errors import EdgekitError, ModelError, OutputError, RecipeError, TargetError
from edgekit.names import check_name, is_inside, name_problem, remove_tree, rename_inside, require_inside
from edgekit.preflight import load_recipe
from edgekit.yamlio import MAX_INPUT_BYTES, atomic_write_json, load_json_file, load_yaml

HOSTILE_NAMES = {
    "traversal": "../../../../victim",
    "parent": "..",
    "dot": ".",
    "absolute": "/etc/passwd",
    "slash": "a/b",
    "backslash": "a\\b",
    "nul": "a\x00b",
    "empty": "",
    "overlong": "a" * 1000,
    "leading dot": ".hidden",
    "leading dash": "-rf",
    "space": "a b",
    "newline": "a\nb",
    "unicode": "caf\u00e9",
}


def assert_one_line(result, *fragments: str) -> str:
    assert result.returncode == 2, result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "To resolve, " in lines[0], lines[0]
    assert "internal error" not in lines[0] and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# --- the one name rule --------------------------------------------------------------------


@pytest.mark.parametrize("label", sorted(HOSTILE_NAMES))
def test_hostile_names_are_refused(label):
    value = HOSTILE_NAMES[label]
    assert name_problem(value) is not None
    with pytest.raises(RecipeError) as info:
        check_name(value, what="stage name", error_cls=RecipeError)
    assert "\n" not in str(info.value) and "stage name" in str(info.value)


@pytest.mark.parametrize("value", ["load", "evaluate_float", "smollm2-to-orin-nano", "v1.2.3", "A" * 128, "0"])
def test_ordinary_names_pass(value):
    assert name_problem(value) is None and check_name(value, what="name") == value


def test_non_string_names_are_refused():
    for value in (None, 3, ["a"], b"a"):
        assert name_problem(value) is not None


# --- names through the recipe --------------------------------------------------------------


def _recipe_with(tmp_path: Path, tiny_model_dir: Path, *, name: str = "tiny", stage_name: str | None = None,
                 bundle_name: str | None = None) -> Path:
    stage = f"    name: {json.dumps(stage_name)}\n" if stage_name is not None else ""
    bundle = f"    name: {json.dumps(bundle_name)}\n" if bundle_name is not None else ""
    text = textwrap.dedent(f"""\
        name: {json.dumps(name)}
        model: {tiny_model_dir}
        target: jetson-orin-nano-8gb
        output: {tmp_path / "run"}
        stages:
          - type: load
        """) + stage + "  - type: export_onnx\n  - type: bundle\n" + bundle
    path = tmp_path / "hostile.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("label", ["traversal", "absolute", "nul", "slash", "parent", "empty", "overlong", "leading dot"])
def test_hostile_stage_name_is_refused_before_any_work(tmp_path, tiny_model_dir, label):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    recipe = _recipe_with(tmp_path, tiny_model_dir, stage_name=HOSTILE_NAMES[label])
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe)
    assert "stages[0].name" in str(info.value)
    result = run_cli("compress", str(recipe), "--quiet")
    assert_one_line(result, "stages[0].name")
    assert (victim / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


def test_hostile_recipe_and_bundle_names_are_refused(tmp_path, tiny_model_dir):
    for label in ("traversal", "absolute", "nul", "overlong", "leading dot", "empty"):
        with pytest.raises(RecipeError) as info:
            load_recipe(_recipe_with(tmp_path, tiny_model_dir, name=HOSTILE_NAMES[label]))
        assert "name" in str(info.value)
        with pytest.raises(RecipeError) as info:
            load_recipe(_recipe_with(tmp_path, tiny_model_dir, bundle_name=HOSTILE_NAMES[label]))
        assert "stages[2].name" in str(info.value)
    result = run_cli("recipe", "validate", str(_recipe_with(tmp_path, tiny_model_dir, name="../../x")))
    assert_one_line(result, "path separator")


def test_unknown_hostile_stage_type_names_the_type(tmp_path, tiny_model_dir):
    path = tmp_path / "r.yaml"
    write_recipe(path, tiny_model_dir, stages="stages:\n  - type: ../../evil\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert "unknown stage type" in str(info.value)


def test_hostile_target_names(tmp_path):
    for label in ("traversal", "absolute", "nul", "overlong", "leading dot"):
        path = tmp_path / "target.yaml"
        path.write_text(f"name: {json.dumps(HOSTILE_NAMES[label])}\n")
        with pytest.raises(TargetError) as info:
            from edgekit.targets import load_target

            load_target(path)
        assert "name" in str(info.value) and "\n" not in str(info.value)
    from edgekit.targets import load_target

    with pytest.raises(TargetError):
        load_target("../../etc/passwd")  # a path that does not exist: refused, never read as a name


def test_engine_paths_check_both_names():
    from edgekit.engine.settings import engine_paths
    from edgekit.errors import EngineError

    assert engine_paths("jetson-orin-nano-8gb", "b")["script"] == "engine/jetson-orin-nano-8gb.trtexec.sh"
    for bad in ("../x", "/abs", "a\x00b", ""):
        with pytest.raises(EngineError):
            engine_paths(bad, "b")
        with pytest.raises(EngineError):
            engine_paths("t", bad)


# --- defence in depth: deletes and renames stay inside their root ------------------------


def test_remove_and_rename_stay_inside_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    for bad in (outside, root / ".." / "outside", root, Path("/")):
        with pytest.raises(OutputError):
            remove_tree(bad, root=root)
    # a link inside the root that points out: the link goes, its target stays
    link = root / "escape"
    link.symlink_to(outside)
    with pytest.raises(OutputError):
        require_inside(link / "keep.txt", root)
    remove_tree(link, root=root)
    assert not os.path.lexists(link) and (outside / "keep.txt").read_text() == "mine"
    (root / "a").mkdir()
    with pytest.raises(OutputError):
        rename_inside(root / "a", outside / "a", root=root)
    rename_inside(root / "a", root / "b", root=root)
    assert (root / "b").is_dir() and is_inside(root / "b", root)
    remove_tree(root / "b", root=root)
    assert not (root / "b").exists()
    remove_tree(root / "missing", root=root)  # nothing there: nothing to do


# --- YAML that cannot exhaust the machine --------------------------------------------------

BOMB = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))

HOSTILE_YAML = {
    "alias bomb": (BOMB, "alias bomb"),
    "deep flow nesting": ("[" * 5000 + "]" * 5000, "nest"),
    "deep block nesting": ("".join(" " * i + f"k{i}:\n" for i in range(200)), "deeper than 64"),
    "recursive alias": ("a: &a [*a]\n", "cycle"),
    "duplicate key": ("name: a\nmodel: b\nname: c\n", "duplicate key 'name' (first on line 1, again on line 3)"),
    "inf": ("budgets:\n  memory_gb: .inf\n", "non-finite"),
    "nan": ("budgets:\n  memory_gb: .nan\n", "non-finite"),
    "huge integer": ("context_length: " + "9" * 5000 + "\n", "digits"),
    "nul byte": ("name: a\x00b\n", "NUL"),
    "many values": ("x: [" + ",".join(["1"] * 150_000) + "]\n", "more than"),
    "many aliases": ("a: &a 1\nb: [" + ",".join(["*a"] * 2000) + "]\n", "aliases"),
    "bad timestamp": ("x: 2001-13-45\n", "month"),
    "unhashable key": ("? [a, b]\n: c\n", "unhashable"),
}


@pytest.mark.parametrize("label", sorted(HOSTILE_YAML))
def test_hostile_yaml_is_refused_in_bounded_memory(tmp_path, label):
    text, fragment = HOSTILE_YAML[label]
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    tracemalloc.start()
    try:
        with pytest.raises(RecipeError) as info:
            load_yaml(path, error_cls=RecipeError, what="recipe")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert fragment in str(info.value), str(info.value)
    assert "\n" not in str(info.value)
    assert peak < 300e6


@pytest.mark.parametrize("label", ["alias bomb", "deep flow nesting", "duplicate key", "inf", "huge integer", "nul byte"])
def test_hostile_yaml_through_the_cli(tmp_path, label):
    path = tmp_path / "recipe.yaml"
    path.write_text(HOSTILE_YAML[label][0])
    assert_one_line(run_cli("recipe", "validate", str(path)), str(path))
    target = tmp_path / "target.yaml"
    target.write_text(HOSTILE_YAML[label][0])
    assert_one_line(run_cli("targets", "show", str(target)))


def test_a_large_legitimate_file_is_still_read(tmp_path):
    # ~0.9 MB of plain values within the bounds: accepted (not everything big is hostile)
    path = tmp_path / "big.yaml"
    path.write_text("x: [" + ",".join(['"abcdefghijklmnopqrstuvwxyz"'] * 30_000) + "]\n")
    data, _ = load_yaml(path, error_cls=RecipeError)
    assert len(data["x"]) == 30_000


def test_merge_keys_and_anchors_still_work(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("base: &b {a: 1, b: 2}\nderived:\n  <<: *b\n  b: 3\n")
    data, lines = load_yaml(path, error_cls=RecipeError)
    assert data["derived"] == {"a": 1, "b": 3} and lines.line_for(("derived", "b")) == 4


def test_oversized_and_special_files(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * MAX_INPUT_BYTES + "\n")
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"name: \xff\xfe\n")
    cases = {big: "over the limit", fifo: "FIFO", Path("/dev/zero"): "device", tmp_path: "directory",
             binary: "not valid UTF-8", tmp_path / "missing.yaml": "not found"}
    for path, fragment in cases.items():
        with pytest.raises(RecipeError) as info:
            load_yaml(path, error_cls=RecipeError, what="recipe")
        assert fragment in str(info.value), (path, str(info.value))
    # the CLI too: a FIFO never hangs the process
    assert_one_line(run_cli("recipe", "validate", str(fifo), timeout=60), "FIFO")
    assert_one_line(run_cli("recipe", "validate", "/dev/zero", timeout=60), "device")


def test_non_finite_and_out_of_range_values_in_a_recipe(tmp_path, tiny_model_dir):
    for extra, fragment in (("budgets:\n  latency_p99_ms: .inf\n", "non-finite"),
                            ("context_length: 100000000000\n", "context_length"),
                            ("runtime:\n  max_new_tokens: 10000000000\n", "max_new_tokens")):
        path = write_recipe(tmp_path / "r.yaml", tiny_model_dir, extra=extra)
        with pytest.raises(RecipeError) as info:
            load_recipe(path)
        assert fragment in str(info.value), str(info.value)
    # pydantic itself refuses a non-finite value however it arrives (e.g. a quoted "inf")
    path = write_recipe(tmp_path / "r.yaml", tiny_model_dir, extra='budgets:\n  memory_gb: "inf"\n')
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert "budgets.memory_gb" in str(info.value)


def test_non_finite_target_values(tmp_path):
    from edgekit.targets import load_target

    builtin = Path(__file__).resolve().parents[1] / "targets" / "jetson-orin-nano-8gb.yaml"
    text = builtin.read_text()
    assert "memory_bandwidth_gbps:" in text
    lines = [("memory_bandwidth_gbps: \"nan\"" if line.startswith("memory_bandwidth_gbps:") else line)
             for line in text.splitlines()]
    path = tmp_path / "t.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TargetError) as info:
        load_target(path)
    assert "memory_bandwidth_gbps" in str(info.value)


def test_manifest_json_never_holds_infinity(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"perplexity": float("inf"), "values": [float("nan"), 1.5]})
    text = (tmp_path / "m.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    assert json.loads(text) == {"perplexity": None, "values": [None, 1.5]}


# --- a model directory is input too ---------------------------------------------------------

HOSTILE_CONFIGS = {
    "deep nesting": ("[" * 100_000 + "]" * 100_000, "nested deeper"),
    "NaN": ('{"hidden_size": NaN}', "non-finite"),
    "Infinity": ('{"num_hidden_layers": Infinity}', "non-finite"),
    "billion layers": ('{"num_hidden_layers": 1000000000}', "num_hidden_layers"),
    "float layers": ('{"num_hidden_layers": 1e9}', "num_hidden_layers"),
    "string size": ('{"hidden_size": "576"}', "hidden_size"),
    "bool size": ('{"vocab_size": true}', "vocab_size"),
    "negative": ('{"intermediate_size": -1}', "intermediate_size"),
    "huge int": ('{"vocab_size": ' + "9" * 5000 + "}", "digits"),
    "not an object": ("[1, 2]", "not a JSON object"),
    "bad json": ('{"a": ', "not valid JSON"),
    "heads do not divide": ('{"num_attention_heads": 9, "num_key_value_heads": 4}', "multiple"),
    "model_type object": ('{"model_type": {"a": 1}}', "model_type"),
    "nul": ('{"model_type": "llama"}\x00', "NUL"),
}


@pytest.mark.parametrize("label", sorted(HOSTILE_CONFIGS))
def test_hostile_model_config(tmp_path, label):
    from edgekit.models.source import resolve_model_source

    text, fragment = HOSTILE_CONFIGS[label]
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(text)
    with pytest.raises(ModelError) as info:
        resolve_model_source(str(model))
    assert fragment in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


def test_hostile_model_config_through_the_cli(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"num_hidden_layers": 1000000000, "hidden_size": 64}')
    recipe = write_recipe(tmp_path / "r.yaml", model)
    assert_one_line(run_cli("recipe", "validate", str(recipe)), "num_hidden_layers")


def test_json_reader_bounds(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"a": [1, 2, {"b": "c"}], "s": "[[[[[[ not nesting"}')
    assert load_json_file(path, error_cls=EdgekitError)["a"][2] == {"b": "c"}
    path.write_text("[" * 70 + "]" * 70)
    with pytest.raises(EdgekitError, match="nested deeper"):
        load_json_file(path, error_cls=EdgekitError)


def test_hostile_data_sources(tmp_path):
    from edgekit.errors import DataError
    from edgekit.models.text import resolve_text_source

    fifo = tmp_path / "fifo.txt"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="neither a regular file"):
        resolve_text_source(str(fifo))
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"text": "ok"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(DataError) as info:
        resolve_text_source(str(deep)).read("text")
    assert "line 2" in str(info.value)


def test_recipe_runtime_large_is_checked_as_runtime_json_will_be(tmp_path, tiny_model_dir):
    for value, fragment in (("../sibling", "'..'"), ("/abs/bundle", "absolute"), ("http://h/\nx", "whitespace")):
        extra = f"runtime:\n  policy: cascade\n  large: {json.dumps(value)}\n"
        with pytest.raises(RecipeError) as info:
            load_recipe(write_recipe(tmp_path / "r.yaml", tiny_model_dir, extra=extra))
        assert "runtime.large" in str(info.value) and fragment in str(info.value), str(info.value)
    ok = write_recipe(tmp_path / "r.yaml", tiny_model_dir, extra="runtime:\n  policy: cascade\n  large: large/bundle\n")
    assert load_recipe(ok).recipe.runtime.large == "large/bundle"


# --- CLI options ---------------------------------------------------------------------------


@pytest.mark.parametrize("args, fragment", [
    (("run", "b", "-p", "hi", "--top-p", "nan"), "--top-p"),
    (("run", "b", "-p", "hi", "--temperature", "inf"), "--temperature"),
    (("run", "b", "-p", "hi", "--max-new-tokens", "99999999999"), "--max-new-tokens"),
    (("run", "b", "-p", "hi", "--seed", "-1"), "--seed"),
    (("plan", "smollm2-135m", "--context", "99999999999"), "--context"),
    (("plan", "smollm2-135m", "--kv-fill", "nan"), "--kv-fill"),
    (("validate", "b", "--concurrency", "100000"), "--concurrency"),
    (("validate", "b", "--budget-latency-ms", "-inf"), "--budget-latency-ms"),
    (("build-engine", "b", "--workspace-gb", "nan"), "--workspace-gb"),
    (("run", "b"), "--prompt"),
    (("no-such-command",), "no-such-command"),
])
def test_cli_options_are_bounded_and_refused_in_one_line(args, fragment):
    line = assert_one_line(run_cli(*args, timeout=120), fragment)
    assert "--help" in line
