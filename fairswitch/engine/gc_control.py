"""The Python garbage collector around serving: how long its pauses are, and keeping them short.

A collection holds the GIL, so it stalls the engine thread whichever thread triggered it. A full
(generation 2) collection walks every tracked object: after importing torch and transformers and
building a model that is a few hundred thousand objects, 50-100 ms per collection, landing in
whatever step was running (a token gap, a first token). ``frozen_heap()`` moves everything alive
at start-up to the collector's permanent generation (``gc.freeze``), which full collections skip,
so they only walk what serving allocated since; ``GC_CLOCK`` measures the pauses (the step log's
``gc_s`` column, the bench's ``gc_pause_s``).
"""

from __future__ import annotations

import contextlib
import gc
import threading
import time
from collections.abc import Iterator


_install_lock = threading.Lock()


class GCClock:
    """Accumulates the time the process spends in garbage collections (all threads)."""

    def __init__(self) -> None:
        self.total_s = 0.0
        self.max_s = 0.0
        self.count = [0, 0, 0]  # collections per generation
        self._start: float | None = None
        self._installed = False

    def install(self) -> None:
        """Start measuring (idempotent): a ``gc.callbacks`` hook, two clock reads a collection."""
        with _install_lock:
            if not self._installed:
                gc.callbacks.append(self._callback)
                self._installed = True

    def uninstall(self) -> None:
        if self._installed:
            gc.callbacks.remove(self._callback)
            self._installed = False
            self._start = None

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            pause = time.perf_counter() - self._start
            self._start = None
            self.total_s += pause
            self.max_s = max(self.max_s, pause)
            self.count[info["generation"]] += 1


GC_CLOCK = GCClock()

_freeze_lock = threading.Lock()
_num_frozen = 0  # frozen_heap() contexts open now


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Collect, then freeze everything alive, for the life of the context; on exit, when no
    other context is open, unfreeze so that what the frozen objects' cycles hold (an engine's
    device memory) can be collected again."""
    global _num_frozen
    with _freeze_lock:
        gc.collect()
        gc.freeze()
        _num_frozen += 1
    try:
        yield
    finally:
        with _freeze_lock:
            _num_frozen -= 1
            if _num_frozen == 0:
                gc.unfreeze()
