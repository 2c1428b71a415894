"""Decode speed: greedy generation with a KV cache, tokens per second after the prompt.

Used by the benchmarks to compare backends side by side on the same prompt. Timing starts
after the prefill (time to first token is reported separately), so the number is the
steady decode rate a user sees while text streams.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


def _result(prompt_len: int, new_tokens: int, ttft: float, decode_seconds: float, tokens: list[int]) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_len,
        "new_tokens": new_tokens,
        "ttft_ms": round(ttft * 1000, 2),
        "decode_tokens_per_s": round((new_tokens - 1) / decode_seconds, 2) if decode_seconds > 0 else None,
        "tokens": tokens,
    }


def decode_speed_onnx(model_path: Path, prompt_ids: list[int], *, new_tokens: int = 64, threads: int | None = None) -> dict[str, Any]:
    import numpy as np

    from edgekit.measure.onnx_session import DecoderSession

    session = DecoderSession(model_path, threads=threads)
    ids = np.asarray([prompt_ids], dtype=np.int64)
    _, warm = session.forward(ids[:, :4])  # first calls allocate; keep them out of the timing
    session.forward(ids[:, 4:5], warm)
    start = time.perf_counter()
    logits, past = session.forward(ids)
    token = int(logits[0, -1].argmax())
    ttft = time.perf_counter() - start
    tokens = [token]
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        logits, past = session.forward(np.asarray([[token]], dtype=np.int64), past)
        token = int(logits[0, -1].argmax())
        tokens.append(token)
    return _result(len(prompt_ids), new_tokens, ttft, time.perf_counter() - start, tokens)


def decode_speed_torch(model: Any, prompt_ids: list[int], *, new_tokens: int = 64) -> dict[str, Any]:
    import torch

    with torch.inference_mode():
        warm = model(input_ids=torch.tensor([prompt_ids[:4]]), use_cache=True)
        model(input_ids=torch.tensor([prompt_ids[4:5]]), past_key_values=warm.past_key_values, use_cache=True)
        start = time.perf_counter()
        out = model(input_ids=torch.tensor([prompt_ids]), use_cache=True)
        token = int(out.logits[0, -1].argmax())
        ttft = time.perf_counter() - start
        past, tokens = out.past_key_values, [token]
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(input_ids=torch.tensor([[token]]), past_key_values=past, use_cache=True)
            past, token = out.past_key_values, int(out.logits[0, -1].argmax())
            tokens.append(token)
    return _result(len(prompt_ids), new_tokens, ttft, time.perf_counter() - start, tokens)
