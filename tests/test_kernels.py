"""Triton paged attention (kernels/paged_attention.py) against the pure-torch reference.

Without CUDA the kernels run in Triton's interpreter at small shapes; ``-m gpu`` adds long
contexts, fp16/bf16, large batches, a pool whose block offsets overflow int32, and graph capture.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads this when it decorates a function, its own tl.sum/tl.max included: conftest.py
    # sets it before anything imports triton. Fail loudly rather than test the wrong thing.
    assert os.environ.get("TRITON_INTERPRET") == "1", "TRITON_INTERPRET=1 must be set on CPU"

from fairswitch.kernels import paged_attention as pa  # noqa: E402
from fairswitch.kernels import reference as ref  # noqa: E402
from fairswitch.kv.kv_cache import KVCache, KVLayout  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: 2e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def make_cache(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
               dtype=torch.float32, num_layers: int = 2, layer: int = 1
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pool, K view, V view) of one layer of a multi-layer pool: the views are strided."""
    cache = KVCache(KVLayout(num_layers, block_size, num_kv_heads, head_dim, dtype), num_blocks,
                    DEVICE)
    k_cache, v_cache = cache.layer_views[layer][:2]
    assert not k_cache.is_contiguous()
    return cache.tensor, k_cache, v_cache


def random_block_tables(num_seqs: int, max_blocks: int, num_blocks: int,
                        first_block: int = 0) -> torch.Tensor:
    """Shuffled, disjoint block ids from [first_block, num_blocks): nothing is contiguous."""
    ids = first_block + torch.randperm(num_blocks - first_block)[:num_seqs * max_blocks]
    return ids.view(num_seqs, max_blocks).to(torch.int32).to(DEVICE)


def fill_blocks(pool: torch.Tensor, block_tables: torch.Tensor) -> None:
    used = block_tables.flatten().long()
    pool[used] = torch.randn(pool[used].shape, device=DEVICE).to(pool.dtype)


def compact_fp32(k_cache, v_cache, block_tables):
    """The referenced blocks only, as fp32 caches, with block tables renumbered to match."""
    used, remapped = torch.unique(block_tables.long(), return_inverse=True)
    return (k_cache[used].float(), v_cache[used].float(), remapped.to(torch.int32))


def assert_close(out, expected, dtype):
    tol = TOL[dtype]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)


# -------------------------------------------------------------------------------------------
# write_kv


@pytest.mark.parametrize("num_kv_heads,head_dim,block_size,slot_dtype", [
    (1, 64, 16, torch.int64), (4, 128, 32, torch.int32), (3, 64, 8, torch.int64)])
def test_write_kv_matches_reference(num_kv_heads, head_dim, block_size, slot_dtype):
    torch.manual_seed(0)
    num_blocks = 12
    pool, k_cache, v_cache = make_cache(num_blocks, block_size, num_kv_heads, head_dim)
    pool.normal_()
    expected = pool.clone()
    num_tokens = 21
    slots = torch.randperm(num_blocks * block_size)[:num_tokens]
    slots[[0, 5, 6, 20]] = -1  # graph-bucket padding
    slots = slots.to(slot_dtype).to(DEVICE)
    # k, v as the strided views a fused qkv projection hands over.
    qkv = torch.randn(num_tokens, 3 * num_kv_heads * head_dim, device=DEVICE)
    k = qkv[:, num_kv_heads * head_dim:2 * num_kv_heads * head_dim].view(-1, num_kv_heads,
                                                                         head_dim)
    v = qkv[:, 2 * num_kv_heads * head_dim:].view(-1, num_kv_heads, head_dim)
    pa.write_kv(k_cache, v_cache, k, v, slots)
    ref.write_kv(expected[:, 1, 0], expected[:, 1, 1], k, v, slots)
    assert torch.equal(pool, expected)  # layer 0 and unwritten slots untouched too


# -------------------------------------------------------------------------------------------
# decode


# (group, head_dim, block_size, num_splits): GQA ratios 1/4/8 (+7, not a power of two),
# both head dims, both block sizes, one split (direct write), several splits, the heuristic.
DECODE_CASES = [
    (1, 64, 16, 1), (1, 128, 32, None), (4, 128, 32, 3), (4, 64, 32, 8), (8, 64, 16, None),
    (8, 128, 32, 4), (7, 128, 16, 2),
]


@pytest.mark.parametrize("group,head_dim,block_size,num_splits", DECODE_CASES)
def test_decode_matches_reference(group, head_dim, block_size, num_splits):
    torch.manual_seed(1)
    num_kv_heads, max_blocks = 2, 24
    # 0: padding row of a graph bucket; block edges; one split shorter than the split count.
    seq_lens = [0, 1, block_size, block_size + 1, 2, max_blocks * block_size - 3]
    num_seqs = len(seq_lens)
    num_blocks = num_seqs * max_blocks + 7
    pool, k_cache, v_cache = make_cache(num_blocks, block_size, num_kv_heads, head_dim)
    block_tables = random_block_tables(num_seqs, max_blocks, num_blocks)
    fill_blocks(pool, block_tables)
    num_heads = num_kv_heads * group
    # q as the strided view a fused qkv projection hands over.
    qkv = torch.randn(num_seqs, (num_heads + 2 * num_kv_heads) * head_dim, device=DEVICE)
    q = qkv[:, :num_heads * head_dim].view(num_seqs, num_heads, head_dim)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    out = pa.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens_t,
                                    num_splits=num_splits)
    expected = ref.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens_t)
    assert torch.equal(out[0], torch.zeros_like(out[0]))  # seq_len 0: zeros, not NaN
    assert_close(out[1:], expected[1:], torch.float32)


def test_decode_long_context_and_out_buffer():
    torch.manual_seed(2)
    block_size, head_dim, group, max_blocks = 32, 64, 4, 80
    seq_lens = [2500, 700]
    pool, k_cache, v_cache = make_cache(200, block_size, 1, head_dim)
    block_tables = random_block_tables(len(seq_lens), max_blocks, 200)
    fill_blocks(pool, block_tables)
    q = torch.randn(len(seq_lens), group, head_dim, device=DEVICE)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    out = torch.full((3, group, head_dim), 7.0, device=DEVICE)  # a larger output, written in [:2]
    result = pa.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens_t, scale=0.1,
                                       num_splits=4, out=out[:2])
    assert result.data_ptr() == out.data_ptr() and torch.all(out[2] == 7.0)
    expected = ref.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens_t,
                                          scale=0.1)
    assert_close(out[:2], expected, torch.float32)


def test_decode_fp16_interpreted_or_compiled():
    torch.manual_seed(3)
    block_size, head_dim, group = 16, 128, 8
    pool, k_cache, v_cache = make_cache(40, block_size, 1, head_dim, dtype=torch.float16)
    block_tables = random_block_tables(3, 10, 40)
    fill_blocks(pool, block_tables)
    q = torch.randn(3, group, head_dim, device=DEVICE).half()
    seq_lens = torch.tensor([150, 9, 0], dtype=torch.int32, device=DEVICE)
    out = pa.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, num_splits=2)
    kf, vf, bt = compact_fp32(k_cache, v_cache, block_tables)
    expected = ref.paged_decode_attention(q.float(), kf, vf, bt, seq_lens)
    assert out.dtype == torch.float16
    assert_close(out[:2], expected[:2], torch.float16)
    assert torch.all(out[2] == 0)


def test_num_splits_heuristic_is_static():
    # Depends on shapes only; more splits when few programs face a long context, none when the
    # batch alone fills the GPU or the context is short.
    assert pa.default_num_splits(1, 8, 8192, 132) >= 8
    assert pa.default_num_splits(256, 8, 8192, 132) == 1
    assert pa.default_num_splits(1, 8, 128, 132) == 1
    for batch in (1, 3, 16, 64, 200):
        for ctx in (16, 512, 4096, 32768):
            splits = pa.default_num_splits(batch, 8, ctx, 132)
            assert 1 <= splits <= 32 and splits == pa.default_num_splits(batch, 8, ctx, 132)


# -------------------------------------------------------------------------------------------
# prefill


def run_prefill(query_lens, seq_lens, group, head_dim, block_size, dtype=torch.float32,
                num_kv_heads=2, num_blocks=None, first_block=0, scale=None, flat_grid=False):
    max_blocks = -(-max(seq_lens) // block_size)
    num_blocks = num_blocks or len(seq_lens) * max_blocks + 5
    pool, k_cache, v_cache = make_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype)
    block_tables = random_block_tables(len(seq_lens), max_blocks, num_blocks, first_block)
    fill_blocks(pool, block_tables)
    num_heads, num_tokens = num_kv_heads * group, sum(query_lens)
    # q as the strided view a fused qkv projection hands over.
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, device=DEVICE)
    q = qkv.to(dtype)[:, :num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    query_start_loc = torch.tensor(starts, dtype=torch.int32, device=DEVICE)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    out = pa.paged_prefill_attention(q, k_cache, v_cache, block_tables, query_start_loc,
                                     seq_lens_t, None if flat_grid else max(query_lens),
                                     scale=scale)
    kf, vf, bt = compact_fp32(k_cache, v_cache, block_tables)
    expected = ref.paged_prefill_attention(q.float(), kf, vf, bt, starts, seq_lens, scale=scale)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, expected, dtype)


# (group, head_dim, block_size)
PREFILL_CASES = [(1, 64, 16), (1, 128, 32), (4, 128, 32), (8, 64, 16), (8, 128, 32),
                 (7, 64, 32)]


@pytest.mark.parametrize("flat_grid", [False, True])
@pytest.mark.parametrize("group,head_dim,block_size", PREFILL_CASES)
def test_prefill_matches_reference(group, head_dim, block_size, flat_grid):
    torch.manual_seed(4)
    # (query_len, seq_len): whole prompts, chunks over a cached prefix, single tokens, a chunk
    # ending exactly on a block edge, a zero-length entry.
    pairs = [(7, 7), (5, 40), (1, 17), (37, 100), (0, 9), (16, 16 + 3 * block_size), (1, 1)]
    run_prefill([p[0] for p in pairs], [p[1] for p in pairs], group, head_dim, block_size,
                flat_grid=flat_grid)


@pytest.mark.parametrize("flat_grid", [False, True])
def test_prefill_many_sequences(flat_grid):
    """Decodes (query 1), chunks that straddle tile edges and empty (padding) sequences in one
    launch, as a mixed-step CUDA graph lays them out (flat grid: T // tile + S slots, each
    finding its sequence by binary search)."""
    torch.manual_seed(7)
    pairs = ([(1, 30 + i) for i in range(10)] + [(0, 0), (17, 50), (8, 8), (0, 0), (1, 5),
                                                  (9, 100), (23, 23)] + [(0, 0)] * 3)
    run_prefill([p[0] for p in pairs], [p[1] for p in pairs], group=4, head_dim=32,
                block_size=8, flat_grid=flat_grid)


@pytest.mark.parametrize("tile", [1, 4, 16])
def test_prefill_slots_cover_any_split(tile):
    rng = np.random.default_rng(tile)
    for _ in range(200):
        num_seqs = int(rng.integers(1, 12))
        q_lens = rng.integers(0, 3 * tile + 2, num_seqs)
        qsl = np.concatenate([[0], np.cumsum(q_lens)])
        num_tokens = int(qsl[-1] + rng.integers(0, 2 * tile))  # padding tokens past the end
        first = qsl // tile + np.arange(num_seqs + 1)
        first[-1] = pa.prefill_slots(num_tokens, num_seqs, tile)
        assert (np.diff(first) >= -(-q_lens // tile)).all(), (q_lens, num_tokens)


def test_prefill_long_prefix():
    torch.manual_seed(5)
    run_prefill([70, 130], [1500, 130], group=4, head_dim=64, block_size=32, num_kv_heads=1,
                scale=0.05)


def test_prefill_fp16():
    torch.manual_seed(6)
    run_prefill([20, 3], [50, 70], group=4, head_dim=128, block_size=16, dtype=torch.float16,
                num_kv_heads=1)


# -------------------------------------------------------------------------------------------
# GPU: long contexts, half precision, large batches, int32 overflow, graph capture


def large_decode_case(block_size: int, head_dim: int, group: int, cache_dtype: torch.dtype,
                      q_dtype: torch.dtype):
    """A large decode batch for the GPU tests: 64 sequences of up to 8292 tokens over 2 KV
    heads in shuffled blocks, the first four of lengths 0, 1, the longest and 7 blocks; the
    pool unfilled. Returns (pool, k_cache, v_cache, block_tables, seq_lens, q)."""
    num_seqs, num_kv_heads, max_ctx = 64, 2, 8192 + 100
    max_blocks = -(-max_ctx // block_size)
    num_blocks = num_seqs * max_blocks + 11
    pool, k_cache, v_cache = make_cache(num_blocks, block_size, num_kv_heads, head_dim,
                                        cache_dtype)
    block_tables = random_block_tables(num_seqs, max_blocks, num_blocks)
    seq_lens = torch.randint(1, max_ctx + 1, (num_seqs,), dtype=torch.int32)
    seq_lens[:4] = torch.tensor([0, 1, max_ctx, block_size * 7])
    q = torch.randn(num_seqs, num_kv_heads * group, head_dim, device=DEVICE).to(q_dtype)
    return pool, k_cache, v_cache, block_tables, seq_lens.to(DEVICE), q


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group,head_dim,block_size", [(1, 128, 16), (4, 128, 32), (8, 64, 16)])
@pytest.mark.parametrize("num_splits", [None, 1, 8])
def test_decode_gpu_large(dtype, group, head_dim, block_size, num_splits):
    torch.manual_seed(10)
    pool, k_cache, v_cache, block_tables, seq_lens, q = large_decode_case(
        block_size, head_dim, group, dtype, dtype)
    fill_blocks(pool, block_tables)
    out = pa.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens,
                                    num_splits=num_splits)
    kf, vf, bt = compact_fp32(k_cache, v_cache, block_tables)
    expected = ref.paged_decode_attention(q.float(), kf, vf, bt, seq_lens)
    assert torch.all(out[0] == 0)
    assert_close(out[1:], expected[1:], dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group,head_dim,block_size", [(1, 128, 16), (4, 128, 32), (8, 64, 16),
                                                       (7, 128, 16)])
@pytest.mark.parametrize("flat_grid", [False, True])
def test_prefill_gpu_large(dtype, group, head_dim, block_size, flat_grid):
    torch.manual_seed(11)
    pairs = [(2048, 2048), (512, 8300), (1, 5000), (300, 300), (129, 4000), (0, 64)]
    run_prefill([p[0] for p in pairs], [p[1] for p in pairs], group, head_dim, block_size, dtype,
                flat_grid=flat_grid)


@pytest.mark.gpu
def test_prefill_gpu_fp32():
    torch.manual_seed(12)
    run_prefill([300, 1, 64], [1000, 900, 64], group=4, head_dim=128, block_size=16)


# Hkv=1, D=64, block 16, 2 layers: stride(0) = 4096 elements; blocks past 2^31 / 4096 = 524288
# sit beyond int32 offsets. 528384 blocks of fp16 = 4.03 GiB.
HUGE_BLOCKS = (1 << 31) // 4096 + 4096


@pytest.mark.gpu
def test_int32_overflow_pool():
    torch.manual_seed(13)
    block_size, head_dim, group, dtype = 16, 64, 4, torch.float16
    pool, k_cache, v_cache = make_cache(HUGE_BLOCKS, block_size, 1, head_dim, dtype)
    assert k_cache.stride(0) * HUGE_BLOCKS > 2 ** 31
    seq_lens = [1000, 333, 0]
    max_blocks = -(-max(seq_lens) // block_size)
    block_tables = random_block_tables(len(seq_lens), max_blocks, HUGE_BLOCKS,
                                       first_block=HUGE_BLOCKS - 4 * max_blocks)
    fill_blocks(pool, block_tables)
    # write_kv lands in the far blocks and touches nothing else.
    k = torch.randn(5, 1, head_dim, device=DEVICE).half()
    slots = block_tables[0, :5].long() * block_size + 3
    slots[2] = -1
    before = pool[block_tables.flatten().long()].clone()
    pa.write_kv(k_cache, v_cache, k, -k, slots)
    kept = slots >= 0
    blocks, rows = slots[kept] // block_size, slots[kept] % block_size
    assert torch.equal(k_cache[blocks, rows], k[kept])
    assert torch.equal(v_cache[blocks, rows], -k[kept])
    ref.write_kv(before[:, 1, 0], before[:, 1, 1], k, -k,
                 torch.where(kept, torch.arange(5, device=DEVICE) * block_size + 3, -1))
    assert torch.equal(pool[block_tables.flatten().long()], before)

    kf, vf, bt = compact_fp32(k_cache, v_cache, block_tables)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    q = torch.randn(3, group, head_dim, device=DEVICE).half()
    for splits in (1, 4):
        out = pa.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens_t,
                                        num_splits=splits)
        expected = ref.paged_decode_attention(q.float(), kf, vf, bt, seq_lens_t)
        assert_close(out[:2], expected[:2], dtype)
    starts = [0, 40, 41, 41]
    q = torch.randn(41, group, head_dim, device=DEVICE).half()
    out = pa.paged_prefill_attention(q, k_cache, v_cache, block_tables,
                                     torch.tensor(starts, dtype=torch.int32, device=DEVICE),
                                     seq_lens_t, 40)
    # The reference covers the two non-empty sequences; the third is (0 queries, 0 tokens).
    expected = ref.paged_prefill_attention(q.float(), kf, vf, bt[:2], starts[:3], seq_lens[:2])
    assert_close(out, expected, dtype)


@pytest.mark.gpu
def test_decode_cuda_graph_replay():
    torch.manual_seed(14)
    block_size, head_dim, group, num_kv_heads, dtype = 16, 128, 4, 2, torch.bfloat16
    num_seqs, max_blocks, num_blocks = 8, 64, 8 * 64 + 3
    pool, k_cache, v_cache = make_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype)
    pool.normal_()
    q = torch.randn(num_seqs, num_kv_heads * group, head_dim, device=DEVICE).to(dtype)
    block_tables = random_block_tables(num_seqs, max_blocks, num_blocks)
    seq_lens = torch.ones(num_seqs, dtype=torch.int32, device=DEVICE)
    out = torch.empty_like(q)
    pa.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, out=out)  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pa.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, out=out)
    kf, vf = k_cache.float(), v_cache.float()
    for trial in range(3):
        q.copy_(torch.randn_like(q))
        block_tables.copy_(random_block_tables(num_seqs, max_blocks, num_blocks))
        lens = torch.randint(0, max_blocks * block_size + 1, (num_seqs,), dtype=torch.int32)
        lens[trial] = 0
        seq_lens.copy_(lens)
        graph.replay()
        expected = ref.paged_decode_attention(q.float(), kf, vf, block_tables, seq_lens)
        live = lens.to(DEVICE) > 0
        assert torch.all(out[~live] == 0)
        assert_close(out[live], expected[live], dtype)
