"""Errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, and the middleware
that turns every failure of a handler into one.

Handlers raise ``APIError`` for anything the client did wrong (or must retry); aiohttp's own HTTP
exceptions (404 unknown route, 405 wrong method, 413 body too large) are reshaped here too, so a
client only ever sees one error format. Every refusal is logged with its cause (``log_refusal``:
INFO for the client's mistakes, WARNING for 5xx). Anything else is a bug: it is logged with its
traceback and answered with a 500 in the same shape, and the server keeps serving.

Requests too malformed to reach a handler (a garbage request line, a header over aiohttp's limit,
a bad Content-Length) get aiohttp's plain-text 400; aiohttp logs each as an ERROR with a
traceback, which ``quiet_protocol_errors`` turns into one INFO line: the client's mistake too.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# OpenAI's error types: "invalid_request_error" for what the client can fix, "server_error" else.
_CODES = {400: "invalid_request", 401: "invalid_api_key", 404: "not_found",
          405: "method_not_allowed", 413: "request_too_large", 500: "internal_error",
          503: "service_unavailable"}


class _ProtocolErrorsAsInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        detail = " ".join(str(exc.message).split())  # (aiohttp's points at the bad byte)
        record.msg = f"{record.getMessage()}: malformed HTTP ({exc.code}): {detail}"
        record.args, record.exc_info, record.exc_text = (), None, None
        record.levelno = min(record.levelno, logging.INFO)  # (a bad method is DEBUG already)
        record.levelname = logging.getLevelName(record.levelno)
        return logging.getLogger(record.name).isEnabledFor(record.levelno)


def quiet_protocol_errors() -> None:
    """aiohttp's server logger: malformed requests become one INFO line each (idempotent)."""
    server_logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _ProtocolErrorsAsInfo) for f in server_logger.filters):
        server_logger.addFilter(_ProtocolErrorsAsInfo())


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code or _CODES.get(status)
        self.headers = headers or {}

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": self.code}}

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def log_refusal(request: web.Request, err: APIError, in_band: bool = False) -> None:
    """Why a request was refused, or failed once its stream had started (``in_band``)."""
    where = " in the stream" if in_band else ""
    logger.log(logging.WARNING if err.status >= 500 else logging.INFO, "%s %s: %d%s: %s",
               request.method, request.rel_url.raw_path, err.status, where, err.message)


def _from_http_exception(request: web.Request, exc: web.HTTPException) -> APIError:
    if exc.status == 404:
        message = f"no route {request.method} {request.path}"
    elif exc.status == 405:
        message = (f"method {request.method} is not allowed on {request.path}; "
                   f"allowed: {exc.headers.get('Allow', '')}")
    elif exc.status == 413:
        message = f"request body is too large: {exc.text}"
    else:
        message = exc.text or exc.reason
    headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
    return APIError(exc.status, message, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except APIError as e:
        err = e
    except web.HTTPException as e:
        if e.status < 400:  # redirects and the like are not errors
            raise
        err = _from_http_exception(request, e)
    except Exception:
        logger.exception("unhandled error in %s %s", request.method, request.path)
        return APIError(500, "internal server error (logged on the server)").response()
    log_refusal(request, err)
    return err.response()
