"""The sparse MLP block of a mixture-of-experts decoder (Mixtral, Qwen3-MoE).

A router (a linear layer to one logit per expert) picks each token's ``top_k`` experts by softmax
probability; the token's output is the sum of those experts' SwiGLU MLPs, each weighted by its
probability (renormalized over the top k where the model does). The experts' weights are stacked
(``w13``: every expert's gate | up rows, ``w2``: its down projection), so ``ops.fused_moe`` runs
them as two grouped GEMMs (kernels/fused_moe.py) or, on the CPU, expert by expert.

Tensor parallelism splits every expert as the dense MLP splits (each rank holds its slice of each
expert's intermediate dim) and sums the partial outputs over the ranks; the router is whole on
every rank, so all ranks route alike. FP8 weights (``quantization="fp8"``) quantize the attention
projections and any dense MLP; the experts and the router stay in the model's dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
import torch.nn.functional as F

from fairswitch.distributed.parallel_state import SINGLE, TPGroup
from fairswitch.distributed.shard_plan import Shard, split_intermediate
from fairswitch.model.checkpoint_config import MoeConfig


def route(logits: torch.Tensor, top_k: int, renormalize: bool
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights float32 [T, k], expert ids [T, k]) of router ``logits`` [T, E]: the softmax's
    ``top_k`` largest probabilities (in float32, as transformers), renormalized to sum to 1."""
    weights, ids = torch.topk(torch.softmax(logits.float(), dim=-1), top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class SparseMoE(nn.Module):
    """``gate``: the router's weight [E, hidden], whole on every rank; ``w13`` [E, 2 * local,
    hidden] and ``w2`` [E, hidden, local]: this rank's slice of every expert. ``w13_shard`` /
    ``w2_shard``: those slices along dim 1 / 2 of the TP=1 parameters, for the loader."""

    takes_fp8 = False  # (the experts take the model's dtype)

    def __init__(self, hidden: int, moe: MoeConfig, ops: Any, dtype: torch.dtype | None = None,
                 tp: TPGroup = SINGLE) -> None:
        super().__init__()
        gate_up, down = split_intermediate(moe.intermediate_size, tp.rank, tp.size,
                                           "the experts' intermediate size")
        local = moe.intermediate_size // tp.size
        empty = lambda *shape: nn.Parameter(torch.empty(*shape, dtype=dtype),  # noqa: E731
                                            requires_grad=False)
        self.gate = empty(moe.num_experts, hidden)
        self.w13 = empty(moe.num_experts, 2 * local, hidden)
        self.w2 = empty(moe.num_experts, hidden, local)
        self.w13_shard = dataclasses.replace(gate_up, dim=1)
        self.w2_shard = dataclasses.replace(down, dim=2)
        self.top_k = moe.top_k
        self.renormalize = moe.norm_topk_prob
        self.ops = ops
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(``x``: the norm's rows in the model's dtype: ``takes_fp8`` is False.)"""
        weights, ids = route(F.linear(x, self.gate), self.top_k, self.renormalize)
        out = self.ops.fused_moe(x, self.w13, self.w2, weights, ids)
        return out if self.tp.size == 1 else self.tp.all_reduce(out)


def expert_shard(shard: Shard) -> Shard:
    """The slice of one expert's 2-D weight (a checkpoint tensor: gate/up/down of expert e)
    that ``shard`` (of the stacked 3-D parameter) holds: the same pieces, one dim lower."""
    return dataclasses.replace(shard, dim=shard.dim - 1)
