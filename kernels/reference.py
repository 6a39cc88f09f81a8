"""Pure-torch paged attention: the CPU path of the engine and the reference the kernels are tested
against. Shapes (per layer):

    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]  (strided views are fine)
    block_tables:     [num_seqs, max_blocks_per_seq] int, padded with any valid block id
    seq_lens:         [num_seqs] int, tokens in the cache for each sequence (this step included)

Grouped-query attention: query head h reads KV head h // (num_heads // num_kv_heads).

FP8 KV cache: a cache of dtype float8_e4m3fn stores x / scale, clamped to e4m3's +-448 and rounded
to nearest (ties to even), NaN as 0; it reads back as stored * scale. Each layer has one float32
scale for K and one for V (1-element tensors, so a captured CUDA graph sees a scale calibrated
later). Every function below takes them as ``k_scale`` / ``v_scale``: required for an fp8 cache,
None otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3 value


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """x / scale (in fp32) clamped to +-FP8_MAX, rounded to float8_e4m3fn; NaN stores 0, so an
    fp8 pool holds only finite values (the kernels read the last page of a sequence whole)."""
    return torch.nan_to_num(x.float() / scale, nan=0.0).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize_fp8(x: torch.Tensor, scale: torch.Tensor | float,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values an fp8 cache holds: x.float() * scale, in ``dtype``."""
    return (x.float() * scale).to(dtype)


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """The scale that maps a max |x| onto FP8_MAX (1 where it is 0: zeros stay zeros), divided
    IEEE-exactly as the kernels do (on CUDA, torch divides by a Python number as a product with
    its reciprocal: an ulp off for some values)."""
    return torch.where(amax > 0, amax / amax.new_full((), FP8_MAX), torch.ones_like(amax))


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of ``x`` [T, K] in float8_e4m3fn at its own scale (FP8 weights' dynamic
    per-token activation scales): scale = max |row| / FP8_MAX (1 for a zero row; NaN counts as
    0, and stores 0, as in an fp8 KV cache), in float32 [T, 1]; the row stored as x / scale
    rounded to nearest."""
    scale = fp8_scale(x.float().nan_to_num(nan=0.0).abs().amax(dim=-1, keepdim=True))
    return quantize_fp8(x, scale), scale


def check_kv_scales(cache_dtype: torch.dtype, k_scale: torch.Tensor | None,
                    v_scale: torch.Tensor | None) -> bool:
    """Whether the cache is fp8; asserts its scales are given (1-element float32) or absent."""
    if cache_dtype != FP8_DTYPE:
        assert k_scale is None and v_scale is None, f"scales given for a {cache_dtype} cache"
        return False
    for scale in (k_scale, v_scale):
        assert scale is not None, "an fp8 KV cache needs k_scale and v_scale"
        assert scale.dtype == torch.float32 and scale.numel() == 1, (scale.dtype, scale.shape)
    return True


def _read_kv(cache: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    return cache if scale is None else dequantize_fp8(cache, scale, dtype)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor, has_padding: bool = True,
             k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
    """Store k, v [num_tokens, num_kv_heads, head_dim] at their slots; slot -1 is padding.

    ``has_padding=False`` promises no -1 slots and skips the filter (a device sync on GPU).
    """
    block_size = k_cache.shape[1]
    if check_kv_scales(k_cache.dtype, k_scale, v_scale):
        k, v = quantize_fp8(k, k_scale), quantize_fp8(v, v_scale)
    if has_padding:
        keep = slot_mapping >= 0
        slot_mapping, k, v = slot_mapping[keep], k[keep], v[keep]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    k_cache[blocks, offsets] = k
    v_cache[blocks, offsets] = v


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """One sequence's cached K or V as [seq_len, num_kv_heads, head_dim]."""
    num_blocks = -(-seq_len // cache.shape[1])
    return cache[block_table[:num_blocks].long()].flatten(0, 1)[:seq_len]


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor,
                           scale: float | None = None, k_scale: torch.Tensor | None = None,
                           v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per sequence, q [num_seqs, num_heads, head_dim] -> same shape."""
    check_kv_scales(k_cache.dtype, k_scale, v_scale)
    num_seqs, max_blocks = block_tables.shape
    block_size, num_kv_heads, head_dim = k_cache.shape[1:]
    group = q.shape[1] // num_kv_heads
    # [S, max_blocks * block_size, Hkv, D]
    k = _read_kv(k_cache[block_tables.long()].flatten(1, 2), k_scale, q.dtype)
    v = _read_kv(v_cache[block_tables.long()].flatten(1, 2), v_scale, q.dtype)
    positions = torch.arange(max_blocks * block_size, device=q.device)
    mask = (positions[None, :] < seq_lens[:, None].to(q.device))[:, None, None, :]
    # GQA without copying KV: the query heads sharing a KV head become that head's "query rows".
    out = F.scaled_dot_product_attention(
        q.view(num_seqs, num_kv_heads, group, head_dim), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=mask, scale=scale,
    )
    return out.reshape(num_seqs, num_kv_heads * group, head_dim)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, query_start_loc: list[int],
                            seq_lens: list[int], scale: float | None = None,
                            k_scale: torch.Tensor | None = None,
                            v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of new tokens over a cached prefix plus themselves.

    q [num_tokens, num_heads, head_dim] holds each sequence's query_len = query_start_loc[i+1] -
    query_start_loc[i] newest tokens; they sit at positions seq_len - query_len ... seq_len - 1.
    """
    check_kv_scales(k_cache.dtype, k_scale, v_scale)
    out = torch.empty_like(q)
    for i, seq_len in enumerate(seq_lens):
        start, end = query_start_loc[i], query_start_loc[i + 1]
        q_len = end - start
        k = _read_kv(gather_kv(k_cache, block_tables[i], seq_len), k_scale, q.dtype)
        v = _read_kv(gather_kv(v_cache, block_tables[i], seq_len), v_scale, q.dtype)
        k, v = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
        qi = q[start:end].transpose(0, 1).unsqueeze(0)
        if q_len == seq_len:
            mask, causal = None, True
        else:
            # query j (absolute position seq_len - q_len + j) sees keys 0 .. that position
            rows = torch.arange(q_len, device=q.device)[:, None] + (seq_len - q_len)
            mask, causal = torch.arange(seq_len, device=q.device)[None, :] <= rows, False
        o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, is_causal=causal,
                                           scale=scale, enable_gqa=qi.shape[1] != k.shape[1])
        out[start:end] = o.squeeze(0).transpose(0, 1)
    return out


def scale_rows(x: torch.Tensor, x_scale: torch.Tensor | None) -> torch.Tensor:
    """The rows ``x * x_scale`` ([T, 1] float32) in x's dtype, rounded once (as the unfused fp8
    matmul's ``y.mul_(x_scale)``); ``x`` itself without a scale."""
    return x if x_scale is None else (x.float() * x_scale).to(x.dtype)


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                eps: float, x_scale: torch.Tensor | None = None) -> torch.Tensor:
    """rmsnorm(residual + x) * weight; ``residual`` (if given) becomes residual + x in place.
    ``x_scale``: x's rows still need this scale (an fp8 matmul's output, ``scale_rows``).

    Normalize in fp32, round, then scale by the weight in the activation dtype (as HF Llama)."""
    x = scale_rows(x, x_scale)
    if residual is not None:
        residual.add_(x)
        x = residual
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight * normed


def add_rmsnorm_fp8(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                    eps: float, x_scale: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``add_rmsnorm``'s output quantized per row (``quantize_fp8_rows``): an fp8 matmul's input."""
    return quantize_fp8_rows(add_rmsnorm(x, residual, weight, eps, x_scale))


def rope_(q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor,
          positions: torch.Tensor) -> None:
    """Rotate-half RoPE of q [T, Hq, D] and k [T, Hkv, D] in place (cos/sin caches [pos, D])."""
    cos = cos_cache[positions].unsqueeze(1).to(q.dtype)
    sin = sin_cache[positions].unsqueeze(1).to(q.dtype)
    for x in (q, k):
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        x.copy_(x * cos + rotated * sin)


def silu_mul(gate_up: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] (its rows times ``scale``, ``scale_rows``)."""
    gate, up = scale_rows(gate_up, scale).chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def silu_mul_fp8(gate_up: torch.Tensor, scale: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``silu_mul``'s output quantized per row (``quantize_fp8_rows``): an fp8 matmul's input."""
    return quantize_fp8_rows(silu_mul(gate_up, scale))


def copy_words(src: torch.Tensor, dst: torch.Tensor, n: int) -> None:
    """``dst[:n] = src[:n]`` (host_copy.py does it by a kernel, past the copy engines)."""
    dst[:n].copy_(src[:n])


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
    """A mixture of SwiGLU experts: token t's output is the sum over j of topk_weights[t, j]
    (float32) times expert e = topk_ids[t, j] applied to x[t], down_e(silu(gate_e x) * up_e x),
    summed in float32 and rounded to x's dtype once. x [T, H], w13 [E, 2I, H] (each expert's
    gate | up rows), w2 [E, H, I]. (One expert at a time over its tokens: reads the routing
    back to the host, so it runs eagerly, never in a CUDA graph.)"""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in topk_ids.unique().tolist():
        tokens, slot = (topk_ids == e).nonzero(as_tuple=True)
        y = F.linear(silu_mul(F.linear(x[tokens], w13[e])), w2[e])
        out.index_add_(0, tokens, y.float() * topk_weights[tokens, slot, None])
    return out.to(x.dtype)
