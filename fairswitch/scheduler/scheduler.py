"""Iteration-level scheduler: continuous batching with chunked prefill under a token budget.

Each step every running request asks for the tokens it has not computed yet (a prompt chunk, or
the single token sampled last step), oldest first, within ``max_num_batched_tokens``. When KV
blocks run out, the most recently admitted running request is preempted until the request at hand
fits; how (swap its KV to the CPU, or drop it and recompute) is the preemption policy's call
(preemption.py). In a step that preempted nobody, swapped requests are brought back first; new
requests are admitted only when none is waiting to come back.

Queues: ``waiting`` (new, or preempted by recompute: they prefill again), ``swapped`` (KV on the
CPU; FIFO), ``running``. Swap-ins in flight belong to the swap manager until they land.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from fairswitch.config import SchedulerConfig
from fairswitch.kv.cache_manager import KVCacheManager
from fairswitch.kv.swap_manager import SwapManager
from fairswitch.request import Request, RequestStatus
from fairswitch.scheduler.preemption import RECOMPUTE, SWAP, PreemptionPolicy


class QueueFullError(RuntimeError):
    """The waiting queue is at ``max_waiting``; the caller should retry later."""


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Request, int]] = field(default_factory=list)  # (request, new tokens)
    num_batched_tokens: int = 0
    preempted: list[Request] = field(default_factory=list)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager,
                 swap: SwapManager | None = None) -> None:
        self.config = config
        self.kv = kv
        self.swap = swap
        self.policy = PreemptionPolicy(config.preemption_mode, config.swap_link_gb_s * 1e9,
                                       config.prefill_tokens_per_s)
        self.waiting: deque[Request] = deque()
        self.swapped: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.preemptions_by_mode = {SWAP: 0, RECOMPUTE: 0}
        self.switch_stall_s = 0.0  # time spent blocked on swap-ins with nothing else to run
        self.num_reused_tokens = 0  # prompt tokens whose KV came from the prefix cache

    def add_request(self, request: Request) -> None:
        if self.config.max_waiting is not None and len(self.waiting) >= self.config.max_waiting:
            raise QueueFullError(f"waiting queue is full ({self.config.max_waiting} requests)")
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        # Copies still in flight count: their blocks return to the pools only when they land.
        busy = self.swap is not None and self.swap.has_in_flight()
        return bool(self.waiting or self.running or self.swapped or busy)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        if self.swap is not None:
            self._land(self.swap.poll())
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        if not out.preempted:
            budget = self._resume_swapped(out, budget)
            if not self.swapped:
                self._admit_waiting(out, budget)
        if not out.scheduled and self.swap is not None and self.swap.incoming:
            # Nothing can run until a swap-in lands: waiting is the only option left.
            t0 = time.perf_counter()
            self._land(self.swap.wait_incoming())
            self.switch_stall_s += time.perf_counter() - t0
            self._schedule_running(out, self.config.max_num_batched_tokens)
        out.num_batched_tokens = sum(n for _, n in out.scheduled)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        scheduled = {id(r) for r, _ in out.scheduled}
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if id(req) in scheduled:
                i += 1
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate_slots(req, n):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    return budget  # everyone after it is gone too
            out.scheduled.append((req, n))
            budget -= n
            i += 1
        return budget

    def _land(self, ready: list[Request]) -> None:
        """Swap-ins that landed rejoin the running set (ahead of new admissions)."""
        for req in ready:
            req.status = RequestStatus.RUNNING
            self.running.append(req)

    def _resume_swapped(self, out: SchedulerOutput, budget: int) -> int:
        while (self.swapped and self.swap is not None
               and len(self.running) + len(self.swap.incoming) < self.config.max_num_seqs):
            req = self.swapped[0]
            # Room for its saved KV plus the token it computes next.
            if not self.swap.can_swap_in(req) or self.kv.blocks_needed(
                    req.num_cpu_tokens + 1) > self.kv.num_free_blocks:
                break
            self.swapped.popleft()
            self.swap.swap_in(req)
        landed = self.swap.poll() if self.swap is not None else []
        if landed:
            self._land(landed)
            budget = self._schedule_running(out, budget)
        return budget

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        now = time.monotonic()
        in_flight = len(self.swap.incoming) if self.swap is not None else 0
        while (self.waiting and budget > 0
               and len(self.running) + in_flight < self.config.max_num_seqs):
            req = self.waiting[0]
            reused = self.kv.attach_cached_prefix(req)
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self.kv.allocate_slots(req, n):
                if reused:  # let go of the shared prefix while it waits
                    self.kv.free(req)
                    req.num_computed_tokens = 0
                break
            if reused:
                req.num_cached_tokens += reused
                self.num_reused_tokens += reused
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
            self.running.append(req)
            out.scheduled.append((req, n))
            budget -= n

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        mode = self.policy.choose(req, self.swap)
        if mode == SWAP:
            self.swap.swap_out(req)  # type: ignore[union-attr]
            req.status = RequestStatus.SWAPPED
            self.swapped.append(req)
        else:
            # Recompute: drop the KV; the prompt and the tokens generated so far prefill again.
            self.kv.free(req)
            if self.swap is not None:
                self.swap.drop_cpu_copy(req)
            req.num_computed_tokens = 0
            req.status = RequestStatus.WAITING
            self.waiting.appendleft(req)
        req.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.preemptions_by_mode[mode] += 1

    def finish(self, req: Request) -> None:
        """Remove a finished or aborted request from the queues and free its blocks."""
        for queue in (self.running, self.waiting, self.swapped):
            if req in queue:
                queue.remove(req)
                break
        if self.swap is not None:
            self.swap.release(req)
        else:
            self.kv.free(req)
