"""Target profiles: the built-in YAML files, the model's consistency checks, the errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from edgekit.errors import TargetError
from edgekit.targets import (
    PRECISIONS,
    Target,
    list_targets,
    load_target,
    target_names,
    target_table,
)

REPO = Path(__file__).resolve().parent.parent
TARGETS_DIR = REPO / "targets"
PROFILE_FILES = sorted(TARGETS_DIR.glob("*.yaml"))

EXPECTED = {
    "jetson-orin-agx-64gb",
    "jetson-orin-agx-32gb",
    "jetson-orin-nx-16gb",
    "jetson-orin-nano-8gb",
    "workstation-rtx4090",
    "workstation-h100",
}
ORIN = sorted(n for n in EXPECTED if n.startswith("jetson-orin"))
FP8_CAPABLE = ["workstation-h100", "workstation-rtx4090"]


# --- the built-in profiles --------------------------------------------------------------


def test_all_six_profiles_exist_and_load():
    assert set(target_names()) == EXPECTED
    assert {p.stem for p in PROFILE_FILES} == EXPECTED
    targets = list_targets()
    assert [t.name for t in targets] == sorted(EXPECTED)
    assert all(isinstance(t, Target) for t in targets)


@pytest.mark.parametrize("path", PROFILE_FILES, ids=lambda p: p.stem)
def test_profile_name_matches_file_name(path):
    assert load_target(path.stem).name == path.stem
    # Loading the same file by path gives the same profile.
    assert load_target(str(path)) == load_target(path.stem)


_KEY_VALUE = re.compile(r"^\s*(?:-\s+)?[A-Za-z_][\w-]*:\s*(?P<rest>.*)$")
_NUMBER_LIKE = re.compile(r"""^["']?[+-]?\d+(\.\d+)*["']?$""")


def _numeric_lines_without_comment(text: str) -> list[str]:
    """Lines ``key: <number>`` (quoted version numbers included) that lack a ``#`` comment."""
    missing = []
    for number, line in enumerate(text.splitlines(), 1):
        match = _KEY_VALUE.match(line)
        if not match:
            continue
        value, _, comment = match["rest"].partition("#")
        if _NUMBER_LIKE.match(value.strip()) and not comment.strip():
            missing.append(f"line {number}: {line.strip()}")
    return missing


def test_comment_checker_itself():
    text = 'a: 15\nb: 15  # source\n- c: "8.7"\nd: MAXN\ne: null\nf: 15W\n  g: 204.8 # ok\n'
    assert _numeric_lines_without_comment(text) == ["line 1: a: 15", 'line 3: - c: "8.7"']


@pytest.mark.parametrize("path", PROFILE_FILES, ids=lambda p: p.stem)
def test_every_number_cites_a_source(path):
    missing = _numeric_lines_without_comment(path.read_text(encoding="utf-8"))
    assert not missing, f"{path.name}: numbers without a source comment:\n" + "\n".join(missing)


@pytest.mark.parametrize("name", ORIN)
def test_orin_has_no_fp8(name):
    target = load_target(name)
    assert target.kind == "jetson"
    assert target.cpu_arch == "aarch64"
    assert target.compute_capability == "8.7"
    assert target.compute_capability_tuple == (8, 7)
    assert "fp8" not in target.supported_precisions
    assert not target.supports("fp8")
    assert target.supports("fp16") and target.supports("INT8")
    assert target.memory.shared is True
    assert (target.jetpack_version, target.tensorrt_version, target.cuda_version) == ("6.2", "10.3", "12.6")


@pytest.mark.parametrize(("name", "cc"), [("workstation-h100", (9, 0)), ("workstation-rtx4090", (8, 9))])
def test_workstations_have_fp8(name, cc):
    target = load_target(name)
    assert target.kind == "workstation"
    assert target.cpu_arch == "x86_64"
    assert target.compute_capability_tuple == cc
    assert target.supports("fp8")
    assert target.memory.shared is False
    assert target.jetpack_version is None
    assert target.tensorrt_version.startswith("10.") and target.cuda_version.startswith("12.")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_profile_invariants(name):
    target = load_target(name)
    assert 0 < target.memory.usable_gb < target.memory.total_gb
    assert set(target.supported_precisions) <= set(PRECISIONS)
    assert target.bandwidth_gbps() == target.memory_bandwidth_gbps
    assert target.memory_bandwidth_gbps == max(m.memory_bandwidth_gbps for m in target.power_modes)
    if target.kind == "jetson":
        assert all(mode.nvpmodel_id is not None for mode in target.power_modes)


def test_orin_nano_super_mode_bandwidth_is_per_mode():
    nano = load_target("jetson-orin-nano-8gb")
    assert {m.name for m in nano.power_modes} == {"7W", "15W", "25W", "MAXN_SUPER"}
    assert nano.bandwidth_gbps("15W") == 68
    assert nano.bandwidth_gbps("MAXN_SUPER") == pytest.approx(102.4)
    assert nano.power_mode("MAXN_SUPER").requires_jetpack == "6.2"
    with pytest.raises(TargetError, match="did you mean 'MAXN_SUPER'"):
        nano.power_mode("MAXN")


def test_agx_orin_64gb_power_modes():
    agx = load_target("jetson-orin-agx-64gb")
    watts = {m.name: m.watts for m in agx.power_modes}
    assert watts == {"MAXN": None, "MODE_15W": 15, "MODE_30W": 30, "MODE_50W": 50}


def test_target_table_rows():
    rows = target_table(list_targets())
    assert [r["name"] for r in rows] == sorted(EXPECTED)
    for row in rows:
        assert list(row) == ["name", "gpu", "cc", "memory", "bandwidth", "precisions", "TensorRT"]
        assert all(isinstance(value, str) and value for value in row.values())
    nano = next(r for r in rows if r["name"] == "jetson-orin-nano-8gb")
    assert nano["bandwidth"] == "68-102.4 GB/s"
    assert "JetPack 6.2" in nano["TensorRT"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_dumped_profile_reloads(tmp_path, name):
    # Bundles write target.yaml from model_dump(); that file must load as a custom target.
    from edgekit.yamlio import dump_yaml

    target = load_target(name)
    path = tmp_path / "target.yaml"
    path.write_text(dump_yaml(target.model_dump(mode="json")), encoding="utf-8")
    assert load_target(str(path)) == target


# --- errors -----------------------------------------------------------------------------


def test_unknown_name_suggests_a_close_match():
    with pytest.raises(TargetError) as info:
        load_target("jetson-orin-nano-4gb")
    message = str(info.value)
    assert "unknown target 'jetson-orin-nano-4gb'" in message
    assert "did you mean 'jetson-orin-nano-8gb'?" in message
    assert "edgekit targets list" in message and "path to a target YAML file" in message
    for name in EXPECTED:
        assert name in message


def test_unknown_fragment_suggests_the_profile():
    with pytest.raises(TargetError, match="did you mean 'workstation-h100'"):
        load_target("h100")


def test_unknown_name_without_match_lists_choices():
    with pytest.raises(TargetError) as info:
        load_target("raspberry-pi", where="recipe.yaml line 3: target")
    message = str(info.value)
    assert "did you mean" not in message
    assert "recipe.yaml line 3: target" in message
    assert "workstation-rtx4090" in message


def _custom(tmp_path: Path, edit=None, *, name: str = "my-board.yaml") -> Path:
    text = (TARGETS_DIR / "jetson-orin-nano-8gb.yaml").read_text(encoding="utf-8")
    text = text.replace("name: jetson-orin-nano-8gb", "name: my-board")
    if edit:
        old, new = edit
        assert old in text, old
        text = text.replace(old, new, 1)
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("file_name", ["my-board.yaml", "my-board.yml"])
def test_custom_yaml_path_loads(tmp_path, file_name):
    path = _custom(tmp_path, ("  usable_gb: 5.5", "  usable_gb: 6"), name=file_name)
    target = load_target(str(path))
    assert target.name == "my-board"
    assert target.memory.usable_gb == 6
    assert load_target(path).name == "my-board"  # a Path works too


def test_custom_yaml_relative_path_loads(tmp_path, monkeypatch):
    _custom(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert load_target("my-board.yaml").name == "my-board"


def test_misspelled_key_names_file_and_line(tmp_path):
    path = _custom(tmp_path, ("  usable_gb: 5.5", "  usable_gbb: 5.5"))
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if "usable_gbb" in text)
    with pytest.raises(TargetError) as info:
        load_target(str(path))
    message = str(info.value)
    assert str(path) in message and path.name in message
    assert f"line {line}" in message
    assert "unknown key 'usable_gbb'" in message
    assert "rename it to 'usable_gb'" in message


def test_misspelled_top_level_key_is_reported_before_the_missing_one(tmp_path):
    path = _custom(tmp_path, ("memory_bandwidth_gbps: 102.4", "memory_bandwith_gbps: 102.4"))
    with pytest.raises(TargetError) as info:
        load_target(str(path))
    assert "unknown key 'memory_bandwith_gbps'" in str(info.value)
    assert "rename it to 'memory_bandwidth_gbps'" in str(info.value)


def test_fp8_on_orin_is_refused(tmp_path):
    path = _custom(tmp_path, ("supported_precisions: [fp32,", "supported_precisions: [fp8, fp32,"))
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if "[fp8" in text)
    with pytest.raises(TargetError) as info:
        load_target(str(path))
    message = str(info.value)
    assert "fp8 needs compute capability >= 8.9" in message and "8.7" in message
    assert f"{path} line {line}" in message


def test_fp8_is_accepted_at_8_9(tmp_path):
    path = _custom(
        tmp_path,
        ("supported_precisions: [fp32,", "supported_precisions: [fp8, fp32,"),
    )
    path.write_text(path.read_text().replace('compute_capability: "8.7"', 'compute_capability: "8.9"'))
    assert load_target(str(path)).supports("fp8")


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (("  usable_gb: 5.5", "  usable_gb: 9"), "usable_gb 9 exceeds total_gb 8"),
        (("cpu_arch: aarch64", "cpu_arch: x86_64"), "a jetson target has cpu_arch 'aarch64'"),
        (("  shared: true", "  shared: false"), "memory.shared is false"),
        (('  cuda: "12.6"', "  cuda: 12.6"), "must be a quoted string"),
        (('compute_capability: "8.7"', 'compute_capability: "8"'), "compute_capability"),
        (("reference_power_mode: MAXN_SUPER", "reference_power_mode: MAXN"), "is not one of power_modes"),
        (("memory_bandwidth_gbps: 102.4  #", "memory_bandwidth_gbps: 68  #"), "is not the peak"),
        (("    power_mode: 15W", "    power_mode: 10W"), "power mode '10W'"),
        (("kind: jetson", "kind: jetsn"), "'jetson' or 'workstation'"),
        (("[fp32, fp16,", "[fp32, fp16, fp4,"), "supported_precisions"),
        (('  jetpack: "6.2"', "  jetpack: null"), "needs software.jetpack"),
    ],
)
def test_inconsistent_profiles_are_refused(tmp_path, edit, expected):
    path = _custom(tmp_path, edit)
    with pytest.raises(TargetError) as info:
        load_target(str(path))
    message = str(info.value)
    assert expected in message
    assert f"{path} line " in message


def test_non_mapping_and_missing_file(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(TargetError, match="must be a YAML mapping"):
        load_target(str(path))
    with pytest.raises(TargetError, match="target file not found"):
        load_target(str(tmp_path / "absent.yaml"))


def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nkind: [jetson\n")
    with pytest.raises(TargetError, match=r"malformed YAML.*broken\.yaml line \d"):
        load_target(str(path))


# --- import hygiene ---------------------------------------------------------------------


def test_import_does_not_pull_in_torch():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    code = "import edgekit.targets, sys; assert 'torch' not in sys.modules, 'torch was imported'"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr

