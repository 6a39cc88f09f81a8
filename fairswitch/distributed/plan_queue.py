"""The driver's step plans to the workers of its host through shared memory: one writer, N
readers, a ring of slots in a memory-mapped file.

A plan sent as a gloo ``broadcast_object_list`` costs two collectives over TCP, about a
millisecond a step on a small host, on the path of every decode step of every rank. Through
shared memory a worker sees a plan as soon as it is written.

    slot i:  | seq (8) | nbytes (8) | done flag per reader (1 each, padded to 64) | pickled plan |

    writer (driver)                                  reader r (worker r)
    wait until every done flag of the slot is 1      wait until seq == the seq it expects next
    write the plan, nbytes, flags := 0               unpickle the plan
    seq := n  (the publish: written last)            done[r] := 1

Message n goes to slot (n - 1) % num_slots, so the driver can run num_slots plans ahead of the
slowest worker before it waits. A plan larger than a slot goes by the fallback (gloo) instead:
its slot carries nbytes = -1, telling the readers to take it from there. The protocol needs other
processes to see the writes in the order they are made, with no fence in Python to ask for it:
x86-64's total store order gives it (``ORDERED_STORES``); elsewhere (aarch64) plans go by gloo.

The file is unlinked as soon as every rank has mapped it (``unlink``): the mapping lives as long
as the processes, so nothing is left behind when one of them is killed. Waiting spins for a
while, then sleeps in short steps: a busy engine hears of a plan within microseconds, an idle
server costs little CPU (a look every half millisecond). A reader waits as long as its driver
lives (an idle server sends no plan); the writer waits for a slot at most ``timeout_s``, then
raises.
"""

from __future__ import annotations

import mmap
import os
import pickle
import platform
import secrets
import struct
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Do other processes see this machine's stores in program order (x86-64's total store order)?
ORDERED_STORES = platform.machine().lower() in ("x86_64", "amd64")

_HEADER = struct.Struct("<qq")  # seq, nbytes
_OVERSIZE = -1  # nbytes of a message that went by the fallback
_SPIN_S = 0.05  # spin (yielding) this long before sleeping between looks
_SLEEP_S = 0.0005


@dataclass(frozen=True)
class QueueHandle:
    """What a reader needs to map the queue (picklable: it goes to the spawned workers)."""

    path: str
    num_readers: int
    slot_bytes: int
    num_slots: int


def _data_offset(handle: QueueHandle) -> int:
    return _HEADER.size + -(-handle.num_readers // 64) * 64


def _ring_bytes(handle: QueueHandle) -> int:
    return (_data_offset(handle) + handle.slot_bytes) * handle.num_slots


class _Ring:
    def __init__(self, handle: QueueHandle, mm: mmap.mmap) -> None:
        self.handle, self.mm = handle, mm
        self.data_offset = _data_offset(handle)
        self.stride = self.data_offset + handle.slot_bytes

    def base(self, seq: int) -> int:
        return ((seq - 1) % self.handle.num_slots) * self.stride

    def header(self, seq: int) -> tuple[int, int]:
        return _HEADER.unpack_from(self.mm, self.base(seq))

    def flags_at(self, seq: int) -> int:
        """Offset of the readers' done flags in ``seq``'s slot."""
        return self.base(seq) + _HEADER.size

    def flags(self, seq: int) -> bytes:
        start = self.flags_at(seq)
        return self.mm[start:start + self.handle.num_readers]

    def set_flags(self, seq: int, value: int) -> None:
        start = self.flags_at(seq)
        self.mm[start:start + self.handle.num_readers] = bytes([value]) * self.handle.num_readers


def _wait(ready: Callable[[], bool], give_up: Callable[[], None]) -> None:
    """Until ``ready()``: spin, then sleep in short steps, calling ``give_up`` (which raises
    when waiting should end) between the sleeps."""
    start = time.monotonic()
    while not ready():
        if time.monotonic() - start < _SPIN_S:
            os.sched_yield()
        else:
            give_up()
            time.sleep(_SLEEP_S)


class PlanWriter:
    """The driver's end: ``put`` each plan, in order, for every reader."""

    def __init__(self, num_readers: int, slot_bytes: int = 4 << 20, num_slots: int = 4) -> None:
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        path = os.path.join(folder, f"fairswitch-plans-{os.getpid()}-{secrets.token_hex(6)}")
        self.handle = QueueHandle(path, num_readers, slot_bytes, num_slots)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            # Reserved now: a write to a mapped page a full tmpfs cannot back is SIGBUS later
            # (a container's /dev/shm can be small), here it is an OSError.
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, _ring_bytes(self.handle))
            else:
                os.ftruncate(fd, _ring_bytes(self.handle))
            self._ring = _Ring(self.handle, mmap.mmap(fd, _ring_bytes(self.handle)))
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        for seq in range(1, num_slots + 1):  # every slot free
            self._ring.set_flags(seq, 1)
        self._seq = 0

    def unlink(self) -> None:
        """Remove the file once every reader has mapped it (the mappings stay)."""
        if os.path.exists(self.handle.path):
            os.unlink(self.handle.path)

    def put(self, message: Any, timeout_s: float, check: Callable[[], None],
            fallback: Callable[[Any], None]) -> None:
        """Publish ``message`` to every reader. Waits for the slot at most ``timeout_s``
        (``TimeoutError``), calling ``check`` (which raises if a reader has died) meanwhile; a
        message larger than a slot is handed to ``fallback`` after its slot says so."""
        ring, seq = self._ring, self._seq + 1
        n = ring.handle.num_readers
        deadline = time.monotonic() + timeout_s

        def give_up() -> None:
            check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"a tensor-parallel worker took no plan for {timeout_s:.0f} s")

        _wait(lambda: ring.flags(seq) == b"\x01" * n, give_up)
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        oversize = len(data) > ring.handle.slot_bytes
        base = ring.base(seq)
        if not oversize:
            ring.mm[base + ring.data_offset:base + ring.data_offset + len(data)] = data
        ring.set_flags(seq, 0)
        struct.pack_into("<q", ring.mm, base + 8, _OVERSIZE if oversize else len(data))
        struct.pack_into("<q", ring.mm, base, seq)  # the publish, written last
        self._seq = seq
        if oversize:
            fallback(message)


class PlanReader:
    """A worker's end: ``get`` the plans in order."""

    def __init__(self, handle: QueueHandle, reader: int) -> None:
        fd = os.open(handle.path, os.O_RDWR)
        try:
            self._ring = _Ring(handle, mmap.mmap(fd, _ring_bytes(handle)))
        finally:
            os.close(fd)
        self._reader = reader
        self._seq = 0

    def get(self, check: Callable[[], None], fallback: Callable[[], Any]) -> Any:
        """The next message; waits as long as ``check`` does not raise (the driver lives)."""
        ring, seq = self._ring, self._seq + 1
        _wait(lambda: ring.header(seq)[0] == seq, check)
        nbytes = ring.header(seq)[1]
        base = ring.base(seq)
        if nbytes == _OVERSIZE:
            message = fallback()
        else:
            start = base + ring.data_offset
            message = pickle.loads(ring.mm[start:start + nbytes])
        ring.mm[ring.flags_at(seq) + self._reader] = 1
        self._seq = seq
        return message
