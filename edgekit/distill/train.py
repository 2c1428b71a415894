"""The distillation training loop, on accelerate.

:func:`train` runs in the edgekit process (one process, ``processes: 1``) or in each process
that ``accelerate launch`` starts (``python -m edgekit.distill.train SPEC.json``): the same
code either way. Distribution (DDP, FSDP from an accelerate config file), mixed precision
and gradient accumulation come from accelerate; nothing here talks to torch.distributed.

Reproducibility: which calibration windows make up step ``s`` is a pure function of
(seed, s, micro-batch, rank) — windows are permuted per epoch by a generator seeded with
``seed + epoch`` — so the "data position" of a checkpoint is just its step count. A run
killed at any moment and resumed from the last checkpoint ends bit-identical (on CPU) to an
uninterrupted one: weights, optimizer tensors and RNG are restored exactly, the learning
rate is a function of the step, and wall time never reaches a file.

Under ``accelerate launch`` the main process reports to the parent edgekit process with
JSON lines on stdout (``EDGEKIT_EVENT {...}``): progress, log lines, the result or a
user-facing error. See :func:`launch`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from edgekit.errors import EdgekitError, StageError

EVENT_PREFIX = "EDGEKIT_EVENT "
RESULT_FORMAT = "edgekit.distill/1"


@dataclass
class TrainSpec:
    """Everything a training process needs (JSON-able: written to SPEC.json for launch)."""

    student: str  # the student checkpoint dir (the prune stage's output)
    teacher: str  # the teacher checkpoint dir
    output_dir: str  # where the distilled checkpoint, distill.json and the curve go
    work_dir: str  # resumable checkpoints (survives a killed run)
    config: dict[str, Any]  # DistillConfig.model_dump(mode="json")
    data: dict[str, Any]  # the recipe's data section: source, text_field, eval_tokens, window
    recipe_dir: str = "."
    trust_remote_code: bool = False
    stage: str = "distill"  # the stage's name, for messages
    launched: bool = False  # True in processes started by accelerate launch

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "TrainSpec":
        return cls(**json.loads(text))


# -- pure helpers --------------------------------------------------------------------------


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


class _WindowView:
    """``train_ids[indices]`` over a memory-mapped uint32 token array cut into windows."""

    def __init__(self, array: Any, windows: int, length: int):
        self._windows = array[: windows * length].reshape(windows, length)

    def __getitem__(self, indices: Any) -> Any:
        import numpy as np
        import torch

        return torch.from_numpy(np.asarray(self._windows[np.asarray(indices)], dtype=np.int64))


def model_shape(config: Any) -> dict[str, int]:
    return {
        "layers": int(config.num_hidden_layers),
        "hidden_size": int(config.hidden_size),
        "vocab_size": int(config.vocab_size),
    }


def layer_map(student_config: Any, teacher_config: Any, pruning: dict[str, Any] | None, *, need_hidden: bool, where: str) -> tuple[list[int], list[int] | None]:
    """(teacher layer per student layer, kept teacher hidden channels or None) for the
    hidden-state loss: from prune's ``pruning.json`` when it fits this teacher, else by
    identity/even spread when the widths match."""
    from edgekit.distill.losses import even_layer_map

    s_layers, t_layers = student_config.num_hidden_layers, teacher_config.num_hidden_layers
    s_hidden, t_hidden = student_config.hidden_size, teacher_config.hidden_size
    kept = (pruning or {}).get("kept") or {}
    layers, hidden = kept.get("layers"), kept.get("hidden")
    fits = (
        isinstance(layers, list)
        and len(layers) == s_layers
        and all(isinstance(i, int) and 0 <= i < t_layers for i in layers)
        and (
            (hidden is None and s_hidden == t_hidden)
            or (isinstance(hidden, list) and len(hidden) == s_hidden and all(isinstance(c, int) and 0 <= c < t_hidden for c in hidden))
        )
    )
    if fits:
        return list(layers), (None if hidden is None else list(hidden))
    if s_hidden != t_hidden and need_hidden:
        reason = "its pruning.json does not fit this teacher" if pruning else "there is no pruning.json to map the channels"
        raise StageError(
            f"hidden_weight > 0 but the student's hidden size {s_hidden} differs from the teacher's {t_hidden} and {reason}",
            where=where,
            how="set hidden_weight: 0, or distill from the checkpoint the prune stage read (teacher: auto)",
        )
    return even_layer_map(s_layers, t_layers), None


def decoder_layers(model: Any) -> Any:
    """The decoder's list of transformer blocks (``model.model.layers`` for Llama-likes)."""
    from edgekit.weights.layers import decoder_layers as find_decoder_layers

    try:
        return find_decoder_layers(model)
    except ValueError:
        raise StageError("cannot find the model's decoder layers", how="use a Llama-style architecture (or set hidden_weight: 0)") from None


class HiddenCapture:
    """Forward hooks that keep the outputs of chosen decoder layers while ``active``."""

    def __init__(self, model: Any, indices: list[int]):
        self.outputs: dict[int, Any] = {}
        self.active = False
        self._handles = []
        layers = decoder_layers(model)
        for index in sorted(set(indices)):
            self._handles.append(layers[index].register_forward_hook(self._hook(index)))

    def _hook(self, index: int):
        def hook(_module, _args, output):
            if self.active:
                self.outputs[index] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    @contextlib.contextmanager
    def capturing(self) -> Iterator[dict[int, Any]]:
        self.outputs = {}
        self.active = True
        try:
            yield self.outputs
        finally:
            self.active = False

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def checkpoint_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise StageError(f"cannot read the checkpoint's config.json ({exc})", where=str(path),
                         how="point the stage at a checkpoint directory (config.json + model.safetensors)") from None


def check_checkpoints(spec: TrainSpec) -> None:
    """Refuse quantized or mismatched checkpoints before any heavy work (user errors)."""
    where = f"stage {spec.stage}"
    student, teacher = checkpoint_config(Path(spec.student)), checkpoint_config(Path(spec.teacher))
    for role, cfg in (("student", student), ("teacher", teacher)):
        if cfg.get("quantization_config"):
            method = cfg["quantization_config"].get("quant_method", "quantized")
            raise StageError(
                f"the {role} checkpoint is quantized ({method}); distillation trains float weights",
                where=where,
                how="put distill before quantize, and name a float checkpoint as teacher",
            )
    if student.get("vocab_size") != teacher.get("vocab_size"):
        raise StageError(
            f"the student's vocabulary ({student.get('vocab_size')}) differs from the teacher's ({teacher.get('vocab_size')})",
            where=where,
            how="distill from a teacher with the same tokenizer (the checkpoint the student was pruned from)",
        )


def _checkpoint_dtype(path: Path) -> str:
    cfg = checkpoint_config(path)
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return dtype if dtype in ("float32", "float16", "bfloat16") else "float32"


# -- reporting -------------------------------------------------------------------------------


class _NullTask:
    def advance(self, amount: float = 1) -> None:
        pass

    def update(self, **fields: Any) -> None:
        pass


class NullReporter:
    """What non-main processes (and callers without a stage context) report to."""

    def log(self, message: str) -> None:
        pass

    @contextlib.contextmanager
    def progress(self, total: int | None, description: str) -> Iterator[Any]:
        yield _NullTask()


def emit(event: str, **payload: Any) -> None:
    sys.stdout.write(EVENT_PREFIX + json.dumps({"event": event, **payload}) + "\n")
    sys.stdout.flush()


class _EventTask:
    def advance(self, amount: float = 1) -> None:
        emit("advance", amount=amount)

    def update(self, **fields: Any) -> None:
        emit("update", **{k: v for k, v in fields.items() if k == "description"})


class EventReporter:
    """The launched main process: progress and log lines as JSON events on stdout."""

    def log(self, message: str) -> None:
        emit("log", message=message)

    @contextlib.contextmanager
    def progress(self, total: int | None, description: str) -> Iterator[Any]:
        emit("progress_start", total=total, description=description)
        try:
            yield _EventTask()
        finally:
            emit("progress_end")


# -- the loop ----------------------------------------------------------------------------------


def _resolve_device_precision(config: Any, stage: str = "distill") -> tuple[str, str]:
    from edgekit.devices import half_dtype, resolve_device

    device = resolve_device(config.device, stage=stage)
    precision = config.precision
    if precision == "auto":
        if device == "cuda":
            precision = "bf16" if half_dtype() == "bfloat16" else "fp16"
        else:
            # bf16 autocast pays off only where oneDNN has native bf16 kernels (AVX512-BF16 /
            # AMX): ~1.5x the tokens/s of fp32 on such a 2-core machine. Elsewhere it is emulated.
            precision = "bf16" if _cpu_has_native_bf16() else "fp32"
    if precision == "fp16" and device == "cpu":
        raise StageError("precision fp16 needs a CUDA GPU", where=f"stage {stage}", how="use precision fp32 or bf16 on a CPU")
    return device, precision


@contextlib.contextmanager
def _full_load() -> Iterator[None]:
    """Load a model with all its weights in every process, even under an FSDP config with
    ``fsdp_cpu_ram_efficient_loading`` (which makes transformers give ranks other than 0 empty
    meta weights, for FSDP to fill from rank 0: right for the student, wrong for the teacher)."""
    key = "FSDP_CPU_RAM_EFFICIENT_LOADING"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def trainable_parameters(optimizer: Any) -> list[Any]:
    """The optimizer's parameters in param_groups order: the order of the ``names`` list."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def local_training_state(names: list[str], optimizer: Any, step: int, scalars: dict[str, Any]) -> Any:
    """This process's shard of the training state under FSDP (``use_orig_params``): each
    parameter's local piece (a flat view of its share of the flat parameter, possibly empty),
    the optimizer state as it is in memory (local pieces too), this process's RNG."""
    from edgekit.distill import state as saved

    params = trainable_parameters(optimizer)
    if len(params) != len(names):
        raise StageError(f"the optimizer holds {len(params)} parameters, the student {len(names)}",
                         how="report this as a bug (an FSDP wrapping edgekit does not know?)")
    return saved.TrainingState(step=step, model={n: p.detach() for n, p in zip(names, params)},
                               optimizer=optimizer.state_dict(), rng=saved.rng_state(), scalars=scalars)


def restore_local_state(names: list[str], optimizer: Any, shard: Any, *, where: str) -> None:
    """The inverse of :func:`local_training_state`, after the model is sharded the same way."""
    import torch

    params = trainable_parameters(optimizer)
    if set(shard.model) != set(names) or len(params) != len(names):
        raise StageError("the sharded checkpoint does not match the student's parameters", where=where,
                         how="delete the stage's work dir and run again")
    with torch.no_grad():
        for name, param in zip(names, params):
            tensor = shard.model[name]
            if tuple(tensor.shape) != tuple(param.shape):
                raise StageError(f"the sharded checkpoint's piece of {name} has shape {tuple(tensor.shape)}, this process "
                                 f"holds {tuple(param.shape)}", where=where,
                                 how="resume with the same accelerate config and process count, or delete the work dir")
            param.copy_(tensor)
    optimizer.load_state_dict(shard.optimizer)


def _cpu_has_native_bf16() -> bool:
    import torch

    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def held_out_agreement(student: Any, teacher: Any, ids: list[int], *, window: int, max_windows: int | None) -> dict[str, float]:
    """KL(teacher || student) at T=1 per predicted token and top-1 agreement on held-out
    windows (the same non-overlapping windows as the perplexity protocol)."""
    import torch

    from edgekit.distill.losses import kl_divergence

    count = len(ids) // window
    if max_windows:
        count = min(count, max_windows)
    device = next(student.parameters()).device
    kl_sum, agree, tokens = 0.0, 0, 0
    with torch.inference_mode():
        for i in range(count):
            batch = torch.tensor([ids[i * window : (i + 1) * window]], device=device)
            s = student(input_ids=batch, use_cache=False).logits.float()
            t = teacher(input_ids=batch, use_cache=False).logits.float()
            kl_sum += float(kl_divergence(s, t)) * window
            agree += int((s.argmax(-1) == t.argmax(-1)).sum())
            tokens += window
    return {"kl": kl_sum / tokens, "agreement": agree / tokens}


def train(spec: TrainSpec, reporter: Any = None) -> dict[str, Any]:
    """Distil ``spec.student`` from ``spec.teacher``; the main process writes the result into
    ``spec.output_dir`` and returns the metrics (other processes return {})."""
    from edgekit.distill.config import DistillConfig

    config = DistillConfig.model_validate(spec.config)
    check_checkpoints(spec)
    _reset_accelerate()
    try:
        return _train(spec, config, reporter)
    finally:
        if not spec.launched:
            _reset_accelerate()


def _train(spec: TrainSpec, config: Any, reporter: Any) -> dict[str, Any]:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType, set_seed

    from edgekit.distill import state as saved
    from edgekit.distill.losses import combine, hidden_state_mse, kl_divergence, next_token_cross_entropy
    from edgekit.measure.perplexity import perplexity_torch
    from edgekit.weights.checkpoint import load_checkpoint, torch_dtype
    from edgekit.models.text import read_token_splits, token_splits_from_file

    where = f"stage {spec.stage}"
    device, precision = _resolve_device_precision(config, spec.stage)
    need_hidden = config.hidden_weight > 0
    handlers = []
    if config.kl_weight == 0 and config.ce_weight == 0:  # the head gets no gradient: tell DDP
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    accelerator = Accelerator(
        cpu=device == "cpu",
        mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision],
        gradient_accumulation_steps=config.gradient_accumulation,
        kwargs_handlers=handlers,
    )
    main = accelerator.is_main_process
    report = reporter if (reporter is not None and main) else NullReporter()
    world, rank = accelerator.num_processes, accelerator.process_index
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if fsdp and getattr(accelerator, "is_fsdp2", False):
        raise StageError("the accelerate config asks for FSDP2 (fsdp_version: 2); edgekit's resumable checkpoints support FSDP1",
                         where=where, how="set fsdp_version: 1 in the accelerate config (see recipes/accelerate/fsdp_8gpu.yaml)")
    if fsdp and not accelerator.state.fsdp_plugin.use_orig_params:
        raise StageError("FSDP with fsdp_use_orig_params: false cannot keep weight decay off norms and biases",
                         where=where, how="set fsdp_use_orig_params: true in the accelerate config (see recipes/accelerate/fsdp_8gpu.yaml)")
    set_seed(config.seed)

    # -- models
    student_dir, teacher_dir, work_dir = Path(spec.student), Path(spec.teacher), Path(spec.work_dir)
    saved_dtype = _checkpoint_dtype(student_dir)
    compute_dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[precision]
    student, tokenizer = load_checkpoint(student_dir, dtype="float32", trust_remote_code=spec.trust_remote_code)
    with _full_load():  # the teacher is not sharded: every rank needs all of its weights
        teacher, _ = load_checkpoint(teacher_dir, dtype=compute_dtype, trust_remote_code=spec.trust_remote_code)
    teacher.eval().requires_grad_(False).to(accelerator.device)
    student.config.use_cache = False
    pruning_path = student_dir / "pruning.json"
    pruning = json.loads(pruning_path.read_text()) if pruning_path.is_file() else None
    layers, channels = layer_map(student.config, teacher.config, pruning, need_hidden=need_hidden, where=where)

    if config.freeze_embeddings:
        student.get_input_embeddings().weight.requires_grad_(False)
        head = student.get_output_embeddings()
        if head is not None:
            head.weight.requires_grad_(False)
    fsdp_checkpointing = fsdp and bool(getattr(accelerator.state.fsdp_plugin, "activation_checkpointing", False))
    if config.gradient_checkpointing and not fsdp_checkpointing:  # FSDP's own wraps each layer already: never both
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # -- data: train on the calibration split only, cut into non-overlapping windows
    data = spec.data
    if data.get("token_file"):  # a large corpus, tokenized once by the stage (distill/stage.py)
        splits = token_splits_from_file(data["token_file"], eval_tokens=data["eval_tokens"], window=data["window"])
    else:
        splits = read_token_splits(data, tokenizer, base_dir=Path(spec.recipe_dir))
    length = config.sequence_length
    windows = len(splits.calibration) // length
    if windows < 1:
        raise StageError(
            f"the calibration text has {len(splits.calibration)} tokens, fewer than one training sequence of {length}",
            where=where,
            how="give more text (the held-out split is taken from the end first) or lower sequence_length",
        )
    if isinstance(splits.calibration, list):
        train_ids = torch.tensor(splits.calibration[: windows * length], dtype=torch.long).view(windows, length)
    else:  # memory-mapped: windows are read on demand, never the whole corpus at once
        train_ids = _WindowView(splits.calibration, windows, length)
    order = WindowOrder(windows, seed=config.seed, batch_size=config.batch_size, accumulation=config.gradient_accumulation, world=world)

    # -- optimizer: no weight decay on vectors (norms, biases)
    named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    decay = [(n, p) for n, p in named if p.ndim >= 2]
    no_decay = [(n, p) for n, p in named if p.ndim < 2]
    groups = [g for g in ({"params": [p for _, p in decay], "weight_decay": config.weight_decay},
                          {"params": [p for _, p in no_decay], "weight_decay": 0.0}) if g["params"]]
    names = [n for n, _ in decay] + [n for n, _ in no_decay]
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate)

    # -- resume
    # A checkpoint resumes only the run that wrote it (the runner's work dir is per cache key
    # already; this also guards direct callers of train()).
    setup = {"world": world, "precision": precision, "device": device, "parameters": len(names),
             "config": config.model_dump(mode="json"), "windows": windows}
    if main:
        saved.clean_temporaries(work_dir)
    if fsdp:
        accelerator.wait_for_everyone()  # rank 0 cleaned half-written checkpoints first
    resumed = saved.load_state(work_dir, names, rank=rank if fsdp else None)
    if resumed is not None and resumed.scalars.get("setup") != setup:
        report.log(f"ignoring the checkpoint at step {resumed.step} in {work_dir}: another configuration or process count wrote it")
        resumed = None
    scalars: dict[str, Any] = {"elapsed_seconds": 0.0, "train_seconds": 0.0, "evals": [], "losses": []}
    start = 0
    if resumed is not None and not fsdp:  # under FSDP: each rank's shard, once the model is sharded (below)
        params = dict(student.named_parameters())
        if set(resumed.model) != set(params):
            raise StageError("the resumable checkpoint does not match the student's parameters", where=str(resumed.path),
                             how=f"delete {work_dir} and run again")
        with torch.no_grad():
            for name, tensor in resumed.model.items():
                params[name].copy_(tensor)
        optimizer.load_state_dict(resumed.optimizer)
    if resumed is not None:
        if not fsdp:
            saved.set_rng_state(resumed.rng)
        scalars.update(resumed.scalars)
        start = resumed.step

    model, optimizer = accelerator.prepare(student, optimizer)
    if resumed is not None and fsdp:
        restore_local_state(names, optimizer, resumed, where=str(resumed.path))
        saved.set_rng_state(resumed.rng)
    if resumed is not None:
        report.log(f"resuming from step {start} ({resumed.path.name}{', sharded over ' + str(world) + ' processes' if fsdp else ''})")
    if resumed is not None and accelerator.scaler is not None and "scaler" in resumed.scalars:
        accelerator.scaler.load_state_dict(resumed.scalars["scaler"])
    unwrapped = accelerator.unwrap_model(model)
    student_capture = HiddenCapture(unwrapped, list(range(len(layers)))) if need_hidden else None
    teacher_capture = HiddenCapture(teacher, layers) if need_hidden else None
    channel_index = torch.tensor(channels, dtype=torch.long, device=accelerator.device) if channels is not None else None
    weights = {"kl": config.kl_weight, "ce": config.ce_weight, "hidden": config.hidden_weight}
    evals, losses = scalars["evals"], scalars["losses"]

    def evaluate(step: int, max_windows: int | None, scored: Any = None) -> dict[str, Any]:
        scored = model if scored is None else scored
        scored.eval()
        ppl = perplexity_torch(scored, splits.evaluation, window=data["window"], max_windows=max_windows)
        agreement = held_out_agreement(scored, teacher, splits.evaluation, window=data["window"], max_windows=max_windows)
        model.train()
        since = [entry["loss"] for entry in losses if entry["step"] > (evals[-1]["step"] if evals else 0)]
        record = {
            "step": step,
            "perplexity": ppl["perplexity"],
            "kl": agreement["kl"],
            "agreement": agreement["agreement"],
            "windows": ppl["windows"],
            "train_loss": sum(since) / len(since) if since else None,
        }
        report.log(f"step {step}: held-out perplexity {record['perplexity']:.4g}, KL to teacher {record['kl']:.4g}, "
                   f"top-1 agreement {record['agreement']:.3f}")
        return record

    def checkpoint(step: int) -> None:
        if fsdp:
            # Every rank writes its own shard (no process holds the whole optimizer state).
            scalars_now = dict(scalars, setup=setup)
            if accelerator.scaler is not None:
                scalars_now["scaler"] = accelerator.scaler.state_dict()
            tmp = saved.sharded_tmp_dir(work_dir, step)
            if main:
                watchdog.check()
                shutil.rmtree(tmp, ignore_errors=True)
            accelerator.wait_for_everyone()
            saved.save_shard(tmp, rank, local_training_state(names, optimizer, step, scalars_now), names)
            accelerator.wait_for_everyone()
            if main:
                try:
                    saved.seal_sharded(work_dir, step, world, scalars_now)
                except ValueError as exc:
                    raise StageError(f"cannot write the sharded checkpoint: {exc}", where=where,
                                     how="put the stage's work dir (the recipe's output) on a filesystem every process sees") from None
            accelerator.wait_for_everyone()
            return
        if main:
            watchdog.check()
            scalars_now = dict(scalars, setup=setup)
            if accelerator.scaler is not None:
                scalars_now["scaler"] = accelerator.scaler.state_dict()
            state = saved.TrainingState(
                step=step,
                model={n: p for n, p in unwrapped.named_parameters()},
                optimizer=optimizer.state_dict(),
                rng=saved.rng_state(),
                scalars=scalars_now,
            )
            saved.save_state(work_dir, state, names)
        accelerator.wait_for_everyone()

    model.train()
    if not evals:
        evals.append(evaluate(0, None))  # all windows, like the final one: start and end compare
    tokens_per_step = config.batch_size * length * config.gradient_accumulation * world
    session_tokens, session_seconds = 0, 0.0
    step, stopped = start, "steps"
    loop_started = time.perf_counter()
    elapsed_before = float(scalars["elapsed_seconds"])
    describe = f"distill {config.steps} steps × {tokens_per_step} tokens ({device}, {precision}, {world} process{'es' if world > 1 else ''})"
    with report.progress(config.steps - start, describe) as bar:
        while step < config.steps:
            watchdog.check()
            began = time.perf_counter()
            lr = learning_rate_at(step, peak=config.learning_rate, steps=config.steps, warmup=config.warmup_steps, min_ratio=config.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            sums = torch.zeros(4, dtype=torch.float64)
            for micro in range(config.gradient_accumulation):
                batch = train_ids[order.indices(step, micro, rank)].to(accelerator.device)
                with accelerator.accumulate(model):
                    with torch.no_grad(), accelerator.autocast():
                        with teacher_capture.capturing() if teacher_capture else contextlib.nullcontext() as t_hidden:
                            t_logits = teacher(input_ids=batch, use_cache=False).logits
                    with student_capture.capturing() if student_capture else contextlib.nullcontext() as s_hidden:
                        s_logits = model(input_ids=batch, use_cache=False).logits
                    parts = {}
                    if config.kl_weight:
                        parts["kl"] = kl_divergence(s_logits, t_logits, config.temperature)
                    if config.ce_weight:
                        parts["ce"] = next_token_cross_entropy(s_logits, batch)
                    if need_hidden:
                        parts["hidden"] = hidden_state_mse([s_hidden[i] for i in range(len(layers))], t_hidden, layers, channel_index)
                    loss = combine(parts, weights)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and config.max_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                sums += torch.tensor([float(loss.detach()), *(float(parts[k].detach()) if k in parts else 0.0 for k in ("kl", "ce", "hidden"))],
                                     dtype=torch.float64)
                del t_logits, s_logits, parts, loss
            sums /= config.gradient_accumulation
            if world > 1:
                sums = accelerator.reduce(sums.to(accelerator.device), reduction="mean").cpu()
            step += 1
            spent = time.perf_counter() - began
            session_tokens += tokens_per_step
            session_seconds += spent
            scalars["train_seconds"] = float(scalars["train_seconds"]) + spent
            entry = {"step": step, "loss": float(sums[0]), "lr": lr}
            entry.update({k: float(sums[i + 1]) for i, k in enumerate(("kl", "ce", "hidden")) if k in weights and weights[k]})
            losses.append(entry)
            bar.advance()
            bar.update(description=f"{describe}: loss {entry['loss']:.4f}, {session_tokens / max(session_seconds, 1e-9):,.0f} tok/s")
            scalars["elapsed_seconds"] = elapsed_before + (time.perf_counter() - loop_started)
            time_up = config.max_minutes is not None and scalars["elapsed_seconds"] >= config.max_minutes * 60
            if config.max_minutes is not None and world > 1:  # every process stops at the same step
                flag = torch.tensor([1.0 if time_up else 0.0], device=accelerator.device)
                time_up = bool(accelerator.reduce(flag, reduction="sum").item() > 0)
            if time_up and step < config.steps:
                stopped = "max_minutes"
                report.log(f"stopping after {step} steps: max_minutes {config.max_minutes} reached")
                break
            if step < config.steps and step % config.eval_every == 0:
                evals.append(evaluate(step, config.eval_windows))
            if step < config.steps and step % config.checkpoint_every == 0:
                checkpoint(step)
                scalars["elapsed_seconds"] = elapsed_before + (time.perf_counter() - loop_started)
    # The final evaluation scores what is written: the weights rounded to the checkpoint's own
    # dtype, computed as the evaluate stage loads them (float32). Each process holds a full
    # copy, except under FSDP, where the sharded model is scored.
    if student_capture:
        student_capture.remove()
    if teacher_capture:
        teacher_capture.remove()
    if config.gradient_checkpointing:
        unwrapped.gradient_checkpointing_disable()
    if not fsdp:
        # Drop accelerate's autocast wrapper: the final score must be the float32 forward the
        # evaluate stage runs, not a mixed-precision one.
        unwrapped = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    if not fsdp and saved_dtype != "float32":
        with torch.no_grad():
            for parameter in unwrapped.parameters():
                parameter.data = parameter.data.to(torch_dtype(saved_dtype)).float()
    final = evaluate(step, None, scored=None if fsdp else unwrapped)
    unwrapped.eval()
    if evals and evals[-1]["step"] == step:  # the final evaluation (all windows) replaces a periodic one
        final["train_loss"] = evals[-1]["train_loss"]
        evals[-1] = final
    else:
        evals.append(final)

    # -- result
    state_dict = accelerator.get_state_dict(model) if fsdp else None
    accelerator.wait_for_everyone()
    if not main:
        return {}
    out = Path(spec.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    unwrapped.config.use_cache = True
    if fsdp:
        state_dict = {k: v.to(torch_dtype(saved_dtype)) for k, v in state_dict.items()}
        unwrapped.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
        unwrapped.config.dtype = saved_dtype
        unwrapped.config.save_pretrained(out)
    else:
        unwrapped.to(torch_dtype(saved_dtype)).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if pruning_path.is_file():
        shutil.copyfile(pruning_path, out / "pruning.json")
    tokens_seen = step * tokens_per_step
    record = {
        "format": RESULT_FORMAT,
        "config": config.model_dump(mode="json"),
        "teacher": model_shape(teacher.config),
        "student": model_shape(unwrapped.config),
        "layer_map": layers,
        "hidden_channels": "all" if channels is None else len(channels),
        "device": device,
        "precision": precision,
        "processes": world,
        "train_windows": windows,
        "steps": step,
        "stopped": stopped,
        "tokens_seen": tokens_seen,
        "perplexity_start": evals[0]["perplexity"],
        "perplexity_end": evals[-1]["perplexity"],
        "evals": evals,
        "losses": losses,
    }
    (out / "distill.json").write_text(json.dumps(record, indent=1) + "\n")
    plot_curve(out / "distill_curve.png", losses, evals, title=f"{spec.stage}: {model_shape(teacher.config)['layers']}→"
               f"{model_shape(unwrapped.config)['layers']} layers")
    metrics = {
        "perplexity_start": round(evals[0]["perplexity"], 6),
        "perplexity_end": round(evals[-1]["perplexity"], 6),
        "kl_end": round(evals[-1]["kl"], 6),
        "steps": step,
        "kl_start": round(evals[0]["kl"], 6),
        "agreement_start": round(evals[0]["agreement"], 6),
        "agreement_end": round(evals[-1]["agreement"], 6),
        "train_loss_end": round(losses[-1]["loss"], 6) if losses else None,
        "tokens_seen": tokens_seen,
        "train_seconds": round(float(scalars["train_seconds"]), 3),
        "tokens_per_second": round(session_tokens / session_seconds, 1) if session_seconds else None,
        "resumed_from": start,
        "stopped": stopped,
        "processes": world,
        "device": device,
        "precision": precision,
        "curve": [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in e.items()} for e in evals],
    }
    return metrics


def plot_curve(path: Path, losses: list[dict[str, Any]], evals: list[dict[str, Any]], *, title: str) -> None:
    """Training loss and held-out perplexity against the step, as a PNG (deterministic bytes)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 3.6), dpi=100)
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    if losses:
        left.plot([e["step"] for e in losses], [e["loss"] for e in losses], color="tab:blue", linewidth=1)
    left.set_xlabel("step")
    left.set_ylabel("training loss")
    left.set_title("training loss")
    left.grid(alpha=0.3)
    right.plot([e["step"] for e in evals], [e["perplexity"] for e in evals], marker="o", color="tab:orange")
    right.set_xlabel("step")
    right.set_ylabel("perplexity")
    right.set_title("held-out perplexity")
    right.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, format="png", metadata={"Software": None})


# -- process supervision ----------------------------------------------------------------------


class _Watchdog:
    """In a launched worker: stop when the launcher (our parent) is gone, so a killed edgekit
    run leaves no orphan writing into the work dir. A no-op in the edgekit process."""

    def __init__(self) -> None:
        self.parent: int | None = None

    def start(self) -> None:
        self.parent = os.getppid()

        def watch() -> None:
            while True:
                time.sleep(0.5)
                self.check()

        threading.Thread(target=watch, daemon=True, name="edgekit-distill-watchdog").start()

    def check(self) -> None:
        if self.parent is not None and os.getppid() != self.parent:
            os._exit(3)


watchdog = _Watchdog()


def _die_with_parent() -> None:
    """preexec_fn for the launcher: SIGKILL it when edgekit dies (Linux; else a no-op)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort on other platforms
        pass


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_config_path(config: Any, recipe_dir: Path, where: str) -> Path | None:
    """The recipe's accelerate config file (relative to the recipe), checked to exist."""
    if not config.accelerate_config:
        return None
    path = Path(config.accelerate_config).expanduser()
    if not path.is_absolute():
        path = recipe_dir / path
    if not path.is_file():
        problem = "is not a regular file" if path.exists() else "does not exist"
        raise StageError(f"accelerate config file {config.accelerate_config!r} {problem}", where=where,
                         how="give the path of a file `accelerate config` wrote (relative to the recipe), or remove accelerate_config")
    return path


def check_accelerate_config(config: Any, recipe_dir: Path, where: str) -> dict[str, Any]:
    """What the accelerate config file asks for, refused before any process starts when this
    machine or edgekit's training loop cannot give it (instead of a silent fallback or a
    failure in every process). Returns {distributed_type, num_processes, fsdp} for the log."""
    from edgekit.devices import resolve_device
    from edgekit.yamlio import load_yaml

    path = accelerate_config_path(config, recipe_dir, where)
    if path is None:
        return {}
    data, _ = load_yaml(path, error_cls=StageError, what="accelerate config")
    if not isinstance(data, dict):
        raise StageError("the accelerate config is not a YAML mapping", where=str(path), how="write it with `accelerate config`")
    kind = str(data.get("distributed_type", "NO")).upper()
    fsdp = data.get("fsdp_config") if isinstance(data.get("fsdp_config"), dict) else {}
    processes = config.processes if config.processes > 1 else data.get("num_processes", 1)
    if not isinstance(processes, int) or not 1 <= processes <= 4096:
        raise StageError(f"num_processes {processes!r} is not a process count", where=str(path), how="set num_processes to the number of GPUs")
    if kind == "FSDP":
        device = resolve_device(config.device, stage=where.removeprefix("stage "))
        if device != "cuda":
            raise StageError(f"the accelerate config asks for FSDP, which accelerate runs only on GPUs, and this stage runs on the {device}",
                             where=str(path), how="run on a CUDA host, or on the CPU drop accelerate_config and set processes: N (DDP over gloo)")
        if str(fsdp.get("fsdp_version", 1)) != "1":
            raise StageError(f"fsdp_version {fsdp.get('fsdp_version')!r}: edgekit's resumable checkpoints support FSDP1", where=str(path),
                             how="set fsdp_version: 1 (see recipes/accelerate/fsdp_8gpu.yaml)")
        if str(fsdp.get("fsdp_use_orig_params", "true")).lower() != "true":
            raise StageError("fsdp_use_orig_params: false cannot keep weight decay off norms and biases", where=str(path),
                             how="set fsdp_use_orig_params: true (see recipes/accelerate/fsdp_8gpu.yaml)")
        import torch

        gpus = torch.cuda.device_count()
        machines = data.get("num_machines", 1)
        if machines == 1 and processes > gpus:
            raise StageError(f"the accelerate config starts {processes} processes, one per GPU, but torch sees {gpus} GPU(s)",
                             where=str(path), how=f"set num_processes to {gpus} (or processes: {gpus} in the recipe)")
    return {"distributed_type": kind, "num_processes": processes, "fsdp": bool(fsdp) and kind == "FSDP"}


def launch_command(spec_path: Path, config: Any, recipe_dir: Path, where: str) -> list[str]:
    """``python -m accelerate.commands.launch ... -m edgekit.distill.train SPEC.json``."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    path = accelerate_config_path(config, recipe_dir, where)
    if path is not None:
        cmd += ["--config_file", str(path)]
        if config.processes > 1:
            cmd += ["--num_processes", str(config.processes)]
    else:
        # --multi_gpu selects torchrun, which starts N processes; on CPU they use gloo (the
        # training processes pick the device themselves).
        cmd += ["--multi_gpu", "--num_processes", str(config.processes), "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    return cmd + ["-m", "edgekit.distill.train", str(spec_path)]


def launch(spec: TrainSpec, ctx: Any) -> dict[str, Any]:
    """Run :func:`train` under ``accelerate launch`` and relay its progress to ``ctx``."""
    import collections
    import subprocess

    where = f"stage {spec.stage}"
    config = ctx.config
    if config.device != "cpu" and config.accelerate_config is None:
        import torch

        if torch.cuda.is_available() and config.processes > torch.cuda.device_count():
            raise StageError(f"processes {config.processes} but torch sees {torch.cuda.device_count()} CUDA GPU(s)", where=where,
                             how="set processes to at most the number of GPUs (or device: cpu)")
    check_accelerate_config(config, Path(spec.recipe_dir), where)
    work_dir = Path(spec.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    spec = TrainSpec(**{**asdict(spec), "launched": True})
    spec_path = work_dir / "SPEC.json"
    spec_path.write_text(spec.to_json() + "\n")
    cmd = launch_command(spec_path, config, Path(spec.recipe_dir), where)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.setdefault("OPENVINO_TELEMETRY_OPT_OUT", "1")
    tail: collections.deque[str] = collections.deque(maxlen=20)
    result, error = None, None
    with contextlib.ExitStack() as bars:
        bar = None
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env,
                                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        try:
            for line in proc.stdout:
                line = line.rstrip("\n")
                if not line.startswith(EVENT_PREFIX):
                    if line.strip():
                        tail.append(line)
                    continue
                event = json.loads(line[len(EVENT_PREFIX):])
                kind = event.pop("event")
                if kind == "log":
                    ctx.log(event["message"])
                elif kind == "progress_start":
                    bar = bars.enter_context(ctx.progress(event["total"], event["description"]))
                elif kind == "advance" and bar is not None:
                    bar.advance(event.get("amount", 1))
                elif kind == "update" and bar is not None:
                    bar.update(**event)
                elif kind == "progress_end":
                    bars.close()
                    bar = None
                elif kind == "result":
                    result = event["metrics"]
                elif kind == "error" and error is None:
                    error = event
        finally:
            proc.wait()
    if error is not None:
        raise StageError(error["what"], where=error.get("where") or where, how=error.get("how"))
    if proc.returncode != 0 or result is None:
        last = next((l for l in reversed(tail) if "Error" in l), tail[-1] if tail else "no output")
        raise StageError(
            f"distributed training failed (exit code {proc.returncode}): {last.strip()}",
            where=where,
            how="see `accelerate launch` output with --debug, or run with processes: 1 to get a traceback",
        )
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: accelerate launch [...] -m edgekit.distill.train SPEC.json", file=sys.stderr)
        return 2
    spec = TrainSpec.from_json(Path(argv[0]).read_text())
    spec.launched = True
    watchdog.start()
    rank = int(os.environ.get("RANK", "0"))
    try:
        metrics = train(spec, reporter=EventReporter() if rank == 0 else None)
    except EdgekitError as exc:
        emit("error", what=exc.what, where=exc.where, how=exc.how)
        return 2
    if rank == 0:
        emit("result", metrics=metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
