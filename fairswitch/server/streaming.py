"""Server-Sent Events as OpenAI streams them: ``data: {json}\\n\\n`` per chunk,
``data: [DONE]\\n\\n`` last (the Responses API: named events, no [DONE]). A write to a client
that went away raises ``ConnectionResetError`` (aiohttp's ``ClientConnectionResetError`` is one);
callers treat it as the end of the stream.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

DONE = b"data: [DONE]\n\n"


def dumps(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def event(data: Any) -> bytes:
    return b"data: " + dumps(data).encode() + b"\n\n"


async def open_stream(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={
        "Content-Type": "text/event-stream; charset=utf-8",
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",  # proxies (nginx) must not buffer the stream
    })
    await resp.prepare(request)
    return resp


async def send(resp: web.StreamResponse, data: Any) -> None:
    await resp.write(event(data))


async def send_event(resp: web.StreamResponse, data: dict[str, Any]) -> None:
    """A named event (the Responses API's): ``event: {type}`` before its data."""
    await resp.write(f"event: {data['type']}\n".encode() + event(data))


async def send_done(resp: web.StreamResponse) -> None:
    await resp.write(DONE)
    await resp.write_eof()
