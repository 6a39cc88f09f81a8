"""Running the application: in the foreground until SIGTERM/SIGINT (``fairswitch serve``), or in a
background thread (tests, benchmark harnesses that want a real HTTP server in-process).

``fairswitch serve`` also stops, with exit status 1, when the engine fails (e.g. a
tensor-parallel rank died): requests in flight have their error by then, and a supervisor restarts
the process rather than leaving a server that can only answer 503.

Shutdown (``stop_site``): stop listening and close idle connections at once, give the requests in
flight ``shutdown_timeout`` seconds in total, abort the rest, then run the app's cleanup (the
engine stops). An app that can end its requests itself registers a drain under ``DRAIN_KEY``
(build_app: each stream ends with an in-band error and ``[DONE]``, the others with a 503) and
aiohttp's own wait only backs it up, for handlers stuck writing to a client that does not read.
Without one, aiohttp waits ``shutdown_timeout`` twice and cancels the handlers still running.

Handlers are cancelled when their client disconnects (``handler_cancellation``): a non-streaming
request whose client gave up is aborted at once instead of running to completion.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
import threading
from collections.abc import Awaitable, Callable

from aiohttp import web

logger = logging.getLogger(__name__)

Drain = Callable[[float], Awaitable[None]]  # (seconds the requests in flight may still run)
DRAIN_KEY = web.AppKey[Drain]("drain")
BACKSTOP_S = 1.0  # aiohttp's wait for handlers that did not end when a drain aborted them


async def start_site(app: web.Application, host: str, port: int, shutdown_timeout: float, *,
                     ssl_context: ssl.SSLContext | None = None, uds: str | None = None
                     ) -> tuple[web.AppRunner, str]:
    """Listen on host:port (0: any free port), over TLS with ``ssl_context``, or on the Unix
    socket ``uds`` instead; returns the runner and the base URL (``unix:PATH`` for a socket)."""
    wait_s = BACKSTOP_S if DRAIN_KEY in app else shutdown_timeout
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=wait_s,
                           access_log=None)
    await runner.setup()
    site = (web.UnixSite(runner, uds, ssl_context=ssl_context) if uds is not None
            else web.TCPSite(runner, host, port, ssl_context=ssl_context))
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    if uds is not None:
        return runner, f"unix:{uds}"
    bound_host, bound_port = runner.addresses[0][:2]
    if ":" in bound_host:
        bound_host = f"[{bound_host}]"
    scheme = "https" if ssl_context is not None else "http"
    return runner, f"{scheme}://{bound_host}:{bound_port}"


def server_ssl_context(certfile: str, keyfile: str | None = None, ca_certs: str | None = None,
                       cert_reqs: int = 0) -> ssl.SSLContext:
    """TLS for the server, as vLLM's --ssl-certfile, --ssl-keyfile, --ssl-ca-certs and
    --ssl-cert-reqs (0: no client certificate asked for, 1: checked if one is shown, 2: one
    signed by the CA certificates required). ValueError naming the file that cannot be read or
    used, or a client check without CA certificates."""
    if cert_reqs not in (0, 1, 2):
        raise ValueError(f"--ssl-cert-reqs must be 0, 1 or 2, got {cert_reqs}")
    if cert_reqs and ca_certs is None:
        raise ValueError("--ssl-cert-reqs 1 or 2 needs --ssl-ca-certs (the CAs that sign the "
                         "clients' certificates)")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"--ssl-certfile {certfile!r}"
                         + (f" / --ssl-keyfile {keyfile!r}" if keyfile else "")
                         + f": cannot load the certificate and key: {e}") from e
    if ca_certs is not None:
        try:
            context.load_verify_locations(ca_certs)
        except (OSError, ssl.SSLError) as e:
            raise ValueError(f"--ssl-ca-certs {ca_certs!r}: cannot load it: {e}") from e
    context.verify_mode = ssl.VerifyMode(cert_reqs)
    return context


async def stop_site(runner: web.AppRunner, shutdown_timeout: float) -> None:
    """Stop listening and close idle connections, drain the requests in flight (``DRAIN_KEY``),
    then clean up: aiohttp's wait, the app's cleanup."""
    for site in list(runner.sites):
        await site.stop()
    if runner.server is not None:
        runner.server.pre_shutdown()
    drain = runner.app.get(DRAIN_KEY)
    if drain is not None:
        await drain(shutdown_timeout)
    await runner.cleanup()


async def serve_forever(app: web.Application, host: str, port: int, *,
                        shutdown_timeout: float = 5.0,
                        on_started: Callable[[str], None] | None = None,
                        engine_alive: Callable[[], bool] | None = None,
                        ssl_context: ssl.SSLContext | None = None,
                        uds: str | None = None) -> bool:
    """Serve until SIGTERM or SIGINT, or until ``engine_alive()`` turns false (checked every
    0.5 s: the engine failed, its streams have their error), then shut down gracefully.
    Returns False if the engine failed. ``ssl_context``, ``uds``: start_site's."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner, url = await start_site(app, host, port, shutdown_timeout, ssl_context=ssl_context,
                                   uds=uds)
    try:
        if on_started is not None:
            on_started(url)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
            if engine_alive is not None and not engine_alive():
                logger.error("the engine has failed: stopping the server")
                return False
        return True
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await stop_site(runner, shutdown_timeout)


class BackgroundServer:
    """The app served from a thread with its own event loop; ``url`` once started."""

    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0, *,
                 shutdown_timeout: float = 1.0) -> None:
        self.app = app
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(host, port, shutdown_timeout),
                                        name="fairswitch-http", daemon=True)

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError("the HTTP server did not start")
        if self._error is not None:
            raise self._error
        return self

    def _run(self, host: str, port: int, shutdown_timeout: float) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._runner, self.url = self._loop.run_until_complete(
                start_site(self.app, host, port, shutdown_timeout))
        except BaseException as e:  # noqa: BLE001 - handed to start()
            self._error = e
            self._started.set()
            return
        self._started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(stop_site(self._runner, shutdown_timeout))
        self._loop.close()

    def stop(self, timeout: float = 60.0) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
