"""Load a checkpoint directory written by a stage (plain, GPTQ or FP8), and the transformers
import every reader of a checkpoint shares (quiet, with edgekit's dtype names)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgekit.weights.hf import quiet_transformers, torch_dtype

def load_checkpoint(path: Path, *, dtype: str | None = None, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """Load a checkpoint directory written by the load stage (or any later checkpoint stage)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    config = json.loads((Path(path) / "config.json").read_text())
    if config.get("quantization_config"):
        # Our GPTQ/FP8 checkpoints run on CPU through edgekit's own (simulating) modules.
        from edgekit.weights.loader import load_quantized_model

        model = load_quantized_model(Path(path), dtype=torch_dtype(dtype) if dtype else None)
        return model, AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype:
        kwargs["dtype"] = torch_dtype(dtype)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def load_tokenizer(path: Path, *, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    quiet_transformers()
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
