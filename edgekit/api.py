"""Typed functions behind the CLI (and for use from Python).

Everything here raises :class:`edgekit.errors.EdgekitError` subclasses for problems a user
can fix; the CLI turns them into one line and exit code 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgekit.errors import EdgekitError
from edgekit.pipeline.progress import Reporter


def validate_recipe(path: str | Path, *, check_sources: bool = True):
    """Parse + validate a recipe (stages, target, model and data paths). Returns a LoadedRecipe."""
    from edgekit.recipe import load_recipe

    return load_recipe(path, check_sources=check_sources)


def show_recipe(path: str | Path, *, fmt: str = "yaml") -> str:
    """The fully resolved recipe (all defaults filled in) as YAML or JSON."""
    import json

    loaded = validate_recipe(path)
    if fmt == "json":
        return json.dumps(loaded.recipe.to_dict(), indent=2)
    return loaded.recipe.to_yaml()


def compress(
    path: str | Path,
    *,
    output: str | Path | None = None,
    force: bool = False,
    from_stage: str | None = None,
    until_stage: str | None = None,
    quiet: bool = False,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Run the recipe's pipeline, reusing valid cached stages. Returns the run manifest."""
    from edgekit.pipeline.runner import run_pipeline

    loaded = validate_recipe(path)
    return run_pipeline(
        loaded,
        output=Path(output) if output else None,
        force=force,
        from_stage=from_stage,
        until_stage=until_stage,
        reporter=Reporter(quiet=quiet),
        cache_dir=Path(cache_dir) if cache_dir else None,
    )


def list_targets():
    from edgekit.targets import list_targets as _list

    return _list()


def show_target(name: str):
    from edgekit.targets import load_target

    return load_target(name)


def list_stages():
    from edgekit.pipeline.registry import all_stages

    return all_stages()


__all__ = ["EdgekitError", "validate_recipe", "show_recipe", "compress", "list_targets", "show_target", "list_stages"]
