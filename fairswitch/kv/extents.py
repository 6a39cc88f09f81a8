"""Coalesce block-to-block copies into extents: runs where source and destination ids both grow
by one. With the block-contiguous-across-layers layout (kv_cache.py) an extent of n blocks is one
contiguous byte range on each side, so it moves with one copy whatever the number of layers.

    src: 7 8 9 2 3      dst: 40 41 42 43 44   ->   (7, 40, 3), (2, 43, 2)
"""

from __future__ import annotations


def copy_extents(src_ids: list[int], dst_ids: list[int]) -> list[tuple[int, int, int]]:
    """[(src_start, dst_start, num_blocks)] covering src_ids[i] -> dst_ids[i] for every i."""
    if len(src_ids) != len(dst_ids):
        raise ValueError(f"{len(src_ids)} source blocks but {len(dst_ids)} destination blocks")
    extents: list[tuple[int, int, int]] = []
    for s, d in zip(src_ids, dst_ids):
        if extents:
            s0, d0, n = extents[-1]
            if s == s0 + n and d == d0 + n:
                extents[-1] = (s0, d0, n + 1)
                continue
        extents.append((s, d, 1))
    return extents


def num_extents(ids: list[int]) -> int:
    """How many runs of consecutive ids a block table has (1 = fully contiguous)."""
    return sum(1 for i, b in enumerate(ids) if i == 0 or b != ids[i - 1] + 1)


def split_extents(extents: list[tuple[int, int, int]],
                  max_blocks: int) -> list[tuple[int, int, int]]:
    """The same copies in extents of at most ``max_blocks`` blocks."""
    return [(s + i, d + i, min(max_blocks, n - i))
            for s, d, n in extents for i in range(0, n, max_blocks)]
