"""Per-request block tables on top of the block pool: the scheduler's only view of KV memory.

With prefix caching, blocks are reference counted: a block may sit in several block tables (a
shared prefix) and unreferenced blocks with known content stay cached until evicted. Free
capacity is therefore ``pool free + evictable cached``.
"""

from __future__ import annotations

from fairswitch.kv.block_pool import BlockPool
from fairswitch.kv.prefix_cache import PrefixCache
from fairswitch.request import Request


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False
                 ) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.prefix_cache = PrefixCache(self.pool, block_size) if enable_prefix_caching else None

    @property
    def num_free_blocks(self) -> int:
        evictable = len(self.prefix_cache.evictable) if self.prefix_cache else 0
        return self.pool.num_free_blocks + evictable

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, request: Request, num_new_tokens: int) -> int:
        total = request.num_computed_tokens + num_new_tokens
        return max(0, self.blocks_needed(total) - len(request.block_table))

    def allocate_blocks(self, n: int) -> list[int]:
        """n blocks for one owner; evicts cached blocks (LRU) only when the pool runs dry."""
        pc = self.prefix_cache
        if pc is None:
            return self.pool.allocate(n)
        take = min(n, self.pool.num_free_blocks)
        blocks = self.pool.allocate(take)
        while len(blocks) < n:
            blocks.append(pc.evict())
        for b in blocks:
            pc.take(b)
        return blocks

    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Grow the request's block table to hold ``num_new_tokens`` more; False if out of blocks."""
        n = self.num_new_blocks(request, num_new_tokens)
        if n > self.num_free_blocks:
            return False
        if n:
            request.block_table.extend(self.allocate_blocks(n))
        return True

    def release_blocks(self, blocks: list[int]) -> None:
        pc = self.prefix_cache
        if pc is None:
            self.pool.free(blocks)
            return
        self.pool.free([b for b in blocks if pc.release(b)])

    def free(self, request: Request) -> None:
        """Drop the request's blocks; with prefix caching its computed full blocks stay cached."""
        if not request.block_table:
            return
        if self.prefix_cache is not None:
            self.prefix_cache.register(request.token_ids, request.num_computed_tokens,
                                       request.block_table)
        self.release_blocks(request.block_table)
        request.block_table = []

    def attach_cached_prefix(self, request: Request) -> int:
        """Share cached blocks holding a prefix of a new request's tokens; return tokens reused.

        At least the last token is left to compute: its logits are what the request samples.
        """
        pc = self.prefix_cache
        if pc is None or request.num_computed_tokens or request.block_table:
            return 0
        hits = pc.match(request.token_ids, request.num_tokens - 1)
        for b in hits:
            pc.take(b)
        request.block_table = hits
        request.num_computed_tokens = len(hits) * self.block_size
        return request.num_computed_tokens

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.pool.num_blocks
