"""Per-request block tables on top of the block pool: the scheduler's only view of KV memory."""

from __future__ import annotations

from fairswitch.kv.block_pool import BlockPool
from fairswitch.request import Request


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, request: Request, num_new_tokens: int) -> int:
        total = request.num_computed_tokens + num_new_tokens
        return max(0, self.blocks_needed(total) - len(request.block_table))

    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Grow the request's block table to hold ``num_new_tokens`` more; False if out of blocks."""
        n = self.num_new_blocks(request, num_new_tokens)
        if n > self.pool.num_free_blocks:
            return False
        if n:
            request.block_table.extend(self.pool.allocate(n))
        return True

    def free(self, request: Request) -> None:
        if request.block_table:
            self.pool.free(request.block_table)
            request.block_table = []

    def usage(self) -> float:
        return self.pool.num_used_blocks / self.pool.num_blocks
