"""Where a tensor-parallel rank is stuck, said before the distributed timeout ends the engine.

A rank waiting on another one (a collective, a device sync behind one) waits inside a C call,
where Python cannot interrupt it and the timeout, when it comes, names no line of Python. So
each step of a rank runs under ``report_stall``: if the step has not returned after
``after_s``, faulthandler's watchdog thread writes the stack of every thread of that process to
stderr, while the step goes on waiting (it may still complete: nothing is stopped).
"""

from __future__ import annotations

import contextlib
import faulthandler
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def report_stall(after_s: float) -> Iterator[None]:
    """Within the block, dump every thread's stack to stderr once ``after_s`` have passed."""
    err = sys.__stderr__
    if err is None:  # no stderr to write to (a windowed interpreter)
        yield
        return
    faulthandler.dump_traceback_later(after_s, repeat=False, file=err)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
