"""A reasoning model's ``<think>…</think>`` block, returned apart from the answer.

Reasoning models (DeepSeek-R1 and its distillations, QwQ, Qwen3) write their chain of thought
between ``<think>`` and ``</think>`` before the answer. ``runtime.reasoning`` (runtime.json)
says what the runtime does with it:

``auto`` (default)
    split when the tokenizer knows the tags (``</think>`` in its vocabulary, or ``<think>`` /
    ``</think>`` in its chat template) and decoding keeps them; else ``off``.
``split``
    always split (refused at load when decoding would drop the tags: they are special tokens).
``off``
    the text as the model wrote it, tags included.

:class:`ReasoningParser` does the split on decoded text, incrementally, for streaming and for
whole answers alike (a whole answer is one push), so both give the same two strings:

* a tag split across pieces (``"</th"`` + ``"ink>"``) is held back until it is decided;
* a missing opening tag: R1's chat template ends the prompt with ``<think>\\n``, so the answer
  starts inside the block. :func:`prompt_opens_reasoning` tells from the prompt text (its last
  ``<think>`` comes after its last ``</think>``) and the parser starts in the block;
* the block is opened by ``<think>`` only at the start of the output (whitespace before it
  is dropped); text before it makes the whole output the answer, tags as written;
* only the first block is reasoning: tags after ``</think>`` are answer text;
* a block still open at the end (``max_new_tokens`` reached mid-thought) is all reasoning and
  the answer is empty;
* whitespace right after ``<think>``, before ``</think>`` and at the start of the answer is
  dropped (R1 writes ``<think>\\n…\\n</think>\\n\\n``).

Pure Python, no imports beyond the standard library (the runtime's start-up rule).
"""

from __future__ import annotations

from typing import Any

from edgekit.errors import EdgekitError

OPEN, CLOSE = "<think>", "</think>"
MODES = ("auto", "off", "split")
REASONING, CONTENT = "reasoning", "content"

# parser states
_START, _THINK, _ANSWER = "start", "think", "answer"


def prompt_opens_reasoning(prompt: Any) -> bool:
    """True when ``prompt`` (text) leaves a ``<think>`` block open: its last ``<think>`` comes
    after its last ``</think>`` (R1's chat template ends the assistant's turn with ``<think>\\n``)."""
    if not isinstance(prompt, str):
        return False
    opened = prompt.rfind(OPEN)
    return opened >= 0 and opened > prompt.rfind(CLOSE)


class ReasoningParser:
    """Splits generated text into reasoning and answer (module docstring). ``push(text)`` and
    ``finish()`` return the decided pieces as ``[(kind, text), ...]`` with kind
    :data:`REASONING` or :data:`CONTENT`; ``reasoning`` / ``content`` hold everything decided
    so far and ``saw_reasoning`` whether a block was opened at all."""

    def __init__(self, *, in_reasoning: bool = False):
        self._initial = bool(in_reasoning)
        self.reset()

    def reset(self) -> None:
        """Start over (a new answer from its start: a cascade escalation, a fallback)."""
        self.state = _THINK if self._initial else _START
        self.saw_reasoning = self._initial
        self.reasoning = ""
        self.content = ""
        self._buf = ""  # undecided text: a possible tag or whitespace that may be dropped
        self._lead = True  # at the start of the block / the answer: leading whitespace is dropped
        self._finished = False

    # -- feeding

    def push(self, text: str) -> list[tuple[str, str]]:
        if self._finished:
            raise RuntimeError("ReasoningParser.push after finish(); call reset() first")
        self._buf += text
        out: list[tuple[str, str]] = []
        progressed = True
        while progressed and self._buf:
            progressed = getattr(self, "_step_" + self.state)(out)
        return _merge(out)

    def finish(self) -> list[tuple[str, str]]:
        """The end of the answer: what was held back is decided."""
        out: list[tuple[str, str]] = []
        buf, self._buf = self._buf, ""
        if self.state == _START:
            # only whitespace and/or a partial "<think>": the answer, as the model wrote it
            self._emit(out, CONTENT, buf)
        elif self.state == _THINK:
            # an unterminated block: a partial "</think>" is reasoning text; trailing space is dropped
            self._emit(out, REASONING, buf.rstrip())
        else:
            self._emit(out, CONTENT, buf)
        self._finished = True
        return _merge(out)

    def split(self, text: str) -> tuple[str, str]:
        """(reasoning, answer) of a whole text (a fresh start; the same result as streaming it)."""
        self.reset()
        self.push(text)
        self.finish()
        return self.reasoning, self.content

    # -- states

    def _emit(self, out: list, kind: str, text: str) -> None:
        if not text:
            return
        out.append((kind, text))
        if kind == REASONING:
            self.reasoning += text
        else:
            self.content += text

    def _step_start(self, out: list) -> bool:
        stripped = self._buf.lstrip()
        if not stripped:
            return False  # only whitespace so far: wait
        if stripped.startswith(OPEN):
            self.state, self.saw_reasoning, self._lead = _THINK, True, True
            self._buf = stripped[len(OPEN):]
            return True
        if OPEN.startswith(stripped):
            return False  # a partial "<think>": wait
        # the output does not open with a block: all of it is the answer, as written
        self.state, self._lead = _ANSWER, False
        buf, self._buf = self._buf, ""
        self._emit(out, CONTENT, buf)
        return False

    def _step_think(self, out: list) -> bool:
        if self._lead:
            self._buf = self._buf.lstrip()
            if not self._buf:
                return False
            self._lead = False
        end = self._buf.find(CLOSE)
        if end >= 0:
            self._emit(out, REASONING, self._buf[:end].rstrip())
            self._buf = self._buf[end + len(CLOSE):]
            self.state, self._lead = _ANSWER, True
            return True
        # hold back a possible start of "</think>" and the whitespace before it (dropped if the tag follows)
        keep = _partial_suffix(self._buf, CLOSE)
        body = self._buf[: len(self._buf) - keep]
        decided = body.rstrip()
        self._emit(out, REASONING, decided)
        self._buf = self._buf[len(decided):]
        return False

    def _step_answer(self, out: list) -> bool:
        if self._lead:
            self._buf = self._buf.lstrip()
            if not self._buf:
                return False
            self._lead = False
        buf, self._buf = self._buf, ""
        self._emit(out, CONTENT, buf)
        return False


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def _merge(pieces: list[tuple[str, str]]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for kind, text in pieces:
        if out and out[-1][0] == kind:
            out[-1] = (kind, out[-1][1] + text)
        else:
            out.append((kind, text))
    return out


def split_reasoning(text: str, *, in_reasoning: bool = False) -> tuple[str | None, str]:
    """(reasoning or None when no block was opened, answer) of a whole generated text."""
    parser = ReasoningParser(in_reasoning=in_reasoning)
    reasoning, content = parser.split(text)
    return (reasoning if parser.saw_reasoning else None), content


# --------------------------------------------------------------------------- the mode


def _template_text(tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        return "\n".join(v for v in template.values() if isinstance(v, str))
    return template if isinstance(template, str) else ""


def tags_known(tokenizer: Any) -> bool:
    """The tokenizer knows the tags: ``</think>`` is a token of its vocabulary, or its chat
    template writes ``<think>`` / ``</think>``."""
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # a tokenizer without get_vocab: the template alone decides
        vocab = {}
    template = _template_text(tokenizer)
    return CLOSE in vocab or OPEN in template or CLOSE in template


def tags_dropped(tokenizer: Any) -> list[str]:
    """The tags that are single tokens decoding drops (special tokens: the runtime decodes with
    ``skip_special_tokens``), so the text never shows them."""
    try:
        vocab = tokenizer.get_vocab()
    except Exception:
        return []
    dropped = []
    for tag in (OPEN, CLOSE):
        if tag in vocab:
            try:
                text = tokenizer.decode([int(vocab[tag])], skip_special_tokens=True)
            except Exception:
                text = ""
            if tag not in text:
                dropped.append(tag)
    return dropped


def reasoning_enabled(mode: str, tokenizer: Any, *, where: str = "runtime.reasoning") -> bool:
    """Whether answers are split for ``mode`` (auto | off | split) with this tokenizer."""
    if mode not in MODES:
        raise EdgekitError(f"unknown reasoning mode {mode!r}", where=where, how=f"use one of {', '.join(MODES)}")
    if mode == "off" or tokenizer is None:
        return False
    dropped = tags_dropped(tokenizer)
    if mode == "split":
        if dropped:
            raise EdgekitError(f"the tokenizer decodes {' and '.join(dropped)} as special tokens, which the runtime's "
                               "text leaves out, so the reasoning cannot be told apart", where=where,
                               how="set runtime.reasoning to off (or auto) for this model")
        return True
    return tags_known(tokenizer) and not dropped


__all__ = ["OPEN", "CLOSE", "MODES", "REASONING", "CONTENT", "ReasoningParser", "prompt_opens_reasoning", "split_reasoning",
           "tags_known", "tags_dropped", "reasoning_enabled"]
