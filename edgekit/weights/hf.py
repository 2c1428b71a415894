"""The transformers import every reader or writer of a checkpoint shares: quiet (transformers
logs advice meant for its own developers), with edgekit's dtype names."""

from __future__ import annotations

from typing import Any

DTYPES = ("float32", "float16", "bfloat16")


def torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def quiet_transformers() -> None:
    """transformers logs advice meant for its own developers; keep our output readable."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        from optimum.utils import logging as optimum_logging

        optimum_logging.set_verbosity_error()
    except ImportError:
        pass
    warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated.*")
