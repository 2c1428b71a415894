"""Run the distillation under ``accelerate launch`` (DDP over torchrun, FSDP from an accelerate
config file) and relay what the processes report; also the entry point each launched process runs
(``python -m edgekit.distill.launch SPEC.json``).

The launched main process reports to the parent edgekit process with JSON lines on stdout
(``EDGEKIT_EVENT {...}``): progress, log lines, the result or a user-facing error.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from edgekit.distill.loop import train
from edgekit.distill.report import EVENT_PREFIX, EventReporter, emit
from edgekit.distill.spec import TrainSpec
from edgekit.distill.watchdog import watchdog
from edgekit.errors import EdgekitError, StageError


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
    """``python -m accelerate.commands.launch ... -m edgekit.distill.launch SPEC.json``."""
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
    return cmd + ["-m", "edgekit.distill.launch", str(spec_path)]


def launch(spec: TrainSpec, ctx: Any) -> dict[str, Any]:
    """Run :func:`~edgekit.distill.loop.train` under ``accelerate launch`` and relay its progress to ``ctx``."""
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
        print("usage: accelerate launch [...] -m edgekit.distill.launch SPEC.json", file=sys.stderr)
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
