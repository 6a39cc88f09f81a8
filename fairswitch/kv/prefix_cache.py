"""Reuse of computed KV across requests (the turns of a conversation), keyed by token prefix.

A full block is identified by a chained hash: hash(parent block's hash, this block's tokens), so
one hash names a whole prefix. When a request frees its blocks, its full computed blocks are
registered; unreferenced registered blocks stay resident, ordered least recently used, and are
evicted only when an allocation finds no plain free block: cached KV never blocks a live request.
A later request whose prompt starts with the same tokens shares those blocks (reference counted)
and skips their prefill. Hits are confirmed by comparing the tokens, not just the hash.
"""

from __future__ import annotations

from collections import OrderedDict

from fairswitch.kv.block_pool import BlockPool


def block_hashes(token_ids: list[int], num_tokens: int, block_size: int,
                 known: list[int] | None = None) -> list[int]:
    """Chained hashes of the full blocks among the first ``num_tokens`` tokens.

    ``known``: hashes of the same token list computed before (a request's ``block_hashes``);
    only blocks past them are hashed, and they are appended to it."""
    hashes = known if known is not None else []
    parent = hashes[-1] if hashes else 0
    num_blocks = max(0, num_tokens) // block_size
    for i in range(len(hashes), num_blocks):
        parent = hash((parent, tuple(token_ids[i * block_size:(i + 1) * block_size])))
        hashes.append(parent)
    return hashes[:num_blocks]


class PrefixCache:
    def __init__(self, pool: BlockPool, block_size: int) -> None:
        self.pool = pool
        self.block_size = block_size
        self.refs = [0] * pool.num_blocks
        self._block_of: dict[int, int] = {}  # prefix hash -> block
        self._key_of: dict[int, tuple[int, tuple[int, ...]]] = {}  # block -> (hash, tokens)
        self.evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced cached, LRU first
        self.num_hit_blocks = 0
        self.num_queried_blocks = 0

    @property
    def num_cached_blocks(self) -> int:
        return len(self._key_of)

    def take(self, block: int) -> None:
        """A request starts referencing ``block`` (a fresh allocation or a cache hit)."""
        self.refs[block] += 1
        self.evictable.pop(block, None)

    def release(self, block: int) -> bool:
        """A request drops ``block``; True if the block is now free for the pool."""
        self.refs[block] -= 1
        if self.refs[block] > 0:
            return False
        if block in self._key_of:
            self.evictable[block] = None  # keep its KV until the memory is needed
            return False
        return True

    def register(self, token_ids: list[int], num_tokens: int, blocks: list[int],
                 known: list[int] | None = None) -> None:
        for i, h in enumerate(block_hashes(token_ids, num_tokens, self.block_size, known)):
            b = blocks[i]
            if h in self._block_of or b in self._key_of:
                continue
            tokens = tuple(token_ids[i * self.block_size:(i + 1) * self.block_size])
            self._block_of[h] = b
            self._key_of[b] = (h, tokens)

    def match(self, token_ids: list[int], max_tokens: int,
              known: list[int] | None = None) -> list[int]:
        """Cached blocks holding the longest prefix of ``token_ids[:max_tokens]``."""
        hits = []
        hashes = block_hashes(token_ids, max_tokens, self.block_size, known)
        for i, h in enumerate(hashes):
            b = self._block_of.get(h)
            if b is None:
                break
            tokens = tuple(token_ids[i * self.block_size:(i + 1) * self.block_size])
            if self._key_of[b][1] != tokens:
                break  # a hash collision: not our prefix
            hits.append(b)
        self.num_queried_blocks += len(hashes)
        self.num_hit_blocks += len(hits)
        return hits

    def evict(self) -> int:
        """Forget the least recently used unreferenced block and return it to the caller."""
        block, _ = self.evictable.popitem(last=False)
        h, _ = self._key_of.pop(block)
        del self._block_of[h]
        return block
