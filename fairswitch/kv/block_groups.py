"""Block groups: an allocator of runs of consecutive physical blocks, so block tables stay a few
long extents and a context switch moves each extent with one copy.

Free space is a set of free extents, merged with both neighbours on every free (no fragmentation
accumulates from churn). An allocation first grows in place right after the caller's last block,
then takes the smallest free extent that fits whole (best fit), and only when none does, the
largest extents first. Same interface as BlockPool, so either serves the KV cache manager.

    blocks: [ A A A . . B B . . . . C ]      free extents: (3, 2), (7, 4)
    A grows by 2 -> takes 3, 4 (in place); a new group of 3 -> best fit (7, 4) -> 7, 8, 9
"""

from __future__ import annotations

from fairswitch.kv.block_pool import OutOfBlocksError, mark_free


class ExtentAllocator:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._len_at: dict[int, int] = {0: num_blocks}  # free extent start -> length
        self._start_of_end: dict[int, int] = {num_blocks: 0}  # free extent end -> start
        self._num_free = num_blocks
        self._in_use = bytearray(num_blocks)

    @property
    def num_free_blocks(self) -> int:
        return self._num_free

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self._num_free

    @property
    def num_free_extents(self) -> int:
        return len(self._len_at)

    def _take(self, start: int, n: int) -> list[int]:
        """Take the first n blocks of the free extent at ``start``."""
        length = self._len_at.pop(start)
        del self._start_of_end[start + length]
        if n < length:
            self._len_at[start + n] = length - n
            self._start_of_end[start + length] = start + n
        self._num_free -= n
        ids = list(range(start, start + n))
        for b in ids:
            self._in_use[b] = 1
        return ids

    def allocate(self, n: int, after: int | None = None) -> list[int]:
        if n > self._num_free:
            raise OutOfBlocksError(f"need {n} KV blocks, {self._num_free} free")
        if n == 0:
            return []
        ids: list[int] = []
        if after is not None and (after + 1) in self._len_at:
            ids = self._take(after + 1, min(n, self._len_at[after + 1]))
        need = n - len(ids)
        if need:
            fits = [(length, start) for start, length in self._len_at.items() if length >= need]
            if fits:
                ids += self._take(min(fits)[1], need)
            else:
                for start, length in sorted(self._len_at.items(), key=lambda e: -e[1]):
                    ids += self._take(start, min(length, n - len(ids)))
                    if len(ids) == n:
                        break
        return ids

    def free(self, ids: list[int]) -> None:
        mark_free(self._in_use, ids)
        for start, length in _runs(sorted(ids)):
            end = start + length
            if start in self._start_of_end:  # merge with the free extent just before
                prev = self._start_of_end.pop(start)
                length += self._len_at.pop(prev)
                start = prev
            if end in self._len_at:  # and with the one just after
                nxt = self._len_at.pop(end)
                del self._start_of_end[end + nxt]
                length += nxt
            self._len_at[start] = length
            self._start_of_end[start + length] = start
        self._num_free += len(ids)

    def check(self) -> None:
        free = sum(self._len_at.values())
        used = sum(self._in_use)
        if free != self._num_free or used + free != self.num_blocks:
            raise AssertionError(f"block accounting broken: {used} used + {free} free "
                                 f"!= {self.num_blocks}")
        for start, length in self._len_at.items():
            if any(self._in_use[start:start + length]) or start + length in self._len_at:
                raise AssertionError(f"free extent ({start}, {length}) overlaps or is unmerged")


def _runs(sorted_ids: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for b in sorted_ids:
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs
