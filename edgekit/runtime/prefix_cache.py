"""Prompt-prefix KV reuse: a bounded, thread-safe LRU of KV-cache blocks, one per branch,
keyed by the token ids of block-aligned prompt prefixes.

How a branch uses it (:meth:`edgekit.runtime.backends.common.SessionBase.feed`): the first
feed of a session looks up the longest cached prefix of its ids, copies that KV into the
session and runs only the tokens after it; after the feed, the blocks of the prompt's longest
block-aligned prefix (at least ``min_tokens``; the last fed token stays out) that the cache
lacks are copied in. Prompts that begin with the same system prompt or chat template header
share its blocks -- stored once, prefilled once -- whatever follows it. A later prompt equal to
a cached prefix reuses all of it but its last token, which runs, so that the prompt's last
logits come out as they do without the cache.

Exact by construction: a block's key *is* the token ids of the whole prefix up to its end
(their int64 bytes), so a lookup matches only an identical prefix -- a hash collision can cost
a comparison, never a wrong cache. The KV of a prefix depends only on its tokens (causal
attention, the positions start at 0), so a reused prefix gives the logits of a prefill that
ran the prompt in two chunks; how far that is from one chunk in float is measured by the tests
and scripts/bench_prefix.py.

Bounded by bytes (the snapshots plus their keys) and by block count; the least recently used
block goes first, and a prefix's later blocks go before its first ones (a lookup walks from the
first block and stops at a missing one). One prompt never stores more than the whole budget.
Blocks are immutable once stored (read-only arrays): a session that restores them copies them
into its own buffers, so a block evicted while another thread restores it stays valid there.

Light: the standard library only (the sessions make the snapshots with numpy or torch).
"""

from __future__ import annotations

import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

#: routing policies that read every row of the prompt's logits (input_complexity and learned score the
#: prompt by them); a prefix taken from the cache has no rows, so these never get a cache
PROMPT_ROW_POLICIES = ("input_complexity", "learned")


def _key(ids: Sequence[int]) -> bytes:
    return array("q", ids).tobytes()


def tensor_bytes(tensors: dict[str, Any]) -> int:
    """The bytes a snapshot holds: numpy arrays and torch tensors both have ``nbytes``."""
    return sum(int(t.nbytes) for t in tensors.values())


@dataclass(frozen=True)
class Block:
    end: int  # the block holds the KV of tokens [end - block_tokens, end) of its prefix
    tensors: dict[str, Any]  # cache input name -> [1, kv_heads, block_tokens, head_dim], read-only
    nbytes: int  # the tensors plus the key


class PrefixCache:
    """KV snapshots of prompt prefixes in blocks, least recently used evicted first.

    A prefix of ``k * block_tokens`` tokens is ``k`` blocks; block ``i`` holds the KV of its
    tokens ``[i * block_tokens, (i + 1) * block_tokens)`` and is keyed by all the ids up to its
    end, so prompts that share a system prompt share its blocks (stored once) and each adds
    only its own. A lookup walks a prompt's blocks from the first and reuses them up to the
    first one missing.

    ``max_bytes``: the budget (0 stores nothing); ``max_blocks``: the most blocks kept;
    ``block_tokens``: the block size (a prompt that shares part of a block with a stored
    prefix reuses only the whole blocks before it); ``min_tokens``: shorter prefixes are not
    stored or reused. ``on_lookup(hit, tokens_reused)``, when set, hears every lookup (the
    server's /metrics counters)."""

    def __init__(self, *, max_bytes: int, max_blocks: int = 4096, block_tokens: int = 32, min_tokens: int = 64,
                 on_lookup: Callable[[bool, int], None] | None = None):
        if max_bytes < 0 or max_blocks < 1 or block_tokens < 1 or min_tokens < 1:
            raise ValueError("max_bytes >= 0, max_blocks >= 1, block_tokens >= 1 and min_tokens >= 1")
        self.max_bytes, self.max_blocks = int(max_bytes), int(max_blocks)
        self.block_tokens, self.min_tokens = int(block_tokens), int(min_tokens)
        self.on_lookup = on_lookup
        self._blocks: OrderedDict[bytes, Block] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = self.tokens_reused = self.evictions = 0
        # learned from the first snapshot (constant per branch): caps what one prompt stores
        # before anything is copied
        self.bytes_per_token: float | None = None

    def __len__(self) -> int:
        return len(self._blocks)

    def store_length(self, count: int) -> int:
        """How much of a prompt of ``count`` tokens to hold in the cache after its prefill: its
        longest multiple of ``block_tokens`` below ``count`` (the last token stays out), at most
        what the budget can hold; 0 when that is under ``min_tokens``."""
        step = self.block_tokens
        length = min((count - 1) // step, self.max_blocks) * step
        if self.bytes_per_token is not None:
            total, fits = 0.0, 0
            for end in range(step, length + 1, step):
                total += step * self.bytes_per_token + 8 * end  # a block's key is its whole prefix
                if total > self.max_bytes:
                    break
                fits = end
            length = fits
        return length if length >= self.min_tokens and self.max_bytes > 0 else 0

    def lookup(self, ids: Sequence[int]) -> tuple[list[dict[str, Any]], int] | None:
        """The stored blocks of the longest cached prefix of ``ids``, in order (each marked
        recently used, the first ones most: eviction takes the ends of prefixes first), and how
        many tokens to reuse: all of them, except when they are all of ``ids`` -- the last token
        always runs, so that its logits come out. None on a miss (nothing, or less than
        ``min_tokens``). A prompt too short to reuse anything is not a lookup and is not
        counted."""
        ids = list(ids)
        if len(ids) - 1 < self.min_tokens:
            return None
        data, step, found = _key(ids), self.block_tokens, []
        with self._lock:
            end = step
            while end <= len(ids):
                block = self._blocks.get(data[: 8 * end])  # a dict lookup compares the whole key on a hash match
                if block is None:
                    break
                found.append(block)
                end += step
            length = len(found) * step
            hit = length >= self.min_tokens
            if hit:
                for block in reversed(found):
                    self._blocks.move_to_end(data[: 8 * block.end])
                self.hits += 1
                self.tokens_reused += min(length, len(ids) - 1)
            else:
                self.misses += 1
        reuse = min(length, len(ids) - 1)
        if self.on_lookup is not None:
            self.on_lookup(hit, reuse if hit else 0)
        return ([b.tensors for b in found], reuse) if hit else None

    def missing(self, ids: Sequence[int], length: int) -> list[int]:
        """The ends of the blocks of ``ids[:length]`` the cache does not hold."""
        data = _key(list(ids)[:length])
        with self._lock:
            return [end for end in range(self.block_tokens, length + 1, self.block_tokens)
                    if data[: 8 * end] not in self._blocks]

    def contains(self, ids: Sequence[int]) -> bool:
        """True when every block of ``ids`` (a whole number of blocks) is stored."""
        return not self.missing(ids, len(ids) // self.block_tokens * self.block_tokens)

    def insert(self, ids: Sequence[int], blocks: dict[int, dict[str, Any]]) -> int:
        """Store ``blocks`` (block end -> the KV of ``ids[end - block_tokens:end]``, made read-only
        here), then mark every stored block of ``ids`` recently used, the first ones most, and
        evict the least recently used blocks until the budget holds. Returns how many were
        stored (a block alone over the budget is not)."""
        data = _key(list(ids))
        stored = 0
        with self._lock:
            for end, tensors in sorted(blocks.items()):
                for value in tensors.values():
                    if hasattr(value, "setflags"):  # numpy; torch tensors have no read-only flag
                        value.setflags(write=False)
                key = data[: 8 * end]
                size = tensor_bytes(tensors)
                self.bytes_per_token = size / self.block_tokens
                block = Block(end, dict(tensors), size + len(key))
                if block.nbytes > self.max_bytes:
                    break
                old = self._blocks.pop(key, None)
                if old is not None:
                    self.bytes -= old.nbytes
                self._blocks[key] = block
                self.bytes += block.nbytes
                stored += 1
            last = max(blocks, default=0)
            for end in range(last, 0, -self.block_tokens):
                key = data[: 8 * end]
                if key in self._blocks:
                    self._blocks.move_to_end(key)
            while self.bytes > self.max_bytes or len(self._blocks) > self.max_blocks:
                _, evicted = self._blocks.popitem(last=False)
                self.bytes -= evicted.nbytes
                self.evictions += 1
        return stored

    def clear(self) -> None:
        with self._lock:
            self._blocks.clear()
            self.bytes = 0

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"blocks": len(self._blocks), "bytes": self.bytes, "hits": self.hits, "misses": self.misses,
                    "tokens_reused": self.tokens_reused, "evictions": self.evictions}


def attach_prefix_caches(router: Any, settings: Any, *,
                         on_lookup: Callable[[bool, int], None] | None = None) -> list[PrefixCache]:
    """Give each local branch of ``router`` (small, and large when it is a bundle) a prefix
    cache per ``settings`` (:class:`edgekit.runtime.config.PrefixCacheConfig`; ``max_mb``
    each). Every Router sharing those branches then shares their caches. A branch wrapped for
    batched decoding (``inner``: :class:`~edgekit.runtime.backends.batched.BatchedBranch`)
    gets it on the wrapped branch, which the wrapper reads through. Nothing is attached (an
    empty list) when ``max_mb`` is 0, or when the router's policy -- or the one that policy
    degrade protects -- reads every row of the prompt's logits (:data:`PROMPT_ROW_POLICIES`)."""
    policies = {getattr(router, "policy", None), getattr(router, "protects", None)}
    if settings is None or settings.max_mb <= 0 or policies & set(PROMPT_ROW_POLICIES):
        return []
    caches = []
    for branch in (getattr(router, "small", None), getattr(router, "large", None)):
        branch = getattr(branch, "inner", branch)
        # only branches whose sessions can take and restore a snapshot (ONNX Runtime, TensorRT)
        if branch is None or not getattr(branch, "has_logits", False) or not hasattr(branch, "session"):
            continue
        if getattr(branch, "prefix_cache", None) is None:
            branch.prefix_cache = PrefixCache(max_bytes=int(settings.max_mb * 2**20), max_blocks=settings.max_blocks,
                                              block_tokens=settings.block_tokens, min_tokens=settings.min_tokens,
                                              on_lookup=on_lookup)
        caches.append(branch.prefix_cache)
    return caches


__all__ = ["PROMPT_ROW_POLICIES", "Block", "PrefixCache", "attach_prefix_caches", "tensor_bytes"]
