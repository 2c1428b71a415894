"""Recipes: the YAML file that says what to compress, for which target, and how.

Strict on purpose (``extra="forbid"`` everywhere, stage parameters validated against the
stage's own config model): a misspelled key is an error naming the file and line, never a
silently ignored setting. Every field: docs/recipe_reference.md (generated from this code).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgekit.errors import RecipeError
from edgekit.names import SafeName, relative_path_problem
from edgekit.pipeline.registry import EarlierStage, ReferenceProblem, all_stages, get_stage
from edgekit.yamlio import LineMap, dump_yaml, format_loc, load_yaml, pydantic_error



class _Strict(BaseModel):
    # Unknown keys are typos; non-finite numbers are never a meaningful budget or setting.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


IN_DOMAIN = "in_domain"  # the label of data.source's own held-out split in the evaluate stage's results
# Built-in texts that hold another built-in text (edgekit.models.mixed): an evaluation set may
# not be text the stages calibrate and train on.
BUILTIN_CONTAINS = {"builtin:mixed": ("builtin:python-docs",)}
MAX_EVAL_SETS = 8


class EvalSetConfig(_Strict):
    """An extra held-out text the evaluate stages score (docs/data.md, "Evaluation sets:
    in-domain and out-of-domain"). Read only by evaluate: no stage calibrates or trains on it."""

    label: SafeName = Field(description="names the set in the manifest (metrics.sets.<label>) and the summary table")
    source: str = Field(
        min_length=1, max_length=4096,
        description="builtin:package-readmes (English READMEs of edgekit's installed dependencies), "
        "builtin:python-docs, or a local .txt, .jsonl or .parquet file or a directory of them (hf: ids: save the "
        "dataset to a local file first)",
    )
    text_field: str = Field("text", min_length=1, max_length=256, description="the field holding text in .jsonl "
                            "records / parquet columns")
    tokens: int | None = Field(None, ge=2, le=10_000_000, description="tokens scored, as windows of data.window "
                               "spread evenly over the text (null: data.eval_tokens)")

    @field_validator("label")
    @classmethod
    def _not_in_domain(cls, value: str) -> str:
        if value == IN_DOMAIN or len(value) > 64:
            raise ValueError(f"label {value!r} is reserved or too long: '{IN_DOMAIN}' names data.source's own "
                             "held-out split; use a short name such as ood or news (at most 64 characters)")
        return value

    @field_validator("source")
    @classmethod
    def _local(cls, value: str) -> str:
        if value.startswith("hf:"):
            raise ValueError("an evaluation set is read whole and never downloaded: save the hub dataset to a local "
                             ".jsonl/.parquet file (or a save_to_disk directory) and name that")
        if any(ord(c) < 32 for c in value):
            raise ValueError("a source path has no control characters")
        return value


class DataConfig(_Strict):
    """Calibration, distillation and evaluation text (docs/data.md)."""

    source: str = Field(
        "builtin:python-docs", min_length=1, max_length=4096,
        description="builtin:python-docs (the stdlib's pydoc_data.topics); builtin:mixed (that reference, stdlib "
        "docstrings and stdlib source interleaved); a .txt, .jsonl or .parquet file or a "
        "directory of them; a `datasets.save_to_disk` directory; or hf:ORG/NAME, a Hugging Face dataset by id "
        "(read from the local Hugging Face cache when there; never downloaded under HF_DATASETS_OFFLINE=1)",
    )
    subset: SafeName | None = Field(None, description="hf: the dataset's configuration (e.g. sample-10BT)")
    split: SafeName = Field("train", description="hf: and save_to_disk DatasetDict directories: which split")
    revision: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$",
                                 description="hf: the dataset repo's branch, tag or commit (default main)")
    streaming: bool = Field(False, description="hf: read the files over the network row group by row group "
                            "instead of downloading them into the cache (ignored when they are cached)")
    token_budget: int | None = Field(None, ge=2, le=10**13, description="tokens to take from the start of the "
                                     "text (null: all); needed for hf: sources")
    allow_repeat: bool = Field(False, description="allow distillation to pass over the text more than 4 times")
    eval_tokens: int = Field(8192, ge=2, le=100_000_000, description="held-out tokens, taken from the end of the text")
    window: int = Field(512, ge=2, le=1_048_576, description="perplexity window (tokens); windows do not overlap")
    text_field: str = Field("text", min_length=1, max_length=256,
                            description="the field holding text in .jsonl records / parquet and datasets columns")
    eval_sets: list[EvalSetConfig] | None = Field(
        None, max_length=MAX_EVAL_SETS,
        description="held-out texts from other sources that every evaluate stage scores besides data.source's own "
        "split, each with a label (null: one set, ood = builtin:package-readmes, or builtin:python-docs when that "
        "is data.source; []: none). Read only by evaluate: never calibrated or trained on",
    )

    @model_validator(mode="after")
    def _window_fits(self):
        if self.window > self.eval_tokens:
            raise ValueError(f"window ({self.window}) is longer than eval_tokens ({self.eval_tokens})")
        hub = self.source.startswith("hf:")
        if not hub:
            unused = [k for k in ("subset", "revision") if getattr(self, k) is not None] + (["streaming"] if self.streaming else [])
            if unused:
                raise ValueError(f"{', '.join(unused)} apply to hf: sources only (data.source is {self.source!r})")
        elif self.token_budget is None:
            raise ValueError("an hf: source needs data.token_budget (a hub corpus can hold trillions of tokens): say "
                             "how many tokens to take, e.g. token_budget: 2000000000")
        if self.token_budget is not None and self.token_budget <= self.eval_tokens:
            raise ValueError(f"token_budget ({self.token_budget}) leaves nothing before the held-out eval_tokens "
                             f"({self.eval_tokens})")
        labels: set[str] = set()
        for index, entry in enumerate(self.eval_sets or ()):
            where = f"eval_sets[{index}]"
            if entry.label in labels:
                raise ValueError(f"{where}: label {entry.label!r} is used twice; give each set its own label")
            labels.add(entry.label)
            if entry.source == self.source:
                raise ValueError(f"{where}: source {entry.source!r} is data.source itself, whose held-out split is "
                                 f"already scored (as {IN_DOMAIN}); name text from another source")
            if entry.source in BUILTIN_CONTAINS.get(self.source, ()):
                raise ValueError(f"{where}: source {entry.source!r} is part of data.source {self.source!r}, which the "
                                 "stages calibrate and train on; name text from another source (e.g. builtin:package-readmes)")
            if self.source in BUILTIN_CONTAINS.get(entry.source, ()):
                raise ValueError(f"{where}: source {entry.source!r} contains data.source {self.source!r}, which the "
                                 "stages calibrate and train on; name text from another source (e.g. builtin:package-readmes)")
            if entry.tokens is not None and entry.tokens < self.window:
                raise ValueError(f"{where}: tokens ({entry.tokens}) is shorter than one window (data.window "
                                 f"{self.window}); set tokens to at least {self.window}")
        return self


class Budgets(_Strict):
    """What the deployed model must meet on the target; checked by `edgekit validate`."""

    latency_p99_ms: float | None = Field(None, gt=0, description="p99 time per generated token (ms)")
    ttft_p99_ms: float | None = Field(None, gt=0, description="p99 time to first token (ms)")
    memory_gb: float | None = Field(None, gt=0, description="peak memory of the runtime (GiB)")


from edgekit.runtime.config import RuntimeConfig


class StageSpec(_Strict):
    """One entry of ``stages``: ``type`` + an optional unique ``name`` + its parameters."""

    type: str = Field(max_length=64)
    name: SafeName = Field(description="unique within the recipe; names the stage's folder under stages/")
    params: dict[str, Any] = Field(default_factory=dict)

    def resolved(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": self.type}
        if self.name != self.type:
            entry["name"] = self.name
        entry.update(self.params)
        return entry


class Recipe(_Strict):
    name: SafeName = Field(description="a short identifier; names the output directory and bundle")
    description: str = ""
    model: str = Field(description="hub id, local checkpoint directory, .gguf file, or smollm2-135m")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    trust_remote_code: bool = Field(False, description="allow custom modelling code from the hub")
    target: str = Field(description="a target profile name (edgekit targets list) or a target YAML path")
    context_length: int = Field(2048, ge=16, le=1_048_576, description="longest prompt + generation the deployment serves")
    data: DataConfig = Field(default_factory=DataConfig)
    budgets: Budgets = Field(default_factory=Budgets)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    output: str | None = Field(None, description="run directory; default runs/<name> (relative to the current directory)")
    stages: list[StageSpec] = Field(min_length=1)

    @field_validator("data", mode="before")
    @classmethod
    def _data_shorthand(cls, value: Any) -> Any:
        return {"source": value} if isinstance(value, str) else value

    @field_validator("stages", mode="before")
    @classmethod
    def _stage_entries(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        out, seen = [], {}
        for entry in value:
            if isinstance(entry, str):
                entry = {"type": entry}
            if not isinstance(entry, dict) or "type" not in entry:
                out.append(entry)  # pydantic reports the shape error
                continue
            entry = dict(entry)
            kind = entry.pop("type")
            name = entry.pop("name", None)
            if name is None:
                if not isinstance(kind, str) or get_stage(kind) is None:  # unknown: the stage check names the type; a name is needed meanwhile
                    name = f"stage-{len(out)}"
                else:
                    seen[kind] = seen.get(kind, 0) + 1
                    name = kind if seen[kind] == 1 else f"{kind}-{seen[kind]}"
            out.append({"type": kind, "name": name, "params": entry})
        return out

    @model_validator(mode="after")
    def _large_inside_the_bundle(self):
        # runtime.large is written into the bundle's runtime.json, which the runtime reads as
        # untrusted (a relative path inside the bundle or a plain URL; edgekit run --large takes
        # any path): the same rule here, so a recipe the runtime would refuse fails at validation.
        value = self.runtime.large
        if value is None or value.startswith(("http://", "https://")):
            if value is not None and (len(value) > 2048 or any(c.isspace() or ord(c) < 32 for c in value)):
                raise ValueError("runtime.large: an http(s):// URL without whitespace or control characters, at most "
                                 "2048 characters")
            return self
        problem = relative_path_problem(value)
        if problem is not None:
            raise ValueError(f"runtime.large: {problem}: the large branch is a bundle directory inside this bundle (a "
                             "relative path without '..') or an http(s):// endpoint; pass a bundle elsewhere with "
                             "--large at run time")
        return self

    @property
    def output_dir(self) -> Path:
        return Path(self.output) if self.output else Path("runs") / self.name

    def stage_config(self, index: int) -> Any:
        spec = self.stages[index]
        return get_stage(spec.type).config.model_validate(spec.params)

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved recipe: every default filled in, stage parameters included."""
        data = self.model_dump(mode="json", exclude={"stages"})
        data["stages"] = []
        for index, spec in enumerate(self.stages):
            entry = {"type": spec.type}
            if spec.name != spec.type:
                entry["name"] = spec.name
            entry.update(self.stage_config(index).model_dump(mode="json"))
            data["stages"].append(entry)
        return data

    def portable_dict(self) -> dict[str, Any]:
        """The resolved recipe without machine-local settings (the output directory): what a
        bundle records and what cache keys hash, so moving a run does not change them."""
        data = self.to_dict()
        data.pop("output", None)
        return data

    def to_yaml(self) -> str:
        return dump_yaml(self.to_dict())


def _check_stages(recipe: Recipe, path: Path, lines: LineMap) -> list[str]:
    """Stage types, parameters, names and order. Returns warnings (designed-only stages)."""
    warnings: list[str] = []
    produced: set[str] = set()
    names: dict[str, int] = {}
    earlier: list[EarlierStage] = []
    known = sorted(stage.type for stage in all_stages())
    for index, spec in enumerate(recipe.stages):
        loc = ("stages", index)
        stage = get_stage(spec.type)
        if stage is None:
            import difflib

            close = difflib.get_close_matches(spec.type, known, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise RecipeError(
                f"unknown stage type '{spec.type}'",
                where=lines.where(path, loc + ("type",)),
                how=f"{hint}use one of: {', '.join(known)} (see `edgekit stages`)",
            )
        if spec.name in names:
            raise RecipeError(
                f"stage name '{spec.name}' is used twice (stages[{names[spec.name]}] and stages[{index}])",
                where=lines.where(path, loc),
                how="give one of them a different 'name:'",
            )
        names[spec.name] = index
        try:
            config = stage.config.model_validate(spec.params)
        except ValidationError as exc:
            raise pydantic_error(
                exc, path=path, lines=lines, model_cls=stage.config, error_cls=RecipeError, loc_prefix=loc
            ) from None
        for alternatives in stage.requires:
            if not alternatives & produced:
                wanted = " or ".join(sorted(alternatives))
                makers = sorted(s.type for s in all_stages() if s.produces in alternatives)
                raise RecipeError(
                    f"stage '{spec.name}' needs a {wanted} artifact, but no stage before it produces one",
                    where=lines.where(path, loc),
                    how=f"put a stage that produces it ({', '.join(makers)}) earlier in 'stages'",
                )
        if stage.references is not None:
            try:
                stage.references(config, earlier)
            except ReferenceProblem as exc:
                raise RecipeError(
                    str(exc), where=lines.where(path, loc + ((exc.field,) if exc.field else ())), how=exc.how
                ) from None
        earlier.append(EarlierStage(spec.name, spec.type, stage.produces))
        if stage.produces:
            produced.add(stage.produces)
    return warnings


class LoadedRecipe:
    """A validated recipe plus where it came from (for relative paths and messages)."""

    def __init__(self, recipe: Recipe, path: Path, lines: LineMap, warnings: list[str]):
        self.recipe = recipe
        self.path = path
        self.lines = lines
        self.warnings = warnings
        #: the full-scale chain validation walked (edgekit.planning.chain.Chain, or None when the
        #: model's config is not reachable offline), kept so `recipe validate` prints it without
        #: walking it again; chain_checked says whether validation got that far
        self.chain: Any = None
        self.chain_checked = False

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def where(self, *loc: str | int) -> str:
        return self.lines.where(self.path, tuple(loc))

    @property
    def target_spec(self) -> str:
        """The recipe's target as :func:`edgekit.targets.load_target` takes it (a YAML path
        is relative to the recipe's directory)."""
        spec = self.recipe.target
        if spec.endswith((".yaml", ".yml")) and not Path(spec).is_absolute():
            return str(self.base_dir / spec)
        return spec


def read_recipe(path: Path | str) -> LoadedRecipe:
    """Parse and validate a recipe file against the schema and the stage registry (stage
    types, parameters, order, references). Every problem raises a one-line
    :class:`RecipeError` naming the file and line. Nothing outside the file is looked at: the
    target, the model, the data and the full-scale checks are :func:`edgekit.preflight.load_recipe`'s.
    """
    path = Path(path)
    data, lines = load_yaml(path, error_cls=RecipeError, what="recipe")
    if not isinstance(data, dict):
        raise RecipeError(
            "a recipe must be a YAML mapping (name:, model:, target:, stages: ...)",
            where=str(path),
            how="start from recipes/smollm2_to_orin_nano.yaml",
        )
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise pydantic_error(exc, path=path, lines=lines, model_cls=Recipe, error_cls=RecipeError) from None
    warnings = _check_stages(recipe, path, lines)
    return LoadedRecipe(recipe, path, lines, warnings)


__all__ = ["Recipe", "DataConfig", "EvalSetConfig", "IN_DOMAIN", "Budgets", "StageSpec", "LoadedRecipe", "read_recipe", "format_loc"]
