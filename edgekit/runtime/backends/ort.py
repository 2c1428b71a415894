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
