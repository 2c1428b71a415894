"""What a running stage sees: its config, its inputs, a temp output dir, progress."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from edgekit.pipeline.progress import Reporter


@dataclass(frozen=True)
class StageRecord:
    """A finished earlier stage, as later stages see it."""

    name: str
    type: str
    dir: Path
    produces: str | None
    metrics: dict[str, Any]
    artifact_hash: str


@dataclass
class StageContext:
    name: str
    type: str
    index: int
    config: Any  # the stage's validated StageConfig
    recipe: Any  # edgekit.recipe.Recipe
    recipe_dir: Path  # relative model/data paths resolve here
    target: Any  # edgekit.targets.Target
    output_dir: Path  # a temp dir; renamed into place only if the stage succeeds
    inputs: dict[str, Path]  # artifact kind -> directory of the latest stage producing it
    history: list[StageRecord]
    cache_dir: Path  # long-lived cache shared by runs (converted checkpoints)
    # Survives a killed run (unlike output_dir) and is deleted once the stage succeeds:
    # where long stages keep resumable checkpoints. Unique to this stage's cache key.
    work_dir: Path = Path()
    references: dict[str, Path] = field(default_factory=dict)  # role -> artifact dir (e.g. "teacher")
    reporter: Reporter = field(repr=False, default_factory=Reporter)

    def input(self, *kinds: str) -> tuple[str, Path]:
        """The most recent artifact among ``kinds`` (the runner checked one exists)."""
        for record in reversed(self.history):
            if record.produces in kinds:
                return record.produces, record.dir
        raise LookupError(f"no earlier stage produced {' or '.join(kinds)}")

    def log(self, message: str) -> None:
        self.reporter.log(f"[{self.name}] {message}")

    @contextlib.contextmanager
    def progress(self, total: int | None, description: str) -> Iterator[Any]:
        with self.reporter.task(f"{self.name}: {description}", total) as task:
            yield task
