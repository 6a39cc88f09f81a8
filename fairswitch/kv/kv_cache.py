"""The KV cache tensor: one pool per device in which a physical block is contiguous across layers.

    kv[num_blocks, num_layers, 2 (K/V), block_size, num_kv_heads, head_dim]

A run of consecutive block ids is therefore one contiguous byte range holding every layer's K and V
of those tokens, and moves with a single memcpy. Attention reads one layer through strided views
(``layer_views``); inside a block each layer's K (and V) is contiguous, so reads stay coalesced.
The GPU pool, the CPU swap space and the profiling probe all share one ``KVLayout``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fairswitch.distributed.shard_plan import local_kv_heads


@dataclass(frozen=True)
class KVLayout:
    """The shape of one KV block; ``block_bytes`` is computed here and nowhere else."""
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    block_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        elem = torch.empty((), dtype=self.dtype).element_size()
        object.__setattr__(self, "block_bytes", self.num_layers * 2 * self.block_size
                           * self.num_kv_heads * self.head_dim * elem)

    @classmethod
    def of_model(cls, config, block_size: int, dtype: torch.dtype,
                 tensor_parallel_size: int = 1) -> KVLayout:
        """The layout of one rank's pool for a model config: its share of the KV heads."""
        return cls(config.num_hidden_layers, block_size,
                   local_kv_heads(config, tensor_parallel_size), config.head_dim, dtype)

    def shape(self, num_blocks: int) -> tuple[int, ...]:
        return (num_blocks, self.num_layers, 2, self.block_size, self.num_kv_heads,
                self.head_dim)

    def blocks_in(self, num_bytes: float) -> int:
        return int(num_bytes) // self.block_bytes


class KVCache:
    def __init__(self, layout: KVLayout, num_blocks: int, device: torch.device) -> None:
        self.layout = layout
        self.num_blocks = num_blocks
        self.block_size = layout.block_size
        self.tensor = torch.zeros(layout.shape(num_blocks), dtype=layout.dtype, device=device)
        # Per layer: (K, V), each [num_blocks, block_size, num_kv_heads, head_dim], strided.
        self.layer_views = [(self.tensor[:, i, 0], self.tensor[:, i, 1])
                            for i in range(layout.num_layers)]
