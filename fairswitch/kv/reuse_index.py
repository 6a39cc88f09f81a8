"""Reuse of computed KV across requests (the turns of a conversation), keyed by token prefix.

A full block is named by a chained hash: SHA-256(parent block's hash, this block's tokens), so
one hash names a whole prefix. Hits are confirmed by comparing the block's tokens as well. The
hash must resist collisions: the tokens check cannot see a different parent, and Python's
``hash`` of an int tuple is not collision resistant, so a crafted prompt could have been served
another user's cached KV (vLLM's CVE-2025-25183; vLLM hashes with SHA-256 too).

One ``ReuseTier`` indexes the blocks of one pool, and the same class serves both tiers:

    GPU tier (cache_manager.py)  a finished request's full blocks stay resident; a later prompt
                                 that starts with the same tokens shares them and skips prefill
    CPU tier (swap_manager.py)   the same blocks written back to the swap space; a prompt that
                                 continues past its GPU hits fetches them instead of recomputing

          prompt blocks:  [ 0 ][ 1 ][ 2 ][ 3 ][ 4 ][ 5 ] ...
          GPU tier hits:  [ 0 ][ 1 ]                      match(first_block=0)
          CPU tier hits:            [ 2 ][ 3 ]            match(first_block=2)
          recomputed:                         [ 4 ][ 5 ]

Blocks are reference counted (``take`` / ``release``): live requests on the GPU, fetches
reading a CPU block. An unreferenced indexed block is *evictable*, least recently used first,
and is evicted only when its pool needs the memory: cached KV never keeps a live request out.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict


def block_hashes(token_ids: list[int], num_tokens: int, block_size: int,
                 known: list[bytes] | None = None, salt: bytes = b"") -> list[bytes]:
    """Chained hashes (32-byte SHA-256 digests) of the full blocks among the first
    ``num_tokens`` tokens.

    ``known``: hashes of the same token list computed before (a request's ``block_hashes``);
    only blocks past them are hashed, and they are appended to it. ``salt``: the first block's
    parent (a request's ``cache_salt``: its LoRA adapter), so equal tokens under another salt
    never match."""
    hashes = known if known is not None else []
    parent = hashes[-1] if hashes else salt
    num_blocks = max(0, num_tokens) // block_size
    for i in range(len(hashes), num_blocks):
        tokens = array("q", token_ids[i * block_size:(i + 1) * block_size])
        parent = hashlib.sha256(parent + tokens.tobytes()).digest()
        hashes.append(parent)
    return hashes[:num_blocks]


class ReuseTier:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.refs: dict[int, int] = {}  # block -> references (absent: none)
        self._block_of: dict[bytes, int] = {}  # prefix hash -> block
        self._key_of: dict[int, tuple[bytes, tuple[int, ...]]] = {}  # block -> (hash, tokens)
        self.evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced indexed, LRU first
        # Requests' lookups at their first admission (the cache manager's count_lookup).
        self.num_hit_blocks = 0
        self.num_queried_blocks = 0

    @property
    def num_blocks(self) -> int:
        """Blocks indexed (referenced or evictable)."""
        return len(self._key_of)

    @property
    def num_held_blocks(self) -> int:
        """Blocks indexed or still read (one ``clear`` forgot while a reader had it stays held
        until its release)."""
        return len(self._key_of.keys() | self.refs.keys())

    def blocks(self) -> list[int]:
        return list(self._key_of)

    def __contains__(self, prefix_hash: bytes) -> bool:
        return prefix_hash in self._block_of

    def take(self, block: int) -> None:
        """Someone starts reading ``block`` (a fresh allocation, a hit, a fetch)."""
        self.refs[block] = self.refs.get(block, 0) + 1
        self.evictable.pop(block, None)

    def release(self, block: int) -> bool:
        """Someone stops reading ``block``; True if it is now free for its pool (unreferenced
        and not indexed). An indexed block stays, evictable, until the memory is needed."""
        n = self.refs[block] - 1
        if n:
            self.refs[block] = n
            return False
        del self.refs[block]
        if block in self._key_of:
            self.evictable[block] = None  # most recently used
            return False
        return True

    def add(self, prefix_hash: bytes, tokens: tuple[int, ...], block: int) -> bool:
        """Index ``block`` under ``prefix_hash``; False (the caller keeps the block) if the
        prefix or the block is indexed already."""
        if prefix_hash in self._block_of or block in self._key_of:
            return False
        self._block_of[prefix_hash] = block
        self._key_of[block] = (prefix_hash, tokens)
        if block not in self.refs:
            self.evictable[block] = None
        return True

    def register(self, token_ids: list[int], num_tokens: int, blocks: list[int],
                 known: list[bytes] | None = None, salt: bytes = b"") -> None:
        """Index a request's full blocks among its first ``num_tokens`` tokens."""
        bs = self.block_size
        for i, h in enumerate(block_hashes(token_ids, num_tokens, bs, known, salt)):
            self.add(h, tuple(token_ids[i * bs:(i + 1) * bs]), blocks[i])

    def match(self, token_ids: list[int], max_tokens: int, known: list[bytes] | None = None,
              first_block: int = 0, salt: bytes = b"") -> list[int]:
        """Indexed blocks holding blocks ``first_block``.. of ``token_ids[:max_tokens]``, as long
        as they continue without a gap."""
        hits = []
        bs = self.block_size
        hashes = block_hashes(token_ids, max_tokens, bs, known, salt)
        for i, h in enumerate(hashes[first_block:], first_block):
            b = self._block_of.get(h)
            if b is None or self._key_of[b][1] != tuple(token_ids[i * bs:(i + 1) * bs]):
                break  # absent, or a hash collision: not this prefix
            hits.append(b)
        return hits

    def clear(self) -> list[int]:
        """Forget every indexed block: the unreferenced ones are returned (the caller frees
        them); those still read stay with their readers, and their last release frees them (no
        longer indexed)."""
        evicted = list(self.evictable)
        self.evictable.clear()
        self._block_of.clear()
        self._key_of.clear()
        return evicted

    def evict(self) -> int:
        """Forget the least recently used unreferenced block and return it to the caller."""
        block, _ = self.evictable.popitem(last=False)
        h, _ = self._key_of.pop(block)
        del self._block_of[h]
        return block
