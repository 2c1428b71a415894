"""Progress bars and log lines (rich), silent-friendly for tests and CI logs."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator


class _Task:
    def __init__(self, progress: Any, task_id: Any):
        self._progress, self._id = progress, task_id

    def advance(self, amount: float = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._id, amount)

    def update(self, **fields: Any) -> None:
        if self._progress is not None:
            self._progress.update(self._id, **fields)


class Reporter:
    """Prints stage lines and shows a progress bar per long step. ``quiet`` prints nothing."""

    def __init__(self, console: Any = None, quiet: bool = False):
        self.quiet = quiet
        self._console = console

    @property
    def console(self) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=True)
        return self._console

    def log(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, highlight=False)

    @contextlib.contextmanager
    def task(self, description: str, total: int | None) -> Iterator[_Task]:
        if self.quiet:
            yield _Task(None, None)
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        if total:
            columns.append(TimeRemainingColumn())
        with Progress(*columns, console=self.console, transient=False) as progress:
            yield _Task(progress, progress.add_task(description, total=total))
