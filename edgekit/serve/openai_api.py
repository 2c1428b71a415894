"""The OpenAI-compatible surface: request bodies validated into a :class:`GenerationRequest`,
chat messages rendered into a prompt, answers shaped as OpenAI JSON objects and stream chunks.

Every problem with a request is an :class:`ApiError` carrying the HTTP status and OpenAI's
error object ``{"error": {"message", "type", "param", "code"}}``; ``param`` names the field.
Fields OpenAI defines but this server does not implement are refused when they ask for
something (``n`` > 1, ``logprobs``, ``echo``, tools...), accepted when they hold their neutral
value; unknown fields are refused, as OpenAI refuses them.

Every field is untrusted: :func:`check_json` walks a parsed body before anything reads it
(nesting depth, numbers finite and within 64 bits, text valid Unicode — no lone UTF-16
surrogate from a ``\\ud800`` escape — in values and in field names), and the parser bounds
what it uses (the number of messages and content parts, the length of short strings). Values
echoed in error messages are shortened.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

# OpenAI's error types
INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
RATE_LIMIT = "rate_limit_error"  # OpenAI's type for 429 (here: the queue is full)
SERVER_ERROR = "server_error"
UNAVAILABLE = "service_unavailable_error"


class ApiError(Exception):
    """An HTTP error answer. ``kind`` is the ``edgekit_errors_total`` label."""

    def __init__(self, status: int, message: str, *, type: str = INVALID_REQUEST, param: str | None = None,
                 code: str | None = None, kind: str = "bad_request", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.kind, self.headers = kind, dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def show(value: Any, limit: int = 60) -> str:
    """``repr(value)`` shortened for an error message (a request may send megabytes)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + "…" + text[-4:]


def printable(text: str) -> str:
    """``text`` with anything that is not valid Unicode (lone surrogates) as a ``\\uXXXX`` escape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# --------------------------------------------------------------------------- untrusted JSON

MAX_JSON_DEPTH = 16  # a chat body needs 5 (body, messages, message, content parts, part)
MAX_JSON_INT = 2**64  # token ids, seeds and counts all fit; float() of a larger one overflows
MAX_MESSAGES = 256
MAX_CONTENT_PARTS = 256
MAX_SHORT_STRING = 256  # model, user, each stop sequence


def _valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def check_json(body: Any) -> None:
    """Refuse (400, ``param`` naming the field) what no field may hold: nesting deeper than
    :data:`MAX_JSON_DEPTH`, NaN/Infinity (also ``1e999``, which parses to infinity), integers
    beyond ±2^64, and strings or field names that are not valid Unicode (a lone surrogate)."""
    stack: list[tuple[Any, str, int]] = [(body, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        where = path or "the request body"
        if isinstance(value, (dict, list)) and depth > MAX_JSON_DEPTH:
            raise bad(f"'{where}' nests deeper than {MAX_JSON_DEPTH} levels", path or None)
        if isinstance(value, dict):
            for key, item in value.items():
                if len(key) > MAX_SHORT_STRING:
                    raise bad(f"a field name{f' in {path!r}' if path else ''} is longer than {MAX_SHORT_STRING} characters "
                              f"({show(key)})", path or None)
                if not _valid_unicode(key):
                    name = printable(key)
                    raise bad(f"the field name '{name}'{f' in {path!r}' if path else ''} is not valid Unicode "
                              "(a lone UTF-16 surrogate)", f"{path}.{name}" if path else name)
                stack.append((item, f"{path}.{key}" if path else key, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))
        elif isinstance(value, str):
            if not _valid_unicode(value):
                raise bad(f"'{where}' is not valid Unicode text (a lone UTF-16 surrogate such as \\ud800)", path or None)
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise bad(f"'{where}' must be a finite number (got {value!r}; NaN and Infinity are not JSON numbers)",
                          path or None)
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_JSON_INT:
            raise bad(f"'{where}' is out of range (more than 2^64 in magnitude)", path or None)


# --------------------------------------------------------------------------- requests

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty")
#: fields real clients send that do not change what is generated (storage, billing, caching and
#: abuse-tracking hints of OpenAI's service): accepted when well-formed and bounded, then ignored.
#: A field that would change the result and is not supported stays refused with 400.
IGNORED_FIELDS = ("store", "metadata", "service_tier", "user", "prompt_cache_key", "prompt_cache_retention",
                  "safety_identifier")
SERVICE_TIERS = ("auto", "default", "flex", "scale", "priority")
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512  # OpenAI's own bounds
_COMMON = {"model", "max_tokens", "seed", "stop", "stream", "stream_options", "n", "logit_bias", "logprobs",
           *IGNORED_FIELDS, *SAMPLING_FIELDS}
COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools", "tool_choice",
                         "functions", "function_call", "parallel_tool_calls"}
MAX_STOP_SEQUENCES = 4  # OpenAI's limit
CHAT_ROLES = ("system", "developer", "user", "assistant")


@dataclass
class Limits:
    max_tokens_limit: int  # a request's max_tokens may not exceed this
    max_prompt_tokens: int  # nor its prompt this many tokens (small tokenizer)
    context_length: int  # the small branch's


@dataclass
class GenerationRequest:
    endpoint: str  # "completions" | "chat"
    prompt: str | list[int]  # the router's input: text (chat: rendered) or token ids
    prompt_tokens: int
    max_tokens: int
    sampler_params: dict[str, Any]  # the full sampler parameters (bundle defaults + request)
    seed: int | None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


class RequestParser:
    """Turns a JSON body into a :class:`GenerationRequest` for one served bundle."""

    def __init__(self, *, model_name: str, tokenizer: Any, vocab_size: int, default_sampling: dict[str, Any],
                 default_max_tokens: int, limits: Limits, policy: str):
        self.model_name, self.tokenizer, self.vocab_size = model_name, tokenizer, vocab_size
        self.default_sampling, self.limits, self.policy = dict(default_sampling), limits, policy
        self.default_max_tokens = min(default_max_tokens, limits.max_tokens_limit)
        bos = getattr(tokenizer, "bos_token", None)
        ids = tokenizer.encode("a")
        # a chat template that writes the BOS token itself would get a second one from encode()
        self._strip_bos = bos if bos and ids and ids[0] == getattr(tokenizer, "bos_token_id", None) else None

    # -- entry points

    def completion(self, body: Any) -> GenerationRequest:
        body = self._object(body, COMPLETION_FIELDS)
        self._neutral(body, "echo", (False, None), "echo is not supported")
        self._neutral(body, "best_of", (1, None), "best_of is not supported (one completion per request)")
        self._neutral(body, "suffix", (None, ""), "suffix (insertion) is not supported")
        self._neutral(body, "logprobs", (None, 0), "logprobs are not supported")
        if "prompt" not in body:
            raise bad("'prompt' is required", "prompt")
        prompt = body["prompt"]
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            if not prompt:
                raise bad("'prompt' is empty", "prompt")
            n_prompt = self._count(prompt, "prompt")
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            outside = [t for t in prompt if not 0 <= t < self.vocab_size]
            if outside:
                raise bad(f"token id {outside[0]} in 'prompt' is outside the vocabulary (0..{self.vocab_size - 1})", "prompt")
            prompt, n_prompt = [int(t) for t in prompt], len(prompt)
        elif isinstance(prompt, list) and len(prompt) > 1:
            raise bad("one prompt per request (a batch of prompts is not supported)", "prompt")
        else:
            raise bad("'prompt' must be a non-empty string or a list of token ids", "prompt")
        self._check_prompt_length(n_prompt, "prompt")
        return self._common(body, "completions", prompt, n_prompt, "max_tokens")

    def chat(self, body: Any) -> GenerationRequest:
        body = self._object(body, CHAT_FIELDS)
        self._neutral(body, "logprobs", (None, False), "logprobs are not supported")
        self._neutral(body, "top_logprobs", (None, 0), "logprobs are not supported")
        for name in ("tools", "functions"):
            self._neutral(body, name, (None, []), "tool and function calling are not supported")
        for name in ("tool_choice", "function_call"):
            self._neutral(body, name, (None, "none"), "tool and function calling are not supported")
        fmt = body.get("response_format")
        if fmt is not None and fmt != {"type": "text"}:
            raise bad("response_format other than {\"type\": \"text\"} is not supported", "response_format")
        if "max_tokens" in body and "max_completion_tokens" in body:
            raise bad("give max_tokens or max_completion_tokens, not both", "max_completion_tokens")
        messages = self._messages(body.get("messages"))
        prompt = self.render_chat(messages)
        n_prompt = self._count(prompt, "messages")
        self._check_prompt_length(n_prompt, "messages")
        limit_field = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        return self._common(body, "chat", prompt, n_prompt, limit_field)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The prompt for ``messages``: the tokenizer's chat template with the assistant's turn
        opened, or, for a tokenizer without one, ``Role: content`` lines and a final
        ``Assistant:`` (docs/serve.md)."""
        if getattr(self.tokenizer, "chat_template", None):
            try:
                text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # the template's own checks (roles must alternate, ...): the caller's input
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise bad(f"the model's chat template refused these messages: {first}", "messages") from None
            if self._strip_bos and text.startswith(self._strip_bos):
                text = text[len(self._strip_bos):]
            return text
        lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
        return "\n".join(lines) + "\nAssistant:"

    # -- parts

    @staticmethod
    def _object(body: Any, allowed: set[str]) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object")
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise bad(f"unrecognized request argument supplied: {unknown[0]}", unknown[0])
        return body

    @staticmethod
    def _neutral(body: dict, name: str, neutral: tuple, message: str) -> None:
        if name in body and body[name] not in neutral:
            raise bad(f"{message} ({name}={show(body[name])})", name)

    @staticmethod
    def _check_ignored(body: dict) -> None:
        """:data:`IGNORED_FIELDS` do not change the answer, but they are still input: typed and bounded."""
        for name in ("user", "prompt_cache_key", "prompt_cache_retention", "safety_identifier", "service_tier"):
            value = body.get(name)
            if value is None:
                continue
            if not isinstance(value, str):
                raise bad(f"'{name}' must be a string", name)
            if len(value) > MAX_SHORT_STRING:
                raise bad(f"'{name}' is longer than {MAX_SHORT_STRING} characters", name)
        if body.get("service_tier") is not None and body["service_tier"] not in SERVICE_TIERS:
            raise bad(f"'service_tier' must be one of {', '.join(SERVICE_TIERS)} (got {show(body['service_tier'])})",
                      "service_tier")
        if body.get("store") is not None and not isinstance(body["store"], bool):
            raise bad("'store' must be true or false", "store")
        metadata = body.get("metadata")
        if metadata is None:
            return
        if not isinstance(metadata, dict):
            raise bad("'metadata' must be an object of string keys and string values", "metadata")
        if len(metadata) > MAX_METADATA_PAIRS:
            raise bad(f"'metadata' has {len(metadata)} keys, more than {MAX_METADATA_PAIRS}", "metadata")
        for key, value in metadata.items():
            if len(key) > MAX_METADATA_KEY or not isinstance(value, str) or len(value) > MAX_METADATA_VALUE:
                raise bad(f"'metadata' keys are strings of at most {MAX_METADATA_KEY} characters and values strings "
                          f"of at most {MAX_METADATA_VALUE} (key {show(key)})", "metadata")

    def _messages(self, messages: Any) -> list[dict[str, str]]:
        if not isinstance(messages, list) or not messages:
            raise bad("'messages' must be a non-empty list of {role, content} objects", "messages")
        if len(messages) > MAX_MESSAGES:
            raise bad(f"'messages' has {len(messages)} messages, more than this server takes ({MAX_MESSAGES})", "messages")
        out = []
        for i, message in enumerate(messages):
            where = f"messages[{i}]"
            if not isinstance(message, dict):
                raise bad(f"{where} must be an object with 'role' and 'content'", where)
            role = message.get("role")
            if role not in CHAT_ROLES:
                raise bad(f"{where}.role must be one of {', '.join(CHAT_ROLES)} (got {show(role)})", f"{where}.role")
            content = message.get("content")
            if isinstance(content, list):  # content parts: text only
                if len(content) > MAX_CONTENT_PARTS:
                    raise bad(f"{where}.content has {len(content)} parts, more than this server takes ({MAX_CONTENT_PARTS})",
                              f"{where}.content")
                texts = []
                for j, part in enumerate(content):
                    if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                        raise bad(f"{where}.content[{j}]: only text parts ({{\"type\": \"text\", \"text\": ...}}) are "
                                  "supported", f"{where}.content")
                    texts.append(part["text"])
                content = "".join(texts)
            if not isinstance(content, str):
                raise bad(f"{where}.content must be a string or a list of text parts", f"{where}.content")
            out.append({"role": "system" if role == "developer" else role, "content": content})
        return out

    def _count(self, text: str, param: str) -> int:
        n = len(self.tokenizer.encode(text))
        if n == 0:
            raise bad(f"'{param}' has no tokens", param)
        return n

    def _check_prompt_length(self, n: int, param: str) -> None:
        lim = self.limits
        if n > lim.max_prompt_tokens:
            raise bad(f"the prompt has {n} tokens, more than this server's limit of {lim.max_prompt_tokens} "
                      f"(--max-prompt-tokens)", param, "context_length_exceeded")
        if n >= lim.context_length:
            raise bad(f"the prompt has {n} tokens; the model's context holds {lim.context_length} including the answer",
                      param, "context_length_exceeded")

    def _common(self, body: dict, endpoint: str, prompt: str | list[int], n_prompt: int, limit_field: str) -> GenerationRequest:
        from edgekit.runtime import sampling_ref

        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise bad("'model' must be a string", "model")
        self._check_ignored(body)
        if isinstance(model, str) and len(model) > MAX_SHORT_STRING:
            raise bad(f"'model' is longer than {MAX_SHORT_STRING} characters", "model")
        if model is not None and model != self.model_name:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r} (GET /v1/models)",
                           param="model", code="model_not_found", kind="not_found")
        self._neutral(body, "n", (1, None), "n > 1 is not supported (one choice per request)")
        self._neutral(body, "logit_bias", (None, {}), "logit_bias is not supported")
        max_tokens = body.get(limit_field)
        if max_tokens is None:
            max_tokens = self.default_max_tokens
        elif isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise bad(f"'{limit_field}' must be an integer >= 1 (got {show(max_tokens)})", limit_field)
        elif max_tokens > self.limits.max_tokens_limit:
            raise bad(f"'{limit_field}' is {max_tokens}, above this server's limit of {self.limits.max_tokens_limit} "
                      "(--max-tokens-limit)", limit_field, "max_tokens_exceeded")
        params = dict(self.default_sampling)
        for name in SAMPLING_FIELDS:
            if body.get(name) is None:
                continue
            try:
                sampling_ref.check_params({name: body[name]})
            except (TypeError, ValueError, OverflowError) as exc:
                raise bad(f"'{name}': {exc}", name) from None
            params[name] = body[name]
        seed = body.get("seed")
        if seed is not None:
            try:
                sampling_ref.check_params({"seed": seed})
            except (TypeError, ValueError, OverflowError) as exc:
                raise bad(f"'seed': {exc}", "seed") from None
        if self.policy == "speculative":
            from edgekit.errors import EdgekitError
            from edgekit.runtime.speculative import speculative_params

            try:
                speculative_params(params)
            except EdgekitError as exc:
                raise bad(f"{exc.what} (this server's routing policy is speculative)",
                          next((n for n in SAMPLING_FIELDS if n.endswith("penalty") and n in body), None)) from None
        stop = body.get("stop")
        if stop is None:
            stops: list[str] = []
        elif isinstance(stop, str):
            stops = [stop]
        elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
            stops = list(stop)
        else:
            raise bad("'stop' must be a string or a list of strings", "stop")
        if len(stops) > MAX_STOP_SEQUENCES or any(not s for s in stops):
            raise bad(f"'stop' takes up to {MAX_STOP_SEQUENCES} non-empty strings", "stop")
        if any(len(s) > MAX_SHORT_STRING for s in stops):
            raise bad(f"a 'stop' sequence is longer than {MAX_SHORT_STRING} characters", "stop")
        stream = body.get("stream", False)
        if not isinstance(stream, bool) and stream is not None:
            raise bad("'stream' must be true or false", "stream")
        options = body.get("stream_options")
        include_usage = False
        if options is not None:
            if not stream:
                raise bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
            if (not isinstance(options, dict) or set(options) - {"include_usage"}
                    or not isinstance(options.get("include_usage", False), bool)):
                raise bad("'stream_options' takes {\"include_usage\": true|false}", "stream_options")
            include_usage = options.get("include_usage", False)
        return GenerationRequest(endpoint, prompt, n_prompt, int(max_tokens), params, seed, stops, bool(stream), include_usage)


# --------------------------------------------------------------------------- answers


def new_id(endpoint: str) -> str:
    return ("chatcmpl-" if endpoint == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def finish_reason(router_reason: str | None, stopped: bool) -> str:
    """OpenAI's finish_reason: "stop" (EOS or a stop sequence) or "length"; a remote branch's
    own value passes through."""
    if stopped or router_reason == "eos":
        return "stop"
    return router_reason or "length"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(endpoint: str, rid: str, model: str, text: str, reason: str, use: dict, edgekit: dict, *,
             reasoning: str | None = None, split: bool = False) -> dict[str, Any]:
    """The answer object. ``split`` (chat, a reasoning model's block split off): the message has
    ``reasoning_content`` (the block, or null) next to ``content`` (the answer), as vLLM's
    OpenAI-compatible server writes it."""
    created = int(time.time())
    if endpoint == "chat":
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if split:
            message["reasoning_content"] = reasoning
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice], "usage": use, "edgekit": edgekit}


def chunk(endpoint: str, rid: str, model: str, *, text: str | None = None, reason: str | None = None, role: bool = False,
          edgekit: dict | None = None, use: dict | None = None, no_choices: bool = False,
          reasoning: str | None = None) -> dict[str, Any]:
    """One stream chunk: a text piece, a reasoning piece (chat: ``delta.reasoning_content``), the
    opening role (chat), the finish, or the usage chunk."""
    created = int(time.time())
    if endpoint == "chat":
        delta: dict[str, Any] = {}
        if role:
            delta = {"role": "assistant", "content": ""}
        elif reasoning is not None:
            delta = {"reasoning_content": reasoning}
        elif text is not None:
            delta = {"content": text}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        obj = "text_completion"
    out: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model,
                           "choices": [] if no_choices else [choice]}
    if use is not None:
        out["usage"] = use
    if edgekit is not None:
        out["edgekit"] = edgekit
    return out
