"""The OpenAI-compatible HTTP service (aiohttp, Server-Sent Events) over an ``AsyncEngine``.

Modules: ``app`` (routes and wiring), ``protocol`` (request validation, response bodies),
``prompts`` (bodies to token ids off the event loop), ``chat`` (chat template), ``streaming``
(SSE), ``errors`` (OpenAI error shape), ``inflight`` (access log, graceful drain), ``metrics``
(Prometheus), ``serving`` (run in the foreground with signal handling, or in a thread),
``settings``.
"""

from __future__ import annotations

from fairswitch.server.settings import ServerSettings

_LAZY = {"build_app": "fairswitch.server.app", "BackgroundServer": "fairswitch.server.serving",
         "serve_forever": "fairswitch.server.serving"}


def __getattr__(name: str):
    # app pulls in the engine (torch): load it on first use so `fairswitch --help` stays fast.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fairswitch.server' has no attribute {name!r}")


__all__ = ["ServerSettings", "build_app", "BackgroundServer", "serve_forever"]
