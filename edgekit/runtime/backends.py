"""Branches: the models the runtime can generate with, behind one small interface.

A *branch* is one model. A local branch (:class:`OnnxRuntimeBranch`, :class:`TensorRTBranch`)
loads a bundle directory and hands out :class:`LogitsSession` objects, each one generation
stream with its own KV cache::

    branch = load_branch("bundles/smollm2", name="small")        # TensorRT if built, else ORT
    session = branch.session()
    logits = session.feed(prompt_ids)          # prefill: [len(prompt_ids), vocab] float32
    logits = session.feed([token])             # decode:  [1, vocab]
    logits = session.feed(draft_tokens)        # speculative verification: [k, vocab]
    session.rollback(rejected)                 # drop the last tokens from the cache
    session.close()

``feed`` always runs the tokens after everything already in the cache, so feeding a prompt
at once, token by token, or in any split gives the same logits (up to float rounding): the
property speculative decoding relies on. ``rollback`` drops cache entries only; the caller
keeps the logits rows it already received.

A remote branch (:class:`RemoteBranch`) is an OpenAI-compatible ``/v1/completions`` endpoint
that returns text, not logits (``has_logits`` is False); any failure to reach it raises
:class:`BranchUnavailable` so a router can fall back to a local branch.

Nothing heavy is imported at module import: numpy, onnxruntime, torch and tensorrt are imported
by the branches that use them (torch by the TensorRT branch only). The tokenizer is
:class:`edgekit.runtime.tokenizer.BundleTokenizer` (``tokenizers``, no transformers), and the
graph is inspected with :mod:`edgekit.runtime.onnx_graph` (no ``onnx``).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from edgekit.bundle.manifest import Bundle
from edgekit.bundle.signing import require_trusted
from edgekit.errors import EdgekitError, EngineError

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "BACKENDS",
    "bundle_file",
    "bundle_target",
    "BranchUnavailable",
    "LocalBranch",
    "LogitsSession",
    "OnnxRuntimeBranch",
    "RemoteBranch",
    "TensorRTBranch",
    "greedy_generate",
    "load_branch",
]

#: values of ``load_branch(backend=...)``
BACKENDS = ("auto", "onnxruntime", "tensorrt")


class LogitsSession(Protocol):
    """One generation stream with its own KV cache (batch 1)."""

    vocab_size: int
    length: int  # tokens currently in the cache

    def feed(self, token_ids: Sequence[int]) -> np.ndarray:
        """Append ``token_ids`` after the cache, run one forward pass and return float32 logits
        of shape ``[len(token_ids), vocab_size]`` (row i: the distribution after token i)."""
        ...

    def rollback(self, n: int) -> None:
        """Drop the last ``n`` tokens from the cache (speculative rejection)."""
        ...

    def close(self) -> None: ...


class LocalBranch(Protocol):
    name: str
    backend: str
    vocab_size: int
    context_length: int
    tokenizer: Any

    def session(self) -> LogitsSession: ...


class BranchUnavailable(Exception):
    """A remote branch cannot answer (timeout, connection or HTTP error, malformed reply).

    Not an :class:`EdgekitError`: it is expected at run time and handled by falling back to
    another branch, not by the user editing something. ``url`` and ``cause`` are attributes;
    the message is one line naming both."""

    def __init__(self, url: str, cause: str):
        self.url = url
        self.cause = " ".join(str(cause).split())  # one line, whatever the server sent
        super().__init__(f"{url} is unavailable: {self.cause}")


# --- helpers shared by the local branches ---------------------------------------------------


def bundle_file(bundle_dir: Path, value: Any, *, what: str, where: str) -> Path:
    """``bundle_dir / value`` for a relative path that a bundle's manifest or runtime.json names
    (a graph file, ...), checked where it enters (:func:`edgekit.names.path_inside`: safe
    components, no '..', not absolute, inside the bundle once symlinks are followed)."""
    from edgekit.names import path_inside

    return path_inside(bundle_dir, value, what=what, where=where,
                       how="rebuild the bundle; a bundle names its files by relative paths inside it")


def bundle_target(manifest: Any, where: str) -> str | None:
    """The manifest's ``target`` (it names ``engine/<target>.plan``), checked as a safe name."""
    return manifest.target_name(where=where)


def _load_tokenizer(bundle_dir: Path) -> Any:
    """The bundle's tokenizer on ``tokenizers`` alone (:mod:`edgekit.runtime.tokenizer`): no
    transformers, no torch, and never code from the bundle (a bundle is data)."""
    from edgekit.runtime.tokenizer import BundleTokenizer

    return BundleTokenizer.from_dir(bundle_dir)


def _token_list(token_ids: Sequence[int], vocab_size: int) -> list[int]:
    ids = [int(t) for t in token_ids]
    if not ids:
        raise ValueError("feed() needs at least one token")
    low, high = min(ids), max(ids)
    if low < 0 or high >= vocab_size:
        raise ValueError(f"token id {low if low < 0 else high} is outside the vocabulary (0..{vocab_size - 1})")
    return ids


class _SessionBase:
    """Length bookkeeping, the context-length refusal and argument checks common to both
    local backends; subclasses implement ``_forward`` and ``_truncate``."""

    def __init__(self, branch: Any):
        self._branch = branch
        self.vocab_size: int = branch.vocab_size
        self.context_length: int = branch.context_length
        self.length = 0
        self._closed = False

    def feed(self, token_ids: Sequence[int]) -> np.ndarray:
        if self._closed:
            raise RuntimeError("this session is closed")
        ids = _token_list(token_ids, self.vocab_size)
        if self.length + len(ids) > self.context_length:
            raise EdgekitError(
                f"feeding {len(ids)} token(s) after the {self.length} in the cache would exceed the "
                f"context length of {self.context_length}",
                where=f"branch {self._branch.name} ({self._branch.backend})",
                how="shorten the prompt or max_new_tokens, or raise context_length in the recipe and recompress",
            )
        return self._forward(ids)

    def rollback(self, n: int) -> None:
        if self._closed:
            raise RuntimeError("this session is closed")
        n = int(n)
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot roll back {n} token(s): the cache holds {self.length}")
        if n:
            self._truncate(self.length - n)
            self.length -= n

    def close(self) -> None:
        self._closed = True
        self._release()

    def __enter__(self) -> _SessionBase:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _forward(self, ids: list[int]) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _truncate(self, keep: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _release(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class _BundleBranch:
    """What every local branch reads from the bundle: manifest, tokenizer, context length.
    ``bundle_dir`` may be a :class:`~edgekit.bundle.manifest.Bundle` already opened (its
    manifest is not read again)."""

    has_logits = True
    backend = "?"

    def __init__(self, bundle_dir: str | Path | Bundle, *, name: str, context_length: int | None):
        self.bundle_dir = Path(bundle_dir)
        self.name = name
        self.bundle = Bundle.open(bundle_dir)
        require_trusted(self.bundle)  # a machine with trusted keys loads only signed, unmodified bundles
        self.manifest = self.bundle.manifest
        # read_manifest checked it: an int in 1..2**24, or unset
        bundle_context = self.manifest.context_length or 2048
        # A cap below the bundle's context (memory on a small device, or tests); never above:
        # the engine profiles and the model were sized for the bundle's value.
        self.context_length = min(bundle_context, int(context_length)) if context_length else bundle_context
        self.tokenizer = _load_tokenizer(self.bundle_dir)

    def _config_vocab(self) -> int | None:
        path = self.bundle_dir / "config.json"
        if path.is_file():
            vocab = json.loads(path.read_text()).get("vocab_size")
            if vocab:
                return int(vocab)
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, bundle={str(self.bundle_dir)!r}, context={self.context_length})"


# --- ONNX Runtime ---------------------------------------------------------------------------


_ORT_FLOAT = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16"}


class OnnxRuntimeBranch(_BundleBranch):
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
        self.kv_cache = "shared_buffer" if _appends_in_place(self.graph, [o for o, _ in self._cache_pairs]) else "copied"
        logits_dim = self.ort_session.get_outputs()[outputs.index("logits")].shape[-1]
        self.vocab_size = int(logits_dim) if isinstance(logits_dim, int) else (self._config_vocab() or len(self.tokenizer))

    def session(self) -> OnnxRuntimeSession | SharedBufferSession:
        return SharedBufferSession(self) if self.kv_cache == "shared_buffer" else OnnxRuntimeSession(self)


def _appends_in_place(graph: Path, presents: list[str]) -> bool:
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


class OnnxRuntimeSession(_SessionBase):
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


class SharedBufferSession(_SessionBase):
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


# --- TensorRT -------------------------------------------------------------------------------


def _torch_dtype(trt: Any, dtype: Any) -> Any:
    import torch

    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int32": torch.int32,
             "int64": torch.int64, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool}
    for name, torch_type in table.items():
        if getattr(trt, name, None) is not None and dtype == getattr(trt, name):
            return torch_type
    raise EngineError(f"the engine has an I/O tensor of type {dtype} that edgekit cannot feed", where="TensorRT engine",
                      how="export the decoder with edgekit's export_onnx stage and rebuild the engine")


class TensorRTBranch(_BundleBranch):
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

    def input_shapes(self, count: int, past: int) -> dict[str, tuple[int, ...]]:
        """The input shapes of one forward pass of ``count`` tokens after ``past``."""
        shapes = {}
        for name in self.input_names:
            if name == "attention_mask":
                shapes[name] = (1, past + count)
            elif name in ("input_ids", "position_ids"):
                shapes[name] = (1, count)
            elif name in self.cache_dims:
                heads, dim = self.cache_dims[name]
                shapes[name] = (1, heads, past, dim)
            else:
                raise EngineError(f"the engine has an input edgekit does not know how to fill: {name}",
                                  where=f"engine/{self.target}.plan", how="export with edgekit's export_onnx stage")
        return shapes

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


class TensorRTSession(_SessionBase):
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

        branch, context = self._branch, self._branch.context
        handle = branch.stream.cuda_stream
        past, count = self.length, len(ids)
        if context.active_optimization_profile != profile:
            # Switching profiles invalidates the input shapes; all are set again below.
            if not context.set_optimization_profile_async(profile, handle):
                raise EngineError(f"TensorRT could not switch to optimization profile {profile}",
                                  where=f"engine/{branch.target}.plan", how="rebuild the engine (edgekit build-engine)")
        device, dtypes = branch.device, branch.dtypes
        tensors = {"input_ids": torch.tensor([ids], dtype=dtypes["input_ids"], device=device)}
        if "attention_mask" in dtypes:
            tensors["attention_mask"] = torch.ones((1, past + count), dtype=dtypes["attention_mask"], device=device)
        if "position_ids" in dtypes:
            tensors["position_ids"] = torch.arange(past, past + count, dtype=dtypes["position_ids"], device=device)[None, :]
        tensors.update(self._cache)
        for name, shape in branch.input_shapes(count, past).items():
            tensor = tensors[name]
            if not context.set_input_shape(name, shape):
                raise EngineError(f"TensorRT refused the shape {shape} for {name} in profile {profile}",
                                  where=f"engine/{branch.target}.plan", how="rebuild the engine (edgekit build-engine)")
            context.set_tensor_address(name, tensor.data_ptr() if tensor.numel() else branch._placeholder.data_ptr())
        outputs = {}
        for name in branch.output_names:
            shape = tuple(context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise EngineError(f"TensorRT could not infer the shape of output {name}: {shape}",
                                  where=f"engine/{branch.target}.plan", how="rebuild the engine (edgekit build-engine)")
            outputs[name] = torch.empty(shape, dtype=dtypes[name], device=device)
            context.set_tensor_address(name, outputs[name].data_ptr() if outputs[name].numel() else branch._placeholder.data_ptr())
        if not context.execute_async_v3(handle):
            raise EngineError("TensorRT failed to run the engine", where=f"engine/{branch.target}.plan",
                              how="run with the TensorRT logger at VERBOSE to see why; rebuild the engine if it persists")
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


# --- a remote OpenAI-compatible endpoint ----------------------------------------------------


class RemoteBranch:
    """An OpenAI-compatible completions endpoint (llama.cpp server, vLLM, TGI, OpenAI...).

    ``base_url`` is the server's root (``http://host:8000``) or its ``/v1`` root; requests go to
    ``<root>/v1/completions``. ``model`` is sent when given (servers that serve one model
    ignore it), ``api_key`` as ``Authorization: Bearer``. ``timeout`` (seconds) bounds the
    connection and every read, so a stalled stream fails too. Every failure to get an answer
    raises :class:`BranchUnavailable`; the branch returns text, never logits.
    """

    has_logits = False
    backend = "remote"
    vocab_size = None
    context_length = None
    tokenizer = None

    def __init__(self, base_url: str, *, model: str | None = None, api_key: str | None = None, timeout: float = 30.0,
                 name: str = "large"):
        root = base_url.rstrip("/")
        self.base_url = root
        self.url = root + ("/completions" if root.endswith("/v1") else "/v1/completions")
        self.model = model
        self.api_key = api_key
        self.timeout = float(timeout)
        self.name = name

    def __repr__(self) -> str:
        return f"RemoteBranch(name={self.name!r}, url={self.url!r})"

    def complete(self, prompt: str, *, max_new_tokens: int, temperature: float, stop: Sequence[str] | None = None) -> dict[str, Any]:
        """One completion: ``{"text", "finish_reason", "usage"}`` (usage as the server reports
        it, ``{}`` when it does not)."""
        response = self._post(prompt, max_new_tokens, temperature, stop, stream=False)
        try:
            with response:
                data = json.loads(response.read())
            choice = data["choices"][0]
            return {"text": choice.get("text") or "", "finish_reason": choice.get("finish_reason"), "usage": data.get("usage") or {}}
        except BranchUnavailable:
            raise
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise BranchUnavailable(self.url, "malformed response (not an OpenAI completions JSON)") from None
        except Exception as exc:
            raise self._unavailable(exc) from None

    def stream(self, prompt: str, *, max_new_tokens: int, temperature: float, stop: Sequence[str] | None = None) -> Iterator[str]:
        """Text chunks from the server-sent-event stream, as they arrive.

        The request is sent before this returns, so an unreachable server raises here, before
        any text; a stream that stalls past ``timeout`` or ends without ``data: [DONE]``
        raises :class:`BranchUnavailable` from the iteration."""
        response = self._post(prompt, max_new_tokens, temperature, stop, stream=True)
        return self._events(response)

    # -- internals

    def _post(self, prompt: str, max_new_tokens: int, temperature: float, stop: Sequence[str] | None, *, stream: bool) -> Any:
        import urllib.request

        payload: dict[str, Any] = {"prompt": prompt, "max_tokens": int(max_new_tokens), "temperature": float(temperature),
                                   "stream": stream}
        if self.model:
            payload["model"] = self.model
        if stop:
            payload["stop"] = list(stop)
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream" if stream else "application/json",
                   "User-Agent": "edgekit"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(payload).encode(), headers=headers, method="POST")
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except Exception as exc:
            raise self._unavailable(exc) from None

    def _events(self, response: Any) -> Iterator[str]:
        try:
            with response:
                for raw in response:
                    line = raw.decode("utf-8", "replace").strip()
                    if not line.startswith("data:"):
                        continue  # blank separators, ": keep-alive" comments, event:/id: fields
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    try:
                        event = json.loads(data)
                    except ValueError:
                        raise BranchUnavailable(self.url, f"malformed stream event: {data[:80]}") from None
                    if isinstance(event, dict) and event.get("error"):
                        error = event["error"]
                        raise BranchUnavailable(self.url, f"server error: {error.get('message') if isinstance(error, dict) else error}")
                    choices = event.get("choices") if isinstance(event, dict) else None
                    text = choices[0].get("text") if choices else None
                    if text:
                        yield text
        except BranchUnavailable:
            raise
        except Exception as exc:
            raise self._unavailable(exc) from None
        raise BranchUnavailable(self.url, "the stream ended without data: [DONE]")

    def _unavailable(self, exc: BaseException) -> BranchUnavailable:
        import http.client
        import urllib.error

        if isinstance(exc, urllib.error.HTTPError):
            detail = ""
            try:
                body = exc.read().decode("utf-8", "replace")
                try:
                    error = json.loads(body).get("error")
                    detail = error.get("message", "") if isinstance(error, dict) else str(error or "")
                except (ValueError, AttributeError):
                    detail = body
            except Exception:  # the body is a courtesy; the status code is the cause
                pass
            cause = f"HTTP {exc.code} {exc.reason}" + (f": {detail[:200]}" if detail.strip() else "")
        elif isinstance(exc, urllib.error.URLError):
            reason = exc.reason
            cause = self._describe(reason) if isinstance(reason, BaseException) else str(reason)
        elif isinstance(exc, http.client.HTTPException):
            cause = f"bad HTTP response ({type(exc).__name__}: {exc})"
        else:
            cause = self._describe(exc)
        return BranchUnavailable(self.url, cause)

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, TimeoutError):  # socket.timeout is TimeoutError since Python 3.10
            return f"no answer within {self.timeout:g} s (timed out)"
        if isinstance(exc, ConnectionRefusedError):
            return "connection refused"
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


# --- choosing a branch ----------------------------------------------------------------------


def _tensorrt_importable() -> bool:
    from edgekit.devices import tensorrt_available

    return tensorrt_available() is not None


def load_branch(spec: str | Path | Bundle, *, name: str, target: str | None = None, backend: str = "auto",
                model: str | None = None, api_key: str | None = None, timeout: float = 30.0,
                threads: int | None = None, spin_wait: bool = True,
                variant: str | None = None) -> OnnxRuntimeBranch | TensorRTBranch | RemoteBranch:
    """The branch for ``spec``: an ``http(s)://`` URL (a :class:`RemoteBranch`; ``model``,
    ``api_key``, ``timeout`` apply) or a bundle directory (a path, or a
    :class:`~edgekit.bundle.manifest.Bundle` already opened: its manifest is not read again).

    For a bundle, ``backend``: ``"auto"`` takes TensorRT when ``engine/<target>.plan`` exists
    and the ``tensorrt`` package imports, falling back to ONNX Runtime (with a warning) when
    that engine cannot be loaded here (another TensorRT version or GPU); ``"onnxruntime"`` or
    ``"tensorrt"`` force one and raise :class:`EdgekitError` when it cannot be used.
    ``target`` defaults to the bundle's target; ``threads``, ``spin_wait`` and ``variant`` (an
    ONNX graph of the bundle, see :class:`OnnxRuntimeBranch`) apply to ONNX Runtime.
    """
    from edgekit.names import check_name

    handle = spec if isinstance(spec, Bundle) else None
    text = str(handle.dir) if handle is not None else str(spec)
    check_name(name, what="branch name", where=text[:200])
    if text.startswith(("http://", "https://")):
        if backend not in ("auto", "remote"):
            raise EdgekitError(f"backend {backend!r} does not apply to a URL", where=text,
                               how="leave backend as auto for a remote endpoint, or give a bundle directory")
        return RemoteBranch(text, model=model, api_key=api_key, timeout=timeout, name=name)
    if backend not in BACKENDS:
        raise EdgekitError(f"unknown backend {backend!r}", where="backend", how=f"use one of: {', '.join(BACKENDS)}")
    bundle_dir = Path(spec)
    if not bundle_dir.is_dir():
        raise EdgekitError("no bundle directory or http(s):// URL here", where=text,
                           how="point at a bundle directory (runs/<name>/stages/<n>-bundle/<name>) or a server URL")
    bundle = Bundle.open(handle or bundle_dir)  # opened once: the branch below takes the handle
    target = target or bundle.target()
    if target is not None:
        check_name(target, what="target", where=text)
    if backend == "onnxruntime":
        return OnnxRuntimeBranch(bundle, name=name, threads=threads, spin_wait=spin_wait, variant=variant)
    plan = bundle_dir / "engine" / f"{target}.plan"
    if backend == "tensorrt":
        if not _tensorrt_importable():
            raise EngineError(
                "backend tensorrt needs the TensorRT Python package, which is not installed (or does not import)",
                where=text,
                how="pip install 'edgekit[gpu]' on an x86-64 CUDA machine (JetPack provides it on Jetson), or use backend onnxruntime",
            )
        if not plan.is_file():
            raise EngineError(f"no TensorRT engine for target {target} in this bundle", where=str(plan),
                              how=f"build it on the device: edgekit build-engine {bundle_dir} --target {target}")
        return TensorRTBranch(bundle, target, name=name)
    if plan.is_file() and _tensorrt_importable():
        try:
            return TensorRTBranch(bundle, target, name=name)
        except EngineError as exc:
            import warnings

            warnings.warn(f"{exc} Falling back to ONNX Runtime for branch {name}.", RuntimeWarning, stacklevel=2)
    return OnnxRuntimeBranch(bundle, name=name, threads=threads, spin_wait=spin_wait, variant=variant)


def greedy_generate(branch: Any, prompt_ids: Sequence[int], max_new_tokens: int, *,
                    eos_token_id: int | Iterable[int] | None = None) -> list[int]:
    """The reference decode: argmax at every step with a KV cache. Returns the new tokens only
    (not the prompt), the end-of-sequence token included when one is produced; stops after
    ``max_new_tokens``, at an ``eos_token_id`` (one id or several), or when the cache is full.
    Ties go to the lowest token id (like ``torch.argmax``)."""
    import numpy as np

    if getattr(branch, "has_logits", True) is False:  # duck-typed local branches may not say
        raise EdgekitError(f"branch {getattr(branch, 'name', '?')} returns text, not logits", where="greedy_generate",
                           how="use a local branch (a bundle directory) for greedy decoding")
    if eos_token_id is None:
        stops: set[int] = set()
    elif isinstance(eos_token_id, int):
        stops = {eos_token_id}
    else:
        stops = {int(t) for t in eos_token_id}
    tokens: list[int] = []
    if max_new_tokens <= 0:
        return tokens
    session = branch.session()
    try:
        logits = session.feed(list(prompt_ids))
        while True:
            token = int(np.argmax(logits[-1]))
            tokens.append(token)
            if token in stops or len(tokens) >= max_new_tokens or session.length >= branch.context_length:
                return tokens
            logits = session.feed([token])
    finally:
        session.close()
