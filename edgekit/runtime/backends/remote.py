"""The remote branch: an OpenAI-compatible ``/v1/completions`` endpoint that returns text, not
logits, and :class:`BranchUnavailable`, raised on any failure to reach it so a router can fall
back to a local branch. Standard library only (urllib).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any


class BranchUnavailable(Exception):
    """A remote branch cannot answer (timeout, connection or HTTP error, malformed reply).

    Not an :class:`EdgekitError`: it is expected at run time and handled by falling back to
    another branch, not by the user editing something. ``url`` and ``cause`` are attributes;
    the message is one line naming both."""

    def __init__(self, url: str, cause: str):
        self.url = url
        self.cause = " ".join(str(cause).split())  # one line, whatever the server sent
        super().__init__(f"{url} is unavailable: {self.cause}")


class RemoteBranch:
    """An OpenAI-compatible completions endpoint (llama.cpp server, vLLM, TGI, OpenAI...).

    ``base_url`` is the server's root (``http://host:8000``) or its ``/v1`` root; requests go to
    ``<root>/v1/completions``. ``model`` is sent when given (servers that serve one model
    ignore it), ``api_key`` as ``Authorization: Bearer``. ``timeout`` (seconds) bounds the
    connection and every read, so a stalled stream fails too. Every failure to get an answer
    raises :class:`BranchUnavailable`; the branch returns text, never logits.
    """

    has_logits = False
    backend = "remote"
    vocab_size = None
    context_length = None
    tokenizer = None

    def __init__(self, base_url: str, *, model: str | None = None, api_key: str | None = None, timeout: float = 30.0,
                 name: str = "large"):
        root = base_url.rstrip("/")
        self.base_url = root
        self.url = root + ("/completions" if root.endswith("/v1") else "/v1/completions")
        self.model = model
        self.api_key = api_key
        self.timeout = float(timeout)
        self.name = name

    def __repr__(self) -> str:
        return f"RemoteBranch(name={self.name!r}, url={self.url!r})"

    def complete(self, prompt: str, *, max_new_tokens: int, temperature: float, stop: Sequence[str] | None = None) -> dict[str, Any]:
        """One completion: ``{"text", "finish_reason", "usage"}`` (usage as the server reports
        it, ``{}`` when it does not)."""
        response = self._post(prompt, max_new_tokens, temperature, stop, stream=False)
        try:
            with response:
                data = json.loads(response.read())
            choice = data["choices"][0]
            return {"text": choice.get("text") or "", "finish_reason": choice.get("finish_reason"), "usage": data.get("usage") or {}}
        except BranchUnavailable:
            raise
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise BranchUnavailable(self.url, "malformed response (not an OpenAI completions JSON)") from None
        except Exception as exc:
            raise self._unavailable(exc) from None

    def stream(self, prompt: str, *, max_new_tokens: int, temperature: float, stop: Sequence[str] | None = None) -> Iterator[str]:
        """Text chunks from the server-sent-event stream, as they arrive.

        The request is sent before this returns, so an unreachable server raises here, before
        any text; a stream that stalls past ``timeout`` or ends without ``data: [DONE]``
        raises :class:`BranchUnavailable` from the iteration."""
        response = self._post(prompt, max_new_tokens, temperature, stop, stream=True)
        return self._events(response)

    # -- internals

    def _post(self, prompt: str, max_new_tokens: int, temperature: float, stop: Sequence[str] | None, *, stream: bool) -> Any:
        import urllib.request

        payload: dict[str, Any] = {"prompt": prompt, "max_tokens": int(max_new_tokens), "temperature": float(temperature),
                                   "stream": stream}
        if self.model:
            payload["model"] = self.model
        if stop:
            payload["stop"] = list(stop)
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream" if stream else "application/json",
                   "User-Agent": "edgekit"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(payload).encode(), headers=headers, method="POST")
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except Exception as exc:
            raise self._unavailable(exc) from None

    def _events(self, response: Any) -> Iterator[str]:
        try:
            with response:
                for raw in response:
                    line = raw.decode("utf-8", "replace").strip()
                    if not line.startswith("data:"):
                        continue  # blank separators, ": keep-alive" comments, event:/id: fields
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    try:
                        event = json.loads(data)
                    except ValueError:
                        raise BranchUnavailable(self.url, f"malformed stream event: {data[:80]}") from None
                    if isinstance(event, dict) and event.get("error"):
                        error = event["error"]
                        raise BranchUnavailable(self.url, f"server error: {error.get('message') if isinstance(error, dict) else error}")
                    choices = event.get("choices") if isinstance(event, dict) else None
                    text = choices[0].get("text") if choices else None
                    if text:
                        yield text
        except BranchUnavailable:
            raise
        except Exception as exc:
            raise self._unavailable(exc) from None
        raise BranchUnavailable(self.url, "the stream ended without data: [DONE]")

    def _unavailable(self, exc: BaseException) -> BranchUnavailable:
        import http.client
        import urllib.error

        if isinstance(exc, urllib.error.HTTPError):
            detail = ""
            try:
                body = exc.read().decode("utf-8", "replace")
                try:
                    error = json.loads(body).get("error")
                    detail = error.get("message", "") if isinstance(error, dict) else str(error or "")
                except (ValueError, AttributeError):
                    detail = body
            except Exception:  # the body is a courtesy; the status code is the cause
                pass
            cause = f"HTTP {exc.code} {exc.reason}" + (f": {detail[:200]}" if detail.strip() else "")
        elif isinstance(exc, urllib.error.URLError):
            reason = exc.reason
            cause = self._describe(reason) if isinstance(reason, BaseException) else str(reason)
        elif isinstance(exc, http.client.HTTPException):
            cause = f"bad HTTP response ({type(exc).__name__}: {exc})"
        else:
            cause = self._describe(exc)
        return BranchUnavailable(self.url, cause)

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, TimeoutError):  # socket.timeout is TimeoutError since Python 3.10
            return f"no answer within {self.timeout:g} s (timed out)"
        if isinstance(exc, ConnectionRefusedError):
            return "connection refused"
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
