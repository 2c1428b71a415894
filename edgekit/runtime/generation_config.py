"""Runtime defaults from the model's own ``generation_config.json``.

A model's publisher says how it should be sampled (DeepSeek-R1-Distill-Qwen-7B: ``do_sample``
true, temperature 0.6, top-p 0.95). ``runtime.sampling`` fields and ``runtime.max_new_tokens``
that a recipe leaves unset (``null``) are taken from there when the bundle is written
(:func:`resolve_runtime`), and ``runtime.json`` records where every value came from under
``sources``. Precedence, per field: the recipe, then ``generation_config.json``, then edgekit's
default. What is read, with transformers' meaning:

* ``do_sample`` false, or absent (transformers' default): greedy, temperature 0, whatever
  ``temperature`` says (transformers ignores it too); true: the file's ``temperature``, or
  transformers' 1.0 when it has none;
* ``top_p``, ``top_k``, ``min_p``, ``repetition_penalty``: the file's value when present, else
  edgekit's default (top-k off: transformers' implicit top-k 50 is not carried over, as vLLM
  does not);
* ``max_new_tokens``: the file's, else the recipe's ``context_length`` for a reasoning model
  (generation then ends at the context's end, never mid-thought at 128), else 128.

The file is untrusted input: read within the bounds of :func:`edgekit.yamlio.load_json_file`
(size, nesting, finite numbers), and every value used must have the right type and lie in the
range the sampler accepts; anything else is a one-line error naming the file and key. Keys
edgekit does not use are ignored (the file holds many).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from edgekit.errors import EdgekitError
from edgekit.runtime.config import RuntimeConfig, SamplingConfig, bounds

GENERATION_CONFIG = "generation_config.json"
MAX_GENERATION_CONFIG_BYTES = 256 << 10

#: edgekit's defaults for what a recipe and the file may leave unset
SAMPLING_DEFAULTS: dict[str, Any] = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}
MAX_NEW_TOKENS_DEFAULT = 128
MAX_NEW_TOKENS_LIMIT = bounds(RuntimeConfig, "max_new_tokens")["le"]

RECIPE, FILE, DEFAULT = "recipe", GENERATION_CONFIG, "default"


def _range(model: Any, key: str, kind: str) -> tuple[str, float, float, bool]:
    # the file's values must fit where they go: the runtime settings' own bounds
    b = bounds(model, key)
    return kind, b.get("ge", b.get("gt")), b["le"], "gt" in b


# key -> (kind, low, high, low open); temperature: 0 or [1e-6, 1e6], as the sampler takes it
_RANGES: dict[str, tuple[str, float, float, bool]] = {
    "temperature": _range(SamplingConfig, "temperature", "number"),
    "top_p": _range(SamplingConfig, "top_p", "number"),
    "top_k": _range(SamplingConfig, "top_k", "int"),
    "min_p": _range(SamplingConfig, "min_p", "number"),
    "repetition_penalty": _range(SamplingConfig, "repetition_penalty", "number"),
    "max_new_tokens": _range(RuntimeConfig, "max_new_tokens", "int"),
}


def _problem(key: str, value: Any) -> str | None:
    if key == "do_sample":
        return None if isinstance(value, bool) else f"must be true or false, not {type(value).__name__}"
    kind, low, high, low_open = _RANGES[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "int" and not isinstance(value, int)):
        return f"must be {'an integer' if kind == 'int' else 'a number'}, not {type(value).__name__} {str(value)[:40]!r}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be finite, not {value!r}"
    if (value <= low if low_open else value < low) or value > high:
        return f"is {value!r}, outside {'(' if low_open else '['}{low:g}, {high:g}]"
    if key == "temperature" and 0 < value < 1e-6:
        return f"is {value!r}: 0 (greedy) or at least 1e-6"
    return None


def read_generation_config(path: Path | str, *, error_cls: type[EdgekitError] = EdgekitError) -> dict[str, Any]:
    """The keys edgekit uses from a ``generation_config.json`` (``do_sample``, ``temperature``,
    ``top_p``, ``top_k``, ``min_p``, ``repetition_penalty``, ``max_new_tokens``), checked; keys
    that are absent or ``null`` are left out. A missing file gives ``{}``."""
    from edgekit.yamlio import load_json_file

    path = Path(path)
    if not path.is_file():
        return {}
    data = load_json_file(path, error_cls=error_cls, what=GENERATION_CONFIG, max_bytes=MAX_GENERATION_CONFIG_BYTES)
    if not isinstance(data, dict):
        raise error_cls(f"{GENERATION_CONFIG} is not a JSON object", where=str(path),
                        how="fix the file (or delete it: edgekit's defaults are used then)")
    out: dict[str, Any] = {}
    for key in ("do_sample", *_RANGES):
        value = data.get(key)
        if value is None:
            continue
        problem = _problem(key, value)
        if problem:
            raise error_cls(f"{GENERATION_CONFIG}: {key} {problem}", where=f"{path}: {key}",
                            how=f"fix or delete the key in the model's {GENERATION_CONFIG}")
        out[key] = float(value) if _RANGES.get(key, ("",))[0] == "number" else value
    return out


#: most end-of-sequence ids a generation_config.json may list
MAX_EOS_IDS = 16


def read_eos_token_ids(path: Path | str, *, error_cls: type[EdgekitError] = EdgekitError) -> list[int]:
    """``eos_token_id`` of a ``generation_config.json`` (an id or a list of ids; ``[]`` when the
    file or the key is absent): the tokens transformers' ``generate`` stops at. They can differ
    from the tokenizer's ``eos_token`` (a GGUF conversion sets the tokenizer's to
    ``<|im_start|>`` while the model ends its turns with ``<|im_end|>``), so the runtime stops
    at both. Bounded: at most :data:`MAX_EOS_IDS` non-negative integers below 2**31."""
    from edgekit.yamlio import load_json_file

    path = Path(path)
    if not path.is_file():
        return []
    data = load_json_file(path, error_cls=error_cls, what=GENERATION_CONFIG, max_bytes=MAX_GENERATION_CONFIG_BYTES)
    value = data.get("eos_token_id") if isinstance(data, dict) else None
    if value is None:
        return []
    ids = value if isinstance(value, list) else [value]
    if len(ids) > MAX_EOS_IDS or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**31 for i in ids):
        raise error_cls(f"{GENERATION_CONFIG}: eos_token_id must be a token id or a list of at most {MAX_EOS_IDS} ids "
                        f"(non-negative integers), not {str(value)[:60]!r}", where=f"{path}: eos_token_id",
                        how=f"fix or delete the key in the model's {GENERATION_CONFIG}")
    return sorted(set(ids))


def sampling_from_generation_config(gen: dict[str, Any]) -> dict[str, tuple[Any, str]]:
    """``{field: (value, source)}`` for the sampling fields ``gen`` (as
    :func:`read_generation_config` returns it) decides; fields it does not decide are absent."""
    out: dict[str, tuple[Any, str]] = {}
    if gen.get("do_sample") is True:
        out["temperature"] = (gen["temperature"], FILE) if "temperature" in gen else (1.0, f"{FILE} (do_sample, transformers' "
                                                                                            "default temperature 1.0)")
    elif "do_sample" in gen or "temperature" in gen:
        out["temperature"] = (0.0, f"{FILE} (do_sample {'false' if 'do_sample' in gen else 'unset'}: greedy)")
    for key in ("top_p", "top_k", "min_p", "repetition_penalty"):
        if key in gen:
            out[key] = (gen[key], FILE)
    return out


def resolve_runtime(runtime: dict[str, Any], gen: dict[str, Any], *, reasoning_model: bool,
                    context_length: int) -> tuple[dict[str, Any], dict[str, str]]:
    """``runtime`` (a RuntimeConfig's ``model_dump``) with every unset (None) sampling field and
    ``max_new_tokens`` filled in: recipe > ``gen`` > default (module docstring). Returns the
    completed dict and ``{field: source}`` for the fields filled in here or set by the recipe."""
    runtime = {**runtime, "sampling": dict(runtime.get("sampling") or {})}
    sampling = runtime["sampling"]
    from_file = sampling_from_generation_config(gen)
    sources: dict[str, str] = {}
    for key, default in SAMPLING_DEFAULTS.items():
        if sampling.get(key) is not None:
            sources[f"sampling.{key}"] = RECIPE
        elif key in from_file:
            sampling[key], sources[f"sampling.{key}"] = from_file[key]
        else:
            sampling[key], sources[f"sampling.{key}"] = default, DEFAULT
    if runtime.get("max_new_tokens") is not None:
        sources["max_new_tokens"] = RECIPE
    elif "max_new_tokens" in gen:
        runtime["max_new_tokens"], sources["max_new_tokens"] = gen["max_new_tokens"], FILE
    elif reasoning_model:
        runtime["max_new_tokens"] = max(1, min(int(context_length), MAX_NEW_TOKENS_LIMIT))
        sources["max_new_tokens"] = "default for a reasoning model: the context length"
    else:
        runtime["max_new_tokens"], sources["max_new_tokens"] = MAX_NEW_TOKENS_DEFAULT, DEFAULT
    return runtime, sources


def needs_resolving(runtime: dict[str, Any]) -> bool:
    """True when a field :func:`resolve_runtime` fills in is unset."""
    sampling = runtime.get("sampling") or {}
    return runtime.get("max_new_tokens") is None or any(sampling.get(k) is None for k in SAMPLING_DEFAULTS)


__all__ = ["GENERATION_CONFIG", "SAMPLING_DEFAULTS", "MAX_NEW_TOKENS_DEFAULT", "read_generation_config",
           "sampling_from_generation_config", "resolve_runtime", "needs_resolving"]
