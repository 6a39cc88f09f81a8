"""Owns the model, its KV cache and the sampler; turns a scheduled batch into one forward pass.

Input layout of a step (decodes first, then prefill chunks, no padding):

    input_ids:    [ d0 d1 ... dN-1 | p0 p0 p0 p0 | p1 p1 ... ]
    positions:    each token's position in its request
    slot_mapping: each token's KV slot = block_table[pos // block_size] * block_size + pos % bs
"""

from __future__ import annotations

import logging
import numpy as np
import torch

from fairswitch.config import CacheConfig, SchedulerConfig
from fairswitch.kv.kv_cache import KVCache, kv_block_bytes
from fairswitch.model.llama import LlamaForCausalLM, head_dim_of
from fairswitch.request import Request
from fairswitch.runner.attention import AttentionBackend, AttentionMetadata
from fairswitch.runner.sampler import Sampler
from fairswitch.scheduler.scheduler import SchedulerOutput

logger = logging.getLogger(__name__)

_GiB = 1 << 30


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, backend: AttentionBackend, cache: CacheConfig,
                 sched: SchedulerConfig, max_model_len: int, device: torch.device,
                 dtype: torch.dtype, seed: int) -> None:
        self.model = model
        self.backend = backend
        self.device = device
        self.dtype = dtype
        self.block_size = cache.block_size
        cfg = model.config
        self.block_bytes = kv_block_bytes(cfg.num_hidden_layers, cache.block_size,
                                          cfg.num_key_value_heads, head_dim_of(cfg), dtype)
        num_blocks = self._num_blocks(cache, sched, max_model_len)
        if num_blocks * cache.block_size < max_model_len:
            raise ValueError(
                f"the KV cache holds {num_blocks} blocks x {cache.block_size} tokens = "
                f"{num_blocks * cache.block_size} tokens, less than max_model_len={max_model_len}; "
                "give it more memory or lower --max-model-len")
        self.kv_cache = KVCache(num_blocks, cfg.num_hidden_layers, cache.block_size,
                                cfg.num_key_value_heads, head_dim_of(cfg), dtype, device)
        self.sampler = Sampler(device, seed)
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB)", num_blocks, cache.block_size,
                    num_blocks * self.block_bytes / _GiB)

    @property
    def num_blocks(self) -> int:
        return self.kv_cache.num_blocks

    def _num_blocks(self, cache: CacheConfig, sched: SchedulerConfig, max_model_len: int) -> int:
        if cache.num_gpu_blocks is not None:
            return cache.num_gpu_blocks
        if cache.kv_cache_memory_gib is not None or self.device.type != "cuda":
            gib = cache.kv_cache_memory_gib or 1.0
            # Never more than every running request at full length could use.
            cap = sched.max_num_seqs * -(-max_model_len // cache.block_size)
            return max(1, min(int(gib * _GiB) // self.block_bytes, cap))
        return self._profile_gpu_blocks(cache, sched)

    def _profile_gpu_blocks(self, cache: CacheConfig, sched: SchedulerConfig) -> int:
        # Run the largest step we will ever run (a full-budget prefill plus logits for a full
        # batch), then give the KV cache what is left of the allowed fraction of the device.
        torch.cuda.synchronize(self.device)
        n = sched.max_num_batched_tokens
        probe = KVCache(-(-n // self.block_size), self.model.config.num_hidden_layers,
                        self.block_size, self.model.config.num_key_value_heads,
                        head_dim_of(self.model.config), self.dtype, self.device)
        blocks = list(range(probe.num_blocks))
        meta = self._metadata([], [(blocks, n, n)], torch.arange(n, device=self.device))
        with torch.inference_mode():
            hidden = self.model(torch.zeros(n, dtype=torch.long, device=self.device),
                                torch.arange(n, device=self.device) % self.model.rope.cos.shape[0],
                                probe.layer_views, meta)
            self.model.compute_logits(hidden[: min(n, sched.max_num_seqs)])
        torch.cuda.synchronize(self.device)
        del probe, hidden
        free, total = torch.cuda.mem_get_info(self.device)
        budget = cache.gpu_memory_utilization * total - (total - free)
        if budget < self.block_bytes:
            raise RuntimeError(
                f"no GPU memory left for the KV cache: {(total - free) / _GiB:.1f} GiB in use of "
                f"{total / _GiB:.1f} GiB, gpu_memory_utilization={cache.gpu_memory_utilization}")
        return int(budget // self.block_bytes)

    def _metadata(self, decodes: list[tuple[list[int], int]],
                  prefills: list[tuple[list[int], int, int]],
                  slot_mapping: torch.Tensor) -> AttentionMetadata:
        """decodes: (block_table, seq_len); prefills: (block_table, query_len, seq_len)."""
        return AttentionMetadata(
            slot_mapping=slot_mapping,
            num_decodes=len(decodes),
            decode_block_tables=self._pad_tables([bt for bt, _ in decodes]),
            decode_seq_lens=torch.tensor([s for _, s in decodes], dtype=torch.int32,
                                         device=self.device),
            prefill_block_tables=self._pad_tables([bt for bt, _, _ in prefills]),
            prefill_query_start_loc=np.concatenate(
                [[0], np.cumsum([q for _, q, _ in prefills], dtype=np.int64)]).tolist(),
            prefill_seq_lens=[s for _, _, s in prefills],
        )

    def _pad_tables(self, tables: list[list[int]]) -> torch.Tensor:
        width = max((len(t) for t in tables), default=1)
        arr = np.zeros((len(tables), width), dtype=np.int32)
        for i, t in enumerate(tables):
            arr[i, : len(t)] = t
        return torch.from_numpy(arr).to(self.device, non_blocking=True)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> dict[Request, int]:
        """Run one step; return the token sampled for each request that reached its last token."""
        bs = self.block_size
        batch = sorted(out.scheduled, key=lambda rn: rn[1] != 1)  # decodes first, stable
        input_ids: list[int] = []
        positions: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        decodes, prefills = [], []
        sample_rows: list[int] = []
        sample_reqs: list[Request] = []
        for req, n in batch:
            start = req.num_computed_tokens
            end = start + n
            input_ids.extend(req.token_ids[start:end])
            pos = np.arange(start, end, dtype=np.int64)
            table = np.asarray(req.block_table, dtype=np.int64)
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            if n == 1:
                decodes.append((req.block_table, end))
            else:
                prefills.append((req.block_table, n, end))
            if end == req.num_tokens:
                sample_rows.append(len(input_ids) - 1)
                sample_reqs.append(req)
        slot_mapping = torch.from_numpy(np.concatenate(slots)).to(self.device, non_blocking=True)
        meta = self._metadata(decodes, prefills, slot_mapping)
        ids = torch.tensor(input_ids, dtype=torch.long).to(self.device, non_blocking=True)
        pos_t = torch.from_numpy(np.concatenate(positions)).to(self.device, non_blocking=True)
        hidden = self.model(ids, pos_t, self.kv_cache.layer_views, meta)
        if not sample_reqs:
            return {}
        rows = torch.tensor(sample_rows, dtype=torch.long).to(self.device, non_blocking=True)
        logits = self.model.compute_logits(hidden[rows])
        tokens = self.sampler(logits, sample_reqs)
        return dict(zip(sample_reqs, tokens))

