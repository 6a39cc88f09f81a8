"""What the switch benchmarks (switch_bandwidth.py, duplex_switch.py) share: one KV geometry
(default Llama-3-8B: 32 layers, 8 KV heads, head dim 128, bf16 on CUDA, 16-token blocks), a
batch of request lengths drawn from a seed, and the GPU and pinned CPU pools they swap between."""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass

import torch

from fairswitch.kv.kv_cache import KVLayout


def add_switch_args(p: argparse.ArgumentParser, copy_backends: tuple[str, ...],
                    default_copy_backend: str) -> None:
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--min-tokens", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--copy-backend", default=default_copy_backend, choices=copy_backends)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--commit", default=None)


@dataclass
class SwitchSetup:
    device: torch.device
    dtype: torch.dtype
    lengths: list[int]  # the batch's request lengths, in tokens
    layout: KVLayout

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SwitchSetup:
        device = torch.device(args.device)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        rng = random.Random(args.seed)
        lengths = [rng.randint(args.min_tokens, args.max_tokens) for _ in range(args.requests)]
        layout = KVLayout(args.layers, args.block_size, args.kv_heads, args.head_dim, dtype)
        return cls(device, dtype, lengths, layout)

    @property
    def batch_blocks(self) -> int:
        """Blocks the batch's KV takes."""
        return sum(-(-n // self.layout.block_size) for n in self.lengths)

    def pools(self, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(GPU pool, CPU pool, pinned on CUDA) of ``blocks`` blocks each."""
        shape = self.layout.shape(blocks)
        return (torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.empty(shape, dtype=self.dtype, pin_memory=self.device.type == "cuda"))

    def geometry(self, args: argparse.Namespace) -> dict[str, object]:
        return {"layers": args.layers, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
                "block_size": args.block_size, "dtype": str(self.dtype)}
