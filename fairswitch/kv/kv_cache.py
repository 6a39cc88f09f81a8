"""The KV cache tensor: one pool per device in which a physical block is contiguous across layers.

    kv[num_blocks, num_layers, 2 (K/V), block_size, num_kv_heads, head_dim]

A run of consecutive block ids is therefore one contiguous byte range holding every layer's K and V
of those tokens, and moves with a single memcpy. Attention reads one layer through strided views
(``layer_views``); inside a block each layer's K (and V) is contiguous, so reads stay coalesced.
"""

from __future__ import annotations

import torch


def kv_block_bytes(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                   dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return num_layers * 2 * block_size * num_kv_heads * head_dim * elem


class KVCache:
    def __init__(self, num_blocks: int, num_layers: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.tensor = torch.zeros(
            (num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim), dtype=dtype,
            device=device,
        )
        # Per layer: (K, V), each [num_blocks, block_size, num_kv_heads, head_dim], strided.
        self.layer_views = [(self.tensor[:, i, 0], self.tensor[:, i, 1]) for i in range(num_layers)]

    @property
    def block_bytes(self) -> int:
        return self.tensor[0].numel() * self.tensor.element_size()
