"""Calibration samples: fixed windows from the text *before* the held-out split."""

from __future__ import annotations

from typing import Any, Sequence

from edgekit.errors import DataError


def calibration_samples(ids: Sequence[int], *, samples: int, sequence_length: int, where: str = "data.source") -> list[Any]:
    """``samples`` windows of ``sequence_length`` tokens, evenly spaced over the calibration
    split (deterministic: no RNG, so a rerun calibrates on the same tokens)."""
    import torch

    if len(ids) < sequence_length:
        raise DataError(
            f"the calibration text has {len(ids)} tokens, fewer than one sample of {sequence_length}",
            where=where,
            how="give more text (the held-out split is taken from the end first) or lower sequence_length",
        )
    span = len(ids) - sequence_length
    count = min(samples, max(1, len(ids) // sequence_length))  # never more windows than fit without overlap
    starts = [round(i * span / max(count - 1, 1)) for i in range(count)] if count > 1 else [0]
    if hasattr(ids, "dtype"):  # a numpy array / memmap of token ids (edgekit.models.text.tokenize_to_file)
        import numpy as np

        return [torch.from_numpy(np.asarray(ids[s : s + sequence_length], dtype=np.int64)).unsqueeze(0) for s in starts]
    return [torch.tensor([ids[s : s + sequence_length]], dtype=torch.long) for s in starts]
