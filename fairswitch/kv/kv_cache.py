"""The KV cache tensor: one pool per device in which a physical block is contiguous across layers.

    kv[num_blocks, num_layers, 2 (K/V), block_size, num_kv_heads, head_dim]

A run of consecutive block ids is therefore one contiguous byte range holding every layer's K and V
of those tokens, and moves with a single memcpy. Attention reads one layer through strided views
(``layer_views``); inside a block each layer's K (and V) is contiguous, so reads stay coalesced.
The GPU pool, the CPU swap space and the profiling probe all share one ``KVLayout``.

An fp8 pool (``float8_e4m3fn``) stores each value divided by its layer's K or V scale (kernels/
reference.py says how); the scales are 1-element float32 tensors on the pool's device, 1.0 (vLLM's
default without calibrated scales), read by the kernels through their pointers.

An fp8 pool lays each block's layer region out by head instead, [num_kv_heads, 2, block_size *
head_dim] where the layout above says [2, block_size, num_kv_heads, head_dim] (same bytes, same
place): for each head its K page [block_size, head_dim] and then its V page transposed,
[head_dim, block_size]. The product of the attention weights with V sums over tokens, so the
tensor cores want a page's tokens contiguous, and 1-byte elements cannot be transposed on the way
(kernels/paged_attention.py); and a head's K and V are one run of 2 x block_size x head_dim bytes,
which the decode kernel reads faster than K rows strided across heads (docs/benchmarks.md).
The views keep the [num_blocks, block_size, num_kv_heads, head_dim] indexing (their strides say
where each element is), so nothing but the kernels' address arithmetic sees the difference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

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

    @property
    def v_transposed(self) -> bool:
        """Whether each block's V is stored transposed, [head_dim, block_size] a head (fp8 pools,
        by head: ``fp8_layer_views``)."""
        return self.dtype == FP8_DTYPE


FP8_DTYPE = torch.float8_e4m3fn


def fp8_layer_views(region: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The K and V views [num_blocks, block_size, Hkv, D] of one layer's regions of an fp8 pool,
    ``region`` [num_blocks, 2, block_size, Hkv, D] (each block's region contiguous), stored by
    head: [Hkv, 2, block_size * D], a head's K page then its V page transposed (above)."""
    num_blocks, _, block_size, num_kv_heads, head_dim = region.shape
    assert region.stride()[1:] == (block_size * num_kv_heads * head_dim,
                                   num_kv_heads * head_dim, head_dim, 1), region.stride()
    page, shape = block_size * head_dim, (num_blocks, block_size, num_kv_heads, head_dim)
    offset = region.storage_offset()
    k = region.as_strided(shape, (region.stride(0), head_dim, 2 * page, 1), offset)
    v = region.as_strided(shape, (region.stride(0), 1, 2 * page, block_size), offset + page)
    return k, v


def kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The pool's element type for ``--kv-cache-dtype`` (auto or fp8, checked by CacheConfig)."""
    return FP8_DTYPE if name == "fp8" else model_dtype


class KVLayer(NamedTuple):
    """One layer's view of the pool: K and V [num_blocks, block_size, num_kv_heads, head_dim]
    (strided), and for an fp8 pool their scales (None otherwise)."""
    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None


class KVCache:
    def __init__(self, layout: KVLayout, num_blocks: int, device: torch.device) -> None:
        self.layout = layout
        self.num_blocks = num_blocks
        self.block_size = layout.block_size
        self.tensor = torch.zeros(layout.shape(num_blocks), dtype=layout.dtype, device=device)
        # Per layer [K scale, V scale]; they live beside the pool, not in it: swaps move bytes.
        self.scales = (torch.ones(layout.num_layers, 2, dtype=torch.float32, device=device)
                       if layout.dtype == FP8_DTYPE else None)
        self.layer_views = [self._layer(i) for i in range(layout.num_layers)]

    def _layer(self, i: int) -> KVLayer:
        if self.layout.v_transposed:
            k, v = fp8_layer_views(self.tensor[:, i])
        else:
            k, v = self.tensor[:, i, 0], self.tensor[:, i, 1]
        if self.scales is None:
            return KVLayer(k, v)
        return KVLayer(k, v, self.scales[i, 0:1], self.scales[i, 1:2])
