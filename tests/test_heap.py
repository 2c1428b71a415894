"""edgekit/heap.py: while a pipeline runs, large freed blocks are reused instead of being handed
back to the kernel and faulted in (zeroed) again on the next allocation."""

from __future__ import annotations

import platform
import resource

import pytest

from edgekit import heap

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="mallopt/malloc_trim are glibc's; elsewhere reuse_freed_memory does nothing")


def _faults_stepping(torch, steps: int) -> int:
    """Minor page faults over ``steps`` rounds of a loop step's pattern: tensors above glibc's
    largest mmap threshold (32 MB) allocated, written, and all freed at the step's end."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        logits = torch.ones(16 * 2**20)  # 64 MB
        other = torch.ones(8 * 2**20)
        product = logits * 2
        del logits, other, product
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def _faults_mallocing(rounds: int, megabytes: int = 64) -> int:
    """Minor page faults over ``rounds`` of malloc, write, free of one block above glibc's
    largest mmap threshold (32 MB)."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = megabytes * 2**20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        block = libc.malloc(size)
        assert block
        ctypes.memset(block, 1, size)
        libc.free(block)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@glibc
def test_large_blocks_are_reused_inside_and_handed_back_after(monkeypatch):
    monkeypatch.delenv(heap.ENV, raising=False)
    pages = 64 * 2**20 // resource.getpagesize()
    assert _faults_mallocing(4) >= 3 * pages  # glibc's default: an mmap per block, faulted in every time
    with heap.reuse_freed_memory() as active:
        assert active
        _faults_mallocing(1)  # the heap grows once
        assert _faults_mallocing(4) < pages / 4  # then the same pages serve every round
    assert _faults_mallocing(4) >= 3 * pages  # defaults restored (and the heap trimmed)


@glibc
def test_a_training_steps_tensors_fault_far_less_inside(monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.delenv(heap.ENV, raising=False)
    outside = _faults_stepping(torch, 6)
    with heap.reuse_freed_memory():
        _faults_stepping(torch, 1)
        inside = _faults_stepping(torch, 6)
    assert inside < outside / 2  # measured: a third to a tenth (torch aligns its blocks, so not all are reused)


@glibc
def test_nested_uses_restore_once_and_the_environment_turns_it_off(monkeypatch):
    monkeypatch.delenv(heap.ENV, raising=False)
    assert heap.enabled()
    with heap.reuse_freed_memory():
        with heap.reuse_freed_memory() as inner:
            assert inner and heap._depth == 2
        assert heap._depth == 1  # the inner exit did not restore the defaults
    assert heap._depth == 0
    for off in ("0", "false", "OFF"):
        monkeypatch.setenv(heap.ENV, off)
        assert not heap.enabled()
        with heap.reuse_freed_memory() as active:
            assert not active and heap._depth == 0


def test_without_glibc_it_does_nothing(monkeypatch):
    monkeypatch.setattr(heap, "_libc", lambda: None)
    assert not heap.enabled()
    with heap.reuse_freed_memory() as active:
        assert active is False
