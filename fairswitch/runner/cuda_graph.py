"""CUDA graphs for decode-only steps: one graph per batch-size bucket, static input buffers.

A decode step of B requests runs the graph of the smallest bucket >= B. The rows past B are
padding: token 0 at position 0, KV slot -1 (the KV write skips it) and sequence length 0 (the
attention kernel reads nothing for it); their hidden states are computed and ignored. Block tables
have a fixed width (max_model_len / block_size) so the decode kernel's grid never changes.
Prefill and mixed steps, and batches above the largest bucket, run eagerly.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from fairswitch.runner.attention import AttentionMetadata
from fairswitch.runner.input_batch import InputBatch

logger = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    small = [1, 2, 4, 8]
    buckets = [b for b in small if b < max_batch] + list(range(16, max_batch, 16))
    return sorted(set(buckets + [max_batch]))


class DecodeGraphs:
    def __init__(self, model: Any, kv_layers: list, max_batch: int, max_blocks_per_seq: int,
                 device: torch.device) -> None:
        self.model = model
        self.kv_layers = kv_layers
        self.device = device
        self.buckets = batch_buckets(max_batch)
        self.max_batch = self.buckets[-1]
        n = self.max_batch
        i32 = dict(dtype=torch.int32, device=device)
        i64 = dict(dtype=torch.int64, device=device)
        self.input_ids = torch.zeros(n, **i64)
        self.positions = torch.zeros(n, **i64)
        self.slot_mapping = torch.full((n,), -1, **i64)
        self.block_tables = torch.zeros((n, max_blocks_per_seq), **i32)
        self.seq_lens = torch.zeros(n, **i32)
        self._empty_i32 = torch.zeros(0, **i32)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:b], num_decodes=b,
            decode_block_tables=self.block_tables[:b], decode_seq_lens=self.seq_lens[:b],
            prefill_block_tables=self._empty_i32.view(0, 1),
            prefill_query_start_loc=torch.zeros(1, dtype=torch.int32, device=self.device),
            prefill_seq_lens=self._empty_i32, prefill_query_start_loc_host=[0],
            prefill_seq_lens_host=[], max_query_len=0)

    @torch.inference_mode()
    def capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        # Largest first: smaller graphs then reuse the memory of the larger ones in the pool.
        for b in reversed(self.buckets):
            meta = self._meta(b)
            args = (self.input_ids[:b], self.positions[:b], self.kv_layers, meta)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self.model(*args)  # warm up: Triton compiles and autotunes outside the capture
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                out = self.model(*args)
            self._graphs[b] = (graph, out)
        torch.cuda.synchronize(self.device)
        logger.info("captured decode CUDA graphs for batch sizes %s", self.buckets)

    def can_run(self, batch: InputBatch) -> bool:
        return batch.is_decode_only and 0 < batch.num_tokens <= self.max_batch and bool(
            self._graphs)

    def run(self, batch: InputBatch) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] of a decode-only batch, by graph replay."""
        n = batch.num_tokens
        b = next(x for x in self.buckets if x >= n)
        _copy(self.input_ids, batch.input_ids, b, 0)
        _copy(self.positions, batch.positions, b, 0)
        _copy(self.slot_mapping, batch.slot_mapping, b, -1)
        _copy(self.seq_lens, batch.decode_seq_lens, b, 0)
        tables = batch.decode_block_tables
        self.block_tables[:n, : tables.shape[1]].copy_(torch.from_numpy(tables),
                                                       non_blocking=True)
        # Columns past this batch's widest table keep stale ids: they lie beyond every
        # sequence's length and are never read.
        graph, out = self._graphs[b]
        graph.replay()
        return out[:n]


def _copy(dst: torch.Tensor, src: np.ndarray, bucket: int, pad: int) -> None:
    n = len(src)
    dst[:n].copy_(torch.from_numpy(src), non_blocking=True)
    if bucket > n:
        dst[n:bucket].fill_(pad)
