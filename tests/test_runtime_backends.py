"""Choosing a branch (edgekit.runtime.backends.load_branch) and the names and paths a bundle's
manifest and runtime.json give it, checked where they enter. Each backend has its own module:
tests/test_runtime_backends_ort.py, _trt.py, _remote.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from backend_fixtures import branch, bundle, prompt  # noqa: F401 (fixtures)

from edgekit.errors import EdgekitError, EngineError
from edgekit.runtime.backends import OnnxRuntimeBranch, RemoteBranch, greedy_generate, load_branch


# --- load_branch ---------------------------------------------------------------------------


def test_load_branch_picks_the_backend(bundle, tmp_path):
    from edgekit.engine.builder import tensorrt_available

    local = load_branch(bundle, name="small")
    assert isinstance(local, OnnxRuntimeBranch) and local.name == "small"
    remote = load_branch("https://example.invalid/v1", name="large", model="m", timeout=3)
    assert isinstance(remote, RemoteBranch) and (remote.name, remote.model, remote.timeout) == ("large", "m", 3.0)
    with pytest.raises(EdgekitError, match="branch large returns text, not logits"):
        greedy_generate(remote, [1, 2], 4)
    with pytest.raises(EdgekitError, match="no bundle directory or http"):
        load_branch(tmp_path / "nothing", name="small")
    with pytest.raises(EdgekitError, match="unknown backend 'tensorrt-llm'"):
        load_branch(bundle, name="small", backend="tensorrt-llm")
    if tensorrt_available() is not None:
        return  # the rest is about a machine without TensorRT
    # an engine file without the tensorrt package: auto still runs on ONNX Runtime
    copy = tmp_path / "tiny"
    shutil.copytree(bundle, copy)
    (copy / "engine").mkdir()
    (copy / "engine" / "jetson-orin-nano-8gb.plan").write_bytes(b"plan")
    assert isinstance(load_branch(copy, name="small"), OnnxRuntimeBranch)
    with pytest.raises(EngineError, match="backend tensorrt needs the TensorRT Python package") as caught:
        load_branch(copy, name="small", backend="tensorrt")
    assert "To resolve" in str(caught.value)


def test_spin_wait_reaches_the_onnxruntime_session(bundle, prompt, tmp_path):
    """runtime.json spin_wait (default true) sets how ONNX Runtime's workers wait; every run
    stops spinning at its end either way, and the numbers do not depend on it."""
    from edgekit.runtime.bundle import open_router, resolve_config

    def entries(branch):
        options = branch.ort_session.get_session_options()
        return (options.get_session_config_entry("session.intra_op.allow_spinning"),
                options.get_session_config_entry("session.force_spinning_stop"))

    spinning = load_branch(bundle, name="small")
    sleeping = load_branch(bundle, name="small", spin_wait=False)
    assert entries(spinning) == ("1", "1") and entries(sleeping) == ("0", "1")
    assert np.array_equal(spinning.session().feed(prompt), sleeping.session().feed(prompt))
    router = open_router(bundle, resolve_config(bundle, spin_wait=False))
    assert entries(router.small) == ("0", "1")
    copy = tmp_path / "tiny"
    shutil.copytree(bundle, copy)
    runtime = copy / "runtime.json"
    data = json.loads(runtime.read_text()) if runtime.is_file() else {}
    runtime.write_text(json.dumps({**data, "spin_wait": "sometimes"}))
    with pytest.raises(EdgekitError, match="spin_wait"):
        resolve_config(copy)


# --- names and paths from a bundle's manifest / runtime.json ---------------------------------

HOSTILE_PATHS = {"parent": "../x", "nested parent": "graphs/../../x", "absolute": "/etc/passwd", "nul": "model\x00.onnx",
                 "empty": "", "long": "m" * 1000, "backslash": "..\\x", "hidden": ".model.onnx", "not a string": 7}


def _edited(bundle: Path, tmp_path: Path, *, manifest=None, runtime=None) -> Path:
    copy = tmp_path / "tiny"
    shutil.copytree(bundle, copy)
    for name, change in (("manifest.json", manifest), ("runtime.json", runtime)):
        if change:
            path = copy / name
            data = json.loads(path.read_text()) if path.is_file() else {}
            change(data)
            path.write_text(json.dumps(data))
    return copy


@pytest.mark.parametrize("case", sorted(HOSTILE_PATHS))
def test_hostile_graph_paths_in_the_manifest_are_refused(bundle, tmp_path, case):
    value = HOSTILE_PATHS[case]

    def change(manifest):
        manifest["onnx"]["variants"] = {"onnxruntime": value, "float": "model.onnx"}

    copy = _edited(bundle, tmp_path, manifest=change)
    with pytest.raises(EdgekitError, match="ONNX graph in manifest.json") as caught:
        load_branch(copy, name="small", backend="onnxruntime")
    assert "\n" not in str(caught.value) and "To resolve" in str(caught.value)


def test_a_graph_path_through_a_symlink_out_of_the_bundle_is_refused(bundle, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(bundle / "model.onnx", outside / "model.onnx")

    def change(manifest):
        manifest["onnx"]["variants"] = {"onnxruntime": "link/model.onnx"}

    copy = _edited(bundle, tmp_path, manifest=change)
    (copy / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(EdgekitError, match="leads outside"):
        load_branch(copy, name="small", backend="onnxruntime")


def test_a_graph_in_a_subfolder_of_the_bundle_is_fine(bundle, tmp_path):
    def change(manifest):
        manifest["onnx"]["variants"] = {"onnxruntime": "graphs/model.onnx"}

    copy = _edited(bundle, tmp_path, manifest=change)
    (copy / "graphs").mkdir()
    for name in ("model.onnx", "model.onnx_data"):
        shutil.move(copy / name, copy / "graphs" / name)
    branch = load_branch(copy, name="small", backend="onnxruntime")
    assert branch.graph == copy / "graphs" / "model.onnx"


@pytest.mark.parametrize("case", ["parent", "absolute", "nul", "empty", "long", "not a string"])
def test_hostile_targets_and_branch_names_are_refused(bundle, tmp_path, case):
    value = HOSTILE_PATHS[case]

    def change(manifest):
        manifest["target"] = value

    copy = _edited(bundle, tmp_path, manifest=change)
    with pytest.raises(EdgekitError, match="target") as caught:
        load_branch(copy, name="small")
    assert "\n" not in str(caught.value)
    with pytest.raises(EdgekitError, match="invalid branch name"):
        load_branch(bundle, name=value)


@pytest.mark.parametrize("case", sorted(HOSTILE_PATHS))
def test_hostile_large_branches_in_runtime_json_are_refused(bundle, tmp_path, case):
    from edgekit.runtime.bundle import read_runtime_config, resolve_config

    value = HOSTILE_PATHS[case]
    copy = _edited(bundle, tmp_path, runtime=lambda data: data.update(policy="cascade", large=value))
    with pytest.raises(EdgekitError, match="runtime.large|runtime.json") as caught:
        read_runtime_config(copy)
    text = str(caught.value)
    assert "\n" not in text and "runtime.json" in text and "To resolve" in text
    with pytest.raises(EdgekitError):
        resolve_config(copy)


@pytest.mark.parametrize("url", ["http://host:8000/v1\x00", "http://a b/", "https://" + "h" * 3000])
def test_hostile_large_urls_are_refused(bundle, tmp_path, url):
    from edgekit.runtime.bundle import read_runtime_config

    copy = _edited(bundle, tmp_path, runtime=lambda data: data.update(policy="cascade", large=url))
    with pytest.raises(EdgekitError, match="invalid runtime.large"):
        read_runtime_config(copy)


def test_large_branches_a_bundle_may_name(bundle, tmp_path):
    """An endpoint, or a bundle inside this one; a bundle elsewhere comes from the caller."""
    from edgekit.runtime.bundle import large_spec, open_router, read_runtime_config, resolve_config

    copy = _edited(bundle, tmp_path, runtime=lambda data: data.update(policy="large_only", large="branches/large"))
    shutil.copytree(bundle, copy / "branches" / "large")
    config = read_runtime_config(copy)
    assert config.large == "branches/large"
    router = open_router(copy, config)
    assert Path(router.large.bundle_dir) == (copy / "branches" / "large").resolve()
    remote = _edited(bundle, tmp_path / "remote", runtime=lambda data: data.update(policy="cascade", large="http://127.0.0.1:9/v1"))
    assert read_runtime_config(remote).large == "http://127.0.0.1:9/v1"
    # from the caller (--large), a path outside the bundle is theirs to give
    assert resolve_config(copy, large=str(bundle)).large == str(bundle)
    assert large_spec(copy, str(bundle)) == str(bundle)
    with pytest.raises(EdgekitError, match="NUL"):
        large_spec(copy, "x\x00y")
