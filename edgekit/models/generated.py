"""Sequences a checkpoint samples itself: distillation data and calibration windows.

A model continues short seed prompts (or the BOS token alone) by nucleus sampling; the
sequences are written once as a flat little-endian uint32 token file (``[sequences, length]``)
in the run cache, under a key made of the sampling checkpoint's artifact hash, its tokenizer
files and the generation settings, and reused by every later run, resume and stage with the
same key: distill reads its teacher's samples (``generated_ratio``), prune and quantize their
input checkpoint's (``generated_ratio``: calibration windows), so on the float model all three
share one file. The file is written to a temporary name and renamed into place, so a killed run
leaves either no file or a complete one. The recipe's evaluation sets (``data.eval_sets``) play
no part here: the prompts are the settings' own strings.

Shared by stages (no stage imports another): it lives with the model and text loading.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from pydantic import Field, field_validator, model_validator

from edgekit.errors import StageError
from edgekit.pipeline.registry import StageConfig

# Part of every cache key: unchanged since the file format came (with distill), so the token
# files sampled before this module moved out of distill/ stay valid.
FORMAT = "edgekit.distill.generated/1"
CACHE_FOLDER = "teacher-samples"
LEGACY_CACHE_FOLDER = "distill-generated"  # where distill kept them before; moved on first use
MAX_PROMPT_CHARS = 2000
# sequences x length of one token file: 4 GB on disk (and as int64 windows, 8 GB in memory)
MAX_GENERATED_TOKENS = 1_000_000_000


class GenerationSettings(StageConfig):
    """How a checkpoint samples its own sequences (`generated_ratio` > 0)."""

    sequences: int = Field(256, ge=1, le=1_000_000, description="sequences sampled (once; cached by the sampling checkpoint, tokenizer and these settings)")
    length: int | None = Field(None, ge=16, le=65536, description="tokens per sequence, prompt included (null: sequence_length); "
                               "each is cut into windows of sequence_length")
    temperature: float = Field(1.0, gt=0, le=10, description="sampling temperature")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus sampling: keep the most likely tokens up to this probability mass")
    seed: int = Field(0, ge=0, description="seeds the sampling (with these settings it fixes the generated tokens on one device)")
    batch_size: int = Field(16, ge=1, le=1024, description="sequences sampled together (sequences of one prompt share a batch)")
    prompts: list[str] | None = Field(None, min_length=1, max_length=10_000, description=f"seed prompts, cycled over the sequences (each at most "
                                      f"{MAX_PROMPT_CHARS} characters); null: a built-in list of short, diverse prompts; [\"\"]: from nothing (the BOS token only)")

    @field_validator("prompts")
    @classmethod
    def _short_prompts(cls, value: list[str] | None) -> list[str] | None:
        for index, prompt in enumerate(value or ()):
            if len(prompt) > MAX_PROMPT_CHARS:
                raise ValueError(f"prompts[{index}] has {len(prompt)} characters; seed prompts are short (at most {MAX_PROMPT_CHARS})")
        return value

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

def check_generated_size(generation: GenerationSettings, *, sequence_length: int, window: str) -> int:
    """The resolved tokens per sequence; ValueError when a sequence is shorter than one window
    or the token file would exceed MAX_GENERATED_TOKENS (recipe validation, before any work)."""
    length = generation.length or sequence_length
    if length < sequence_length:
        raise ValueError(f"generation.length {length} is shorter than one {window} (sequence_length {sequence_length})")
    if generation.sequences * length > MAX_GENERATED_TOKENS:
        raise ValueError(f"generation.sequences {generation.sequences} x {length} tokens is more than {MAX_GENERATED_TOKENS:,} "
                         "generated tokens: lower generation.sequences or generation.length")
    return length


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


def generation_settings(generation: GenerationSettings, *, length: int) -> dict[str, Any]:
    """The settings that decide the generated tokens (null fields resolved; ``length`` is the
    stage's default sequence length, used when ``generation.length`` is null)."""
    settings = generation.model_dump(mode="json")
    settings["length"] = generation.length or length
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


def generated_data(ctx: Any, checkpoint_dir: Path, generation: GenerationSettings, *, length: int, role: str) -> dict[str, Any]:
    """The sequences ``checkpoint_dir`` (an earlier stage's checkpoint: distill's teacher, or
    prune's / quantize's input) samples with ``generation``, sampled now or reused from the run
    cache: ``{"path", "sha256", "sequences", "length", "key", "settings", "reused"}``. ``role``
    names the sampling model in the progress line and the log (e.g. "teacher")."""
    from edgekit.hashing import sha256_file
    from edgekit.pipeline.registry import CHECKPOINT

    where = f"stage {ctx.name}"
    checkpoint_dir = Path(checkpoint_dir)
    record = next((r for r in reversed(ctx.history) if Path(r.dir) == checkpoint_dir and r.produces == CHECKPOINT), None)
    model_hash = record.artifact_hash if record is not None else checkpoint_hash(checkpoint_dir)
    settings = generation_settings(generation, length=length)
    key = generation_key(model_hash, tokenizer_hash(checkpoint_dir), settings)
    sequences, length = settings["sequences"], settings["length"]
    expected = sequences * length * 4
    path = Path(ctx.cache_dir) / CACHE_FOLDER / f"{key[:32]}.u32"
    legacy = Path(ctx.cache_dir) / LEGACY_CACHE_FOLDER / path.name
    if not path.is_file() and legacy.is_file() and legacy.stat().st_size == expected:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(legacy, path)
    reused = path.is_file() and path.stat().st_size == expected
    if not reused:
        path.parent.mkdir(parents=True, exist_ok=True)
        tokens = _generate(ctx, checkpoint_dir, settings, role=role, where=where)
        tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
        try:
            with open(tmp, "wb") as handle:
                tokens.tofile(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        ctx.log(f"the {role} sampled {sequences} sequences of {length} tokens into {path}")
    else:
        ctx.log(f"reusing {sequences} {role}-sampled sequences of {length} tokens ({path})")
    return {"path": str(path), "sha256": sha256_file(path), "sequences": sequences, "length": length, "key": key,
            "settings": settings, "reused": reused}


def _generate(ctx: Any, checkpoint_dir: Path, settings: dict[str, Any], *, role: str, where: str) -> Any:
    import torch

    from edgekit.devices import half_dtype, resolve_device
    from edgekit.weights.checkpoint import load_checkpoint

    device = resolve_device(getattr(ctx.config, "device", "auto"), stage=ctx.name)
    dtype = half_dtype() if device == "cuda" else "float32"
    trust = bool(getattr(ctx.recipe, "trust_remote_code", False))
    model, tokenizer = load_checkpoint(checkpoint_dir, dtype=dtype, trust_remote_code=trust)
    model.eval().to(device)
    try:
        prompts = prompt_ids(tokenizer, settings["prompts"], length=settings["length"], where=where)
        with ctx.progress(settings["sequences"], f"{role} samples {settings['sequences']} sequences of {settings['length']} tokens") as bar:
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


def generated_windows(path: str | Path, *, sequences: int, length: int, window: int, count: int) -> list[Any]:
    """``count`` calibration windows (``[1, window]`` int64 each) from the generated sequences:
    the first window of every sequence in order, then the second of every sequence, and so on,
    so a few windows already span every seed prompt (sequence ``i`` continues prompt ``i mod
    len(prompts)``). Deterministic: a rerun calibrates on the same tokens."""
    windows = read_generated(path, sequences=sequences, length=length, window=window)
    per = length // window
    order = [s * per + w for w in range(per) for s in range(sequences)]  # row s*per+w: sequence s, window w
    return [windows[i].unsqueeze(0) for i in order[:count]]


class GeneratedCalibration(StageConfig):
    """Calibration windows a stage's input checkpoint samples itself (prune, quantize): mixed
    with the recipe's text at ``generated_ratio``. Both fields stay out of the config dump (the
    stage's cache key) at their defaults, so recipes that do not use them keep their keys."""

    generated_ratio: float = Field(0.0, ge=0, le=1, description="share of calibration windows the input checkpoint samples "
                                   "itself (`generation:`; cached, and shared with distill's generated data when the "
                                   "settings match); the rest are the recipe's text. 0: the recipe's text only")
    generation: GenerationSettings = Field(default_factory=GenerationSettings, description="how the input checkpoint samples "
                                           "the generated calibration windows (used when generated_ratio > 0)")

    OPTIONAL_WHEN_DEFAULT = ("generated_ratio", "generation")

    def generated_windows_needed(self) -> int:
        """Calibration windows taken from the generated sequences."""
        return round(self.generated_ratio * self.calibration_samples)

    @model_validator(mode="after")
    def _generated_fit(self):
        if self.generated_ratio == 0:
            return self
        needed = self.generated_windows_needed()
        if needed == 0:
            raise ValueError(f"generated_ratio {self.generated_ratio} x calibration_samples {self.calibration_samples} rounds "
                             "to no generated window: raise generated_ratio or calibration_samples, or set generated_ratio 0")
        length = check_generated_size(self.generation, sequence_length=self.sequence_length, window="calibration window")
        available = self.generation.sequences * (length // self.sequence_length)
        if available < needed:
            raise ValueError(f"generated_ratio {self.generated_ratio} x calibration_samples {self.calibration_samples} needs "
                             f"{needed} generated windows; generation.sequences {self.generation.sequences} of {length} tokens "
                             f"gives {available}: raise generation.sequences or lower generated_ratio")
        return self


def calibration_with_generated(ctx: Any, text_ids: Any, config: GeneratedCalibration, checkpoint_dir: Path) -> tuple[list[Any], dict | None]:
    """The stage's calibration windows: ``calibration_samples`` of ``sequence_length`` tokens,
    ``generated_ratio`` of them sampled by ``checkpoint_dir`` (the stage's input) and the rest
    evenly spaced over the text before the held-out split. Returns the windows (text first) and
    the record of the generated part (None at ratio 0) for the stage's report."""
    from edgekit.models.calibration import calibration_samples

    needed = config.generated_windows_needed()
    text_count = config.calibration_samples - needed
    samples = calibration_samples(text_ids, samples=text_count, sequence_length=config.sequence_length) if text_count else []
    if not needed:
        return samples, None
    data = generated_data(ctx, checkpoint_dir, config.generation, length=config.sequence_length, role="input checkpoint")
    samples += generated_windows(data["path"], sequences=data["sequences"], length=data["length"],
                                 window=config.sequence_length, count=needed)
    return samples, {"ratio": config.generated_ratio, "windows": needed, "text_windows": text_count,
                     **{k: data[k] for k in ("key", "sha256", "sequences", "length", "settings")}}
