"""Block pool and block-table accounting: free + used == total, always; nothing leaks."""

from __future__ import annotations

import random

import pytest

from fairswitch import LLM, SamplingParams
from fairswitch.kv.block_pool import BlockPool, OutOfBlocksError


def test_pool_allocate_free_roundtrip():
    pool = BlockPool(10)
    a = pool.allocate(4)
    b = pool.allocate(3)
    assert a == [0, 1, 2, 3] and b == [4, 5, 6]  # a fresh pool hands out ascending runs
    assert pool.num_free_blocks + pool.num_used_blocks == 10
    pool.free(a)
    assert pool.allocate(4) == a  # freed runs come back in order
    with pytest.raises(OutOfBlocksError):
        pool.allocate(4)
    pool.check()


def test_pool_rejects_double_free():
    pool = BlockPool(4)
    a = pool.allocate(2)
    pool.free(a)
    with pytest.raises(RuntimeError, match="freed twice"):
        pool.free(a)


def test_pool_random_ops_keep_invariant():
    rng = random.Random(0)
    pool = BlockPool(64)
    held: list[list[int]] = []
    for _ in range(2000):
        if held and rng.random() < 0.5:
            pool.free(held.pop(rng.randrange(len(held))))
        else:
            n = rng.randint(1, 8)
            if n <= pool.num_free_blocks:
                held.append(pool.allocate(n))
        assert pool.num_free_blocks + sum(map(len, held)) == 64
    pool.check()


def test_engine_frees_every_block_after_finish_and_abort():
    llm = LLM(num_gpu_blocks=64, block_size=4, max_model_len=128)
    engine = llm.engine
    rng = random.Random(1)
    ids = []
    for i in range(12):
        ids.append(engine.add_request(f"request number {i} " * rng.randint(1, 6),
                                      SamplingParams(max_tokens=rng.randint(1, 20),
                                                     ignore_eos=True)))
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        engine.check_accounting()
        steps += 1
        if steps in (2, 5, 9):
            for rid in rng.sample(ids, 2):
                engine.abort_request(rid)  # waiting, running or already finished: all fine
    assert engine.kv.blocks.num_free_blocks == 64
    assert not engine.requests
    engine.kv.blocks.pool.check()
