"""CUDA graphs for decode-only steps: one graph per batch-size bucket, static input buffers.

A decode step of B requests runs the graph of the smallest bucket >= B. The rows past B are
padding: token 0 at position 0, KV slot -1 (the KV write skips it) and sequence length 0 (the
attention kernel reads nothing for it); their hidden states are computed and ignored. Block tables
have a fixed width (max_model_len / block_size) so the decode kernel's grid never changes.
Steps with prompt tokens go to runner/mixed_graphs.py (or run eagerly), as do batches above the
largest bucket.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fairswitch.runner.attention import AttentionMetadata
from fairswitch.runner.host_link import StagingBuffer
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
        n, width = self.max_batch, max_blocks_per_seq
        # Layout, 8-byte aligned throughout:
        #   [ input_ids i64 x n | positions i64 x n | slot_mapping i64 x n | lora_slots i64 x n
        #     | seq_lens i32 x n | block_tables i32 x n x width ]
        # (rows of block_tables last: copy only b of them)
        self._header_bytes = 8 * 4 * n + 4 * n + (4 * n) % 8
        self._row_bytes = 4 * width
        self._staging = staging = StagingBuffer(self._header_bytes + n * self._row_bytes, device)
        self.input_ids, self._h_ids = staging.take(torch.int64, n)
        self.positions, self._h_pos = staging.take(torch.int64, n)
        self.slot_mapping, self._h_slots = staging.take(torch.int64, n)
        # Each token's LoRA slot (-1: none), read only with adapters served (model.lora).
        self.lora_slots, self._h_lora = staging.take(torch.int64, n)
        self._lora = getattr(model, "lora", None) is not None
        self.seq_lens, self._h_lens = staging.take(torch.int32, n)
        staging.offset = self._header_bytes
        self.block_tables, self._h_tables = staging.take(torch.int32, n, width)
        self._h_slots.fill(-1)  # graph warm-up and padding rows write no KV
        self._h_lora.fill(-1)
        staging.send()
        self._empty_i32 = torch.zeros(0, dtype=torch.int32, device=device)
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
            args = (self.input_ids[:b], self.positions[:b], self.kv_layers, self._meta(b),
                    self.lora_slots[:b] if self._lora else None)
            self._graphs[b] = capture_graph(self.model, args, pool, stream, self.device)
        torch.cuda.synchronize(self.device)
        logger.info("captured decode CUDA graphs for batch sizes %s", self.buckets)

    def release(self) -> None:
        release_graphs(self._graphs)

    def can_run(self, batch: InputBatch) -> bool:
        return batch.is_decode_only and 0 < batch.num_tokens <= self.max_batch and bool(
            self._graphs)

    def run(self, batch: InputBatch, feed: Callable[[torch.Tensor], None] | None = None
            ) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] of a decode-only batch, by graph replay; ``feed``
        writes the inputs the host does not know yet into the input ids on the device."""
        n = batch.num_tokens
        b = next(x for x in self.buckets if x >= n)
        self._staging.wait_sent()
        _fill(self._h_ids, batch.input_ids, b, 0)
        _fill(self._h_pos, batch.positions, b, 0)
        _fill(self._h_slots, batch.slot_mapping, b, -1)
        _fill(self._h_lens, batch.decode_seq_lens, b, 0)
        if self._lora:
            fill_lora_slots(self._h_lora, batch, b)
        tables = batch.decode_block_tables
        self._h_tables[:n, : tables.shape[1]] = tables
        # Columns past this batch's widest table keep stale ids: they lie beyond every
        # sequence's length and are never read. Rows past b are not used by graph b.
        self._staging.send(self._header_bytes + b * self._row_bytes)
        if feed is not None:
            feed(self.input_ids)
        graph, out = self._graphs[b]
        graph.replay()
        return out[:n]


def release_graphs(graphs: dict[Any, tuple[torch.cuda.CUDAGraph, torch.Tensor]]) -> None:
    """Destroy captured graphs now, not when the garbage collector gets to them. A graph that
    captured NCCL collectives holds its communicator: NCCL's destroy and abort wait, in a C
    call, until every such graph is gone (NCCL >= 2.26), so a tensor-parallel rank releases its
    graphs before it leaves the process group."""
    for graph, _ in graphs.values():
        graph.reset()
    graphs.clear()


def capture_graph(model: Any, args: tuple, pool: Any, stream: torch.cuda.Stream,
                  device: torch.device) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Run ``model(*args)`` once on ``stream`` (warm-up: Triton compiles and autotunes outside
    the capture), then capture it into a graph drawing on memory ``pool``; (graph, output)."""
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        model(*args)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=stream):
        out = model(*args)
    return graph, out


def fill_lora_slots(dst: np.ndarray, batch: InputBatch, bucket: int) -> None:
    """A graph's LoRA slot inputs: the batch's (none: -1), padding rows -1."""
    if batch.lora_slots is None:
        dst[:bucket] = -1
    else:
        _fill(dst, batch.lora_slots, bucket, -1)


def _fill(dst: np.ndarray, src: np.ndarray, bucket: int, pad: int) -> None:
    n = len(src)
    dst[:n] = src
    dst[n:bucket] = pad
