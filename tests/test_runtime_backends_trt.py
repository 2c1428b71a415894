"""The TensorRT branch (edgekit.runtime.backends.trt): its session's logic on a stand-in engine
on the CPU, the error without the tensorrt package, and the real engine against the ONNX
Runtime branch on a machine with TensorRT and a GPU (scripts/gpu_check.sh).
"""

from __future__ import annotations

import contextlib
import ctypes
import shutil
import sys
import types

import numpy as np
import pytest
from backend_fixtures import ATOL, branch, bundle, fresh_rows, prompt  # noqa: F401 (fixtures)

from edgekit.errors import EdgekitError, EngineError
from edgekit.runtime.backends import TensorRTBranch, greedy_generate, load_branch


# --- the TensorRT session's logic on a stand-in engine (CPU) ---------------------------------
# Not a TensorRT test (that is test_tensorrt_branch_matches_onnxruntime below): a recording
# engine with TensorRT's Python surface, whose profiles come from edgekit.engine.settings and
# whose execute_async_v3 reads the bound addresses, runs the ONNX graph and writes the outputs
# back. It checks profile choice, splitting, the cache hand-over, rollback and that every
# address points at a dense buffer of the right size.


class _StandInContext:
    def __init__(self, engine):
        self.engine, self.active_optimization_profile = engine, 0
        self.shapes, self.addresses, self.calls = {}, {}, []

    def set_optimization_profile_async(self, index, stream):
        self.active_optimization_profile, self.shapes = index, {}
        return True

    def set_input_shape(self, name, shape):
        low, _, high = self.engine.profiles[self.active_optimization_profile].shapes[name]
        if not all(lo <= d <= hi for d, lo, hi in zip(shape, low, high)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, address):
        assert address, name
        self.addresses[name] = address

    def get_tensor_shape(self, name):
        past, count = self.shapes["past_key_values.0.key"][2], self.shapes["input_ids"][1]
        if name == "logits":
            return (1, count, self.engine.vocab)
        heads, dim = self.engine.cache_dims
        return (1, heads, past + count, dim)

    def _array(self, name, shape, dtype):
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        buffer = (ctypes.c_char * max(size, 1)).from_address(self.addresses[name])
        return np.frombuffer(buffer, dtype=dtype, count=int(np.prod(shape))).reshape(shape)

    def execute_async_v3(self, stream):
        feeds = {}
        for value in self.engine.ort.get_inputs():
            dtype = np.int64 if "int64" in value.type else np.float32
            feeds[value.name] = self._array(value.name, self.shapes[value.name], dtype).copy()
        self.calls.append((self.active_optimization_profile, self.shapes["input_ids"][1], self.shapes["past_key_values.0.key"][2]))
        names = [o.name for o in self.engine.ort.get_outputs()]
        for name, value in zip(names, self.engine.ort.run(names, feeds)):
            assert value.shape == tuple(self.get_tensor_shape(name)), name
            self._array(name, value.shape, np.float32)[...] = value
        return True


class _StandInEngine:
    def __init__(self, ort_session, onnx_path, *, context_length, max_prefill):
        from edgekit.engine.settings import make_profiles, read_graph

        self.ort = ort_session
        graph = read_graph(onnx_path)
        self.profiles = make_profiles(graph.inputs, context_length=context_length, max_batch=1, max_prefill=max_prefill)
        self.num_optimization_profiles = len(self.profiles)
        self.inputs = {v.name: v for v in ort_session.get_inputs()}
        self.outputs = {v.name: v for v in ort_session.get_outputs()}
        self.names = list(self.inputs) + list(self.outputs)
        self.num_io_tensors = len(self.names)
        key = self.inputs["past_key_values.0.key"].shape
        self.cache_dims = (key[1], key[3])
        self.vocab = self.outputs["logits"].shape[-1]
        self.contexts = []

    def get_tensor_name(self, index):
        return self.names[index]

    def get_tensor_mode(self, name):
        return "input" if name in self.inputs else "output"

    def get_tensor_dtype(self, name):
        return "int64" if name in ("input_ids", "attention_mask", "position_ids") else "float32"

    def get_tensor_shape(self, name):
        value = self.inputs.get(name) or self.outputs[name]
        return tuple(d if isinstance(d, int) else -1 for d in value.shape)

    def get_tensor_profile_shape(self, name, index):
        return list(self.profiles[index].shapes[name])

    def create_execution_context(self):
        self.contexts.append(_StandInContext(self))
        return self.contexts[-1]


class _CpuTensorRTBranch(TensorRTBranch):
    device_type = "cpu"

    def _new_stream(self):
        return types.SimpleNamespace(cuda_stream=0)

    def on_stream(self):
        return contextlib.nullcontext()


def test_tensorrt_session_logic_on_a_stand_in_engine(bundle, branch, prompt, monkeypatch):
    import edgekit.engine.record as record

    fake_trt = types.SimpleNamespace(__version__="10.3.0", TensorIOMode=types.SimpleNamespace(INPUT="input", OUTPUT="output"),
                                     float32="float32", float16="float16", int64="int64", int32="int32")
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt)
    engines = []

    def fake_load_engine(bundle_dir, target):
        assert target == "jetson-orin-nano-8gb"
        engines.append(_StandInEngine(branch.ort_session, branch.graph, context_length=64, max_prefill=8))
        return engines[0]

    monkeypatch.setattr(record, "load_engine", fake_load_engine)
    trt_branch = _CpuTensorRTBranch(bundle, context_length=64)
    assert (trt_branch.backend, trt_branch.vocab_size, trt_branch.target) == ("tensorrt", branch.vocab_size, "jetson-orin-nano-8gb")
    calls = engines[0].contexts[0].calls
    session, reference = trt_branch.session(), branch.session()
    # 12 tokens > max_prefill 8: one prefill call, then four decode calls; same rows as ORT at once
    np.testing.assert_allclose(session.feed(prompt[:12]), reference.feed(prompt[:12]), rtol=0, atol=ATOL)
    assert calls == [(0, 8, 0), (1, 1, 8), (1, 1, 9), (1, 1, 10), (1, 1, 11)]
    # k tokens after a prefix (verification): k decode calls, the same rows
    np.testing.assert_allclose(session.feed(prompt[12:15]), reference.feed(prompt[12:15]), rtol=0, atol=ATOL)
    assert calls[-3:] == [(1, 1, 12), (1, 1, 13), (1, 1, 14)] and session.length == 15
    session.rollback(3)
    reference.rollback(3)
    np.testing.assert_allclose(session.feed([3, 4]), reference.feed([3, 4]), rtol=0, atol=ATOL)
    session.rollback(session.length)  # empty again: the prefill profile
    session.feed(prompt[:2])
    assert calls[-1] == (0, 2, 0)
    assert greedy_generate(trt_branch, prompt, 16) == greedy_generate(branch, prompt, 16)
    with pytest.raises(EdgekitError, match="exceed the context length of 64"):
        session.feed(list(range(63)))


def test_tensorrt_branch_without_tensorrt_is_a_clear_error(bundle, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    with pytest.raises(EngineError, match="the TensorRT Python package does not import"):
        TensorRTBranch(bundle)


# --- on a machine with TensorRT and a GPU (scripts/gpu_check.sh) ---------------------------


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_tensorrt_branch_matches_onnxruntime(bundle, branch, prompt, tmp_path):
    """The real engine for this GPU against the ONNX Runtime branch: greedy tokens for 16 steps,
    and prefill / decode / k-after-prefix / rollback logits close. The float graph is built
    with FP16 on TensorRT 10, so logits agree to fp16 accuracy, and a greedy step may differ
    only where ONNX Runtime's top two logits are a near tie."""
    from edgekit.engine.builder import cuda_device
    from edgekit.engine.prepare import prepare_engine
    from edgekit.engine.options import BuildOptions
    from edgekit.targets import Target, list_targets, load_target

    copy = tmp_path / "tiny"
    shutil.copytree(bundle, copy)
    _, cc = cuda_device()
    here = next((t for t in list_targets() if t.compute_capability == cc), None)
    if here is None:  # a GPU without a profile: a copy of the H100 profile with this compute capability
        here = Target.model_validate({**load_target("workstation-h100").model_dump(mode="json"), "name": "this-gpu",
                                      "compute_capability": cc, "supported_precisions": ["fp32", "fp16"]})
    assert prepare_engine(copy, here, BuildOptions(max_prefill=64, workspace_gb=1), build="always")["status"] == "built"
    trt_branch = load_branch(copy, name="small", target=here.name)
    assert isinstance(trt_branch, TensorRTBranch)
    tolerance = 2e-2
    session, reference = trt_branch.session(), branch.session()
    np.testing.assert_allclose(session.feed(prompt[:12]), reference.feed(prompt[:12]), rtol=0, atol=tolerance)
    np.testing.assert_allclose(session.feed(prompt[12:13]), reference.feed(prompt[12:13]), rtol=0, atol=tolerance)
    np.testing.assert_allclose(session.feed(prompt[13:17]), reference.feed(prompt[13:17]), rtol=0, atol=tolerance)
    session.rollback(3)
    reference.rollback(3)
    np.testing.assert_allclose(session.feed([3, 4]), reference.feed([3, 4]), rtol=0, atol=tolerance)

    expected = greedy_generate(branch, prompt, 16)
    got = greedy_generate(trt_branch, prompt, 16)
    if got != expected:
        step = next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)
        rows = fresh_rows(branch, prompt + expected[:step])[-1]
        top2 = np.sort(rows)[-2:]
        assert top2[1] - top2[0] < tolerance, f"greedy tokens differ at step {step} without a near tie: {got} vs {expected}"
