"""Keep freed memory for reuse while a distillation trains (glibc only).

glibc's malloc serves every block over 32 MB with its own ``mmap`` and hands it back to the
kernel on ``free``. PyTorch on the CPU has no caching allocator, so each step of a training loop
on a 49k-token vocabulary allocates and frees tensors of 100-200 MB (logits, log-softmaxes,
their gradients) over and over, and the kernel zeroes every page again: on the 2-core reference
machine that was a quarter of the CPU time of a distillation step (system time), and the steps
ran 1.5x slower than with the blocks reused (results/profile_distill_step.md). The distill loop
holds it for its training (also in each process ``accelerate launch`` starts); other stages do
not: GPTQ and evaluation were no faster with it (GPTQ 8 % slower, within the host's noise).

:func:`reuse_freed_memory` turns that off for its duration: no ``mmap`` for large blocks (they
come from the heap), and no trimming of the heap top, so a freed block is reused by the next
step. On exit it restores glibc's defaults and trims the heap (``malloc_trim``), so what the
run freed goes back to the system. Nested uses are counted; only the outermost one restores.
Elsewhere (macOS, musl, Windows) it does nothing. ``EDGEKIT_REUSE_FREED_MEMORY=0`` turns it
off (for a host where the heap's peak matters more than the speed).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import threading
from typing import Any, Iterator

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# glibc's defaults, restored on exit
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_DEFAULT_MMAP_MAX = 65536
# The heap top is kept up to this size (mallopt takes an int).
_KEEP_BYTES = 2**31 - 1

ENV = "EDGEKIT_REUSE_FREED_MEMORY"

_lock = threading.Lock()
_depth = 0


@functools.lru_cache(maxsize=1)
def _libc() -> Any | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")  # glibc's soname on every Linux architecture
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def enabled() -> bool:
    """Whether :func:`reuse_freed_memory` changes anything here (glibc, and not switched off)."""
    return os.environ.get(ENV, "1").strip().lower() not in {"0", "false", "no", "off"} and _libc() is not None


@contextlib.contextmanager
def reuse_freed_memory() -> Iterator[bool]:
    """While inside, large freed blocks stay in the heap for the next allocation; yields whether
    that is in effect (False where the C library is not glibc or the environment says 0)."""
    global _depth
    libc = _libc() if enabled() else None
    if libc is None:
        yield False
        return
    with _lock:
        if _depth == 0:
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES)
        _depth += 1
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
                libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
                libc.malloc_trim(0)


__all__ = ["ENV", "enabled", "reuse_freed_memory"]
