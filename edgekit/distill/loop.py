"""The distillation training loop, on accelerate.

:func:`train` runs in the edgekit process (one process, ``processes: 1``) or in each process
that ``accelerate launch`` starts (:mod:`edgekit.distill.launch`): the same code either way.
Distribution (DDP, FSDP from an accelerate config file), mixed precision and gradient
accumulation come from accelerate; nothing here talks to torch.distributed.

Reproducibility: the batches and the learning rate are functions of the step
(:mod:`edgekit.distill.schedule`). A run killed at any moment and resumed from the last
checkpoint ends bit-identical (on CPU) to an uninterrupted one: weights, optimizer tensors and
RNG are restored exactly (:mod:`edgekit.distill.checkpoint`), and wall time never reaches a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

from edgekit.distill.checkpoint import find_resumable, restore_local_state, restore_state, save_checkpoint
from edgekit.distill.hidden import HiddenCapture, layer_map
from edgekit.distill.report import NullReporter, model_shape, result_record, stage_metrics, write_result
from edgekit.distill.schedule import (MixedOrder, MixedWindows, WindowOrder, WindowView, learning_rate_at, on_policy_seed,
                                      on_policy_step)
from edgekit.distill.spec import TrainSpec, check_checkpoints, checkpoint_dtype
from edgekit.distill.watchdog import watchdog
from edgekit.errors import StageError
from edgekit.heap import reuse_freed_memory


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


def _cpu_has_native_bf16() -> bool:
    import torch

    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _fake_quant_layers(model: Any) -> list[tuple[str, Any]]:
    """qad's fake-quantized linears (none in a standard run: its model has no such module)."""
    from edgekit.distill.qad import fake_quant_layers

    return fake_quant_layers(model)


def optimizer_groups(named: list[tuple[str, Any]], fake_quant: list[tuple[str, Any]], config: Any) -> tuple[list[dict], list[str]]:
    """AdamW's parameter groups for the trainable ``named`` parameters, and the names in the
    groups' order. Matrices decay; vectors (norms, biases) never do, nor do qad's scales
    (matrices [out, groups], but step sizes). qad's latent weights and scales form groups of
    their own when the recipe gives them a peak learning rate; each group's ``peak`` is what the
    schedule scales each step."""
    latent = {id(m.weight) for _, m in fake_quant}
    scales = {id(m.scales) for _, m in fake_quant}

    def kind(parameter: Any) -> str:
        if id(parameter) in scales:
            return "scale" if config.qad_scale_learning_rate else "vector"
        if id(parameter) in latent and config.qad_weight_learning_rate:
            return "weight"
        return "matrix" if parameter.ndim >= 2 else "vector"

    settings = {"matrix": (config.weight_decay, config.learning_rate), "weight": (config.weight_decay, config.qad_weight_learning_rate),
                "vector": (0.0, config.learning_rate), "scale": (0.0, config.qad_scale_learning_rate)}
    groups, names = [], []
    for name, (decay, peak) in settings.items():
        members = [(n, p) for n, p in named if kind(p) == name]
        if members:
            groups.append({"params": [p for _, p in members], "weight_decay": decay, "peak": peak})
            names += [n for n, _ in members]
    return groups, names


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


def _generated_record(generated: dict[str, Any], order: Any, steps: int, windows: int) -> dict[str, Any]:
    """What distill.json says about the teacher-generated data: its settings, hash and use."""
    return {"sha256": generated["sha256"], "sequences": generated["sequences"], "length": generated["length"],
            "settings": generated["settings"], "windows": windows, "samples": order.samples(steps)}


def on_policy_prompt(length: int) -> int:
    """Tokens of a window kept as the prompt of an on-policy sample: its first quarter."""
    return max(1, length // 4)


def student_samples(model: Any, batch: Any, *, prompt: int, seed: int) -> Any:
    """The batch with every position after its first ``prompt`` tokens replaced by the
    student's own samples (temperature 1, KV cache, a generator seeded by ``seed``)."""
    import torch

    from edgekit.models.generated import sample_token

    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()  # no dropout while sampling; the cache also works under gradient checkpointing
    try:
        with torch.no_grad():
            tokens = [batch[:, :prompt]]
            result = model(input_ids=tokens[0], use_cache=True)
            for position in range(prompt, batch.shape[1]):
                chosen = sample_token(result.logits[:, -1], temperature=1.0, top_p=1.0, generator=generator).to(batch.device)
                tokens.append(chosen)
                if position + 1 < batch.shape[1]:
                    result = model(input_ids=chosen, past_key_values=result.past_key_values, use_cache=True)
    finally:
        model.train(was_training)
    return torch.cat(tokens, dim=1)


def train(spec: TrainSpec, reporter: Any = None) -> dict[str, Any]:
    """Distil ``spec.student`` from ``spec.teacher``; the main process writes the result into
    ``spec.output_dir`` and returns the metrics (other processes return {})."""
    from edgekit.distill.config import DistillConfig

    config = DistillConfig.model_validate(spec.config)
    check_checkpoints(spec)
    _reset_accelerate()
    try:
        with reuse_freed_memory():  # each step's logits-sized tensors reuse the last step's memory (edgekit/heap.py)
            return _train(spec, config, reporter)
    finally:
        if not spec.launched:
            _reset_accelerate()


def _train(spec: TrainSpec, config: Any, reporter: Any) -> dict[str, Any]:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType, set_seed

    from edgekit.distill import state as saved
    from edgekit.distill.losses import TRAINING_LOSSES, combine, hidden_state_mse, next_token_cross_entropy
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
    saved_dtype = checkpoint_dtype(student_dir)
    compute_dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[precision]
    student, tokenizer = load_checkpoint(student_dir, dtype="float32", trust_remote_code=spec.trust_remote_code)
    with _full_load():  # the teacher is not sharded: every rank needs all of its weights
        teacher, _ = load_checkpoint(teacher_dir, dtype=compute_dtype, trust_remote_code=spec.trust_remote_code)
    teacher.eval().requires_grad_(False).to(accelerator.device)
    student.config.use_cache = False
    qad = config.mode == "qad"
    grid_before: dict[str, Any] = {}
    if qad:  # the GPTQ model's QuantLinears become trainable fake-quantized linears (distill/qad.py)
        from edgekit.distill.qad import to_fake_quant

        if fsdp:
            raise StageError("distill mode qad does not run under FSDP (its fake-quantized layers are not sharded)",
                             where=where, how="run qad in one process or under DDP (processes: N, no accelerate_config)")
        grid_before = to_fake_quant(student, trainable_scales=config.qad_scales == "trainable")
        if not grid_before:
            raise StageError("distill mode qad found no quantized linear layer in the student checkpoint", where=where,
                             how="point the stage at the output of a quantize stage (gptq, rtn or awq)")
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
    generated = spec.generated
    if windows < 1 and not (generated and config.generated_ratio == 1):
        raise StageError(
            f"the calibration text has {len(splits.calibration)} tokens, fewer than one training sequence of {length}",
            where=where,
            how="give more text (the held-out split is taken from the end first) or lower sequence_length",
        )
    if isinstance(splits.calibration, list):
        train_ids = torch.tensor(splits.calibration[: windows * length], dtype=torch.long).view(windows, length)
    else:  # memory-mapped: windows are read on demand, never the whole corpus at once
        train_ids = WindowView(splits.calibration, windows, length)
    shape = dict(seed=config.seed, batch_size=config.batch_size, accumulation=config.gradient_accumulation, world=world)
    if generated:  # the teacher's own sequences, mixed in at generated_ratio (models/generated.py)
        from edgekit.models.generated import read_generated

        generated_ids = read_generated(generated["path"], sequences=generated["sequences"], length=generated["length"], window=length)
        train_ids = MixedWindows(train_ids, windows, generated_ids)
        order = MixedOrder(windows, len(generated_ids), ratio=config.generated_ratio, **shape)
    else:
        order = WindowOrder(windows, **shape)

    # -- optimizer: no weight decay on vectors (norms, biases); qad's latent weights and scales
    # may have their own peak learning rates (a scale wants much smaller steps than a weight)
    named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    groups, names = optimizer_groups(named, _fake_quant_layers(student), config)
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate)

    # -- resume
    # A checkpoint resumes only the run that wrote it (the runner's work dir is per cache key
    # already; this also guards direct callers of train()).
    setup = {"world": world, "precision": precision, "device": device, "parameters": len(names),
             "config": config.model_dump(mode="json"), "windows": windows}
    if generated:
        setup["generated"] = generated["sha256"]
    resumed = find_resumable(work_dir, names, setup, accelerator=accelerator, fsdp=fsdp, report=report)
    scalars: dict[str, Any] = {"elapsed_seconds": 0.0, "train_seconds": 0.0, "evals": [], "losses": []}
    start = 0
    if resumed is not None and not fsdp:  # under FSDP: each rank's shard, once the model is sharded (below)
        restore_state(student, optimizer, resumed, work_dir)
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

    model.train()
    if not evals:
        evals.append(evaluate(0, None))  # all windows, like the final one: start and end compare
    tokens_per_step = config.batch_size * length * config.gradient_accumulation * world
    session_tokens, session_seconds = 0, 0.0
    step, stopped = start, "steps"
    loop_started = time.perf_counter()
    elapsed_before = float(scalars["elapsed_seconds"])
    describe = f"distill {config.steps} steps × {tokens_per_step} tokens ({device}, {precision}, {world} process{'es' if world > 1 else ''})"
    schedule = dict(steps=config.steps, warmup=config.warmup_steps, min_ratio=config.min_lr_ratio)
    with report.progress(config.steps - start, describe) as bar:
        while step < config.steps:
            watchdog.check()
            began = time.perf_counter()
            lr = learning_rate_at(step, peak=config.learning_rate, **schedule)  # what the losses record
            for group in optimizer.param_groups:
                # a checkpoint written before groups had their own peak has none: learning_rate's
                group["lr"] = learning_rate_at(step, peak=group.get("peak", config.learning_rate), **schedule)
            sums = torch.zeros(4, dtype=torch.float64)
            on_policy = on_policy_step(step, config.on_policy_ratio)
            for micro in range(config.gradient_accumulation):
                batch = train_ids[order.indices(step, micro, rank)].to(accelerator.device)
                if on_policy:  # GKD: the student writes the rest of the window, the teacher scores every position
                    with accelerator.autocast():
                        batch = student_samples(model, batch, prompt=on_policy_prompt(length),
                                                seed=on_policy_seed(config.seed, step, micro, rank))
                with accelerator.accumulate(model):
                    with torch.no_grad(), accelerator.autocast():
                        with teacher_capture.capturing() if teacher_capture else contextlib.nullcontext() as t_hidden:
                            t_logits = teacher(input_ids=batch, use_cache=False).logits
                    with student_capture.capturing() if student_capture else contextlib.nullcontext() as s_hidden:
                        s_logits = model(input_ids=batch, use_cache=False).logits
                    parts = {}
                    if config.kl_weight:
                        parts["kl"] = TRAINING_LOSSES[config.loss](s_logits, t_logits, config.temperature)
                    if config.ce_weight and not on_policy:  # no cross-entropy on the student's own samples
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
            if on_policy:
                entry["on_policy"] = True
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
                save_checkpoint(step, accelerator=accelerator, fsdp=fsdp, work_dir=work_dir, names=names, optimizer=optimizer,
                                unwrapped=unwrapped, scalars=scalars, setup=setup, where=where)
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
    if qad:  # the scales the checkpoint will store (float16): the model scored last is the one written
        from edgekit.distill.qad import snap_all_scales

        snap_all_scales(unwrapped)
    if not fsdp and saved_dtype != "float32":
        # qad's latent weights and scales are not stored as floats: their codes and float16 scales are
        on_grid = {id(t) for _, m in _fake_quant_layers(unwrapped) for t in (m.weight, m.scales)}
        with torch.no_grad():
            for parameter in unwrapped.parameters():
                if id(parameter) not in on_grid:
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
    qad_record = None
    if qad:  # the codes on the (possibly trained) grid, in the format and quantization_config the input has
        from edgekit.distill.qad import grid_changes, to_linears
        from edgekit.weights.loader import read_quantization_config, save_quantized_checkpoint

        grid_after = to_linears(unwrapped)
        unwrapped.to(torch_dtype(saved_dtype))
        unwrapped.config.dtype = saved_dtype
        quantization_config = read_quantization_config(student_dir) or {}
        save_quantized_checkpoint(unwrapped, grid_after, out, quantization_config=quantization_config)
        for name in ("quantization.json",):  # what the quantize stage did, carried with its codes
            if (student_dir / name).is_file():
                shutil.copyfile(student_dir / name, out / name)
        qad_record = {"scales": config.qad_scales, "method": quantization_config.get("edgekit_method", "gptq"),
                      "bits": quantization_config.get("bits"), "group_size": quantization_config.get("group_size"),
                      "symmetric": quantization_config.get("sym"), **grid_changes(grid_before, grid_after)}
    elif fsdp:
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
    record = result_record(config, teacher=teacher.config, student=unwrapped.config, layers=layers, channels=channels,
                           device=device, precision=precision, world=world, windows=windows, steps=step, stopped=stopped,
                           tokens_seen=tokens_seen, evals=evals, losses=losses,
                           generated=_generated_record(generated, order, step, len(generated_ids)) if generated else None,
                           qad=qad_record)
    write_result(out, record, title=f"{spec.stage}: {model_shape(teacher.config)['layers']}→"
                 f"{model_shape(unwrapped.config)['layers']} layers")
    return stage_metrics(record, train_seconds=scalars["train_seconds"], session_tokens=session_tokens,
                         session_seconds=session_seconds, resumed_from=start)
