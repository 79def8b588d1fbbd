"""An OpenAI-compatible gateway on the portal: `/v1/models` and `/v1/chat/completions`.

Any OpenAI client pointed at `<portal>/v1` chats with the signed-in user's runs (`run-<id>`) and
with the models a configured inference endpoint serves. It sits behind the same login as every
other route; the servers, their ports and their API keys stay inside the portal.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from .chat import ChatService
from .inference import InferenceError
from .models import User
from .runs import NotFound, PortalError


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{key} must be a number between {low} and {high}")
    return value


def build_gateway(chat: ChatService, user_of: Callable[[Request], User | None]) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["openai"])

    @router.get("/models")
    async def models(request: Request):
        user = user_of(request)
        if user is None:
            return _error(401, "sign in first, or send 'Authorization: Bearer <token>'", "authentication_error")
        data = [{"id": t.model, "object": "model", "created": int(t.run.created_at.timestamp()) if t.run else 0,
                 "owned_by": t.run.owner if t.run else "inference-endpoint", "name": t.run.name if t.run else t.model}
                for t in await run_in_threadpool(chat.targets, user)]
        return {"object": "list", "data": data}

    @router.post("/chat/completions")
    async def chat_completions(request: Request):
        user = user_of(request)
        if user is None:
            return _error(401, "sign in first, or send 'Authorization: Bearer <token>'", "authentication_error")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the body must be JSON")
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return _error(400, "model is required: GET /v1/models lists yours")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in
                ("system", "user", "assistant") for m in messages):
            return _error(400, "messages must be a non-empty list of {role: system|user|assistant, content: text}")
        try:
            params = {"temperature": _number(body, "temperature", 0.7, 0, 2), "top_p": _number(body, "top_p", 0.9, 0, 1),
                      "max_tokens": int(_number(body, "max_tokens", 512, 1, 8192))}
        except ValueError as err:
            return _error(400, str(err))
        try:
            # a chat in progress goes on at once; what may block (the rows, a server start, an adapter
            # load) runs in one worker thread. The answer streams on the event loop either way.
            stream = chat.open_stream_now(user, model, messages, **params) \
                or await run_in_threadpool(chat.open_stream, user, model, messages, **params)
            await anext(stream)  # "" once the server took the request: a failure before it is this request's
        except NotFound:
            return _error(404, f"model '{model}' is not one of yours: GET /v1/models lists them", "not_found_error")
        except StopAsyncIteration:
            return _error(503, "the model server ended the answer before it began", "server_error")
        except (PortalError, InferenceError) as err:
            return _error(503, str(err), "server_error")
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())

        if not body.get("stream"):
            try:
                text = "".join([piece async for piece in stream])
            except InferenceError as err:
                return _error(503, str(err), "server_error")
            return {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "stop"}]}

        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            return "data: " + json.dumps({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                          "model": model, "choices": [{"index": 0, "delta": delta,
                                                                       "finish_reason": finish}]}) + "\n\n"

        async def events():
            # the role at once: the client reads it while the model works on its first token
            yield chunk({"role": "assistant", "content": ""})
            try:
                async for delta in stream:
                    if delta:
                        yield chunk({"content": delta})
            except InferenceError as err:  # mid-answer: the client gets the reason, not a silent end
                yield "data: " + json.dumps({"error": {"message": str(err), "type": "server_error"}}) + "\n\n"
                return
            finally:
                # a client gone mid-answer: the server's stream is closed now, and the model is
                # free (not busy) again, instead of whenever the generator is collected
                await stream.aclose()
            yield chunk({}, "stop")
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return router

