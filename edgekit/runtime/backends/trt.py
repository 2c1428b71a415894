"""The TensorRT branch: a bundle's TensorRT engine for one target on CUDA device 0, its KV
cache as torch CUDA tensors (:class:`TensorRTSession`).

tensorrt and torch are imported inside the classes, so importing this module costs neither.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgekit.errors import EngineError
from edgekit.runtime.backends.batched import PaddedBatchCache
from edgekit.runtime.backends.common import BundleBranch, SessionBase

if TYPE_CHECKING:
    import numpy as np


def _torch_dtype(trt: Any, dtype: Any) -> Any:
    import torch

    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int32": torch.int32,
             "int64": torch.int64, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool}
    for name, torch_type in table.items():
        if getattr(trt, name, None) is not None and dtype == getattr(trt, name):
            return torch_type
    raise EngineError(f"the engine has an I/O tensor of type {dtype} that edgekit cannot feed", where="TensorRT engine",
                      how="export the decoder with edgekit's export_onnx stage and rebuild the engine")


class TensorRTBranch(BundleBranch):
    """A bundle's TensorRT engine for ``target`` (default: the bundle's target), on CUDA device 0.

    The engine (built by ``edgekit build-engine`` / ``build_engine.sh``) has two optimization
    profiles (:mod:`edgekit.engine.settings`): 0 = prefill (past length 0, 1..max_prefill
    tokens), 1 = decode (one token after 1..context-1). A feed that no profile takes at once
    is split: a prompt longer than max_prefill runs as a prefill chunk then decode steps, and
    k tokens after a non-empty cache (speculative verification) run as k decode steps. The
    logits are the same either way; verification is then not faster than k decode steps
    (an engine profile for "k tokens after a past" would make it one call).

    The KV cache stays on the GPU as torch tensors. All sessions share one execution context
    (one activation workspace, which matters on an 8 GB Jetson) and one CUDA stream; their
    forward passes are serialized by a lock.
    """

    backend = "tensorrt"
    device_type = "cuda"

    def __init__(self, bundle_dir: str | Path, target: str | None = None, *, name: str = "small",
                 context_length: int | None = None):
        try:
            import tensorrt as trt
        except Exception as exc:  # ImportError, or OSError from a broken CUDA/TensorRT install
            raise EngineError(f"the TensorRT Python package does not import ({type(exc).__name__}: {exc})",
                              where="import tensorrt",
                              how="pip install 'edgekit[gpu]' on an x86-64 CUDA machine (JetPack provides it on Jetson), "
                              "or use the onnxruntime backend") from None
        import torch

        from edgekit.engine.record import load_engine

        super().__init__(bundle_dir, name=name, context_length=context_length)
        self.target = target or self.bundle.target(error_cls=EngineError)
        if not self.target:
            raise EngineError("the bundle names no target", where=str(self.bundle_dir / "manifest.json"),
                              how="pass target= (the name used with edgekit build-engine)")
        self.device = torch.device(self.device_type, 0)
        self.engine = load_engine(self.bundle_dir, self.target)
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise EngineError("TensorRT could not create an execution context (out of GPU memory?)",
                              where=f"engine/{self.target}.plan", how="free GPU memory, or rebuild with a smaller max_prefill")
        self.stream = self._new_stream()
        self.lock = threading.Lock()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.cache_pairs = [(o, o.replace("present.", "past_key_values.", 1)) for o in self.output_names if o.startswith("present.")]
        if "input_ids" not in self.input_names or "logits" not in self.output_names or not self.cache_pairs:
            raise EngineError("the engine is not a decoder with input_ids -> logits and a KV cache", where=f"engine/{self.target}.plan",
                              how="build it from the bundle's graph (edgekit build-engine)")
        # [batch, kv_heads, past, head_dim]: heads and head_dim are static in optimum's export.
        self.cache_dims = {p: (int(self.engine.get_tensor_shape(p)[1]), int(self.engine.get_tensor_shape(p)[3]))
                           for _, p in self.cache_pairs}
        # profile index -> input name -> (min shape, max shape)
        self.profiles = []
        for index in range(self.engine.num_optimization_profiles):
            shapes = {}
            for name in self.input_names:
                low, _opt, high = self.engine.get_tensor_profile_shape(name, index)
                shapes[name] = (tuple(low), tuple(high))
            self.profiles.append(shapes)
        logits_dim = int(self.engine.get_tensor_shape("logits")[-1])
        self.vocab_size = logits_dim if logits_dim > 0 else (self._config_vocab() or len(self.tokenizer))
        # TensorRT wants a non-null address for every I/O tensor; an empty past (prefill) has
        # no storage, so it points at this small buffer instead (never read: zero elements).
        self._placeholder = torch.empty(256, dtype=torch.uint8, device=self.device)

    def session(self) -> TensorRTSession:
        return TensorRTSession(self)

    # The device type, the stream and entering it are the only CUDA-specific parts: the tests
    # run this class's logic on the CPU with a stand-in engine by overriding these three.
    def _new_stream(self) -> Any:
        import torch

        return torch.cuda.Stream(device=self.device)

    def on_stream(self) -> Any:
        """A context in which torch work is queued on the branch's stream (the engine's)."""
        import torch

        return torch.cuda.stream(self.stream)

    def input_shapes(self, count: int, past: int, batch: int = 1) -> dict[str, tuple[int, ...]]:
        """The input shapes of one forward pass of ``count`` tokens after ``past`` (for each of
        ``batch`` rows: a batched step pads every row to the same ``past``)."""
        shapes = {}
        for name in self.input_names:
            if name == "attention_mask":
                shapes[name] = (batch, past + count)
            elif name in ("input_ids", "position_ids"):
                shapes[name] = (batch, count)
            elif name in self.cache_dims:
                heads, dim = self.cache_dims[name]
                shapes[name] = (batch, heads, past, dim)
            else:
                raise EngineError(f"the engine has an input edgekit does not know how to fill: {name}",
                                  where=f"engine/{self.target}.plan", how="export with edgekit's export_onnx stage")
        return shapes

    def _fits(self, index: int, shapes: dict[str, tuple[int, ...]]) -> bool:
        ranges = self.profiles[index]
        return all(all(lo <= d <= hi for d, lo, hi in zip(shape, ranges[n][0], ranges[n][1])) for n, shape in shapes.items())

    def batch_rows(self) -> int:
        """The most rows one decode step of the engine takes (its profiles' largest batch for
        a single token after a past; ``build_engine`` ``max_batch``)."""
        return max((ranges["input_ids"][1][0] for ranges in self.profiles
                    if ranges["input_ids"][0][1] <= 1 <= ranges["input_ids"][1][1]), default=1)

    def step_profile(self, batch: int, past: int) -> int:
        """The profile for one batched decode step: ``batch`` rows of one token after ``past``."""
        for index in range(len(self.profiles)):
            if self._fits(index, self.input_shapes(1, past, batch)):
                return index
        raise EngineError(f"no optimization profile of the engine takes {batch} row(s) of one token after {past} cached ones",
                          where=f"engine/{self.target}.plan",
                          how="rebuild the engine with build_engine max_batch >= the serve batch (or batching.max_batch 1)")

    def batch_cache(self, max_rows: int) -> TensorRTBatchCache:
        """The KV layout of up to ``max_rows`` streams decoded in one forward pass
        (:class:`~edgekit.runtime.backends.batched.BatchedBranch`), capped at the engine's batch."""
        return TensorRTBatchCache(self, min(int(max_rows), self.batch_rows()))

    def execute(self, profile: int, tensors: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
        """One ``execute_async_v3`` on the branch's stream (entered by the caller): select
        ``profile``, bind ``tensors`` at ``shapes``, allocate every output at the shape TensorRT
        infers. Returns the outputs by name; the inputs must stay alive until the stream has
        run (torch's caching allocator reuses a freed block only for later work on the same
        stream, so the caller may drop them once this returns)."""
        import torch

        context, handle, where = self.context, self.stream.cuda_stream, f"engine/{self.target}.plan"
        rebuild = "rebuild the engine (edgekit build-engine)"
        if context.active_optimization_profile != profile:
            # Switching profiles invalidates the input shapes; all are set again below.
            if not context.set_optimization_profile_async(profile, handle):
                raise EngineError(f"TensorRT could not switch to optimization profile {profile}", where=where, how=rebuild)
        for name, shape in shapes.items():
            tensor = tensors[name]
            if not context.set_input_shape(name, shape):
                raise EngineError(f"TensorRT refused the shape {shape} for {name} in profile {profile}", where=where,
                                  how=rebuild)
            context.set_tensor_address(name, tensor.data_ptr() if tensor.numel() else self._placeholder.data_ptr())
        outputs = {}
        for name in self.output_names:
            shape = tuple(context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise EngineError(f"TensorRT could not infer the shape of output {name}: {shape}", where=where, how=rebuild)
            outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            context.set_tensor_address(name, outputs[name].data_ptr() if outputs[name].numel() else self._placeholder.data_ptr())
        if not context.execute_async_v3(handle):
            raise EngineError("TensorRT failed to run the engine", where=where,
                              how="run with the TensorRT logger at VERBOSE to see why; rebuild the engine if it persists")
        return outputs

    def plan(self, remaining: int, past: int) -> tuple[int, int]:
        """(profile index, tokens) for the next forward pass: the profile that takes the most of
        the ``remaining`` tokens after ``past`` in one call."""
        best: tuple[int, int] | None = None
        for index, ranges in enumerate(self.profiles):
            low, high = ranges["input_ids"]
            count = min(remaining, high[1])
            if count < max(1, low[1]):
                continue
            fits = all(all(lo <= d <= hi for d, lo, hi in zip(shape, ranges[n][0], ranges[n][1]))
                       for n, shape in self.input_shapes(count, past).items())
            if fits and (best is None or count > best[1]):
                best = (index, count)
        if best is None:
            raise EngineError(f"no optimization profile of the engine takes a token after {past} cached ones",
                              where=f"engine/{self.target}.plan",
                              how="rebuild the engine with this bundle's context_length (edgekit build-engine)")
        return best


class TensorRTSession(SessionBase):
    """A :class:`LogitsSession` on a :class:`TensorRTBranch` (KV cache: torch CUDA tensors)."""

    def __init__(self, branch: TensorRTBranch):
        import torch

        super().__init__(branch)
        with branch.on_stream():
            self._cache = {past: torch.empty((1, heads, 0, dim), dtype=branch.dtypes[past], device=branch.device)
                           for past, (heads, dim) in branch.cache_dims.items()}

    def _forward(self, ids: list[int]) -> np.ndarray:
        import torch

        rows, start, before = [], 0, self.length
        branch = self._branch
        with branch.lock, branch.on_stream():
            try:
                while start < len(ids):
                    profile, count = branch.plan(len(ids) - start, self.length)
                    rows.append(self._run(ids[start:start + count], profile))
                    start += count
            except BaseException:
                # A feed is all or nothing: drop the chunks that did run before the failure.
                if self.length > before:
                    self._truncate(before)
                    self.length = before
                raise
            logits = rows[0] if len(rows) == 1 else torch.cat(rows)
            # .cpu() on the current (our) stream waits for the engine's work to finish.
            return logits.float().cpu().numpy()

    def _run(self, ids: list[int], profile: int) -> Any:
        """One execute_async_v3 of ``ids`` after the cache, on the branch's stream (entered by
        the caller, so every torch op below is ordered with the engine's work)."""
        import torch

        branch = self._branch
        past, count = self.length, len(ids)
        device, dtypes = branch.device, branch.dtypes
        tensors = {"input_ids": torch.tensor([ids], dtype=dtypes["input_ids"], device=device)}
        if "attention_mask" in dtypes:
            tensors["attention_mask"] = torch.ones((1, past + count), dtype=dtypes["attention_mask"], device=device)
        if "position_ids" in dtypes:
            tensors["position_ids"] = torch.arange(past, past + count, dtype=dtypes["position_ids"], device=device)[None, :]
        tensors.update(self._cache)
        outputs = branch.execute(profile, tensors, branch.input_shapes(count, past))
        # The inputs' storage must outlive the asynchronous execution: torch's caching
        # allocator reuses a freed block only for later work on the same stream, which runs
        # after the engine, so letting `tensors` go out of scope here is safe.
        self._cache = {past_name: outputs[present] for present, past_name in branch.cache_pairs}
        self.length += count
        return outputs["logits"][0]

    def _truncate(self, keep: int) -> None:
        # narrow() is a strided view along the sequence axis; TensorRT reads dense buffers.
        with self._branch.on_stream():
            self._cache = {name: value.narrow(2, 0, keep).contiguous() for name, value in self._cache.items()}

    def _release(self) -> None:
        self._cache = {}

    def kv_snapshot(self, start: int, stop: int) -> dict[str, Any]:
        """A copy of cache entries ``start..stop-1`` (prompt-prefix reuse), on the GPU (a
        Jetson's memory is the host's). A session restored from snapshots runs the rest of its
        prompt as decode steps: the engine's prefill profile takes an empty past only."""
        import torch

        with self._branch.on_stream():
            return {name: value.narrow(2, start, stop - start).clone(memory_format=torch.contiguous_format)
                    for name, value in self._cache.items()}

    def kv_restore(self, blocks: list[dict[str, Any]], length: int) -> None:
        """Start from the first ``length`` entries of consecutive snapshots (joined: a new tensor)."""
        import torch

        with self._branch.on_stream():
            cache = {}
            for name in self._cache:
                joined = torch.cat([block[name] for block in blocks], dim=2)
                cache[name] = joined if joined.shape[2] == length else joined.narrow(2, 0, length).contiguous()
            self._cache = cache



class TensorRTBatchCache(PaddedBatchCache):
    """The padded batch cache (:class:`~edgekit.runtime.backends.batched.PaddedBatchCache`:
    optimum's graph copies its cache) as torch tensors on the GPU, run by the branch's engine:
    a step is one ``execute_async_v3`` with the batch dimension set to the step's rows (the
    decode profile's batch range, ``build_engine`` ``max_batch``), ``attention_mask``
    ``[rows, width + 1]`` with zeros over each row's padding and holes and ``position_ids`` each
    row's own length. A prefill or a verification runs the row alone through
    :class:`TensorRTSession`'s chunking (batch 1). Every operation holds the branch's lock and
    queues its torch work on the engine's stream."""

    def __init__(self, branch: TensorRTBranch, max_rows: int):
        dims = {past: ((heads, dim), branch.dtypes[past]) for past, (heads, dim) in branch.cache_dims.items()}
        super().__init__(list(branch.cache_dims), dims, max_rows)
        self.branch = branch
        self.max_width = branch.context_length - 1  # the decode profile's largest past

    def _zeros(self, name: str, rows: int, width: int) -> Any:
        import torch

        (heads, dim), dtype = self.dims[name]
        return torch.zeros((rows, heads, width, dim), dtype=dtype, device=self.branch.device)

    def _copy(self, value: Any) -> Any:
        return value.clone()

    def _index(self, columns: Any) -> Any:
        import torch

        return torch.as_tensor(columns, dtype=torch.long, device=self.branch.device)

    def _dense(self, value: Any) -> Any:
        return value.contiguous()

    def _cat(self, values: list[Any], length: int) -> Any:
        import torch

        return torch.cat(values, dim=2).narrow(2, 0, length)

    def _guarded(self, method: str, *args: Any) -> Any:
        branch = self.branch
        with branch.lock, branch.on_stream():
            return getattr(PaddedBatchCache, method)(self, *args)

    def add(self) -> int:
        return self._guarded("add")

    def remove(self, row: int) -> None:
        self._guarded("remove", row)

    def swap(self, a: int, b: int) -> None:
        self._guarded("swap", a, b)

    def truncate(self, row: int, keep: int) -> None:
        self._guarded("truncate", row, keep)

    def snapshot(self, row: int, start: int, stop: int) -> dict[str, Any]:
        return self._guarded("snapshot", row, start, stop)

    def restore(self, row: int, blocks: list[dict[str, Any]], length: int) -> None:
        self._guarded("restore", row, blocks, length)

    def feed_alone(self, row: int, ids: list[int]) -> Any:
        return self._guarded("feed_alone", row, ids)

    def step(self, tokens: list[int]) -> Any:
        return self._guarded("step", tokens)

    def _run_alone(self, ids: list[int], past: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        import torch

        branch = self.branch
        session = TensorRTSession(branch)
        session._cache, session.length = past, int(next(iter(past.values())).shape[2])
        rows, start = [], 0
        while start < len(ids):  # TensorRTSession._forward's chunking, under the lock already held
            profile, count = branch.plan(len(ids) - start, session.length)
            rows.append(session._run(ids[start:start + count], profile))
            start += count
        logits = rows[0] if len(rows) == 1 else torch.cat(rows)
        return logits.float().cpu().numpy(), session._cache

    def _run_step(self, tokens: list[int], mask: Any, positions: Any, past: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        import torch

        branch = self.branch
        device, dtypes = branch.device, branch.dtypes
        batch, width = len(tokens), int(mask.shape[1]) - 1
        tensors = {"input_ids": torch.tensor([[t] for t in tokens], dtype=dtypes["input_ids"], device=device)}
        if "attention_mask" in dtypes:
            tensors["attention_mask"] = torch.as_tensor(mask, device=device).to(dtypes["attention_mask"])
        if "position_ids" in dtypes:
            tensors["position_ids"] = torch.as_tensor(positions, device=device).to(dtypes["position_ids"])
        tensors.update(past)
        outputs = branch.execute(branch.step_profile(batch, width), tensors, branch.input_shapes(1, width, batch))
        # .cpu() on the engine's stream waits for the step; the inputs lived until then
        logits = outputs["logits"][:, 0].float().cpu().numpy()
        return logits, {past_name: outputs[present] for present, past_name in branch.cache_pairs}
