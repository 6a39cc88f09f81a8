"""A request's own chat template (``--trust-request-chat-template``) rendered in a child
process: one that runs past ``seconds`` is killed there (a 400 for its request), whatever it
does, loops, a huge power or a string too big for memory (the child's address space is
capped, and it dies with the server); the server's own process never runs the client's
template. Each render holds the prompt worker that asked for it while it runs. A few children
are kept alive between renders (the first render starts one: a fraction of a second).

The child renders in the Jinja environment transformers uses (model/tokenizer.py ``_compile``)
with the variables the server passes (messages, the tokenizer's special tokens, tools,
documents, the request's template kwargs); the parent cuts a ``continue_final_message`` reply.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import threading
from typing import Any

CHILD_MEMORY_BYTES = 2 << 30  # a child's address space: a template that wants more fails
MAX_CHARS = 16 << 20  # a rendered prompt longer than this is an error in the child (not sent)
_START_S = 60.0


class TemplateTimeout(Exception):
    pass


class RenderError(Exception):
    """The template failed in the child: ``type_name``, and whether Jinja raised it (the
    template rejected its input) or another exception did."""

    def __init__(self, type_name: str, message: str, jinja: bool) -> None:
        super().__init__(message)
        self.type_name, self.jinja = type_name, jinja


class TemplateSandbox:
    def __init__(self, seconds: float, max_children: int = 4) -> None:
        self.seconds = seconds
        self._context = multiprocessing.get_context("spawn")
        self._idle: list[_Child] = []
        self._lock = threading.Lock()
        self._slots = threading.Semaphore(max_children)
        self._closed = False

    def render(self, source: str, variables: dict[str, Any]) -> str:
        """The template's text; TemplateTimeout if it ran past ``seconds`` (its child is
        killed), RenderError if it failed."""
        with self._slots:
            for attempt in (1, 2):
                child = self._take()
                try:
                    text = child.render(source, variables, self.seconds)
                except RenderError:  # (the template's error: the child is fine)
                    self._give(child)
                    raise
                except (OSError, EOFError):  # (it died while idle: once more, a new one)
                    child.kill()
                    if attempt == 2:
                        raise
                    continue
                except BaseException:
                    child.kill()  # (a timeout: never reused)
                    raise
                self._give(child)
                return text
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for child in idle:
            child.kill()

    def _take(self) -> _Child:
        with self._lock:
            while self._idle:
                child = self._idle.pop()
                if child.process.is_alive():
                    return child
                child.kill()
        return _Child(self._context)

    def _give(self, child: _Child) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(child)
                return
        child.kill()


class _Child:
    def __init__(self, context: Any) -> None:
        self.conn, theirs = context.Pipe()
        self.process = context.Process(target=_serve, args=(theirs,), daemon=True,
                                       name="fairswitch-template")
        self.process.start()
        theirs.close()
        # (its start-up, imports included, is not the template's time)
        try:
            ready = self.conn.poll(_START_S) and self.conn.recv() == "ready"
        except (OSError, EOFError):
            ready = False
        if not ready:
            self.kill()
            raise RuntimeError("the chat template sandbox process did not start")

    def render(self, source: str, variables: dict[str, Any], seconds: float) -> str:
        self.conn.send((source, variables))
        if not self.conn.poll(seconds):
            raise TemplateTimeout(f"it ran longer than {seconds:g} s")
        try:
            ok, value = self.conn.recv()
        except EOFError:  # (it died: out of memory, killed)
            raise RenderError("MemoryError", "the template's process died (out of memory?)",
                              False) from None
        if ok:
            return value
        raise RenderError(*value)

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self.process.kill()
            self.process.join(5)
        self.conn.close()


def _serve(conn: Any) -> None:
    """The child: render what comes, send back (True, text) or (False, error) until the pipe
    closes."""
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY_BYTES, CHILD_MEMORY_BYTES))
    with contextlib.suppress(Exception):  # Linux: killed with the server, however it ends
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    import jinja2

    from fairswitch.model.tokenizer import _compile

    conn.send("ready")
    while True:
        try:
            source, variables = conn.recv()
        except (EOFError, OSError):
            return
        try:
            text = _compile(source).render(**variables)
            result: Any = (True, text) if len(text) <= MAX_CHARS else (False, (
                "ValueError", f"the rendered prompt has {len(text)} characters, more than "
                f"{MAX_CHARS}", False))
        except BaseException as e:  # noqa: BLE001 - each is the template's, told to the parent
            result = (False, (type(e).__name__, str(e)[:2000],
                              isinstance(e, jinja2.TemplateError)))
        try:
            conn.send(result)
        except (OSError, ValueError):
            return
