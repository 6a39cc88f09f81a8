"""Pure-torch paged attention: the CPU path of the engine and the reference the kernels are tested
against. Shapes (per layer):

    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]  (strided views are fine)
    block_tables:     [num_seqs, max_blocks_per_seq] int, padded with any valid block id
    seq_lens:         [num_seqs] int, tokens in the cache for each sequence (this step included)

Grouped-query attention: query head h reads KV head h // (num_heads // num_kv_heads).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor, has_padding: bool = True) -> None:
    """Store k, v [num_tokens, num_kv_heads, head_dim] at their slots; slot -1 is padding.

    ``has_padding=False`` promises no -1 slots and skips the filter (a device sync on GPU).
    """
    block_size = k_cache.shape[1]
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
                           scale: float | None = None) -> torch.Tensor:
    """One query token per sequence, q [num_seqs, num_heads, head_dim] -> same shape."""
    num_seqs, max_blocks = block_tables.shape
    block_size, num_kv_heads, head_dim = k_cache.shape[1:]
    group = q.shape[1] // num_kv_heads
    k = k_cache[block_tables.long()].flatten(1, 2)  # [S, max_blocks * block_size, Hkv, D]
    v = v_cache[block_tables.long()].flatten(1, 2)
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
                            seq_lens: list[int], scale: float | None = None) -> torch.Tensor:
    """Causal attention of new tokens over a cached prefix plus themselves.

    q [num_tokens, num_heads, head_dim] holds each sequence's query_len = query_start_loc[i+1] -
    query_start_loc[i] newest tokens; they sit at positions seq_len - query_len ... seq_len - 1.
    """
    out = torch.empty_like(q)
    for i, seq_len in enumerate(seq_lens):
        start, end = query_start_loc[i], query_start_loc[i + 1]
        q_len = end - start
        k = gather_kv(k_cache, block_tables[i], seq_len).transpose(0, 1).unsqueeze(0)
        v = gather_kv(v_cache, block_tables[i], seq_len).transpose(0, 1).unsqueeze(0)
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


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                eps: float) -> torch.Tensor:
    """rmsnorm(residual + x) * weight; ``residual`` (if given) becomes residual + x in place.

    Normalize in fp32, round, then scale by the weight in the activation dtype (as HF Llama)."""
    if residual is not None:
        residual.add_(x)
        x = residual
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight * normed


def rope_(q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor,
          positions: torch.Tensor) -> None:
    """Rotate-half RoPE of q [T, Hq, D] and k [T, Hkv, D] in place (cos/sin caches [pos, D])."""
    cos = cos_cache[positions].unsqueeze(1).to(q.dtype)
    sin = sin_cache[positions].unsqueeze(1).to(q.dtype)
    for x in (q, k):
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        x.copy_(x * cos + rotated * sin)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def copy_words(src: torch.Tensor, dst: torch.Tensor, n: int) -> None:
    """``dst[:n] = src[:n]`` (host_copy.py does it by a kernel, past the copy engines)."""
    dst[:n].copy_(src[:n])
