"""Attention backend interface and its implementations: the kernels a model runs.

A backend is the model's attention (paged KV write, decode and prefill attention) and, as
``ops``, the elementwise kernels that go with it (norms, RoPE, SiLU): the torch references, or
Triton's fused kernels beside the Triton attention.

The runner builds one ``AttentionMetadata`` per step; every layer's attention call receives it with
that layer's KV views. Requests are ordered decodes first (one query token each), then prefills
(chunks of several tokens), so a backend can treat the two groups with different kernels.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from fairswitch.kernels import reference
from fairswitch.kv.kv_cache import KVLayer

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] long, -1 = padding (CUDA-graph buckets)
    num_decodes: int  # the first num_decodes requests (and tokens) are single-token decodes
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] int32
    decode_seq_lens: torch.Tensor  # [num_decodes] int32, 0 for padding rows
    prefill_block_tables: torch.Tensor  # [num_prefills, max_blocks] int32
    prefill_query_start_loc: torch.Tensor  # [num_prefills + 1] int32, offsets into prefill tokens
    prefill_seq_lens: torch.Tensor  # [num_prefills] int32
    # Host copies of the prefill layout (the torch backend loops over sequences on the host).
    prefill_query_start_loc_host: list[int]
    prefill_seq_lens_host: list[int]
    max_query_len: int | None  # None: the prefill kernel's grid sized by shapes alone (graphs)


class AttentionBackend(ABC):
    """Writes a step's K/V into the paged cache, then attends: decodes and prefills separately."""

    name: str
    ops: Any  # the elementwise kernels' module: kernels/reference.py or kernels/fused_ops.py

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: KVLayer,
                meta: AttentionMetadata) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] of this step -> attention output [T, Hq, D]; ``kv`` is
        the layer's view of the pool (with its scales if the pool is fp8)."""
        self.write_kv(kv, k, v, meta.slot_mapping)
        n = meta.num_decodes
        if n == q.shape[0]:
            return self.decode(q, kv, meta)
        out = torch.empty_like(q)
        if n:
            out[:n] = self.decode(q[:n], kv, meta)
        out[n:] = self.prefill(q[n:], kv, meta)
        return out

    @abstractmethod
    def write_kv(self, kv: KVLayer, k, v, slot_mapping) -> None: ...

    @abstractmethod
    def decode(self, q, kv: KVLayer, meta: AttentionMetadata) -> torch.Tensor: ...

    @abstractmethod
    def prefill(self, q, kv: KVLayer, meta: AttentionMetadata) -> torch.Tensor: ...


class TorchAttentionBackend(AttentionBackend):
    """Gathers KV through the block tables and runs SDPA; correct everywhere, fast nowhere."""

    name = "torch"
    ops = reference

    def write_kv(self, kv, k, v, slot_mapping):
        # The eager runner never pads (only CUDA-graph buckets do, and they use Triton).
        reference.write_kv(kv.k, kv.v, k, v, slot_mapping, has_padding=False,
                           k_scale=kv.k_scale, v_scale=kv.v_scale)

    def decode(self, q, kv, meta):
        return reference.paged_decode_attention(q, kv.k, kv.v, meta.decode_block_tables,
                                                meta.decode_seq_lens, k_scale=kv.k_scale,
                                                v_scale=kv.v_scale)

    def prefill(self, q, kv, meta):
        return reference.paged_prefill_attention(
            q, kv.k, kv.v, meta.prefill_block_tables, meta.prefill_query_start_loc_host,
            meta.prefill_seq_lens_host, k_scale=kv.k_scale, v_scale=kv.v_scale)


class TritonAttentionBackend(AttentionBackend):
    """Triton paged attention (kernels/paged_attention.py): split-KV decode, varlen prefill.

    Launch grids depend only on tensor shapes, so decode steps can be captured in CUDA graphs.
    """

    name = "triton"

    def __init__(self) -> None:
        from fairswitch.kernels import fused_ops, paged_attention

        self._k = paged_attention
        self.ops = fused_ops

    def write_kv(self, kv, k, v, slot_mapping):
        self._k.write_kv(kv.k, kv.v, k, v, slot_mapping, k_scale=kv.k_scale, v_scale=kv.v_scale)

    def decode(self, q, kv, meta):
        return self._k.paged_decode_attention(q, kv.k, kv.v, meta.decode_block_tables,
                                              meta.decode_seq_lens, k_scale=kv.k_scale,
                                              v_scale=kv.v_scale)

    def prefill(self, q, kv, meta):
        return self._k.paged_prefill_attention(
            q, kv.k, kv.v, meta.prefill_block_tables, meta.prefill_query_start_loc,
            meta.prefill_seq_lens, meta.max_query_len, k_scale=kv.k_scale, v_scale=kv.v_scale)


ATTENTION_BACKENDS = ("auto", "torch", "triton")


FP8_TRITON_CAPABILITY = (8, 9)  # Triton's e4m3 (fp8e4nv) needs Ada or Hopper, or newer


def get_attention_backend(name: str, device: torch.device,
                          kv_cache_dtype: str = "auto") -> AttentionBackend:
    """auto: Triton kernels on CUDA, the torch reference elsewhere. An fp8 KV cache on a GPU
    older than compute capability 8.9 (A100, V100...) has no Triton e4m3: auto takes the torch
    reference there (with a warning), triton is refused (it failed at the first forward, a
    Triton compile error)."""
    if name in ("auto", "triton") and device.type == "cuda" and kv_cache_dtype == "fp8":
        capability = torch.cuda.get_device_capability(device)
        if capability < FP8_TRITON_CAPABILITY:
            why = (f"an fp8 KV cache needs compute capability 8.9 or newer for the Triton "
                   f"kernels (e4m3); this GPU has {capability[0]}.{capability[1]}")
            if name == "triton":
                raise ValueError(f"{why}: pass --attention-backend torch, or "
                                 "--kv-cache-dtype auto")
            logger.warning("%s: attention runs on the torch reference (slower)", why)
            name = "torch"
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        return TorchAttentionBackend()
    if name == "triton":
        if device.type != "cuda":
            raise ValueError("the triton attention backend needs a CUDA device")
        return TritonAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r} (available: {ATTENTION_BACKENDS})")
