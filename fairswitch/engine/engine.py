"""The engine's step loop: validate and queue requests, then step: schedule -> launch -> outputs.

Everything a request needs is checked in ``add_request`` before it is queued, so a bad request
raises there (``ValueError`` naming the problem) and never disturbs the ones already running.
The parts are assembled by builder.py; the scheduler's two calls (``schedule``,
``update_from_output``) carry all request bookkeeping, so a step here is only: decide, launch,
wait for the tokens, hand them back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import math
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

from fairswitch.config import EngineConfig
from fairswitch.distributed.stall_report import report_stall
from fairswitch.distributed.workers import RanksStoppedError
from fairswitch.engine.builder import build_engine_parts
from fairswitch.engine.gc_control import GC_CLOCK
from fairswitch.engine.input_processor import InputProcessor
from fairswitch.engine.step_log import StepLog, StepStats
from fairswitch.lora.adapter import LoRAAdapter
from fairswitch.lora.request import LoRARequest
from fairswitch.outputs import RequestOutput
from fairswitch.pooling_params import PoolingParams
from fairswitch.request import Request, RequestStatus
from fairswitch.runner.jit_watch import JIT_CLOCK
from fairswitch.runner.model_runner import PendingStep
from fairswitch.sampling_params import SamplingParams
from fairswitch.scheduler.scheduler import SchedulerOutput
from fairswitch.structured_output import GrammarCompiler, StructuredOutputsParams

logger = logging.getLogger(__name__)


# Switch counters of which the driver counts its own share: a tensor-parallel rank holds its
# heads' KV, and every rank copies (and reuses) as many bytes in as many copies.
_EVERY_RANKS = ("swap_bytes_out", "swap_bytes_in", "swap_copies", "reuse_bytes_saved")


def is_priority(value: object) -> bool:
    """An int of 64 bits, as the server takes it (the priority policy ranks by its float: a
    larger one raised OverflowError inside the scheduler)."""
    return (isinstance(value, int) and not isinstance(value, bool)
            and -(2**63) <= value < 2**63)


def hash_salt(adapter: LoRAAdapter | None, cache_salt: str | None) -> bytes:
    """A request's prefix-cache salt (reuse_index.block_hashes): its adapter's id and the
    digest of its ``cache_salt``; empty for neither, so those share with each other only."""
    salt = b"lora:%d" % adapter.int_id if adapter is not None else b""
    if cache_salt is not None:
        salt += b"|salt:" + hashlib.sha256(cache_salt.encode("utf-8", "surrogatepass")).digest()
    return salt


@dataclass(slots=True)
class LaunchedStep:
    """A step launched, its tokens not collected yet."""
    sched: SchedulerOutput
    pending: PendingStep
    started_s: float  # perf_counter at the start of its launch
    launch_s: float  # how long the launch took (on the CPU: the whole step)


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        parts = build_engine_parts(config)
        self.device, self.dtype = parts.device, parts.dtype
        self.hf_config, self.tokenizer = parts.hf_config, parts.tokenizer
        self.max_model_len = parts.max_model_len
        self.runner, self.kv, self.scheduler = parts.runner, parts.kv, parts.scheduler
        self.output_processor, self.events = parts.output_processor, parts.events
        self.workers = parts.workers  # the other tensor-parallel ranks (None: one rank)
        self.generation = parts.generation  # (model/generation_config.py)
        self.lora_store = parts.lora_store  # LoRA adapters read (None: LoRA not enabled)
        if self.workers is not None:
            # Dropped without shutdown(), the engine stops its workers as it is collected:
            # atexit's hold on them kept them, this rank's model and KV cache and the process
            # group (no second tensor-parallel engine can start) to the end of the process.
            weakref.finalize(self, self.workers.shutdown)
        self.inputs = InputProcessor(self.tokenizer, self.hf_config.vocab_size, self.max_model_len,
                                     self.output_processor.eos_token_ids)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.stats = StepStats()
        self.step_log: StepLog | None = None  # set to record every step (step_log.py)
        # Async scheduling: steps are launched one ahead of their outputs (see ``step``).
        self._pipelined = config.scheduler.async_scheduling and config.cache.async_swap
        self._in_flight: LaunchedStep | None = None  # launched, tokens not collected yet
        self._last_collected_s = 0.0
        self._priority_ignored_said = False  # (warned once: see _say_if_priority_ignored)
        self._grammar_compiler: GrammarCompiler | None = None  # (_grammars)
        self._grammar_lock = threading.Lock()

    # ---- requests -------------------------------------------------------------------------

    def add_request(self, prompt: str | list[int] | None = None,
                    params: SamplingParams | None = None, *, request_id: str | None = None,
                    prompt_token_ids: list[int] | None = None, priority: int = 0,
                    client_id: str | None = None, arrival_time: float | None = None,
                    queue_places: int = 1, held_by: str | None = None,
                    grammar: Any = None, pooling: PoolingParams | None = None,
                    lora_request: LoRARequest | LoRAAdapter | None = None,
                    cache_salt: str | None = None) -> str:
        """Validate and queue a request; return its id. Raises TypeError for a prompt of the
        wrong type, ValueError on other bad input, QueueFullError when the waiting queue has no
        room (``queue_places``, ``held_by``: Scheduler.add_request). ``grammar``: the matcher
        of its structured output, compiled beforehand (``compile_grammar``); else here.
        ``pooling``: an embedding request (its prompt computed, no text generated); of
        ``params`` only ``truncate_prompt_tokens`` is then read. ``lora_request``: the LoRA
        adapter it runs with (read from its folder now, unless in memory), or the adapter
        ``check_lora`` returned (the server reads adapters off this thread). ``cache_salt``
        (vLLM's): its prompt shares cached KV only with requests of the same salt (a tenant's
        secret: others cannot time its prefixes)."""
        if pooling is not None:
            params = self._pooling_params(pooling, params)
        params = params if params is not None else self.default_sampling_params()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        self.inputs.check_params(params)
        # The ranking policies compare priorities and key clients: a wrong type would fail
        # there, mid-queue (or under another policy, pass unnoticed).
        if not is_priority(priority):
            raise ValueError(f"priority must be an int of 64 bits, got {priority!r:.40}")
        if client_id is not None and not isinstance(client_id, str):
            raise ValueError(f"client_id must be a str or None, got {client_id!r:.40}")
        if arrival_time is not None and (isinstance(arrival_time, bool) or not isinstance(
                arrival_time, (int, float)) or not math.isfinite(arrival_time)):
            # (the queues compare it: a str failed the next request's add, after it was queued)
            raise ValueError(f"arrival_time must be a finite number or None, "
                             f"got {arrival_time!r:.40}")
        text, ids = self.inputs.validate(prompt, prompt_token_ids, params.truncate_prompt_tokens)
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise ValueError(f"cache_salt must be a non-empty string or None, got "
                             f"{cache_salt!r:.40}")
        adapter = lora_request if isinstance(lora_request, LoRAAdapter) else (
            self.check_lora(lora_request) if lora_request is not None else None)
        if params.max_tokens is None:  # the room the prompt leaves (>= 1: validate checks)
            params = dataclasses.replace(params, max_tokens=self.max_model_len - len(ids))
        self._say_if_priority_ignored(priority)
        if request_id is None:  # the next number no caller-chosen id holds
            while (request_id := str(next(self._ids))) in self.requests:
                pass
        request_id = str(request_id)
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        req = Request(request_id, ids, params,
                      arrival_time if arrival_time is not None else time.monotonic(),
                      prompt=text, priority=priority, client_id=client_id)
        req.bad_words_ids = self.inputs.bad_words_ids(params)
        req.pooling = pooling
        if adapter is not None:
            req.lora_request = LoRARequest(adapter.name, adapter.int_id, adapter.path)
            req.lora_adapter = adapter
        req.cache_salt = hash_salt(adapter, cache_salt)
        if params.structured_outputs is not None:  # (a bad schema: this request's ValueError)
            req.grammar = grammar if grammar is not None else self.compile_grammar(
                params.structured_outputs)
            allowed = params.allowed_token_ids
            if allowed is not None and not self._grammars().allows_any(req.grammar, allowed):
                raise ValueError("allowed_token_ids: none of them may begin the structured "
                                 "output, so the reply could not start; allow its first "
                                 "tokens too")
        self.output_processor.init_request(req)
        # May raise QueueFullError: nothing is registered yet.
        self.scheduler.add_request(req, queue_places, held_by)
        self.requests[request_id] = req
        return request_id

    def check_lora(self, lora_request: LoRARequest) -> LoRAAdapter:
        """The adapter ``lora_request`` names, read if not in memory; ValueError if adapters are
        not served or it cannot be, TypeError if it is not a LoRARequest."""
        if self.lora_store is None:
            raise ValueError("this engine serves no LoRA adapters: start it with "
                             "enable_lora=True (--enable-lora)")
        return self.lora_store.get(lora_request)

    def _pooling_params(self, pooling: PoolingParams, params: SamplingParams | None
                        ) -> SamplingParams:
        """The sampling an embedding request runs with: its prompt, then one greedy token that
        nobody sees (the step that computes the prompt's last position samples)."""
        if not isinstance(pooling, PoolingParams):
            raise TypeError(f"pooling must be PoolingParams, got {type(pooling).__name__}")
        if params is not None and not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        if pooling.dimensions is not None and pooling.dimensions > self.hf_config.hidden_size:
            raise ValueError(f"dimensions must be at most the model's hidden size "
                             f"({self.hf_config.hidden_size}), got {pooling.dimensions}")
        truncate = params.truncate_prompt_tokens if params is not None else None
        return SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, detokenize=False,
                              truncate_prompt_tokens=truncate)

    def compile_grammar(self, spec: StructuredOutputsParams) -> Any:
        """A matcher for a request's structured output; ValueError if it does not compile. Any
        thread may call it (AsyncEngine compiles off the engine thread, so that a large schema,
        or the first one, which reads the vocabulary, pauses no step)."""
        return self._grammars().matcher(spec)

    def _grammars(self) -> GrammarCompiler:
        """The structured-output compiler, made at the first request that needs it (reading
        the vocabulary takes a second or more)."""
        with self._grammar_lock:
            if self._grammar_compiler is None:
                self._grammar_compiler = GrammarCompiler(
                    self.tokenizer, self.hf_config.vocab_size,
                    self.output_processor.eos_token_ids)
                self.runner.sampler.grammars = self._grammar_compiler
        return self._grammar_compiler

    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams() with the model's recommended sampling (its generation_config.json,
        ``--generation-config``), as vLLM's ``get_default_sampling_params``."""
        return SamplingParams(**self.generation.sampling_defaults())

    def _say_if_priority_ignored(self, priority: int) -> None:
        """A priority the ranking policy does not use is accepted (a trace replayed under fcfs
        or vtc for comparison carries its priorities), but the first one is named in a warning:
        vLLM refuses it, and a user who sets one expects it to count."""
        if priority == 0 or self._priority_ignored_said or self.scheduler.ranking.uses_priority:
            return
        self._priority_ignored_said = True
        logger.warning("request priority %d is ignored: policy %r does not rank by priority "
                       "(--policy priority or trace does); further ones are not reported",
                       priority, self.config.scheduler.policy)

    def validate_params(self, params: SamplingParams) -> None:
        """ValueError if ``params`` (one sequence: n=1) does not suit this model (token ids past
        its vocabulary), as ``add_request`` checks it."""
        self.inputs.check_params(params)

    def validate_prompt(self, prompt: str | list[int] | None, prompt_token_ids: list[int] | None,
                        truncate: int | None = None) -> tuple[str | None, list[int]]:
        """InputProcessor.validate: (text, token ids) of a prompt (its last ``truncate`` ids);
        TypeError if one is of the wrong type, ValueError if it is empty, too long or out of
        vocab."""
        return self.inputs.validate(prompt, prompt_token_ids, truncate)

    def reserve_places(self, hold_id: str, n: int) -> None:
        """Scheduler.reserve_places: ``n`` waiting-queue places for requests ``held_by`` it."""
        self.scheduler.reserve_places(hold_id, n)

    def release_places(self, request_id: str) -> None:
        """Scheduler.release_places: the waiting-queue places held for a request's choices, or
        reserved under its id."""
        self.scheduler.release_places(request_id)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        # One that a step finished, whose outputs then failed part way, is out of the scheduler
        # already: finishing it again counted it twice (under vtc a KeyError, leaked blocks).
        if not req.is_finished:
            req.status = RequestStatus.FINISHED_ABORTED
            req.metrics.finished_time = time.monotonic()
            self.scheduler.finish(req)
        return self.output_processor.make_output(req)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.requests)

    # ---- the step -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """The outputs of one step. In turn (the default without async scheduling):

            schedule N -> launch N -> [gpu_busy] -> wait for N's tokens -> outputs

        With async scheduling (``SchedulerConfig.async_scheduling``, asynchronous swaps) the
        same loop runs one step ahead: N was launched by the previous call, and N+1 is scheduled
        (overlapping the GPU) and launched behind it (an input N samples is copied from N's
        tokens on the device) before N's tokens are waited for, so the GPU runs N+1 right after
        N. Between calls one step may then be in flight: a token it samples is a placeholder
        (scheduler.py), an abort drops it, a request that N ends by length is left out of N+1
        (``Request.finishing``), and one that N ends by EOS or a stop string ran in N+1 for
        nothing. Swap copies submitted while N runs are ordered after it on the device.

        The ``gpu_busy`` step event (``self.events``) fires once while the GPU computes; with
        synchronous swaps, whose copies scheduling waits for, before scheduling instead. If the
        call raises once a step is launched, the requests go back to where they were before it
        and the step after it (``_abandon``): the engine can step on; with tensor parallelism
        it cannot (the ranks cannot be known to agree after a step that broke off): the other
        ranks are stopped and every later step raises.
        """
        if self.workers is None:
            return self._step()
        try:
            with report_stall(self.config.model.distributed_timeout_s / 2):
                return self._step()
        except BaseException as e:
            self.workers.fail(e)
            if isinstance(e, Exception) and not isinstance(e, RanksStoppedError):
                raise RanksStoppedError(f"a tensor-parallel step failed "
                                        f"({self.workers.failure_cause(e)}): every worker is "
                                        "stopped and the engine is shut down") from e
            raise

    def _step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        clocks = self._clocks()
        events, sync_copies = self.events, not self.config.cache.async_swap
        if sync_copies:
            events.arm()
            events.gpu_busy()
        prev, self._in_flight = self._in_flight, None
        t1 = t0
        if prev is None:  # nothing in flight (in turn, at start, idle, after an error)
            sched = self.scheduler.schedule()
            if not sched.scheduled:
                return []
            t1 = time.perf_counter()
            if not (self._pipelined or sync_copies):
                events.arm()
            prev = self._launch(sched, None)
        if self._pipelined:
            t1 = time.perf_counter()
        ahead_s = 0.0
        try:
            if self._pipelined:
                events.arm()
            if self._pipelined and not _samples_from_history(prev.sched):
                nxt = self.scheduler.schedule()
                ahead_s = time.perf_counter() - t1
                if nxt.scheduled:
                    self._in_flight = self._launch(nxt, prev)
            events.gpu_busy()  # if no launch fired it: nothing samples, nothing launched
            sampled, logprobs = self.runner.collect(prev.pending)
        except BaseException:
            self._abandon(prev)
            raise
        t2 = time.perf_counter()
        self._observe(prev, t2)
        updated = self.scheduler.update_from_output(prev.sched, sampled, logprobs)
        outputs = [self.output_processor.make_output(req) for req in updated]
        for req in updated:  # (after the outputs: one that raises loses no finished request)
            if req.is_finished:
                del self.requests[req.request_id]
        t3 = time.perf_counter()
        self._account(prev.sched, clocks, t0, t1, t2, t3, ahead_s)
        return outputs

    def _launch(self, sched: SchedulerOutput, after: LaunchedStep | None) -> LaunchedStep:
        """Launch ``sched`` behind ``after`` (in flight); if launching raises, ``sched`` is
        reverted (its requests advanced when it was scheduled)."""
        t0 = time.perf_counter()
        try:
            pending = self.runner.launch(sched, after.pending if after is not None else None)
        except BaseException:
            self.scheduler.revert(sched)
            raise
        return LaunchedStep(sched, pending, t0, time.perf_counter() - t0)

    def _abandon(self, prev: LaunchedStep) -> None:
        """The call raised once ``prev`` was launched: the tokens of ``prev`` and of the step
        launched after it are lost, so their requests go back to where they were before them
        (the KV they wrote is computed again) and nothing stays in flight."""
        for step in (self._in_flight, prev):  # newest first: its placeholders are last
            if step is not None:
                self.scheduler.revert(step.sched)
        self._in_flight = None

    def _observe(self, step: LaunchedStep, collected_s: float) -> None:
        """Tell the cost model how long a collected step ran: on a GPU from its launch or the
        end of the step before, whichever came last, to its tokens; on the CPU, which runs it
        inside the launch, its launch. A step whose requests all finished before it was
        collected (aborted) may have waited through an idle engine: not observed."""
        started = max(step.started_s, self._last_collected_s)
        self._last_collected_s = collected_s
        if all(r.is_finished for r, _ in step.sched.scheduled):
            return
        on_cpu = self.device.type == "cpu"
        self.scheduler.observe_step(step.sched, step.launch_s if on_cpu else collected_s - started)

    @property
    def step_in_flight(self) -> bool:
        """Is a step launched whose tokens the next call collects (async scheduling)?"""
        return self._in_flight is not None

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

    # ---- state ----------------------------------------------------------------------------

    def switch_metrics(self) -> dict[str, float]:
        """Context-switch, reuse and KV-layout counters (cumulative since start); bytes and
        copies are every rank's (the driver counts its share: each rank moves as much)."""
        metrics = {**self.scheduler.metrics(), **self.kv.metrics(self.scheduler.running)}
        for key in _EVERY_RANKS:
            metrics[key] *= self.config.model.tensor_parallel_size
        return {
            **metrics,
            # Garbage-collector pauses in this process (all threads; measured once an
            # AsyncEngine or a step log has installed the clock: gc_control.py).
            "gc_pause_s": GC_CLOCK.total_s,
            "gc_full_collections": GC_CLOCK.count[2],
            # Triton compiles in this process (runner/jit_watch.py): after start-up, each one
            # stalled a step
            "kernel_compiles": JIT_CLOCK.count,
            "kernel_compile_s": JIT_CLOCK.total_s,
        }

    def shutdown(self) -> None:
        """Stop the other tensor-parallel ranks (nothing to do with one rank); the engine is
        unusable after it."""
        if self.workers is not None:
            self.workers.shutdown()

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (``KVMemory.reset_prefix_cache``), as vLLM's: True (it
        cannot fail here; vLLM's returns False while requests hold cached blocks)."""
        freed = self.kv.reset_prefix_cache()
        logger.info("prefix cache reset: %d cached blocks freed", freed)
        return True

    def check_accounting(self) -> None:
        """Raise if KV blocks leaked: every block is free or owned by a live request, once."""
        self.kv.check(self.requests.values())


def _samples_from_history(sched: SchedulerOutput) -> bool:
    """Does a request of ``sched`` sample from all its tokens (penalties, a grammar)? Then the
    next step waits for this one's tokens instead of being launched behind it with a
    placeholder."""
    return any(r.sampling_params.needs_history for r, _ in sched.scheduled)
