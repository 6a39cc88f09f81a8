"""Physical KV block allocator: O(1) allocate and free, with accounting the tests can check.

The free list is a stack. A fresh pool hands out ascending ids, and a request's blocks are pushed
back in reverse so the next request gets the same ascending run again: runs of consecutive ids
copy as one byte range (see kv_cache.py), which the swap path relies on.
"""

from __future__ import annotations


class OutOfBlocksError(RuntimeError):
    pass


def mark_free(in_use: bytearray, ids: list[int]) -> None:
    """Clear the in-use flags of ``ids``; a block not in use means a double free: raise."""
    for b in ids:
        if not in_use[b]:
            raise RuntimeError(f"KV block {b} freed twice or never allocated")
        in_use[b] = 0


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._in_use = bytearray(num_blocks)  # 1 = allocated; catches double frees

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, n: int, after: int | None = None) -> list[int]:
        """n blocks from the top of the free stack (``after`` is ignored: no contiguity)."""
        if n > len(self._free):
            raise OutOfBlocksError(f"need {n} KV blocks, {len(self._free)} free")
        free = self._free
        ids = free[len(free) - n:][::-1]
        del free[len(free) - n:]
        for b in ids:
            self._in_use[b] = 1
        return ids

    def free(self, ids: list[int]) -> None:
        mark_free(self._in_use, ids)
        self._free.extend(reversed(ids))

    def check(self) -> None:
        """Invariant: every block is either free or in use, exactly once."""
        used = sum(self._in_use)
        if used + len(self._free) != self.num_blocks or len(set(self._free)) != len(self._free):
            raise AssertionError(
                f"block accounting broken: {used} used + {len(self._free)} free != {self.num_blocks}"
            )
