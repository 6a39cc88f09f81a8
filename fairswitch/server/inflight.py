"""The requests in flight: one access line each, and the bookkeeping of a graceful shutdown.

The outermost middleware sees every request from its arrival to its last byte. It counts the
requests in flight, refuses new ones (503) once the server drains, and writes one access line per
request when it ends (INFO on ``fairswitch.server.access``; ``log_requests=False`` turns them
off)::

    POST /v1/completions 200 client='team-a' priority=-1 prompt_tokens=31 output_tokens=64
        ttft=0.042s duration=1.310s

A generation handler fills in its request's ``AccessRecord``: who sent it, its engine requests (one
per choice: what a shutdown aborts) and its ``RequestTracker`` (tokens, TTFT). A client that went
away is logged with status 499, nginx's "client closed request".

Shutdown (``drain``): refuse new requests, give those in flight ``timeout`` seconds in total, then
abort the engine requests still running: their handlers end them the usual way (a stream's
in-band error and ``[DONE]``, a 503 otherwise) within ``ABORT_GRACE_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from fairswitch.server.errors import APIError, Handler, log_refusal
from fairswitch.server.metrics import RequestTracker

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("fairswitch.server.access")

ABORT_GRACE_S = 2.0  # for aborted handlers to send their last bytes
CLIENT_CLOSED = 499


LOGGED_CLIENT_CHARS = 64


@dataclass(slots=True)
class AccessRecord:
    """What a generation handler adds to its request's access line."""

    request_ids: list[str] = field(default_factory=list)  # its choices', while they may run
    client_id: str | None = None
    priority: int | None = None
    num_prompt_tokens: int | None = None
    tracker: RequestTracker | None = None
    error: str | None = None  # reported in-band: the stream had started
    client_closed: bool = False  # a stream whose client went away: logged as 499

    def fields(self) -> str:
        if self.num_prompt_tokens is None:
            return ""
        client = self.client_id
        if client is not None and len(client) > LOGGED_CLIENT_CHARS:  # (a header may be 8 KB)
            client = f"{client[:LOGGED_CLIENT_CHARS]}...({len(client)} chars)"
        text = (f" client={client!r} priority={self.priority} "
                f"prompt_tokens={self.num_prompt_tokens}")
        if self.tracker is not None:
            text += f" output_tokens={self.tracker.num_output_tokens}"
            if self.tracker.ttft_s is not None:
                text += f" ttft={self.tracker.ttft_s:.3f}s"
        return text


class InFlight:
    def __init__(self, log_requests: bool = True) -> None:
        self.log_requests = log_requests
        self.draining = False  # new requests are refused
        self.aborting = False  # requests that have not reached the engine never will
        self._records: dict[int, AccessRecord] = {}  # by id(request)
        self._idle = asyncio.Event()
        self._idle.set()

    def record(self, request: web.Request) -> AccessRecord:
        return self._records[id(request)]

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        start = time.monotonic()
        record = self._records[id(request)] = AccessRecord()
        status = CLIENT_CLOSED  # unless the handler returns
        self._idle.clear()
        try:
            if self.draining:
                err = APIError(503, "the server is shutting down")
                log_refusal(request, err)
                response = err.response()
            else:
                response = await handler(request)
            status = CLIENT_CLOSED if record.client_closed else response.status
            return response
        finally:
            del self._records[id(request)]
            if not self._records:
                self._idle.set()
            if self.log_requests and access_logger.isEnabledFor(logging.INFO):
                self._log(request, status, record, time.monotonic() - start)

    @staticmethod
    def _log(request: web.Request, status: int, record: AccessRecord, duration_s: float) -> None:
        error = f" error={record.error!r}" if record.error else ""
        access_logger.info("%s %s %d%s duration=%.3fs%s", request.method,
                           request.rel_url.raw_path, status, record.fields(), duration_s, error)

    async def drain(self, timeout: float, abort: Callable[[str], Awaitable[None]]) -> None:
        """Refuse new requests, wait up to ``timeout`` seconds for those in flight, then
        ``abort(request_id)`` every engine request still running (every choice of each)."""
        self.draining = True
        if await self._wait_idle(timeout):
            return
        self.aborting = True
        ids = [rid for r in self._records.values() for rid in r.request_ids]
        logger.warning("shutdown: %d requests still in flight after %.3g s: aborting %d engine "
                       "requests", len(self._records), timeout, len(ids))
        try:  # at once: the engine runs them between two steps
            await asyncio.wait_for(asyncio.gather(*map(abort, ids)), ABORT_GRACE_S)
        except asyncio.TimeoutError:
            logger.error("shutdown: the engine did not take the aborts within %.3g s (a step "
                         "is stuck): stopping anyway", ABORT_GRACE_S)
            return
        if not await self._wait_idle(ABORT_GRACE_S):
            logger.warning("shutdown: %d requests did not end once aborted: their connections "
                           "are closed", len(self._records))

    async def _wait_idle(self, timeout: float) -> bool:
        if self._records:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout)
        return not self._records
