"""What the benchmark scripts share. They run as ``python scripts/NAME.py``, so this directory
is on ``sys.path`` and ``from bench_common import shown`` works from each of them."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def shown(path: str | Path) -> str:
    """A path as the results record it: relative to the repository when it lies inside it
    (symlinks are not followed, so a worktree's ``runs/`` link stays relative), else as given."""
    path = Path(path)
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)
