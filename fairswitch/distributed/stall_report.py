"""Where a tensor-parallel rank is stuck, said before the distributed timeout ends the engine.

A rank waiting on another one (a collective, a device sync behind one) waits inside a C call,
where Python cannot interrupt it and the timeout, when it comes, names no line of Python. So
each step of a rank runs under ``report_stall``: if the step has not returned after
``after_s``, a watchdog thread writes the stack of every thread of that process to stderr, while
the step goes on waiting (it may still complete: nothing is stopped). The waits release the GIL
(torch's collectives and device syncs do), so the watchdog runs beside them.

The watchdog is this module's own thread, not faulthandler's: faulthandler keeps one timer per
process, which each step would re-arm and cancel, taking it from the application (pytest's
``faulthandler_timeout``, a server's own watchdog).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import sys
import threading
import time
import traceback
from collections.abc import Iterator


class _Watchdog:
    """One daemon thread per process, waiting for the earliest armed deadline. Arming wakes it
    only for a deadline earlier than the one it waits for, and disarming never does (it finds the
    entry gone when it wakes), so a step costs it no wake-up of its own."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)  # the thread is not forked with us

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._armed: dict[int, tuple[float, float]] = {}  # token -> (deadline, after_s)
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None
        self._waits_until = math.inf

    def arm(self, after_s: float) -> int:
        with self._cond:
            token = next(self._tokens)
            deadline = time.monotonic() + after_s
            self._armed[token] = (deadline, after_s)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fairswitch-stall-report",
                                                daemon=True)
                self._thread.start()
            elif deadline < self._waits_until:
                self._cond.notify()
            return token

    def disarm(self, token: int) -> None:
        with self._cond:
            self._armed.pop(token, None)

    def _run(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                due = [(t, a) for t, (d, a) in self._armed.items() if d <= now]
                for token, _ in due:
                    del self._armed[token]  # once per step, as the step goes on
                if not due:
                    self._waits_until = min((d for d, _ in self._armed.values()),
                                            default=math.inf)
                    self._cond.wait(None if self._waits_until == math.inf
                                    else self._waits_until - now)
                    continue
            _dump(max(a for _, a in due))  # outside the lock: a step may disarm meanwhile


def _dump(after_s: float) -> None:
    err = sys.__stderr__
    if err is None:  # no stderr to write to (a windowed interpreter)
        return
    me = threading.get_ident()
    names = {t.ident: t.name for t in threading.enumerate()}
    lines = [f"fairswitch: a step has not returned after {after_s:g} s; the stack of every "
             "thread (most recent call last), while it goes on waiting:\n"]
    for ident, frame in sys._current_frames().items():
        if ident != me:
            lines.append(f"Thread {names.get(ident, '?')} ({ident:#x}):\n")
            lines.extend(traceback.format_stack(frame))
    try:
        err.write("".join(lines))
        err.flush()
    except (OSError, ValueError):  # stderr closed or gone: nothing to say it on
        pass


_WATCHDOG = _Watchdog()


@contextlib.contextmanager
def report_stall(after_s: float) -> Iterator[None]:
    """Within the block, dump every thread's stack to stderr once ``after_s`` have passed."""
    token = _WATCHDOG.arm(after_s)
    try:
        yield
    finally:
        _WATCHDOG.disarm(token)
