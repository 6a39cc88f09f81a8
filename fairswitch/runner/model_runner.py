"""Owns the model, its CUDA graphs and the sampler; runs one step's forward pass over the KV cache
it is bound to (the cache itself belongs to kv/memory.py, sized by ``profile_kv_bytes`` on CUDA).

Inputs are laid out by input_batch.py; decode-only steps replay a CUDA graph when captured.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fairswitch.config import SchedulerConfig
from fairswitch.distributed.parallel_state import SINGLE, TPGroup
from fairswitch.kv.kv_cache import KVCache, KVLayout
from fairswitch.model.llama import LlamaForCausalLM
from fairswitch.request import PLACEHOLDER_TOKEN, Request
from fairswitch.runner.attention import AttentionBackend, AttentionMetadata
from fairswitch.runner.cuda_graph import DecodeGraphs
from fairswitch.runner.host_link import SampleRowsBuffer, TokenReturn
from fairswitch.runner.input_batch import InputBatch, build_input_batch
from fairswitch.runner.mixed_graphs import MixedGraphs
from fairswitch.runner.sampler import SampledLogprobs, Sampler, token_logprobs
from fairswitch.runner.step_events import StepEvents
from fairswitch.scheduler.scheduler import SchedulerOutput

logger = logging.getLogger(__name__)

_GiB = 1 << 30


@dataclass(frozen=True)
class GraphPlan:
    """Which CUDA graphs the runner captures once its KV cache exists."""
    decode: bool = False  # decode-only steps, batch sizes up to max_num_seqs
    mixed: bool = False  # steps with prompt tokens, up to 512 tokens (mixed_graphs.py)


@dataclass
class PendingStep:
    """A launched step: the requests that sample, in order, their tokens on the device (what a
    step launched after it reads its inputs from), and, when they are on their way to the host
    by host_link.TokenReturn, that copy's handle; the logprobs asked for, on the device."""
    requests: list[Request]
    tokens: torch.Tensor | None
    returned: tuple[int, int] | None = None
    logprobs: SampledLogprobs | None = None
    prompt_logprobs: tuple[list[tuple[Request, int]], SampledLogprobs] | None = None
    # Embedding requests whose prompt ended in this step, and their last positions' states.
    pooled: tuple[list[Request], torch.Tensor] | None = None


# Per sampled token of a request that asked: {token id: (logprob, rank)}, the sampled first.
TokenLogprobs = dict[int, tuple[float, int]]


@dataclass
class StepPlan:
    """One step as every tensor-parallel rank runs it: its inputs and, for each placeholder
    input (``batch.feed_rows``), the index of its token among the tokens of the step before;
    the LoRA adapters to copy into slots first, (slot, LoRAAdapter): their weights as the
    driver read them go to every rank (a rank reading the folder itself could find it gone or
    changed)."""
    batch: InputBatch
    feed_src: list[int]
    lora_loads: list[tuple[int, Any]] = dataclasses.field(default_factory=list)

    def for_workers(self) -> StepPlan:
        """The plan without the Request objects (the driver's alone: they sample there)."""
        return StepPlan(dataclasses.replace(self.batch, sample_requests=[], feed_requests=[],
                                            prompt_logprob_at=[]), self.feed_src,
                        self.lora_loads)


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, backend: AttentionBackend,
                 sched: SchedulerConfig, max_model_len: int, device: torch.device,
                 dtype: torch.dtype, seed: int, graphs: GraphPlan = GraphPlan(),
                 events: StepEvents | None = None, tp: TPGroup = SINGLE) -> None:
        self.model = model
        self.tp = tp
        # Tensor parallelism, on the driver (rank 0): hands each step's plan to the other ranks.
        self.send_plan: Callable[[StepPlan], None] | None = None
        self.backend = backend
        self.device = device
        self.dtype = dtype
        self.sched = sched
        self.max_model_len = max_model_len
        self.events = events if events is not None else StepEvents()
        self.graph_plan = graphs
        self.graph_bytes = 0  # device memory the CUDA graphs' pools took (measured on CUDA)
        self.kv_cache: KVCache | None = None  # bind_kv_cache
        self.block_size = 0
        self.graphs: DecodeGraphs | None = None
        self.mixed_graphs: MixedGraphs | None = None
        self.sampler = Sampler(device, seed)
        # On CUDA, sample rows go in and tokens come back by kernel copies (host_link.py).
        on_cuda = device.type == "cuda"
        self._rows = SampleRowsBuffer(sched.max_num_seqs, device) if on_cuda else None
        # Inputs fed from the step in flight: their rows, then their tokens' index in it.
        self._feeds = SampleRowsBuffer(2 * sched.max_num_seqs, device) if on_cuda else None
        self._tokens = TokenReturn(sched.max_num_seqs) if on_cuda else None
        self.last_prepare_s = 0.0

    def bind_kv_cache(self, kv_cache: KVCache) -> None:
        """Run over ``kv_cache`` from now on; the CUDA graphs of the plan are captured over it."""
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.graphs, self.mixed_graphs = self._capture(kv_cache.layer_views, self.block_size)

    def release_graphs(self, wait: bool = True) -> None:
        """Destroy the CUDA graphs (the runner steps eagerly after this): before a
        tensor-parallel rank leaves its NCCL group, whose teardown waits for the graphs that
        captured its collectives (cuda_graph.release_graphs). ``wait``: first let the device
        finish what it was given (an orderly exit; not after a failure, where a collective may
        never end)."""
        if self.graphs is None and self.mixed_graphs is None:
            return
        if wait:
            torch.cuda.synchronize(self.device)
        for graphs in (self.graphs, self.mixed_graphs):
            if graphs is not None:
                graphs.release()
        self.graphs = self.mixed_graphs = None

    @property
    def num_blocks(self) -> int:
        return self.kv_cache.num_blocks if self.kv_cache is not None else 0

    def profile_kv_bytes(self, layout: KVLayout, gpu_memory_utilization: float) -> float:
        """Device memory left for the KV cache (CUDA): run the largest step we will ever run (a
        full-budget prefill plus logits for a full batch) and capture the CUDA graphs once over
        the probe's small cache to weigh their pools; what is left of the allowed fraction of
        the device after weights, activations and graphs."""
        sched = self.sched
        torch.cuda.synchronize(self.device)
        # Cached blocks nobody uses (left by loading, or by engines built before in this
        # process) would read as in use and shrink the KV cache for nothing.
        unused = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        torch.cuda.empty_cache()
        logger.info("profiling: released %.2f GiB of cached, unused device memory", unused / _GiB)
        n = sched.max_num_batched_tokens
        probe = KVCache(layout, -(-n // layout.block_size), self.device)
        table = np.arange(probe.num_blocks, dtype=np.int32)[None, :]
        positions = np.arange(n, dtype=np.int64) % self.model.rope.cos.shape[0]
        batch = InputBatch(
            input_ids=np.zeros(n, dtype=np.int64), positions=positions,
            slot_mapping=np.arange(n, dtype=np.int64), num_decodes=0,
            decode_block_tables=np.zeros((0, 1), dtype=np.int32),
            decode_seq_lens=np.zeros(0, dtype=np.int32), prefill_block_tables=table,
            prefill_query_start_loc=np.array([0, n], dtype=np.int32),
            prefill_seq_lens=np.array([n], dtype=np.int32), sample_rows=[], sample_requests=[])
        with torch.inference_mode():
            hidden = self._forward(batch, probe.layer_views)
            self.model.compute_logits(hidden[: min(n, sched.max_num_seqs)])
        torch.cuda.synchronize(self.device)
        del hidden
        # In use now: weights, the CUDA context, the peak step's activations (cached by the
        # allocator, as they will be while serving) and the probe's cache, freed below.
        free, total = torch.cuda.mem_get_info(self.device)
        in_use = total - free - probe.num_blocks * layout.block_bytes
        trial = self._capture(probe.layer_views, layout.block_size)
        graph_bytes = self.graph_bytes
        del trial, probe
        torch.cuda.empty_cache()  # the trial's pools: the real graphs take as much again
        budget = gpu_memory_utilization * total - in_use - graph_bytes
        if budget < layout.block_bytes:
            raise RuntimeError(
                f"no GPU memory left for the KV cache: {in_use / _GiB:.1f} GiB in use and "
                f"{graph_bytes / _GiB:.2f} GiB for CUDA graphs of {total / _GiB:.1f} GiB, "
                f"gpu_memory_utilization={gpu_memory_utilization}")
        return budget

    def _forward(self, batch: InputBatch, layer_views: list) -> torch.Tensor:
        """Hidden states of ``batch`` run eagerly over the KV ``layer_views`` (no sampling)."""
        return self.model(self._to_device(batch.input_ids), self._to_device(batch.positions),
                          layer_views, self._metadata(batch))

    def _to_device(self, arr: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(arr).to(self.device, non_blocking=True)

    def _metadata(self, batch: InputBatch) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self._to_device(batch.slot_mapping),
            num_decodes=batch.num_decodes,
            decode_block_tables=self._to_device(batch.decode_block_tables),
            decode_seq_lens=self._to_device(batch.decode_seq_lens),
            prefill_block_tables=self._to_device(batch.prefill_block_tables),
            prefill_query_start_loc=self._to_device(batch.prefill_query_start_loc),
            prefill_seq_lens=self._to_device(batch.prefill_seq_lens),
            prefill_query_start_loc_host=batch.prefill_query_start_loc.tolist(),
            prefill_seq_lens_host=batch.prefill_seq_lens.tolist(),
            max_query_len=int(np.diff(batch.prefill_query_start_loc).max(initial=0)),
        )

    @torch.inference_mode()
    def warm_up_eager(self) -> int:
        """Run the eager path once per kernel specialization a served step can reach, before
        serving; returns the number of forwards run.

        Triton compiles a kernel the first time it runs with a new specialization, and the step
        waits: on the H200 the eager prefill kernel compiled at the first step above the graphs'
        512 tokens took 1.1 s, that request's first token (runner/jit_watch.py logged it). The
        graphs compile only their own variants, and with ``kv_cache_memory_gib`` no profiling
        step runs eagerly. The forwards below cover the eager variants: decode-only steps (graphs
        off or too small), decodes over a short (one split) and a long (split) context, prompt
        chunks with and without a cached prefix. Their K/V land in block 0, which no request owns
        yet (every slot is written before it is read once a request owns it); nothing samples.
        """
        bs, long_ctx = self.block_size, self.max_model_len
        cases = (  # (decodes, decode context, prompt tokens, prompt's context incl. them)
            (1, bs, 0, 0), (3, long_ctx, 0, 0), (2, bs, bs + 3, 2 * bs + 3),
            (2, long_ctx, 5, long_ctx), (0, 0, bs + 1, bs + 1))
        for decodes, dctx, q, pctx in cases:
            batch = self._warm_up_batch(decodes, min(dctx, long_ctx), q, min(pctx, long_ctx))
            self._forward(batch, self.kv_cache.layer_views)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return len(cases)

    def _warm_up_batch(self, decodes: int, dctx: int, q: int, pctx: int) -> InputBatch:
        """A step of ``decodes`` decodes at context ``dctx`` and, if ``q``, one prompt chunk of
        ``q`` tokens ending at context ``pctx``; every block-table entry is block 0."""
        bs = self.block_size
        q = min(q, pctx)  # a chunk is never longer than its context (tiny max_model_len)
        positions = [dctx - 1] * decodes + list(range(pctx - q, pctx))
        pos = np.array(positions, dtype=np.int64)
        prefills = 1 if q else 0
        return InputBatch(
            input_ids=np.zeros(len(pos), dtype=np.int64), positions=pos,
            slot_mapping=pos % bs, num_decodes=decodes,
            decode_block_tables=np.zeros((decodes, max(1, -(-dctx // bs))), dtype=np.int32),
            decode_seq_lens=np.full(decodes, dctx, dtype=np.int32),
            prefill_block_tables=np.zeros((prefills, max(1, -(-pctx // bs))), dtype=np.int32),
            prefill_query_start_loc=np.array([0, q][:prefills + 1], dtype=np.int32),
            prefill_seq_lens=np.full(prefills, pctx, dtype=np.int32),
            sample_rows=[], sample_requests=[])

    def _capture(self, layer_views: list, block_size: int
                 ) -> tuple[DecodeGraphs | None, MixedGraphs | None]:
        """The graphs of ``self.graph_plan`` captured over ``layer_views``; on CUDA the memory
        they took is recorded in ``graph_bytes``."""
        plan, sched = self.graph_plan, self.sched
        if not (plan.decode or plan.mixed):
            return None, None
        # Capturing empties the allocator's cache (torch.cuda.graph does): empty it first, so
        # that memory handed back then does not cancel out graph memory in the difference.
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        free = torch.cuda.mem_get_info(self.device)[0]
        max_blocks = -(-self.max_model_len // block_size)
        decode = mixed = None
        if plan.decode:
            decode = DecodeGraphs(self.model, layer_views, sched.max_num_seqs, max_blocks,
                                  self.device)
            decode.capture()
        if plan.mixed:
            mixed = MixedGraphs(self.model, layer_views, sched.max_num_batched_tokens,
                                sched.max_num_seqs, max_blocks, self.device)
            mixed.capture()
        self.graph_bytes = max(0, free - torch.cuda.mem_get_info(self.device)[0])
        logger.info("CUDA graphs: %.2f GiB of device memory", self.graph_bytes / _GiB)
        return decode, mixed

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, after: PendingStep | None = None) -> PendingStep:
        """Queue one step on the device (on CPU: run it) without waiting for its tokens;
        ``collect`` returns them: the token sampled for each request whose chunk reaches its
        last token. Inputs that are still placeholders (PLACEHOLDER_TOKEN) are the tokens step
        ``after``, launched before and not collected yet, samples for the same requests: they
        are copied over on the device, in stream order, so this step can be queued behind that
        one without the host waiting.

        With tensor parallelism the step's plan (inputs without the requests, where its
        placeholders come from) goes to the other ranks first (``send_plan``); every rank runs
        it (``run_plan``), this one samples and the tokens are broadcast to the others.

        A step that samples fires the ``gpu_busy`` step event (step_events.py) while the GPU
        computes it: a graphed step right after the replay; an eager one before the forward,
        whose kernel launches are host work of their own (15-36 ms above 512 tokens), to be
        held up by less than they would hold it up."""
        t0 = time.perf_counter()
        batch = build_input_batch(out, self.block_size, PLACEHOLDER_TOKEN)
        plan = StepPlan(batch, self._feed_sources(batch, after), out.lora_loads)
        if self.send_plan is not None:
            self.send_plan(plan.for_workers())
        hook = self.events.gpu_busy if batch.sample_requests else None
        logits, prompt_logits, pooled = self._forward_plan(
            plan, after.tokens if after is not None else None, t0, hook)
        prompt_lp = None
        if prompt_logits is not None:
            at = batch.prompt_logprob_at
            targets = torch.tensor(_prompt_targets(at), device=self.device)
            k = max(r.sampling_params.prompt_logprobs for r, _ in at)
            prompt_lp = (at, token_logprobs(prompt_logits, targets, k))
        if logits is None:
            return PendingStep([], None, prompt_logprobs=prompt_lp)
        tokens, logprobs = self.sampler.sample(logits, batch.sample_requests)
        self.tp.broadcast(tokens)
        returned = self._tokens.send(tokens) if self._tokens is not None else None
        return PendingStep(batch.sample_requests, tokens, returned, logprobs, prompt_lp, pooled)

    @torch.inference_mode()
    def run_plan(self, plan: StepPlan, prev_tokens: torch.Tensor | None) -> torch.Tensor | None:
        """A tensor-parallel worker's step: run ``plan`` (its placeholders from
        ``prev_tokens``, the tokens of the plan before) and return the tokens the driver
        sampled and broadcast (None if nothing samples)."""
        if self._forward_plan(plan, prev_tokens, time.perf_counter(), None, pool=False)[0] \
                is None:
            return None
        tokens = torch.empty(len(plan.batch.sample_rows), dtype=torch.long, device=self.device)
        return self.tp.broadcast(tokens)

    def _forward_plan(self, plan: StepPlan, prev_tokens: torch.Tensor | None, t0: float,
                      hook: Callable[[], None] | None, pool: bool = True
                      ) -> tuple[torch.Tensor | None, torch.Tensor | None,
                                 tuple[list[Request], torch.Tensor] | None]:
        """Logits of the plan's sampled rows and of its prompt-logprob rows (None where there
        are none), the hook fired while the device computes; with ``pool``, the embedding
        requests that sample and their rows' states (float32, a copy: a graph's output buffer
        is overwritten by the next replay)."""
        batch = plan.batch
        for slot, adapter in plan.lora_loads:  # (in stream order: earlier steps read the old)
            self.model.lora.set_slot(slot, adapter)
        feed = self._feeder(batch.feed_rows, plan.feed_src, prev_tokens)
        mixed = (self.mixed_graphs.bucket(batch) if self.mixed_graphs is not None
                 and not batch.is_decode_only else None)
        if self.graphs is not None and self.graphs.can_run(batch):
            self.last_prepare_s = time.perf_counter() - t0
            hidden = self.graphs.run(batch, feed)
        elif mixed is not None:
            self.last_prepare_s = time.perf_counter() - t0
            hidden = self.mixed_graphs.run(batch, mixed, feed)  # type: ignore[union-attr]
        else:
            ids, pos = self._to_device(batch.input_ids), self._to_device(batch.positions)
            if feed is not None:
                feed(ids)
            meta = self._metadata(batch)
            lora = None if batch.lora_slots is None else self._to_device(batch.lora_slots)
            self.last_prepare_s = time.perf_counter() - t0
            if hook is not None:
                hook()
                hook = None
            hidden = self.model(ids, pos, self.kv_cache.layer_views, meta, lora)
        if hook is not None:
            hook()
        pooled = None
        if pool and any(r.pooling is not None for r in batch.sample_requests):
            at = [(r, row) for r, row in zip(batch.sample_requests, batch.sample_rows)
                  if r.pooling is not None]
            rows = torch.tensor([row for _, row in at], dtype=torch.long, device=self.device)
            pooled = ([r for r, _ in at], hidden.index_select(0, rows).float())
        logits, prompt_logits = self._logits(batch, hidden)
        return logits, prompt_logits, pooled

    def _logits(self, batch: InputBatch, hidden: torch.Tensor
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits of ``batch``'s sampled rows and of its prompt-logprob rows."""
        lp_rows = batch.prompt_logprob_rows
        if lp_rows:  # (one LM-head pass: under tensor parallelism it is a collective)
            # A prompt's rows can outnumber the sample-rows buffer (max_num_seqs): a plain copy.
            rows = torch.tensor(batch.sample_rows + lp_rows, dtype=torch.long,
                                device=self.device)
            both = self.model.compute_logits(hidden[rows])
            k = len(batch.sample_rows)
            return (both[:k] if k else None), both[k:]
        if not batch.sample_rows:
            return None, None
        if len(batch.sample_rows) == len(hidden):  # every row samples (decode-only steps)
            return self.model.compute_logits(hidden), None
        return self.model.compute_logits(hidden[self._sample_rows(batch.sample_rows)]), None

    @staticmethod
    def _feed_sources(batch: InputBatch, after: PendingStep | None) -> list[int]:
        """For each placeholder input of ``batch``, its token's index in step ``after``."""
        num_placeholders = int(np.count_nonzero(batch.input_ids == PLACEHOLDER_TOKEN))
        if num_placeholders != len(batch.feed_rows):
            raise RuntimeError(f"{num_placeholders} input tokens are placeholders but only "
                               f"{len(batch.feed_rows)} are a request's last token")
        if not batch.feed_rows:
            return []
        index = {id(r): i for i, r in enumerate(after.requests)} if after is not None else {}
        missing = [r.request_id for r in batch.feed_requests if id(r) not in index]
        if missing:  # (a step with requests that sample has their tokens)
            raise RuntimeError(f"requests {missing[:4]} have inputs that no step in flight samples")
        return [index[id(r)] for r in batch.feed_requests]

    def _feeder(self, rows: list[int], src: list[int], tokens: torch.Tensor | None
                ) -> Callable[[torch.Tensor], None] | None:
        """What writes input rows ``rows`` from ``tokens[src]``, on the device (None if no
        input is a placeholder)."""
        if not rows:
            return None
        if self._feeds is not None:
            both = self._feeds.send(rows + src)
        else:
            both = torch.tensor(rows + src, dtype=torch.long, device=self.device)
        k = len(rows)
        rows_t, src_t = both[:k], both[k:]

        def feed(ids: torch.Tensor) -> None:
            ids.index_copy_(0, rows_t, tokens.index_select(0, src_t).to(ids.dtype))

        return feed

    def collect(self, pending: PendingStep
                ) -> tuple[dict[Request, int], dict[Request, TokenLogprobs]]:
        """Wait for a launched step's sampled tokens: {request: token} for those that sampled,
        and the logprobs of those that asked; prompt logprobs go to their requests."""
        if pending.prompt_logprobs is not None:
            at, lp = pending.prompt_logprobs
            for (req, pos), entry in zip(at, _entries(lp, _prompt_targets(at))):
                if req.prompt_logprobs is not None and req.prompt_logprobs[pos] is None:
                    req.prompt_logprobs[pos] = entry
        if pending.pooled is not None:
            for req, state in zip(pending.pooled[0], pending.pooled[1].cpu()):
                req.embedding = pooled_embedding(state, req.pooling)
        if not pending.requests:
            return {}, {}
        if pending.returned is not None:
            ids = self._tokens.receive(pending.returned)  # type: ignore[union-attr]
        else:
            ids = pending.tokens.tolist()  # type: ignore[union-attr]
        tokens = dict(zip(pending.requests, ids))
        if pending.logprobs is None:
            return tokens, {}
        return tokens, {req: entry for req, entry in zip(pending.requests,
                                                          _entries(pending.logprobs, ids))
                        if req.sampling_params.logprobs is not None}

    def _sample_rows(self, rows: list[int]) -> torch.Tensor:
        if self._rows is not None:
            return self._rows.send(rows)
        return torch.tensor(rows, dtype=torch.long, device=self.device)


def pooled_embedding(state: torch.Tensor, pooling: Any) -> list[float]:
    """An embedding from the last prompt token's state: its first ``dimensions`` values, at
    unit length if ``normalize`` (PoolingParams)."""
    if pooling.dimensions is not None:
        state = state[:pooling.dimensions]
    if pooling.normalize:
        state = torch.nn.functional.normalize(state, dim=0)
    return state.tolist()


def _prompt_targets(at: list[tuple[Request, int]]) -> list[int]:
    """The prompt tokens whose logprobs the rows ``at`` hold."""
    return [req.prompt_token_ids[pos] for req, pos in at]


def _entries(lp: SampledLogprobs, ids: list[int]) -> list[TokenLogprobs]:
    """Host dicts {token: (logprob, rank)} per row: the row's token first, then its top k
    (ranks 1..k); one device-to-host copy per tensor."""
    chosen, ranks = lp.token_logprobs.tolist(), lp.token_ranks.tolist()
    top_ids, top_lp = lp.top_ids.tolist(), lp.top_logprobs.tolist()
    out = []
    for i, token in enumerate(ids):
        entry = {token: (chosen[i], ranks[i])}
        for rank, (t, v) in enumerate(zip(top_ids[i], top_lp[i]), start=1):
            entry.setdefault(t, (v, rank))
        out.append(entry)
    return out
