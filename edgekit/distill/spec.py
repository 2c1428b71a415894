"""What a training process is given (:class:`TrainSpec`, JSON-able: the launcher writes it to
SPEC.json for each process) and the checks on its two checkpoints before any heavy work."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgekit.errors import StageError


@dataclass
class TrainSpec:
    """Everything a training process needs (JSON-able: written to SPEC.json for launch)."""

    student: str  # the student checkpoint dir (the prune stage's output)
    teacher: str  # the teacher checkpoint dir
    output_dir: str  # where the distilled checkpoint, distill.json and the curve go
    work_dir: str  # resumable checkpoints (survives a killed run)
    config: dict[str, Any]  # DistillConfig.model_dump(mode="json")
    data: dict[str, Any]  # the recipe's data section: source, text_field, eval_tokens, window
    # the teacher-sampled token file and its facts (edgekit.models.generated.generated_data);
    # None when generated_ratio is 0
    generated: dict[str, Any] | None = None
    recipe_dir: str = "."
    trust_remote_code: bool = False
    stage: str = "distill"  # the stage's name, for messages
    launched: bool = False  # True in processes started by accelerate launch

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "TrainSpec":
        return cls(**json.loads(text))


def checkpoint_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise StageError(f"cannot read the checkpoint's config.json ({exc})", where=str(path),
                         how="point the stage at a checkpoint directory (config.json + model.safetensors)") from None


def check_checkpoints(spec: TrainSpec) -> None:
    """Refuse checkpoints the mode cannot train, or mismatched ones, before any heavy work
    (user errors): standard distillation takes float checkpoints; qad an integer-quantized
    (GPTQ-format) student and a float teacher."""
    where = f"stage {spec.stage}"
    student, teacher = checkpoint_config(Path(spec.student)), checkpoint_config(Path(spec.teacher))
    qad = spec.config.get("mode") == "qad"
    if qad:
        method = (student.get("quantization_config") or {}).get("quant_method")
        if method == "fp8":
            raise StageError("distill mode qad trains integer weights on their GPTQ grid, but the student checkpoint is fp8",
                             where=where, how="quantize with method gptq, rtn or awq before a qad distill")
        if method != "gptq":
            raise StageError(f"distill mode qad needs an integer-quantized (GPTQ-format) student, but the student checkpoint is "
                             f"{'quantized with ' + str(method) if method else 'a float one'}",
                             where=where, how="put a quantize stage (gptq, rtn or awq) right before this distill, or use mode: standard")
    checked = (("teacher", teacher),) if qad else (("student", student), ("teacher", teacher))
    for role, cfg in checked:
        if cfg.get("quantization_config"):
            method = cfg["quantization_config"].get("quant_method", "quantized")
            raise StageError(
                f"the {role} checkpoint is quantized ({method}); "
                + ("the qad teacher is the float model" if qad else "standard distillation trains float weights"),
                where=where,
                how=("name a float checkpoint as teacher (auto: the checkpoint the last quantize stage read)" if qad else
                     "set 'mode: qad' to distil a quantized student, or put distill before quantize; name a float checkpoint as teacher"),
            )
    if student.get("vocab_size") != teacher.get("vocab_size"):
        raise StageError(
            f"the student's vocabulary ({student.get('vocab_size')}) differs from the teacher's ({teacher.get('vocab_size')})",
            where=where,
            how="distill from a teacher with the same tokenizer (the checkpoint the student was pruned from)",
        )


def checkpoint_dtype(path: Path) -> str:
    cfg = checkpoint_config(path)
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return dtype if dtype in ("float32", "float16", "bfloat16") else "float32"
