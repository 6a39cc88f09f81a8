"""Which adapter each of the ``max_loras`` device slots holds, and which seated requests use it:
the scheduler seats a request with an adapter only where a slot holds that adapter or one is
free (no seated request uses it). A queued request whose adapter finds none waits; requests
without an adapter pass it, those with one wait behind it until a slot frees for it.

A request holds its slot from admission (or the start of its swap-in) until it leaves the batch
(preempted, finished, aborted). A free slot keeps its adapter until another needs the slot,
least recently freed first, so an adapter used again soon is not copied in again. The copies a
step needs are listed by ``take_loads``; the runner makes them before the step, in stream order
after the steps before it (which may still read the slot's old adapter).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from fairswitch.request import Request


class AdapterSlots:
    def __init__(self, num_slots: int) -> None:
        self.held: list[int | None] = [None] * num_slots  # adapter id per slot
        self.users = [0] * num_slots
        self._free: OrderedDict[int, None] = OrderedDict((k, None) for k in range(num_slots))
        self._loads: list[tuple[int, Any]] = []

    def can_seat(self, req: Request) -> bool:
        return req.lora_adapter is None or req.lora_slot >= 0 or bool(self._free) \
            or req.lora_adapter.int_id in self.held

    def seat(self, req: Request) -> bool:
        """Give ``req`` the slot of its adapter (``req.lora_slot``); False if none is free."""
        adapter = req.lora_adapter
        if adapter is None or req.lora_slot >= 0:
            return True
        if adapter.int_id in self.held:
            slot = self.held.index(adapter.int_id)
        elif self._free:
            slot = next(iter(self._free))
            self.held[slot] = adapter.int_id
            self._loads.append((slot, adapter))
        else:
            return False
        self._free.pop(slot, None)
        self.users[slot] += 1
        req.lora_slot = slot
        return True

    def unseat(self, req: Request) -> None:
        slot = req.lora_slot
        if slot < 0:
            return
        req.lora_slot = -1
        self.users[slot] -= 1
        if not self.users[slot]:
            self._free[slot] = None  # most recently freed: reused last

    def requeue(self, loads: list[tuple[int, Any]]) -> None:
        """Copies a step was to make, whose step did not run (reverted): made before the next
        (again, if they were made: the same weights)."""
        self._loads[:0] = loads

    def take_loads(self) -> list[tuple[int, Any]]:
        """(slot, adapter) copies to make before the next step."""
        loads, self._loads = self._loads, []
        return loads
