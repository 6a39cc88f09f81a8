"""The synchronous engine: validate and queue requests, then step: schedule -> run -> outputs.

Everything a request needs is checked in ``add_request`` before it is queued, so a bad request
raises there (``ValueError`` naming the problem) and never disturbs the ones already running.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from fairswitch.config import EngineConfig
from fairswitch.engine.gc_control import GC_CLOCK
from fairswitch.engine.output_processor import OutputProcessor
from fairswitch.engine.step_log import StepLog
from fairswitch.kv.cache_manager import KVCacheManager
from fairswitch.kv.copy_backend import CopyStats, make_copy_backend
from fairswitch.kv.extents import num_extents
from fairswitch.kv.host_memory import pinned_empty
from fairswitch.kv.reuse_index import ReuseTier
from fairswitch.kv.swap_manager import SwapManager
from fairswitch.model import loader
from fairswitch.outputs import RequestOutput
from fairswitch.request import PLACEHOLDER_TOKEN, Request, RequestStatus
from fairswitch.runner.attention import get_attention_backend
from fairswitch.runner.jit_watch import JIT_CLOCK
from fairswitch.runner.model_runner import GraphPlan, ModelRunner, PendingStep
from fairswitch.sampling_params import SamplingParams
from fairswitch.scheduler.scheduler import Scheduler, SchedulerOutput

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def _drop_placeholder(req: Request) -> None:
    """Remove the placeholder ending ``req.token_ids``, if any (between steps there is at most
    one: the step in flight's)."""
    if req.token_ids and req.token_ids[-1] == PLACEHOLDER_TOKEN:
        req.token_ids.pop()


@dataclass(slots=True)
class LaunchedStep:
    """A step launched with async scheduling, its tokens not collected yet."""
    sched: SchedulerOutput
    pending: PendingStep
    launched_s: float  # perf_counter at the end of its launch
    launch_s: float  # how long the launch took (on the CPU: the whole step)


@dataclass
class StepStats:
    """Cumulative wall time per phase of ``step()`` (perf_counter; a step ends with a device
    sync when tokens are sampled, so execute_s includes the GPU time). With async scheduling
    the next step's scheduling runs inside execute_s, while the GPU computes: it counts in
    schedule_s too."""

    num_steps: int = 0
    schedule_s: float = 0.0
    execute_s: float = 0.0  # input preparation + forward + sampling (+ scheduling ahead)
    prepare_s: float = 0.0  # the input-preparation part of execute_s (host only)
    output_s: float = 0.0  # detokenize, stop checks, outputs

    def add(self, schedule: float, execute: float, output: float, prepare: float) -> None:
        self.num_steps += 1
        self.schedule_s += schedule
        self.execute_s += execute
        self.output_s += output
        self.prepare_s += prepare


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        mc = config.model
        JIT_CLOCK.serving = False  # compiles while building (warm-up, graph capture) are expected
        self.device = resolve_device(mc.device)
        self.dtype = resolve_dtype(mc.dtype, self.device)
        source = loader.resolve_model(mc.model)
        if source.checkpoint_dir is None and mc.load_format != "dummy":
            raise ValueError(f"{mc.model!r} is a shipped config without weights: use "
                             "load_format='dummy' (--load-format dummy) or a checkpoint directory")
        self.hf_config = loader.load_checkpoint_config(source)
        self.tokenizer = loader.load_tokenizer(self._tokenizer_path(source))
        self.max_model_len = self._max_model_len()
        backend = get_attention_backend(mc.attention_backend, self.device)
        if backend.name == "triton":  # (the torch backend runs no Triton kernel to time)
            if config.cache.block_size < 8:
                raise ValueError(f"block_size={config.cache.block_size}: the Triton attention "
                                 "kernels need block_size >= 8")
            JIT_CLOCK.install()
        t0 = time.perf_counter()
        model = loader.build_model(self.hf_config, backend, self.max_model_len, self.dtype,
                                   self.device)
        if mc.load_format == "dummy":
            loader.fill_dummy_weights(model, mc.seed)
        else:
            loader.load_weights(model, source.checkpoint_dir)
        logger.info("loaded %s (%s, %s) in %.1fs", mc.model, self.dtype, self.device,
                    time.perf_counter() - t0)
        cuda_triton = self.device.type == "cuda" and backend.name == "triton"
        graphed = cuda_triton and not mc.enforce_eager
        graphs = GraphPlan(decode=graphed, mixed=graphed and mc.mixed_cuda_graphs)
        self.runner = ModelRunner(model, backend, config.cache, config.scheduler,
                                  self.max_model_len, self.device, self.dtype, mc.seed, graphs)
        if cuda_triton:
            t0 = time.perf_counter()
            self.runner.warm_up_eager(self.max_model_len)
            logger.info("eager kernel variants warmed up in %.1f s", time.perf_counter() - t0)
        self.kv = KVCacheManager(self.runner.num_blocks, config.cache.block_size,
                                 config.cache.enable_prefix_caching, config.cache.block_groups,
                                 self.max_model_len)
        self.swap = self._swap_manager()
        self.scheduler = Scheduler(config.scheduler, self.kv, self.swap)
        if self.swap is not None:  # the swap-or-recompute cost model uses this machine's link
            self.scheduler.preemption.observe_link(*self.swap.probe_link())
        self.output_processor = OutputProcessor(self.tokenizer, self._eos_ids(source),
                                                self.max_model_len)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.stats = StepStats()
        self.step_log: StepLog | None = None  # set to record every step (step_log.py)
        # Async scheduling: steps are launched one ahead of their outputs (_step_pipelined).
        self._pipelined = config.scheduler.async_scheduling and config.cache.async_swap
        self._in_flight: LaunchedStep | None = None  # launched, tokens not collected yet
        self._last_collected_s = 0.0
        JIT_CLOCK.serving = True

    def _swap_manager(self) -> SwapManager | None:
        gib = self.config.cache.swap_space
        num_cpu_blocks = int(gib * (1 << 30)) // self.runner.block_bytes
        if num_cpu_blocks == 0:
            return None
        gpu_tensor = self.runner.kv_cache.tensor
        on_cuda = self.device.type == "cuda"
        shape = (num_cpu_blocks, *gpu_tensor.shape[1:])
        # Pinned on CUDA so copies are DMA; elsewhere never read before written: uninitialized.
        t0 = time.perf_counter()
        cpu_tensor = (pinned_empty(shape, gpu_tensor.dtype) if on_cuda
                      else torch.empty(shape, dtype=gpu_tensor.dtype))
        logger.info("swap space: %.1f GiB in %.1fs", cpu_tensor.numel()
                    * cpu_tensor.element_size() / (1 << 30), time.perf_counter() - t0)
        cc = self.config.cache
        backend = make_copy_backend(cc.swap_copy_backend, self.device, cc.per_layer_swap)
        tier = ReuseTier(cc.block_size) if cc.enable_prefix_caching and cc.cpu_kv_reuse else None
        swap = SwapManager(self.kv, gpu_tensor, num_cpu_blocks, cpu_tensor, backend,
                           async_copies=cc.async_swap, incremental=cc.incremental_swap,
                           cpu_tier=tier)
        swap.early_landing = cc.early_swap_in and cc.async_swap
        if tier is not None and on_cuda:
            swap.writeback_backend = make_copy_backend(cc.swap_copy_backend, self.device,
                                                       cc.per_layer_swap)
        return swap

    def _tokenizer_path(self, source: loader.ModelSource) -> Any:
        if self.config.model.tokenizer is not None:
            return self.config.model.tokenizer
        if source.checkpoint_dir is not None:
            return source.checkpoint_dir
        # Shipped configs have no tokenizer of their own: use the embedded model's
        # (cl100k_base, whose ids are the first 100k of Llama 3's vocabulary).
        from fairswitch.model.default_model import ensure_default_model

        return ensure_default_model()

    def _max_model_len(self) -> int:
        limit = self.hf_config.max_position_embeddings
        window = self.hf_config.sliding_window
        if window:
            # No sliding-window attention here: stay within the window, where it equals full.
            limit = min(limit, window)
        wanted = self.config.model.max_model_len
        if wanted is None:
            return limit
        if wanted > limit:
            raise ValueError(f"max_model_len={wanted} exceeds the model's limit of {limit} tokens")
        return wanted

    def _eos_ids(self, source: loader.ModelSource) -> set[int]:
        ids: set[int] = set()
        for value in (self.hf_config.eos_token_id, self.tokenizer.eos_token_id):
            ids.update(value if isinstance(value, list) else [value] if value is not None else [])
        gen_cfg = source.checkpoint_dir / "generation_config.json" if source.checkpoint_dir else None
        if gen_cfg is not None and gen_cfg.is_file():
            value = json.loads(gen_cfg.read_text()).get("eos_token_id")
            ids.update(value if isinstance(value, list) else [value] if value is not None else [])
        return ids

    # ---- requests -------------------------------------------------------------------------

    def add_request(self, prompt: str | list[int] | None = None,
                    params: SamplingParams | None = None, *, request_id: str | None = None,
                    prompt_token_ids: list[int] | None = None, priority: int = 0,
                    client_id: str | None = None, arrival_time: float | None = None) -> str:
        """Validate and queue a request; return its id. Raises ValueError on bad input."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        text, ids = self.validate_prompt(prompt, prompt_token_ids)
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        req = Request(request_id, ids, params,
                      arrival_time if arrival_time is not None else time.monotonic(),
                      prompt=text, priority=priority, client_id=client_id)
        self.output_processor.init_request(req)
        self.scheduler.add_request(req)  # may raise QueueFullError: nothing registered yet
        self.requests[request_id] = req
        return request_id

    def validate_prompt(self, prompt: str | list[int] | None,
                        prompt_token_ids: list[int] | None) -> tuple[str | None, list[int]]:
        """(text, token ids) of a prompt; ValueError if it is empty, too long or out of vocab."""
        if prompt_token_ids is None and isinstance(prompt, list):
            prompt, prompt_token_ids = None, prompt
        if prompt_token_ids is not None:
            ids = list(prompt_token_ids)
            vocab = self.hf_config.vocab_size
            bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool)
                   or not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt token ids must be integers in [0, {vocab}), got {bad[:5]}")
            text = prompt
        elif isinstance(prompt, str):
            ids, text = self.tokenizer.encode(prompt), prompt
        else:
            raise ValueError(f"prompt must be a string or a list of token ids, got {prompt!r:.80}")
        if not ids or (text is not None and not text):
            raise ValueError("prompt is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens but max_model_len is {self.max_model_len}: "
                f"at most {self.max_model_len - 1} prompt tokens leave room for one output token")
        return text, ids

    def abort_request(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        req.status = RequestStatus.FINISHED_ABORTED
        req.metrics.finished_time = time.monotonic()
        self._finish(req)
        return self.output_processor.make_output(req)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.requests)

    # ---- the step -------------------------------------------------------------------------

    def step(self, before_wait: Callable[[], None] | None = None) -> list[RequestOutput]:
        """Run one step and turn its sampled tokens into outputs.

        ``before_wait`` runs while the GPU computes the step, before the host waits for its
        tokens; with synchronous swaps, whose copies scheduling waits for, before scheduling
        instead. With async scheduling (``SchedulerConfig.async_scheduling``, asynchronous swaps)
        the next step is scheduled and launched before this one's tokens are waited for: see
        ``_step_pipelined``.
        """
        if self._pipelined:
            return self._step_pipelined(before_wait)
        t0 = time.perf_counter()
        if before_wait is not None and not self.config.cache.async_swap:
            before_wait()
            before_wait = None
        clocks = self._clocks()
        sched = self.scheduler.schedule()  # also retires swap copies that have landed
        if not sched.scheduled:
            return []
        t1 = time.perf_counter()
        sampled = self.runner.execute(sched, before_wait)
        t2 = time.perf_counter()
        self._observe_prefill(sched, t2 - t1)
        self._advance(sched)
        outputs = self._outputs(sched, sampled)
        t3 = time.perf_counter()
        self._account(sched, clocks, t0, t1, t2, t3, 0.0)
        return outputs

    def _step_pipelined(self, before_wait: Callable[[], None] | None) -> list[RequestOutput]:
        """The outputs of step N, launched by the previous call, with N+1 launched behind it:

            [N in flight] -> schedule N+1 (overlaps the GPU) -> launch N+1 (an input N samples
              is copied from N's tokens on the device) -> before_wait -> wait for N's tokens
              -> N's placeholders become its tokens -> outputs -> [N+1 in flight]

        The GPU runs N+1 right after N, without waiting for the host. Between calls one step
        may be in flight: a token it samples is a placeholder (PLACEHOLDER_TOKEN) at the end
        of its request's ``token_ids``, and counts as computed; an abort drops it, and the
        collected token of a finished request is dropped. A request that N ends by EOS or a
        stop string ran in N+1 for nothing; one that N ends by length is left out of N+1
        (``Request.finishing``). Swap copies submitted while N runs are ordered after it on the
        device (the copy backends wait for the compute stream). If the call raises once a step
        is launched, ``_abandon`` puts the requests back as they were before both steps.
        """
        t0 = time.perf_counter()
        clocks = self._clocks()
        prev, self._in_flight = self._in_flight, None
        if prev is None:  # nothing in flight (start, idle, or after an error): launch one now
            sched = self.scheduler.schedule()
            if not sched.scheduled:
                return []
            prev = self._launch(sched, None, None)
        t1 = time.perf_counter()
        handed_over = before_wait is None

        def hand_over() -> None:  # once the next step is queued (the runner calls it), or below
            nonlocal handed_over
            handed_over = True
            before_wait()  # type: ignore[misc]

        try:
            nxt = self.scheduler.schedule()
            ahead_s = time.perf_counter() - t1
            if nxt.scheduled:
                self._in_flight = self._launch(nxt, prev, None if handed_over else hand_over)
            if not handed_over:  # nothing launched, or a step that samples nothing
                hand_over()
            sampled = self.runner.collect(prev.pending)
        except BaseException:
            self._abandon(prev)
            raise
        t2 = time.perf_counter()
        self._observe_launched(prev, t2)
        held = self._in_flight.pending.requests if self._in_flight is not None else []
        for req in held:  # the step in flight's placeholders, set aside while prev's settle
            _drop_placeholder(req)
        try:
            self._settle(prev.pending, keep_finishing={id(r) for r in held})
            outputs = self._outputs(prev.sched, sampled)
        finally:  # even if making the outputs raised: the step in flight still owns them
            for req in held:
                if not req.is_finished:
                    req.token_ids.append(PLACEHOLDER_TOKEN)
        t3 = time.perf_counter()
        self._account(prev.sched, clocks, t0, t1, t2, t3, ahead_s)
        return outputs

    def _launch(self, sched: SchedulerOutput, after: LaunchedStep | None,
                before_wait: Callable[[], None] | None) -> LaunchedStep:
        """Launch ``sched`` behind ``after`` (in flight): its requests advance, each token it
        samples is a placeholder until collected."""
        t0 = time.perf_counter()
        pending = self.runner.launch(sched, before_wait,
                                     after.pending if after is not None else None)
        self._advance(sched)
        for req in pending.requests:
            req.token_ids.append(PLACEHOLDER_TOKEN)
            req.finishing = self.output_processor.at_length_limit(req)
        t1 = time.perf_counter()
        return LaunchedStep(sched, pending, t1, t1 - t0)

    def _observe_launched(self, step: LaunchedStep, collected_s: float) -> None:
        """Tell the cost model how long a collected step ran: on a GPU from its launch or the
        end of the step before, whichever came last, to its tokens; on the CPU, which runs it
        inside the launch, its launch. A step whose requests all finished before it was
        collected (aborted) may have waited through an idle engine: not observed."""
        started = max(step.launched_s, self._last_collected_s)
        self._last_collected_s = collected_s
        if all(r.is_finished for r, _ in step.sched.scheduled):
            return
        on_cpu = self.runner.device.type == "cpu"
        self._observe_prefill(step.sched, step.launch_s if on_cpu else collected_s - started)

    @property
    def step_in_flight(self) -> bool:
        """Is a step launched whose tokens the next call collects (async scheduling)?"""
        return self._in_flight is not None

    @staticmethod
    def _settle(pending: PendingStep, keep_finishing: set[int] = frozenset()) -> None:
        """The launched step's tokens are back (or lost): its placeholders go. ``finishing``
        stays set for the requests in ``keep_finishing`` (their next token is in flight)."""
        for req in pending.requests:
            _drop_placeholder(req)
            if id(req) not in keep_finishing:
                req.finishing = False

    def _abandon(self, prev: LaunchedStep) -> None:
        """The call raised once ``prev`` was launched (scheduling or launching the next step,
        handing outputs over, or waiting): the tokens of ``prev`` and of the step launched after
        it are lost, so their requests go back to where they were before them (the KV they
        wrote is computed again) and nothing stays in flight. The engine can step on."""
        for step in (self._in_flight, prev):  # newest first: its placeholders are last
            if step is None:
                continue
            self._settle(step.pending)
            for req, n in step.sched.scheduled:
                req.num_computed_tokens = max(0, req.num_computed_tokens - n)
                req.num_cpu_tokens = min(req.num_cpu_tokens, req.num_computed_tokens)
        self._in_flight = None

    def _advance(self, sched: SchedulerOutput) -> None:
        """The step is launched: its tokens count as computed, its requests as run once more."""
        for req, n in sched.scheduled:
            req.num_computed_tokens += n
        self.scheduler.on_launch(sched)

    def _outputs(self, sched: SchedulerOutput, sampled: dict[Request, int]) -> list[RequestOutput]:
        """Append the sampled tokens, finish the requests that stop, charge the service. The
        token of a request that finished since its step was launched (an abort) is dropped."""
        now = time.monotonic()
        outputs = []
        for req, _ in sched.scheduled:
            token = sampled.get(req)
            if token is None or req.is_finished:
                continue
            self.output_processor.append_token(req, token)
            m = req.metrics
            if m.first_token_time is None:
                m.first_token_time = now
            m.last_token_time = now
            if req.is_finished:
                m.finished_time = now
                self._finish(req)
                del self.requests[req.request_id]
            outputs.append(self.output_processor.make_output(req))
        self.scheduler.update(sched)  # charge the service to the ranking policy
        return outputs

    def _finish(self, req: Request) -> None:
        """Remove a finished or aborted request from the scheduler; its placeholder, if a step
        in flight computes its next token, goes (that token is dropped when collected)."""
        _drop_placeholder(req)
        req.finishing = False
        self.scheduler.finish(req)

    def _clocks(self) -> tuple[float, float, float] | None:
        """The clocks a step-log row reads, at the step's start."""
        if self.step_log is None:
            return None
        return time.process_time(), GC_CLOCK.total_s, JIT_CLOCK.total_s

    def _account(self, sched: SchedulerOutput, clocks: tuple[float, float, float] | None,
                 t0: float, t1: float, t2: float, t3: float, ahead_s: float) -> None:
        self.stats.add(t1 - t0 + ahead_s, t2 - t1, t3 - t2, self.runner.last_prepare_s)
        if self.step_log is not None and clocks is not None:
            cpu0, gc0, jit0 = clocks
            self.step_log.record(self, sched, t0, t1, t2, t3, time.process_time() - cpu0,
                                 GC_CLOCK.total_s - gc0, JIT_CLOCK.total_s - jit0, ahead_s)

    def _observe_prefill(self, sched: SchedulerOutput, seconds: float) -> None:
        """Prefill-heavy steps tell the cost model how fast recomputing is on this machine."""
        num_prefill = sum(n for _, n in sched.scheduled if n > 1)
        if num_prefill >= 256 and 2 * num_prefill >= sched.num_batched_tokens:
            self.scheduler.preemption.observe_prefill(num_prefill, seconds)

    def switch_metrics(self) -> dict[str, float]:
        """Context-switch, reuse and KV-layout counters (cumulative since start)."""
        sched, swap, pc = self.scheduler, self.swap, self.kv.prefix_cache
        running = [r for r in sched.running if r.block_table]
        stats = CopyStats.total(swap.copy_stats()) if swap is not None else None
        token_bytes = self.runner.block_bytes / self.kv.block_size
        return {
            "preemptions_swap": sched.preemptions_by_mode["swap"],
            "preemptions_recompute": sched.preemptions_by_mode["recompute"],
            # of which for a better-ranked queued request (the rest: KV blocks ran out)
            "preemptions_rank": sched.num_rank_preemptions,
            "swap_bytes_out": stats.bytes_out if stats else 0,
            "swap_bytes_in": stats.bytes_in if stats else 0,
            "swap_copies": stats.num_copies if stats else 0,
            "swap_bytes_per_copy": stats.bytes_per_copy if stats else 0.0,
            # GPU idle for switches: all host time in the swap manager (the step is synchronous);
            # of which blocked waiting on copies (sync baseline copies, swap-ins with nothing
            # else to run).
            "switch_stall_s": swap.stall_s if swap else 0.0,
            "link_gb_s": sched.preemption.link_bytes_per_s / 1e9,  # as measured (cost model)
            "prefill_tokens_per_s": sched.preemption.prefill_tokens_per_s,
            "switch_wait_s": sched.switch_stall_s + (swap.blocking_copy_s if swap else 0.0),
            "num_swapped": len(sched.swapped),
            "gpu_kv_usage": self.kv.usage(),
            "cpu_kv_usage": swap.cpu_pool.num_used_blocks / swap.cpu_pool.num_blocks
            if swap else 0.0,
            "reuse_hit_blocks": pc.num_hit_blocks if pc else 0,
            "reuse_queried_blocks": pc.num_queried_blocks if pc else 0,
            "reused_tokens": sched.num_reused_tokens,
            "reused_tokens_cpu": sched.num_reused_tokens_cpu,
            "cpu_tier_blocks": swap.tier.num_blocks if swap and swap.tier else 0,
            "reuse_bytes_saved": (sched.num_reused_tokens + sched.num_reused_tokens_cpu)
            * token_bytes,
            "extents_per_request": sum(num_extents(r.block_table) for r in running) / len(running)
            if running else 0.0,
            # Garbage-collector pauses in this process (all threads; measured once an
            # AsyncEngine or a step log has installed the clock: gc_control.py).
            "gc_pause_s": GC_CLOCK.total_s,
            "gc_full_collections": GC_CLOCK.count[2],
            # Triton compiles in this process (runner/jit_watch.py): after start-up, each one
            # stalled a step
            "kernel_compiles": JIT_CLOCK.count,
            "kernel_compile_s": JIT_CLOCK.total_s,
            "kv_utilization": sum(r.num_computed_tokens for r in running) / (
                sum(len(r.block_table) for r in running) * self.kv.block_size) if running else 1.0,
        }

    def check_accounting(self) -> None:
        """Raise if KV blocks leaked: every block is free or owned by a live request, once."""
        self.kv.pool.check()
        refs = Counter(b for r in self.requests.values() for b in r.block_table)
        refs.update(b for tail in self.kv.reserved.values() for b in tail)
        if self.swap is not None:
            gpu_in_flight = self.swap.gpu_blocks_in_flight()
            if self.swap.num_gpu_blocks_in_flight() != len(gpu_in_flight):
                raise AssertionError("copies' GPU block count disagrees with their blocks")
            refs.update(gpu_in_flight)
        pc = self.kv.prefix_cache
        if pc is not None:
            wrong = [b for b in range(self.kv.num_blocks) if pc.refs.get(b, 0) != refs.get(b, 0)]
            if wrong:
                raise AssertionError(f"reference counts off for blocks {wrong[:8]}")
            held = len(refs) + len(pc.evictable)
        else:
            if any(n > 1 for n in refs.values()):
                raise AssertionError("a block is in two block tables without prefix caching")
            held = len(refs)
        if self.kv.num_reserved_blocks != sum(map(len, self.kv.reserved.values())):
            raise AssertionError("reserved block count out of step with the reservations")
        if held != self.kv.pool.num_used_blocks:
            raise AssertionError(f"{self.kv.pool.num_used_blocks} GPU blocks in use but requests, "
                                 f"copies and the prefix cache hold {held}")
        if self.swap is not None:
            cpu = self.swap.cpu_pool
            cpu.check()
            owned = sum(len(r.cpu_block_table) for r in self.requests.values())
            in_flight = self.swap.num_cpu_blocks_in_flight()
            tier = self.swap.tier.num_blocks if self.swap.tier is not None else 0
            if owned + in_flight + tier != cpu.num_used_blocks:
                raise AssertionError(f"{cpu.num_used_blocks} CPU blocks in use but live requests "
                                     f"own {owned}, copies hold {in_flight}, the tier {tier}")
