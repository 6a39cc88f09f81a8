"""Mixture-of-experts MLP in two grouped GEMM launches (see reference.fused_moe for the torch
version): each token's rows for its top-k experts are gathered by expert, so one launch
multiplies every expert's tokens by that expert's gate|up weights, and one by its down weights.

    flat row r = t * top_k + j: token t's j-th expert (topk_ids[t, j], weight topk_weights[t, j])
    align:     rows sorted by expert, each expert's run padded to a multiple of BLOCK_M, so a block
               of BLOCK_M rows has one expert (``moe_align``; blocks past the used ones are
               marked num_experts and exit at once)
    gate_up:   [T * k, 2I] = x[r // k] @ w13[e].T       (a block reads one expert's weights)
    act:       silu(gate) * up                          (fused_ops.silu_mul)
    down:      [T * k, H] = act[r] @ w2[e].T * weight[r]
    out:       [T, H] = down summed over each token's k rows

Every size is a function of the shapes alone (the number of blocks is bounded by
cdiv(T * k, BLOCK_M) + min(E, T * k)), and nothing is read back to the host, so a decode step
with experts is captured in a CUDA graph like any other. An expert's weights are read once per
N tile however many of its tokens there are: at decode batches the launch reads the weights of
the experts that the batch routes to, which is its memory bound.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _moe_gemm_kernel(
    a_ptr,  # [*, K] input rows: row r's input is a's row r // A_ROW_DIV
    b_ptr,  # [E, N, K] each expert's weight (a Linear's: output rows)
    c_ptr,  # [num_rows, N] output, row r at row r
    weight_ptr,  # [num_rows] float32: each row's routing weight (if MUL_WEIGHT)
    rows_ptr,  # [num_blocks * BLOCK_M] int32: flat rows sorted by expert; num_rows = padding
    block_expert_ptr,  # [num_blocks] int: each block's expert; num_experts = unused block
    num_rows, num_experts, N, K,
    stride_am, stride_be, stride_bn, stride_cm,
    A_ROW_DIV: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # grid: (num_blocks, cdiv(N, BLOCK_N)); the blocks of one N tile run side by side, so an
    # expert's weight tile is read from HBM once for all its blocks.
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block).to(tl.int64)
    if expert >= num_experts:
        return
    rows = tl.load(rows_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    valid = rows < num_rows
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (rows // A_ROW_DIV)[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + expert * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_in = offs_k + k0 < K
        a = tl.load(a_ptrs, mask=valid[:, None] & k_in[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_in[:, None] & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if MUL_WEIGHT:
        acc = acc * tl.load(weight_ptr + rows, mask=valid, other=0.0)[:, None]
    c_ptrs = c_ptr + rows[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & (offs_n[None, :] < N))


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, block_expert): the flat rows of ``topk_ids`` [T, k] sorted by expert (stable),
    each expert's run padded with T * k to a multiple of ``block_m``, and the expert of each
    block of ``block_m`` rows (``num_experts`` past the used blocks). Device ops only, sized
    by the shapes: no host sync, capturable in a CUDA graph."""
    flat = topk_ids.reshape(-1).long()
    n, device = flat.numel(), flat.device
    num_blocks = triton.cdiv(n, block_m) + min(num_experts, n)
    counts = torch.zeros(num_experts, dtype=torch.long, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    by_expert, order = torch.sort(flat, stable=True)
    # a row's place: its expert's padded start + its rank among the expert's rows
    rank = torch.arange(n, device=device) - (torch.cumsum(counts, 0) - counts)[by_expert]
    rows = torch.full((num_blocks * block_m,), n, dtype=torch.int32, device=device)
    rows[(padded_end - padded)[by_expert] + rank] = order.to(torch.int32)
    block_expert = torch.searchsorted(padded_end // block_m,
                                      torch.arange(num_blocks, device=device), right=True)
    return rows, block_expert


def _block_m(num_rows: int, num_experts: int) -> int:
    """Rows a block takes: what one expert gets on average (padding costs less than the
    weights read twice), at least 16 (tl.dot's smallest tile), at most 64."""
    return min(64, max(16, triton.next_power_of_2(triton.cdiv(num_rows, num_experts))))


def _moe_gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, rows: torch.Tensor,
              block_expert: torch.Tensor, a_row_div: int, weights: torch.Tensor | None,
              block_m: int) -> None:
    num_rows, (num_experts, N, K) = out.shape[0], b.shape
    assert a.stride(-1) == 1 and b.stride(-1) == 1 and out.stride(-1) == 1
    block_n = 64
    grid = (block_expert.numel(), triton.cdiv(N, block_n))
    _moe_gemm_kernel[grid](
        a, b, out, weights, rows, block_expert, num_rows, num_experts, N, K,
        a.stride(0), b.stride(0), b.stride(1), out.stride(0),
        A_ROW_DIV=a_row_div, MUL_WEIGHT=weights is not None,
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=64)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """reference.fused_moe in two grouped GEMMs: x [T, H], w13 [E, 2I, H] (gate | up rows),
    w2 [E, H, I], topk_weights [T, k] float32, topk_ids [T, k] -> [T, H] in x's dtype."""
    from fairswitch.kernels.fused_ops import silu_mul

    T, H = x.shape
    num_experts, two_i, _ = w13.shape
    k = topk_ids.shape[1]
    assert w13.shape[2] == H and w2.shape == (num_experts, H, two_i // 2), (w13.shape, w2.shape)
    if T == 0:
        return x.new_empty((0, H))
    n = T * k
    block_m = _block_m(n, num_experts)
    rows, block_expert = moe_align(topk_ids, num_experts, block_m)
    gate_up = x.new_empty((n, two_i))
    _moe_gemm(x.contiguous(), w13, gate_up, rows, block_expert, k, None, block_m)
    down = x.new_empty((n, H))
    _moe_gemm(silu_mul(gate_up), w2, down, rows, block_expert, 1,
              topk_weights.reshape(-1).float().contiguous(), block_m)
    return down.view(T, k, H).sum(dim=1)
