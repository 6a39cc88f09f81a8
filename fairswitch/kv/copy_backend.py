"""How swap copies are executed. The swap manager only submits extents and polls handles.

- ``SyncCopyBackend``: copies at submit time (CPU-only machines, tests): every handle is done.
- ``TorchStreamCopyBackend``: asynchronous copies on a dedicated CUDA stream, ordered after the
  compute stream's work with an event, completion polled with ``event.query()``.
- ``CupyCopyBackend``: the same on a CuPy stream with one raw ``cudaMemcpyAsync`` per extent
  (byte ranges of the block-contiguous pools, no tensor views, no per-copy Python tensor work).
- ``per_layer=True`` (baseline mode) splits each block into one copy per layer and K/V, as
  vLLM 0.3.3 did, to measure what coalescing buys.

A backend is one stream, so one direction at a time per backend: the swap manager runs
swap-outs and swap-ins on two (full duplex: both copy engines busy at once, swap_manager.py).
On CUDA every submission is timed on the device: ``CopyStats`` adds up each direction's busy
time (the copy itself) and queued time (from when the compute stream allowed the copy to start
to when it started: waiting behind earlier copies of its stream).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class CopyStats:
    num_copies: int = 0
    bytes_out: int = 0  # device -> host
    bytes_in: int = 0  # host -> device
    busy_s_out: float = 0.0  # device time copying (CUDA backends; 0 for synchronous copies)
    busy_s_in: float = 0.0
    queued_s_out: float = 0.0  # device time ready to start but waiting behind earlier copies
    queued_s_in: float = 0.0

    @staticmethod
    def total(stats: list[CopyStats]) -> CopyStats:
        return CopyStats(*(sum(getattr(s, f.name) for s in stats)
                           for f in dataclasses.fields(CopyStats)))

    def add_timing(self, to_host: bool, busy_s: float, queued_s: float) -> None:
        if to_host:
            self.busy_s_out += busy_s
            self.queued_s_out += queued_s
        else:
            self.busy_s_in += busy_s
            self.queued_s_in += queued_s

    @property
    def bytes_per_copy(self) -> float:
        return (self.bytes_out + self.bytes_in) / self.num_copies if self.num_copies else 0.0


@dataclass
class CopyHandle:
    event: Any = None  # a CUDA event, or None when the copy is already complete
    polls_left: int = 0  # used by DelayedCopyBackend (tests)
    nbytes: int = 0
    extra: dict = field(default_factory=dict)
    to_host: bool = True
    # CUDA timing: when the compute stream let the copy start, when it started (None: untimed)
    ready: Any = None
    start: Any = None


class CopyBackend:
    def __init__(self, per_layer: bool = False) -> None:
        self.per_layer = per_layer
        self.stats = CopyStats()

    def submit(self, src: torch.Tensor, dst: torch.Tensor,
               extents: list[tuple[int, int, int]], to_host: bool) -> CopyHandle:
        """Copy ``src[s:s+n] -> dst[d:d+n]`` for each extent (block-granular pool tensors)."""
        nbytes = 0
        for s, d, n in extents:
            if self.per_layer:
                for i in range(n):
                    for layer in range(src.shape[1]):
                        for kv in range(2):
                            self._copy(src[s + i, layer, kv], dst[d + i, layer, kv])
                            self.stats.num_copies += 1
            else:
                self._copy(src[s:s + n], dst[d:d + n])
                self.stats.num_copies += 1
            nbytes += n * src[0].numel() * src.element_size()
        if to_host:
            self.stats.bytes_out += nbytes
        else:
            self.stats.bytes_in += nbytes
        return self._finish(nbytes, to_host)

    def _copy(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        dst.copy_(src)

    def _finish(self, nbytes: int, to_host: bool) -> CopyHandle:
        return CopyHandle(nbytes=nbytes, to_host=to_host)

    def done(self, handle: CopyHandle) -> bool:
        return True

    def wait(self, handle: CopyHandle) -> None:
        pass

    def order_compute_after(self, handle: CopyHandle) -> None:
        """Make work queued on the compute stream from now on run after this copy (on the
        device: the host does not wait). Synchronous copies are complete already."""


class SyncCopyBackend(CopyBackend):
    """Everything completes inside ``submit``."""


class _StreamCopyBackend(CopyBackend):
    """A CUDA stream's copies, each ending in an event; ready/start events time them once
    landed (``CopyStats``)."""

    def done(self, handle: CopyHandle) -> bool:
        if handle.event is None:
            return True
        if not self._event_done(handle.event):
            return False
        self._time(handle)
        return True

    def wait(self, handle: CopyHandle) -> None:
        if handle.event is not None:
            handle.event.synchronize()
            self._time(handle)

    def _time(self, handle: CopyHandle) -> None:
        """Add a landed copy's device times to the statistics, once."""
        if handle.start is None:
            return
        busy_ms = self._elapsed_ms(handle.start, handle.event)
        queued_ms = self._elapsed_ms(handle.ready, handle.start)
        handle.ready = handle.start = None
        self.stats.add_timing(handle.to_host, busy_ms / 1e3, max(0.0, queued_ms) / 1e3)

    def _event_done(self, event: Any) -> bool:
        raise NotImplementedError

    def _elapsed_ms(self, first: Any, second: Any) -> float:
        raise NotImplementedError


class TorchStreamCopyBackend(_StreamCopyBackend):
    """Copies on a side CUDA stream; the compute stream's pending writes are awaited first."""

    def __init__(self, device: torch.device, per_layer: bool = False) -> None:
        super().__init__(per_layer)
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self._marks: tuple[Any, Any] | None = None

    def submit(self, src, dst, extents, to_host):
        ready, start = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        ready.record(torch.cuda.current_stream(self.device))
        self.stream.wait_event(ready)  # after the compute stream's pending writes
        start.record(self.stream)
        self._marks = (ready, start)
        with torch.cuda.stream(self.stream):
            return super().submit(src, dst, extents, to_host)

    def _copy(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        dst.copy_(src, non_blocking=True)

    def _finish(self, nbytes: int, to_host: bool) -> CopyHandle:
        event = torch.cuda.Event(enable_timing=True)
        event.record(self.stream)
        ready, start = self._marks or (None, None)
        return CopyHandle(event=event, nbytes=nbytes, to_host=to_host, ready=ready, start=start)

    def _event_done(self, event: Any) -> bool:
        return event.query()

    def _elapsed_ms(self, first: Any, second: Any) -> float:
        return first.elapsed_time(second)

    def order_compute_after(self, handle: CopyHandle) -> None:
        if handle.event is not None:
            torch.cuda.current_stream(self.device).wait_event(handle.event)


class CupyCopyBackend(_StreamCopyBackend):
    """Raw memcpyAsync per extent on a CuPy stream, ordered after torch's compute stream."""

    def __init__(self, device: torch.device, per_layer: bool = False) -> None:
        import cupy

        super().__init__(per_layer)
        self._cp = cupy
        self.device = device
        with cupy.cuda.Device(device.index or 0):
            self.stream = cupy.cuda.Stream(non_blocking=True)

    def submit(self, src, dst, extents, to_host):
        # Events are made on CuPy's current device: this rank's, whatever the thread's is.
        with self._cp.cuda.Device(self.device.index or 0):
            return self._submit(src, dst, extents, to_host)

    def _submit(self, src, dst, extents, to_host):
        cp = self._cp
        # Wait for the compute stream's pending work (this step's KV; the last readers of
        # blocks now reused) before copying: an event on the compute stream, waited on by the
        # copy stream; a second one marks when the copy starts (timing, ``_time``).
        ready, start = cp.cuda.Event(), cp.cuda.Event()
        cp.cuda.runtime.eventRecord(ready.ptr, torch.cuda.current_stream(self.device).cuda_stream)
        cp.cuda.runtime.streamWaitEvent(self.stream.ptr, ready.ptr, 0)
        start.record(self.stream)
        block = src[0].numel() * src.element_size()
        piece = src[0, 0, 0].numel() * src.element_size()  # one layer's K (or V) of a block
        pieces = src.shape[1] * 2
        memcpy = cp.cuda.runtime.memcpyAsync
        nbytes = 0
        for s, d, n in extents:
            src_ptr, dst_ptr = src.data_ptr() + s * block, dst.data_ptr() + d * block
            if self.per_layer:
                for i in range(n * pieces):
                    memcpy(dst_ptr + i * piece, src_ptr + i * piece, piece, 4, self.stream.ptr)
                self.stats.num_copies += n * pieces
            else:
                memcpy(dst_ptr, src_ptr, n * block, 4, self.stream.ptr)  # 4: cudaMemcpyDefault
                self.stats.num_copies += 1
            nbytes += n * block
        if to_host:
            self.stats.bytes_out += nbytes
        else:
            self.stats.bytes_in += nbytes
        event = cp.cuda.Event()
        event.record(self.stream)
        return CopyHandle(event=event, nbytes=nbytes, to_host=to_host, ready=ready, start=start)

    def _event_done(self, event: Any) -> bool:
        return event.done

    def _elapsed_ms(self, first: Any, second: Any) -> float:
        return self._cp.cuda.get_elapsed_time(first, second)

    def order_compute_after(self, handle: CopyHandle) -> None:
        if handle.event is not None:
            compute = torch.cuda.current_stream(self.device).cuda_stream
            self._cp.cuda.runtime.streamWaitEvent(compute, handle.event.ptr, 0)


class DelayedCopyBackend(CopyBackend):
    """Test double for a slow link: the bytes move only when a handle completes, after ``delay``
    polls. A block reused while its copy is in flight therefore corrupts data visibly. Copies
    complete in submission order, as on one CUDA stream: a handle is done only with all before
    it."""

    def __init__(self, delay: int, per_layer: bool = False) -> None:
        super().__init__(per_layer)
        self.delay = delay
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._queue: list[CopyHandle] = []  # submitted, not landed, oldest first

    def submit(self, src, dst, extents, to_host):
        self._pending = []
        handle = super().submit(src, dst, extents, to_host)
        handle.extra["copies"], self._pending = self._pending, []
        handle.polls_left = self.delay
        self._queue.append(handle)
        return handle

    def _copy(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        self._pending.append((src, dst))

    def _queued(self, handle: CopyHandle) -> bool:
        return any(h is handle for h in self._queue)  # identity: handles compare by fields

    def done(self, handle: CopyHandle) -> bool:
        if not self._queued(handle):
            return True
        if handle.polls_left > 0:
            handle.polls_left -= 1
            return False
        self.wait(handle)
        return True

    def wait(self, handle: CopyHandle) -> None:
        while self._queued(handle):
            first = self._queue.pop(0)
            first.polls_left = 0
            for src, dst in first.extra.pop("copies", []):
                dst.copy_(src)

    def order_compute_after(self, handle: CopyHandle) -> None:
        # The compute stream waits on the device: every compute launched from now on sees the
        # bytes of this copy and of every earlier one, while the host still sees the copy in
        # flight for ``delay`` polls (its blocks stay protected until then).
        while self._queued(handle):
            h = self._queue[0]
            for src, dst in h.extra.pop("copies", []):
                dst.copy_(src)
            if h is handle:
                break
            self._queue.pop(0)
            h.polls_left = 0


def make_copy_backend(name: str, device: torch.device, per_layer: bool) -> CopyBackend:
    """auto: CuPy raw copies on CUDA when CuPy is installed, else torch streams; sync on CPU."""
    if device.type != "cuda":
        if name == "cupy":
            raise ValueError("the cupy swap copy backend needs a CUDA device")
        return SyncCopyBackend(per_layer)
    if name == "cupy" or (name == "auto" and cupy_available()):
        return CupyCopyBackend(device, per_layer)
    return TorchStreamCopyBackend(device, per_layer)


def cupy_available() -> bool:
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True
