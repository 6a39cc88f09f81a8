"""CUDA graphs for steps that carry prompt tokens (prefill chunks, alone or beside decodes).

Such steps ran eagerly: on the H200, Llama-3-8B, a step with even a few prompt tokens took
20-25 ms against 6-8 ms for a graphed decode step (the launch overhead of ~15 kernels per layer),
a quarter of the busy phase of the FastSwitch-style runs (README, step logs).

One graph per (token bucket T, sequence bucket S), for steps of up to MAX_GRAPH_TOKENS tokens
(longer ones run eagerly: see the measurements above MAX_GRAPH_TOKENS). Every sequence of the
step, decodes included, goes through the prefill attention kernel as a chunk of its query length
(a decode is a chunk of 1), so one kernel with a grid fixed by (T, S) serves any mix:

    tokens:     [ d0 d1 d2 | p0 p0 p0 p0 p0 | p1 p1 | pad pad pad ]        T = bucket
    sequences:  [ 1  1  1  | 5             | 2     | 0 0 ... ]  q_len    S = bucket
    seq_lens:   each sequence's length after the step; 0 for padding sequences

Padding tokens have KV slot -1 (not written) and belong to no sequence (their attention output is
never written; rows are independent through every other layer, so whatever they hold stays in
their own rows). Padding sequences have q_len 0 and length 0: their programs return at once. The
prefill kernel's grid is T // tile + S query-tile slots per KV head whatever the mix (see
kernels/paged_attention.py), so idle programs stay few even at the largest bucket.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fairswitch.runner.attention import AttentionMetadata
from fairswitch.runner.cuda_graph import capture_graph, fill_lora_slots, release_graphs
from fairswitch.runner.host_link import StagingBuffer
from fairswitch.runner.input_batch import InputBatch

logger = logging.getLogger(__name__)


# Graphs pay off only while the GPU finishes a step before the host has launched it eagerly
# (~15 kernels per layer). H200, Llama-3-8B, 1-32 decodes beside a prompt chunk
# (benchmarks/mixed_step.py): up to 288 tokens, graphed steps 6.8-11 ms against 15.5-36 ms eager;
# from ~600 tokens the GPU's work hides the launches and eager is as fast or faster (no padding):
# 601 tokens eager 16.8 ms vs 18.9 ms graphed at 768. So buckets every 64 tokens up to 512;
# longer steps run eagerly.
MAX_GRAPH_TOKENS = 512
_TOKEN_SPACING = 64


def token_buckets(max_tokens: int) -> list[int]:
    """Token counts with a graph: multiples of 64 up to MAX_GRAPH_TOKENS, capped by (and ending
    at) ``max_tokens``."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    top = min(max_tokens, MAX_GRAPH_TOKENS)
    return list(range(_TOKEN_SPACING, top, _TOKEN_SPACING)) + [top]


def seq_buckets(max_seqs: int) -> list[int]:
    return sorted({b for b in (4, 16) if b < max_seqs} | {max_seqs})


@dataclass(slots=True)
class MixedLayout:
    """A step's inputs padded to (T, S) with every sequence as a chunk (host arrays at least
    T / S / S + 1 long; the graph of bucket (T, S) reads their first T / S / S + 1 entries)."""

    input_ids: np.ndarray  # [T] int64, padding 0
    positions: np.ndarray  # [T] int64, padding 0
    slot_mapping: np.ndarray  # [T] int64, padding -1
    query_start_loc: np.ndarray  # [S + 1] int32, padding sequences repeat the end
    seq_lens: np.ndarray  # [S] int32, padding 0
    block_tables: np.ndarray  # [S, width] int32, rows of padding sequences never read


def fill_mixed_layout(batch: InputBatch, num_tokens: int, num_seqs: int, dst: MixedLayout
                      ) -> int:
    """Write ``batch`` into ``dst`` for the graph of bucket (num_tokens, num_seqs); returns the
    number of real sequences. Token order is the batch's (decodes first), so sample rows are
    unchanged. Block-table entries past a sequence's length and rows past the real sequences
    are left as they were: the kernels never read them."""
    n, nd = batch.num_tokens, batch.num_decodes
    nseq = nd + len(batch.prefill_seq_lens)
    if n > num_tokens or nseq > num_seqs:
        raise ValueError(f"a step of {n} tokens / {nseq} sequences does not fit the bucket "
                         f"({num_tokens}, {num_seqs})")
    width = dst.block_tables.shape[1]
    tables = ((batch.decode_block_tables[:nd], 0), (batch.prefill_block_tables[:nseq - nd], nd))
    for rows, _ in tables:
        if len(rows) and rows.shape[1] > width:
            raise ValueError(f"block tables of {rows.shape[1]} blocks exceed width {width}")
    for rows, first in tables:
        if len(rows):
            dst.block_tables[first:first + len(rows), :rows.shape[1]] = rows
    dst.input_ids[:n], dst.positions[:n] = batch.input_ids, batch.positions
    dst.slot_mapping[:n] = batch.slot_mapping
    dst.input_ids[n:num_tokens], dst.positions[n:num_tokens] = 0, 0
    dst.slot_mapping[n:num_tokens] = -1
    qsl = dst.query_start_loc
    qsl[0] = 0
    qsl[1:nd + 1] = np.arange(1, nd + 1)
    qsl[nd + 1:nseq + 1] = nd + batch.prefill_query_start_loc[1:]
    qsl[nseq + 1:num_seqs + 1] = n
    dst.seq_lens[:nd] = batch.decode_seq_lens
    dst.seq_lens[nd:nseq] = batch.prefill_seq_lens
    dst.seq_lens[nseq:num_seqs] = 0
    return nseq


def mixed_layout(batch: InputBatch, num_tokens: int, num_seqs: int, width: int) -> MixedLayout:
    """``batch`` laid out for bucket (num_tokens, num_seqs) in new arrays (unused table entries
    zero)."""
    lay = MixedLayout(np.zeros(num_tokens, np.int64), np.zeros(num_tokens, np.int64),
                      np.full(num_tokens, -1, np.int64), np.zeros(num_seqs + 1, np.int32),
                      np.zeros(num_seqs, np.int32), np.zeros((num_seqs, width), np.int32))
    fill_mixed_layout(batch, num_tokens, num_seqs, lay)
    return lay


class MixedGraphs:
    def __init__(self, model: Any, kv_layers: list, max_tokens: int, max_seqs: int,
                 max_blocks_per_seq: int, device: torch.device) -> None:
        self.model = model
        self.kv_layers = kv_layers
        self.device = device
        self.token_buckets = token_buckets(max_tokens)
        self.seq_buckets = seq_buckets(max_seqs)
        self.width = max_blocks_per_seq
        T, S = self.token_buckets[-1], self.seq_buckets[-1]
        # Inputs in one staging buffer (as DecodeGraphs). Layout, 8-byte aligned where it matters:
        #   [ input_ids i64 x T | positions i64 x T | slot_mapping i64 x T | lora_slots i64 x T
        #     | query_start_loc i32 x (S + 1) | seq_lens i32 x S | block_tables i32 x S x width ]
        # (block-table rows last: a step copies only the rows of its real sequences)
        self._header_bytes = 8 * 4 * T + 4 * (2 * S + 1)
        self._row_bytes = 4 * self.width
        self._staging = staging = StagingBuffer(self._header_bytes + S * self._row_bytes, device)
        self.input_ids, h_ids = staging.take(torch.int64, T)
        self.positions, h_pos = staging.take(torch.int64, T)
        self.slot_mapping, h_slots = staging.take(torch.int64, T)
        self.lora_slots, self._h_lora = staging.take(torch.int64, T)  # (as DecodeGraphs')
        self._lora = getattr(model, "lora", None) is not None
        self._h_lora.fill(-1)
        self.query_start_loc, h_qsl = staging.take(torch.int32, S + 1)
        self.seq_lens, h_lens = staging.take(torch.int32, S)
        self.block_tables, h_tables = staging.take(torch.int32, S, self.width)
        self._staged = MixedLayout(h_ids, h_pos, h_slots, h_qsl, h_lens, h_tables)
        h_slots.fill(-1)  # capture warm-ups write no KV (every sequence has query length 0)
        staging.send()
        self._empty_i32 = torch.zeros(0, dtype=torch.int32, device=device)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.capture_s = 0.0

    def _meta(self, t: int, s: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:t], num_decodes=0,
            decode_block_tables=self._empty_i32.view(0, 1), decode_seq_lens=self._empty_i32,
            prefill_block_tables=self.block_tables[:s],
            prefill_query_start_loc=self.query_start_loc[:s + 1],
            prefill_seq_lens=self.seq_lens[:s],
            prefill_query_start_loc_host=[], prefill_seq_lens_host=[],  # Triton reads the device
            max_query_len=None)

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        for t in reversed(self.token_buckets):  # largest first: the pool's memory is reused
            for s in reversed(self.seq_buckets):
                args = (self.input_ids[:t], self.positions[:t], self.kv_layers, self._meta(t, s),
                        self.lora_slots[:t] if self._lora else None)
                self._graphs[(t, s)] = capture_graph(self.model, args, pool, stream, self.device)
        torch.cuda.synchronize(self.device)
        self.capture_s = time.perf_counter() - t0
        logger.info("captured %d prefill/mixed CUDA graphs (tokens %s x sequences %s) in %.1f s",
                    len(self._graphs), self.token_buckets, self.seq_buckets, self.capture_s)

    def release(self) -> None:
        release_graphs(self._graphs)

    def bucket(self, batch: InputBatch) -> tuple[int, int] | None:
        nseq = batch.num_decodes + len(batch.prefill_seq_lens)
        t = next((x for x in self.token_buckets if x >= batch.num_tokens), None)
        s = next((x for x in self.seq_buckets if x >= nseq), None)
        widest = max(batch.decode_block_tables.shape[1], batch.prefill_block_tables.shape[1])
        if t is None or s is None or widest > self.width:
            return None
        return (t, s) if (t, s) in self._graphs else None

    def run(self, batch: InputBatch, bucket: tuple[int, int],
            feed: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] of the step, by replaying graph ``bucket``;
        ``feed`` as in ``DecodeGraphs.run``."""
        t, s = bucket
        self._staging.wait_sent()
        nseq = fill_mixed_layout(batch, t, s, self._staged)
        if self._lora:
            fill_lora_slots(self._h_lora, batch, t)
        self._staging.send(self._header_bytes + nseq * self._row_bytes)
        if feed is not None:
            feed(self.input_ids)
        graph, out = self._graphs[bucket]
        graph.replay()
        return out[:batch.num_tokens]
