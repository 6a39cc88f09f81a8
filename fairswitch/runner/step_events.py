"""The one event a step raises for host work that overlaps the GPU.

``gpu_busy``: the step's work is queued on the GPU and the host has not yet waited for its tokens.
Callbacks registered in ``on_gpu_busy`` (the async engine hands the last step's outputs to its
consumers there) run at most once per engine step: the engine arms the event, the runner fires it
at the right moment of a launch (after a graph replay; before an eager forward, whose kernel
launches are host work of their own), and the engine fires it itself before waiting if no launch
did (a step that samples nothing, or nothing launched behind the step in flight).
"""

from __future__ import annotations

from collections.abc import Callable


class StepEvents:
    def __init__(self) -> None:
        self.on_gpu_busy: list[Callable[[], None]] = []
        self._armed = False

    def arm(self) -> None:
        self._armed = bool(self.on_gpu_busy)

    @property
    def armed(self) -> bool:
        return self._armed

    def gpu_busy(self) -> None:
        """Run the callbacks if armed (once: firing disarms)."""
        if self._armed:
            self._armed = False
            for callback in self.on_gpu_busy:
                callback()
