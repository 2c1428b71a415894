"""Where a stage computes (``device: auto|cuda|cpu``) and in which float dtype.

One rule for prune, distill, quantize (GPTQ) and evaluate:

- ``auto`` is the first CUDA GPU when torch sees one, else the CPU. The environment variable
  ``EDGEKIT_DEVICE`` (``cuda`` or ``cpu``) replaces ``auto`` for every stage of a run — what
  ``scripts/gpu_check.sh`` uses to put a recipe on the GPU without editing it; a stage whose
  recipe names a device explicitly keeps it.
- ``cuda`` on a machine where torch sees no CUDA GPU is a one-line error naming the stage,
  before anything is loaded.
- Half precision where the GPU has it: bfloat16 on a GPU with native bf16 (Ampere and
  later: A100, H100, Orin), else float16; float32 on the CPU (where half-precision matmuls
  are emulated on most hosts and the results are what every CPU-side number was measured in).

Nothing here imports torch at import time (``import edgekit`` stays light).
"""

from __future__ import annotations

import os

from edgekit.errors import StageError

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
ENV = "EDGEKIT_DEVICE"


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _cuda_missing_reason() -> str:
    import torch

    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build"
    return "torch sees no CUDA GPU (driver missing, or CUDA_VISIBLE_DEVICES hides them)"


def requested_device(value: str) -> str:
    """The recipe's ``device`` with ``EDGEKIT_DEVICE`` applied to ``auto`` (validated)."""
    if value not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {value!r}")
    if value != "auto":
        return value
    override = os.environ.get(ENV, "").strip().lower()
    if not override:
        return "auto"
    if override not in DEVICES:
        raise StageError(f"{ENV}={override[:32]!r} is not a device", where=f"environment variable {ENV}",
                         how=f"set {ENV} to one of {', '.join(DEVICES)}, or unset it")
    return override


def resolve_device(value: str, *, stage: str) -> str:
    """``cpu`` or ``cuda`` for a stage's ``device`` setting (see the module docstring)."""
    wanted = requested_device(value)
    if wanted == "auto":
        return "cuda" if cuda_available() else "cpu"
    if wanted == "cuda" and not cuda_available():
        source = f" ({ENV}=cuda)" if value == "auto" else ""
        raise StageError(f"device cuda was requested{source} but {_cuda_missing_reason()}", where=f"stage {stage}",
                         how="set device: auto or cpu, or run on a host with a CUDA GPU and a CUDA build of torch")
    return wanted


def half_dtype() -> str:
    """The half-precision dtype of the current CUDA GPU: bfloat16 where it is native, else float16."""
    import torch

    return "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16"


def compute_dtype(value: str, *, device: str, checkpoint_dtype: str | None = None) -> str:
    """The dtype a stage runs its model in: an explicit ``value`` wins; ``auto`` is float32 on
    the CPU and half precision on a GPU (the checkpoint's own half dtype when it has one and the
    GPU supports it, else :func:`half_dtype`)."""
    if value not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {value!r}")
    if value != "auto":
        return value
    if device != "cuda":
        return "float32"
    half = half_dtype()
    if checkpoint_dtype == "float16" or (checkpoint_dtype == "bfloat16" and half == "bfloat16"):
        return checkpoint_dtype
    return half


def check_dtype_on_device(dtype: str, *, device: str, stage: str) -> None:
    """float16 on the CPU is refused (slow, and overflows where bf16/fp32 would not)."""
    if dtype == "float16" and device == "cpu":
        raise StageError("dtype float16 needs a CUDA GPU", where=f"stage {stage}",
                         how="use dtype auto, float32 or bfloat16 on the CPU")


def tensorrt_available() -> str | None:
    """The installed TensorRT Python package's version, or None (shared: the engine stage, the
    runtime's backend choice and validate all ask)."""
    try:
        import tensorrt as trt
    except Exception:  # ImportError, or a broken CUDA install raising OSError
        return None
    return str(trt.__version__)
