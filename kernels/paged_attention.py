"""Triton paged attention: KV write, split-KV decode, varlen causal prefill (see reference.py).

All kernels read one layer of the pool through strided views (see fairswitch/kv/kv_cache.py):

    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], head_dim contiguous;
                      stride(0) spans every layer of a block, so block offsets are int64.
    block_tables:     [num_seqs, max_blocks] int32

Token at position p of a sequence lives in block block_table[p // block_size], row p % block_size.

GQA: one program serves all ``group = num_heads // num_kv_heads`` query heads of a KV head, so each
KV tile is loaded once and multiplied against the whole group (tl.dot, the group as the M dim).

Decode splits each sequence's KV into ``num_splits`` contiguous ranges ("flash decoding"). The
ranges are computed in the kernel from seq_lens, so the grid depends only on shapes and the launch
can be captured in a CUDA graph; seq_len 0 rows (graph padding) produce zeros and read nothing:

    seq_len ──────────────────────────────────────────►
    | split 0        | split 1        | split 2  |      (split_len = BLOCK_N-aligned ceil)
      partial (m, l, acc) per split ──► _decode_reduce_kernel ──► out

Decode with one split writes the output directly and skips the reduction launch.

FP8 cache (float8_e4m3fn, see reference.py): write_kv quantizes; attention loads 1-byte tiles and
widens them in registers to the query dtype, fp16 for bf16 queries (exact: every e4m3 value is an
fp16 value). The per-tensor scales are factored out of the sums: K's multiplies the softmax
scale, V's the normalized output. Scales are read through 1-element device tensors, so a captured
graph follows a recalibration. A bf16/fp16/fp32 cache compiles to the same code as without FP8
(KV_FP8 is a constexpr).

V may be stored transposed in each block, a head's page [D, block_size] (fp8 pools are: see
fairswitch/kv/kv_cache.py), which the V view's strides say (stride over tokens 1, over D
block_size; V_T is a constexpr). The product with P sums over tokens, so the MMA wants V with
tokens contiguous: a 16-bit tile is transposed by ldmatrix on its way from shared memory, a 1-byte
one cannot be and was staged through shared memory again as fp16. Transposed in the cache, V is
loaded as V^T [D, BLOCK_N] in whole pages (16-byte copies) and takes K's path to the MMA.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from fairswitch.kernels import reference

_LOG2E = 1.4426950408889634
_FP8_MAX = tl.constexpr(reference.FP8_MAX)


# ---------------------------------------------------------------------------------------------
# write_kv


@triton.jit
def _quantize_e4m3(x, scale):
    """x / scale clamped to +-448 and rounded to nearest e4m3 (ties to even), as fp8; NaN
    stores 0 (the pool holds only finite values: transposed V is read in whole pages).

    The rounding is done in fp32 arithmetic that is exact (powers of two, small integers), so
    the final cast only changes the type: the bytes equal torch's cast on the GPU and under
    Triton's interpreter, whose own fp32 -> fp8 cast rounds ties away and can lose a carry.
    """
    y = tl.div_rn(x.to(tl.float32), scale)  # IEEE division
    y = tl.clamp(tl.where(y == y, y, 0.0), -_FP8_MAX, _FP8_MAX)  # noqa: PLR0124 (NaN)
    bits = y.to(tl.int32, bitcast=True)
    # e4m3 keeps 3 mantissa bits: spacing 2^(e-3) for |y| in [2^e, 2^(e+1)), and 2^-9 below
    # 2^-6 (subnormals). Biased fp32 exponent 121 is 2^-6.
    exp = tl.maximum((bits >> 23) & 0xFF, 121)
    ulp = ((exp - 3) << 23).to(tl.float32, bitcast=True)
    inv_ulp = ((257 - exp) << 23).to(tl.float32, bitcast=True)
    n = tl.abs(y) * inv_ulp  # in [0, 16)
    whole = tl.floor(n)
    frac = n - whole
    odd = (whole.to(tl.int32) & 1) == 1
    rounded = (whole + ((frac > 0.5) | ((frac == 0.5) & odd)).to(tl.float32)) * ulp
    sign = bits & -2147483648  # keeps -0.0 negative, as torch does
    return (rounded.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True).to(
        tl.float8e4nv)


@triton.jit
def _write_kv_kernel(
    k_ptr,  # [T, Hkv, D]
    v_ptr,  # [T, Hkv, D]
    k_cache_ptr,  # [num_blocks, block_size, Hkv, D] (strided view)
    v_cache_ptr,  # [num_blocks, block_size, Hkv, D] (strided view)
    k_scale_ptr, v_scale_ptr,  # [1] fp32, read only when KV_FP8
    slot_mapping_ptr,  # [T] int32/int64, -1 = padding
    num_kv_heads,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch,
    stride_vcb, stride_vcs, stride_vch,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    KV_FP8: tl.constexpr,
    V_T: tl.constexpr,  # V stored [D, block_size] a head per block (module docstring)
):
    # grid: (T, cdiv(Hkv, BLOCK_H))
    t = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
    # A padding slot stores no head (masked, not branched on); max() keeps its addresses in bounds.
    num_stored_heads = tl.where(slot >= 0, num_kv_heads, 0)
    mask = (heads[:, None] < num_stored_heads) & (offs_d[None, :] < HEAD_DIM)
    slot = tl.maximum(slot, 0)
    block, row = slot // BLOCK_SIZE, slot % BLOCK_SIZE
    t64 = t.to(tl.int64)
    k = tl.load(k_ptr + t64 * stride_kt + heads[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(v_ptr + t64 * stride_vt + heads[:, None] * stride_vh + offs_d[None, :], mask=mask)
    if KV_FP8:
        k = _quantize_e4m3(k, tl.load(k_scale_ptr))
        v = _quantize_e4m3(v, tl.load(v_scale_ptr))
    kc = k_cache_ptr + block * stride_kcb + row * stride_kcs
    vc = v_cache_ptr + block * stride_vcb + row * stride_vcs
    tl.store(kc + heads[:, None] * stride_kch + offs_d[None, :], k, mask=mask)
    stride_vcd: tl.constexpr = BLOCK_SIZE if V_T else 1
    tl.store(vc + heads[:, None] * stride_vch + offs_d[None, :] * stride_vcd, v, mask=mask)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
             v_scale: torch.Tensor | None = None) -> None:
    """Store k, v [T, Hkv, D] at slot = block * block_size + row; slot -1 is skipped.

    An fp8 cache stores quantize_fp8(k, k_scale), quantize_fp8(v, v_scale) (reference.py)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    block_size, v_t = _check_cache(k_cache, v_cache, num_kv_heads, head_dim)
    kv_fp8 = reference.check_kv_scales(k_cache.dtype, k_scale, v_scale)
    assert v.shape == k.shape and k.dtype == v.dtype, (k.shape, v.shape, k.dtype, v.dtype)
    assert kv_fp8 or k.dtype == k_cache.dtype, (k.dtype, k_cache.dtype)
    assert k.stride(-1) == 1 and v.stride(-1) == 1, "head_dim must be contiguous"
    assert slot_mapping.shape == (num_tokens,), (slot_mapping.shape, num_tokens)
    assert slot_mapping.dtype in (torch.int32, torch.int64), slot_mapping.dtype
    if num_tokens == 0:
        return
    block_h = min(triton.next_power_of_2(num_kv_heads), max(1, 4096 // head_dim))
    grid = (num_tokens, triton.cdiv(num_kv_heads, block_h))
    _write_kv_kernel[grid](
        k, v, k_cache, v_cache, *_scale_ptrs(k_scale, v_scale, k), slot_mapping, num_kv_heads,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_H=block_h, KV_FP8=kv_fp8, V_T=v_t,
    )


# ---------------------------------------------------------------------------------------------
# Shared inner step: one KV tile of online softmax for a block of query rows.


@triton.jit
def _fp8_query(q, qk_scale):
    """The queries in the dtype fp8 tiles widen to, and the logits' scale that goes with them:
    fp16 for bf16 queries, since fp8 -> fp16 is one instruction for two values and fp8 -> bf16
    several. fp16 has more mantissa bits than bf16 but ends at 65504, where bf16 goes on: a
    tile whose largest |value| passes 32768 is scaled down by the power of two that brings it to
    32768 or less, and the scale takes it back. Exact, but for values that the scaling takes
    below fp16's normal range (2^-14): those keep fewer bits."""
    if q.dtype == tl.bfloat16:
        qf = q.to(tl.float32)
        amax = tl.max(tl.max(tl.abs(qf), 1), 0)
        shift = tl.where(amax > 32768.0, tl.ceil(tl.log2(amax / 32768.0)), 0.0)
        q = (qf * tl.exp2(-shift)).to(tl.float16)
        qk_scale = qk_scale * tl.exp2(shift)
    return q, qk_scale


@triton.jit
def _tile_pages(block_table_ptr, n0, kv_end, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Positions n0 .. n0 + BLOCK_N (n0 a multiple of BLOCK_N): (row within its block, valid
    below kv_end, its whole page valid, the page's block id as int64). The page mask says that it
    is constant over a page here, where it is computed: a hint on a function's argument would be
    lost (Triton attaches hints to the operation that defines the value)."""
    PAGE: tl.constexpr = min(BLOCK_SIZE, BLOCK_N)
    pos = n0 + tl.arange(0, BLOCK_N)
    kv_mask = pos < kv_end
    row = pos % BLOCK_SIZE
    page_mask = tl.max_constancy(pos - row < kv_end, [PAGE])  # the last page's rows past kv_end
    page = tl.load(block_table_ptr + pos // BLOCK_SIZE, mask=page_mask, other=0).to(tl.int64)
    return row, kv_mask, page_mask, page


@triton.jit
def _load_vt(v_cache_ptr, page, row, page_mask, kvh, stride_vb, stride_vh,
             HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """V^T [D, BLOCK_N] from a pool that stores V transposed: element (d, token) at page *
    stride_vb + kvh * stride_vh + d * BLOCK_SIZE + row. Whole pages are read (the rows past
    kv_end of the last page hold finite values, old or zero, and P is 0 there), and the hints
    say what the block-table gather hides: a page's tokens are contiguous."""
    PAGE: tl.constexpr = min(BLOCK_SIZE, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    vt_off = (page * stride_vb + row + kvh * stride_vh)[None, :] + offs_d[:, None] * BLOCK_SIZE
    vt_off = tl.max_contiguous(tl.multiple_of(vt_off, [1, PAGE]), [1, PAGE])
    return tl.load(v_cache_ptr + vt_off, mask=page_mask[None, :], other=0.0)


@triton.jit
def _attend_tile(
    q, acc, m_i, l_i,  # q [M, D]; acc [M, D] fp32; m_i, l_i [M] fp32 (log2 domain)
    k_cache_ptr, v_cache_ptr,  # [num_blocks, block_size, Hkv, D] (strided views), any dtype
    block_table_ptr,  # [max_blocks] int32, this sequence's row
    n0, kv_end, kvh, row_pos, qk_scale,  # row_pos [M]: absolute position of each query row
    one,  # 1.0, a value the compiler cannot see: multiplies the widened V tile when STAGE_V
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, STAGE_V: tl.constexpr,
    V_T: tl.constexpr,
):
    pos = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row, kv_mask, page_mask, page = _tile_pages(block_table_ptr, n0, kv_end, BLOCK_SIZE, BLOCK_N)
    k_off = page * stride_kb + row * stride_ks + kvh * stride_kh
    # .to(q.dtype): an fp8 tile widens in registers (a no-op for a cache in the query dtype).
    k = tl.load(k_cache_ptr + k_off[:, None] + offs_d[None, :], mask=kv_mask[:, None],
                other=0.0).to(q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    visible = kv_mask[None, :]
    if CAUSAL:
        visible = visible & (pos[None, :] <= row_pos[:, None])
    s = tl.where(visible, s, float("-inf"))
    # Every row sees key 0 in the first tile it processes, so m_new is finite from then on.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if V_T:
        v = tl.trans(_load_vt(v_cache_ptr, page, row, page_mask, kvh, stride_vb, stride_vh,
                              HEAD_DIM, BLOCK_SIZE, BLOCK_N).to(q.dtype))
    else:
        v_off = page * stride_vb + row * stride_vs + kvh * stride_vh
        v = tl.load(v_cache_ptr + v_off[:, None] + offs_d[None, :], mask=kv_mask[:, None],
                    other=0.0).to(q.dtype)
    if STAGE_V and not V_T:
        # The product with P reduces over V's rows, so the MMA wants V transposed, and ldmatrix
        # transposes only 16-bit elements: a bare widening is moved by Triton into the MMA
        # operand layout, which then reads the fp8 tile from shared memory a byte at a time
        # (sm_90 SASS: 128 LDS.U8 per thread per 128-token tile). Multiplied by a run-time 1.0
        # (exact: the values do not change) the tile widens in registers instead and is staged
        # as fp16 for ldmatrix.trans (tests/test_kernel_codegen.py).
        v = v * tl.cast(one, q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


# ---------------------------------------------------------------------------------------------
# Decode


# Arguments that vary from step to step are not specialized on (Triton otherwise compiles a new
# variant when one becomes 1 or a multiple of 16: a second-long stall in the middle of serving).
@triton.jit(do_not_specialize=["num_splits", "stride_bt"])
def _decode_split_kernel(
    q_ptr,  # [B, Hq, D]
    k_cache_ptr,  # [num_blocks, block_size, Hkv, D] (strided view)
    v_cache_ptr,  # [num_blocks, block_size, Hkv, D] (strided view)
    k_scale_ptr, v_scale_ptr,  # [1] fp32, read only when KV_FP8
    block_tables_ptr,  # [B, max_blocks] int32
    seq_lens_ptr,  # [B] int32
    out_ptr,  # [B, Hq, D], written only when WRITE_OUT
    part_o_ptr,  # [B, Hq, num_splits, D] fp32, normalized partial outputs
    part_lse_ptr,  # [B, Hq, num_splits] fp32, log2-sum-exp2 of each split (-inf: empty)
    qk_scale,  # softmax scale * log2(e)
    one,  # 1.0 (see _attend_tile's STAGE_V)
    num_splits,
    stride_qb, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt,
    stride_ob, stride_oh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, WRITE_OUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr, V_T: tl.constexpr,
):
    # grid: (B, Hkv, num_splits); WRITE_OUT (num_splits == 1): normalize into out directly
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    g_mask = offs_g < GROUP
    heads = kvh * GROUP + offs_g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None], other=0.0)
    if KV_FP8:
        q, qk_scale = _fp8_query(q, qk_scale * tl.load(k_scale_ptr))
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, bt_row, n0, end, kvh, offs_g,
            qk_scale, one, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            HEAD_DIM, BLOCK_SIZE, BLOCK_N, False, DOT_PRECISION, KV_FP8, V_T)

    has_keys = l_i > 0  # false for an empty split (seq_len 0 or a short sequence's tail splits)
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    if KV_FP8:
        o = o * tl.load(v_scale_ptr)
    if WRITE_OUT:
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
    else:
        num_heads = tl.num_programs(1) * GROUP
        part = (b * num_heads + heads) * num_splits + split  # [BLOCK_G]
        tl.store(part_o_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], o, mask=g_mask[:, None])
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=g_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_reduce_kernel(
    part_o_ptr,  # [B, Hq, num_splits, D] fp32
    part_lse_ptr,  # [B, Hq, num_splits] fp32
    out_ptr,  # [B, Hq, D]
    num_splits,
    stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # grid: (B, Hq)
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    s_mask = offs_s < num_splits
    part = (b * tl.num_programs(1) + h) * num_splits + offs_s
    lse = tl.load(part_lse_ptr + part, mask=s_mask, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # all empty (seq_len 0): zeros
    w = tl.exp2(lse - lse_max)
    o = tl.load(part_o_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], mask=s_mask[:, None],
                other=0.0)
    w_sum = tl.sum(w, 0)
    out = tl.sum(o * w[:, None], 0) / tl.where(w_sum > 0, w_sum, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))


# Launch configuration by the cache's element size; fp32 tiles take twice the shared memory. On
# the H200, B64 x 32 heads (8 kv) x ctx 2048 x d128 bf16: 64/4/2 reads KV at 0.94 of the
# device-copy bandwidth timed eagerly (= SDPA on contiguous KV; 0.97 in CUDA graphs at d2b9a3b);
# 128/4/3 0.90, 64/8/3 0.70, 256/8/3 0.74. In CUDA graphs at bb25c03 (H200), 64/4/3 against
# 64/4/2: B=256 ctx 1k/2k 0.99/1.01 vs 0.92/0.93, B=128 0.93 vs 0.90, B=16 0.75 alike, B=64
# 0.92-0.97 alike (within 0.01), so bf16 tiles take 3 stages.
# fp8 (bf16 queries): in a CUDA graph the fp8 kernel took as long per tile as bf16 (122 vs 128 us
# at B=64, ctx 2k), bound by widening and staging the tiles for tl.dot, not by the reads; its V
# tile was read from shared memory bytewise until _attend_tile's STAGE_V. Swept after that fix
# (H200, d2b9a3b, fraction of the copy bandwidth at B=64/16/256 x ctx 2k): 64/2/3 0.60/0.45/0.61,
# 64/2/2 0.60/0.45/0.61, 64/4/3 0.59/0.45/0.61, 128/4/3 0.51/0.40/0.62, 128/4/2 0.51/0.41/0.65,
# 64/8/x 0.35/0.31/0.45. A 64-token tile as two 32-token streams, one per warp with its own online
# softmax (fewer instructions and barriers read offline), was timed at 0.37 against 0.63 (H200,
# 4e29fd7) and removed.
DECODE_LAUNCH = {
    1: dict(BLOCK_N=64, num_warps=2, num_stages=3),
    2: dict(BLOCK_N=64, num_warps=4, num_stages=3),
    4: dict(BLOCK_N=32, num_warps=4, num_stages=2),
}


def decode_launch(element_size: int) -> dict:
    """The decode kernel's launch (BLOCK_N, num_warps, num_stages) for a cache of
    ``element_size``-byte elements."""
    return dict(DECODE_LAUNCH[element_size])


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 16  # interpreter: any fixed value keeps the heuristic a function of shapes
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_num_splits(batch: int, num_kv_heads: int, max_context: int, num_sms: int,
                       block_n: int = 64) -> int:
    """Static split count: fill the GPU with (batch * kv_heads * splits) programs in whole waves.

    A pure function of shapes (``max_context = max_blocks * block_size``), never of seq_lens, so a
    captured graph stays valid. Splits shorter than 4 tiles are not worth the reduction.
    On the H200 (32 heads / 8 kv, d128, bf16) it picked the fastest measured split count, or one
    within 6%, for B x ctx = 1x8192 (32 splits: 30 us vs 244 us unsplit), 4x8192, 8x2048,
    16x2048, 16x8192, 32x4096, 64x2048 (1) and 128x1024 (1).
    """
    programs = batch * num_kv_heads
    max_splits = max(1, min(32, max_context // (4 * block_n)))
    slots = 2 * num_sms  # ~two resident programs per SM for these tile sizes
    best, best_eff = 1, 0.0
    for splits in range(1, max_splits + 1):
        waves = programs * splits / slots
        eff = waves / math.ceil(waves)
        if waves < 1:
            eff *= 0.9  # a partial single wave leaves SMs idle: prefer more splits
        if eff > best_eff + 0.05:
            best, best_eff = splits, eff
    return best


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor,
                           scale: float | None = None, num_splits: int | None = None,
                           out: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
                           v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per sequence: q [B, Hq, D] -> [B, Hq, D] (into ``out`` if given)."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads, block_size, v_t, kv_fp8 = _check_inputs(q, k_cache, v_cache, block_tables,
                                                          seq_lens, k_scale, v_scale)
    assert seq_lens.shape == (batch,), (seq_lens.shape, batch)
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride(-1) == 1, out.shape
    if batch == 0:
        return out
    group = num_heads // num_kv_heads
    launch = decode_launch(k_cache.element_size())
    if num_splits is None:
        num_splits = default_num_splits(batch, num_kv_heads, block_tables.shape[1] * block_size,
                                        _num_sms(q.device), launch["BLOCK_N"])
    assert num_splits >= 1, num_splits
    scale = head_dim ** -0.5 if scale is None else scale
    if num_splits > 1:
        part_o = torch.empty((batch, num_heads, num_splits, head_dim), dtype=torch.float32,
                             device=q.device)
        part_lse = torch.empty((batch, num_heads, num_splits), dtype=torch.float32,
                               device=q.device)
    else:
        part_o = part_lse = out  # unused by the kernel
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, *_scale_ptrs(k_scale, v_scale, q), block_tables, seq_lens, out,
        part_o, part_lse, scale * _LOG2E, 1.0,
        num_splits, q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, WRITE_OUT=num_splits == 1, DOT_PRECISION=_dot_precision(q.dtype),
        KV_FP8=kv_fp8, V_T=v_t, **launch,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(batch, num_heads)](
            part_o, part_lse, out, num_splits, out.stride(0), out.stride(1), HEAD_DIM=head_dim,
            BLOCK_S=max(32, triton.next_power_of_2(num_splits)), num_warps=4,  # one variant
        )
    return out


# ---------------------------------------------------------------------------------------------
# Prefill (varlen, causal over cached prefix + new tokens)


@triton.jit(do_not_specialize=["stride_bt", "num_seqs", "num_slots", "search_steps"])
def _prefill_kernel(
    q_ptr,  # [T, Hq, D]
    k_cache_ptr,  # [num_blocks, block_size, Hkv, D] (strided view)
    v_cache_ptr,  # [num_blocks, block_size, Hkv, D] (strided view)
    k_scale_ptr, v_scale_ptr,  # [1] fp32, read only when KV_FP8
    block_tables_ptr,  # [S, max_blocks] int32
    query_start_loc_ptr,  # [S + 1] int32
    seq_lens_ptr,  # [S] int32
    out_ptr,  # [T, Hq, D]
    qk_scale,  # softmax scale * log2(e)
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt,
    stride_ot, stride_oh,
    num_seqs, num_slots, search_steps,  # FLAT_GRID only; search_steps = ceil(log2(num_seqs))
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FLAT_GRID: tl.constexpr, KV_FP8: tl.constexpr, V_T: tl.constexpr,
):
    # The M rows of a program are TOKENS consecutive query tokens x the GROUP query heads of one
    # KV head (row r = token r // GROUP, head r % GROUP), so each KV tile is loaded once per group.
    TOKENS: tl.constexpr = BLOCK_M // GROUP
    if FLAT_GRID:
        # grid: (num_slots = T // TOKENS + S, Hkv), fixed by the shapes (CUDA graphs). Sequence
        # i owns the slots [first(i), first(i + 1)), first(i) = qsl[i] // TOKENS + i: at least
        # cdiv(q_len_i, TOKENS) of them. Find the largest i < S with first(i) <= slot by binary
        # search (first() is strictly increasing, first(0) = 0).
        slot = tl.program_id(0)
        kvh = tl.program_id(1)
        lo = num_seqs * 0
        hi = num_seqs
        for _ in range(search_steps):
            mid = (lo + hi) // 2
            first_mid = tl.load(query_start_loc_ptr + mid) // TOKENS + mid
            lo = tl.where(first_mid <= slot, mid, lo)  # once hi = lo + 1, mid = lo: no change
            hi = tl.where(first_mid <= slot, hi, mid)
        seq = lo
        q_start = tl.load(query_start_loc_ptr + seq)
        t0 = (slot - (q_start // TOKENS + seq)) * TOKENS
    else:
        # grid: (cdiv(max_query_len, TOKENS), S, Hkv)
        seq = tl.program_id(1)
        kvh = tl.program_id(2)
        q_start = tl.load(query_start_loc_ptr + seq)
        t0 = tl.program_id(0) * TOKENS
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if t0 >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix_len = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    t = t0 + rows // GROUP
    row_valid = (rows < TOKENS * GROUP) & (t < q_len)
    t = tl.where(row_valid, t, t0)  # padding rows replay the first token: finite, never stored
    heads = kvh * GROUP + rows % GROUP
    tok = (q_start + t).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :])
    row_pos = prefix_len + t
    if KV_FP8:
        q, qk_scale = _fp8_query(q, qk_scale * tl.load(k_scale_ptr))

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    first_pos = prefix_len + t0
    last_pos = prefix_len + tl.minimum(t0 + TOKENS, q_len) - 1
    # Keys below full_end are visible to every row: no causal mask. The rest up to the causal
    # frontier of the last row are masked; tiles past the frontier are never loaded.
    full_end = (first_pos + 1) // BLOCK_N * BLOCK_N
    for n0 in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, bt_row, n0, full_end, kvh, row_pos,
            qk_scale, 1.0, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            HEAD_DIM, BLOCK_SIZE, BLOCK_N, False, DOT_PRECISION, False, V_T)
    for n0 in range(full_end, last_pos + 1, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, bt_row, n0, last_pos + 1, kvh, row_pos,
            qk_scale, 1.0, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            HEAD_DIM, BLOCK_SIZE, BLOCK_N, True, DOT_PRECISION, False, V_T)

    o = acc / l_i[:, None]
    if KV_FP8:
        o = o * tl.load(v_scale_ptr)
    tl.store(out_ptr + tok[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])


# Launch configuration by element size. BLOCK_M counts rows (tokens x group), raised to the group.
# H200, 8 x 2048-token prompts, 32 heads / 8 kv, d128 bf16: 64/64/4/2 307 TFLOP/s (SDPA flash on
# contiguous MHA: 506); 128/64/8/3 288, 128/64/4/2 232, 64/128/4/2 209.
PREFILL_LAUNCH = {
    2: dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
    4: dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2),
}


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                            seq_lens: torch.Tensor, max_query_len: int | None,
                            scale: float | None = None, k_scale: torch.Tensor | None = None,
                            v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its cached prefix plus themselves.

    q [T, Hq, D] holds sequence i's query_len = query_start_loc[i+1] - query_start_loc[i] newest
    tokens (absolute positions seq_len - query_len .. seq_len - 1), whose K/V are already in the
    cache; query_start_loc[0] is 0 and rows of q past query_start_loc[S] are never read. One
    launch for the whole batch.
    ``max_query_len`` (host int) sizes the grid per sequence; None sizes it by the shapes alone
    (T // tile + S query tiles, each finding its sequence by binary search: a few percent slower,
    but one launch serves any mix of query lengths, as a CUDA graph of a (T, S) bucket needs).
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, block_size, v_t, kv_fp8 = _check_inputs(q, k_cache, v_cache, block_tables,
                                                          seq_lens, k_scale, v_scale)
    num_seqs = seq_lens.shape[0]
    assert query_start_loc.dtype == torch.int32 and query_start_loc.shape == (num_seqs + 1,)
    assert query_start_loc.is_contiguous()
    out = torch.empty_like(q)
    if num_tokens == 0 or num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    launch = dict(PREFILL_LAUNCH[q.element_size()])
    launch["BLOCK_M"] = max(launch["BLOCK_M"], triton.next_power_of_2(group))
    scale = head_dim ** -0.5 if scale is None else scale
    tokens_per_tile = launch["BLOCK_M"] // group
    num_slots = prefill_slots(num_tokens, num_seqs, tokens_per_tile)
    if max_query_len is None:
        grid: tuple[int, ...] = (num_slots, num_kv_heads)
    elif max_query_len <= 0:
        return out
    else:
        grid = (triton.cdiv(max_query_len, tokens_per_tile), num_seqs, num_kv_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, *_scale_ptrs(k_scale, v_scale, q), block_tables, query_start_loc,
        seq_lens, out, scale * _LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        num_seqs, num_slots, (num_seqs - 1).bit_length(),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        DOT_PRECISION=_dot_precision(q.dtype), FLAT_GRID=max_query_len is None, KV_FP8=kv_fp8,
        V_T=v_t, **launch,
    )
    return out


# ---------------------------------------------------------------------------------------------


def prefill_slots(num_tokens: int, num_seqs: int, tokens_per_tile: int) -> int:
    """Query-tile slots of a prefill launch: enough for any split of ``num_tokens`` among
    ``num_seqs`` sequences (sequence i owns qsl[i] // tokens_per_tile + i onwards)."""
    return num_tokens // tokens_per_tile + num_seqs


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, num_kv_heads: int,
                 head_dim: int) -> tuple[int, bool]:
    """Assert the [num_blocks, block_size, Hkv, D] views agree; returns block_size and whether
    V's blocks are stored transposed."""
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, (k_cache.shape, v_cache.shape)
    assert k_cache.dtype == v_cache.dtype, (k_cache.dtype, v_cache.dtype)
    assert k_cache.shape[2:] == (num_kv_heads, head_dim), (k_cache.shape, num_kv_heads, head_dim)
    assert k_cache.stride(-1) == 1, "K's head_dim must be contiguous"
    block_size = k_cache.shape[1]
    v_t = _v_transposed(v_cache, block_size)  # V: head_dim contiguous, or transposed blocks
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, f"head_dim {head_dim}: power of 2"
    assert block_size >= 8 and block_size & (block_size - 1) == 0, f"block_size {block_size}"
    return block_size, v_t


def _check_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  block_tables: torch.Tensor, seq_lens: torch.Tensor,
                  k_scale: torch.Tensor | None, v_scale: torch.Tensor | None
                  ) -> tuple[int, int, bool, bool]:
    """Assert what the decode and prefill launches share (q [*, Hq, D], the cache views, one
    block-table row and one int32 length a sequence); returns num_kv_heads, block_size, whether
    V's blocks are stored transposed and whether the cache is fp8."""
    num_heads, head_dim = q.shape[1:]
    num_kv_heads = k_cache.shape[2]
    block_size, v_t = _check_cache(k_cache, v_cache, num_kv_heads, head_dim)
    kv_fp8 = reference.check_kv_scales(k_cache.dtype, k_scale, v_scale)
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    assert kv_fp8 or q.dtype == k_cache.dtype, (q.dtype, k_cache.dtype)
    assert q.stride(-1) == 1, q.stride()
    assert block_tables.dtype == torch.int32 and block_tables.dim() == 2, block_tables.dtype
    assert block_tables.stride(1) == 1, block_tables.stride()
    assert seq_lens.dtype == torch.int32 and seq_lens.dim() == 1, seq_lens.shape
    assert block_tables.shape[0] == seq_lens.shape[0], (block_tables.shape, seq_lens.shape)
    assert seq_lens.is_contiguous()
    return num_kv_heads, block_size, v_t, kv_fp8


def _v_transposed(v_cache: torch.Tensor, block_size: int) -> bool:
    """Whether the V view is of pages stored [D, block_size] a head (else head_dim contiguous)."""
    if v_cache.stride(-1) == 1:
        return False
    head_dim = v_cache.shape[3]
    stride_h = v_cache.stride(2)
    assert (v_cache.stride(1), v_cache.stride(3)) == (1, block_size) and (
        stride_h >= head_dim * block_size), (
        f"V must have head_dim contiguous or each head's page stored [D, block_size], got "
        f"strides {v_cache.stride()}")
    return True


def decode_kv_bytes(k_cache: torch.Tensor, num_cached_tokens: int) -> int:
    """K and V bytes a decode reads for ``num_cached_tokens`` (the sum of seq_lens), in the
    cache's dtype (1 byte an element for fp8): what a bandwidth figure divides by the time.
    Block tables, queries and scales are not counted (a fraction of a percent)."""
    num_kv_heads, head_dim = k_cache.shape[2:]
    return 2 * num_cached_tokens * num_kv_heads * head_dim * k_cache.element_size()


def _scale_ptrs(k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
                placeholder: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale pointers to launch with: a placeholder (never read) for a non-fp8 cache."""
    if k_scale is None:
        return placeholder, placeholder
    assert k_scale.device == v_scale.device == placeholder.device, (k_scale.device, v_scale.device)
    return k_scale, v_scale


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs are the exactness path (tests, fp32 engines): no TF32 rounding.
    return "ieee" if dtype == torch.float32 else "tf32"
