"""Context switches by swapping: a request's KV moves GPU -> CPU when it is preempted and back when
it resumes, one copy per extent, overlapped with compute where the backend allows.

Who owns a block at any time (what ``check`` verifies):

    GPU block: free | a request's block_table | an outgoing copy (draining, freed when it lands)
               | an incoming copy (becomes the request's when it lands)
    CPU block: free | a request's cpu_block_table | an aborted request's copy still in flight

KV of past tokens never changes, so a CPU copy stays valid while the request runs again: the next
swap-out copies only blocks from the first one not fully saved (incremental swap-out).

    block_table:     [ g0 g1 g2 g3 g4 ]      num_computed_tokens = 75 (block_size 16)
    cpu_block_table: [ c0 c1 c2 ]            num_cpu_tokens = 40: c0, c1 full, c2 partial
    swap-out copies g2..g4 -> c2..c4 only
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from fairswitch.kv.block_groups import ExtentAllocator
from fairswitch.kv.cache_manager import KVCacheManager
from fairswitch.kv.copy_backend import CopyBackend, CopyHandle
from fairswitch.kv.extents import copy_extents
from fairswitch.request import Request


_F = TypeVar("_F", bound=Callable[..., Any])


def _stalls(fn: _F) -> _F:
    """Count the call's host time as switch stall: the engine's step is synchronous with the
    GPU, so while the manager plans, submits, polls or waits, the GPU has nothing queued."""

    @functools.wraps(fn)
    def timed(self: SwapManager, *args: Any, **kwargs: Any) -> Any:
        if self._timing:  # nested (wait_incoming -> poll): the outer call counts it
            return fn(self, *args, **kwargs)
        self._timing = True
        t0 = time.perf_counter()
        try:
            return fn(self, *args, **kwargs)
        finally:
            self.stall_s += time.perf_counter() - t0
            self._timing = False

    return timed  # type: ignore[return-value]


@dataclass(slots=True)
class _Transfer:
    handle: CopyHandle
    gpu_blocks_to_free: list[int] = field(default_factory=list)
    cpu_blocks_to_free: list[int] = field(default_factory=list)
    aborted: bool = False


class SwapManager:
    def __init__(self, gpu: KVCacheManager, gpu_tensor: torch.Tensor, num_cpu_blocks: int,
                 cpu_tensor: torch.Tensor, backend: CopyBackend, async_copies: bool = True,
                 incremental: bool = True) -> None:
        self.async_copies = async_copies
        self.incremental = incremental
        self.gpu = gpu
        self.gpu_tensor = gpu_tensor
        self.cpu_pool = ExtentAllocator(num_cpu_blocks)
        self.cpu_tensor = cpu_tensor
        self.backend = backend
        self.block_size = gpu.block_size
        self.outgoing: dict[Request, _Transfer] = {}
        self.incoming: dict[Request, _Transfer] = {}
        self._orphans: list[_Transfer] = []  # transfers of aborted requests, still in flight
        self.cpu_resident: set[Request] = set()  # requests holding CPU blocks
        self.blocking_copy_s = 0.0  # time steps waited on copies (async_copies=False)
        self._timing = False
        self.stall_s = 0.0  # host time in swap_out/swap_in/poll/wait_incoming (see _stalls)

    @property
    def block_bytes(self) -> int:
        return self.gpu_tensor[0].numel() * self.gpu_tensor.element_size()

    # ---- planning ---------------------------------------------------------------------------

    def _first_dirty_block(self, req: Request) -> int:
        return req.num_cpu_tokens // self.block_size

    def swap_out_blocks(self, req: Request) -> int:
        """Blocks a swap-out of ``req`` would copy now (the incremental part)."""
        return self.gpu.blocks_needed(req.num_computed_tokens) - self._first_dirty_block(req)

    def cpu_blocks_needed(self, req: Request) -> int:
        return max(0, self.gpu.blocks_needed(req.num_computed_tokens) - len(req.cpu_block_table))

    def can_swap_out(self, req: Request) -> bool:
        return self.cpu_blocks_needed(req) <= self.cpu_pool.num_free_blocks + \
            self._reclaimable_cpu_blocks(exclude=req)

    def _reclaimable_cpu_blocks(self, exclude: Request) -> int:
        # Stale-but-valid copies of requests that are on the GPU can be dropped at any time.
        return sum(len(r.cpu_block_table) for r in self.cpu_resident
                   if r is not exclude and r.block_table and r not in self.incoming)

    def _reserve_cpu(self, n: int, exclude: Request) -> None:
        for r in list(self.cpu_resident):
            if self.cpu_pool.num_free_blocks >= n:
                return
            if r is not exclude and r.block_table and r not in self.incoming:
                self.drop_cpu_copy(r)

    # ---- transfers --------------------------------------------------------------------------

    @_stalls
    def swap_out(self, req: Request) -> None:
        """Start copying ``req``'s KV to the CPU; its GPU blocks drain until the copy lands."""
        total = self.gpu.blocks_needed(req.num_computed_tokens)
        need = self.cpu_blocks_needed(req)
        if need:
            self._reserve_cpu(need, exclude=req)
            last = req.cpu_block_table[-1] if req.cpu_block_table else None
            req.cpu_block_table.extend(self.cpu_pool.allocate(need, after=last))
        self.gpu.drop_reservation(req)  # unused tail of its group: nothing to copy
        first = self._first_dirty_block(req)
        extents = copy_extents(req.block_table[first:total], req.cpu_block_table[first:total])
        handle = self._submit(self.gpu_tensor, self.cpu_tensor, extents, to_host=True)
        self.outgoing[req] = _Transfer(handle, gpu_blocks_to_free=req.block_table)
        req.block_table = []
        req.num_cpu_tokens = req.num_computed_tokens
        self.cpu_resident.add(req)

    def can_swap_in(self, req: Request) -> bool:
        return (req not in self.outgoing and self.gpu.blocks_needed(req.num_cpu_tokens)
                <= self.gpu.num_free_blocks)

    @_stalls
    def swap_in(self, req: Request) -> None:
        """Start copying ``req``'s KV back; it may run once ``poll`` reports it ready."""
        assert self.can_swap_in(req) and not req.block_table
        total = self.gpu.blocks_needed(req.num_cpu_tokens)
        req.block_table = self.gpu.allocate_blocks(total)  # one run where possible
        extents = copy_extents(req.cpu_block_table[:total], req.block_table)
        handle = self._submit(self.cpu_tensor, self.gpu_tensor, extents, to_host=False)
        self.incoming[req] = _Transfer(handle)
        req.num_computed_tokens = req.num_cpu_tokens

    def _submit(self, src: torch.Tensor, dst: torch.Tensor, extents: list[tuple[int, int, int]],
                to_host: bool) -> CopyHandle:
        handle = self.backend.submit(src, dst, extents, to_host)
        if not self.async_copies:  # the baseline: the step stalls until the bytes have moved
            t0 = time.perf_counter()
            self.backend.wait(handle)
            self.blocking_copy_s += time.perf_counter() - t0
        return handle

    @_stalls
    def poll(self) -> list[Request]:
        """Retire finished copies; return the requests whose swap-in has landed."""
        for req, t in list(self.outgoing.items()):
            if self.backend.done(t.handle):
                self.gpu.release_blocks(t.gpu_blocks_to_free)
                del self.outgoing[req]
        ready = [req for req, t in self.incoming.items() if self.backend.done(t.handle)]
        for req in ready:
            del self.incoming[req]
            if not self.incremental:  # vLLM 0.3.3 frees the CPU copy on swap-in
                self.drop_cpu_copy(req)
        self._orphans = [t for t in self._orphans if not self._retire_orphan(t)]
        return ready

    @_stalls
    def wait_incoming(self) -> list[Request]:
        """Block until every swap-in has landed (only when the GPU has nothing else to run)."""
        for t in self.incoming.values():
            self.backend.wait(t.handle)
        return self.poll()

    def _retire_orphan(self, t: _Transfer) -> bool:
        if not self.backend.done(t.handle):
            return False
        self.gpu.release_blocks(t.gpu_blocks_to_free)
        self.cpu_pool.free(t.cpu_blocks_to_free)
        return True

    # ---- releasing ----------------------------------------------------------------------------

    def drop_cpu_copy(self, req: Request) -> None:
        if req.cpu_block_table:
            self.cpu_pool.free(req.cpu_block_table)
        req.cpu_block_table = []
        req.num_cpu_tokens = 0
        self.cpu_resident.discard(req)

    def release(self, req: Request) -> None:
        """The request is finished or aborted: free everything, after any copy in flight lands."""
        t = self.outgoing.pop(req, None) or self.incoming.pop(req, None)
        if t is None:
            self.gpu.free(req)
            self.drop_cpu_copy(req)
            return
        # The copy still reads or writes these blocks: hand them to the transfer.
        t.gpu_blocks_to_free += req.block_table
        t.cpu_blocks_to_free += req.cpu_block_table
        req.block_table, req.cpu_block_table, req.num_cpu_tokens = [], [], 0
        self.cpu_resident.discard(req)
        self._orphans.append(t)

    def has_in_flight(self) -> bool:
        return bool(self.outgoing or self.incoming or self._orphans)

    def gpu_blocks_in_flight(self) -> list[int]:
        """GPU blocks held by copies (draining swap-outs, aborted requests' transfers)."""
        return [b for t in [*self.outgoing.values(), *self._orphans] for b in t.gpu_blocks_to_free]

    def num_cpu_blocks_in_flight(self) -> int:
        return sum(len(t.cpu_blocks_to_free) for t in self._orphans)
