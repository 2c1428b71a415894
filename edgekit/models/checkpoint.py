"""Turn a model source into a safetensors checkpoint directory (loading one: edgekit.weights.checkpoint).

GGUF sources are de-quantized by transformers' GGUF loader (~20 s for SmolLM2-135M), so
the result is cached under ``<cache>/checkpoints/<key>/`` with the sha256 of every file in
``edgekit-cache.json``. A cache entry is verified on every use; a damaged one (a truncated
or flipped byte in model.safetensors, say) is rebuilt, never trusted.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from edgekit.errors import ModelError
from edgekit.hashing import file_table, sha256_json
from edgekit.models.source import ModelSource
from edgekit.weights.hf import quiet_transformers, torch_dtype

CACHE_RECORD = "edgekit-cache.json"
def _load_from_source(source: ModelSource, *, dtype: str, trust_remote_code: bool) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if source.is_gguf:
        location, kwargs["gguf_file"] = str(source.path.parent), source.path.name
    elif source.kind == "dir":
        location = str(source.path)
    else:
        location = source.spec
        if source.revision:
            kwargs["revision"] = source.revision
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype(dtype), **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"cannot load the model: {first}",
            where=source.spec,
            how="check the model id/path; for a hub id without network, download it first "
            "(`huggingface-cli download`) and point 'model' at the local directory",
        ) from exc
    model.eval()
    return model, tokenizer


def _cache_entry_valid(entry: Path) -> tuple[bool, str | None]:
    record_path = entry / CACHE_RECORD
    if not record_path.is_file():
        return False, None
    try:
        record = json.loads(record_path.read_text())
        actual = file_table(entry)
        actual.pop(CACHE_RECORD, None)
    except (OSError, ValueError) as exc:
        return False, f"unreadable ({exc})"
    if actual != record.get("files"):
        bad = sorted(
            set(actual) ^ set(record.get("files", {}))
            | {k for k in actual if k in record.get("files", {}) and actual[k] != record["files"][k]}
        )
        return False, f"{', '.join(bad)} does not match its recorded sha256"
    return True, None


def cached_checkpoint(source: ModelSource, *, cache_dir: Path, dtype: str, trust_remote_code: bool, log=print) -> Path:
    """A verified safetensors checkpoint for a GGUF source, converting at most once."""
    import transformers

    key = sha256_json({"source": source.fingerprint(), "dtype": dtype, "transformers": transformers.__version__})[:20]
    entry = cache_dir / "checkpoints" / key
    ok, damage = _cache_entry_valid(entry)
    if ok:
        return entry
    if damage:
        log(f"cached checkpoint {entry} is damaged ({damage}); rebuilding it")
    log(f"converting {source.path.name} to a safetensors checkpoint (once; cached in {entry.parent})")
    model, tokenizer = _load_from_source(source, dtype=dtype, trust_remote_code=trust_remote_code)
    tmp = entry.parent / f".tmp-{key}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / CACHE_RECORD).write_text(json.dumps({"source": source.spec, "files": file_table(tmp)}, indent=1))
        if entry.exists():
            shutil.rmtree(entry)
        os.rename(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return entry


def write_checkpoint(source: ModelSource, out_dir: Path, *, cache_dir: Path, dtype: str, trust_remote_code: bool, log=print) -> None:
    """Write the model as a safetensors checkpoint + tokenizer into ``out_dir``."""
    if source.is_gguf:
        entry = cached_checkpoint(source, cache_dir=cache_dir, dtype=dtype, trust_remote_code=trust_remote_code, log=log)
        for path in sorted(entry.iterdir()):
            if path.is_file() and path.name != CACHE_RECORD:
                # A copy, not a hard link: damage to the cache must not reach finished artifacts.
                shutil.copyfile(path, out_dir / path.name)
        return
    model, tokenizer = _load_from_source(source, dtype=dtype, trust_remote_code=trust_remote_code)
    savable_generation_config(model, where=source.spec)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


# generation_config.json flags that only act when sampling / beam searching
_SAMPLING_ONLY = ("temperature", "top_p", "top_k", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")
_BEAM_ONLY = ("early_stopping", "num_beam_groups", "diversity_penalty", "length_penalty", "constrained_beam_search")


def savable_generation_config(model: Any, *, where: str) -> None:
    """Make the model's generation config one transformers agrees to save, so the model's
    generation_config.json travels to the bundle (edgekit.runtime.generation_config reads it).
    transformers loads a file whose flags contradict each other (temperature with do_sample
    unset, say) but refuses to save it; such flags have no effect in transformers (it decodes
    greedily) nor in edgekit (do_sample unset: greedy), so they are reset to their defaults."""
    generation = getattr(model, "generation_config", None)
    if generation is None:
        return
    try:
        generation.validate(strict=True)
        return
    except ValueError:
        pass
    from transformers import GenerationConfig

    default = GenerationConfig()
    if not getattr(generation, "do_sample", False):
        for key in _SAMPLING_ONLY:
            if hasattr(default, key):
                setattr(generation, key, getattr(default, key))
    if getattr(generation, "num_beams", 1) == 1:
        for key in _BEAM_ONLY:
            if hasattr(default, key):
                setattr(generation, key, getattr(default, key))
    try:
        generation.validate(strict=True)
    except ValueError as exc:
        first = next((line.strip("- ") for line in str(exc).splitlines()[1:] if line.strip()), str(exc).splitlines()[0])
        raise ModelError(f"the model's generation_config.json is inconsistent: {first}", where=where,
                         how="fix generation_config.json in the model directory") from None
