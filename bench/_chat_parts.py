"""Where the portal's share of a chat's first token goes: bench_chat_ttft.py --parts.

Timestamps (``time.perf_counter_ns``, CLOCK_MONOTONIC: one clock for every process of the
machine) are taken at these points:

* in the clients' process: the call, the response's headers (HTTP 200: ``create()`` returns) and
  the first content chunk;
* in the portal's ASGI stack, outermost: the request's arrival and the write of the first body that
  carries content;
* around the gateway's routing (``ChatService.open_stream_now``, else ``open_stream`` in a worker
  thread): its start and end;
* around ``portal.inference.astream_chat`` (the gateway's stream to the run's server): its call, the
  server's HTTP 200 (the "" it yields first) and the first piece of text.

The same ASGI marks wrap an *ideal proxy*: a bare Starlette app in the same kind of uvicorn
thread that passes the server's bytes through with ``httpx.AsyncClient`` and does nothing else.
It is what one more HTTP hop costs, with no login, no rows and no re-encoding.
"""

from __future__ import annotations

import re
import time
from typing import Any

CONTENT = re.compile(rb'"content": ?"[^"]')  # a chunk with text (the role chunk has "content": "")


class Marks:
    """The marks of one side's requests, in arrival order (the clients send one at a time)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, int]] = []

    def mark(self, name: str) -> None:
        if self.rows and name not in self.rows[-1]:
            self.rows[-1][name] = time.perf_counter_ns()

    def wrap(self, app):  # noqa: ANN001, ANN201 (an ASGI app)
        async def asgi(scope, receive, send):
            if scope["type"] != "http" or not scope["path"].endswith("/chat/completions"):
                await app(scope, receive, send)
                return
            self.rows.append({"arrived": time.perf_counter_ns()})

            async def send_marked(message):
                if message["type"] == "http.response.body" and CONTENT.search(message.get("body", b"")):
                    self.mark("first_write")
                await send(message)

            await app(scope, receive, send_marked)

        return asgi


def mark_upstream(marks: Marks) -> None:
    """Mark the gateway's routing (``ChatService.open_stream_now``, else ``open_stream``: start
    and end) and its calls of ``astream_chat``: call, HTTP 200 (the first ""), first text."""
    from portal import inference
    from portal.chat import ChatService

    real_now, real_open = ChatService.open_stream_now, ChatService.open_stream

    def open_now(self, *args: Any, **kwargs: Any):
        marks.mark("routing")
        stream = real_now(self, *args, **kwargs)
        if stream is not None:
            marks.mark("routed")
        return stream

    def open_in_thread(self, *args: Any, **kwargs: Any):
        stream = real_open(self, *args, **kwargs)
        marks.mark("routed")
        return stream

    ChatService.open_stream_now, ChatService.open_stream = open_now, open_in_thread
    real = inference.astream_chat

    async def marked(*args: Any, **kwargs: Any):
        marks.mark("upstream_call")
        async for piece in real(*args, **kwargs):
            marks.mark("first_piece" if piece else "accepted")
            yield piece

    inference.astream_chat = marked


def ideal_proxy(server_url: str):  # noqa: ANN201 (a Starlette app)
    """POST /v1/chat/completions passed to ``server_url`` byte for byte, streamed back."""
    import httpx
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    client = httpx.AsyncClient()

    async def completions(request):
        upstream = await client.send(client.build_request(
            "POST", server_url + "/chat/completions", content=await request.body(),
            headers={"content-type": "application/json", "authorization": request.headers.get("authorization", "")}),
            stream=True)

        async def body():
            try:
                async for data in upstream.aiter_raw():
                    yield data
            finally:
                await upstream.aclose()

        return StreamingResponse(body(), status_code=upstream.status_code, media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])


def _ms(ns: float) -> float:
    return ns / 1e6


def client_parts(rows: list[dict[str, Any]]) -> dict[str, list[float]]:
    """The client's own marks alone (the direct side has no other): call -> HTTP 200 -> first text."""
    names = {"client_call": "t0_ns", "client_accepted": "accepted_ns", "client_first": "first_ns"}
    return {label: [_ms(row[names[end]] - row[names[start]]) for row in rows] for label, start, end in CLIENT_STEPS}


def parts(rows: list[dict[str, Any]], marks: Marks, steps: list[tuple[str, str, str]]) -> dict[str, list[float]]:
    """Per step (label, from mark, to mark): the milliseconds of each request. The client's marks
    are ``client_call`` and ``client_first``; the side's ASGI marks follow them request by request."""
    out: dict[str, list[float]] = {label: [] for label, _, _ in steps}
    for row, side in zip(rows, marks.rows[-len(rows):], strict=True):  # the last ones: after the warm-up
        points = {"client_call": row["t0_ns"], "client_accepted": row["accepted_ns"], "client_first": row["first_ns"],
                  **side}
        for label, start, end in steps:
            if start in points and end in points:
                out[label].append(_ms(points[end] - points[start]))
    return out


CLIENT_STEPS = [
    ("client call -> the client has the HTTP 200", "client_call", "client_accepted"),
    ("the client has the HTTP 200 -> the client has the first text", "client_accepted", "client_first"),
]
PORTAL_STEPS = CLIENT_STEPS + [
    ("client call -> arrival in the portal", "client_call", "arrived"),
    ("arrival -> call of the run's server (login, body, row, route, thread hop)", "arrived", "upstream_call"),
    ("  arrival -> routing starts (middleware, login, body checks)", "arrived", "routing"),
    ("  routing (the run's row, the adapter, the server; a thread hop if needed)", "routing", "routed"),
    ("  routed -> the call (the stream starts)", "routed", "upstream_call"),
    ("call -> the server's HTTP 200", "upstream_call", "accepted"),
    ("HTTP 200 -> the server's first piece", "accepted", "first_piece"),
    ("first piece -> the portal's write of it", "first_piece", "first_write"),
    ("write -> the client has it", "first_write", "client_first"),
    ("arrival -> first write (all the portal's time)", "arrived", "first_write"),
]
IDEAL_STEPS = CLIENT_STEPS + [
    ("client call -> arrival in the proxy", "client_call", "arrived"),
    ("arrival -> first write (all the proxy's time)", "arrived", "first_write"),
    ("write -> the client has it", "first_write", "client_first"),
]
