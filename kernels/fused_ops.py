"""Triton fusions of the decoder's elementwise work (see reference.py for the torch versions).

A decode step of an 8B model at batch 64 spent ~2.7 ms of ~9 ms GPU time in ~700 tiny unfused
kernels (RMSNorm's fp32 upcast/mean/rsqrt/scale chain, RoPE's rotate-half/cat, SiLU*up). Each op
here is one launch. Numerics follow the reference implementation: the residual sum is rounded to
the activation dtype before it is normalized, the normalized value is rounded before the weight
multiplies it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fairswitch.kernels.paged_attention import _FP8_MAX, _quantize_e4m3  # (the fp8 KV write's)
from fairswitch.kernels.fused_moe import fused_moe  # noqa: F401  (the experts' op, its own module)


@triton.jit
def _abs_or_0(x):
    """|x| in float32, NaN counting as 0 (for a row's fp8 scale)."""
    xf = x.to(tl.float32)
    return tl.abs(tl.where(xf == xf, xf, 0.0))


@triton.jit
def _store_fp8_scale(amax, scale_ptr, row):
    """Row ``row``'s fp8 scale from its max |x| (``reference.fp8_scale``: amax / FP8_MAX, 1 for
    a zero row), stored and returned."""
    scale = tl.where(amax > 0, tl.div_rn(amax, _FP8_MAX), 1.0)  # (IEEE division, as torch's)
    tl.store(scale_ptr + row, scale)
    return scale


@triton.jit
def _row_to_fp8(out, mask, scale_ptr, row):
    """One row's e4m3 codes at its own scale, which is stored: ``reference.quantize_fp8_rows``
    of a row held in registers."""
    amax = tl.max(tl.where(mask, _abs_or_0(out), 0.0), axis=0)
    return _quantize_e4m3(out, _store_fp8_scale(amax, scale_ptr, row))


@triton.jit
def _add_rmsnorm_kernel(
    x_ptr,  # [T, N] input (the sublayer output)
    x_scale_ptr,  # [T] float32: x's rows times these (if HAS_SCALE: an fp8 matmul's output)
    res_ptr,  # [T, N] residual stream, updated in place to res + x (if HAS_RESIDUAL)
    w_ptr,  # [N] norm weight
    out_ptr,  # [T, N] normalized output (float8_e4m3fn if QUANT)
    out_scale_ptr,  # [T] float32: the output rows' fp8 scales (if QUANT)
    N, eps,
    stride_x, stride_r, stride_o,
    HAS_SCALE: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    QUANT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # grid: (T,)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_SCALE:  # rounded to x's dtype, as reference.scale_rows
        x = (x.to(tl.float32) * tl.load(x_scale_ptr + row)).to(x.dtype)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(r.dtype)
        tl.store(res_ptr + row * stride_r + offs, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / N
    normed = (xf * tl.rsqrt(var + eps)).to(x.dtype)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    out = (normed.to(tl.float32) * w.to(tl.float32)).to(x.dtype)
    if QUANT:
        out = _row_to_fp8(out, mask, out_scale_ptr, row)
    tl.store(out_ptr + row * stride_o + offs, out, mask=mask)


def _add_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float, x_scale: torch.Tensor | None, quant: bool
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    assert x.dim() == 2 and x.stride(-1) == 1 and weight.is_contiguous()
    T, N = x.shape
    out = torch.empty((T, N), dtype=torch.float8_e4m3fn if quant else x.dtype, device=x.device)
    out_scale = torch.empty((T, 1), dtype=torch.float32, device=x.device) if quant else None
    if T == 0:
        return out, out_scale
    res = residual if residual is not None else x
    assert res.shape == x.shape and res.stride(-1) == 1 and res.dtype == x.dtype
    if x_scale is not None:
        assert x_scale.shape == (T, 1) and x_scale.dtype == torch.float32
        assert x_scale.is_contiguous()
    # (no fused multiply-add: x * scale + residual rounds the product first, as the unfused
    # path's separate scaling does, also where x is float32 and the cast rounds nothing)
    _add_rmsnorm_kernel[(T,)](x, x_scale, res, weight, out, out_scale, N, eps, x.stride(0),
                              res.stride(0), out.stride(0), HAS_SCALE=x_scale is not None,
                              HAS_RESIDUAL=residual is not None, QUANT=quant,
                              BLOCK=triton.next_power_of_2(N), enable_fp_fusion=False)
    return out, out_scale


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                eps: float, x_scale: torch.Tensor | None = None) -> torch.Tensor:
    """rmsnorm(residual + x) * weight; ``residual`` (if given) becomes residual + x in place;
    ``x_scale`` [T, 1]: x's rows times it first (reference.scale_rows)."""
    return _add_rmsnorm(x, residual, weight, eps, x_scale, quant=False)[0]


def add_rmsnorm_fp8(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                    eps: float, x_scale: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.add_rmsnorm_fp8 in one launch: (float8_e4m3fn [T, N], float32 scales [T, 1])."""
    return _add_rmsnorm(x, residual, weight, eps, x_scale, quant=True)


@triton.jit
def _rope_kernel(
    q_ptr,  # [T, Hq, D] (strided view of the fused qkv output), rotated in place
    k_ptr,  # [T, Hkv, D] (strided view), rotated in place
    cos_ptr,  # [max_pos, D] float32
    sin_ptr,  # [max_pos, D] float32
    pos_ptr,  # [T] int64
    num_q_heads, num_k_heads,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_c,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # grid: (T, cdiv(Hq + Hkv, BLOCK_H)); rotate-half: x' = x * cos + [-x2, x1] * sin
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    offs = tl.arange(0, HALF)
    cos1 = tl.load(cos_ptr + pos * stride_c + offs)[None, :]
    cos2 = tl.load(cos_ptr + pos * stride_c + HALF + offs)[None, :]
    sin1 = tl.load(sin_ptr + pos * stride_c + offs)[None, :]
    sin2 = tl.load(sin_ptr + pos * stride_c + HALF + offs)[None, :]
    is_q = heads < num_q_heads
    is_k = (heads >= num_q_heads) & (heads < num_q_heads + num_k_heads)
    kh = tl.where(is_k, heads - num_q_heads, 0)
    qh = tl.where(is_q, heads, 0)
    base = tl.where(is_q[:, None], q_ptr + t * stride_qt + qh[:, None] * stride_qh,
                    k_ptr + t * stride_kt + kh[:, None] * stride_kh)
    mask = (is_q | is_k)[:, None]
    x1 = tl.load(base + offs[None, :], mask=mask, other=0.0)
    x2 = tl.load(base + HALF + offs[None, :], mask=mask, other=0.0)
    dt = x1.dtype
    # Round where the reference rounds (cos/sin to the activation dtype, each product, the sum):
    # then bf16 outputs match transformers' bit for bit instead of drifting by an ulp.
    c1, c2 = cos1.to(dt).to(tl.float32), cos2.to(dt).to(tl.float32)
    s1, s2 = sin1.to(dt).to(tl.float32), sin2.to(dt).to(tl.float32)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    o1 = (x1f * c1).to(dt).to(tl.float32) + (-x2f * s1).to(dt).to(tl.float32)
    o2 = (x2f * c2).to(dt).to(tl.float32) + (x1f * s2).to(dt).to(tl.float32)
    tl.store(base + offs[None, :], o1.to(dt), mask=mask)
    tl.store(base + HALF + offs[None, :], o2.to(dt), mask=mask)


def rope_(q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor,
          positions: torch.Tensor) -> None:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] in place for their positions."""
    T, hq, d = q.shape
    hk = k.shape[1]
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and d % 2 == 0 and (d & (d - 1)) == 0
    assert cos_cache.is_contiguous() and cos_cache.dtype == torch.float32
    if T == 0:
        return
    block_h = min(16, triton.next_power_of_2(hq + hk))
    grid = (T, triton.cdiv(hq + hk, block_h))
    _rope_kernel[grid](q, k, cos_cache, sin_cache, positions, hq, hk, q.stride(0), q.stride(1),
                       k.stride(0), k.stride(1), cos_cache.stride(0), HALF=d // 2,
                       BLOCK_H=block_h)


@triton.jit
def _silu(g, u, t, scale_ptr, HAS_SCALE: tl.constexpr):
    """silu(g) * u of a token's rows (times its scale first, rounded: reference.scale_rows)."""
    if HAS_SCALE:
        s = tl.load(scale_ptr + t)
        g = (g.to(tl.float32) * s).to(g.dtype)
        u = (u.to(tl.float32) * s).to(u.dtype)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)  # rounded like the reference's silu output
    return (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype)


@triton.jit
def _silu_mul_kernel(
    gate_up_ptr,  # [T, 2 * I]: gate | up
    scale_ptr,  # [T] float32: gate_up's rows times these (if HAS_SCALE)
    out_ptr,  # [T, I]
    inter, stride_g, stride_o,
    HAS_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # grid: (T, cdiv(I, BLOCK))
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    g = tl.load(gate_up_ptr + t * stride_g + offs, mask=mask, other=0.0)
    u = tl.load(gate_up_ptr + t * stride_g + inter + offs, mask=mask, other=0.0)
    tl.store(out_ptr + t * stride_o + offs, _silu(g, u, t, scale_ptr, HAS_SCALE), mask=mask)


@triton.jit
def _silu_mul_fp8_kernel(
    gate_up_ptr,  # [T, 2 * I]: gate | up
    scale_ptr,  # [T] float32: gate_up's rows times these (if HAS_SCALE)
    q_ptr,  # [T, I] float8_e4m3fn output
    q_scale_ptr,  # [T] float32 output
    inter, stride_g, stride_q,
    HAS_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # grid: (T,): the row's max |silu(gate) * up| in a first pass, the codes in a second (the
    # activation computed again: cheaper than a round trip through memory)
    t = tl.program_id(0).to(tl.int64)
    base = gate_up_ptr + t * stride_g
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, inter, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < inter
        g = tl.load(base + offs, mask=mask, other=0.0)
        u = tl.load(base + inter + offs, mask=mask, other=0.0)
        amax = tl.maximum(amax, _abs_or_0(_silu(g, u, t, scale_ptr, HAS_SCALE)))
    scale = _store_fp8_scale(tl.max(amax, axis=0), q_scale_ptr, t)
    for start in range(0, inter, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < inter
        g = tl.load(base + offs, mask=mask, other=0.0)
        u = tl.load(base + inter + offs, mask=mask, other=0.0)
        a = _silu(g, u, t, scale_ptr, HAS_SCALE)
        tl.store(q_ptr + t * stride_q + offs, _quantize_e4m3(a, scale), mask=mask)


def _check_gate_up(gate_up: torch.Tensor, scale: torch.Tensor | None) -> tuple[int, int]:
    assert gate_up.dim() == 2 and gate_up.stride(-1) == 1 and gate_up.shape[1] % 2 == 0
    T, two_i = gate_up.shape
    if scale is not None:
        assert scale.shape == (T, 1) and scale.dtype == torch.float32 and scale.is_contiguous()
    return T, two_i // 2


def silu_mul(gate_up: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] along the last dim (its rows times ``scale``
    [T, 1] first, if given)."""
    T, inter = _check_gate_up(gate_up, scale)
    out = torch.empty((T, inter), dtype=gate_up.dtype, device=gate_up.device)
    if T == 0:
        return out
    block = 1024
    _silu_mul_kernel[(T, triton.cdiv(inter, block))](gate_up, scale, out, inter,
                                                     gate_up.stride(0), out.stride(0),
                                                     HAS_SCALE=scale is not None, BLOCK=block)
    return out


def silu_mul_fp8(gate_up: torch.Tensor, scale: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.silu_mul_fp8 in one launch: (float8_e4m3fn [T, I], float32 scales [T, 1])."""
    T, inter = _check_gate_up(gate_up, scale)
    q = torch.empty((T, inter), dtype=torch.float8_e4m3fn, device=gate_up.device)
    q_scale = torch.empty((T, 1), dtype=torch.float32, device=gate_up.device)
    if T == 0:
        return q, q_scale
    _silu_mul_fp8_kernel[(T,)](gate_up, scale, q, q_scale, inter, gate_up.stride(0),
                               q.stride(0), HAS_SCALE=scale is not None,
                               BLOCK=min(2048, triton.next_power_of_2(inter)))
    return q, q_scale


@triton.jit
def _quantize_fp8_rows_kernel(
    x_ptr,  # [T, K] input
    q_ptr,  # [T, K] float8_e4m3fn output
    scale_ptr,  # [T] float32 output
    K, stride_x, stride_q,
    BLOCK: tl.constexpr,
):
    # grid: (T,): the row's max |x| in a first pass, then x / scale in a second
    row = tl.program_id(0).to(tl.int64)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, K, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_x + offs, mask=offs < K, other=0.0)
        amax = tl.maximum(amax, _abs_or_0(x))
    scale = _store_fp8_scale(tl.max(amax, axis=0), scale_ptr, row)
    for start in range(0, K, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < K
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
        tl.store(q_ptr + row * stride_q + offs, _quantize_e4m3(x, scale), mask=mask)


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.quantize_fp8_rows in one launch: (float8_e4m3fn [T, K], float32 scales [T, 1])."""
    assert x.dim() == 2 and x.stride(-1) == 1
    T, K = x.shape
    q = torch.empty((T, K), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((T, 1), dtype=torch.float32, device=x.device)
    if T == 0:
        return q, scale
    _quantize_fp8_rows_kernel[(T,)](x, q, scale, K, x.stride(0), q.stride(0),
                                    BLOCK=min(4096, triton.next_power_of_2(K)))
    return q, scale
