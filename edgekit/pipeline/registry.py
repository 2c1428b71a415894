"""The stage registry: a stage is a config model + a function, registered by name.

A stage reads the artifact directories of earlier stages and writes its own. Stages never
import one another; they meet only through artifacts on disk and the records the runner
passes along. Adding a stage = one new folder with a ``stage.py`` that calls
:func:`register_stage`, plus one line in :data:`BUILTIN_STAGE_MODULES`.

Registration must stay light (pydantic only): the recipe validator imports every stage
module to check parameters, and ``import edgekit`` must not pull in torch. The stage's
``run`` function is named as ``"module:function"`` and imported only when it runs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

from pydantic import BaseModel, ConfigDict, model_serializer

# Artifact kinds that stages pass along. A stage's ``requires`` lists alternatives:
# each entry is a set of kinds of which at least one must have been produced earlier.
CHECKPOINT = "checkpoint"  # Hugging Face directory: config.json + *.safetensors + tokenizer
ONNX = "onnx"  # model.onnx (+ external data) + tokenizer + configs
BUNDLE = "bundle"  # deployable directory + .tar with manifest

BUILTIN_STAGE_MODULES = (
    "edgekit.models.stage",
    "edgekit.evaluate.stage",
    "edgekit.export.stage",
    "edgekit.prune.stage",
    "edgekit.distill.stage",
    "edgekit.quantize.stage",
    "edgekit.pack.stage",
    "edgekit.engine.stage",
)


class ReferenceProblem(ValueError):
    """A stage's reference to an earlier stage cannot be resolved: ``str(self)`` says what,
    ``how`` says how to fix it (recipe validation turns it into a RecipeError)."""

    def __init__(self, what: str, how: str, field: str | None = None):
        super().__init__(what)
        self.how, self.field = how, field


@dataclass(frozen=True)
class EarlierStage:
    """What a reference resolver may look at: an earlier stage's name, type and artifact kind."""

    name: str
    type: str
    produces: str | None


class StageConfig(BaseModel):
    """Base class of every stage's parameters: strict, so typos are caught (and a non-finite
    number is refused: no stage parameter means .inf or .nan)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    # Fields added after recipes existed whose defaults reproduce the old behaviour: left out of
    # the dump (the stage's cache key, distill's resume check) while at their defaults, so
    # recipes that do not use them keep their cache keys and resumable checkpoints.
    OPTIONAL_WHEN_DEFAULT: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        data = handler(self)
        fields = type(self).model_fields
        for name in self.OPTIONAL_WHEN_DEFAULT:
            if name in data and getattr(self, name) == fields[name].get_default(call_default_factory=True):
                del data[name]
        return data


@dataclass(frozen=True)
class StageDef:
    type: str
    config: type[StageConfig]
    summary: str
    run: str  # "package.module:function", imported only when the stage runs
    requires: tuple[frozenset[str], ...] = ()
    produces: str | None = None
    # Recipe sections (besides the stage's own parameters) whose content changes the
    # stage's output and so belong in its cache key: "model", "data", "target", "recipe".
    uses: tuple[str, ...] = ()
    # Earlier stages whose artifacts this stage reads besides its ``requires`` (distill's
    # teacher). Pure and light: ``(config, earlier) -> {role: index into earlier}``; raises
    # ReferenceProblem. The runner hashes those artifacts into the cache key and passes
    # their directories as ``ctx.references``; recipe validation calls it too.
    references: Callable[[StageConfig, Sequence["EarlierStage"]], dict[str, int]] | None = None
    # "package.module:function" returning what this machine contributes to the stage's
    # output (build_engine: the local TensorRT version and GPU decide whether an engine is
    # built), folded into the cache key so a result made on one host is not reused on another
    # that would produce a different one. Called lazily, once per run.
    host: str | None = None

    def load_function(self):
        module_name, func_name = self.run.split(":")
        return getattr(importlib.import_module(module_name), func_name)


_REGISTRY: dict[str, StageDef] = {}
# Recipe sections that name inputs outside the recipe file (the model, the data) enter a stage's
# cache key by content, which only the package that reads those inputs knows how to hash: it
# registers a "package.module:function" taking (recipe, recipe_dir), imported when a run needs it.
_SECTION_FINGERPRINTS: dict[str, str] = {}
_loaded = False


def register_stage(
    type: str,
    *,
    config: type[StageConfig],
    summary: str,
    run: str,
    requires: tuple[tuple[str, ...] | str, ...] = (),
    produces: str | None = None,
    uses: tuple[str, ...] = (),
    references: Callable[[StageConfig, Sequence[EarlierStage]], dict[str, int]] | None = None,
    host: str | None = None,
) -> StageDef:
    if type in _REGISTRY:
        raise ValueError(f"stage type {type!r} registered twice")
    normalized = tuple(frozenset((r,) if isinstance(r, str) else r) for r in requires)
    stage = StageDef(type, config, summary, run, normalized, produces, uses, references, host)
    _REGISTRY[type] = stage
    return stage


def register_section_fingerprint(section: str, function: str) -> None:
    """Name the function (``"package.module:function"``, called with the recipe and the
    recipe's directory) whose JSON-able result stands for recipe section ``section`` in the
    cache key of every stage that ``uses`` it."""
    if section in _SECTION_FINGERPRINTS:
        raise ValueError(f"recipe section {section!r} fingerprinted twice")
    _SECTION_FINGERPRINTS[section] = function


def section_fingerprint(section: str) -> Callable[[object, object], object] | None:
    """The function registered for ``section`` (imported now), or None."""
    _load_builtins()
    function = _SECTION_FINGERPRINTS.get(section)
    if function is None:
        return None
    module_name, func_name = function.split(":")
    return getattr(importlib.import_module(module_name), func_name)


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in BUILTIN_STAGE_MODULES:
            importlib.import_module(module)


def get_stage(type: str) -> StageDef | None:
    _load_builtins()
    return _REGISTRY.get(type)


def all_stages() -> list[StageDef]:
    _load_builtins()
    return list(_REGISTRY.values())
