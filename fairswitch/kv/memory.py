"""The one owner of KV memory: the GPU pool, its block manager, the swap space and the reuse tiers.

    KVMemory
    ├── cache    KVCache          the GPU tensor (kv_cache.py), sized by ``num_gpu_blocks``
    ├── blocks   KVCacheManager   block tables, block groups, the GPU reuse tier (cache_manager.py)
    └── swap     SwapManager      CPU blocks, copies, the CPU reuse tier (swap_manager.py),
                 | NoSwapSpace    or, with no swap space, the null one (no_swap.py)

Everything is sized from one ``KVLayout`` (a block's bytes are computed once, there). The runner
only binds ``cache``; the scheduler allocates through ``blocks`` and switches through ``swap``;
``check`` verifies that every block of both pools has exactly one owner, and ``metrics`` reports
the switch and reuse counters.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import torch

from fairswitch.config import CacheConfig
from fairswitch.distributed.copy_mirror import MirroredCopyBackend
from fairswitch.kv.cache_manager import KVCacheManager
from fairswitch.kv.copy_backend import CopyStats, make_copy_backend
from fairswitch.kv.extents import num_extents
from fairswitch.kv.host_memory import pinned_empty
from fairswitch.kv.kv_cache import KVCache, KVLayout
from fairswitch.kv.no_swap import NoSwapSpace
from fairswitch.kv.reuse_index import ReuseTier
from fairswitch.kv.swap_manager import SwapManager
from fairswitch.request import Request

logger = logging.getLogger(__name__)

_GiB = 1 << 30


def num_gpu_blocks(cache: CacheConfig, layout: KVLayout, max_num_seqs: int, max_model_len: int,
                   profile: Callable[[], float] | None) -> int:
    """How many blocks the GPU pool gets: ``num_gpu_blocks`` if set; else ``kv_cache_memory_gib``
    (1 GiB off CUDA), capped at what every running request at full length could use; else the
    bytes ``profile`` (the runner's profiling step on CUDA) finds left on the device."""
    if cache.num_gpu_blocks is not None:
        n = cache.num_gpu_blocks
    elif cache.kv_cache_memory_gib is not None or profile is None:
        cap = max_num_seqs * -(-max_model_len // layout.block_size)
        n = max(1, min(layout.blocks_in((cache.kv_cache_memory_gib or 1.0) * _GiB), cap))
    else:
        n = layout.blocks_in(profile())
        if n < 1:
            raise RuntimeError("no GPU memory left for one KV block: lower the batch "
                               "(--max-num-batched-tokens) or raise --gpu-memory-utilization")
    if n * layout.block_size < max_model_len:
        raise ValueError(
            f"the KV cache holds {n} blocks x {layout.block_size} tokens = "
            f"{n * layout.block_size} tokens, less than max_model_len={max_model_len}; "
            "give it more memory or lower --max-model-len")
    return n


HOST_SHARE = 0.9  # of the host's memory the swap space may take (the rest: the process, the OS)


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _check_host_room(nbytes: int, what: str, remedy: str) -> None:
    """ValueError before allocating ``nbytes`` of host memory past ``HOST_SHARE`` of it (the
    allocator's own error would come as a traceback, or the OS would kill the process)."""
    host = host_memory_bytes()
    if nbytes > HOST_SHARE * host:
        raise ValueError(f"{what} ({nbytes / _GiB:.1f} GiB) is more than {HOST_SHARE:.0%} of "
                         f"this host's {host / _GiB:.1f} GiB of memory: {remedy}")


class KVMemory:
    def __init__(self, cache: CacheConfig, layout: KVLayout, num_blocks: int,
                 device: torch.device, max_model_len: int,
                 copy_log: list[tuple] | None = None, ranks_on_host: int = 1) -> None:
        """``copy_log``: on a tensor-parallel driver, where the swap copies are logged for the
        other ranks to replay (distributed/copy_mirror.py). ``ranks_on_host``: the ranks of this
        host allocating the same (their host memory is bounded together)."""
        self.layout = layout
        self._copy_log = copy_log
        self.block_size = layout.block_size
        self._ranks = ranks_on_host
        # On a CPU the "device" cache is host memory too: the swap space's bound covers both.
        self._host_bytes = num_blocks * layout.block_bytes if device.type == "cpu" else 0
        _check_host_room(self._host_bytes * self._ranks, self._per_rank(
            f"a KV cache of {num_blocks} blocks"), "lower --num-gpu-blocks or --kv-cache-memory-gib")
        self.cache = KVCache(layout, num_blocks, device)
        self.blocks = KVCacheManager(num_blocks, layout.block_size, cache.enable_prefix_caching,
                                     cache.block_groups, max_model_len)
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB)", num_blocks, layout.block_size,
                    num_blocks * layout.block_bytes / _GiB)
        self.copy_backends: dict[int, Any] = {}  # the swap space's, by stream
        self.swap: SwapManager | NoSwapSpace = self._swap_space(cache, device)
        # (bytes, seconds) of one copy through the swap backend, timed at start-up: the
        # scheduler's swap-or-recompute cost model starts from this machine's link.
        self.link_probe = (self.swap.probe_link() if isinstance(self.swap, SwapManager)
                           else None)
        if copy_log is not None:  # the probe's copies (landed) are this rank's measurement:
            copy_log.clear()      # the other ranks have nothing to replay

    @property
    def num_blocks(self) -> int:
        return self.cache.num_blocks

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix, on the GPU and in the CPU tier (write-backs still in
        flight included), so that no request after this reuses KV computed before it. Blocks
        requests or fetches still hold are forgotten, not taken: their release frees them.
        Returns the blocks freed now."""
        freed = self.blocks.reset_prefix_cache()
        if isinstance(self.swap, SwapManager):
            freed += self.swap.reset_tier()
        return freed

    def _per_rank(self, what: str) -> str:
        return what if self._ranks == 1 else f"{what} on each of this host's {self._ranks} ranks"

    def _swap_space(self, cc: CacheConfig, device: torch.device) -> SwapManager | NoSwapSpace:
        num_cpu_blocks = self.layout.blocks_in(cc.swap_space * _GiB)
        if num_cpu_blocks == 0:
            if cc.swap_space > 0:  # asked for, and less than a block: it would go unnoticed
                logger.warning("swap_space %g GiB holds no KV block (one is %d bytes): there is "
                               "no swap space, every preempted request is recomputed and the "
                               "CPU reuse tier is off", cc.swap_space, self.layout.block_bytes)
            return NoSwapSpace(self.blocks)
        also = " beside the KV cache" if self._host_bytes else ""
        _check_host_room((self._host_bytes + num_cpu_blocks * self.layout.block_bytes)
                         * self._ranks, self._per_rank(f"swap_space {cc.swap_space:g} GiB{also}"),
                         "lower --swap-space")
        on_cuda = device.type == "cuda"
        shape, dtype = self.layout.shape(num_cpu_blocks), self.layout.dtype
        # Pinned on CUDA so copies are DMA; elsewhere never read before written: uninitialized.
        t0 = time.perf_counter()
        cpu_tensor = pinned_empty(shape, dtype) if on_cuda else torch.empty(shape, dtype=dtype)
        logger.info("swap space: %.1f GiB in %.1fs", num_cpu_blocks * self.layout.block_bytes
                    / _GiB, time.perf_counter() - t0)
        tier = ReuseTier(self.layout.block_size) if cc.cpu_kv_reuse_on else None
        def stream() -> Any:
            return make_copy_backend(cc.swap_copy_backend, device, cc.per_layer_swap)

        # Streams: swap-outs (0), write-backs (1), swap-ins and fetches (2; with 0 when not
        # full duplex). On the CPU every copy is synchronous: the streams only keep the books.
        out = stream()
        writeback = stream() if tier is not None else None
        in_ = stream() if cc.duplex_swap else None
        self.copy_backends = {0: out, 1: writeback or out, 2: in_ or out}  # copy_mirror.py
        if self._copy_log is not None:
            out, writeback, in_ = (MirroredCopyBackend(b, k, self._copy_log) if b is not None
                                   else None for k, b in enumerate((out, writeback, in_)))
        return SwapManager(self.blocks, self.cache.tensor, cpu_tensor, out,
                           block_bytes=self.layout.block_bytes, async_copies=cc.async_swap,
                           incremental=cc.incremental_swap, cpu_tier=tier,
                           early_landing=cc.early_swap_in and cc.async_swap,
                           writeback_backend=writeback, in_backend=in_)

    # ---- accounting -----------------------------------------------------------------------

    def check(self, requests: Iterable[Request]) -> None:
        """Raise if KV blocks leaked: every block of both pools is free or held, once, by a live
        request (``requests``: all of them), a copy in flight, a reservation or a reuse tier."""
        requests = list(requests)
        kv, swap = self.blocks, self.swap
        kv.pool.check()
        refs = Counter(b for r in requests for b in r.block_table)
        refs.update(b for tail in kv.reserved.values() for b in tail)
        gpu_in_flight = swap.gpu_blocks_in_flight()
        if swap.num_gpu_blocks_in_flight() != len(gpu_in_flight):
            raise AssertionError("copies' GPU block count disagrees with their blocks")
        refs.update(gpu_in_flight)
        pc = kv.prefix_cache
        if pc is not None:
            wrong = [b for b in range(kv.num_blocks) if pc.refs.get(b, 0) != refs.get(b, 0)]
            if wrong:
                raise AssertionError(f"reference counts off for blocks {wrong[:8]}")
            held = len(refs) + len(pc.evictable)
        else:
            if any(n > 1 for n in refs.values()):
                raise AssertionError("a block is in two block tables without prefix caching")
            held = len(refs)
        if kv.num_reserved_blocks != sum(map(len, kv.reserved.values())):
            raise AssertionError("reserved block count out of step with the reservations")
        if held != kv.pool.num_used_blocks:
            raise AssertionError(f"{kv.pool.num_used_blocks} GPU blocks in use but requests, "
                                 f"copies and the prefix cache hold {held}")
        owned = sum(len(r.cpu_block_table) for r in requests)
        cpu = swap.cpu_pool
        if cpu is None:
            if owned:
                raise AssertionError(f"requests own {owned} CPU blocks without a swap space")
            return
        cpu.check()
        if swap.tier is not None:  # a CPU-tier block is read by the fetches in flight only
            fetching = Counter(b for t in swap.fetches_in_flight() for b in t)
            if fetching != Counter(swap.tier.refs):
                raise AssertionError(f"CPU-tier references {dict(swap.tier.refs)} but fetches "
                                     f"in flight read {dict(fetching)}")
        in_flight = swap.num_cpu_blocks_in_flight()
        tier = swap.tier.num_held_blocks if swap.tier is not None else 0
        if owned + in_flight + tier != cpu.num_used_blocks:
            raise AssertionError(f"{cpu.num_used_blocks} CPU blocks in use but live requests "
                                 f"own {owned}, copies hold {in_flight}, the tier {tier}")

    def metrics(self, running: list[Request]) -> dict[str, float]:
        """Copy, reuse and layout counters (cumulative since start); ``running``: the batch."""
        swap, pc = self.swap, self.blocks.prefix_cache
        stats = CopyStats.total(swap.copy_stats())
        cpu_pool = swap.cpu_pool
        num_cpu_blocks = cpu_pool.num_blocks if cpu_pool else 1
        tier_blocks = swap.tier.num_blocks if swap.tier else 0
        # CPU blocks that live requests own (as ``check`` counts them): neither the reuse tier
        # nor blocks held by copies (aborted requests', write-backs on their way to the tier).
        tier_held = swap.tier.num_held_blocks if swap.tier else 0
        live_cpu_blocks = (cpu_pool.num_used_blocks - tier_held - swap.num_cpu_blocks_in_flight()
                           if cpu_pool else 0)
        running = [r for r in running if r.block_table]
        return {
            "swap_bytes_out": stats.bytes_out,
            "swap_bytes_in": stats.bytes_in,
            "swap_copies": stats.num_copies,
            "swap_bytes_per_copy": stats.bytes_per_copy,
            # Device time per direction (CUDA): copying, and ready but queued behind earlier
            # copies of the same stream (a swap-in behind a swap-out when not full duplex).
            "swap_busy_s_out": stats.busy_s_out,
            "swap_busy_s_in": stats.busy_s_in,
            "swap_queued_s_out": stats.queued_s_out,
            "swap_queued_s_in": stats.queued_s_in,
            # GPU idle for switches: all host time in the swap manager (the step is synchronous);
            # of which blocked waiting on copies (sync baseline copies, swap-ins with nothing
            # else to run).
            "switch_stall_s": swap.stall_s,
            # Usage: live requests' KV (on the GPU: copies in flight too); reuse: KV kept for
            # later requests that no live request holds, evicted when the pool needs room.
            "gpu_kv_usage": self.blocks.usage(),
            "cpu_kv_usage": live_cpu_blocks / num_cpu_blocks,
            "gpu_kv_reuse": len(pc.evictable) / self.num_blocks if pc else 0.0,
            "cpu_kv_reuse": tier_blocks / num_cpu_blocks,
            "reuse_hit_blocks": pc.num_hit_blocks if pc else 0,
            "reuse_queried_blocks": pc.num_queried_blocks if pc else 0,
            "cpu_tier_blocks": tier_blocks,
            "extents_per_request": sum(num_extents(r.block_table) for r in running) / len(running)
            if running else 0.0,
            "kv_utilization": sum(r.num_computed_tokens for r in running) / (
                sum(len(r.block_table) for r in running) * self.block_size) if running else 1.0,
        }
