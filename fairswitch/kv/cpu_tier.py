"""The CPU tier of multi-turn KV reuse: finished requests' full blocks, kept in the swap space.

When a request finishes, its full blocks that the tier does not hold yet are copied to CPU blocks
in the background (write-back, swap_manager.py); once landed they are registered here under the
same chained hashes the GPU prefix cache uses (prefix_cache.py). A later request whose prompt
continues past its GPU hits into blocks held here fetches them (a swap-in) instead of recomputing.

The tier only ever holds CPU blocks nobody else needs: a block being fetched is pinned; every other
block is evictable, least recently used first, and the swap manager evicts from here before a
preempted request would go without CPU room.
"""

from __future__ import annotations

from collections import OrderedDict

from fairswitch.kv.prefix_cache import block_hashes


class CpuKVTier:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._block_of: dict[int, int] = {}  # prefix hash -> CPU block
        self._key_of: dict[int, tuple[int, tuple[int, ...]]] = {}  # CPU block -> (hash, tokens)
        self._pins: dict[int, int] = {}  # CPU block -> fetches reading it
        self.evictable: OrderedDict[int, None] = OrderedDict()  # unpinned, LRU first
        self.num_hit_blocks = 0
        self.num_hit_tokens = 0

    @property
    def num_blocks(self) -> int:
        return len(self._key_of)

    def blocks(self) -> list[int]:
        return list(self._key_of)

    def __contains__(self, prefix_hash: int) -> bool:
        return prefix_hash in self._block_of

    def add(self, prefix_hash: int, tokens: tuple[int, ...], block: int) -> bool:
        """Hold ``block`` under ``prefix_hash``; False (caller keeps the block) if already held."""
        if prefix_hash in self._block_of:
            return False
        self._block_of[prefix_hash] = block
        self._key_of[block] = (prefix_hash, tokens)
        self.evictable[block] = None
        return True

    def match(self, token_ids: list[int], first_block: int, max_tokens: int,
              known: list[int] | None = None) -> list[int]:
        """CPU blocks continuing a prefix: blocks first_block.. of ``token_ids[:max_tokens]``
        (``known``: hashes computed before, see ``block_hashes``)."""
        hits = []
        bs = self.block_size
        hashes = block_hashes(token_ids, max_tokens, bs, known)
        for i, h in enumerate(hashes[first_block:], first_block):
            b = self._block_of.get(h)
            if b is None or self._key_of[b][1] != tuple(token_ids[i * bs:(i + 1) * bs]):
                break
            hits.append(b)
        return hits

    def pin(self, blocks: list[int]) -> None:
        for b in blocks:
            self._pins[b] = self._pins.get(b, 0) + 1
            self.evictable.pop(b, None)
        self.num_hit_blocks += len(blocks)
        self.num_hit_tokens += len(blocks) * self.block_size

    def unpin(self, blocks: list[int]) -> None:
        for b in blocks:
            self._pins[b] -= 1
            if self._pins[b] == 0:
                del self._pins[b]
                self.evictable[b] = None  # most recently used

    def evict(self) -> int:
        """Forget the least recently used unpinned block; the caller frees it."""
        block, _ = self.evictable.popitem(last=False)
        h, _ = self._key_of.pop(block)
        del self._block_of[h]
        return block
