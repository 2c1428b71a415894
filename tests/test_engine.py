"""TensorRT engine settings, the trtexec script, engine records and the build_engine stage.

TensorRT cannot run here: everything up to its boundary is tested (the settings every target
gets, the exact trtexec command line and what the script does with trtexec's output, the
refusal of a mismatched engine, the stage's bundle). The real builds are the `tensorrt`/`gpu`
tests at the end, run by scripts/gpu_check.sh on a machine that has TensorRT.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import textwrap
import typing
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import REPO, run_cli, write_recipe
from onnx import TensorProto, helper, numpy_helper

from edgekit.engine.record import check_compatible
from edgekit.engine.options import BuildEngineOptions, BuildOptions
from edgekit.engine.settings import build_settings, make_profiles, read_graph
from edgekit.engine.trtexec import render_script, trtexec_args
from edgekit.errors import EngineError
from edgekit.targets import list_targets, load_target

LAYERS, KV_HEADS, HEAD_DIM, VOCAB = 2, 2, 8, 32


def decoder_graph(path: Path, *, quantization: str | None = None, opset: int = 21) -> Path:
    """An ONNX graph with optimum's decoder inputs (dims named as optimum names them); its body is
    a token embedding -> optional DequantizeLinear weight -> MatMul to logits, enough for the
    settings (which read inputs, opset and the Q/DQ types) and small enough to write instantly."""
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "past_sequence_length + sequence_length"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
    ]
    for i in range(LAYERS):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(
                f"past_key_values.{i}.{kind}", TensorProto.FLOAT, ["batch_size", KV_HEADS, "past_sequence_length", HEAD_DIM]))
    embed = numpy_helper.from_array(np.zeros((VOCAB, 16), np.float32), "embed")
    nodes = [helper.make_node("Gather", ["embed", "input_ids"], ["hidden"])]
    inits = [embed]
    if quantization == "int4":
        inits += [helper.make_tensor("w_q", TensorProto.INT4, [16, VOCAB], np.zeros(16 * VOCAB, np.int8).tolist()),
                  numpy_helper.from_array(np.ones((1, VOCAB), np.float32), "w_scale")]
        nodes.append(helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], axis=0, block_size=16))
    elif quantization == "fp8":
        inits += [helper.make_tensor("w_q", TensorProto.FLOAT8E4M3FN, [16, VOCAB], [0.0] * (16 * VOCAB)),
                  numpy_helper.from_array(np.ones(VOCAB, np.float32), "w_scale")]
        nodes.append(helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], axis=1))
    else:
        inits.append(numpy_helper.from_array(np.zeros((16, VOCAB), np.float32), "w"))
    nodes.append(helper.make_node("MatMul", ["hidden", "w"], ["logits"]))
    output = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", VOCAB])
    graph = helper.make_graph(nodes, "decoder", inputs, [output], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _settings(path: Path, target: str, *, context: int = 1024, **options):
    return build_settings(read_graph(path), onnx_rel=path.name, target=load_target(target), bundle_name="b",
                          context_length=context, options=BuildOptions(**options))


def test_profiles_cover_prefill_and_decode(tmp_path):
    graph = read_graph(decoder_graph(tmp_path / "m.onnx"))
    prefill, decode = make_profiles(graph.inputs, context_length=1024, max_batch=2, max_prefill=256)
    assert prefill.name == "prefill" and decode.name == "decode"
    assert prefill.shapes["input_ids"] == ((1, 1), (1, 128), (2, 256))
    assert prefill.shapes["past_key_values.0.key"] == ((1, KV_HEADS, 0, HEAD_DIM), (1, KV_HEADS, 0, HEAD_DIM), (2, KV_HEADS, 0, HEAD_DIM))
    assert prefill.shapes["attention_mask"] == ((1, 1), (1, 128), (2, 256))  # past 0 + sequence
    assert decode.shapes["input_ids"] == ((1, 1), (1, 1), (2, 1))
    assert decode.shapes["past_key_values.1.value"][2] == (2, KV_HEADS, 1023, HEAD_DIM)
    assert decode.shapes["attention_mask"] == ((1, 2), (1, 513), (2, 1024))  # past + 1 token, up to the context
    assert set(prefill.shapes) == set(decode.shapes) == {spec.name for spec in graph.inputs}


def test_max_prefill_beyond_the_context_is_refused(tmp_path):
    graph = read_graph(decoder_graph(tmp_path / "m.onnx"))
    with pytest.raises(EngineError, match="max_prefill 4096 exceeds the context length 2048"):
        make_profiles(graph.inputs, context_length=2048, max_batch=1, max_prefill=4096)


def test_unknown_dynamic_dim_is_named(tmp_path):
    path = decoder_graph(tmp_path / "m.onnx")
    model = onnx.load(str(path))
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "tokens"
    onnx.save(model, str(path))
    with pytest.raises(EngineError, match="input 'input_ids' has a dynamic dimension 1 .'tokens'."):
        _settings(path, "jetson-orin-nano-8gb")


@pytest.mark.parametrize("target", [t.name for t in list_targets()])
def test_settings_and_trtexec_line_for_every_target(tmp_path, target):
    profile = load_target(target)
    quantized = _settings(decoder_graph(tmp_path / "q.onnx", quantization="int4"), target, workspace_gb=2, optimization_level=4)
    float_graph = _settings(decoder_graph(tmp_path / "f.onnx", opset=18), target)
    assert quantized.tensorrt_version == profile.software.tensorrt and quantized.compute_capability == profile.compute_capability
    assert quantized.graph["quantization"] == "int4_weight_only" and float_graph.graph["quantization"] is None
    # Q/DQ graphs: strongly typed; float graphs on TensorRT 10: weak typing with FP16.
    assert (quantized.strongly_typed, quantized.fp16) == (True, False)
    assert (float_graph.strongly_typed, float_graph.fp16) == (False, True)
    args = trtexec_args(quantized, engine_path=quantized.engine)
    assert args[0] == "--onnx=q.onnx" and f"--saveEngine=engine/{target}.plan" in args
    assert "--stronglyTyped" in args and "--fp16" not in args
    assert "--memPoolSize=workspace:2048M" in args and "--builderOptimizationLevel=4" in args
    assert f"--timingCacheFile=../b.{target}.timing.cache" in args
    assert "--profilingVerbosity=detailed" in args and f"--exportLayerInfo=engine/{target}.layers.json" in args
    assert not any(a.startswith(("--hardwareCompatibilityLevel", "--versionCompatible")) for a in args)
    # "--profile=N" then that profile's --minShapes/--optShapes/--maxShapes, prefill first
    mins = [a for a in args if a.startswith("--minShapes=")]
    maxs = [a for a in args if a.startswith("--maxShapes=")]
    assert len(mins) == len(maxs) == 2
    for number in (0, 1):
        at = args.index(f"--profile={number}")
        assert [a.split("=")[0] for a in args[at + 1:at + 4]] == ["--minShapes", "--optShapes", "--maxShapes"]
    assert "input_ids:1x512" in maxs[0] and "past_key_values.0.key:1x2x0x8" in maxs[0]
    assert "input_ids:1x1" in maxs[1] and "past_key_values.0.key:1x2x1023x8" in maxs[1] and "attention_mask:1x1024" in maxs[1]
    assert "--fp16" in trtexec_args(float_graph, engine_path=float_graph.engine)
    if profile.kind == "workstation":
        compat = _settings(tmp_path / "q.onnx", target, hardware_compatibility="ampere_plus", version_compatible=True)
        args = trtexec_args(compat, engine_path=compat.engine)
        assert "--hardwareCompatibilityLevel=ampere+" in args and "--versionCompatible" in args
    else:
        with pytest.raises(EngineError, match="not available on Jetson"):
            _settings(tmp_path / "q.onnx", target, hardware_compatibility="ampere_plus")
    if profile.compute_capability_tuple < (8, 9):
        with pytest.raises(EngineError, match="FP8 needs >= 8.9"):
            _settings(decoder_graph(tmp_path / "fp8.onnx", quantization="fp8"), target)
    else:
        assert _settings(decoder_graph(tmp_path / "fp8.onnx", quantization="fp8"), target).graph["quantization"] == "fp8"


def test_tensorrt_11_is_always_strongly_typed(tmp_path):
    path = decoder_graph(tmp_path / "f.onnx", opset=18)
    graph = read_graph(path)
    target = load_target("workstation-h100")
    settings = build_settings(graph, onnx_rel="f.onnx", target=target, bundle_name="b", context_length=512,
                              options=BuildOptions(max_prefill=256), tensorrt_version="11.2")
    assert (settings.strongly_typed, settings.fp16) == (True, False)
    args = trtexec_args(settings, engine_path=settings.engine)
    assert not {"--stronglyTyped", "--fp16", "--bf16"} & set(args)  # gone in TensorRT 11's trtexec
    with pytest.raises(EngineError, match="does not exist in TensorRT 11"):
        build_settings(graph, onnx_rel="f.onnx", target=target, bundle_name="b", context_length=512,
                       options=BuildOptions(max_prefill=256, typing="weak"), tensorrt_version="11.2")


FAKE_TRTEXEC = """#!/usr/bin/env bash
# Records its arguments, prints what trtexec prints about itself, writes --saveEngine.
printf '%s\\n' "$@" > "$FAKE_ARGS"
echo "&&&& RUNNING TensorRT.trtexec [TensorRT v100300] # trtexec"
echo "[I] === Device Information ==="
echo "[I] Selected Device: Orin"
echo "[I] Compute Capability: 8.7"
for a in "$@"; do case "$a" in --saveEngine=*) echo engine-bytes > "${a#--saveEngine=}";; esac; done
[ -z "${FAKE_FAIL:-}" ] || { echo "[E] Error[4]: out of memory"; exit 1; }
"""


def _fake_trtexec(tmp_path: Path) -> Path:
    path = tmp_path / "trtexec"
    path.write_text(FAKE_TRTEXEC)
    path.chmod(0o755)
    return path


def test_build_script_runs_trtexec_with_the_settings(tmp_path):
    bundle = tmp_path / "bundle"
    settings = _settings(decoder_graph(bundle / "model.onnx", quantization="int4"), "jetson-orin-nano-8gb")
    script = bundle / "engine" / "jetson-orin-nano-8gb.trtexec.sh"
    script.parent.mkdir()
    script.write_text(render_script(settings))
    env = dict(os.environ, TRTEXEC=str(_fake_trtexec(tmp_path)), FAKE_ARGS=str(tmp_path / "args"))
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    passed = (tmp_path / "args").read_text().splitlines()
    assert passed == trtexec_args(settings, engine_path=settings.engine + ".partial")
    assert (bundle / settings.engine).read_text() == "engine-bytes\n" and not (bundle / (settings.engine + ".partial")).exists()
    record = json.loads((bundle / settings.record).read_text())
    assert record["tensorrt_version"] == "10.3.0" and record["device"] == "Orin" and record["compute_capability"] == "8.7"
    assert record["built_with"] == "trtexec" and len(record["sha256"]) == 64
    # a failing build leaves no engine and no record behind, and says where the log is
    (bundle / settings.engine).unlink()
    (bundle / settings.record).unlink()
    failed = subprocess.run(["bash", str(script)], env=dict(env, FAKE_FAIL="1"), capture_output=True, text=True)
    assert failed.returncode == 1 and "out of memory" in failed.stderr and "build.log" in failed.stderr
    assert not list((bundle / "engine").glob("*.plan*")) and not (bundle / settings.record).exists()
    missing = subprocess.run(["bash", str(script)], env=dict(env, TRTEXEC=str(tmp_path / "nope")), capture_output=True, text=True)
    assert missing.returncode == 2 and "trtexec not found" in missing.stderr


def _record(**overrides):
    record = {"engine": "engine/t.plan", "tensorrt_version": "10.3.0", "compute_capability": "8.7", "device": "Orin"}
    record.update(overrides)
    return record


def test_a_mismatched_engine_is_refused():
    check_compatible(_record(), tensorrt_version="10.3.0", compute_capability="8.7")
    with pytest.raises(EngineError, match="built with TensorRT 10.3.0 but this is TensorRT 10.16.1"):
        check_compatible(_record(), tensorrt_version="10.16.1", compute_capability="8.7")
    with pytest.raises(EngineError, match=r"built for compute capability 8.7 \(Orin\) but this GPU has 8.9"):
        check_compatible(_record(), tensorrt_version="10.3.0", compute_capability="8.9", device="RTX 4090")
    # version-compatible engines run on later releases of the same major version, not earlier or 11.x
    check_compatible(_record(version_compatible=True), tensorrt_version="10.16.1", compute_capability="8.7")
    for newer_or_older in ("10.2.0", "11.0.0"):
        with pytest.raises(EngineError, match="version-compatible"):
            check_compatible(_record(version_compatible=True), tensorrt_version=newer_or_older, compute_capability="8.7")
    # ampere+ hardware-compatible engines run on any GPU from compute capability 8.0 on
    check_compatible(_record(hardware_compatibility="ampere_plus", compute_capability="8.6"), tensorrt_version="10.3.0",
                     compute_capability="9.0")
    with pytest.raises(EngineError, match="ampere"):
        check_compatible(_record(hardware_compatibility="ampere_plus"), tensorrt_version="10.3.0", compute_capability="7.5")


def test_ort_tensorrt_provider_options(tmp_path):
    from edgekit.engine.ort_providers import session_providers, tensorrt_provider_options

    settings = _settings(decoder_graph(tmp_path / "m.onnx", quantization="int4"), "workstation-rtx4090", workspace_gb=1)
    options = tensorrt_provider_options(settings, tmp_path)
    assert options["trt_engine_cache_enable"] == "True" and options["trt_engine_cache_path"].endswith("engine/ort-workstation-rtx4090")
    assert options["trt_timing_cache_enable"] == "True" and options["trt_max_workspace_size"] == str(1024**3)
    assert options["trt_fp16_enable"] == "False"  # a Q/DQ graph keeps its own types
    # one entry per input per profile (prefill, then decode), like trtexec's flags
    mins = options["trt_profile_min_shapes"].split(",")
    assert mins.count("input_ids:1x1") == 2 and "past_key_values.0.key:1x2x0x8" in mins and "past_key_values.0.key:1x2x1x8" in mins
    providers = session_providers("ort-tensorrt", settings, tmp_path)
    assert providers[0][0] == "TensorrtExecutionProvider" and providers[1:] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(EngineError, match="unknown backend"):
        session_providers("tensorrt-llm", settings, tmp_path)


def test_missing_execution_provider_is_refused_not_silently_cpu(tmp_path):
    from edgekit.engine.ort_providers import available_backends, create_session

    assert "ort-cpu" in available_backends()
    if "ort-cuda" in available_backends():
        pytest.skip("onnxruntime-gpu is installed here")
    with pytest.raises(EngineError, match="backend ort-cuda is not available"):
        create_session(tmp_path, "ort-cuda")


# --- the build options: one model for the recipe stage, the CLI and the Python API ----------


def _bounds(field):
    return {key: getattr(item, key) for item in field.metadata for key in ("ge", "gt", "le", "lt") if hasattr(item, key)}


def test_build_engine_stage_config_is_the_build_options():
    from edgekit.engine.stage import BuildEngineConfig
    from edgekit.pipeline.registry import StageConfig

    assert issubclass(BuildEngineConfig, StageConfig) and issubclass(BuildEngineConfig, BuildEngineOptions)
    # the same fields (pydantic copies FieldInfo into a subclass: compared by what they say)
    assert ({name: repr(field) for name, field in BuildEngineConfig.model_fields.items()}
            == {name: repr(field) for name, field in BuildEngineOptions.model_fields.items()})
    assert all(field.description for field in BuildEngineOptions.model_fields.values())
    config = BuildEngineConfig(max_prefill=64, workspace_gb=2, build="never")
    assert config.build_options() == BuildOptions(max_prefill=64, workspace_gb=2)
    for bad in ({"max_batch": 0}, {"workspace_gb": float("nan")}, {"typing": "loose"}, {"max_prefil": 64}):
        with pytest.raises(ValueError):
            BuildEngineConfig(**bad)


@pytest.mark.parametrize("command, model, others", [
    ("build-engine", BuildEngineOptions, {"path", "target", "context_length", "backend"}),
    ("check", BuildOptions, {"path", "target", "context_length", "as_json"}),
])
def test_cli_engine_options_are_the_model_fields(command, model, others):
    import click

    from edgekit.cli import main

    params = {param.name: param for param in main.commands[command].params}
    assert set(params) == set(model.model_fields) | others
    for name, field in model.model_fields.items():
        param = params[name]
        assert param.default == field.default, name
        assert param.opts == ["--" + name.replace("_", "-")], name
        if isinstance(param.type, click.Choice):
            assert tuple(param.type.choices) == typing.get_args(field.annotation), name
        if isinstance(param.type, (click.IntRange, click.FloatRange)):
            bounds = _bounds(field)
            assert (param.type.min, param.type.max) == (bounds.get("ge", bounds.get("gt")), bounds.get("le")), name
            assert param.type.min_open == ("gt" in bounds), name
    assert params["timing_cache"].secondary_opts == ["--no-timing-cache"]
    if command == "build-engine":
        assert params["check"].secondary_opts == ["--no-check"]


# --- the build_engine stage on a tiny pipeline --------------------------------------------

STAGES = textwrap.dedent(
    """\
    stages:
      - type: load
      - type: export_onnx
      - type: bundle
      - type: build_engine
        max_prefill: 64
        workspace_gb: 1
    """
)


@pytest.fixture(scope="module")
def engine_run(tmp_path_factory, tiny_model_dir):
    from edgekit import api

    tmp = tmp_path_factory.mktemp("engine")
    recipe = write_recipe(tmp / "tiny.yaml", tiny_model_dir, stages=STAGES, output=tmp / "run")
    manifest = api.compress(recipe, quiet=True)
    return manifest, tmp / "run" / manifest["stages"][-1]["dir"]


def test_build_engine_stage_writes_a_device_ready_bundle(engine_run):
    run_manifest, stage_dir = engine_run
    metrics = run_manifest["stages"][-1]["metrics"]
    assert metrics["engine"] == "planned" and "TensorRT" in metrics["reason"] and metrics["check_errors"] == 0
    bundle = stage_dir / "tiny"
    manifest = json.loads((bundle / "manifest.json").read_text())
    target = "jetson-orin-nano-8gb"
    entry = manifest["engines"][target]
    assert entry["status"] == "planned" and entry["build_on_device"] == f"./build_engine.sh {target}"
    for rel in (f"engine/{target}.settings.json", f"engine/{target}.trtexec.sh", f"engine/{target}.check.json", "build_engine.sh"):
        assert rel in manifest["files"], rel
    on_disk = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert on_disk == sorted(manifest["files"])
    settings = json.loads((bundle / f"engine/{target}.settings.json").read_text())
    assert settings["onnx"] == "model.onnx" and settings["max_prefill"] == 64 and settings["context_length"] == 2048
    assert settings["fp16"] is True and settings["strongly_typed"] is False  # a float graph on TensorRT 10.3
    with tarfile.open(stage_dir / "tiny.tar") as tar:
        modes = {m.name: m.mode for m in tar.getmembers()}
    assert modes["tiny/build_engine.sh"] == 0o755 and modes["tiny/model.onnx"] == 0o644
    # the bundle stage's own output is untouched (stages never modify another stage's files)
    bundle_stage = stage_dir.parent / run_manifest["stages"][-2]["dir"].split("/")[-1]
    assert not (bundle_stage / "tiny" / "engine").exists()


def test_device_build_script_from_the_bundle(engine_run, tmp_path):
    _, stage_dir = engine_run
    bundle = tmp_path / "tiny"
    import shutil

    shutil.copytree(stage_dir / "tiny", bundle)
    env = dict(os.environ, TRTEXEC=str(_fake_trtexec(tmp_path)), FAKE_ARGS=str(tmp_path / "args"))
    done = subprocess.run([str(bundle / "build_engine.sh")], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (bundle / "engine" / "jetson-orin-nano-8gb.plan").is_file()
    assert "--fp16" in (tmp_path / "args").read_text().splitlines()
    other = subprocess.run([str(bundle / "build_engine.sh"), "workstation-h100"], env=env, capture_output=True, text=True)
    assert other.returncode == 2 and "no build script for target workstation-h100" in other.stderr


def test_build_engine_always_without_tensorrt_is_a_clear_error(engine_run, tmp_path):
    import shutil

    from edgekit.engine.prepare import prepare_engine

    _, stage_dir = engine_run
    shutil.copytree(stage_dir / "tiny", tmp_path / "tiny")
    with pytest.raises(EngineError, match="cannot build the engine here: the TensorRT Python package is not installed"):
        prepare_engine(tmp_path / "tiny", load_target("workstation-rtx4090"), BuildOptions(max_prefill=64), build="always")



def test_a_result_planned_here_is_not_reused_on_a_host_that_can_build(engine_run, tmp_path, monkeypatch):
    """The local TensorRT + GPU decide what build_engine produces, so they are in its cache key."""
    import shutil

    import edgekit.engine.builder as builder
    from edgekit import api

    run_manifest, stage_dir = engine_run
    copy = tmp_path / "run"
    shutil.copytree(stage_dir.parent.parent, copy)
    recipe = run_manifest["recipe"]["file"]
    again = api.compress(recipe, output=copy, quiet=True)
    assert [s["status"] for s in again["stages"]] == ["cached"] * 4
    monkeypatch.setattr(builder, "build_host", lambda: {"tensorrt": "10.3.0", "compute_capability": "8.7"})
    elsewhere = api.compress(recipe, output=copy, quiet=True)
    assert [s["status"] for s in elsewhere["stages"]] == ["cached"] * 3 + ["done"]


# --- on a machine with TensorRT and a GPU (scripts/gpu_check.sh) ---------------------------


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_real_engine_build_and_load(engine_run, tmp_path):
    import shutil

    from edgekit.engine.builder import cuda_device
    from edgekit.engine.prepare import prepare_engine
    from edgekit.engine.record import load_engine
    from edgekit.targets import Target

    _, stage_dir = engine_run
    bundle = tmp_path / "tiny"
    shutil.copytree(stage_dir / "tiny", bundle)
    _, cc = cuda_device()
    here = next((t for t in list_targets() if t.compute_capability == cc), None)
    if here is None:  # a GPU without a profile: a copy of the H100 profile with this compute capability
        here = Target.model_validate({**load_target("workstation-h100").model_dump(mode="json"), "name": "this-gpu",
                                      "compute_capability": cc, "supported_precisions": ["fp32", "fp16"]})
    summary = prepare_engine(bundle, here, BuildOptions(max_prefill=64, workspace_gb=1), build="always")
    assert summary["status"] == "built"
    record = json.loads((bundle / f"engine/{here.name}.engine.json").read_text())
    assert json.loads((bundle / f"engine/{here.name}.layers.json").read_text())["Layers"]
    engine = load_engine(bundle, here.name)
    assert engine.num_optimization_profiles == 2
    # the same engine is refused under another TensorRT version
    record["tensorrt_version"] = "9.0.0"
    (bundle / f"engine/{here.name}.engine.json").write_text(json.dumps(record))
    with pytest.raises(EngineError, match="built with TensorRT 9.0.0"):
        load_engine(bundle, here.name)


def test_cli_build_engine_and_check(engine_run, tmp_path):
    import shutil

    _, stage_dir = engine_run
    bundle = tmp_path / "tiny"
    shutil.copytree(stage_dir / "tiny", bundle)
    result = run_cli("build-engine", str(bundle), "--target", "workstation-rtx4090", "--max-prefill", "64")
    assert result.returncode == 0, result.stderr
    assert "not built here" in result.stdout and "engine/workstation-rtx4090.trtexec.sh" in result.stdout
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert set(manifest["engines"]) == {"jetson-orin-nano-8gb", "workstation-rtx4090"}
    result = run_cli("check", str(bundle), "--target", "jetson-orin-nano-8gb", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] and report["errors"] == 0 and report["target"] == "jetson-orin-nano-8gb"
    for args, says in (
        ((str(tmp_path / "nothing"), "--target", "workstation-rtx4090"), "no bundle directory or .onnx file here"),
        ((str(stage_dir / "tiny.tar"),), "unpack it first (edgekit unpack tiny.tar"),
        ((str(bundle), "--target", "jetson-orin-nano-8gb", "--hardware-compatibility", "ampere_plus"), "not available on Jetson"),
        ((str(bundle), "--target", "nonesuch"), "nonesuch"),
        # without onnxruntime-gpu: a clear refusal, never a silent CPU run
        ((str(bundle), "--target", "workstation-rtx4090", "--backend", "ort-tensorrt"), "backend ort-tensorrt is not available"),
    ):
        result = run_cli("build-engine", *args)
        assert result.returncode == 2 and result.stderr.startswith("error: ") and says in result.stderr, (args, result.stderr)
        assert "To resolve" in result.stderr and len(result.stderr.strip().splitlines()) == 1


# --- the Python-API builder against a recording stand-in for the tensorrt module ----------
# Not a TensorRT test (that is test_real_engine_build_and_load): it runs every line of
# edgekit.engine.builder on this machine and pins what differs between TensorRT 10 and 11.


def _fake_tensorrt(version: str, calls: list):
    import enum
    import types

    class Severity(enum.Enum):
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    class ILogger:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = Severity

        def __init__(self):
            pass

    class Recorder:
        def __init__(self, name):
            self._name = name

        def __getattr__(self, attr):
            return lambda *args, **kwargs: calls.append((f"{self._name}.{attr}", args, kwargs))

    class Config(Recorder):
        def __setattr__(self, key, value):
            if key.startswith("_"):
                return object.__setattr__(self, key, value)
            calls.append((f"config.{key}", (value,), {}))

        def create_timing_cache(self, data):
            return ("cache", data)

        def get_timing_cache(self):
            return types.SimpleNamespace(serialize=lambda: b"timing")

    class Builder:
        def __init__(self, logger):
            logger.log(Severity.INFO, "builder created")

        def create_network(self, flags):
            calls.append(("create_network", (flags,), {}))
            return "network"

        def create_builder_config(self):
            return Config("config")

        def create_optimization_profile(self):
            return Recorder("profile")

        def build_serialized_network(self, network, config):
            return b"plan-bytes"

    class Parser:
        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            calls.append(("parse_from_file", (path,), {}))
            return True

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            inspector = types.SimpleNamespace(get_engine_information=lambda fmt: json.dumps(
                {"Layers": [{"Name": "gemm", "Outputs": [{"Format/Datatype": "Half"}], "Inputs": [{"Format/Datatype": "Int4"}]}]}))
            return types.SimpleNamespace(create_engine_inspector=lambda: inspector)

    flag = types.SimpleNamespace(FP16="FP16", VERSION_COMPATIBLE="VERSION_COMPATIBLE")
    return types.SimpleNamespace(
        __version__=version, ILogger=ILogger, Logger=ILogger, Builder=Builder, OnnxParser=Parser, Runtime=Runtime,
        NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=1), BuilderFlag=flag,
        MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"), ProfilingVerbosity=types.SimpleNamespace(DETAILED="DETAILED"),
        HardwareCompatibilityLevel=types.SimpleNamespace(AMPERE_PLUS="AMPERE_PLUS"),
        LayerInformationFormat=types.SimpleNamespace(JSON="JSON"),
    )


@pytest.mark.parametrize("version", ["10.3.0", "11.2.1"])
def test_builder_calls_for_tensorrt_10_and_11(tmp_path, monkeypatch, version):
    from edgekit.engine import builder

    calls: list = []
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(version, calls))
    monkeypatch.setattr(builder, "cuda_device", lambda: ("Fake GPU", "8.9"))
    bundle = tmp_path / "bundle"
    settings = _settings(decoder_graph(bundle / "model.onnx", opset=18), "workstation-rtx4090", workspace_gb=2,
                         version_compatible=True, hardware_compatibility="ampere_plus")
    record = builder.build_engine(settings, bundle)
    names = [c[0] for c in calls]
    flags = next(c[1][0] for c in calls if c[0] == "create_network")
    if version.startswith("10."):
        # a float graph on TensorRT 10: weak typing + the FP16 flag
        assert flags == 0 and ("config.set_flag", ("FP16",), {}) in calls
    else:
        # TensorRT 11: no creation flag and no precision flags exist
        assert flags == 0 and ("config.set_flag", ("FP16",), {}) not in calls
    assert ("config.set_memory_pool_limit", ("WORKSPACE", 2 * 1024**3), {}) in calls
    assert ("config.set_flag", ("VERSION_COMPATIBLE",), {}) in calls
    assert ("config.hardware_compatibility_level", ("AMPERE_PLUS",), {}) in calls
    assert ("config.profiling_verbosity", ("DETAILED",), {}) in calls
    assert names.count("config.add_optimization_profile") == 2
    shapes = [c[1] for c in calls if c[0] == "profile.set_shape"]
    assert ("input_ids", (1, 1), (1, 128), (1, 512)) in shapes and ("input_ids", (1, 1), (1, 1), (1, 1)) in shapes
    assert (bundle / settings.engine).read_bytes() == b"plan-bytes"
    assert (tmp_path / "b.workstation-rtx4090.timing.cache").read_bytes() == b"timing"  # beside the bundle
    assert record["tensorrt_version"] == version and record["compute_capability"] == "8.9"
    assert record["precisions"] == {"Half": 1, "Int4": 1}
    assert "builder created" in (bundle / settings.build_log).read_text()


def test_strongly_typed_creation_flag_on_tensorrt_10(tmp_path, monkeypatch):
    from edgekit.engine import builder

    calls: list = []
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt("10.16.1", calls))
    monkeypatch.setattr(builder, "cuda_device", lambda: ("Fake GPU", "9.0"))
    settings = _settings(decoder_graph(tmp_path / "b" / "model.onnx", quantization="int4"), "workstation-h100")
    builder.build_engine(settings, tmp_path / "b")
    assert next(c[1][0] for c in calls if c[0] == "create_network") == 1 << 1
    assert ("config.set_flag", ("FP16",), {}) not in calls
