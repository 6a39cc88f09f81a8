"""Context switches by swapping: a request's KV moves GPU -> CPU when it is preempted and back when
it resumes, one copy per extent, overlapped with compute where the backend allows.

Who owns a block at any time (what ``check`` verifies):

    GPU block: free | a request's block_table | an outgoing copy (draining, freed when it lands)
               | an incoming copy (becomes the request's when it lands)
    CPU block: free | a request's cpu_block_table | an aborted request's copy still in flight

KV of past tokens never changes, so a CPU copy stays valid while the request runs again: the next
swap-out copies only blocks from the first one not fully saved (incremental swap-out).

Full duplex: swap-outs go device-to-host on one stream (``out_backend``), swap-ins and CPU-tier
fetches host-to-device on another (``in_backend``), so both directions' copy engines run at once
and a swap-in never queues behind a swap-out; write-backs to the CPU tier, background traffic, go
on a third stream in pieces of at most ``BACKGROUND_PIECE_BYTES``, so that they hold a swap-out
of the same direction back by one piece at most (stream priorities do not apply to copies). Every
copy starts after the compute stream's work queued before it, and a request runs (so can be
swapped out again) only once the host has seen its swap-in land or, with early landing, once the
compute stream waits for it: a request's swap-out always follows its swap-in. Blocks a copy holds
are freed only once the host has seen that copy land, whatever its stream.

    block_table:     [ g0 g1 g2 g3 g4 ]      num_computed_tokens = 75 (block_size 16)
    cpu_block_table: [ c0 c1 c2 ]            num_cpu_tokens = 40: c0, c1 full, c2 partial
    swap-out copies g2..g4 -> c2..c4 only
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from fairswitch.kv.block_groups import ExtentAllocator
from fairswitch.kv.cache_manager import KVCacheManager
from fairswitch.kv.copy_backend import CopyBackend, CopyHandle, CopyStats
from fairswitch.kv.extents import copy_extents, split_extents
from fairswitch.kv.reuse_index import ReuseTier, block_hashes
from fairswitch.request import Request

_F = TypeVar("_F", bound=Callable[..., Any])
_submission_order = itertools.count()
BACKGROUND_PIECE_BYTES = 32 << 20  # a write-back copy's largest piece (full link rate above ~4 MiB)


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
    backend: CopyBackend  # the stream it runs on
    gpu_blocks_to_free: list[int] = field(default_factory=list)
    cpu_blocks_to_free: list[int] = field(default_factory=list)
    cpu_blocks_to_unpin: list[int] = field(default_factory=list)  # CPU-tier blocks being fetched
    # Write-back to the CPU tier: (prefix hash, tokens, CPU block), registered once landed.
    tier_entries: list[tuple[int, tuple[int, ...], int]] = field(default_factory=list)
    landed_early: bool = False  # its request already runs (compute ordered after the copy)
    stale: bool = False  # a write-back whose KV the prefix cache forgot (reset_tier): freed
    order: int = field(default_factory=lambda: next(_submission_order))  # oldest lands first


class SwapManager:
    """The swap space: CPU blocks for preempted requests' KV and the CPU reuse tier, and the
    copies between it and the GPU pool. Built by ``KVMemory`` (memory.py)."""

    def __init__(self, gpu: KVCacheManager, gpu_tensor: torch.Tensor, cpu_tensor: torch.Tensor,
                 backend: CopyBackend, *, block_bytes: int, async_copies: bool = True,
                 incremental: bool = True, cpu_tier: ReuseTier | None = None,
                 early_landing: bool = False,
                 writeback_backend: CopyBackend | None = None,
                 in_backend: CopyBackend | None = None) -> None:
        """``backend`` copies swap-outs, ``in_backend`` swap-ins and fetches (default: the same
        stream, half duplex), ``writeback_backend`` write-backs (default: ``backend``)."""
        self.async_copies = async_copies
        self.incremental = incremental
        self.gpu = gpu
        self.gpu_tensor = gpu_tensor
        self.cpu_pool = ExtentAllocator(cpu_tensor.shape[0])
        self.cpu_tensor = cpu_tensor
        self.out_backend = backend
        self.in_backend = in_backend or backend
        self.block_size = gpu.block_size
        self.block_bytes = block_bytes
        self.outgoing: dict[Request, _Transfer] = {}
        self.incoming: dict[Request, _Transfer] = {}
        self._orphans: list[_Transfer] = []  # transfers of aborted requests, still in flight
        self.tier = cpu_tier  # finished requests' KV kept on the CPU (multi-turn reuse)
        self._writebacks: list[_Transfer] = []
        # Write-backs are background traffic: on their own stream (when set) so that a swap-out
        # (or, half duplex, a swap-in) someone waits for never queues behind them.
        self.writeback_backend = writeback_backend
        # Early landing: a swap-in (or CPU-tier fetch) lets its request run in the step it is
        # issued, the compute stream waiting for the copy on the device; the transfer stays in
        # ``incoming`` until the host sees it done, so its blocks keep their copy's protection.
        self.early_landing = early_landing
        self._ready_now: list[Request] = []
        self.cpu_resident: set[Request] = set()  # requests holding CPU blocks
        self.blocking_copy_s = 0.0  # time steps waited on copies (async_copies=False)
        self._timing = False
        self.stall_s = 0.0  # host time in swap_out/swap_in/poll/wait_incoming (see _stalls)

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
            self._reclaimable_cpu_blocks(exclude=req) + self._evictable_tier_blocks() + \
            self._writeback_cpu_blocks()

    def _writeback_cpu_blocks(self) -> int:
        """CPU blocks write-backs in flight hold: cached KV once they land, so evictable."""
        return sum(len(t.tier_entries) for t in self._writebacks)

    def _evictable_tier_blocks(self) -> int:
        return len(self.tier.evictable) if self.tier is not None else 0

    def _evict_tier(self, n: int) -> None:
        """Evict cached CPU-tier blocks until ``n`` CPU blocks are free (or none is left)."""
        while self.cpu_pool.num_free_blocks < n and self._evictable_tier_blocks():
            self.cpu_pool.free([self.tier.evict()])  # type: ignore[union-attr]

    def _droppable_copies(self, exclude: Request) -> list[Request]:
        # Stale-but-valid copies of requests that are on the GPU (and not being read by their
        # swap-in) can be dropped at any time.
        return [r for r in self.cpu_resident
                if r is not exclude and r.block_table and r not in self.incoming]

    def _reclaimable_cpu_blocks(self, exclude: Request) -> int:
        return sum(len(r.cpu_block_table) for r in self._droppable_copies(exclude))

    def _reserve_cpu(self, n: int, exclude: Request) -> None:
        self._evict_tier(n)  # cached KV first: it never takes room from a live request
        for r in self._droppable_copies(exclude):
            if self.cpu_pool.num_free_blocks >= n:
                return
            self.drop_cpu_copy(r)
        while self.cpu_pool.num_free_blocks < n and self._writebacks:
            # KV on its way to the cache holds the rest: wait for the oldest write-back (its
            # copy still writes those blocks), then evict what it cached
            self._wait_oldest(self._writebacks)
            self._evict_tier(n)

    def probe_link(self, max_bytes: int = 256 << 20) -> tuple[int, float]:
        """Time one extent copy GPU -> CPU through the real backend, at startup while every block
        of both pools is free (nothing is read back): (bytes, seconds). Not counted in the copy
        statistics."""
        if self.gpu.pool.num_free_blocks != self.gpu.num_blocks or self.cpu_pool.num_used_blocks:
            raise RuntimeError("probe_link runs only while both pools are empty")
        n = max(1, min(max_bytes // self.block_bytes, self.gpu.pool.num_free_blocks,
                       self.cpu_pool.num_free_blocks))
        backend = self.out_backend
        saved, backend.stats = backend.stats, CopyStats()
        try:
            backend.wait(backend.submit(self.gpu_tensor, self.cpu_tensor,
                                        [(0, 0, 1)], True))  # warm-up
            t0 = time.perf_counter()
            backend.wait(backend.submit(self.gpu_tensor, self.cpu_tensor, [(0, 0, n)], True))
            seconds = time.perf_counter() - t0
        finally:
            backend.stats = saved
        return n * self.block_bytes, seconds

    # ---- transfers --------------------------------------------------------------------------

    @_stalls
    def swap_out(self, req: Request) -> None:
        """Start copying ``req``'s KV to the CPU; its GPU blocks drain until the copy lands."""
        early = self.incoming.pop(req, None)
        if early is not None:  # an early-landed swap-in or fetch the host has not seen land:
            self._orphans.append(early)  # it unpins its CPU-tier blocks when it does
        total = self.gpu.blocks_needed(req.num_computed_tokens)
        need = self.cpu_blocks_needed(req)
        if need:
            self._reserve_cpu(need, exclude=req)
            last = req.cpu_block_table[-1] if req.cpu_block_table else None
            req.cpu_block_table.extend(self.cpu_pool.allocate(need, after=last))
        self.gpu.drop_reservation(req)  # unused tail of its group: nothing to copy
        first = self._first_dirty_block(req)
        extents = copy_extents(req.block_table[first:total], req.cpu_block_table[first:total])
        self.outgoing[req] = self._submit(self.gpu_tensor, self.cpu_tensor, extents,
                                          self.out_backend, gpu_blocks_to_free=req.block_table)
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
        blocks = self.gpu.allocate_blocks(total)  # one run where possible
        extents = copy_extents(req.cpu_block_table[:total], blocks)
        try:
            t = self._submit(self.cpu_tensor, self.gpu_tensor, extents, self.in_backend)
        except BaseException:
            # Never written: freed, not left in its block table, where freeing the request
            # would have cached them under its tokens (a later prompt read garbage).
            self.gpu.release_blocks(blocks)
            raise
        req.block_table = blocks
        req.num_computed_tokens = req.num_cpu_tokens
        self._incoming(req, t)

    @_stalls
    def fetch_cached(self, req: Request, cpu_blocks: list[int]) -> None:
        """Start copying CPU-tier blocks that continue ``req``'s prefix into new GPU blocks; the
        request joins like a swap-in once ``poll`` reports it, with those tokens computed."""
        last = req.block_table[-1] if req.block_table else None
        blocks = self.gpu.allocate_blocks(len(cpu_blocks), after=last)
        for b in cpu_blocks:  # read by the fetch: not evictable until it lands
            self.tier.take(b)  # type: ignore[union-attr]
        try:
            t = self._submit(self.cpu_tensor, self.gpu_tensor, copy_extents(cpu_blocks, blocks),
                             self.in_backend, cpu_blocks_to_unpin=list(cpu_blocks))
        except BaseException:  # nothing landed: both ends go back (they leaked)
            self._unpin(cpu_blocks)
            self.gpu.release_blocks(blocks)
            raise
        req.block_table.extend(blocks)
        req.num_computed_tokens = len(req.block_table) * self.block_size
        self._incoming(req, t)

    def _unpin(self, cpu_blocks: list[int]) -> None:
        # Indexed, released blocks stay in the tier (evictable); those the tier forgot while
        # they were read (reset_tier) go back to the pool.
        freed = [b for b in reversed(cpu_blocks) if self.tier.release(b)]  # type: ignore[union-attr]
        self.cpu_pool.free(freed[::-1])

    def reset_tier(self) -> int:
        """Forget the CPU tier's cached prefixes (``ReuseTier.clear``; write-backs still in
        flight free their blocks when they land, instead of indexing them); the blocks freed
        now."""
        if self.tier is None:
            return 0
        for t in self._writebacks:  # (they land forgotten: their blocks go back to the pool)
            t.stale = True
        freed = self.tier.clear()
        self.cpu_pool.free(freed)
        return len(freed)

    def _incoming(self, req: Request, t: _Transfer) -> None:
        self.incoming[req] = t
        if self.early_landing and not t.backend.done(t.handle):
            t.backend.order_compute_after(t.handle)
            t.landed_early = True
            self._ready_now.append(req)

    @property
    def num_pending_in(self) -> int:
        """Requests a swap-in (or fetch) brings back that the scheduler has not seated yet:
        those waiting for their copy, and early-landed ones until ``poll`` hands them over
        (they hold a seat from their swap-in on)."""
        return sum(not t.landed_early for t in self.incoming.values()) + len(self._ready_now)

    def _cache_cpu_copy(self, req: Request) -> None:
        """A finished request's swap copy (a stale-but-valid one, kept since its swap-in) holds
        full blocks of its KV already: they go to the CPU tier as they are, not copied again
        from the GPU by the write-back. Last block first, so that the head is evicted last."""
        tier, bs = self.tier, self.block_size
        hashes = block_hashes(req.token_ids, req.num_cpu_tokens, bs, req.block_hashes,
                              req.cache_salt)
        kept = {i for i in reversed(range(len(hashes)))
                if tier.add(hashes[i], tuple(req.token_ids[i * bs:(i + 1) * bs]),  # type: ignore[union-attr]
                            req.cpu_block_table[i])}
        if kept:
            req.cpu_block_table = [c for i, c in enumerate(req.cpu_block_table) if i not in kept]

    def _write_back(self, req: Request) -> None:
        """Copy a finished request's full blocks that the CPU tier lacks to free CPU blocks.

        Its GPU blocks stay referenced until the copy lands (they may be evicted from the GPU
        cache right after the request is gone); only free or cached CPU blocks are used.
        """
        tier, bs = self.tier, self.block_size
        hashes = block_hashes(req.token_ids, req.num_computed_tokens, bs, req.block_hashes,
                              req.cache_salt)
        missing = [i for i, h in enumerate(hashes) if h not in tier]  # type: ignore[operator]
        room = self.cpu_pool.num_free_blocks + self._evictable_tier_blocks()
        missing = missing[:room]
        if not missing:
            return
        self._evict_tier(len(missing))
        gpu_blocks = [req.block_table[i] for i in missing]
        cpu_blocks = self.cpu_pool.allocate(len(missing))
        for b in gpu_blocks:
            self.gpu.prefix_cache.take(b)  # type: ignore[union-attr]
        entries = [(hashes[i], tuple(req.token_ids[i * bs:(i + 1) * bs]), c)
                   for i, c in zip(missing, cpu_blocks)]
        pieces = split_extents(copy_extents(gpu_blocks, cpu_blocks),
                               max(1, BACKGROUND_PIECE_BYTES // self.block_bytes))
        t = self._submit(self.gpu_tensor, self.cpu_tensor, pieces, self._bg_backend,
                         gpu_blocks_to_free=gpu_blocks, tier_entries=entries)
        if not self._land_write_back(t):  # a synchronous copy has landed already
            self._writebacks.append(t)

    @property
    def _bg_backend(self) -> CopyBackend:
        return self.writeback_backend or self.out_backend

    def set_backends(self, out: CopyBackend, in_: CopyBackend,
                     writeback: CopyBackend | None) -> None:
        """Replace the copy streams (tests: slow links), with no copy in flight."""
        assert not self.has_in_flight()
        self.out_backend, self.in_backend, self.writeback_backend = out, in_, writeback

    def copy_stats(self) -> list[CopyStats]:
        """One per stream."""
        streams = {id(b): b for b in (self.out_backend, self.in_backend, self.writeback_backend)
                   if b is not None}
        return [b.stats for b in streams.values()]

    def _submit(self, src: torch.Tensor, dst: torch.Tensor, extents: list[tuple[int, int, int]],
                backend: CopyBackend, **holds: Any) -> _Transfer:
        """Copy on ``backend``'s stream; ``holds``: the blocks the transfer holds until it
        lands (``_Transfer`` fields)."""
        handle = backend.submit(src, dst, extents, src is self.gpu_tensor)
        if not self.async_copies:  # the baseline: the step stalls until the bytes have moved
            t0 = time.perf_counter()
            backend.wait(handle)
            self.blocking_copy_s += time.perf_counter() - t0
        return _Transfer(handle, backend, **holds)

    @_stalls
    def poll(self) -> list[Request]:
        """Retire finished copies; return the requests whose swap-in has landed."""
        self._release_outgoing()
        ready, self._ready_now = self._ready_now, []
        for req, t in list(self.incoming.items()):
            if not t.backend.done(t.handle):
                continue
            del self.incoming[req]
            if t.cpu_blocks_to_unpin:
                self._unpin(t.cpu_blocks_to_unpin)
            # vLLM 0.3.3 frees the CPU copy on swap-in; not if the request left the GPU again
            # meanwhile (an early landing, then a swap-out): it is its only copy then
            if not self.incremental and req.block_table and req not in self.outgoing:
                self.drop_cpu_copy(req)
            if not t.landed_early:
                ready.append(req)
        return ready

    def _release_outgoing(self) -> None:
        """Free the GPU blocks of finished swap-outs, aborted transfers and write-backs."""
        for req, t in list(self.outgoing.items()):
            if t.backend.done(t.handle):
                self.gpu.release_blocks(t.gpu_blocks_to_free)
                del self.outgoing[req]
        self._orphans = [t for t in self._orphans if not self._retire_orphan(t)]
        self._writebacks = [t for t in self._writebacks if not self._land_write_back(t)]

    @_stalls
    def reclaim_in_flight(self) -> bool:
        """Free the GPU blocks of copies that have landed, or else wait for the oldest copy that
        holds GPU blocks (a swap-out, an aborted transfer or a write-back) and free its blocks;
        False if no copy holds any. The scheduler calls this, once per missing allocation,
        before it preempts for memory: a few milliseconds of copy beat another victim's round
        trip, and waiting for one copy at a time (not all of them) keeps the step's stall to
        what the allocation needs."""
        before = self.gpu.num_free_blocks
        self._release_outgoing()
        if self.gpu.num_free_blocks > before:
            return True
        holders = [t for t in (*self.outgoing.values(), *self._orphans, *self._writebacks)
                   if t.gpu_blocks_to_free]
        if not holders:
            return False
        self._wait_oldest(holders)
        return True

    def _wait_oldest(self, transfers: list[_Transfer]) -> None:
        """Block until the oldest of ``transfers`` lands, then retire every landed copy."""
        oldest = min(transfers, key=lambda t: t.order)
        t0 = time.perf_counter()
        oldest.backend.wait(oldest.handle)
        self.blocking_copy_s += time.perf_counter() - t0
        self._release_outgoing()

    def _land_write_back(self, t: _Transfer) -> bool:
        if not t.backend.done(t.handle):
            return False
        self.gpu.release_blocks(t.gpu_blocks_to_free)
        for h, tokens, block in reversed(t.tier_entries):  # evicted last: the prefix's head
            # (a stale one's blocks are freed; another request's write-back may have got there
            # first)
            if t.stale or not self.tier.add(h, tokens, block):  # type: ignore[union-attr]
                self.cpu_pool.free([block])
        return True

    @_stalls
    def wait_incoming(self) -> list[Request]:
        """Block until every swap-in has landed (only when the GPU has nothing else to run)."""
        for t in self.incoming.values():
            if not t.landed_early:
                t.backend.wait(t.handle)
        return self.poll()

    def _retire_orphan(self, t: _Transfer) -> bool:
        if not t.backend.done(t.handle):
            return False
        self.gpu.release_blocks(t.gpu_blocks_to_free)
        self.cpu_pool.free(t.cpu_blocks_to_free)
        if t.cpu_blocks_to_unpin:
            self._unpin(t.cpu_blocks_to_unpin)
        return True

    # ---- releasing ----------------------------------------------------------------------------

    def drop_cpu_copy(self, req: Request) -> None:
        if req.cpu_block_table:
            self.cpu_pool.free(req.cpu_block_table)
        req.cpu_block_table = []
        req.num_cpu_tokens = 0
        self.cpu_resident.discard(req)

    def drop_gpu(self, req: Request) -> None:
        """Recompute preemption: free the request's GPU blocks, after a swap-in still writing
        them (an early-landed one) has landed."""
        t = self.incoming.pop(req, None)
        if t is None:
            self.gpu.free(req)
            return
        self._orphan(req, t)

    @_stalls
    def release(self, req: Request) -> None:
        """The request is finished or aborted: free everything, after any copy in flight lands."""
        t = self.outgoing.pop(req, None) or self.incoming.pop(req, None)
        if t is None:
            if self.tier is not None and req.block_table:
                self._cache_cpu_copy(req)
                self._write_back(req)
            self.gpu.free(req)
            self.drop_cpu_copy(req)
            return
        self._orphan(req, t)

    def _orphan(self, req: Request, t: _Transfer) -> None:
        """The copy still reads or writes the request's blocks: hand them all to the transfer,
        freed when it lands; the unused tail of its group goes back now (as in ``gpu.free``)."""
        self.gpu.drop_reservation(req)
        req.grouped = False
        t.gpu_blocks_to_free += req.block_table
        t.cpu_blocks_to_free += req.cpu_block_table
        req.block_table, req.cpu_block_table, req.num_cpu_tokens = [], [], 0
        self.cpu_resident.discard(req)
        self._orphans.append(t)

    def has_in_flight(self) -> bool:
        return bool(self.outgoing or self.incoming or self._orphans or self._writebacks)

    def gpu_blocks_in_flight(self) -> list[int]:
        """GPU blocks held by copies (draining swap-outs, aborted requests' transfers,
        write-backs to the CPU tier)."""
        return [b for t in [*self.outgoing.values(), *self._orphans, *self._writebacks]
                for b in t.gpu_blocks_to_free]

    def num_gpu_blocks_in_flight(self) -> int:
        """How many GPU blocks copies hold (``gpu_blocks_in_flight`` without building the list:
        the scheduler asks every step)."""
        return sum(len(t.gpu_blocks_to_free)
                   for t in (*self.outgoing.values(), *self._orphans, *self._writebacks))

    def fetches_in_flight(self) -> list[list[int]]:
        """The CPU-tier blocks each fetch in flight reads (they are referenced until it lands)."""
        return [t.cpu_blocks_to_unpin for t in (*self.incoming.values(), *self._orphans)]

    def num_cpu_blocks_in_flight(self) -> int:
        """CPU blocks owned by copies: aborted requests' and write-backs not yet in the tier."""
        return sum(len(t.cpu_blocks_to_free) for t in self._orphans) + sum(
            len(t.tier_entries) for t in self._writebacks)
