"""Replay client for an OpenAI-compatible server: streamed ``/v1/chat/completions`` (default) or
``/v1/completions``, timed per token from the Server-Sent Events.

Token counting. A stream chunk normally carries one token; a chunk that carries text, or the
finish reason, counts as one token at its arrival time. The server holds back a token whose text
is not yet a whole character and sends it with the next chunk, so some chunks carry several
tokens. The final usage chunk (``stream_options.include_usage``) is the authority on the count:
tokens it reports beyond the chunks counted are entered at the time of the last chunk (where a
held-back tail surfaces), so ``token_times_s`` has exactly ``completion_tokens`` entries.

With ``endpoint="completions"`` the chat template is still the server's: the messages go to
``/tokenize`` first and the completion is asked for those token ids (the tokenize round trip is
not part of the request's latency).
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from fairswitch.bench.records import RequestRecord
from fairswitch.bench.replay import Clock
from fairswitch.bench.trace import Conversation

ENDPOINTS = ("chat", "completions")
DEFAULT_TIMEOUT_S = 6 * 3600.0  # one benchmark request may wait behind a long queue


class HTTPRequestError(RuntimeError):
    """The server refused a request or reported an error in the stream."""


def _error_message(status: int, body: str) -> str:
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body[:500]
    return f"HTTP {status}: {message}"


async def sse_events(resp: aiohttp.ClientResponse):
    """The JSON payloads of an SSE stream, up to ``data: [DONE]``."""
    data: list[str] = []
    async for raw in resp.content:
        line = raw.decode("utf-8").rstrip("\r\n")
        if line.startswith("data:"):
            data.append(line[5:].lstrip(" "))
            continue
        if line or not data:  # comments, other fields, keep-alive blank lines
            continue
        payload, data = "\n".join(data), []
        if payload == "[DONE]":
            return
        yield json.loads(payload)
    if data == ["[DONE]"]:  # a last event without its blank line
        return
    # The server ends every stream with [DONE]; without it the answer may be cut short.
    raise HTTPRequestError("the stream ended before 'data: [DONE]'")


class HTTPClient:
    """Use as ``async with HTTPClient(url) as client:``; one connection pool for the replay."""

    def __init__(self, base_url: str, *, api_key: str | None = None, model: str | None = None,
                 endpoint: str = "chat", temperature: float = 0.0,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {ENDPOINTS}, got {endpoint!r}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.endpoint = endpoint
        self.temperature = temperature
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> HTTPClient:
        # limit=0: aiohttp's default pool of 100 connections would cap the replay's concurrency.
        self._session = aiohttp.ClientSession(
            headers=self._headers, timeout=self._timeout,
            connector=aiohttp.TCPConnector(limit=0))
        if self.model is None:
            try:
                models = await self._get_json("/v1/models")
            except (aiohttp.ClientError, HTTPRequestError) as e:
                await self._session.close()
                raise ConnectionError(f"cannot use the server at {self.base_url}: {e}") from e
            self.model = models["data"][0]["id"]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("use HTTPClient as 'async with HTTPClient(...) as client'")
        return self._session

    async def _get_json(self, path: str) -> Any:
        async with self.session.get(self.base_url + path) as r:
            if r.status != 200:
                raise HTTPRequestError(_error_message(r.status, await r.text()))
            return await r.json()

    async def _post_json(self, path: str, body: dict[str, Any]) -> Any:
        async with self.session.post(self.base_url + path, json=body) as r:
            if r.status != 200:
                raise HTTPRequestError(_error_message(r.status, await r.text()))
            return await r.json()

    async def metrics_text(self) -> str:
        """The server's Prometheus exposition (``/metrics``)."""
        async with self.session.get(self.base_url + "/metrics") as r:
            if r.status != 200:
                raise HTTPRequestError(_error_message(r.status, await r.text()))
            return await r.text()

    async def _request_body(self, conv: Conversation, turn: int) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {
            "model": self.model, "max_tokens": conv.turns[turn].output_tokens,
            "ignore_eos": True, "temperature": self.temperature, "priority": conv.priority,
            "stream": True, "stream_options": {"include_usage": True}}
        if self.endpoint == "chat":
            return "/v1/chat/completions", {**body, "messages": conv.messages(turn)}
        tokens = await self._post_json("/tokenize", {"model": self.model,
                                                     "messages": conv.messages(turn)})
        return "/v1/completions", {**body, "prompt": tokens["tokens"]}

    async def send(self, conv: Conversation, turn: int, record: RequestRecord,
                   clock: Clock) -> None:
        path, body = await self._request_body(conv, turn)
        if self.endpoint != "chat":
            record.arrival_s = clock()
        usage: dict[str, Any] | None = None
        async with self.session.post(self.base_url + path, json=body,
                                     headers={"X-Client-Id": conv.client}) as r:
            if r.status != 200:
                raise HTTPRequestError(_error_message(r.status, await r.text()))
            async for event in sse_events(r):
                now = clock()
                if "error" in event:
                    raise HTTPRequestError(f"in the stream: {event['error'].get('message')}")
                if event.get("usage"):
                    usage = event["usage"]
                if _carries_token(event):
                    record.token_times_s.append(now)
        record.end_s = clock()
        if usage is not None:
            _apply_usage(record, usage)


def _carries_token(event: dict[str, Any]) -> bool:
    """The server sends one chunk per token, with empty text where the text is held back (a
    possible stop string, an incomplete character): every choice chunk but chat's opening one
    (the role) carries a token; so does a last chunk that only says why it finished."""
    choices = event.get("choices") or []
    if not choices:
        return False  # the usage chunk
    choice = choices[0]
    if "delta" in choice:
        delta = choice["delta"]
        carries = "content" in delta and "role" not in delta
    else:
        carries = "text" in choice
    return carries or choice.get("finish_reason") is not None


def _apply_usage(record: RequestRecord, usage: dict[str, Any]) -> None:
    record.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    details = usage.get("prompt_tokens_details") or {}
    record.cached_tokens = int(details.get("cached_tokens") or 0)
    times = record.token_times_s
    n = int(usage.get("completion_tokens") or 0)
    if times and n > len(times):
        times.extend([times[-1]] * (n - len(times)))
    elif n < len(times):
        del times[n:]
