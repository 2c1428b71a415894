"""What every branch shares: the :class:`LogitsSession` and :class:`LocalBranch` protocols, the
checks on paths and names a bundle gives, :class:`SessionBase` (length bookkeeping and argument
checks of a local session), :class:`BundleBranch` (what a local branch reads from its bundle) and
:func:`greedy_generate`, the reference decode over any branch with logits.

Nothing heavy is imported here: numpy only inside :func:`greedy_generate`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from edgekit.bundle.manifest import Bundle
from edgekit.bundle.signing import require_trusted
from edgekit.errors import EdgekitError

if TYPE_CHECKING:
    import numpy as np


class LogitsSession(Protocol):
    """One generation stream with its own KV cache (batch 1)."""

    vocab_size: int
    length: int  # tokens currently in the cache

    def feed(self, token_ids: Sequence[int]) -> np.ndarray:
        """Append ``token_ids`` after the cache, run one forward pass and return float32 logits
        of shape ``[len(token_ids), vocab_size]`` (row i: the distribution after token i).

        On a branch with a prefix cache (``branch.prefix_cache``,
        :mod:`edgekit.runtime.prefix_cache`) the first feed of a session may start from a
        cached prefix of ``token_ids``: it then returns only the rows of the tokens after that
        prefix (``reused`` says how many were taken from the cache); the last row is the
        same either way."""
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


def load_tokenizer(bundle_dir: Path) -> Any:
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


class SessionBase:
    """Length bookkeeping, the context-length refusal and argument checks common to both
    local backends; subclasses implement ``_forward`` and ``_truncate``, and for prompt-prefix
    reuse ``kv_snapshot(start, stop)`` (a copy of cache entries ``start..stop-1``, by cache input
    name) and ``kv_restore(blocks, length)`` (start an empty session from the first ``length``
    entries of consecutive snapshots, which it must not modify)."""

    def __init__(self, branch: Any):
        self._branch = branch
        self.vocab_size: int = branch.vocab_size
        self.context_length: int = branch.context_length
        self.length = 0
        self.reused = 0  # tokens of the last feed taken from the branch's prefix cache
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
        self.reused = 0
        cache = getattr(self._branch, "prefix_cache", None)
        if cache is None or self.length or not hasattr(self, "kv_snapshot"):
            return self._forward(ids)
        return self._feed_with_prefix(cache, ids)

    def _feed_with_prefix(self, cache: Any, ids: list[int]) -> np.ndarray:
        """The first feed of a session on a branch with a prefix cache: start from the longest
        cached prefix of ``ids`` (never all of them: at least the last token runs), then store
        the blocks of this prompt's longest block-aligned prefix that the cache lacks."""
        found = cache.lookup(ids)
        if found is None:
            rows = self._forward(ids)
        else:
            blocks, reuse = found  # reuse < len(ids): all the blocks unless they are the whole prompt
            self.kv_restore(blocks, reuse)
            self.length = reuse
            try:
                rows = self._forward(ids[reuse:])
            except BaseException:
                self._truncate(0)  # a feed is all or nothing: the session is empty again
                self.length = 0
                raise
            self.reused = reuse
        keep = cache.store_length(len(ids))
        if keep > self.reused:
            step = cache.block_tokens
            cache.insert(ids[:keep], {end: self.kv_snapshot(end - step, end) for end in cache.missing(ids, keep)})
        return rows

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

    def __enter__(self) -> SessionBase:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _forward(self, ids: list[int]) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _truncate(self, keep: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _release(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class BundleBranch:
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
        self.tokenizer = load_tokenizer(self.bundle_dir)

    def _config_vocab(self) -> int | None:
        path = self.bundle_dir / "config.json"
        if path.is_file():
            vocab = json.loads(path.read_text()).get("vocab_size")
            if vocab:
                return int(vocab)
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, bundle={str(self.bundle_dir)!r}, context={self.context_length})"


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
