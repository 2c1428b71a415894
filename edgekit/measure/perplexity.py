"""Perplexity over non-overlapping windows of the held-out split.

The protocol behind every number edgekit reports (and the peers in the README): the
held-out split is the last ``eval_tokens`` tokens of the text; it is cut into windows of
``window`` tokens, each scored on its own (no context carried across windows); the loss of
a window averages over its ``window - 1`` next-token predictions, and the perplexity is
``exp`` of the mean over all predictions.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence


def _windows(ids: Sequence[int], window: int, max_windows: int | None) -> list[list[int]]:
    count = len(ids) // window
    if max_windows:
        count = min(count, max_windows)
    return [list(ids[i * window : (i + 1) * window]) for i in range(count)]


def _result(nll_sum: float, predictions: int, windows: int, window: int) -> dict[str, Any]:
    mean = nll_sum / predictions
    return {"perplexity": math.exp(mean), "nll": mean, "windows": windows, "window": window, "tokens": predictions}


def perplexity_torch(model: Any, ids: Sequence[int], *, window: int, max_windows: int | None = None, advance: Callable[[], None] = lambda: None) -> dict[str, Any]:
    import torch

    nll_sum, predictions = 0.0, 0
    batches = _windows(ids, window, max_windows)
    device = next(model.parameters()).device
    with torch.inference_mode():
        for batch in batches:
            input_ids = torch.tensor([batch], device=device)
            logits = model(input_ids=input_ids, use_cache=False).logits[0, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits, input_ids[0, 1:], reduction="sum")
            nll_sum += float(nll)
            predictions += len(batch) - 1
            advance()
    return _result(nll_sum, predictions, len(batches), window)


def _log_softmax_nll(logits: Any, targets: Any) -> float:
    import numpy as np

    logits = logits.astype(np.float64)
    peak = logits.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(logits - peak).sum(axis=-1)) + peak[:, 0]
    return float((log_norm - logits[np.arange(len(targets)), targets]).sum())


def perplexity_onnx(model_path: Path, ids: Sequence[int], *, window: int, max_windows: int | None = None, advance: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Same protocol on an exported decoder (inputs as optimum writes them, empty KV cache)."""
    import numpy as np

    from edgekit.measure.onnx_session import DecoderSession

    session = DecoderSession(model_path)
    nll_sum, predictions = 0.0, 0
    batches = _windows(ids, window, max_windows)
    for batch in batches:
        logits, _ = session.forward(np.asarray([batch], dtype=np.int64))
        nll_sum += _log_softmax_nll(logits[0, :-1], np.asarray(batch[1:]))
        predictions += len(batch) - 1
        advance()
    return _result(nll_sum, predictions, len(batches), window)
