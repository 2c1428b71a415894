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


def on_policy_step(step: int, ratio: float) -> bool:
    """Whether optimizer step ``step`` trains on-policy: ``floor((step+1)·r) > floor(step·r)``
    (``r`` as an exact fraction), so the first ``n`` steps hold ``floor(n·r)`` on-policy ones."""
    from fractions import Fraction

    if ratio <= 0:
        return False
    fraction = Fraction(ratio).limit_denominator(1_000_000)
    num, den = fraction.numerator, fraction.denominator
    return (step + 1) * num // den > step * num // den


def on_policy_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """The seed of the student's sampling in one on-policy micro-batch: a function of the
    position in the run only, so a resumed run samples the same continuations."""
    import hashlib

    digest = hashlib.sha256(f"on-policy/{seed}/{step}/{micro}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


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


class MixedOrder:
    """Training windows from two sources, text and teacher-generated, in a stated ratio: a pure
    function of (seed, step, micro, rank) like :class:`WindowOrder`.

    Window indices ``0 .. text-1`` are the recipe's text, ``text .. text+generated-1`` the
    generated ones. Global sample ``g`` is generated iff ``floor((g+1)·r) > floor(g·r)`` (``r``
    the ratio as an exact fraction), so every prefix of the run holds ``floor(n·r)`` generated
    samples of ``n``: the ratio holds at every step, not just on average. The ``k``-th sample of a
    source is window ``perm_e[k mod n]`` of that source, ``e = k // n``, each source permuted per
    epoch by its own seeded generator.
    """

    # Keeps the generated source's permutation seeds apart from the text's (seed + epoch).
    GENERATED_SEED_OFFSET = 1 << 32

    def __init__(self, text: int, generated: int, *, ratio: float, seed: int, batch_size: int, accumulation: int, world: int):
        from fractions import Fraction

        fraction = Fraction(ratio).limit_denominator(1_000_000)
        if not 0 < fraction <= 1:
            raise ValueError(f"the generated ratio must be in (0, 1], not {ratio}")
        if generated < 1:
            raise ValueError("no generated windows")
        if text < 1 and fraction < 1:
            raise ValueError("no training windows")
        self.text, self.generated = text, generated
        self._num, self._den = fraction.numerator, fraction.denominator
        self.batch_size, self.accumulation, self.world = batch_size, accumulation, world
        shape = dict(batch_size=1, accumulation=1, world=1)
        self._text = WindowOrder(max(text, 1), seed=seed, **shape)
        self._generated = WindowOrder(generated, seed=seed + self.GENERATED_SEED_OFFSET, **shape)

    def generated_before(self, g: int) -> int:
        """How many of the global samples ``0 .. g-1`` are generated."""
        return g * self._num // self._den

    def window(self, g: int) -> int:
        made = self.generated_before(g)
        if self.generated_before(g + 1) > made:
            return self.text + self._generated._perm(made // self.generated)[made % self.generated]
        k = g - made
        return self._text._perm(k // self.text)[k % self.text]

    def indices(self, step: int, micro: int, rank: int) -> list[int]:
        start = ((step * self.accumulation + micro) * self.world + rank) * self.batch_size
        return [self.window(g) for g in range(start, start + self.batch_size)]

    def samples(self, steps: int) -> dict[str, int]:
        """Samples of each source in the first ``steps`` optimizer steps (all ranks)."""
        total = steps * self.accumulation * self.world * self.batch_size
        made = self.generated_before(total)
        return {"text": total - made, "generated": made}


class MixedWindows:
    """``windows[indices]`` over the text windows (a tensor or a :class:`WindowView`) followed
    by the generated windows (a ``[count, length]`` tensor), in the indices' order."""

    def __init__(self, text: Any, text_count: int, generated: Any):
        self.text, self.text_count, self.generated = text, text_count, generated

    def __getitem__(self, indices: Any) -> Any:
        import torch

        rows = [self.text[[i]] if i < self.text_count else self.generated[[i - self.text_count]] for i in indices]
        return torch.cat(rows, dim=0)


class WindowView:
    """``train_ids[indices]`` over a memory-mapped uint32 token array cut into windows."""

    def __init__(self, array: Any, windows: int, length: int):
        self._windows = array[: windows * length].reshape(windows, length)

    def __getitem__(self, indices: Any) -> Any:
        import numpy as np
        import torch

        return torch.from_numpy(np.asarray(self._windows[np.asarray(indices)], dtype=np.int64))
