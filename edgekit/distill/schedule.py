"""What optimizer step ``s`` trains on and at which learning rate: pure functions of the step.

Which calibration windows make up step ``s`` is a function of (seed, s, micro-batch, rank) —
windows are permuted per epoch by a generator seeded with ``seed + epoch`` — so the "data
position" of a checkpoint is just its step count, and the learning rate is a function of the
step too: a resumed run sees exactly the batches and rates an uninterrupted one does.
"""

from __future__ import annotations

import math
from typing import Any


def learning_rate_at(step: int, *, peak: float, steps: int, warmup: int, min_ratio: float) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup over ``warmup``
    steps (the first step already gets peak/warmup), then cosine decay from ``peak`` at the
    first step after warmup to ``peak * min_ratio`` at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    span = steps - warmup - 1
    progress = min(1.0, (step - warmup) / span) if span > 0 else 1.0
    floor = peak * min_ratio
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WindowOrder:
    """Which training windows form a micro-batch: a pure function of (seed, step, micro, rank).

    Global sample ``g`` of the run (micro-batches of ``batch_size`` per rank, ``world``
    ranks, ``accumulation`` micro-batches per step) is window ``perm_e[g mod n]`` with
    ``e = g // n`` and ``perm_e`` a permutation of the ``n`` windows seeded by seed + e.
    """

    def __init__(self, windows: int, *, seed: int, batch_size: int, accumulation: int, world: int):
        if windows < 1:
            raise ValueError("no training windows")
        self.windows, self.seed = windows, seed
        self.batch_size, self.accumulation, self.world = batch_size, accumulation, world
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            import torch

            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._perms = {epoch: torch.randperm(self.windows, generator=generator).tolist()}
        return self._perms[epoch]

    def indices(self, step: int, micro: int, rank: int) -> list[int]:
        start = ((step * self.accumulation + micro) * self.world + rank) * self.batch_size
        return [self._perm(g // self.windows)[g % self.windows] for g in range(start, start + self.batch_size)]


class WindowView:
    """``train_ids[indices]`` over a memory-mapped uint32 token array cut into windows."""

    def __init__(self, array: Any, windows: int, length: int):
        self._windows = array[: windows * length].reshape(windows, length)

    def __getitem__(self, indices: Any) -> Any:
        import numpy as np
        import torch

        return torch.from_numpy(np.asarray(self._windows[np.asarray(indices)], dtype=np.int64))
