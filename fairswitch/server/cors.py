"""Cross-origin requests (CORS), so that a web page can call the API from a browser.

As vLLM's server (Starlette's CORSMiddleware with ``--allowed-origins '["*"]'`` and the like):
by default any origin, method and header, without credentials. A preflight (``OPTIONS`` with
``Access-Control-Request-Method``) is answered here, before the API key is asked for (browsers
send no credentials with one); every other response to an allowed origin, streams included,
gets ``Access-Control-Allow-Origin`` as it is prepared.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # (aiohttp is imported where used: settings.py, which the CLI reads, is light)
    from aiohttp import web

    from fairswitch.server.errors import Handler

_ALL_METHODS = "DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT"
# Headers a browser may always send (the CORS safelist): never refused in a preflight.
_SAFE_HEADERS = frozenset({"accept", "accept-language", "content-language", "content-type"})
MAX_AGE_S = 600


@dataclass(frozen=True)
class CorsPolicy:
    origins: tuple[str, ...] = ("*",)
    methods: tuple[str, ...] = ("*",)
    headers: tuple[str, ...] = ("*",)
    credentials: bool = False

    def __post_init__(self) -> None:
        for name in ("origins", "methods", "headers"):
            values = getattr(self, name)
            if not all(isinstance(v, str) and v for v in values):
                raise ValueError(f"allowed {name} must be non-empty strings, got {values!r}")

    def allows_origin(self, origin: str) -> bool:
        return "*" in self.origins or origin in self.origins

    def origin_headers(self, origin: str) -> dict[str, str]:
        """The response headers for a request from an allowed ``origin``."""
        if "*" in self.origins and not self.credentials:
            return {"Access-Control-Allow-Origin": "*"}
        # A credentialed response must name its origin (browsers refuse "*" then).
        headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        if self.credentials:
            headers["Access-Control-Allow-Credentials"] = "true"
        return headers

    def preflight(self, request: web.Request, origin: str) -> web.Response:
        from aiohttp import web

        method = request.headers["Access-Control-Request-Method"].upper()
        asked = [h.strip() for h in request.headers.get("Access-Control-Request-Headers",
                                                         "").split(",") if h.strip()]
        if "*" not in self.methods and method not in {m.upper() for m in self.methods}:
            return web.Response(status=400, text=f"CORS: method {method} is not allowed")
        allowed = {h.lower() for h in self.headers} | _SAFE_HEADERS
        if "*" not in self.headers and (refused := [h for h in asked
                                                    if h.lower() not in allowed]):
            return web.Response(status=400,
                                text=f"CORS: headers {', '.join(refused)} are not allowed")
        headers = {**self.origin_headers(origin), "Access-Control-Max-Age": str(MAX_AGE_S),
                   "Access-Control-Allow-Methods": (_ALL_METHODS if "*" in self.methods
                                                    else ", ".join(self.methods))}
        if asked:
            headers["Access-Control-Allow-Headers"] = ", ".join(asked)
        return web.Response(status=200, headers=headers)


def preflight_middleware(policy: CorsPolicy) -> Any:
    """Answers preflights; to run first (outside the API key's middleware)."""
    from aiohttp import web

    @web.middleware
    async def preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if (request.method == "OPTIONS" and origin is not None
                and "Access-Control-Request-Method" in request.headers
                and policy.allows_origin(origin)):
            return policy.preflight(request, origin)
        return await handler(request)

    return preflight


def origin_hook(policy: CorsPolicy) -> Callable[[web.Request, web.StreamResponse],
                                                 Awaitable[None]]:
    """For ``app.on_response_prepare``: the origin headers on every response to an allowed
    origin, as it is prepared (a stream's before its first chunk)."""

    async def add_origin(request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if origin is not None and policy.allows_origin(origin):
            for name, value in policy.origin_headers(origin).items():
                response.headers.setdefault(name, value)

    return add_origin
