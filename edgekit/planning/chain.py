"""The shape chain: a recipe walked stage by stage from the model's config alone.

``edgekit recipe validate`` (and ``compress``, before its first stage) runs
:func:`check_chain`: from the model's shape (config.json of a local directory, the local
Hugging Face cache, or the published configs kept in the repo; no weights, no download) it
follows every stage — prune solves the student's shape, distill is sized per GPU, quantize
checks its group size against every quantized layer's input width *after* pruning, the
deployed model and the engine's profiles are sized against the target — and refuses, with
one line naming the stage, the number and a fix, anything that would otherwise fail hours
into a run. :func:`build_chain` returns the walk as rows for the table ``recipe validate``
prints. Arithmetic only (milliseconds even for a 70B). Every memory figure is a
prediction in decimal GB (:mod:`edgekit.sizing`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekit.engine.options import BuildOptions
from edgekit.errors import EdgekitError, RecipeError
from edgekit.sizing import GB, GIB, RUNTIME_ALLOWANCE_GB, ModelShape

_FLOAT_BITS = {"float32": 32, "float16": 16, "bfloat16": 16}
#: group sizes the quantize stage offers (largest first: fewest scales)
GROUP_SIZES = (128, 64, 32)
#: defaults of the engine a recipe without a build_engine stage is planned for
#: the build_engine stage's defaults, from the one model of the build options
DEFAULT_MAX_BATCH = BuildOptions.model_fields["max_batch"].default
DEFAULT_MAX_PREFILL = BuildOptions.model_fields["max_prefill"].default


@dataclass
class ChainRow:
    """One stage of the walk: the model's shape after it, and what the stage costs."""

    stage: str
    type: str
    shape: ModelShape | None
    parameters: int | None
    #: predicted memory (decimal GB) and what it is: "weights", "per GPU", "on the target"
    memory_gb: float | None = None
    memory_what: str = ""
    #: tokens the stage reads (calibration, training, held-out evaluation)
    tokens: int | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        from edgekit.prune.shapes import shape_dict

        return {"stage": self.stage, "type": self.type, "shape": shape_dict(self.shape) if self.shape else None,
                "parameters": self.parameters, "memory_gb": None if self.memory_gb is None else round(self.memory_gb, 3),
                "memory": self.memory_what, "tokens": self.tokens, "note": self.note}


@dataclass
class Chain:
    model: str
    #: where the model's config came from
    origin: str
    target: str
    rows: list[ChainRow] = field(default_factory=list)
    #: tokens the recipe's text holds (estimate), when known
    corpus_tokens: int | None = None
    #: problems found, in stage order: (RecipeError, stage name)
    problems: list[tuple[EdgekitError, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "config_from": self.origin, "target": self.target,
                "corpus_tokens": self.corpus_tokens, "stages": [r.to_dict() for r in self.rows],
                "problems": [str(p) for p, _ in self.problems]}

    def table(self) -> str:
        """The chain as a plain-text table (shape, parameters, memory, tokens per stage)."""
        header = ("stage", "shape (hidden/mlp/layers/heads)", "params", "memory (GB, predicted)", "tokens", "note")
        lines = []
        for row in self.rows:
            s = row.shape
            shape = f"{s.hidden_size}/{s.intermediate_size}/{s.num_layers}/{s.num_heads}:{s.num_kv_heads}" if s else "-"
            params = f"{row.parameters / 1e9:.3f}B" if row.parameters and row.parameters >= 1e8 else (
                f"{row.parameters / 1e6:.2f}M" if row.parameters else "-")
            memory = f"{row.memory_gb:.2f} {row.memory_what}" if row.memory_gb is not None else "-"
            tokens = _tokens(row.tokens) if row.tokens else "-"
            lines.append((f"{row.stage} ({row.type})" if row.stage != row.type else row.stage, shape, params, memory,
                          tokens, row.note))
        widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header[:-1])]
        out = [f"model {self.model} ({self.origin}) -> {self.target}"
               + (f"; text ≈{_tokens(self.corpus_tokens)} tokens" if self.corpus_tokens else "")]
        fmt = "  ".join(f"{{:{'<' if i in (0, 1) else '>'}{w}}}" for i, w in enumerate(widths)) + "  {}"
        out.append(fmt.format(*header).rstrip())
        out.append(fmt.format(*("-" * w for w in widths), "-" * 4))
        out.extend(fmt.format(*line).rstrip() for line in lines)
        return "\n".join(out)


def _tokens(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


# --------------------------------------------------------------------------- helpers


def _problem(chain: Chain, stage: str, what: str, where: str, how: str) -> None:
    chain.problems.append((RecipeError(what, where=where, how=how), stage))


def _source_shape(source: Any) -> tuple[ModelShape, str] | None:
    from edgekit.models.source import model_shape_with_origin

    try:
        return model_shape_with_origin(source)
    except (KeyError, ValueError, OSError):
        return None  # the load stage reports unreadable models; these checks need a readable shape


def _parameters(shape: ModelShape) -> int:
    from edgekit.prune.shapes import total_parameters

    return total_parameters(shape)


def quantized_widths(shape: ModelShape, *, lm_head: bool = False) -> dict[str, int]:
    """Input width of each kind of quantized Linear: what a group size must divide."""
    widths = {"hidden_size (q/k/v/gate/up input)": shape.hidden_size,
              "query heads x head_dim (o_proj input)": shape.num_heads * shape.head_dim,
              "intermediate_size (down_proj input)": shape.intermediate_size}
    if lm_head:
        widths["hidden_size (lm_head input)"] = shape.hidden_size
    return widths


# --------------------------------------------------------------------------- distill


def _accelerate_setup(loaded: Any, index: int, config: Any) -> dict[str, Any]:
    """Processes / sharding / offload read from the distill stage's accelerate config file
    (untrusted input: bounded, one-line errors pointing at its line)."""
    from edgekit.yamlio import load_yaml

    path = Path(config.accelerate_config).expanduser()
    path = path if path.is_absolute() else loaded.base_dir / path
    where_field = loaded.where("stages", index, "accelerate_config")
    if not path.exists():  # anything else that is not a readable YAML file: load_yaml says what it is
        raise RecipeError(f"accelerate config file {config.accelerate_config!r} does not exist", where=where_field,
                          how="give the path of a file `accelerate config` wrote (relative to the recipe), or remove "
                          "accelerate_config")
    data, lines = load_yaml(path, error_cls=RecipeError, what="accelerate config")
    if not isinstance(data, dict):
        raise RecipeError("an accelerate config file is a YAML mapping", where=str(path),
                          how="give a file `accelerate config` wrote (distributed_type:, num_processes:, ...)")

    def bad(key: tuple, expected: str) -> RecipeError:
        return RecipeError(f"accelerate config: {'.'.join(map(str, key))} must be {expected}",
                           where=lines.where(path, key), how=f"correct '{key[-1]}' in {path.name}")

    def integer(key: tuple, value: Any, default: int) -> int:
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65_536:
            raise bad(key, "an integer in 1..65536")
        return value

    kind = data.get("distributed_type", "NO")
    if not isinstance(kind, str) or len(kind) > 32:
        raise bad(("distributed_type",), "a string (NO, MULTI_GPU, FSDP, ...)")
    kind = kind.upper()
    processes = integer(("num_processes",), data.get("num_processes"), 1)
    machines = integer(("num_machines",), data.get("num_machines"), 1)
    mixed = data.get("mixed_precision")
    fsdp = data.get("fsdp_config") or {}
    if not isinstance(fsdp, dict):
        raise bad(("fsdp_config",), "a mapping")
    sharding, offload = "none", False
    if kind == "FSDP":
        strategy = fsdp.get("fsdp_sharding_strategy", "FULL_SHARD")
        names = {1: "full", 2: "grad_op", 3: "none", 4: "hybrid", 5: "hybrid", "FULL_SHARD": "full",
                 "SHARD_GRAD_OP": "grad_op", "NO_SHARD": "none", "HYBRID_SHARD": "hybrid", "HYBRID_SHARD_ZERO2": "hybrid"}
        if int(fsdp.get("fsdp_version", 1) or 1) == 2 and "fsdp_reshard_after_forward" in fsdp:
            strategy = "FULL_SHARD" if fsdp["fsdp_reshard_after_forward"] else "SHARD_GRAD_OP"
        key = strategy.upper() if isinstance(strategy, str) else strategy
        if isinstance(key, bool) or key not in names:
            raise bad(("fsdp_config", "fsdp_sharding_strategy"), "FULL_SHARD, SHARD_GRAD_OP, NO_SHARD or HYBRID_SHARD")
        sharding = names[key]
        offload = fsdp.get("fsdp_offload_params") in (True, "true", "True")
    return {"kind": kind, "processes": processes, "machines": machines, "sharding": sharding, "offload": offload,
            "mixed_precision": mixed if isinstance(mixed, str) else None,
            "checkpointing": fsdp.get("fsdp_activation_checkpointing") in (True, "true", "True"), "file": path.name}


def training_setup(loaded: Any, index: int, config: Any) -> Any:
    """The :class:`~edgekit.planning.training.TrainingSetup` a distill stage runs with:
    processes from ``processes`` or the accelerate config file (``processes`` > 1 overrides
    its num_processes, as ``edgekit`` passes ``--num_processes``), FSDP sharding and offload
    from its ``fsdp_config``, the rest from the stage."""
    from edgekit.planning.training import TrainingSetup

    precision = config.precision
    accel = _accelerate_setup(loaded, index, config) if config.accelerate_config else None
    if precision == "auto":  # auto on a GPU: bf16 (fp16 on GPUs without it): both 2 bytes
        precision = "bf16"
    compute_bytes = 4 if precision == "fp32" else 2
    optimizer = str(getattr(config, "optimizer", "adamw"))
    optimizer_bytes = 2 if "8bit" in optimizer or "8_bit" in optimizer else 8
    checkpointing = bool(config.gradient_checkpointing)
    if accel is None:
        return TrainingSetup(processes=config.processes, micro_batch=config.batch_size,
                             sequence_length=config.sequence_length, gradient_checkpointing=checkpointing,
                             compute_bytes=compute_bytes, optimizer_bytes=optimizer_bytes,
                             source=f"processes: {config.processes}")
    processes = config.processes if config.processes > 1 else accel["processes"]
    return TrainingSetup(
        processes=processes, sharding=accel["sharding"],
        processes_per_machine=max(1, processes // accel["machines"]), cpu_offload=accel["offload"],
        micro_batch=config.batch_size, sequence_length=config.sequence_length,
        gradient_checkpointing=checkpointing or accel["checkpointing"], compute_bytes=compute_bytes,
        optimizer_bytes=optimizer_bytes, source=f"accelerate config {accel['file']}")


def _check_distill(chain: Chain, loaded: Any, index: int, config: Any, student: ModelShape, teacher: ModelShape,
                   row: ChainRow) -> None:
    from edgekit.planning.training import DEFAULT_GPU_MEMORY_GB, distill_memory, fitting_alternatives, usable_gb

    setup = training_setup(loaded, index, config)
    memory = distill_memory(student, teacher, setup)
    gpu = float(getattr(config, "gpu_memory_gb", None) or DEFAULT_GPU_MEMORY_GB)
    if config.device == "cpu":
        gpu = None
    row.memory_gb, row.memory_what = memory["total"], f"per GPU ({setup.strategy})"
    row.tokens = (config.steps * config.batch_size * config.gradient_accumulation * setup.processes
                  * config.sequence_length)
    if gpu is None:
        row.memory_what = f"per process on the CPU ({setup.strategy})"
        return
    cap = usable_gb(gpu)
    row.note = f"GPU {gpu:g} GB ({cap:.1f} usable)"
    if memory["total"] <= cap:
        return
    parts = ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in memory.items() if k != "total" and v >= 0.05)
    fits = fitting_alternatives(student, teacher, setup, gpu)
    how = ("; or ".join(f"{text} (predicted {gb:.1f} GB)" for text, gb in fits[:2]) if fits else
           "distill a smaller student (prune further), or use GPUs with more memory")
    _problem(chain, loaded.recipe.stages[index].name,
             f"distill needs {memory['total']:.1f} GB per GPU ({setup.strategy}, micro-batch {setup.micro_batch} x "
             f"{setup.sequence_length} tokens, {_parameters(student) / 1e9:.2f}B-parameter student: {parts} GB) but "
             f"the GPU ({gpu:g} GB) has {cap:.1f} GB usable",
             loaded.where("stages", index), f"use {how}"
             + ("; for GPUs other than 80 GB set gpu_memory_gb" if "gpu_memory_gb" in type(config).model_fields else ""))


# --------------------------------------------------------------------------- quantize


def _check_group_size(chain: Chain, loaded: Any, index: int, config: Any, shape: ModelShape,
                      last_prune: tuple[int, Any] | None, exports_tensorrt: bool) -> None:
    if config.method == "fp8":
        return
    group = config.group_size
    if group is None:
        if exports_tensorrt and config.bits == 4:
            _problem(chain, loaded.recipe.stages[index].name,
                     "quantize.group_size null (one INT4 scale per output channel) cannot be exported for TensorRT: its "
                     "INT4 weight-only path takes block-quantized weights only", loaded.where("stages", index, "group_size"),
                     "use group_size 64 or 128")
        return
    widths = quantized_widths(shape, lm_head=config.quantize_lm_head)
    bad = [(name, width) for name, width in widths.items() if width % group]
    if not bad:
        return
    name, width = bad[0]
    others = [g for g in GROUP_SIZES if all(w % g == 0 for w in widths.values())]
    after = ""
    fixes = []
    if last_prune is not None:
        p_index, p_config = last_prune
        p_name = loaded.recipe.stages[p_index].name
        if p_config.params is not None:
            after = f" after prune stage '{p_name}' (params {p_config.params:g} solves {_short(shape)})"
            fixes.append(f"add 'width_multiple: {group}' to the prune stage (stages[{p_index}]) so its solver rounds every "
                         f"width to a multiple of {group}")
        else:
            after = f" after prune stage '{p_name}'"
            field_name = name.split(" ")[0] if not name.startswith("query") else "num_attention_heads"
            lower, upper = width // group * group, (width // group + 1) * group
            fixes.append(f"set the prune stage's {field_name} so that {group} divides it (e.g. {lower}"
                         + (f" or {upper}" if field_name != "num_attention_heads" else "") + ")")
    if others:
        fixes.append(f"use group_size {others[0]}" + (" (a smaller group: more scales)" if others[0] < group else ""))
    _problem(chain, loaded.recipe.stages[index].name,
             f"quantize.group_size {group} does not divide {name} = {width}{after} ({width} / {group} = {width / group:g}): "
             f"quantize would stop after every stage before it had run",
             loaded.where("stages", index, "group_size"), "; or ".join(fixes) or "pick other widths")


def _short(shape: ModelShape) -> str:
    return f"hidden {shape.hidden_size}, intermediate {shape.intermediate_size}, heads {shape.num_heads}/{shape.num_kv_heads}"


# --------------------------------------------------------------------------- deployment


def deployed_memory(shape: ModelShape, weights: Any, *, context_length: int, batch: int, prefill: int,
                    workspace_gib: float = 0.0) -> tuple[Any, dict[str, float]]:
    """(WeightFormat, memory breakdown in GB) of the deployed model, as ``edgekit plan`` and
    the readiness check count it, plus the TensorRT workspace pool (GiB, as TensorRT takes it)."""
    from edgekit.planning import roofline as rf

    group = weights.group_size if weights.method not in (None, "fp8") else None
    fmt = rf.weight_format(weights.precision, group_size=group, quantize_lm_head=weights.quantize_lm_head,
                           hidden_size=shape.hidden_size)
    workload = rf.Workload(context_length=context_length, batch=batch, prefill_chunk=min(prefill, context_length))
    memory = rf.memory_breakdown(shape, fmt, workload, workspace_gb=workspace_gib * GIB / GB)
    return fmt, memory


def _check_deployment(chain: Chain, loaded: Any, target: Any, shape: ModelShape, engine: tuple[int, Any] | None) -> None:
    from edgekit.planning.deployed import recipe_weights

    recipe = loaded.recipe
    weights = recipe_weights(recipe, shape)
    if engine is not None:
        e_index, e_config = engine
        batch, prefill, workspace = e_config.max_batch, e_config.max_prefill, e_config.workspace_gb
    else:
        batch, prefill, workspace = DEFAULT_MAX_BATCH, DEFAULT_MAX_PREFILL, 0.0
    _, memory = deployed_memory(shape, weights, context_length=recipe.context_length, batch=batch, prefill=prefill,
                                workspace_gib=workspace)
    usable = target.memory.usable_gb
    if engine is not None:
        row = next(r for r in chain.rows if r.stage == recipe.stages[engine[0]].name)
        row.memory_gb, row.memory_what = memory["total_gb"], f"on {target.name} (usable {usable:g})"
    if memory["total_gb"] <= usable:
        return
    batch_text = f" x batch {batch}" if batch > 1 else ""
    workspace_text = f" + workspace {memory['workspace_gb']:.2f} GB" if memory["workspace_gb"] else ""
    what = (f"the model will not fit {target.name}: predicted {memory['total_gb']:.2f} GB (weights "
            f"{memory['weights_gb']:.2f} GB at {weights.label if weights.quantized else 'fp16 (TensorRT builds float graphs in FP16)'} + KV cache {memory['kv_cache_gb']:.2f} GB at context "
            f"{recipe.context_length}{batch_text} + activations {memory['activations_gb']:.2f} GB at prefill "
            f"{min(prefill, recipe.context_length)}{workspace_text} + {RUNTIME_ALLOWANCE_GB:g} GB runtime) > {usable:g} GB usable")
    if engine is not None and (memory["kv_cache_gb"] + memory["activations_gb"] + memory["workspace_gb"]
                               > usable - memory["weights_gb"] - RUNTIME_ALLOWANCE_GB) and memory["weights_gb"] < usable:
        _problem(chain, recipe.stages[engine[0]].name, what, loaded.where("stages", engine[0]),
                 "lower build_engine max_batch, max_prefill or workspace_gb, or context_length; or quantize further, or "
                 "pick a larger target")
        return
    _problem(chain, "target", what, loaded.where("target"),
             "add or tighten quantize (bits 4), prune the model, lower context_length, or pick a larger target")


# --------------------------------------------------------------------------- the walk


def build_chain(loaded: Any, target: Any, source: Any) -> Chain | None:
    """Walk the recipe from the model's config; None when no config is reachable offline (a
    hub model neither cached nor published: checked once it is loaded). Problems are
    collected on the chain (:func:`check_chain` raises the first)."""
    from edgekit.pipeline.registry import EarlierStage, get_stage
    from edgekit.prune.shapes import ShapeError, plan_shape

    found = _source_shape(source)
    if found is None:
        return None
    teacher, origin = found
    recipe = loaded.recipe
    chain = Chain(model=recipe.model, origin=origin, target=target.name)
    tokens_by_stage, chain.corpus_tokens = _data_tokens(loaded)
    shape = teacher
    after: list[ModelShape] = []  # the shape each earlier stage leaves (for distill's teacher)
    earlier: list[Any] = []
    last_prune: tuple[int, Any] | None = None
    engine: tuple[int, Any] | None = None
    float_bits = 32
    exports_tensorrt = any(recipe.stage_config(i).format in ("tensorrt", "both")
                           for i, s in enumerate(recipe.stages) if s.type == "export_onnx")
    for index, spec in enumerate(recipe.stages):
        config = recipe.stage_config(index)
        row = ChainRow(spec.name, spec.type, shape, _parameters(shape))
        chain.rows.append(row)
        if spec.type == "load":
            float_bits = _FLOAT_BITS.get(config.dtype, 32)
            row.memory_gb, row.memory_what = _parameters(shape) * float_bits / 8 / GB, f"weights ({config.dtype})"
        elif spec.type == "prune":
            try:
                pruned = plan_shape(shape, config)
            except ShapeError as exc:
                _problem(chain, spec.name, str(exc), loaded.where("stages", index, *((exc.field,) if exc.field else ())),
                         exc.how)
                break  # later stages need the pruned shape
            how = f"params {config.params:g}" if config.params is not None else "explicit sizes"
            multiple = getattr(config, "width_multiple", None)
            row.note = (f"{how} -> {_parameters(pruned) / _parameters(shape):.1%} of the parameters"
                        + (f", widths multiples of {multiple}" if multiple else ""))
            shape, last_prune = pruned, (index, config)
            row.shape, row.parameters = shape, _parameters(shape)
            row.memory_gb, row.memory_what = _parameters(after[-1] if after else teacher) * float_bits / 8 / GB, "teacher weights"
        elif spec.type == "distill":
            from edgekit.distill.stage import resolve_teacher
            from edgekit.pipeline.registry import ReferenceProblem

            methods = [recipe.stage_config(i).method for i, s in enumerate(recipe.stages[:index]) if s.type == "quantize"]
            if config.mode == "qad" and methods and methods[-1] == "fp8":  # a qad distill keeps the grid it is given
                _problem(chain, spec.name, "distill mode qad trains integer weights on their GPTQ grid, but the quantize "
                         "stage before it writes fp8", loaded.where("stages", index, "mode"),
                         "quantize with method gptq, rtn or awq before a qad distill")
            try:
                teacher_index = resolve_teacher(config, earlier)["teacher"]
            except ReferenceProblem:
                teacher_index = None  # the recipe check reports it
            if teacher_index is not None:
                _check_distill(chain, loaded, index, config, shape, after[teacher_index], row)
        elif spec.type == "quantize":
            _check_group_size(chain, loaded, index, config, shape, last_prune, exports_tensorrt)
            bits = 8 if config.method == "fp8" else config.bits
            row.note = f"{config.method} {bits}-bit" + (f", group {config.group_size}" if config.method != "fp8" else "")
        elif spec.type == "build_engine":
            engine = (index, config)
            row.note = f"max batch {config.max_batch}, prefill {config.max_prefill}, context {recipe.context_length}"
        elif spec.type == "evaluate":
            row.tokens = recipe.data.eval_tokens
        if spec.type in ("export_onnx", "bundle"):
            from edgekit.planning.deployed import recipe_weights

            weights = recipe_weights(recipe, shape) if any(s.type == "quantize" for s in recipe.stages[:index]) else None
            label = weights.label if weights else "16-bit float (TensorRT) / float32 (ONNX Runtime)"
            fmt, memory = deployed_memory(shape, weights or _float_weights(), context_length=recipe.context_length,
                                          batch=1, prefill=DEFAULT_MAX_PREFILL)
            row.memory_gb, row.memory_what = memory["weights_gb"], f"weights ({label})"
        if spec.name in tokens_by_stage and row.tokens is None:
            row.tokens = tokens_by_stage[spec.name]
        after.append(shape)
        stage = get_stage(spec.type)
        earlier.append(EarlierStage(spec.name, spec.type, stage.produces if stage else None))
    else:
        _check_deployment(chain, loaded, target, shape, engine)
    return chain


def _float_weights() -> Any:
    from edgekit.planning.deployed import RecipeWeights

    return RecipeWeights(16)


def _data_tokens(loaded: Any) -> tuple[dict[str, int], int | None]:
    """Tokens each data-reading stage asks, and the text's size (the data part's
    :func:`edgekit.models.text.data_budget_rows`, which also refuses a schedule the text
    cannot feed; recipe validation runs that check before this one)."""
    try:
        from edgekit.models.text import data_budget_rows
    except ImportError:
        return {}, None
    try:
        rows = data_budget_rows(loaded)
    except EdgekitError:
        return {}, None  # an unreadable source: check_recipe_sources reports it
    available = next((r["tokens_available"] for r in rows if r.get("tokens_available") is not None), None)
    if available is not None:
        available += loaded.recipe.data.eval_tokens
    return {r["stage"]: r["tokens_asked"] for r in rows if r.get("tokens_asked")}, available


def check_chain(loaded: Any, target: Any, source: Any) -> Chain | None:
    """:func:`build_chain`, raising the first problem (stage order) as one line; the others
    are named after it so a user sees every stage that would fail."""
    chain = build_chain(loaded, target, source)
    if chain is None or not chain.problems:
        return chain
    first, _ = chain.problems[0]
    if len(chain.problems) > 1:
        more = ", ".join(f"'{stage}'" for _, stage in chain.problems[1:])
        first = type(first)(f"{first.what} (also refused: {more})", where=first.where, how=first.how)
    raise first


__all__ = ["Chain", "ChainRow", "build_chain", "check_chain", "deployed_memory", "quantized_widths", "training_setup"]
