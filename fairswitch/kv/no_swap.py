"""The swap space when there is none (``swap_space=0``): every preemption recomputes.

It answers the scheduler's questions the way an empty, never-used swap space would (nothing in
flight, no room to swap out or in) and frees GPU blocks where a swap space would also drop a
CPU copy, so the scheduler has one code path with or without swapping.
"""

from __future__ import annotations

from fairswitch.kv.cache_manager import KVCacheManager
from fairswitch.request import Request


class NoSwapSpace:
    tier = None  # no CPU reuse tier
    cpu_pool = None  # no CPU blocks
    cpu_tensor = None
    stall_s = 0.0
    blocking_copy_s = 0.0
    num_pending_in = 0

    def __init__(self, gpu: KVCacheManager) -> None:
        self.gpu = gpu

    def poll(self) -> list[Request]:
        return []

    def wait_incoming(self) -> list[Request]:
        return []

    def has_in_flight(self) -> bool:
        return False

    def reclaim_in_flight(self) -> bool:
        return False

    def gpu_blocks_in_flight(self) -> list[int]:
        return []

    def num_gpu_blocks_in_flight(self) -> int:
        return 0

    def num_cpu_blocks_in_flight(self) -> int:
        return 0

    def can_swap_out(self, req: Request) -> bool:
        return False

    def can_swap_in(self, req: Request) -> bool:
        return False

    def drop_gpu(self, req: Request) -> None:
        self.gpu.free(req)

    def drop_cpu_copy(self, req: Request) -> None:
        """Nothing to drop: no request ever holds CPU blocks."""

    def release(self, req: Request) -> None:
        self.gpu.free(req)

    def copy_stats(self) -> list:
        return []
