"""A recipe checked against the world before any work starts: the target profile, the model
and the data it names exist and are usable, the data can feed every stage, and the target
rules and the shape chain (:mod:`edgekit.rules`, :mod:`edgekit.planning.chain`) pass.

:func:`load_recipe` is what the CLI and the API call: the strict schema
(:func:`edgekit.recipe.read_recipe`) and then these checks. Every error names the recipe line
it comes from.
"""

from __future__ import annotations

from pathlib import Path

from edgekit.errors import EdgekitError
from edgekit.recipe import LoadedRecipe, read_recipe


def load_recipe(path: Path | str, *, check_sources: bool = True) -> LoadedRecipe:
    """Parse and validate a recipe file. Every problem raises a one-line :class:`RecipeError`
    (or the Target/Model/Data error for that field) naming the file and line.

    With ``check_sources`` the target profile, the model path and the data file are
    checked too (cheap: nothing is loaded).
    """
    loaded = read_recipe(path)
    if check_sources:
        check_recipe_sources(loaded)
    return loaded


def check_recipe_sources(loaded: LoadedRecipe) -> None:
    """Target, model and data exist and are usable. Errors point at the recipe line."""
    from edgekit.models.source import check_gguf_supported, resolve_model_source
    from edgekit.models.text import check_data_budget, resolve_data, resolve_eval_sets, resolve_text_source
    from edgekit.rules import check_target_rules
    from edgekit.targets import load_target

    recipe = loaded.recipe

    def _relocate(exc: EdgekitError, *loc: str) -> EdgekitError:
        # Keep the error's class and advice but say where in the recipe it came from.
        # Keep a file path the error named (e.g. the custom target YAML with the bad line).
        detail = f" -> {exc.where}" if exc.where and ("/" in exc.where or "\\" in exc.where) else ""
        where = loaded.where(*loc) + detail
        return type(exc)(exc.what, where=where, how=exc.how)

    try:
        target = load_target(loaded.target_spec)
    except EdgekitError as exc:
        raise _relocate(exc, "target") from None
    try:
        source = resolve_model_source(recipe.model, revision=recipe.revision, base_dir=loaded.base_dir)
        if source.kind == "gguf":
            check_gguf_supported(source.path)
    except EdgekitError as exc:
        raise _relocate(exc, "model") from None
    try:
        resolve_data(recipe.data, base_dir=loaded.base_dir)
    except EdgekitError as exc:
        raise _relocate(exc, "data", "source") from None
    explicit = recipe.data.eval_sets is not None
    for index, entry in enumerate(resolve_eval_sets(recipe.data)):
        try:
            resolve_text_source(entry.source, base_dir=loaded.base_dir, text_field=entry.text_field)
        except EdgekitError as exc:
            if exc.what.startswith("data path"):
                exc = type(exc)(exc.what, where=exc.where, how="fix the path (relative to the recipe's directory) or use "
                                "builtin:package-readmes")
            raise _relocate(exc, *(("data", "eval_sets", index, "source") if explicit else ("data",))) from None
    check_data_budget(loaded)  # each stage's tokens against the text's (edgekit.models.text)
    check_target_rules(loaded, target, source)


__all__ = ["check_recipe_sources", "load_recipe"]
