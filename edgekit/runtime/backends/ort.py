"""The ONNX Runtime branch: a bundle's ONNX decoder on ONNX Runtime (CPU by default), with a
copied KV cache (:class:`OnnxRuntimeSession`) or, for graphs whose attention appends to the
cache in place, one shared buffer per cache tensor (:class:`SharedBufferSession`).

numpy and onnxruntime are imported inside the classes; the graph is inspected with
:mod:`edgekit.runtime.onnx_graph` (no ``onnx``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgekit.errors import EdgekitError
from edgekit.runtime.backends.batched import PaddedBatchCache
from edgekit.runtime.backends.common import BundleBranch, SessionBase

if TYPE_CHECKING:
    import numpy as np


_ORT_FLOAT = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16"}


class OnnxRuntimeBranch(BundleBranch):
    """A bundle's ONNX decoder on ONNX Runtime (CPU by default).

    Graph: ``variant`` (a key of the manifest's ``onnx.variants``), else the ``onnxruntime``
    variant, else ``float``, else ``model.onnx``. ``threads`` sets intra-op threads (ONNX
    Runtime's default: one per physical core). ``context_length`` may cap the bundle's.
    ``spin_wait``: worker threads busy-wait between the kernels of one run and stop at its end
    (faster on a dedicated device; False sleeps instead, better on a host whose cores are busy).
    One ``InferenceSession`` is shared by all sessions of the branch (its ``run`` is thread
    safe); each session holds its own KV cache. When every ``present.*`` output comes straight
    from a ``GroupQueryAttention`` node (the fused graph, docs/export_fused.md) the cache is one
    buffer per tensor that the kernel appends to in place (``kv_cache == "shared_buffer"``:
    bound with IO binding, grown by doubling, rolled back by lowering the length); otherwise
    ``present.*`` of one run become ``past_key_values.*`` of the next (``"copied"``).
    """

    backend = "onnxruntime"

    def __init__(self, bundle_dir: str | Path, *, name: str = "small", variant: str | None = None,
                 threads: int | None = None, providers: list[Any] | None = None, context_length: int | None = None,
                 spin_wait: bool = True):
        import onnxruntime as ort

        super().__init__(bundle_dir, name=name, context_length=context_length)
        self.graph = self.bundle.graph("onnxruntime", variant=variant)
        if not self.graph.is_file():
            raise EdgekitError("the bundle's ONNX graph is missing", where=str(self.graph),
                               how="re-run the bundle stage, or copy the whole bundle directory")
        options = ort.SessionOptions()
        # Keep DequantizeLinear -> MatMul activations in float (see edgekit.measure.onnx_session:
        # ONNX Runtime's default int8-activation kernel moves logits away from TensorRT's).
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        # A decode step is hundreds of tiny kernels: workers that sleep between them pay a
        # wake-up per kernel, workers that spin after a run steal the cores from whatever runs
        # next (the other branch in speculative decoding, the sampler). So spin within a run
        # and stop at its end (force_spinning_stop). Measured on 2 quiet cores (fused graphs,
        # SmolLM2-135M): float large 29.4 -> 35.0 tok/s, INT4 small 79 -> 98, speculative
        # 44.5 -> 55.5; with another busy process on the cores spinning loses (43 -> 28 tok/s),
        # hence spin_wait=False (runtime.json "spin_wait": false).
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_wait else "0")
        options.add_session_config_entry("session.force_spinning_stop", "1")
        self.spin_wait = bool(spin_wait)
        if threads:
            options.intra_op_num_threads = int(threads)
        self.ort_session = ort.InferenceSession(str(self.graph), options, providers=providers or ["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.ort_session.get_inputs()}
        outputs = [o.name for o in self.ort_session.get_outputs()]
        if "input_ids" not in inputs or "logits" not in outputs:
            raise EdgekitError("the ONNX graph is not a decoder with input_ids -> logits", where=str(self.graph),
                               how="export with edgekit's export_onnx stage (optimum's text-generation-with-past layout)")
        self._has_mask = "attention_mask" in inputs
        self._has_positions = "position_ids" in inputs
        # (present output, past input) pairs: present.<i>.key becomes past_key_values.<i>.key.
        self._cache_pairs = [(o, o.replace("present.", "past_key_values.", 1)) for o in outputs if o.startswith("present.")]
        missing = [p for _, p in self._cache_pairs if p not in inputs]
        if missing or not self._cache_pairs:
            raise EdgekitError("the ONNX graph has no KV cache inputs/outputs (past_key_values.* / present.*)",
                               where=str(self.graph), how="export with task text-generation-with-past (edgekit's export_onnx does)")
        self._output_names = ["logits"] + [o for o, _ in self._cache_pairs]
        self._empty_cache = {}
        for _, past in self._cache_pairs:
            shape = inputs[past].shape  # [batch, kv_heads, past_len, head_dim]
            self._empty_cache[past] = ((int(shape[1]), int(shape[3])), _ORT_FLOAT.get(inputs[past].type, "float32"))
        self.kv_cache = "shared_buffer" if appends_in_place(self.graph, [o for o, _ in self._cache_pairs]) else "copied"
        logits_dim = self.ort_session.get_outputs()[outputs.index("logits")].shape[-1]
        self.vocab_size = int(logits_dim) if isinstance(logits_dim, int) else (self._config_vocab() or len(self.tokenizer))

    def session(self) -> OnnxRuntimeSession | SharedBufferSession:
        return SharedBufferSession(self) if self.kv_cache == "shared_buffer" else OnnxRuntimeSession(self)

    def batch_cache(self, max_rows: int) -> FusedBatchCache | CopiedBatchCache:
        """The KV layout of up to ``max_rows`` streams decoded in one forward pass
        (:class:`~edgekit.runtime.backends.batched.BatchedBranch`): one buffer with a row per
        stream for the fused graph, a padded batch cache for a copying graph."""
        if not (self._has_mask and self._has_positions):
            raise EdgekitError("this ONNX graph has no attention_mask / position_ids input: streams of different "
                               "lengths cannot share a batch", where=str(self.graph),
                               how="export with edgekit's export_onnx stage, or set batching.max_batch 1")
        return FusedBatchCache(self, max_rows) if self.kv_cache == "shared_buffer" else CopiedBatchCache(self, max_rows)


def appends_in_place(graph: Path, presents: list[str]) -> bool:
    """True when every ``present.*`` output is a GroupQueryAttention output: that kernel
    appends the new keys/values to its ``past`` input in place when ``past`` and ``present``
    are the same buffer (ONNX Runtime checks the pointers), so one buffer holds the cache."""
    from edgekit.runtime.onnx_graph import MalformedGraph, read_graph_nodes

    # Graphs that keep their weights inside model.onnx (optimum's, up to 2 GB) are never the
    # fused kind, which always writes them to model.onnx_data: do not read them twice.
    if graph.stat().st_size > 64 << 20:
        return False
    try:  # the protobuf read directly: importing onnx would cost ~0.5 s of start-up
        nodes = read_graph_nodes(graph)
    except (OSError, MalformedGraph):  # an unreadable graph fails in InferenceSession already
        return False
    made_by_gqa = {out for op_type, outputs in nodes if op_type == "GroupQueryAttention" for out in outputs}
    return bool(presents) and all(name in made_by_gqa for name in presents)


class OnnxRuntimeSession(SessionBase):
    """A :class:`LogitsSession` on an :class:`OnnxRuntimeBranch`: the KV cache is numpy arrays,
    ``present.*`` of one call become ``past_key_values.*`` of the next."""

    def __init__(self, branch: OnnxRuntimeBranch):
        import numpy as np

        super().__init__(branch)
        self._run = branch.ort_session.run
        self._cache = {name: np.zeros((1, heads, 0, dim), dtype=dtype) for name, ((heads, dim), dtype) in branch._empty_cache.items()}

    def _forward(self, ids: list[int]) -> np.ndarray:
        import numpy as np

        branch, past, count = self._branch, self.length, len(ids)
        feeds = {"input_ids": np.asarray([ids], dtype=np.int64)}
        if branch._has_mask:
            feeds["attention_mask"] = np.ones((1, past + count), dtype=np.int64)
        if branch._has_positions:
            feeds["position_ids"] = np.arange(past, past + count, dtype=np.int64)[None, :]
        feeds.update(self._cache)
        logits, *present = self._run(branch._output_names, feeds)
        self._cache = {past_name: value for (_, past_name), value in zip(branch._cache_pairs, present)}
        self.length += count
        rows = logits[0]
        return rows if rows.dtype == np.float32 else rows.astype(np.float32)

    def _truncate(self, keep: int) -> None:
        import numpy as np

        # A slice along axis 2 is a strided view; ONNX Runtime wants contiguous buffers, and a
        # copy here (once per rejection) is cheaper than a copy inside every later run.
        self._cache = {name: np.ascontiguousarray(value[:, :, :keep]) for name, value in self._cache.items()}

    def _release(self) -> None:
        self._cache = {}

    def kv_snapshot(self, start: int, stop: int) -> dict[str, Any]:
        """A copy of cache entries ``start..stop-1`` (prompt-prefix reuse)."""
        return {name: value[:, :, start:stop].copy() for name, value in self._cache.items()}

    def kv_restore(self, blocks: list[dict[str, Any]], length: int) -> None:
        """Start from the first ``length`` entries of consecutive snapshots (joined: a new array)."""
        import numpy as np

        cache = {}
        for name in self._cache:
            joined = np.concatenate([block[name] for block in blocks], axis=2)
            cache[name] = joined if joined.shape[2] == length else np.ascontiguousarray(joined[:, :, :length])
        self._cache = cache


class SharedBufferSession(SessionBase):
    """A :class:`LogitsSession` for graphs whose attention appends to the cache in place
    (``OnnxRuntimeBranch.kv_cache == "shared_buffer"``): one preallocated buffer per cache
    tensor is bound as both ``past_key_values.*`` and ``present.*``, so a step copies nothing
    but its logits (the copying session moves the whole cache in and out of every run:
    ~1 ms a step on SmolLM2-135M at 150 tokens). The valid length is the attention mask's;
    entries past it are stale and ignored, so a rollback only lowers the length."""

    _FIRST_CAPACITY = 256

    def __init__(self, branch: OnnxRuntimeBranch):
        super().__init__(branch)
        self._io = branch.ort_session.io_binding()
        self._capacity = 0
        self._arrays: dict[str, Any] = {}

    def _reserve(self, needed: int) -> None:
        """Grow every buffer (doubling, capped at the context length) to hold ``needed`` tokens,
        keeping the valid entries, and bind the new buffers."""
        import numpy as np
        import onnxruntime as ort

        branch = self._branch
        capacity = max(self._capacity, self._FIRST_CAPACITY)
        while capacity < needed:
            capacity *= 2
        capacity = min(capacity, max(needed, self.context_length))
        for (present, past), ((heads, dim), dtype) in zip(branch._cache_pairs, (branch._empty_cache[p] for _, p in branch._cache_pairs)):
            array = np.zeros((1, heads, capacity, dim), dtype=dtype)
            if past in self._arrays:
                array[:, :, : self.length] = self._arrays[past][:, :, : self.length]
            self._arrays[past] = array
            value = ort.OrtValue.ortvalue_from_numpy(array)  # shares the numpy memory
            self._io.bind_ortvalue_input(past, value)
            self._io.bind_ortvalue_output(present, value)
        self._capacity = capacity

    def _forward(self, ids: list[int]) -> np.ndarray:
        import numpy as np

        branch, past, count = self._branch, self.length, len(ids)
        if past + count > self._capacity:
            self._reserve(past + count)
        io = self._io
        io.bind_cpu_input("input_ids", np.asarray([ids], dtype=np.int64))
        if branch._has_mask:
            io.bind_cpu_input("attention_mask", np.ones((1, past + count), dtype=np.int64))
        if branch._has_positions:
            io.bind_cpu_input("position_ids", np.arange(past, past + count, dtype=np.int64)[None, :])
        io.bind_output("logits")
        branch.ort_session.run_with_iobinding(io)
        logits = io.get_outputs()[-1].numpy()  # logits is bound last
        self.length += count
        rows = logits[0]
        return rows if rows.dtype == np.float32 else rows.astype(np.float32)

    def _truncate(self, keep: int) -> None:
        pass  # the kernel attends to the mask's length only; later entries are overwritten

    def _release(self) -> None:
        self._io.clear_binding_inputs()
        self._io.clear_binding_outputs()
        self._arrays = {}
        self._capacity = 0

    def kv_snapshot(self, start: int, stop: int) -> dict[str, Any]:
        """A copy of cache entries ``start..stop-1`` (prompt-prefix reuse)."""
        return {name: array[:, :, start:stop].copy() for name, array in self._arrays.items()}

    def kv_restore(self, blocks: list[dict[str, Any]], length: int) -> None:
        """Start from the first ``length`` entries of consecutive snapshots, copied into this
        session's buffers (the kernel writes them)."""
        if length > self._capacity:
            self._reserve(length)
        position = 0
        for block in blocks:
            count = min(next(iter(block.values())).shape[2], length - position)
            for name, value in block.items():
                self._arrays[name][:, :, position:position + count] = value[:, :, :count]
            position += count


class FusedBatchCache:
    """The batch layout for the fused graph (``kv_cache == "shared_buffer"``): one buffer per
    cache tensor, ``[row capacity, kv_heads, capacity, head_dim]``, row ``i`` one stream's
    cache with its own length. A step binds rows ``0..k-1`` (a leading slice: contiguous, no
    copy) as both past and present, with ``attention_mask`` ``[k, longest + 1]`` right-padded
    to each row's length + 1: GroupQueryAttention reads every row's length from it
    (``seqlens_k = sum(mask) - 1``), rotates at that position and appends in place there, so
    each row gets exactly what it gets alone. A prefill or a verification runs alone at batch 1
    on the row's slice. Entries past a row's length are stale and never read."""

    _FIRST_CAPACITY = 256

    def __init__(self, branch: OnnxRuntimeBranch, max_rows: int):
        self.branch = branch
        self.max_rows = int(max_rows)
        self.lengths: list[int] = []
        self._arrays: dict[str, Any] = {}
        self._row_capacity = 0
        self._capacity = 0
        self._bindings: dict[tuple[str, int], Any] = {}  # ("step", k) / ("row", i) -> IO binding; reset when buffers move

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def length(self, row: int) -> int:
        return self.lengths[row]

    def _reserve(self, rows: int, needed: int) -> None:
        import numpy as np

        row_capacity, capacity = max(self._row_capacity, 1), max(self._capacity, self._FIRST_CAPACITY)
        while row_capacity < rows:
            row_capacity *= 2
        row_capacity = min(row_capacity, self.max_rows)
        while capacity < needed:
            capacity *= 2
        capacity = min(capacity, max(needed, self.branch.context_length))
        if row_capacity == self._row_capacity and capacity == self._capacity:
            return
        keep = max(self.lengths, default=0)
        for _, past in self.branch._cache_pairs:
            (heads, dim), dtype = self.branch._empty_cache[past]
            array = np.zeros((row_capacity, heads, capacity, dim), dtype=dtype)
            if past in self._arrays and self.rows:
                array[: self.rows, :, :keep] = self._arrays[past][: self.rows, :, :keep]
            self._arrays[past] = array
        self._row_capacity, self._capacity = row_capacity, capacity
        self._bindings.clear()

    def _binding(self, kind: str, start: int, stop: int) -> Any:
        import onnxruntime as ort

        key = (kind, stop - start if kind == "step" else start)
        io = self._bindings.get(key)
        if io is None:
            io = self.branch.ort_session.io_binding()
            for present, past in self.branch._cache_pairs:
                value = ort.OrtValue.ortvalue_from_numpy(self._arrays[past][start:stop])  # shares the numpy memory
                io.bind_ortvalue_input(past, value)
                io.bind_ortvalue_output(present, value)
            self._bindings[key] = io
        return io

    def _run(self, io: Any, ids: Any, mask: Any, positions: Any) -> Any:
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("attention_mask", mask)
        io.bind_cpu_input("position_ids", positions)
        io.bind_output("logits")
        self.branch.ort_session.run_with_iobinding(io)
        return io.get_outputs()[-1].numpy()  # logits is bound last

    def add(self) -> int:
        self._reserve(self.rows + 1, 1)
        self.lengths.append(0)
        return self.rows - 1

    def remove(self, row: int) -> None:
        last = self.rows - 1
        if row != last:
            count = self.lengths[last]
            for array in self._arrays.values():
                array[row, :, :count] = array[last, :, :count]
            self.lengths[row] = count
        self.lengths.pop()

    def swap(self, a: int, b: int) -> None:
        if a == b:
            return
        count = max(self.lengths[a], self.lengths[b])
        for array in self._arrays.values():
            held = array[a, :, :count].copy()
            array[a, :, :count] = array[b, :, :count]
            array[b, :, :count] = held
        self.lengths[a], self.lengths[b] = self.lengths[b], self.lengths[a]

    def truncate(self, row: int, keep: int) -> None:
        self.lengths[row] = keep  # the kernel attends to the mask's length only

    def snapshot(self, row: int, start: int, stop: int) -> dict[str, Any]:
        """A copy of the row's cache entries ``start..stop-1`` (prompt-prefix reuse)."""
        return {name: array[row : row + 1, :, start:stop].copy() for name, array in self._arrays.items()}

    def restore(self, row: int, blocks: list[dict[str, Any]], length: int) -> None:
        """Start the empty ``row`` from the first ``length`` entries of consecutive snapshots,
        copied into the row's slice (the snapshots are only read)."""
        self._reserve(self.rows, length)
        position = 0
        for block in blocks:
            count = min(next(iter(block.values())).shape[2], length - position)
            if count <= 0:
                break
            for name, value in block.items():
                self._arrays[name][row, :, position : position + count] = value[0, :, :count]
            position += count
        self.lengths[row] = length

    def feed_alone(self, row: int, ids: list[int]) -> Any:
        import numpy as np

        past, count = self.lengths[row], len(ids)
        self._reserve(self.rows, past + count)
        io = self._binding("row", row, row + 1)
        logits = self._run(io, np.asarray([ids], dtype=np.int64), np.ones((1, past + count), dtype=np.int64),
                           np.arange(past, past + count, dtype=np.int64)[None, :])
        self.lengths[row] += count
        return logits[0]

    def step(self, tokens: list[int]) -> Any:
        import numpy as np

        k = len(tokens)
        lengths = np.asarray(self.lengths[:k], dtype=np.int64)
        width = int(lengths.max()) + 1
        self._reserve(self.rows, width)
        mask = (np.arange(width, dtype=np.int64)[None, :] <= lengths[:, None]).astype(np.int64)
        logits = self._run(self._binding("step", 0, k), np.asarray(tokens, dtype=np.int64)[:, None], mask, lengths[:, None])
        for i in range(k):
            self.lengths[i] += 1
        return logits[:, 0]

    def close(self) -> None:
        self._bindings.clear()
        self._arrays = {}


class CopiedBatchCache(PaddedBatchCache):
    """The batch layout for a graph that copies its cache (optimum's): the padded batch cache
    of :class:`~edgekit.runtime.backends.batched.PaddedBatchCache` on numpy arrays, run by the
    branch's ONNX Runtime session (``present.*`` of a step replace the cache)."""

    def __init__(self, branch: OnnxRuntimeBranch, max_rows: int):
        super().__init__([past for _, past in branch._cache_pairs], branch._empty_cache, max_rows)
        self.branch = branch

    def _outputs(self, feeds: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        branch = self.branch
        logits, *present = branch.ort_session.run(branch._output_names, feeds)
        return logits, {past: value for (_, past), value in zip(branch._cache_pairs, present)}

    def _run_alone(self, ids: list[int], past: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        import numpy as np

        length, count = next(iter(past.values())).shape[2], len(ids)
        feeds = {"input_ids": np.asarray([ids], dtype=np.int64), "attention_mask": np.ones((1, length + count), dtype=np.int64),
                 "position_ids": np.arange(length, length + count, dtype=np.int64)[None, :], **past}
        logits, present = self._outputs(feeds)
        return logits[0], present

    def _run_step(self, tokens: list[int], mask: Any, positions: Any, past: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        import numpy as np

        feeds = {"input_ids": np.asarray(tokens, dtype=np.int64)[:, None], "attention_mask": mask, "position_ids": positions, **past}
        logits, present = self._outputs(feeds)
        return logits[:, 0], present
