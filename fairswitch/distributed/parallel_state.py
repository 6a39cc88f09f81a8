"""A tensor-parallel rank's place in its group and the two collectives the model needs.

The model never initializes torch.distributed: whoever starts the ranks does (NCCL on CUDA, gloo
on the CPU) and hands each model a ``TPGroup``. At ``size == 1`` there is no process group and
the collectives return their input; the model does not even call them then (it builds plain
layers), so a single-device model runs exactly the ops it always did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from fairswitch.distributed.shard_plan import local_kv_heads

__all__ = ["SINGLE", "TPGroup", "local_kv_heads"]


@dataclass(frozen=True)
class TPGroup:
    rank: int
    size: int
    group: Any  # torch.distributed ProcessGroup; None when size == 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank {self.rank} is outside a group of {self.size}")
        if self.size > 1 and self.group is None:
            raise ValueError("a tensor-parallel group of several ranks needs a process group")

    @classmethod
    def world(cls) -> TPGroup:
        """Every rank of the initialized default process group (``SINGLE`` if it has one)."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return SINGLE
        return cls(dist.get_rank(), dist.get_world_size(), dist.group.WORLD)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place (the partial outputs of a row-parallel layer)."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """The ranks' ``x`` concatenated along ``dim``, in rank order (vocab-parallel logits).

        The list form of all_gather works on both NCCL and gloo; the ranks' shapes must match.
        """
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """``x`` of rank ``src`` on every rank, in place (the tokens the driver sampled)."""
        if self.size > 1:
            dist.broadcast(x, src=src, group=self.group)
        return x


SINGLE = TPGroup(rank=0, size=1, group=None)
