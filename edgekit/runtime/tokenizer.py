"""A bundle's tokenizer without transformers: ``tokenizer.json`` on the ``tokenizers`` library,
``tokenizer_config.json`` for the special tokens, and the chat template rendered with jinja2.

Importing transformers costs seconds (it pulls in torch); this module imports ``tokenizers``
(~10 ms) when a bundle is opened and ``jinja2`` only when a chat template is first rendered.
:class:`BundleTokenizer` answers the part of transformers' fast-tokenizer interface that the
runtime, ``edgekit serve`` and ``edgekit validate`` use, with the same token ids and text::

    tok = BundleTokenizer.from_dir(bundle_dir)
    ids = tok.encode("Hello")                          # special tokens as the model adds them
    ids = tok("Hello")["input_ids"]                    # the same
    text = tok.decode(ids, skip_special_tokens=True)
    tok.eos_token_id, tok.bos_token, tok.pad_token_id, len(tok), tok.get_vocab()
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

What transformers does at load that changes ids, done the same way here:

* truncation and padding stored in tokenizer.json are switched off (transformers switches
  them off for every call that does not ask for them);
* ``added_tokens_decoder`` entries and the special tokens (bos, eos, unk, pad, ...) that
  tokenizer.json lacks are added, as special tokens where they are special;
* for the tokenizer classes that rebuild their post-processor from ``add_bos_token`` /
  ``add_eos_token`` (Llama, Code Llama, Gemma, Cohere: BOS by default; GPT-NeoX: neither),
  the post-processor is rebuilt from those flags;
* ``add_prefix_space`` (when set) is written into a byte-level / metaspace pre-tokenizer;
* ``split_special_tokens`` and ``clean_up_tokenization_spaces`` are honoured.

The chat template comes from ``chat_template.jinja`` (it wins, as in transformers) or
``tokenizer_config.json``'s ``chat_template`` (one string, or named templates). It is a
bundle's data, so it runs in jinja2's immutable sandbox (no attribute of Python internals, no
mutation of the messages), with the environment transformers gives templates (trim_blocks,
lstrip_blocks, loop controls, ``{% generation %}``, ``tojson``, ``raise_exception``,
``strftime_now``) and limits on what a hostile one can make it do: ``*`` and ``**`` may not
build values over :data:`TEMPLATE_VALUE_LIMIT`, and a rendering stops past
:data:`TEMPLATE_OUTPUT_LIMIT` characters. A template that does not compile, escapes the
sandbox or refuses the messages raises :class:`ChatTemplateError`, one line.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from edgekit.errors import EdgekitError

#: what :meth:`BundleTokenizer.from_dir` reads
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

SPECIAL_TOKEN_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

#: the longest text a chat template may render (characters) and the largest string, list or
#: number its ``*`` / ``**`` may build: bounds on what a hostile bundle can make a server do
TEMPLATE_OUTPUT_LIMIT = 4 << 20
TEMPLATE_VALUE_LIMIT = 1 << 20

# tokenizer classes whose __init__ rebuilds the post-processor from add_bos_token /
# add_eos_token, with their defaults (transformers' *TokenizerFast.update_post_processor)
_POST_PROCESSOR_DEFAULTS = {
    "LlamaTokenizer": (True, False), "CodeLlamaTokenizer": (True, False), "GemmaTokenizer": (True, False),
    "CohereTokenizer": (True, False), "GPTNeoXTokenizer": (False, False),
}
# config.json model_type -> tokenizer class, for a tokenizer_config without tokenizer_class
_MODEL_TYPE_CLASSES = {"llama": "LlamaTokenizer", "mistral": "LlamaTokenizer", "code_llama": "CodeLlamaTokenizer",
                       "gemma": "GemmaTokenizer", "cohere": "CohereTokenizer", "gpt_neox": "GPTNeoXTokenizer"}


class ChatTemplateError(EdgekitError, ValueError):
    """The bundle's chat template cannot be used: missing, does not compile, breaks the sandbox's
    rules, or refused the messages (``raise_exception``). A ValueError too, as transformers'
    "no chat template" error is."""


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _read_json(path: Path, where: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise EdgekitError(f"cannot read the bundle's {path.name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                           where=str(path), how="re-run the bundle stage (it copies the tokenizer files)") from None
    if not isinstance(data, dict):
        raise EdgekitError(f"the bundle's {path.name} is not a JSON object", where=str(path),
                           how="re-run the bundle stage (it copies the tokenizer files)")
    return data


class BundleTokenizer:
    """transformers' fast tokenizer, as far as edgekit uses it, on ``tokenizers`` alone."""

    is_fast = True

    def __init__(self, backend: Any, config: dict[str, Any] | None = None, *, chat_template: Any = None,
                 special_tokens_map: dict[str, Any] | None = None, model_type: str | None = None,
                 name_or_path: str = "") -> None:
        from tokenizers import AddedToken

        config = dict(config or {})
        self._tokenizer = backend
        self.name_or_path = name_or_path
        #: generation_config.json's eos_token_id(s) (from_dir reads them): answers end there too
        self.generation_eos_token_ids: list[int] = []
        self.init_kwargs = config
        # transformers turns off what tokenizer.json stores unless a call asks for it
        backend.no_truncation()
        backend.no_padding()

        # special tokens: tokenizer_config.json, else (legacy files) special_tokens_map.json
        specials: dict[str, Any] = {name: _token_text(config.get(name)) for name in SPECIAL_TOKEN_ATTRIBUTES}
        additional = [t for t in (_token_text(v) for v in config.get("additional_special_tokens") or []) if t]
        if "added_tokens_decoder" not in config and special_tokens_map:
            for name in SPECIAL_TOKEN_ATTRIBUTES:
                if _token_text(special_tokens_map.get(name)):
                    specials[name] = _token_text(special_tokens_map[name])
            for token in special_tokens_map.get("additional_special_tokens") or []:
                if _token_text(token) and _token_text(token) not in additional:
                    additional.append(_token_text(token))
        self._specials = specials
        self.additional_special_tokens = additional

        # added tokens that tokenizer.json lacks (added_tokens_decoder, then the special tokens)
        present = {str(t.content) for t in backend.get_added_tokens_decoder().values()}
        special_texts = {t for t in specials.values() if t} | set(additional)
        to_add = []
        decoder = config.get("added_tokens_decoder") or {}
        for _, entry in sorted(((int(k), v) for k, v in decoder.items() if isinstance(v, dict)), key=lambda kv: kv[0]):
            content = entry.get("content")
            if isinstance(content, str) and content and content not in present:
                fields = {k: bool(entry[k]) for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in entry}
                fields["special"] = fields.get("special", False) or content in special_texts
                to_add.append(AddedToken(content, **fields))
                present.add(content)
        for content in [t for t in specials.values() if t] + additional:
            if content not in present:
                to_add.append(AddedToken(content, special=True))
                present.add(content)
        if to_add:  # one call, in this order, as transformers adds them (the order gives the ids)
            backend.add_tokens(to_add)

        backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self.model_max_length = config.get("model_max_length")
        self.padding_side = config.get("padding_side", "right")
        self.truncation_side = config.get("truncation_side", "right")
        self._set_prefix_space(config.get("add_prefix_space"))

        klass = str(config.get("tokenizer_class") or _MODEL_TYPE_CLASSES.get(model_type or "", "")).removesuffix("Fast")
        defaults = _POST_PROCESSOR_DEFAULTS.get(klass)
        self.add_bos_token = bool(config.get("add_bos_token", defaults[0] if defaults else False))
        self.add_eos_token = bool(config.get("add_eos_token", defaults[1] if defaults else False))
        if defaults is not None:
            self._update_post_processor()

        if isinstance(chat_template, list):  # [{"name": ..., "template": ...}, ...]
            chat_template = {t.get("name"): t.get("template") for t in chat_template if isinstance(t, dict)}
        self.chat_template: str | dict[str, str] | None = chat_template or None
        self._compiled: dict[str, Any] = {}

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_dir(cls, directory: str | Path) -> BundleTokenizer:
        """The tokenizer of a bundle (or any directory a fast tokenizer was saved to)."""
        from tokenizers import Tokenizer

        directory = Path(directory)
        path = directory / TOKENIZER_JSON
        if not path.is_file():
            raise EdgekitError("the bundle has no tokenizer.json (edgekit's runtime reads the fast tokenizer's file only)",
                               where=str(directory), how="re-run the bundle stage: it saves the model's fast tokenizer")
        try:
            backend = Tokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exception on a bad file
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EdgekitError(f"cannot load the bundle's tokenizer.json: {first}", where=str(path),
                               how="re-run the bundle stage (it copies tokenizer.json and tokenizer_config.json)") from None
        config = _read_json(directory / TOKENIZER_CONFIG, directory) if (directory / TOKENIZER_CONFIG).is_file() else {}
        special_map = _read_json(directory / SPECIAL_TOKENS_MAP, directory) if (directory / SPECIAL_TOKENS_MAP).is_file() else None
        template: Any = config.get("chat_template")
        template_file = directory / CHAT_TEMPLATE_FILE
        if template_file.is_file():  # transformers: the file wins over tokenizer_config.json
            try:
                text = template_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ChatTemplateError(f"cannot read the chat template: {type(exc).__name__}", where=str(template_file),
                                        how="re-run the bundle stage") from None
            template = {**template, "default": text} if isinstance(template, dict) else text
        model_type = None
        if not config.get("tokenizer_class") and (directory / "config.json").is_file():
            model_type = _read_json(directory / "config.json", directory).get("model_type")
        try:
            tokenizer = cls(backend, config, chat_template=template, special_tokens_map=special_map, model_type=model_type,
                            name_or_path=str(directory))
        except (TypeError, ValueError, AttributeError) as exc:
            raise EdgekitError(f"the bundle's tokenizer_config.json is malformed: {exc}", where=str(directory / TOKENIZER_CONFIG),
                               how="re-run the bundle stage (it copies the model's tokenizer files)") from None
        from edgekit.runtime.generation_config import GENERATION_CONFIG, read_eos_token_ids

        # the ids the model's generation_config.json ends generation at, where they are in the vocabulary
        vocab = len(tokenizer)
        tokenizer.generation_eos_token_ids = [i for i in read_eos_token_ids(directory / GENERATION_CONFIG) if i < vocab]
        return tokenizer

    def _set_prefix_space(self, add_prefix_space: Any) -> None:
        if not isinstance(add_prefix_space, bool) or self._tokenizer.pre_tokenizer is None:
            return
        from tokenizers import pre_tokenizers

        try:
            state = json.loads(self._tokenizer.pre_tokenizer.__getstate__())
            if state.get("add_prefix_space", add_prefix_space) != add_prefix_space:
                kind = getattr(pre_tokenizers, state.pop("type"))
                state["add_prefix_space"] = add_prefix_space
                self._tokenizer.pre_tokenizer = kind(**state)
        except Exception:  # noqa: BLE001 - as transformers: a pre-tokenizer without the option keeps its own
            pass

    def _update_post_processor(self) -> None:
        from tokenizers import processors

        bos, eos = self.bos_token, self.eos_token
        if self.add_bos_token and bos is None:
            raise ValueError("add_bos_token is true but there is no bos_token")
        if self.add_eos_token and eos is None:
            raise ValueError("add_eos_token is true but there is no eos_token")
        single = f"{(bos + ':0 ') if self.add_bos_token else ''}$A:0{(' ' + eos + ':0') if self.add_eos_token else ''}"
        pair = f"{single}{(' ' + bos + ':1') if self.add_bos_token else ''} $B:1{(' ' + eos + ':1') if self.add_eos_token else ''}"
        special = []
        if self.add_bos_token:
            special.append((bos, self.bos_token_id))
        if self.add_eos_token:
            special.append((eos, self.eos_token_id))
        self._tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)

    # ------------------------------------------------------------------ vocabulary

    @property
    def backend_tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """The base vocabulary (without added tokens), as transformers counts it."""
        return self._tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens: str | Iterable[str] | None) -> Any:
        if tokens is None:
            return None
        if isinstance(tokens, str):
            return self._token_id(tokens)
        return [self._token_id(t) for t in tokens]

    def _token_id(self, token: str) -> int | None:
        index = self._tokenizer.token_to_id(token)
        if index is None:
            unk = self._specials.get("unk_token")
            return self._tokenizer.token_to_id(unk) if unk else None
        return index

    def convert_ids_to_tokens(self, ids: int | Iterable[int], skip_special_tokens: bool = False) -> Any:
        if isinstance(ids, int):
            return self._tokenizer.id_to_token(ids)
        special = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._tokenizer.id_to_token(int(i)) for i in ids if int(i) not in special]

    # special tokens: bos_token, bos_token_id, ... (None when the tokenizer has none)
    def _special(name: str) -> property:  # noqa: N805 - a property factory used in the class body
        def text(self) -> str | None:
            return self._specials.get(name)

        return property(text)

    def _special_id(name: str) -> property:  # noqa: N805
        def ident(self) -> int | None:
            token = self._specials.get(name)
            return None if token is None else self._token_id(token)

        return property(ident)

    bos_token, eos_token, unk_token = _special("bos_token"), _special("eos_token"), _special("unk_token")
    sep_token, pad_token, cls_token, mask_token = (_special("sep_token"), _special("pad_token"), _special("cls_token"),
                                                   _special("mask_token"))
    bos_token_id, eos_token_id, unk_token_id = _special_id("bos_token"), _special_id("eos_token"), _special_id("unk_token")
    sep_token_id, pad_token_id, cls_token_id, mask_token_id = (_special_id("sep_token"), _special_id("pad_token"),
                                                               _special_id("cls_token"), _special_id("mask_token"))
    del _special, _special_id

    @property
    def special_tokens_map(self) -> dict[str, Any]:
        """``{"bos_token": "<s>", ...}`` for the tokens set (transformers' property; the chat
        template sees these names)."""
        found: dict[str, Any] = {name: value for name, value in self._specials.items() if value}
        if self.additional_special_tokens:
            found["additional_special_tokens"] = list(self.additional_special_tokens)
        return found

    @property
    def all_special_tokens(self) -> list[str]:
        seen: list[str] = []
        for token in [t for t in self._specials.values() if t] + list(self.additional_special_tokens):
            if token not in seen:
                seen.append(token)
        return seen

    @property
    def all_special_ids(self) -> list[int]:
        return [i for i in (self._token_id(t) for t in self.all_special_tokens) if i is not None]

    @property
    def added_tokens_decoder(self) -> dict[int, Any]:
        return dict(sorted(self._tokenizer.get_added_tokens_decoder().items()))

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str, add_special_tokens: bool = True, **_ignored: Any) -> list[int]:
        """Token ids of ``text`` (transformers' ``encode`` without truncation or padding)."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a string, not {type(text).__name__}")
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def __call__(self, text: str | Sequence[str], add_special_tokens: bool = True, **_ignored: Any) -> dict[str, Any]:
        """``{"input_ids": [...], "attention_mask": [...]}`` for one text, lists of those for
        a list of texts (transformers' ``__call__`` without tensors, truncation or padding)."""
        if isinstance(text, str):
            ids = self.encode(text, add_special_tokens=add_special_tokens)
            return {"input_ids": ids, "attention_mask": [1] * len(ids)}
        encodings = self._tokenizer.encode_batch(list(text), add_special_tokens=add_special_tokens)
        ids = [list(e.ids) for e in encodings]
        return {"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]}

    def decode(self, token_ids: int | Iterable[int], skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None, **_ignored: Any) -> str:
        ids = [int(token_ids)] if isinstance(token_ids, int) else [int(t) for t in (token_ids.tolist() if hasattr(token_ids, "tolist") else token_ids)]
        text = self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        return _clean_up(text) if clean else text

    def batch_decode(self, sequences: Iterable[Iterable[int]], skip_special_tokens: bool = False, **kwargs: Any) -> list[str]:
        return [self.decode(s, skip_special_tokens=skip_special_tokens, **kwargs) for s in sequences]

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[str]:
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens).tokens)

    # ------------------------------------------------------------------ chat template

    def get_chat_template(self, chat_template: str | None = None, tools: list[Any] | None = None) -> str:
        """The template text: ``chat_template`` (a template, or the name of one of the
        bundle's), else the bundle's ("tool_use" when there are tools and it has one)."""
        templates = self.chat_template
        if isinstance(templates, dict):
            if chat_template is not None and chat_template in templates:
                return templates[chat_template]
            if chat_template is None:
                if tools is not None and "tool_use" in templates:
                    return templates["tool_use"]
                if "default" in templates:
                    return templates["default"]
                raise ChatTemplateError(f"the tokenizer has several chat templates and none is named default "
                                        f"(it has: {', '.join(sorted(map(str, templates)))})", where=self.name_or_path or "tokenizer",
                                        how="name one with chat_template=")
        elif chat_template is None:
            if not templates:
                raise ChatTemplateError("the tokenizer has no chat template", where=self.name_or_path or "tokenizer",
                                        how="give the prompt as plain text, or use a model whose tokenizer_config.json has a chat_template")
            return templates
        return chat_template

    def apply_chat_template(self, conversation: Sequence[Any], tools: list[Any] | None = None,
                            documents: list[dict[str, Any]] | None = None, chat_template: str | None = None,
                            add_generation_prompt: bool = False, continue_final_message: bool = False,
                            tokenize: bool = True, return_dict: bool = False, **kwargs: Any) -> Any:
        """The conversation rendered with the chat template, as transformers renders it;
        ``tokenize=True`` (transformers' default) returns its token ids (no special tokens
        added: the template writes them), ``return_dict`` ``{"input_ids", "attention_mask"}``.
        A batch (a list of conversations) gives a list. ``kwargs`` reach the template."""
        if return_dict and not tokenize:
            raise ValueError("return_dict=True is incompatible with tokenize=False")
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt are not compatible")
        for unsupported in ("padding", "truncation", "max_length", "return_tensors", "return_assistant_tokens_mask"):
            if kwargs.get(unsupported):
                raise ValueError(f"apply_chat_template({unsupported}=...) is not supported by edgekit's runtime tokenizer")
            kwargs.pop(unsupported, None)
        kwargs.pop("tokenizer_kwargs", None)
        template = self.get_chat_template(chat_template, tools)
        batched = bool(conversation) and isinstance(conversation, (list, tuple)) and (
            isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages"))
        conversations = list(conversation) if batched else [conversation]
        variables = {**self.special_tokens_map, **kwargs}
        rendered = [render_chat_template(template, chat, tools=tools, documents=documents,
                                         add_generation_prompt=add_generation_prompt,
                                         continue_final_message=continue_final_message, compiled=self._compiled,
                                         where=self.name_or_path or "tokenizer", **variables)
                    for chat in conversations]
        if not tokenize:
            return rendered if batched else rendered[0]
        ids = [self.encode(text, add_special_tokens=False) for text in rendered]
        if return_dict:
            out = {"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]}
            return out if batched else {k: v[0] for k, v in out.items()}
        return ids if batched else ids[0]

    def check_chat_template(self) -> None:
        """Compile the bundle's chat template(s) now (a server calls this at start so that a
        broken template is a start-up error, not an error on every chat request)."""
        templates = self.chat_template
        for text in (templates.values() if isinstance(templates, dict) else [templates] if templates else []):
            _compile(text, self._compiled, self.name_or_path or "tokenizer")

    def __repr__(self) -> str:
        return f"BundleTokenizer(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, added={len(self) - self.vocab_size})"


def _clean_up(text: str) -> str:
    """transformers' ``clean_up_tokenization``: spaces before punctuation and contractions."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                          (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


# --------------------------------------------------------------------- chat template rendering

_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def render_chat_template(template: str, messages: Sequence[Any], *, tools: list[Any] | None = None,
                         documents: list[dict[str, Any]] | None = None, add_generation_prompt: bool = False,
                         continue_final_message: bool = False, compiled: dict[str, Any] | None = None,
                         where: str = "chat template", **variables: Any) -> str:
    """One conversation through ``template`` (jinja2, sandboxed), as transformers'
    ``render_jinja_template`` renders it; every failure is a :class:`ChatTemplateError`."""
    import copy

    program = _compile(template, compiled if compiled is not None else {}, where)
    if hasattr(messages, "messages"):
        messages = messages.messages
    if tools is not None:
        for tool in tools:
            if not isinstance(tool, dict):
                raise ValueError("tools must be JSON schemas (dicts); edgekit's runtime does not convert Python functions")
    if documents is not None and not all(isinstance(d, dict) for d in documents):
        raise TypeError("documents must be a list of dicts with 'title' and 'text' keys")
    final = None
    if continue_final_message:
        messages = copy.deepcopy(list(messages))
        final = messages[-1]["content"]
        if isinstance(final, (list, tuple)):
            for block in reversed(final):
                if "text" in block:
                    final = block["text"]
                    block["text"] = block["text"] + _CONTINUE_TAG
                    break
            else:
                raise ValueError("continue_final_message is set but the final message has no text to continue")
        else:
            messages[-1]["content"] = messages[-1]["content"] + _CONTINUE_TAG
    text = _render(program, where, messages=messages, tools=tools, documents=documents,
                   add_generation_prompt=add_generation_prompt, **variables)
    if continue_final_message:
        if final.strip() not in text or _CONTINUE_TAG.strip() not in text:
            raise ChatTemplateError("continue_final_message is set but the template drops the final message", where=where,
                                    how="do not continue the final message with this template")
        at = text.rindex(_CONTINUE_TAG.strip())
        text = text[:at] if text[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()
    return text


def _render(program: Any, where: str, **context: Any) -> str:
    import jinja2

    pieces: list[str] = []
    size = 0
    try:
        for piece in program.generate(**context):
            size += len(piece)
            if size > TEMPLATE_OUTPUT_LIMIT:
                raise ChatTemplateError(f"the chat template rendered more than {TEMPLATE_OUTPUT_LIMIT} characters", where=where,
                                        how="use a bundle whose chat template renders the conversation, not unbounded text")
            pieces.append(piece)
    except ChatTemplateError:
        raise
    except jinja2.exceptions.SecurityError as exc:
        raise ChatTemplateError(f"the chat template broke the sandbox's rules: {_first_line(exc)}", where=where,
                                how="use a bundle whose chat template only formats the messages") from None
    except jinja2.exceptions.TemplateError as exc:  # raise_exception(...) and undefined-variable errors
        raise ChatTemplateError(f"the chat template refused these messages: {_first_line(exc)}", where=where,
                                how="change the messages (e.g. roles must alternate user/assistant)") from None
    except (RecursionError, MemoryError, OverflowError) as exc:
        raise ChatTemplateError(f"the chat template failed: {type(exc).__name__}", where=where,
                                how="use a bundle with a well-formed chat template") from None
    except Exception as exc:  # noqa: BLE001 - a template can raise anything its filters raise
        raise ChatTemplateError(f"the chat template failed: {type(exc).__name__}: {_first_line(exc)}", where=where,
                                how="check the messages' fields (role, content) against what the template expects") from None
    return "".join(pieces)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."


_ENVIRONMENT: Any = None


def _environment() -> Any:
    """One sandboxed environment, configured as transformers configures the one it renders
    chat templates with, plus the size limits of this module."""
    global _ENVIRONMENT
    if _ENVIRONMENT is not None:
        return _ENVIRONMENT
    from datetime import datetime

    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` marks the assistant's text for training
        masks in transformers; rendering a prompt keeps the body as it is."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    class Environment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
            # jinja2 renders a refused attribute as an empty value; a template that reaches for
            # Python internals is hostile, so refuse it outright
            raise jinja2.exceptions.SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} is unsafe")

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "**" and isinstance(left, (int, float)) and isinstance(right, (int, float)):
                if abs(right) > 64 and abs(left) > 1:
                    raise jinja2.exceptions.SecurityError(f"the power {left!r} ** {right!r} is too large")
            if operator == "*":
                for value, count in ((left, right), (right, left)):
                    if isinstance(value, (str, list, tuple, bytes)) and isinstance(count, int) and len(value) * count > TEMPLATE_VALUE_LIMIT:
                        raise jinja2.exceptions.SecurityError(f"a repetition of {len(value) * count} items is too large")
            return super().call_binop(context, operator, left, right)

    def raise_exception(message: Any) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False) -> str:
        # transformers' filter: no HTML escaping (jinja2's own tojson escapes <, >, &, ')
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format: str) -> str:  # noqa: A002 - the name templates call it with
        return datetime.now().strftime(format)

    env = Environment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    _ENVIRONMENT = env
    return env


def _compile(template: Any, cache: dict[str, Any], where: str) -> Any:
    if not isinstance(template, str):
        raise ChatTemplateError(f"the chat template is a {type(template).__name__}, not text", where=where,
                                how="re-run the bundle stage (tokenizer_config.json's chat_template must be a string)")
    if template in cache:
        return cache[template]
    import jinja2

    try:
        program = _environment().from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"the chat template does not compile: {_first_line(exc)} (line {exc.lineno})", where=where,
                                how="fix chat_template in the bundle's tokenizer_config.json (or chat_template.jinja) and rebuild it") from None
    except jinja2.exceptions.TemplateError as exc:
        raise ChatTemplateError(f"the chat template does not compile: {_first_line(exc)}", where=where,
                                how="fix chat_template in the bundle's tokenizer_config.json (or chat_template.jinja) and rebuild it") from None
    except (RecursionError, MemoryError) as exc:
        raise ChatTemplateError(f"the chat template does not compile: {type(exc).__name__}", where=where,
                                how="use a bundle with a well-formed chat template") from None
    cache[template] = program
    return program


__all__ = ["BundleTokenizer", "ChatTemplateError", "TEMPLATE_OUTPUT_LIMIT", "TEMPLATE_VALUE_LIMIT", "render_chat_template"]
