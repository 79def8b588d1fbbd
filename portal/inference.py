"""A small client for OpenAI-compatible chat servers (vLLM, ``llamafactory-cli api``).

``base_url`` follows the OpenAI convention and ends with ``/v1``
(``http://127.0.0.1:8000/v1``). Every failure becomes one exception, ``InferenceError``, whose
message says what happened and what to do, in words a user of the Chat tab can act on. The
API key goes in the Authorization header only: never into a message, an exception or a log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import weakref
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import anyio
import httpx

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 120.0  # seconds to wait for the first byte and between streamed chunks
CONNECT_TIMEOUT = 5.0  # a loopback or in-cluster server accepts at once, or is not there
# how servers say a prompt does not fit: vLLM ("maximum context length", "max_model_len"),
# OpenAI ("context_length_exceeded"), TGI and others ("too long", "exceeds")
CONTEXT_WORDS = ("context length", "context_length", "max_model_len", "maximum context", "too long",
                 "exceeds the model", "input length")

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": "..."}


class InferenceError(RuntimeError):
    """A chat request failed; the message is meant for the user."""


class ServerGone(InferenceError):
    """Nothing took the request (refused, or closed before any answer): the server is not running."""


class ModelNotLoaded(InferenceError):
    """The server does not serve the model asked for (vLLM's 404): e.g. a restarted vLLM forgot
    the adapters loaded at run time, which the caller may load again."""


_LIMITS = httpx.Limits(max_keepalive_connections=20, max_connections=100)
_client: httpx.Client | None = None
_client_lock = threading.Lock()
# an async client's connections belong to the event loop that opened them: one client per loop
_async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = weakref.WeakKeyDictionary()


def _http() -> httpx.Client:
    """One pooled client for the process: a new client per message costs a new connection (and
    ~25 ms to build), most of the time to first token of a small model."""
    global _client
    with _client_lock:
        if _client is None:
            _client = httpx.Client(limits=_LIMITS)
        return _client


def _ahttp() -> httpx.AsyncClient:
    """The pooled async client of the running event loop (the portal's: uvicorn runs one)."""
    loop = asyncio.get_running_loop()
    client = _async_clients.get(loop)
    if client is None:
        client = _async_clients[loop] = httpx.AsyncClient(limits=_LIMITS)
    return client


async def aclose_http() -> None:
    """Close the running event loop's async client and its connections (the portal's shutdown)."""
    client = _async_clients.pop(asyncio.get_running_loop(), None)
    if client is not None:
        await client.aclose()


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _timeout(timeout: float) -> httpx.Timeout:
    return httpx.Timeout(timeout, connect=min(CONNECT_TIMEOUT, timeout))


def _url(base_url: str, path: str) -> str:
    return base_url.rstrip("/") + path


def _scrub(text: str, api_key: str | None) -> str:
    # a server may echo a request back in its error text; the key must not travel on with it
    return text.replace(api_key, "***") if api_key else text


def _server_detail(response: httpx.Response) -> str:
    """The server's own words from an error body: FastAPI ``detail``, vLLM ``message``, OpenAI ``error.message``."""
    try:
        body = response.json()
    except (ValueError, UnicodeDecodeError):
        return response.text.strip()[:500]
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:500]
        for key in ("detail", "message", "error"):
            if body.get(key):
                value = body[key]
                return (value if isinstance(value, str) else json.dumps(value))[:500]
    return json.dumps(body)[:500]


def _transport_error(err: httpx.HTTPError, base_url: str, timeout: float, *, during_answer: bool) -> InferenceError:
    if isinstance(err, (httpx.ConnectError, httpx.ConnectTimeout)):
        return ServerGone(f"the model server is not running: nothing answers at {base_url} ({type(err).__name__}). "
                              "If it was just stopped, send the message again to start it.")
    if isinstance(err, httpx.TimeoutException):
        return InferenceError(f"the model server did not answer within {timeout:g} s: it may be busy with other "
                              "requests or slow on this machine; try again, or ask for fewer new tokens")
    if during_answer:
        return InferenceError("the model server stopped in the middle of the answer (the connection closed); "
                              "send the message again — the server is restarted if it went down")
    if isinstance(err, (httpx.RemoteProtocolError, httpx.ReadError)):  # accepted, then closed: dying or gone
        return ServerGone(f"the model server is not running: it closed the connection without answering "
                              f"({type(err).__name__}). Send the message again to start it.")
    return InferenceError(f"could not talk to the model server at {base_url}: {type(err).__name__}: {err}")


def _status_error(response: httpx.Response, base_url: str, model: str | None, api_key: str | None,
                  timeout: float) -> InferenceError:
    detail = _scrub(_server_detail(response), api_key)
    code = response.status_code
    if code in (401, 403):
        return InferenceError(f"the model server refused the portal's credentials (HTTP {code}); "
                              "an admin must check the endpoint's API key")
    if code == 404 and model is not None and ("model" in detail.lower() or not detail):
        served = ""
        try:  # say what it does serve: usually the fix is obvious from that (base models only: vLLM
            # also lists every loaded adapter, other users' runs included)
            names = [str(c["id"]) for c in model_cards(base_url, api_key=api_key, timeout=min(timeout, 10.0))
                     if not c.get("parent")]
            served = f" (it serves: {', '.join(names) or 'nothing'})"
        except InferenceError:
            pass
        return ModelNotLoaded(f"model '{model}' is not loaded on this server{served}; "
                              "start a chat with the run again so the portal loads it")
    if code == 404:
        return InferenceError(f"the model server has no such endpoint ({response.request.url.path}): "
                              f"check that the base URL {base_url} ends with /v1")
    if code == 400 and any(word in detail.lower() for word in CONTEXT_WORDS):
        return InferenceError("the conversation is longer than the model's context: clear it or shorten your "
                              f"messages, or ask for fewer new tokens (server: {detail})")
    if code in (400, 422):
        return InferenceError(f"the model server refused the request: {detail}")
    if code in (429, 503):
        return InferenceError(f"the model server is overloaded (HTTP {code}): try again in a moment ({detail})")
    return InferenceError(f"the model server failed (HTTP {code}): {detail}")


def list_models(base_url: str, api_key: str | None = None, *, timeout: float = 10.0) -> list[str]:
    """The model names the server answers to (``GET /models``)."""
    return [str(card["id"]) for card in model_cards(base_url, api_key, timeout=timeout)]


def model_cards(base_url: str, api_key: str | None = None, *, timeout: float = 10.0) -> list[dict[str, Any]]:
    """``GET /models``'s entries as the server gives them. vLLM adds ``root`` (what it loaded: a
    model folder or an adapter path) and ``parent`` (an adapter's base model; None for a base)."""
    try:
        response = _http().get(_url(base_url, "/models"), headers=_headers(api_key), timeout=_timeout(timeout))
    except httpx.HTTPError as err:
        raise _transport_error(err, base_url, timeout, during_answer=False) from None
    if response.status_code != 200:
        raise _status_error(response, base_url, None, api_key, timeout)
    try:
        return [entry for entry in response.json().get("data", []) if isinstance(entry, dict) and entry["id"]]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise InferenceError(f"{base_url} answered /models with something that is not an OpenAI model list") from None


def _request_body(model: str, messages: Sequence[Message], temperature: float, top_p: float, max_tokens: int,
                  stream: bool) -> dict[str, Any]:
    if not messages:
        raise InferenceError("there is no message to send")
    return {"model": model, "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
            "temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, "stream": stream}


def _piece(line: str, api_key: str | None) -> str | None:
    """The answer's text in one line of the server's SSE stream ("" for none); None at its [DONE]."""
    if not line.startswith("data:"):
        return ""  # SSE comments, event names, keep-alives, blank separators
    data = line[len("data:"):].strip()
    if data == "[DONE]":
        return None
    try:
        chunk = json.loads(data)
    except ValueError:
        raise InferenceError("the model server sent a malformed piece of the answer") from None
    if not isinstance(chunk, dict):
        raise InferenceError("the model server sent a malformed piece of the answer")
    if chunk.get("error"):  # vLLM reports late failures in-stream
        error = chunk["error"]
        text = error.get("message") if isinstance(error, dict) else str(error)
        raise InferenceError(f"the model server failed while answering: {_scrub(str(text), api_key)}")
    return "".join((choice.get("delta") or {}).get("content") or "" for choice in chunk.get("choices") or []
                   if isinstance(choice, dict))


UNFINISHED = ("the model server stopped in the middle of the answer (it ended without finishing); "
              "send the message again — the server is restarted if it went down")


def stream_chat(base_url: str, model: str, messages: Sequence[Message], *, temperature: float = 0.7,
                top_p: float = 0.9, max_tokens: int = 512, api_key: str | None = None,
                timeout: float = DEFAULT_TIMEOUT) -> Iterator[str]:
    """Yield the answer's text pieces as the server streams them (``stream: true``, SSE).

    ``timeout`` bounds the wait for the first byte and for each following chunk, not the whole
    answer. An answer that ends without the server's ``[DONE]`` raises: a half answer must not
    look like a whole one.
    """
    body = _request_body(model, messages, temperature, top_p, max_tokens, stream=True)
    log.debug("streamed chat: %s model=%s messages=%d", base_url, model, len(messages))
    answering = False
    try:
        with _http().stream("POST", _url(base_url, "/chat/completions"), json=body, headers=_headers(api_key),
                            timeout=_timeout(timeout)) as response:
            if response.status_code != 200:
                response.read()
                raise _status_error(response, base_url, model, api_key, timeout)
            answering = True
            done = False
            for line in response.iter_lines():
                piece = "" if done else _piece(line, api_key)
                done = done or piece is None  # then read on to the body's end: the connection goes back to the pool
                if piece:
                    yield piece
            if done:
                return
    except httpx.HTTPError as err:
        raise _transport_error(err, base_url, timeout, during_answer=answering) from None
    raise InferenceError(UNFINISHED)


async def astream_chat(base_url: str, model: str, messages: Sequence[Message], *, temperature: float = 0.7,
                       top_p: float = 0.9, max_tokens: int = 512, api_key: str | None = None,
                       timeout: float = DEFAULT_TIMEOUT) -> AsyncIterator[str]:
    """``stream_chat`` on the running event loop (the /v1 gateway): no worker thread waits for
    the pieces. It yields "" first, as soon as the server has taken the request (HTTP 200), so a
    caller can start its own answer before the first token; a failure before that "" is the
    request's (a status to send back), one after it happened mid-answer."""
    body = _request_body(model, messages, temperature, top_p, max_tokens, stream=True)
    log.debug("streamed chat (async): %s model=%s messages=%d", base_url, model, len(messages))
    answering = False
    try:
        async with _ahttp().stream("POST", _url(base_url, "/chat/completions"), json=body,
                                   headers=_headers(api_key), timeout=_timeout(timeout)) as response:
            if response.status_code != 200:
                await response.aread()
                # off the loop: a 404 asks the server what it serves (a blocking request)
                raise await anyio.to_thread.run_sync(_status_error, response, base_url, model, api_key, timeout)
            answering = True
            yield ""
            done = False
            async for line in response.aiter_lines():
                piece = "" if done else _piece(line, api_key)
                done = done or piece is None  # then read on to the body's end: the connection goes back to the pool
                if piece:
                    yield piece
            if done:
                return
    except httpx.HTTPError as err:
        raise _transport_error(err, base_url, timeout, during_answer=answering) from None
    raise InferenceError(UNFINISHED)


def chat(base_url: str, model: str, messages: Sequence[Message], *, temperature: float = 0.7, top_p: float = 0.9,
         max_tokens: int = 512, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> str:
    """The whole answer in one piece (``stream: false``)."""
    body = _request_body(model, messages, temperature, top_p, max_tokens, stream=False)
    log.debug("chat: %s model=%s messages=%d", base_url, model, len(messages))
    try:
        response = _http().post(_url(base_url, "/chat/completions"), json=body, headers=_headers(api_key),
                              timeout=_timeout(timeout))
    except httpx.HTTPError as err:
        raise _transport_error(err, base_url, timeout, during_answer=False) from None
    if response.status_code != 200:
        raise _status_error(response, base_url, model, api_key, timeout)
    try:
        return str(response.json()["choices"][0]["message"]["content"] or "")
    except (ValueError, KeyError, IndexError, TypeError):
        raise InferenceError("the model server answered with something that is not an OpenAI chat completion") from None


# ---- vLLM's runtime LoRA endpoints (VLLM_ALLOW_RUNTIME_LORA_UPDATING=True) -----------------------
ALREADY_LOADED_WORDS = ("already been loaded", "already loaded")
NOT_FOUND_WORDS = ("cannot be found", "not found", "does not exist")


def _lora_request(base_url: str, path: str, body: dict[str, str], api_key: str | None,
                  timeout: float) -> httpx.Response:
    try:
        return _http().post(_url(base_url, path), json=body, headers=_headers(api_key), timeout=_timeout(timeout))
    except httpx.HTTPError as err:
        raise _transport_error(err, base_url, timeout, during_answer=False) from None


def load_lora_adapter(base_url: str, name: str, path: str, *, api_key: str | None = None,
                      timeout: float = 60.0) -> bool:
    """Load an adapter into a running vLLM under ``name``; False when that name was loaded already
    (vLLM answers 400 "... has already been loaded"): the caller checks it is the same adapter."""
    response = _lora_request(base_url, "/load_lora_adapter", {"lora_name": name, "lora_path": path}, api_key, timeout)
    if response.status_code == 200:
        return True
    detail = _scrub(_server_detail(response), api_key)
    if response.status_code in (400, 409) and any(w in detail.lower() for w in ALREADY_LOADED_WORDS):
        return False
    if response.status_code == 404 and "adapter" in detail.lower():  # vLLM 0.25: "No adapter found for <path>"
        raise InferenceError(f"the inference server cannot read the run's adapter at {path}: it must mount the "
                             "portal's data root (an admin sets inference_adapter_root to where it does)")
    if response.status_code in (404, 405):  # no such route: runtime LoRA updating is off
        raise InferenceError(f"the inference server at {base_url} does not load adapters at run time (HTTP "
                             f"{response.status_code} on /load_lora_adapter): start vLLM with --enable-lora and "
                             "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, or let the portal serve runs itself")
    if response.status_code in (401, 403):
        raise InferenceError(f"the model server refused the portal's credentials (HTTP {response.status_code}); "
                             "an admin must check the endpoint's API key")
    raise InferenceError(f"the inference server could not load the run's adapter (HTTP {response.status_code}): "
                         f"{detail}")


def unload_lora_adapter(base_url: str, name: str, *, api_key: str | None = None, timeout: float = 30.0) -> bool:
    """Unload an adapter; False when the server did not have it (nothing to do)."""
    response = _lora_request(base_url, "/unload_lora_adapter", {"lora_name": name}, api_key, timeout)
    if response.status_code == 200:
        return True
    detail = _scrub(_server_detail(response), api_key)
    if response.status_code in (400, 404) and any(w in detail.lower() for w in NOT_FOUND_WORDS):
        return False
    raise InferenceError(f"the inference server could not unload adapter {name} (HTTP {response.status_code}): "
                         f"{detail}")
