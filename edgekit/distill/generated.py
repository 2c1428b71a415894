"""Training sequences the teacher samples itself (``generated_ratio`` > 0).

The teacher continues short seed prompts (or the BOS token alone) by nucleus sampling; the
sequences are written once as a flat little-endian uint32 token file (``[sequences, length]``)
in the run cache, under a key made of the teacher's artifact hash, its tokenizer files and the
generation settings, and reused by every later run and resume with the same key. The file is
written to a temporary name and renamed into place, so a killed run leaves either no file or a
complete one. The recipe's evaluation sets (``data.eval_sets``) play no part here: the prompts
are the settings' own strings.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from edgekit.errors import StageError

FORMAT = "edgekit.distill.generated/1"

# Short seed prompts across registers (prose, code, dialogue, lists, numbers, other languages):
# the teacher's continuations, not the prompts, are what the student learns from.
DEFAULT_PROMPTS = (
    "",
    "The",
    "Once upon a time",
    "def ",
    "import ",
    "# Introduction\n\n",
    "Q: How does",
    "In 1998,",
    "Dear",
    "1.",
    "The following table",
    "Il était une fois",
    "<html>",
    "SELECT",
    "User: Can you explain",
    "Abstract:",
)

# The tokenizer files of a checkpoint that change how text becomes ids.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json")


def tokenizer_hash(checkpoint: Path) -> str:
    """sha256 over the checkpoint's tokenizer files (name and content)."""
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = Path(checkpoint) / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def checkpoint_hash(checkpoint: Path) -> str:
    """sha256 over every file of a checkpoint directory (when no stage record gives its hash)."""
    from edgekit.hashing import sha256_file

    digest = hashlib.sha256()
    for path in sorted(p for p in Path(checkpoint).rglob("*") if p.is_file()):
        digest.update(path.relative_to(checkpoint).as_posix().encode() + b"\0" + sha256_file(path).encode())
    return digest.hexdigest()


def generation_key(teacher_hash: str, tokenizer: str, settings: dict[str, Any]) -> str:
    """The cache key of one generated data set."""
    from edgekit.hashing import sha256_json

    return sha256_json({"format": FORMAT, "teacher": teacher_hash, "tokenizer": tokenizer, "settings": settings})


def generation_settings(config: Any) -> dict[str, Any]:
    """The settings that decide the generated tokens (null fields resolved)."""
    settings = config.generation.model_dump(mode="json")
    settings["length"] = config.generated_length
    settings["prompts"] = list(DEFAULT_PROMPTS) if settings["prompts"] is None else settings["prompts"]
    return settings


def prompt_ids(tokenizer: Any, prompts: Sequence[str], *, length: int, where: str) -> list[list[int]]:
    """Each prompt's token ids, starting with the BOS token where the tokenizer has one (an empty
    prompt is the BOS alone); refused when a prompt leaves no room to sample."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    result = []
    for index, prompt in enumerate(prompts):
        ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else []
        if start is not None:
            ids = [start, *ids]
        if not ids:
            raise StageError(f"generation.prompts[{index}] is empty and the tokenizer has neither a BOS nor an EOS token to start from",
                             where=where, how="give a non-empty seed prompt")
        if len(ids) >= length:
            raise StageError(f"generation.prompts[{index}] is {len(ids)} tokens, leaving nothing to sample in a sequence of {length}",
                             where=where, how="shorten the prompt or raise generation.length")
        result.append(ids)
    return result


def sample_token(logits: Any, *, temperature: float, top_p: float, generator: Any) -> Any:
    """One token per row: nucleus sampling at ``temperature`` (float32, on the CPU, so the draw
    depends only on the generator and the logits)."""
    import torch

    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more likely tokens
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # the most likely one always stays
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)


def sample_sequences(model: Any, prompts: list[list[int]], *, sequences: int, length: int, temperature: float, top_p: float,
                     seed: int, batch_size: int, advance: Callable[[int], None] | None = None) -> Any:
    """``[sequences, length]`` uint32 tokens: sequence ``i`` continues prompt ``i mod len(prompts)``
    (sequences of one prompt are sampled together, with the KV cache). Sampling goes on past an
    EOS token, as a text stream goes on past a document's end."""
    import numpy as np
    import torch

    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    out = np.empty((sequences, length), dtype="<u4")
    by_prompt = [list(range(p, sequences, len(prompts))) for p in range(len(prompts))]
    with torch.inference_mode():
        for p, rows in enumerate(by_prompt):
            for begin in range(0, len(rows), batch_size):
                chunk = rows[begin: begin + batch_size]
                ids = torch.tensor([prompts[p]] * len(chunk), dtype=torch.long)
                tokens = [ids]
                result = model(input_ids=ids.to(device), use_cache=True)
                for position in range(ids.shape[1], length):
                    chosen = sample_token(result.logits[:, -1], temperature=temperature, top_p=top_p, generator=generator)
                    tokens.append(chosen)
                    if position + 1 < length:
                        result = model(input_ids=chosen.to(device), past_key_values=result.past_key_values, use_cache=True)
                out[chunk] = torch.cat(tokens, dim=1).numpy().astype("<u4")
                if advance is not None:
                    advance(len(chunk))
    return out


def generated_data(ctx: Any) -> dict[str, Any]:
    """The generated sequences for this distill stage (sampled now, or reused from the run
    cache): ``{"path", "sha256", "sequences", "length", "key", "settings", "reused"}``."""
    from edgekit.hashing import sha256_file
    from edgekit.pipeline.registry import CHECKPOINT

    config = ctx.config
    where = f"stage {ctx.name}"
    teacher_dir = Path(ctx.references["teacher"])
    record = next((r for r in reversed(ctx.history) if Path(r.dir) == teacher_dir and r.produces == CHECKPOINT), None)
    teacher_hash = record.artifact_hash if record is not None else checkpoint_hash(teacher_dir)
    settings = generation_settings(config)
    key = generation_key(teacher_hash, tokenizer_hash(teacher_dir), settings)
    sequences, length = settings["sequences"], settings["length"]
    path = Path(ctx.cache_dir) / "distill-generated" / f"{key[:32]}.u32"
    expected = sequences * length * 4
    reused = path.is_file() and path.stat().st_size == expected
    if not reused:
        path.parent.mkdir(parents=True, exist_ok=True)
        tokens = _generate(ctx, teacher_dir, settings, where=where)
        tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
        try:
            with open(tmp, "wb") as handle:
                tokens.tofile(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        ctx.log(f"the teacher sampled {sequences} sequences of {length} tokens into {path}")
    else:
        ctx.log(f"reusing {sequences} teacher-sampled sequences of {length} tokens ({path})")
    return {"path": str(path), "sha256": sha256_file(path), "sequences": sequences, "length": length, "key": key,
            "settings": settings, "reused": reused}


def _generate(ctx: Any, teacher_dir: Path, settings: dict[str, Any], *, where: str) -> Any:
    import torch

    from edgekit.devices import half_dtype, resolve_device
    from edgekit.weights.checkpoint import load_checkpoint

    device = resolve_device(ctx.config.device, stage=ctx.name)
    dtype = half_dtype() if device == "cuda" else "float32"
    trust = bool(getattr(ctx.recipe, "trust_remote_code", False))
    model, tokenizer = load_checkpoint(teacher_dir, dtype=dtype, trust_remote_code=trust)
    model.eval().to(device)
    try:
        prompts = prompt_ids(tokenizer, settings["prompts"], length=settings["length"], where=where)
        with ctx.progress(settings["sequences"], f"teacher samples {settings['sequences']} sequences of {settings['length']} tokens") as bar:
            return sample_sequences(model, prompts, sequences=settings["sequences"], length=settings["length"],
                                    temperature=settings["temperature"], top_p=settings["top_p"], seed=settings["seed"],
                                    batch_size=settings["batch_size"], advance=lambda n: bar.advance(n))
    finally:
        del model
        if device == "cuda":
            torch.cuda.empty_cache()


def read_generated(path: str | Path, *, sequences: int, length: int, window: int) -> Any:
    """The generated sequences as training windows: ``[sequences * (length // window), window]``
    int64 (each sequence cut into non-overlapping windows, its remainder dropped)."""
    import numpy as np
    import torch

    array = np.fromfile(path, dtype="<u4")
    if array.size != sequences * length:
        raise StageError(f"the generated token file {path} holds {array.size} tokens, not {sequences} x {length}",
                         where=str(path), how="delete it; the next run samples it again")
    per = length // window
    cut = array.reshape(sequences, length)[:, : per * window].reshape(sequences * per, window)
    return torch.from_numpy(cut.astype(np.int64))
