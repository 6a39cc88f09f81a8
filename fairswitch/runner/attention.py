"""Attention backend interface and its pure-torch implementation.

The runner builds one ``AttentionMetadata`` per step; every layer's attention call receives it with
that layer's KV views. Requests are ordered decodes first (one query token each), then prefills
(chunks of several tokens), so a backend can treat the two groups with different kernels.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from fairswitch.kernels import reference


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] long, -1 = padding
    num_decodes: int  # the first num_decodes requests (and tokens) are single-token decodes
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] int32
    decode_seq_lens: torch.Tensor  # [num_decodes] int32
    prefill_block_tables: torch.Tensor  # [num_prefills, max_blocks] int32
    prefill_query_start_loc: list[int]  # offsets into the prefill tokens, len num_prefills + 1
    prefill_seq_lens: list[int]


class AttentionBackend(ABC):
    name: str

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_layer: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata
                ) -> torch.Tensor:
        """Write this step's k, v into the cache, then attend; q [T, Hq, D] -> [T, Hq, D]."""


class TorchAttentionBackend(AttentionBackend):
    """Gathers KV through the block tables and runs SDPA; correct everywhere, fast nowhere."""

    name = "torch"

    def forward(self, q, k, v, kv_layer, meta):
        k_cache, v_cache = kv_layer
        reference.write_kv(k_cache, v_cache, k, v, meta.slot_mapping, has_padding=False)
        n = meta.num_decodes
        if n == q.shape[0]:
            return reference.paged_decode_attention(
                q, k_cache, v_cache, meta.decode_block_tables, meta.decode_seq_lens)
        out = torch.empty_like(q)
        if n:
            out[:n] = reference.paged_decode_attention(
                q[:n], k_cache, v_cache, meta.decode_block_tables, meta.decode_seq_lens)
        out[n:] = reference.paged_prefill_attention(
            q[n:], k_cache, v_cache, meta.prefill_block_tables, meta.prefill_query_start_loc,
            meta.prefill_seq_lens)
        return out


def get_attention_backend(name: str, device: torch.device) -> AttentionBackend:
    if name in ("auto", "torch"):
        return TorchAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r} (available: torch)")
