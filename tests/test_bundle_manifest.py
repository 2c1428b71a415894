"""edgekit.bundle.manifest: the one reader of a bundle's manifest.json (typed, bounded, one
error wording), the graph-variant lookup, and the Bundle handle that is opened once."""

from __future__ import annotations

import builtins
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import compress_tiny_bundle

from edgekit.bundle.manifest import (
    BUNDLE_FORMAT,
    DRAFT_VARIANT,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    Bundle,
    Manifest,
    graph_variant,
    parse_manifest,
    read_manifest,
)
from edgekit.errors import EdgekitError, EngineError


def _write(tmp_path: Path, data, *, raw: str | None = None) -> Path:
    bundle = tmp_path / "b"
    bundle.mkdir(exist_ok=True)
    (bundle / MANIFEST_NAME).write_text(raw if raw is not None else json.dumps(data))
    return bundle


# --- reading --------------------------------------------------------------------------------


def test_a_written_manifest_reads_back_typed(tmp_path):
    data = {"format": BUNDLE_FORMAT, "name": "tiny", "target": "jetson-orin-nano-8gb", "context_length": 2048,
            "onnx": {"file": "model.onnx", "variants": {"onnxruntime": "model.onnx", "tensorrt": "tensorrt/model.onnx"}},
            "budgets": {"latency_p99_ms": 40}, "files": {}, "engines": {"x": {}}, "future_key": [1, 2]}
    manifest = read_manifest(_write(tmp_path, data))
    assert isinstance(manifest, Manifest)
    assert manifest.name == "tiny" and manifest.context_length == 2048 and manifest.variants["tensorrt"] == "tensorrt/model.onnx"
    assert manifest.raw == data and manifest.get("future_key") == [1, 2]  # unknown keys are kept, as written


def test_older_and_minimal_manifests_are_accepted(tmp_path):
    manifest = read_manifest(_write(tmp_path, {"name": "tiny", "files": {}}))
    assert manifest.variants == {} and manifest.context_length is None and manifest.format is None
    # a stage metric may be NaN: the bundle stage writes json.dumps, so it stays readable
    assert read_manifest(_write(tmp_path, None, raw='{"stages": [{"metrics": {"ppl": NaN}}]}')).stages


@pytest.mark.parametrize("raw, fragment", [
    ("{", "not valid JSON"),
    ("[1, 2]", "not a JSON object"),
    ('"text"', "not a JSON object"),
    ('{"context_length": "2048"}', "context_length"),
    ('{"context_length": true}', "context_length"),
    ('{"context_length": 0}', "context_length"),
    ('{"context_length": 99999999999}', "context_length"),
    ('{"onnx": {"variants": ["model.onnx"]}}', "onnx.variants"),
    ('{"onnx": 7}', "onnx"),
    ('{"format": "edgekit.manifest/1"}', "format"),
    ('{"budgets": []}', "budgets"),
    ('{"n": ' + "9" * 100 + "}", "digits"),
    ("[" * 200 + "]" * 200, "nested deeper"),
])
def test_a_bad_manifest_is_one_line_with_one_wording(tmp_path, raw, fragment):
    bundle = _write(tmp_path, None, raw=raw)
    with pytest.raises(EngineError) as info:
        read_manifest(bundle, error_cls=EngineError)
    message = str(info.value)
    assert message.startswith("the bundle's manifest.json is unusable: ") and fragment in message, message
    assert "\n" not in message and "To resolve" in message


def test_missing_unreadable_and_oversized_manifests(tmp_path):
    with pytest.raises(EdgekitError, match=r"^not a bundle \(no manifest\.json\)"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).mkdir()
    with pytest.raises(EdgekitError, match=r"^not a bundle"):  # a directory is not a manifest
        read_manifest(tmp_path)
    big = _write(tmp_path, None, raw=" " * (MAX_MANIFEST_BYTES + 1))
    with pytest.raises(EdgekitError, match="unusable: .*over the limit"):
        read_manifest(big)
    if os.geteuid() != 0:  # root reads anything
        (big / MANIFEST_NAME).write_text("{}")
        (big / MANIFEST_NAME).chmod(0)
        try:
            with pytest.raises(EdgekitError, match="unusable: cannot read"):  # OSError never escapes
                read_manifest(big)
        finally:
            (big / MANIFEST_NAME).chmod(0o644)


def test_archive_bytes_go_through_the_same_checks():
    assert parse_manifest(b'{"name": "tiny"}', where="x.tar").name == "tiny"
    with pytest.raises(EdgekitError, match="unusable: not a JSON object"):
        parse_manifest(b"[]", where="x.tar")
    with pytest.raises(EdgekitError, match="unusable: not valid UTF-8"):
        parse_manifest(b'{"name": "\xff"}', where="x.tar")


# --- which graph ----------------------------------------------------------------------------

BOTH = {"onnxruntime": "model.onnx", "tensorrt": "tensorrt/model.onnx", DRAFT_VARIANT: "onnxruntime-draft/model.onnx"}


@pytest.mark.parametrize("variants, use, expected", [
    (BOTH, "tensorrt", ("tensorrt", "tensorrt/model.onnx")),
    (BOTH, "deployed", ("tensorrt", "tensorrt/model.onnx")),
    (BOTH, "check", ("tensorrt", "tensorrt/model.onnx")),
    (BOTH, "onnxruntime", ("onnxruntime", "model.onnx")),
    (BOTH, "draft", (DRAFT_VARIANT, "onnxruntime-draft/model.onnx")),
    ({"float": "model.onnx"}, "tensorrt", ("float", "model.onnx")),
    ({"float": "model.onnx"}, "onnxruntime", ("float", "model.onnx")),
    ({"float": "model.onnx"}, "draft", (None, None)),
    ({}, "tensorrt", (None, "model.onnx")),
    ({}, "onnxruntime", (None, "model.onnx")),
    ({"onnxruntime": "model.onnx"}, "deployed", (None, "model.onnx")),
    ({"onnxruntime": "ort/model.onnx"}, "check", ("onnxruntime", "ort/model.onnx")),
])
def test_graph_variant(variants, use, expected):
    manifest = Manifest.model_validate({"onnx": {"file": "model.onnx", "variants": variants}})
    assert graph_variant(manifest, use) == expected


def test_graph_variant_refusals():
    ort_only = Manifest.model_validate({"onnx": {"variants": {"onnxruntime": "model.onnx"}}})
    with pytest.raises(EngineError, match="no TensorRT graph"):
        graph_variant(ort_only, "tensorrt", error_cls=EngineError)
    with pytest.raises(EdgekitError, match="no ONNX variant 'fp8' \\(it has: onnxruntime\\)"):
        graph_variant(ort_only, "onnxruntime", variant="fp8")
    with pytest.raises(ValueError):
        graph_variant(ort_only, "gpu")


@pytest.mark.parametrize("rel", ["../x.onnx", "/etc/passwd", "a//b.onnx", "", 7, ".hidden.onnx"])
def test_a_graph_path_is_checked_where_it_becomes_a_path(tmp_path, rel):
    bundle = Bundle.open(_write(tmp_path, {"onnx": {"variants": {"tensorrt": rel}}}))
    with pytest.raises(EngineError, match="ONNX graph in manifest.json"):
        bundle.graph("tensorrt", error_cls=EngineError)


def test_the_handle(tmp_path):
    path = _write(tmp_path, {"name": "tiny", "target": "jetson-orin-nano-8gb", "onnx": {"variants": {"float": "g/model.onnx"}}})
    bundle = Bundle.open(path)
    assert Bundle.open(bundle) is bundle  # a handle is not opened again
    assert Path(bundle) == path and os.fspath(bundle) == str(path)
    assert bundle.name == "tiny" and bundle.checked_name() == "tiny" and bundle.target() == "jetson-orin-nano-8gb"
    assert bundle.graph("onnxruntime") == path / "g" / "model.onnx" and bundle.graph_rel("tensorrt") == "g/model.onnx"
    assert bundle.runtime_json() is None
    (path / "runtime.json").write_text('{"policy": "small_only"}')
    assert bundle.runtime_json() == {"policy": "small_only"}
    hostile = Bundle.open(_write(tmp_path, {"name": "../x", "target": "/etc"}))
    with pytest.raises(EdgekitError, match="invalid bundle name in manifest.json"):
        hostile.checked_name()
    with pytest.raises(EdgekitError, match="invalid target in manifest.json"):
        hostile.target()


# --- every reader goes through it -----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory, tiny_model_dir) -> Path:
    return compress_tiny_bundle(tmp_path_factory.mktemp("manifest"), tiny_model_dir)


@pytest.mark.parametrize("reader", ["validate", "deploy", "readiness", "engine", "sign", "verify_files", "serve"])
def test_every_reader_refuses_a_bad_manifest_with_the_same_words(tiny_bundle, tmp_path, reader):
    copy = tmp_path / "tiny"
    shutil.copytree(tiny_bundle, copy)
    (copy / MANIFEST_NAME).write_text("[1, 2]")
    with pytest.raises(EdgekitError, match=r"the bundle's manifest\.json is unusable: not a JSON object") as info:
        if reader == "validate":
            from edgekit.validate import validate_bundle

            validate_bundle(copy, output_dir=tmp_path / "out")
        elif reader == "deploy":
            from edgekit.deploy.deploy import load_bundle

            load_bundle(copy)
        elif reader == "readiness":
            from edgekit.engine.readiness import check_bundle

            check_bundle(copy, target="jetson-orin-nano-8gb")
        elif reader == "engine":
            from edgekit import api

            api.check_tensorrt(copy)
        elif reader == "sign":
            from edgekit.bundle.signing import verify_bundle

            verify_bundle(copy, [])
        elif reader == "verify_files":
            from edgekit.bundle.archive import verify_manifest_files

            verify_manifest_files(copy)
        else:
            from edgekit.runtime.config import RuntimeConfig
            from edgekit.serve.server import EdgekitServer, ServeOptions

            EdgekitServer(copy, ServeOptions(port=0), config=RuntimeConfig())
    assert "\n" not in str(info.value)


def _count_manifest_opens(monkeypatch) -> list[str]:
    opened: list[str] = []
    real_open, real_os_open = builtins.open, os.open

    def counting_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.fspath(file).endswith(MANIFEST_NAME):
            opened.append(os.fspath(file))
        return real_open(file, *args, **kwargs)

    def counting_os_open(path, *args, **kwargs):
        if os.fspath(path).endswith(MANIFEST_NAME):
            opened.append(os.fspath(path))
        return real_os_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(os, "open", counting_os_open)
    import io

    monkeypatch.setattr(io, "open", counting_open)
    return opened


def test_edgekit_run_reads_the_manifest_once(tiny_bundle, monkeypatch):
    from edgekit import api

    opened = _count_manifest_opens(monkeypatch)
    result = api.run_prompt(tiny_bundle, "The for statement is", max_new_tokens=3, policy="small_only")
    assert result["branch"] == "small"
    assert len(opened) == 1, opened


def test_edgekit_run_reads_the_manifest_once_with_a_draft_lookup_and_unresolved_runtime(tiny_bundle, tmp_path, monkeypatch):
    """The speculative policy looks up the draft graph, and a runtime.json that leaves
    max_new_tokens unset asks the manifest's context length: still one read."""
    from edgekit import api

    copy = tmp_path / "tiny"
    shutil.copytree(tiny_bundle, copy)
    runtime = json.loads((copy / "runtime.json").read_text())
    runtime.pop("max_new_tokens", None)
    (copy / "runtime.json").write_text(json.dumps(runtime))
    opened = _count_manifest_opens(monkeypatch)
    result = api.run_prompt(copy, "The for statement is", max_new_tokens=3, policy="speculative", large=str(tiny_bundle))
    assert result["branch"] == "speculative"
    mine = [path for path in opened if Path(path).parent == copy]  # the large branch is another bundle
    assert len(mine) == 1, opened
