"""FP8 (e4m3) KV cache: quantization, write_kv, and decode/prefill attention over an fp8 cache, the
Triton kernels (kernels/paged_attention.py) against the torch reference (kernels/reference.py).

Triton's interpreter runs the fp8 kernels on the CPU (loads of fp8 tiles, their widening, the
quantizing store), with fp32 and fp16 queries: its bf16 ``tl.dot`` is wrong whatever the cache, so
bf16 queries are ``-m gpu`` tests, as are long contexts and graph capture.
"""

from __future__ import annotations

import pytest
import torch
from test_kernels import (DEVICE, assert_close, large_decode_case, make_cache,
                          random_block_tables)

from fairswitch.kernels import paged_attention as pa
from fairswitch.kernels import reference as ref
from fairswitch.kv.kv_cache import fp8_layer_views

FP8 = torch.float8_e4m3fn


def scales(k_scale: float, v_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor([k_scale], device=DEVICE), torch.tensor([v_scale], device=DEVICE))


def as_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.uint8)  # torch.equal has no fp8 kernel on the CPU


def realistic(shape, num_outliers: int, gen: torch.Generator) -> torch.Tensor:
    """N(0, 1) values with a few outliers of magnitude 10-20, like activations' K and V."""
    x = torch.randn(shape, generator=gen)
    at = torch.randint(0, x.numel(), (num_outliers,), generator=gen)
    sign = torch.randint(0, 2, (num_outliers,), generator=gen) * 2 - 1
    x.view(-1)[at] = sign * (10 + 10 * torch.rand(num_outliers, generator=gen))
    return x


def fill_fp8(pool: torch.Tensor, block_tables: torch.Tensor, k_scale: torch.Tensor,
             v_scale: torch.Tensor) -> None:
    """N(0, 1) values, quantized, in the used blocks of layer 1 (pool [blocks, layers, 2, ...]:
    an fp8 pool's layer region is by head, so each half holds K and V of half the heads; the
    scales fit either)."""
    used = block_tables.flatten().long()
    for i, scale in enumerate((k_scale, v_scale)):
        pool[used, 1, i] = ref.quantize_fp8(torch.randn(pool[used, 1, i].shape, device=DEVICE),
                                            scale)


def dequantized(k_cache, v_cache, block_tables, k_scale, v_scale):
    """The referenced blocks as fp32 caches holding what the fp8 cache means, tables renumbered."""
    used, remapped = torch.unique(block_tables.long(), return_inverse=True)
    return (ref.dequantize_fp8(k_cache[used], k_scale), ref.dequantize_fp8(v_cache[used], v_scale),
            remapped.to(torch.int32))


# -------------------------------------------------------------------------------------------
# quantize / dequantize


@pytest.mark.parametrize("scale", [1.0, 0.037, 3.0])
def test_round_trip_error_bounds(scale):
    # |x| / scale over e4m3's whole range, both signs; scale as a float and as a tensor.
    magnitudes = torch.logspace(-12, 9, 20001, base=2.0, dtype=torch.float64)
    x = (torch.cat([magnitudes, -magnitudes]) * scale).float()
    for s in (scale, torch.tensor([scale])):
        q = ref.quantize_fp8(x, s)
        assert q.dtype == FP8
        back = ref.dequantize_fp8(q, s)
        err = (back - x).abs()
        scaled = x.abs() / scale
        normal = (scaled >= 2.0 ** -6) & (scaled <= ref.FP8_MAX)
        assert (err[normal] <= 2.0 ** -4 * x.abs()[normal] * (1 + 1e-6)).all()  # 3 mantissa bits
        subnormal = scaled < 2.0 ** -6  # spacing 2^-9: half of it at most
        assert (err[subnormal] <= 2.0 ** -10 * scale * (1 + 1e-6)).all()
        saturated = scaled > ref.FP8_MAX
        assert torch.equal(back[saturated], torch.sign(x[saturated]) * ref.FP8_MAX * scale)
        assert torch.isfinite(back).all()


def test_quantize_is_nearest_even_and_saturates():
    grid = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    grid = grid[torch.isfinite(grid)].unique()  # the 253 finite values, -0 merged with 0
    assert torch.equal(ref.dequantize_fp8(ref.quantize_fp8(grid, 1.0), 1.0), grid)
    mids = (grid[1:] + grid[:-1]) / 2
    # A tie goes to the neighbour whose code (so mantissa) is even.
    lower_even = as_bytes(ref.quantize_fp8(grid[:-1], 1.0)) % 2 == 0
    expected = torch.where(lower_even, grid[:-1], grid[1:])
    assert torch.equal(ref.dequantize_fp8(ref.quantize_fp8(mids, 1.0), 1.0), expected)
    big = torch.tensor([449.0, 1e6, float("inf"), -float("inf")])
    assert ref.dequantize_fp8(ref.quantize_fp8(big, 1.0), 1.0).tolist() == [448, 448, 448, -448]


def test_scales_are_required_exactly_for_fp8():
    _, k_cache, v_cache = make_cache(4, 8, 1, 16, dtype=FP8)
    k = torch.randn(2, 1, 16, device=DEVICE)
    slots = torch.tensor([0, 9], device=DEVICE)
    k_scale, v_scale = scales(1.0, 1.0)
    for write in (pa.write_kv, ref.write_kv):
        with pytest.raises(AssertionError, match="needs k_scale"):
            write(k_cache, v_cache, k, k, slots)
        with pytest.raises(AssertionError):  # a float64 scale
            write(k_cache, v_cache, k, k, slots, k_scale=k_scale.double(), v_scale=v_scale)
    _, k32, v32 = make_cache(4, 8, 1, 16)
    with pytest.raises(AssertionError, match="scales given"):
        pa.write_kv(k32, v32, k, k, slots, k_scale=k_scale, v_scale=v_scale)


# -------------------------------------------------------------------------------------------
# write_kv


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_write_kv_fp8_stores_reference_bytes(dtype):
    gen = torch.Generator().manual_seed(20)
    num_blocks, block_size, num_kv_heads, head_dim = 10, 16, 3, 32
    pool, k_cache, v_cache = make_cache(num_blocks, block_size, num_kv_heads, head_dim, FP8)
    pool.view(torch.uint8).copy_(torch.randint(0, 120, pool.shape, generator=gen))
    expected = pool.clone()
    num_tokens = 19
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[[0, 7]] = -1  # graph-bucket padding
    k = realistic((num_tokens, num_kv_heads, head_dim), 12, gen)
    v = realistic((num_tokens, num_kv_heads, head_dim), 12, gen)
    # A power of two keeps the special values below exact; outliers of K and V saturate.
    k_scale, v_scale = scales(2.0 ** -5, 0.011)
    # Ties between e4m3 neighbours, subnormals, signed zeros, values past the range.
    grid = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    grid = grid[torch.isfinite(grid)].unique()
    special = torch.cat([(grid[1:] + grid[:-1]) / 2, grid, torch.tensor([-0.0, 1e-30, 1e4])])
    k.view(-1)[:special.numel()] = special * k_scale.cpu()
    v.view(-1)[[101, 295]] = float("nan")  # tokens 1 and 3 (not padding): stored as 0
    k, v = k.to(dtype).to(DEVICE), v.to(dtype).to(DEVICE)
    slots = slots.to(DEVICE)
    pa.write_kv(k_cache, v_cache, k, v, slots, k_scale=k_scale, v_scale=v_scale)
    assert v_cache.stride(-1) == block_size  # an fp8 pool stores V transposed (kv_cache.py)
    ref.write_kv(*fp8_layer_views(expected[:, 1]), k, v, slots,
                 k_scale=k_scale, v_scale=v_scale)
    assert torch.equal(as_bytes(pool), as_bytes(expected))  # layer 0 and other slots untouched
    kept = slots >= 0
    blocks, rows = slots[kept] // block_size, slots[kept] % block_size
    for cache, x, scale in ((k_cache, k, k_scale), (v_cache, v, v_scale)):
        stored = as_bytes(cache[blocks, rows])
        assert torch.equal(stored, as_bytes(ref.quantize_fp8(x, scale)[kept]))
    assert torch.isfinite(pool.float()).all()


# -------------------------------------------------------------------------------------------
# attention over an fp8 cache: the kernels against the reference on the dequantized cache


def v_view(pool: torch.Tensor, v_cache: torch.Tensor, v_transposed: bool) -> torch.Tensor:
    """The pool's V view (transposed pages, as fp8 pools store V), or the second half of each
    layer region read as V with head_dim contiguous (the layout the kernels also take: its bytes
    overlap some heads' K pages, which is no matter to a test that only reads)."""
    assert v_cache.stride(-1) != 1
    return v_cache if v_transposed else pool[:, 1, 1]


def fp8_decode_case(seq_lens, max_blocks, spare_blocks, num_kv_heads, group, head_dim,
                    block_size, dtype, v_transposed=True):
    """A filled fp8 cache for ``seq_lens`` and queries in ``dtype``: (q, K view, V view, block
    tables, seq lens, K scale, V scale, fp32 attention over the dequantized cache)."""
    num_blocks = len(seq_lens) * max_blocks + spare_blocks
    pool, k_cache, v_cache = make_cache(num_blocks, block_size, num_kv_heads, head_dim, FP8)
    v_cache = v_view(pool, v_cache, v_transposed)
    block_tables = random_block_tables(len(seq_lens), max_blocks, num_blocks)
    k_scale, v_scale = scales(0.012, 0.009)
    fill_fp8(pool, block_tables, k_scale, v_scale)
    q = torch.randn(len(seq_lens), num_kv_heads * group, head_dim, device=DEVICE).to(dtype)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    kf, vf, bt = dequantized(k_cache, v_cache, block_tables, k_scale, v_scale)
    expected = ref.paged_decode_attention(q.float(), kf, vf, bt, seq_lens_t)
    return q, k_cache, v_cache, block_tables, seq_lens_t, k_scale, v_scale, expected


@pytest.mark.parametrize("v_transposed", [True, False])
@pytest.mark.parametrize("group,head_dim,block_size,num_splits,dtype", [
    (1, 64, 16, 1, torch.float32), (4, 128, 32, 3, torch.float32), (8, 64, 16, None, torch.float32),
    (7, 64, 16, 2, torch.float32), (4, 64, 16, 2, torch.float16)])
def test_decode_fp8_matches_reference(group, head_dim, block_size, num_splits, dtype,
                                      v_transposed):
    torch.manual_seed(21)
    max_blocks = 10
    q, k_cache, v_cache, block_tables, seq_lens_t, k_scale, v_scale, expected = fp8_decode_case(
        [0, 1, block_size + 1, max_blocks * block_size - 3], max_blocks, 3, 2, group, head_dim,
        block_size, dtype, v_transposed)
    out = pa.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens_t,
                                    num_splits=num_splits, k_scale=k_scale, v_scale=v_scale)
    assert out.dtype == dtype and torch.all(out[0] == 0)
    assert_close(out[1:], expected[1:], dtype)
    # The reference's own fp8 path reads the same values.
    own = ref.paged_decode_attention(q.float(), k_cache, v_cache, block_tables, seq_lens_t,
                                     k_scale=k_scale, v_scale=v_scale)
    assert_close(own[1:], expected[1:], torch.float32)


def test_bf16_queries_past_fp16s_range_are_scaled_not_overflowed():
    """fp8 tiles widen to fp16, which ends at 65504, where bf16 queries go on: the kernels scale
    such a tile down by a power of two (it was inf, then NaN). The same logits as small queries
    with the scale taken back: 2^17 times the queries, 2^-17 times the softmax scale."""
    torch.manual_seed(29)
    max_blocks, head_dim = 4, 64
    q, k_cache, v_cache, block_tables, seq_lens_t, k_scale, v_scale, expected = fp8_decode_case(
        [1, 17, 50], max_blocks, 2, 2, 4, head_dim, 16, torch.bfloat16, True)
    big = q * 2.0 ** 17  # (exact in bf16)
    assert big.abs().max() > 65504
    scale = head_dim ** -0.5 / 2 ** 17
    out = pa.paged_decode_attention(big, k_cache, v_cache, block_tables, seq_lens_t, scale=scale,
                                    k_scale=k_scale, v_scale=v_scale)
    assert torch.isfinite(out).all()
    assert_close(out, expected, torch.bfloat16)
    starts = torch.tensor([0, 1, 2, 3], dtype=torch.int32, device=DEVICE)  # a token each
    out = pa.paged_prefill_attention(big, k_cache, v_cache, block_tables, starts, seq_lens_t, 1,
                                     scale=scale, k_scale=k_scale, v_scale=v_scale)
    assert torch.isfinite(out).all()
    assert_close(out, expected, torch.bfloat16)


def one_head_fp8_cache(max_blocks: int):
    """A 12-block fp8 pool (block 16, one KV head of 64) filled for two sequences of up to
    ``max_blocks`` blocks: (pool, K view, V view, block tables, K scale, V scale)."""
    pool, k_cache, v_cache = make_cache(12, 16, 1, 64, FP8)
    block_tables = random_block_tables(2, max_blocks, 12)
    k_scale, v_scale = scales(0.012, 0.02)
    fill_fp8(pool, block_tables, k_scale, v_scale)
    return pool, k_cache, v_cache, block_tables, k_scale, v_scale


def test_scales_are_read_at_launch():
    """Scales live in device memory: a captured graph follows a recalibration. Doubling V's scale
    doubles the output exactly; a new K scale gives the reference's answer for it."""
    torch.manual_seed(22)
    pool, k_cache, v_cache, block_tables, k_scale, v_scale = one_head_fp8_cache(5)
    q = torch.randn(2, 4, 64, device=DEVICE)
    seq_lens = torch.tensor([70, 33], dtype=torch.int32, device=DEVICE)

    def decode():
        return pa.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens,
                                         num_splits=2, k_scale=k_scale, v_scale=v_scale)

    before = decode()
    v_scale.mul_(2)
    assert torch.equal(decode(), 2 * before)
    k_scale.fill_(0.02)
    expected = ref.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens,
                                          k_scale=k_scale, v_scale=v_scale)
    assert_close(decode(), expected, torch.float32)


def test_transposed_v_reads_whole_pages_but_weighs_only_the_sequence():
    """With V transposed the kernels read the last page whole: rows past the sequence hold
    whatever an earlier request left (finite), and must get weight 0. Filled with e4m3's
    largest value, any weight on them would show."""
    torch.manual_seed(24)
    block_size, head_dim, group = 16, 64, 4
    pool, k_cache, v_cache, block_tables, k_scale, v_scale = one_head_fp8_cache(4)
    seq_lens = [37, 50]
    for i, n in enumerate(seq_lens):  # the last page's rows past the sequence, K and V
        last = block_tables[i, (n - 1) // block_size].long()
        for cache in (k_cache, v_cache):
            cache[last, n % block_size:] = torch.tensor(ref.FP8_MAX).to(FP8)
    q = torch.randn(2, group, head_dim, device=DEVICE)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    kf, vf, bt = dequantized(k_cache, v_cache, block_tables, k_scale, v_scale)
    out = pa.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens_t,
                                    num_splits=1, k_scale=k_scale, v_scale=v_scale)
    assert_close(out, ref.paged_decode_attention(q, kf, vf, bt, seq_lens_t), torch.float32)
    starts = torch.tensor([0, 5, 8], dtype=torch.int32, device=DEVICE)  # last 5 and 3 tokens
    qp = torch.randn(8, group, head_dim, device=DEVICE)
    out = pa.paged_prefill_attention(qp, k_cache, v_cache, block_tables, starts, seq_lens_t, 5,
                                     k_scale=k_scale, v_scale=v_scale)
    expected = ref.paged_prefill_attention(qp, kf, vf, bt, [0, 5, 8], seq_lens)
    assert_close(out, expected, torch.float32)


@pytest.mark.parametrize("flat_grid,v_transposed", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("group,head_dim,block_size,dtype", [
    (1, 64, 16, torch.float32), (4, 128, 32, torch.float32), (7, 64, 16, torch.float32),
    (4, 64, 16, torch.float16)])
def test_prefill_fp8_matches_reference(group, head_dim, block_size, dtype, flat_grid,
                                       v_transposed):
    torch.manual_seed(23)
    pairs = [(7, 7), (5, 40), (1, 17), (0, 9), (20, 20 + 2 * block_size)]
    run_prefill_fp8(pairs, group, head_dim, block_size, dtype, flat_grid,
                    v_transposed=v_transposed)


def run_prefill_fp8(pairs, group, head_dim, block_size, dtype, flat_grid, num_kv_heads=2,
                    v_transposed=True):
    query_lens, seq_lens = [p[0] for p in pairs], [p[1] for p in pairs]
    max_blocks = -(-max(seq_lens) // block_size)
    num_blocks = len(pairs) * max_blocks + 3
    pool, k_cache, v_cache = make_cache(num_blocks, block_size, num_kv_heads, head_dim, FP8)
    v_cache = v_view(pool, v_cache, v_transposed)
    block_tables = random_block_tables(len(pairs), max_blocks, num_blocks)
    k_scale, v_scale = scales(0.012, 0.009)
    fill_fp8(pool, block_tables, k_scale, v_scale)
    num_tokens = sum(query_lens)
    q = torch.randn(num_tokens, num_kv_heads * group, head_dim, device=DEVICE).to(dtype)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    out = pa.paged_prefill_attention(
        q, k_cache, v_cache, block_tables, torch.tensor(starts, dtype=torch.int32, device=DEVICE),
        torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        None if flat_grid else max(query_lens), k_scale=k_scale, v_scale=v_scale)
    kf, vf, bt = dequantized(k_cache, v_cache, block_tables, k_scale, v_scale)
    expected = ref.paged_prefill_attention(q.float(), kf, vf, bt, starts, seq_lens)
    assert out.dtype == dtype
    assert_close(out, expected, dtype)
    own = ref.paged_prefill_attention(q.float(), k_cache, v_cache, block_tables, starts, seq_lens,
                                      k_scale=k_scale, v_scale=v_scale)
    assert_close(own, expected, torch.float32)


def test_fp8_pool_stores_each_heads_k_and_v_pages_in_one_run():
    """An fp8 block's layer region is [Hkv, 2, block_size * D]: head h's K page [block_size, D]
    and then its V page transposed [D, block_size], one run of bytes (kv_cache.py); the views
    index [block, token, head, d] into exactly those bytes."""
    block_size, heads, head_dim = 4, 3, 8
    pool, k_cache, v_cache = make_cache(5, block_size, heads, head_dim, FP8, num_layers=2,
                                        layer=1)
    page = block_size * head_dim
    region = pool[2, 1].reshape(heads, 2, page)  # block 2, layer 1
    codes = torch.arange(heads * 2 * page, dtype=torch.uint8, device=pool.device).view(FP8)
    codes = codes.reshape(heads, 2, page)
    region.copy_(codes)
    for h in range(heads):
        assert torch.equal(as_bytes(k_cache[2, :, h]), as_bytes(codes[h, 0].view(block_size,
                                                                                 head_dim)))
        assert torch.equal(as_bytes(v_cache[2, :, h]), as_bytes(codes[h, 1].view(
            head_dim, block_size).t()))
    assert v_cache.stride(-1) == block_size and k_cache.stride(2) == 2 * page
    assert pool[[0, 1, 3, 4]].view(torch.uint8).eq(0).all()  # nothing else written


def test_decode_kv_bytes_counts_the_cache_dtype():
    # As benchmarks/attention_kernels.py counts: 2 (K, V) x tokens x Hkv x D x element size.
    for dtype, elem in ((torch.bfloat16, 2), (FP8, 1)):
        _, k_cache, _ = make_cache(4, 16, 8, 128, dtype)
        assert pa.decode_kv_bytes(k_cache, 64 * 2048) == 2 * 64 * 2048 * 8 * 128 * elem


# -------------------------------------------------------------------------------------------
# accuracy of an fp8 cache on realistic values (the reference: same values as the kernels)


def attention_errors(ctx: int, head_dim: int, group: int, q_dtype: torch.dtype,
                     gen: torch.Generator, num_seqs: int = 4, query_len: int = 32) -> dict:
    """{(kind, cache): (max |err|, mean |err| / rms(exact))} of decode and prefill (each
    sequence's last ``query_len`` tokens) over an fp8 cache (per-tensor scales = amax / 448) and a
    bf16 cache, against fp32 attention on the unquantized K/V. V's rms is about 1, so the max is
    also relative to the scale of the values that attention averages."""
    num_kv_heads, block_size = 2, 16
    num_blocks = num_seqs * ctx // block_size
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    num_outliers = max(4, num_blocks * block_size * num_kv_heads * head_dim // 10000)
    k, v = realistic(shape, num_outliers, gen), realistic(shape, num_outliers, gen)
    k_scale = (k.abs().amax() / ref.FP8_MAX).reshape(1)
    v_scale = (v.abs().amax() / ref.FP8_MAX).reshape(1)
    caches = {
        "fp32": (k, v, {}),
        "fp8": (ref.quantize_fp8(k, k_scale), ref.quantize_fp8(v, v_scale),
                {"k_scale": k_scale, "v_scale": v_scale}),
        "bf16": (k.bfloat16().to(q_dtype), v.bfloat16().to(q_dtype), {}),
    }
    block_tables = torch.randperm(num_blocks, generator=gen).view(num_seqs, -1).to(torch.int32)
    seq_lens = torch.full((num_seqs,), ctx, dtype=torch.int32)
    q_decode = torch.randn(num_seqs, num_kv_heads * group, head_dim, generator=gen)
    q_prefill = torch.randn(num_seqs * query_len, num_kv_heads * group, head_dim, generator=gen)
    starts = list(range(0, (num_seqs + 1) * query_len, query_len))

    def attend(kind, name):
        kc, vc, kv_scales = caches[name]
        if kind == "decode":
            q = q_decode if name == "fp32" else q_decode.to(q_dtype)
            return ref.paged_decode_attention(q, kc, vc, block_tables, seq_lens, **kv_scales)
        q = q_prefill if name == "fp32" else q_prefill.to(q_dtype)
        return ref.paged_prefill_attention(q, kc, vc, block_tables, starts, [ctx] * num_seqs,
                                           **kv_scales)

    errors = {}
    for kind in ("decode", "prefill"):
        exact = attend(kind, "fp32")
        rms = exact.pow(2).mean().sqrt()
        for name in ("fp8", "bf16"):
            err = (attend(kind, name).float() - exact).abs()
            errors[kind, name] = (err.max().item(), (err.mean() / rms).item())
    return errors


@pytest.mark.parametrize("ctx,head_dim,group,q_dtype", [
    (256, 64, 4, torch.float32), (2048, 128, 4, torch.float32), (2048, 128, 4, torch.bfloat16)])
def test_fp8_attention_error_on_realistic_values(ctx, head_dim, group, q_dtype):
    errors = attention_errors(ctx, head_dim, group, q_dtype, torch.Generator().manual_seed(24))
    for (kind, name), (max_err, mean_err) in errors.items():
        print(f"ctx {ctx} d {head_dim} q {q_dtype} {kind} {name} cache: max |err| {max_err:.3f}"
              f", mean |err| / rms(out) {mean_err:.4f}")
    for kind in ("decode", "prefill"):
        (max_fp8, mean_fp8), (_, mean_bf16) = errors[kind, "fp8"], errors[kind, "bf16"]
        # e4m3 keeps 3 mantissa bits, bf16 7: an error of a few percent, several times bf16's.
        # The max comes from outlier keys: a 1/16 error of a key of 20 moves its logit.
        assert mean_fp8 < 0.05 and max_fp8 < 0.5
        assert mean_bf16 < mean_fp8 / 5


# -------------------------------------------------------------------------------------------
# GPU: bf16 queries, long contexts, the hardware's fp8 conversions, graph capture


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_write_kv_fp8_gpu_bytes(dtype):
    gen = torch.Generator().manual_seed(30)
    pool, k_cache, v_cache = make_cache(300, 16, 8, 128, FP8)
    slots = torch.randperm(300 * 16, generator=gen)[:1000].to(DEVICE)
    k = (realistic((1000, 8, 128), 100, gen) * 3).to(dtype).to(DEVICE)
    v = realistic((1000, 8, 128), 100, gen).to(dtype).to(DEVICE)
    k_scale, v_scale = scales(0.05, 0.01)
    expected = pool.clone()
    pa.write_kv(k_cache, v_cache, k, v, slots, k_scale=k_scale, v_scale=v_scale)
    ref.write_kv(*fp8_layer_views(expected[:, 1]), k, v, slots,
                 k_scale=k_scale, v_scale=v_scale)
    assert torch.equal(as_bytes(pool), as_bytes(expected))


@pytest.mark.gpu
@pytest.mark.parametrize("group,head_dim,block_size", [(1, 128, 16), (4, 128, 16), (8, 64, 32)])
@pytest.mark.parametrize("num_splits", [None, 1, 8])
def test_decode_fp8_gpu_large(group, head_dim, block_size, num_splits):
    torch.manual_seed(31)
    pool, k_cache, v_cache, block_tables, seq_lens, q = large_decode_case(
        block_size, head_dim, group, FP8, torch.bfloat16)
    k_scale, v_scale = scales(0.012, 0.009)
    fill_fp8(pool, block_tables, k_scale, v_scale)
    out = pa.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens,
                                    num_splits=num_splits, k_scale=k_scale, v_scale=v_scale)
    kf, vf, bt = dequantized(k_cache, v_cache, block_tables, k_scale, v_scale)
    expected = ref.paged_decode_attention(q.float(), kf, vf, bt, seq_lens)
    assert torch.all(out[0] == 0)
    assert_close(out[1:], expected[1:], torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("group,head_dim,block_size", [(1, 128, 16), (4, 128, 32), (7, 128, 16)])
@pytest.mark.parametrize("flat_grid", [False, True])
def test_prefill_fp8_gpu_large(group, head_dim, block_size, flat_grid):
    torch.manual_seed(32)
    pairs = [(2048, 2048), (512, 8300), (1, 5000), (300, 300), (129, 4000), (0, 64)]
    run_prefill_fp8(pairs, group, head_dim, block_size, torch.bfloat16, flat_grid)


@pytest.mark.gpu
def test_decode_fp8_cuda_graph_replay_and_recalibration():
    torch.manual_seed(33)
    block_size, head_dim, group, num_kv_heads = 16, 128, 4, 2
    num_seqs, max_blocks, num_blocks = 8, 64, 8 * 64 + 3
    pool, k_cache, v_cache = make_cache(num_blocks, block_size, num_kv_heads, head_dim, FP8)
    k_scale, v_scale = scales(0.01, 0.02)
    fill_fp8(pool, torch.arange(num_blocks, device=DEVICE)[None], k_scale, v_scale)
    q = torch.randn(num_seqs, num_kv_heads * group, head_dim, device=DEVICE).bfloat16()
    block_tables = random_block_tables(num_seqs, max_blocks, num_blocks)
    seq_lens = torch.ones(num_seqs, dtype=torch.int32, device=DEVICE)
    out = torch.empty_like(q)

    def decode():
        pa.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, out=out,
                                  k_scale=k_scale, v_scale=v_scale)

    decode()  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode()
    for trial in range(3):
        q.copy_(torch.randn_like(q))
        block_tables.copy_(random_block_tables(num_seqs, max_blocks, num_blocks))
        lens = torch.randint(0, max_blocks * block_size + 1, (num_seqs,), dtype=torch.int32)
        lens[trial] = 0
        seq_lens.copy_(lens)
        k_scale.fill_(0.01 * (trial + 1))  # recalibrated after capture
        v_scale.fill_(0.02 / (trial + 1))
        graph.replay()
        expected = ref.paged_decode_attention(q.float(), ref.dequantize_fp8(k_cache, k_scale),
                                              ref.dequantize_fp8(v_cache, v_scale), block_tables,
                                              seq_lens)
        live = lens.to(DEVICE) > 0
        assert torch.all(out[~live] == 0)
        assert_close(out[live], expected[live], torch.bfloat16)
