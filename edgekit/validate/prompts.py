"""The prompts a validation run sends: a prompts file (one per line, or JSON Lines) encoded
as ``edgekit run`` encodes a prompt, or evenly spaced windows of the held-out split."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekit.errors import ValidateError

#: default prompts: this many windows of DEFAULT_PROMPT_TOKENS held-out tokens
DEFAULT_PROMPTS = 16
DEFAULT_PROMPT_TOKENS = 128
#: the held-out split the default prompts come from when the bundle's recipe names no built-in
#: text (edgekit's evaluation default)
HELD_OUT_SOURCE = "builtin:python-docs"
HELD_OUT_TOKENS = 8192
#: bounds on the recipe's data.eval_tokens read back from a bundle (recipe.yaml is untrusted)
MAX_HELD_OUT_TOKENS = 10_000_000


@dataclass(frozen=True)
class HeldOut:
    """The text the default prompts come from: its last ``tokens`` tokens (the split the
    recipe's evaluate stages scored), and why this one (``reason``)."""

    source: str
    tokens: int
    reason: str


def held_out_source(bundle_dir: str | Path) -> HeldOut:
    """The held-out split of the text the bundle was compressed on, when the device can make it:
    the bundle's recipe.yaml ``data.source`` if that is a built-in text (the stdlib's, so the
    device has it) and ``data.eval_tokens``; else (a file or hub dataset, which a bundle does not
    carry; no recipe; a recipe that does not parse or holds bad values) :data:`HELD_OUT_SOURCE`.
    A mixed-data recipe is thus validated on the end of its own text, not on the docs."""
    import yaml

    from edgekit.models.text import BUILTINS

    fallback = f"{HELD_OUT_SOURCE}, edgekit's default"
    path = Path(bundle_dir) / "recipe.yaml"
    try:
        if path.stat().st_size > 1 << 20:
            return HeldOut(HELD_OUT_SOURCE, HELD_OUT_TOKENS, f"{fallback}: the bundle's recipe.yaml is over 1 MiB")
        recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return HeldOut(HELD_OUT_SOURCE, HELD_OUT_TOKENS, f"{fallback}: the bundle has no recipe.yaml")
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return HeldOut(HELD_OUT_SOURCE, HELD_OUT_TOKENS, f"{fallback}: the bundle's recipe.yaml does not parse")
    data = recipe.get("data") if isinstance(recipe, dict) else None
    if isinstance(data, str):
        data = {"source": data}
    source = data.get("source") if isinstance(data, dict) else None
    if not isinstance(source, str) or source not in BUILTINS:
        shown = source if isinstance(source, str) and len(source) <= 200 else "not a built-in text"
        return HeldOut(HELD_OUT_SOURCE, HELD_OUT_TOKENS, f"{fallback}: the recipe's text ({shown}) is not in the bundle")
    tokens = data.get("eval_tokens", HELD_OUT_TOKENS)
    if isinstance(tokens, bool) or not isinstance(tokens, int) or not 2 <= tokens <= MAX_HELD_OUT_TOKENS:
        return HeldOut(HELD_OUT_SOURCE, HELD_OUT_TOKENS, f"{fallback}: the recipe's data.eval_tokens is not an integer "
                       f"in 2..{MAX_HELD_OUT_TOKENS}")
    return HeldOut(source, tokens, "the bundle's recipe (data.source, data.eval_tokens)")


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    origin: str  # "FILE:LINE" or "held-out tokens A..B"
    text: str | None = None


def read_prompts_file(path: str | Path) -> list[tuple[str, str]]:
    """``[(text, "FILE:LINE"), ...]`` from a prompts file: one prompt per non-blank line, or
    JSON Lines (a ``.jsonl`` file, or one whose first non-blank line starts with ``{``) whose
    records each hold a non-empty string ``"prompt"``. Raises :class:`ValidateError` naming
    the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ValidateError("prompts file not found", where=str(path), how="pass an existing file with one prompt per line")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValidateError(f"the prompts file is not UTF-8 text (byte {exc.start})", where=str(path),
                            how="save it as UTF-8") from None
    except OSError as exc:
        raise ValidateError(f"cannot read the prompts file: {exc.strerror or exc}", where=str(path),
                            how="check its permissions") from None
    lines = raw.splitlines()
    first = next((line.strip() for line in lines if line.strip()), "")
    as_jsonl = path.suffix.lower() == ".jsonl" or first.startswith("{")
    prompts: list[tuple[str, str]] = []
    for number, line in enumerate(lines, 1):
        where = f"{path}:{number}"
        if not line.strip():
            continue
        if not as_jsonl:
            prompts.append((line, where))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValidateError(f"invalid JSON: {exc.msg} (column {exc.colno})", where=where,
                                how='make each line one JSON object like {"prompt": "..."}') from None
        if not isinstance(record, dict) or "prompt" not in record:
            raise ValidateError('the record has no "prompt" field', where=where,
                                how='give every line {"prompt": "..."} (or use a plain text file, one prompt per line)')
        text = record["prompt"]
        if not isinstance(text, str) or not text.strip():
            raise ValidateError('"prompt" must be a non-empty string', where=where, how="put the prompt text there")
        prompts.append((text, where))
    if not prompts:
        raise ValidateError("the prompts file holds no prompt", where=str(path), how="put one prompt per line")
    return prompts


def encode_prompts(texts: list[tuple[str, str]], tokenizer: Any, *, context_length: int, max_new_tokens: int) -> list[Prompt]:
    """Encode each prompt as ``edgekit run`` does (``tokenizer.encode``) and check that it plus
    ``max_new_tokens`` fits the context."""
    prompts = []
    for text, where in texts:
        ids = [int(t) for t in tokenizer.encode(text)]
        if not ids:
            raise ValidateError("the prompt encodes to no tokens", where=where, how="give a non-empty prompt")
        if len(ids) + max_new_tokens > context_length:
            raise ValidateError(
                f"the prompt has {len(ids)} tokens; with {max_new_tokens} new tokens it needs {len(ids) + max_new_tokens}, "
                f"more than the bundle's context of {context_length}", where=where,
                how="shorten the prompt or lower --max-new-tokens")
        prompts.append(Prompt(ids=ids, origin=where, text=text))
    return prompts


def default_prompts(tokenizer: Any, *, context_length: int, max_new_tokens: int, count: int = DEFAULT_PROMPTS,
                    length: int = DEFAULT_PROMPT_TOKENS, held_out: HeldOut | None = None) -> list[Prompt]:
    """``count`` windows of ``length`` tokens (fewer when the context needs it) from the
    held-out split (``held_out``, :func:`held_out_source`; default the docs'), the i-th starting
    at ``round(i * (L - length) / (count - 1))`` of its L tokens: evenly spread over the split,
    overlapping only when ``count * length > L``."""
    from edgekit.models.text import resolve_text_source, tokenize_splits

    length = min(length, context_length - max_new_tokens)
    if length < 1:
        raise ValidateError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the context of {context_length}",
                            where="--max-new-tokens", how=f"use at most {context_length - 1}")
    held_out = held_out or HeldOut(HELD_OUT_SOURCE, HELD_OUT_TOKENS, "edgekit's default")
    text = resolve_text_source(held_out.source).read()
    held = tokenize_splits(text, tokenizer, eval_tokens=held_out.tokens, window=1, where=held_out.source).evaluation
    length = min(length, len(held))
    span = len(held) - length
    prompts = []
    for i in range(count):
        start = round(i * span / (count - 1)) if count > 1 else 0
        ids = [int(t) for t in held[start:start + length]]
        prompts.append(Prompt(ids=ids, origin=f"held-out tokens {start}..{start + length}"))
    return prompts
