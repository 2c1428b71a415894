"""Batched decoding: one forward pass per step for every stream of a local branch.

:class:`BatchedBranch` wraps a local branch whose class can lay several streams' KV caches out
as one batch (``branch.batch_cache(max_rows)``: :class:`~edgekit.runtime.backends.ort.FusedBatchCache`,
:class:`~edgekit.runtime.backends.ort.CopiedBatchCache`,
:class:`~edgekit.runtime.backends.trt.TensorRTBatchCache`). Its sessions are ordinary
:class:`~edgekit.runtime.backends.common.LogitsSession` objects (``feed``, ``rollback``,
``close``), so a :class:`~edgekit.runtime.router.Router` on its own thread uses them unchanged
and each stream keeps its own sampling, stop sequences, cancellation and policy::

    batched = BatchedBranch(branch, max_batch=8, max_wait_ms=2)
    session = batched.session()       # one per stream, each on its own thread
    session.feed(prompt)              # prefill: alone, batch 1, into the stream's row
    session.feed([token])             # decode: waits for one batched step of all streams

Scheduling (continuous batching, no thread of its own): a single-token ``feed`` (a decode
step) submits its token and waits. The first waiting stream that finds no forward pass running
leads the next step as soon as every stream that holds a row has submitted, or ``max_wait_ms``
(at most half the recent step time) after the first submission (a stream busy sampling, or
held up by a slow client, stalls the others by at most that), then runs one forward pass for all submitted rows and hands each its
logits row. Streams join (their first feed) and leave (``close``) between steps. Every other
forward pass -- a prefill, a speculative verification of several tokens -- runs alone at batch
1 on the stream's row; a rollback lowers that row's length (per-row: the other rows are not
touched). All forward passes and layout changes of one branch are serialized, which is what a
CPU wants anyway (two runs at once would share the same cores).

Rows: row ``i`` of the batch cache belongs to one stream; rows stay contiguous ``0..n-1`` (a
leaving stream's row is filled by moving the last row), and the rows of a step are moved to the
front first when not every stream submitted, so a step runs at batch = the streams in it. A
stream that finds all ``max_batch`` rows taken decodes on a session of its own (the unbatched
path), so a stream never waits for a row.

Prompt-prefix reuse (:mod:`edgekit.runtime.prefix_cache`, on the wrapped branch and read
through the wrapper): a stream whose prompt starts with a cached prefix takes its row at once,
the prefix's KV is copied into the row (``cache.restore``) and only the rest of the prompt
prefills; after a prefill the blocks the cache lacks are copied out of the row
(``cache.snapshot``). Both run between steps, like any layout change.

Nothing heavy is imported here (numpy only when a step runs).
"""

from __future__ import annotations

import collections
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any, Iterator

from edgekit.errors import EdgekitError
from edgekit.runtime.backends.common import SessionBase

#: bounds of the settings (RuntimeConfig.batching declares the same ones to its users)
MAX_BATCH = 64
MAX_WAIT_MS = 100.0


class BatchedBranch:
    """A local branch whose decode steps run batched across its sessions (module docstring).

    ``max_batch``: most streams in one step (2..64); ``max_wait_ms``: how long a step waits for
    streams that have not submitted yet (0..100; never more than half the recent step time). ``on_step(batch_size)`` is called after
    every batched step (metrics). Attributes the wrapper does not define (``tokenizer``,
    ``kv_cache``, ``bundle``, ...) are the wrapped branch's."""

    has_logits = True

    def __init__(self, inner: Any, *, max_batch: int = 8, max_wait_ms: float = 20.0,
                 on_step: Callable[[int], None] | None = None):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 2 <= max_batch <= MAX_BATCH:
            raise EdgekitError(f"max_batch must be an integer in 2..{MAX_BATCH} (got {max_batch!r})", where="batching.max_batch",
                               how="use 1 to turn batching off (no wrapper), else 2..64")
        if isinstance(max_wait_ms, bool) or not isinstance(max_wait_ms, (int, float)) or not 0 <= max_wait_ms <= MAX_WAIT_MS:
            raise EdgekitError(f"max_wait_ms must be a number in 0..{MAX_WAIT_MS:g} (got {max_wait_ms!r})",
                               where="batching.max_wait_ms", how="use e.g. 2")
        if not callable(getattr(inner, "batch_cache", None)):
            raise EdgekitError(f"branch {getattr(inner, 'name', '?')!r} ({getattr(inner, 'backend', '?')}) cannot batch",
                               where="batching", how="batch a local ONNX Runtime or TensorRT branch, or set batching.max_batch 1")
        self.inner = inner
        self.name, self.backend = inner.name, inner.backend
        self.vocab_size, self.context_length, self.tokenizer = inner.vocab_size, inner.context_length, inner.tokenizer
        self.max_wait_s = float(max_wait_ms) / 1000.0
        self.cache = inner.batch_cache(max_batch)
        self.max_batch = int(self.cache.max_rows)  # the layout may take fewer (an engine built for a smaller batch)
        if self.max_batch < 2:
            raise EdgekitError(f"branch {inner.name!r} ({inner.backend}) runs one stream per forward pass only",
                               where="batching", how="rebuild the TensorRT engine with build_engine max_batch >= 2 "
                               "(edgekit build-engine --batch N), or set batching.max_batch 1")
        self.on_step = on_step
        #: batch size -> steps run at that size (what the benchmark and the tests read)
        self.step_sizes: collections.Counter[int] = collections.Counter()
        self._cond = threading.Condition()
        self._busy = False  # a forward pass or a layout change is running
        self._exclusive_waiting = 0  # prefills / verifications / leaves waiting: they go before the next step
        self._rows: list[BatchedSession] = []  # row index -> its stream
        self._waiting: list[BatchedSession] = []  # streams that submitted a token for the next step
        self._first_wait = 0.0
        self._step_s = 0.0  # recent duration of a batched step (moving average)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name == "inner":  # not set yet (during __init__): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def session(self) -> BatchedSession:
        return BatchedSession(self)

    @property
    def active(self) -> int:
        """Streams holding a row now."""
        return len(self._rows)

    def __repr__(self) -> str:
        return f"BatchedBranch({self.inner!r}, max_batch={self.max_batch}, max_wait_ms={self.max_wait_s * 1000:g})"

    # -- serialized work: everything but a batched step

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        with self._cond:
            self._exclusive_waiting += 1
            try:
                while self._busy:
                    self._cond.wait()
            finally:
                self._exclusive_waiting -= 1
            self._busy = True
        try:
            yield
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def _join(self, session: BatchedSession) -> bool:
        """Give ``session`` a row (False when all are taken)."""
        with self._exclusive():
            if len(self._rows) >= self.max_batch:
                return False
            session._row = self.cache.add()
            assert session._row == len(self._rows)
            self._rows.append(session)
            return True

    def _leave(self, session: BatchedSession) -> None:
        with self._exclusive():
            row = session._row
            self.cache.remove(row)  # moves the last row into `row`
            moved = self._rows.pop()
            if moved is not session:
                self._rows[row] = moved
                moved._row = row
            session._row = None

    def _alone(self, session: BatchedSession, ids: list[int]) -> Any:
        with self._exclusive():
            return self.cache.feed_alone(session._row, ids)

    def _truncate(self, session: BatchedSession, keep: int) -> None:
        with self._exclusive():
            self.cache.truncate(session._row, keep)

    def _snapshot(self, session: BatchedSession, start: int, stop: int) -> dict[str, Any]:
        with self._exclusive():  # between steps: the row is where session._row says
            return self.cache.snapshot(session._row, start, stop)

    def _restore(self, session: BatchedSession, blocks: list[dict[str, Any]], length: int) -> None:
        with self._exclusive():
            self.cache.restore(session._row, blocks, length)

    # -- the batched step

    def _decode(self, session: BatchedSession, token: int) -> Any:
        cond = self._cond
        with cond:
            session._token, session._result, session._error = token, None, None
            if not self._waiting:
                self._first_wait = time.monotonic()
            self._waiting.append(session)
            cond.notify_all()  # a stream waiting for the others may lead now
            while True:
                if session._result is not None:
                    return session._result
                if session._error is not None:
                    raise session._error
                if self._busy or self._exclusive_waiting or session not in self._waiting:
                    cond.wait()
                    continue
                left = self._first_wait + self._wait_bound() - time.monotonic()
                if len(self._waiting) < len(self._rows) and left > 0:
                    cond.wait(left)
                    continue
                batch, self._waiting = self._waiting, []
                self._busy = True
                break
        # this thread leads the step; others keep submitting for the next one meanwhile
        try:
            logits = self._step(batch)
            for s in batch:
                s._result = logits[s._row : s._row + 1]
        except BaseException as exc:  # every stream of the step sees the failure
            for s in batch:
                s._error = exc
        finally:
            with cond:
                self._busy = False
                cond.notify_all()
        if session._error is not None:
            raise session._error
        return session._result

    def _wait_bound(self) -> float:
        # Waiting for a straggler idles the waiting rows; leaving it out costs it (and the
        # cores) a step of its own. Half a step bounds the first by the second, so a fast
        # model (a GPU, a tiny graph) waits less than max_wait_ms.
        return min(self.max_wait_s, 0.5 * self._step_s) if self._step_s else self.max_wait_s

    def _step(self, batch: list[BatchedSession]) -> Any:
        k = len(batch)
        started = time.perf_counter()
        # the step's rows become 0..k-1: swap each one outside with a row inside that did not submit
        outside = [s for s in batch if s._row >= k]
        if outside:
            inside = {s._row for s in batch}
            free = [r for r in range(k) if r not in inside]
            for s, r in zip(outside, free):
                other = self._rows[r]
                self.cache.swap(s._row, r)
                self._rows[r], self._rows[s._row] = s, other
                other._row, s._row = s._row, r
        tokens = [0] * k
        for s in batch:
            tokens[s._row] = s._token
        logits = self.cache.step(tokens)
        took = time.perf_counter() - started
        self._step_s = took if not self._step_s else 0.8 * self._step_s + 0.2 * took
        self.step_sizes[k] += 1
        if self.on_step is not None:
            self.on_step(k)
        return logits


class BatchedSession(SessionBase):
    """One stream of a :class:`BatchedBranch` (a :class:`LogitsSession`)."""

    def __init__(self, branch: BatchedBranch):
        super().__init__(branch)
        self._row: int | None = None
        self._solo: Any = None  # the wrapped branch's own session when no row was free
        self._token = 0
        self._result: Any = None
        self._error: BaseException | None = None

    @property
    def batched(self) -> bool:
        """True while the stream holds a row of the batch (False: not started, or unbatched)."""
        return self._row is not None

    def _start(self) -> None:
        """Take a row, or a session of the wrapped branch when all rows are taken."""
        branch: BatchedBranch = self._branch
        if self._solo is None and self._row is None and not branch._join(self):
            self._solo = branch.inner.session()

    def _forward(self, ids: list[int]) -> Any:
        import numpy as np

        branch: BatchedBranch = self._branch
        self._start()
        if self._solo is not None:
            # This session's feed already looked the prompt up in the branch's prefix cache (it
            # is the wrapped branch's, read through the wrapper): the unbatched session runs the
            # tokens without a second lookup, which would count twice and store twice.
            rows = self._solo._forward(ids) if isinstance(self._solo, SessionBase) else self._solo.feed(ids)
            self.length = self._solo.length
            return rows
        rows = branch._decode(self, ids[0]) if len(ids) == 1 and self.length else branch._alone(self, ids)
        self.length += len(ids)
        return rows if rows.dtype == np.float32 else rows.astype(np.float32)

    def _truncate(self, keep: int) -> None:
        if self._solo is not None:
            self._solo.rollback(self._solo.length - keep)
        elif self._row is not None:
            self._branch._truncate(self, keep)

    def _release(self) -> None:
        if self._solo is not None:
            self._solo.close()
            self._solo = None
        elif self._row is not None:
            self._branch._leave(self)

    def kv_snapshot(self, start: int, stop: int) -> dict[str, Any]:
        """A copy of this stream's cache entries ``start..stop-1`` (prompt-prefix reuse), taken
        from its row between steps."""
        if self._solo is not None:
            return self._solo.kv_snapshot(start, stop)
        return self._branch._snapshot(self, start, stop)

    def kv_restore(self, blocks: list[dict[str, Any]], length: int) -> None:
        """Start this (empty) stream from the first ``length`` entries of consecutive
        snapshots: it takes its row now and the entries are copied into it, so the rest of the
        prompt prefills after them and the stream then decodes in the batch like any other."""
        self._start()
        if self._solo is not None:
            self._solo.kv_restore(blocks, length)
            self._solo.length = length
        else:
            self._branch._restore(self, blocks, length)


def batch_branches(router: Any, settings: Any, *, on_step: Callable[[str, int], None] | None = None) -> list[BatchedBranch]:
    """Wrap ``router``'s local branches (small, large) in :class:`BatchedBranch` per
    ``settings`` (:class:`edgekit.runtime.config.BatchingConfig`), in place: every Router built
    from ``router.small`` / ``router.large`` afterwards shares the batches. Remote branches
    and ``max_batch`` 1 are left alone. ``on_step(label, batch_size)`` after every step."""
    wrapped = []
    if settings is None or settings.max_batch <= 1:
        return wrapped
    for label in ("small", "large"):
        branch = getattr(router, label, None)
        if branch is None or isinstance(branch, BatchedBranch) or not callable(getattr(branch, "batch_cache", None)):
            continue
        step = (lambda size, label=label: on_step(label, size)) if on_step is not None else None
        try:
            batched = BatchedBranch(branch, max_batch=settings.max_batch, max_wait_ms=settings.max_wait_ms, on_step=step)
        except EdgekitError as exc:  # an engine built for batch 1: that branch serves its streams one by one
            warnings.warn(f"{exc} Branch {label} decodes unbatched.", RuntimeWarning, stacklevel=2)
            continue
        setattr(router, label, batched)
        wrapped.append(batched)
    return wrapped


class PaddedBatchCache:
    """The batch layout for a graph that copies its cache (optimum's: ``present.*`` = past +
    the new entries): ``cache[name]`` is ``[rows, kv_heads, width, head_dim]`` and ``mask``
    ``[rows, width]`` marks each row's valid entries (1) among padding and holes (0). A row's
    entries are in order but need not be adjacent: a step appends one column to every row of
    the step (rows left out of it get a hole there), a rollback zeroes the row's last mask
    entries, a row placed after a prefill is right-aligned (left padding). ``position_ids``
    are each row's valid count, so every token sits at the position it has alone and the
    attention mask hides the rest: the same logits as the row alone, up to float rounding.

    Subclasses give the forward pass (:meth:`_run_alone`, :meth:`_run_step`) and the tensor
    kind (:meth:`_zeros`, :meth:`_copy`, :meth:`_index`, :meth:`_cat`); this class holds the bookkeeping
    (numpy for the mask, the cache tensors through those hooks)."""

    # holes and padding beyond this many columns (over the longest row) are squeezed out
    SLACK = 32

    def __init__(self, names: Sequence[str], dims: dict[str, tuple[tuple[int, int], Any]], max_rows: int):
        import numpy as np

        self.names = list(names)
        self.dims = dims  # name -> ((kv_heads, head_dim), dtype)
        self.max_rows = int(max_rows)
        self.max_width: int | None = None  # a runtime's largest past (TensorRT's profile): packed beyond it
        self.cache: dict[str, Any] = {}
        self.mask = np.zeros((0, 0), dtype=np.int64)
        self.lengths: list[int] = []

    # -- tensor hooks (numpy here)

    def _zeros(self, name: str, rows: int, width: int) -> Any:
        import numpy as np

        (heads, dim), dtype = self.dims[name]
        return np.zeros((rows, heads, width, dim), dtype=dtype)

    def _copy(self, value: Any) -> Any:
        return value.copy()

    def _index(self, columns: Any) -> Any:
        return columns

    def _cat(self, values: list[Any], length: int) -> Any:
        """``values`` joined along the sequence axis, the first ``length`` entries."""
        import numpy as np

        return np.concatenate(values, axis=2)[:, :, :length]

    def _run_alone(self, ids: list[int], past: dict[str, Any]) -> tuple[Any, dict[str, Any]]:  # pragma: no cover
        """``ids`` after ``past`` (batch 1, ``[1, heads, length, dim]`` each): (float32 logits
        ``[len(ids), vocab]`` as numpy, present ``[1, heads, length + len(ids), dim]``)."""
        raise NotImplementedError

    def _run_step(self, tokens: list[int], mask: Any, positions: Any, past: dict[str, Any]) -> tuple[Any, dict[str, Any]]:  # pragma: no cover
        """One token per row after ``past`` (``[k, heads, width, dim]``): (logits ``[k, vocab]``
        as numpy, present ``[k, heads, width + 1, dim]``)."""
        raise NotImplementedError

    # -- the layout

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    def length(self, row: int) -> int:
        return self.lengths[row]

    def add(self) -> int:
        import numpy as np

        rows, width = self.rows, self.width
        for name in self.names:
            grown = self._zeros(name, rows + 1, width)
            if rows:
                grown[:rows] = self.cache[name]
            self.cache[name] = grown
        self.mask = np.concatenate([self.mask, np.zeros((1, width), dtype=np.int64)])
        self.lengths.append(0)
        return rows

    def remove(self, row: int) -> None:
        last = self.rows - 1
        if row != last:
            for name in self.names:
                self.cache[name][row] = self.cache[name][last]
            self.mask[row] = self.mask[last]
            self.lengths[row] = self.lengths[last]
        # a leading-rows slice of a contiguous array is contiguous: no copy
        self.cache = {name: value[:last] for name, value in self.cache.items()}
        self.mask = self.mask[:last]
        self.lengths.pop()
        self._squeeze()

    def swap(self, a: int, b: int) -> None:
        if a == b:
            return
        for name in self.names:
            value = self.cache[name]
            held = self._copy(value[a])
            value[a] = value[b]
            value[b] = held
        self.mask[[a, b]] = self.mask[[b, a]]
        self.lengths[a], self.lengths[b] = self.lengths[b], self.lengths[a]

    def truncate(self, row: int, keep: int) -> None:
        import numpy as np

        valid = np.flatnonzero(self.mask[row])
        self.mask[row, valid[keep:]] = 0
        self.lengths[row] = keep
        self._squeeze()

    def snapshot(self, row: int, start: int, stop: int) -> dict[str, Any]:
        """A copy of the row's cache entries ``start..stop-1`` (``[1, heads, stop - start, dim]``
        each): its valid columns, wherever padding and holes have put them."""
        import numpy as np

        columns = self._index(np.flatnonzero(self.mask[row])[start:stop])
        # advanced indexing gathers a new array: the snapshot never aliases the batch
        return {name: self._dense(self.cache[name][row : row + 1][:, :, columns]) for name in self.names}

    def restore(self, row: int, blocks: list[dict[str, Any]], length: int) -> None:
        """Start the empty ``row`` from the first ``length`` entries of consecutive snapshots
        (only read), placed as a prefill places a row: right-aligned after its padding."""
        if self.lengths[row]:
            raise RuntimeError(f"row {row} holds {self.lengths[row]} entries: only an empty row is restored")
        self._place(row, {name: self._cat([block[name] for block in blocks], length) for name in self.names}, length)

    def feed_alone(self, row: int, ids: list[int]) -> Any:
        import numpy as np

        valid = self._index(np.flatnonzero(self.mask[row]))
        # advanced indexing gathers a dense [1, heads, length, dim] copy of the row's entries
        past = {name: self._dense(self.cache[name][row : row + 1][:, :, valid]) for name in self.names}
        logits, present = self._run_alone(ids, past)
        self._place(row, present, self.lengths[row] + len(ids))
        return logits

    def step(self, tokens: list[int]) -> Any:
        import numpy as np

        k, rows, width = len(tokens), self.rows, self.width
        mask = np.concatenate([self.mask[:k], np.ones((k, 1), dtype=np.int64)], axis=1)
        positions = np.asarray(self.lengths[:k], dtype=np.int64)[:, None]
        past = {name: self.cache[name][:k] for name in self.names}
        logits, present = self._run_step(tokens, mask, positions, past)
        if k == rows:
            self.cache = dict(present)
        else:  # the rows that sat this step out get a hole in the new column
            for name in self.names:
                grown = self._zeros(name, rows, width + 1)
                grown[:k] = present[name]
                grown[k:, :, :width] = self.cache[name][k:]
                self.cache[name] = grown
        column = np.zeros((rows, 1), dtype=np.int64)
        column[:k] = 1
        self.mask = np.concatenate([self.mask, column], axis=1)
        for i in range(k):
            self.lengths[i] += 1
        self._squeeze()
        return logits

    def close(self) -> None:
        self.cache = {}

    def _place(self, row: int, present: dict[str, Any], length: int) -> None:
        """Put a row's whole cache (``[1, heads, length, dim]``) back, right-aligned."""
        import numpy as np

        if length > self.width:  # everyone else gets left padding
            extra = length - self.width
            for name in self.names:
                grown = self._zeros(name, self.rows, length)
                grown[:, :, extra:] = self.cache[name]
                self.cache[name] = grown
            self.mask = np.concatenate([np.zeros((self.rows, extra), dtype=np.int64), self.mask], axis=1)
        width = self.width
        for name in self.names:
            self.cache[name][row, :, : width - length] = 0
            self.cache[name][row, :, width - length :] = present[name][0]
        self.mask[row] = 0
        self.mask[row, width - length :] = 1
        self.lengths[row] = length
        self._squeeze()

    def _squeeze(self) -> None:
        """Drop columns no row uses: all of them once holes pile up past SLACK (rows
        right-aligned again), else only the leading ones (free: a view)."""
        import numpy as np

        if not self.rows:
            self.mask = np.zeros((0, 0), dtype=np.int64)
            self.cache = {name: self._zeros(name, 0, 0) for name in self.names}
            return
        longest = max(self.lengths)
        if self.width - longest > self.SLACK or (self.max_width is not None and self.width > self.max_width):
            width = longest
            packed = {name: self._zeros(name, self.rows, width) for name in self.names}
            mask = np.zeros((self.rows, width), dtype=np.int64)
            for row, count in enumerate(self.lengths):
                valid = self._index(np.flatnonzero(self.mask[row]))
                for name in self.names:
                    packed[name][row, :, width - count :] = self.cache[name][row][:, valid]
                mask[row, width - count :] = 1
            self.cache, self.mask = packed, mask
            return
        used = np.flatnonzero(self.mask.any(axis=0))
        first = int(used[0]) if used.size else self.width
        if first:
            # a column slice is a strided view; the runtimes read dense buffers
            self.cache = {name: self._dense(value[:, :, first:]) for name, value in self.cache.items()}
            self.mask = np.ascontiguousarray(self.mask[:, first:])

    def _dense(self, value: Any) -> Any:
        import numpy as np

        return np.ascontiguousarray(value)


__all__ = ["MAX_BATCH", "MAX_WAIT_MS", "BatchedBranch", "BatchedSession", "PaddedBatchCache", "batch_branches"]
