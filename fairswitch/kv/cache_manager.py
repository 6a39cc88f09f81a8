"""Per-request block tables on top of the block pool: the scheduler's only view of KV memory.

Block groups (block_groups.py): a request's first allocation reserves a run of consecutive blocks
sized to its expected length (prompt + max_tokens); it grows into that run, then in place after
its last block. Unused reserved blocks are reclaimed (most recent reservation first) the moment
anyone needs them, so contiguity never costs capacity.

With prefix caching, blocks are reference counted: a block may sit in several block tables (a
shared prefix) and unreferenced blocks with known content stay cached until evicted.

Free capacity = free blocks + unused reservations + evictable cached blocks.
"""

from __future__ import annotations

from fairswitch.kv.block_groups import ExtentAllocator
from fairswitch.kv.block_pool import BlockPool
from fairswitch.kv.reuse_index import ReuseTier
from fairswitch.request import Request, RequestStatus


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False,
                 block_groups: bool = False, max_model_len: int | None = None) -> None:
        self.block_size = block_size
        self.pool: BlockPool | ExtentAllocator = (ExtentAllocator(num_blocks) if block_groups
                                                  else BlockPool(num_blocks))
        self.block_groups = block_groups
        self.max_model_len = max_model_len
        # The GPU tier of multi-turn reuse (reuse_index.py)
        self.prefix_cache = ReuseTier(block_size) if enable_prefix_caching else None
        self.reserved: dict[Request, list[int]] = {}  # unused tails of groups, oldest first
        self.num_reserved_blocks = 0

    @property
    def num_free_blocks(self) -> int:
        evictable = len(self.prefix_cache.evictable) if self.prefix_cache else 0
        return self.pool.num_free_blocks + evictable + self.num_reserved_blocks

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, request: Request, num_new_tokens: int) -> int:
        total = request.num_computed_tokens + num_new_tokens
        return max(0, self.blocks_needed(total) - len(request.block_table))

    def allocate_blocks(self, n: int, after: int | None = None) -> list[int]:
        """n blocks for one owner, consecutive where possible (after ``after`` if given).

        Takes free blocks, then reclaims others' unused reservations, then evicts cached blocks
        (least recently used): the caller must have checked ``num_free_blocks``.
        """
        while self.pool.num_free_blocks < n and self.reserved:
            self._reclaim(next(reversed(self.reserved)))
        pc = self.prefix_cache
        blocks = self.pool.allocate(min(n, self.pool.num_free_blocks), after)
        while len(blocks) < n:
            blocks.append(pc.evict())  # type: ignore[union-attr]
        if pc is not None:
            for b in blocks:
                pc.take(b)
        return blocks

    def _reclaim(self, request: Request) -> None:
        tail = self.reserved.pop(request)
        self.num_reserved_blocks -= len(tail)
        self.release_blocks(tail)

    def _expected_blocks(self, request: Request, n: int) -> int:
        if not self.block_groups:
            return n
        limit = request.num_prompt_tokens + request.sampling_params.max_tokens
        if self.max_model_len is not None:
            limit = min(limit, self.max_model_len)
        return max(n, self.blocks_needed(limit) - len(request.block_table))

    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Grow the request's block table to hold ``num_new_tokens`` more; False if out of blocks."""
        n = self.num_new_blocks(request, num_new_tokens)
        if n == 0:
            return True
        tail = self.reserved.get(request)
        if tail:
            take = tail[:n]
            del tail[:n]
            self.num_reserved_blocks -= len(take)
            if not tail:
                del self.reserved[request]
            request.block_table.extend(take)
            n -= len(take)
            if n == 0:
                return True
        if n > self.num_free_blocks:
            return False
        if self.block_groups and request not in self.reserved and not request.grouped:
            # First own allocation: reserve the whole expected group, keep the unused tail. The
            # tail is speculative: it takes free blocks only, never a cached block (the next turn
            # of a conversation would lose its KV) or another request's reservation.
            request.grouped = True
            want = min(self._expected_blocks(request, n), self.pool.num_free_blocks)
            blocks = self.allocate_blocks(max(want, n))
            request.block_table.extend(blocks[:n])
            if len(blocks) > n:
                self.reserved[request] = blocks[n:]
                self.num_reserved_blocks += len(blocks) - n
            return True
        last = request.block_table[-1] if request.block_table else None
        request.block_table.extend(self.allocate_blocks(n, after=last))
        return True

    def drop_reservation(self, request: Request) -> None:
        if request in self.reserved:
            self._reclaim(request)

    def reset_prefix_cache(self) -> int:
        """Forget the GPU tier's cached prefixes (``ReuseTier.clear``); the blocks freed now."""
        if self.prefix_cache is None:
            return 0
        freed = self.prefix_cache.clear()
        self.pool.free(freed)
        return len(freed)

    def release_blocks(self, blocks: list[int]) -> None:
        """Give back blocks in prefix order. The cache releases them last one first, so that
        cached ones are evicted from the end of a prefix, never its head first: a lookup stops at
        the first missing block, and the rest of the prefix would stay cached for nothing."""
        pc = self.prefix_cache
        if pc is None:
            self.pool.free(blocks)
            return
        freed = [b for b in reversed(blocks) if pc.release(b)]
        self.pool.free(freed[::-1])  # in prefix order: the pool keeps runs together

    def free(self, request: Request) -> None:
        """Drop the request's blocks; with prefix caching its computed full blocks stay cached."""
        self.drop_reservation(request)
        request.grouped = False
        if not request.block_table:
            return
        if self.prefix_cache is not None:
            self.prefix_cache.register(request.token_ids, request.num_computed_tokens,
                                       request.block_table, request.block_hashes,
                                       request.cache_salt)
        self.release_blocks(request.block_table)
        request.block_table = []

    def cache_prompt(self, request: Request) -> None:
        """Index the full blocks of a request's computed prompt while it runs (its KV never
        changes), so that a request with the same prompt arriving now shares them: the
        ``n`` copies of one request, a system prompt many clients send."""
        resident = request.status == RequestStatus.RUNNING and request.block_table
        if self.prefix_cache is not None and resident and request.num_computed_tokens >= \
                request.num_prompt_tokens:  # (not meanwhile preempted, nor coming back)
            self.prefix_cache.register(request.token_ids, request.num_prompt_tokens,
                                       request.block_table, request.block_hashes,
                                       request.cache_salt)

    def attach_cached_prefix(self, request: Request) -> int:
        """Share cached blocks holding a prefix of a new request's tokens; return tokens reused.

        At least the last token is left to compute: its logits are what the request samples.
        """
        pc = self.prefix_cache
        if pc is None or request.num_computed_tokens or request.block_table:
            return 0
        hits = pc.match(request.token_ids, request.num_tokens - 1, request.block_hashes,
                        salt=request.cache_salt)
        for b in hits:
            pc.take(b)
        request.block_table = hits
        request.num_computed_tokens = len(hits) * self.block_size
        return request.num_computed_tokens

    def count_lookup(self, request: Request, reused: int) -> None:
        """The prefix cache's block hit rate counts a request's lookup once, at its first
        admission (``reused`` tokens found), as the scheduler's reuse counters do: not each
        step it waits for room, nor a readmission that finds its own blocks."""
        pc = self.prefix_cache
        if pc is not None:
            pc.num_queried_blocks += (request.num_tokens - 1) // self.block_size
            pc.num_hit_blocks += reused // self.block_size

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.pool.num_blocks
