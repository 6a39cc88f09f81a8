"""Swap copies under tensor parallelism: the driver's copies, replayed by every other rank on its
own share of the pools, over its own link, on its own copy stream, in the same extents.

The driver's swap manager copies through a ``MirroredCopyBackend``: each copy runs on the driver
as always and is logged, with what the driver later learns or asks about it:

    ("copy", k, stream, to_host, extents)  copy k on stream 0 (swap-outs), 1 (write-backs) or
                                           2 (swap-ins, fetches; one stream with 0 if not duplex)
    ("order", k)                           compute from now on runs after copy k (early landing)
    ("landed", k)                          the driver saw its copy k land: its blocks may be reused
                                           or read by the next steps

The log goes to the other ranks with the next step's plan; ``CopyReplay`` submits each copy there
before the step runs, in the same order relative to compute as on the driver, and turns "order"
and "landed" into the compute stream waiting for that rank's own copy on the device: a block the
driver reuses because its copy landed is never written on a rank before that rank's copy of it
has landed, and the host never waits for another rank's link.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from fairswitch.kv.copy_backend import CopyBackend, CopyHandle, CopyStats


class MirroredCopyBackend:
    def __init__(self, inner: CopyBackend, stream: int, log: list[tuple]) -> None:
        self.inner = inner
        self.stream = stream
        self.log = log
        self._ids = itertools.count()
        self._pending: dict[int, int] = {}  # id(handle) -> copy number, until it has landed

    @property
    def stats(self) -> CopyStats:
        return self.inner.stats

    @stats.setter
    def stats(self, value: CopyStats) -> None:
        self.inner.stats = value

    def submit(self, src: torch.Tensor, dst: torch.Tensor, extents: list[tuple[int, int, int]],
               to_host: bool) -> CopyHandle:
        handle = self.inner.submit(src, dst, extents, to_host)
        k = next(self._ids)
        self._pending[id(handle)] = k
        self.log.append(("copy", (self.stream, k), self.stream, to_host, list(extents)))
        return handle

    def done(self, handle: CopyHandle) -> bool:
        if not self.inner.done(handle):
            return False
        self._landed(handle)
        return True

    def wait(self, handle: CopyHandle) -> None:
        self.inner.wait(handle)
        self._landed(handle)

    def order_compute_after(self, handle: CopyHandle) -> None:
        self.inner.order_compute_after(handle)
        k = self._pending.get(id(handle))
        if k is not None:
            self.log.append(("order", (self.stream, k)))

    def _landed(self, handle: CopyHandle) -> None:
        k = self._pending.pop(id(handle), None)
        if k is not None:
            self.log.append(("landed", (self.stream, k)))


class CopyReplay:
    """A worker rank's side: its GPU pool, its CPU pool and a copy backend per stream."""

    def __init__(self, gpu: torch.Tensor, cpu: torch.Tensor | None,
                 backends: dict[int, Any]) -> None:
        self.gpu, self.cpu = gpu, cpu
        self.backends = backends
        self._handles: dict[tuple[int, int], tuple[Any, CopyHandle]] = {}

    def apply(self, ops: list[tuple]) -> None:
        for op in ops:
            if op[0] == "copy":
                _, key, stream, to_host, extents = op
                src, dst = (self.gpu, self.cpu) if to_host else (self.cpu, self.gpu)
                backend = self.backends[stream]
                self._handles[key] = (backend, backend.submit(src, dst, extents, to_host))
                continue
            backend, handle = (self._handles.pop(op[1]) if op[0] == "landed"
                               else self._handles[op[1]])
            backend.order_compute_after(handle)
