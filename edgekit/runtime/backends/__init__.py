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

One module per backend: :mod:`~edgekit.runtime.backends.common` (the protocols, the session and
bundle bases every local branch builds on, :func:`greedy_generate`),
:mod:`~edgekit.runtime.backends.ort`, :mod:`~edgekit.runtime.backends.trt` and
:mod:`~edgekit.runtime.backends.remote`; this module chooses among them (:func:`load_branch`).
"""

from __future__ import annotations

from pathlib import Path
from typing import get_args

from edgekit.bundle.manifest import Bundle
from edgekit.errors import EdgekitError, EngineError
from edgekit.runtime.backends.common import (
    LocalBranch,
    LogitsSession,
    bundle_file,
    bundle_target,
    greedy_generate,
)
from edgekit.runtime.backends.ort import OnnxRuntimeBranch
from edgekit.runtime.backends.remote import BranchUnavailable, RemoteBranch
from edgekit.runtime.backends.trt import TensorRTBranch
from edgekit.runtime.config import Backend

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
BACKENDS = get_args(Backend)  # the runtime.json / --backend choices (edgekit.runtime.config)


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
