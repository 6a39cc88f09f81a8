"""Block groups: contiguous runs under churn, merging of freed extents, reclaimable reservations."""

from __future__ import annotations

import random

import pytest

from fairswitch.kv.block_groups import ExtentAllocator
from fairswitch.kv.block_pool import OutOfBlocksError
from fairswitch.kv.cache_manager import KVCacheManager
from fairswitch.kv.extents import num_extents
from fairswitch.request import Request
from fairswitch.sampling_params import SamplingParams


def test_allocator_best_fit_grow_in_place_and_merge():
    a = ExtentAllocator(12)
    x = a.allocate(3)
    y = a.allocate(2)
    assert x == [0, 1, 2] and y == [3, 4]
    a.free(x)
    assert a.allocate(2, after=4) == [5, 6]  # grows right after block 4
    assert a.allocate(3) == [0, 1, 2]  # best fit: the 3-block hole, not the 5-block tail
    a.free([0, 1, 2, 3, 4, 5, 6])
    assert a.num_free_extents == 1  # everything merged back into one extent
    a.check()
    with pytest.raises(OutOfBlocksError):
        a.allocate(13)
    with pytest.raises(RuntimeError, match="freed twice"):
        a.free([0])


def test_allocator_falls_back_to_largest_pieces():
    a = ExtentAllocator(10)
    blocks = a.allocate(10)
    a.free(blocks[0:2] + blocks[4:7] + blocks[9:10])
    got = a.allocate(5)
    assert sorted(got) == [0, 1, 4, 5, 6]
    assert a.num_free_blocks == 1
    a.check()


def _churn(groups: bool, seed: int = 0) -> tuple[float, float, float]:
    rng = random.Random(seed)
    bs = 16
    kv = KVCacheManager(4096, bs, block_groups=groups, max_model_len=4096)
    live: list[Request] = []
    extents, utils = [], []
    for step in range(3000):
        if len(live) < 48 and rng.random() < 0.3:
            prompt = rng.randint(32, 900)
            req = Request(str(step), [1] * prompt, SamplingParams(max_tokens=rng.randint(16, 600)),
                          0.0)
            if kv.allocate_slots(req, prompt):
                req.num_computed_tokens = prompt
                live.append(req)
        for req in list(live):
            done = req.num_computed_tokens >= req.num_prompt_tokens + req.sampling_params.max_tokens
            if done or rng.random() < 0.002:  # finished, or aborted early
                kv.free(req)
                live.remove(req)
            elif kv.allocate_slots(req, 1):
                req.num_computed_tokens += 1
        if live and step % 50 == 0:
            extents.append(sum(num_extents(r.block_table) for r in live) / len(live))
            utils.append(sum(r.num_computed_tokens for r in live)
                         / (sum(len(r.block_table) for r in live) * bs))
        kv.pool.check()
        assert kv.pool.num_used_blocks == (sum(len(r.block_table) for r in live)
                                          + kv.num_reserved_blocks)
    for req in live:
        kv.free(req)
    assert kv.pool.num_free_blocks == 4096
    return sum(extents) / len(extents), max(extents), min(utils)


def test_churn_keeps_block_tables_few_extents_and_memory_utilized():
    mean_groups, max_groups, util_groups = _churn(groups=True)
    mean_plain, _, _ = _churn(groups=False)
    assert mean_groups <= 1.5 and max_groups <= 3.0, (mean_groups, max_groups)
    assert mean_plain > 3 * mean_groups  # a plain free list scatters tables under churn
    assert util_groups >= 0.95, util_groups


def test_reservations_are_reclaimed_when_memory_is_tight():
    kv = KVCacheManager(10, 4, block_groups=True, max_model_len=40)
    a = Request("a", [1] * 4, SamplingParams(max_tokens=32), 0.0)
    assert kv.allocate_slots(a, 4)
    assert len(a.block_table) == 1 and kv.num_reserved_blocks == 8  # group of 9 reserved
    assert kv.num_free_blocks == 9  # reserved tail still counts as free capacity
    b = Request("b", [1] * 36, SamplingParams(max_tokens=1), 0.0)
    assert kv.allocate_slots(b, 36)  # needs 9: takes a's tail back
    assert kv.num_reserved_blocks == 0 and len(b.block_table) == 9
    assert not kv.allocate_slots(a, 5)  # a's growth now has to wait for memory
    kv.free(b)
    assert kv.allocate_slots(a, 5) and num_extents(a.block_table) <= 2


def test_a_reservation_takes_only_free_blocks_not_cached_ones_or_others_reservations():
    """The unused tail of a group is speculative: it must not evict the prefix cache (the next
    turn of a conversation would recompute) nor take another request's reservation."""
    kv = KVCacheManager(16, 4, enable_prefix_caching=True, block_groups=True, max_model_len=64)
    turn = Request("turn1", list(range(100, 120)), SamplingParams(max_tokens=1), 0.0)
    assert kv.allocate_slots(turn, 20)
    turn.num_computed_tokens = 20
    kv.free(turn)  # its 5 full blocks stay cached
    cached = len(kv.prefix_cache.evictable)
    assert cached == 5 and kv.pool.num_free_blocks == 11
    a = Request("a", [7] * 3, SamplingParams(max_tokens=60), 0.0)  # expects 16 blocks
    assert kv.allocate_slots(a, 3)
    assert len(kv.prefix_cache.evictable) == cached  # nothing evicted
    assert len(a.block_table) == 1 and kv.num_reserved_blocks == 10  # the free blocks only
    b = Request("b", [8] * 3, SamplingParams(max_tokens=60), 0.0)
    assert kv.allocate_slots(b, 3)  # needs one block: a's tail gives it back, b reserves none
    assert len(b.block_table) == 1 and b not in kv.reserved
    assert len(kv.prefix_cache.evictable) == cached
