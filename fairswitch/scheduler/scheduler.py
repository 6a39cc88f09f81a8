"""Iteration-level scheduler: continuous batching with chunked prefill under a token budget.

Each step every running request asks for the tokens it has not computed yet (a prompt chunk, or
the single token sampled last step), oldest first, within ``max_num_batched_tokens``. When KV
blocks run out, the most recently admitted running request is preempted (its blocks freed, to be
recomputed) until the request at hand fits. Waiting requests are admitted after that, in arrival
order, while budget, blocks and ``max_num_seqs`` allow, and never in a step that had to preempt.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from fairswitch.config import SchedulerConfig
from fairswitch.kv.cache_manager import KVCacheManager
from fairswitch.request import Request, RequestStatus


class QueueFullError(RuntimeError):
    """The waiting queue is at ``max_waiting``; the caller should retry later."""


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Request, int]] = field(default_factory=list)  # (request, new tokens)
    num_batched_tokens: int = 0
    preempted: list[Request] = field(default_factory=list)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add_request(self, request: Request) -> None:
        if self.config.max_waiting is not None and len(self.waiting) >= self.config.max_waiting:
            raise QueueFullError(f"waiting queue is full ({self.config.max_waiting} requests)")
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate_slots(req, n):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                out.scheduled.append((req, n))
                budget -= n
                i += 1
                continue
            break  # the request itself was preempted: everyone after it is gone too
        if not out.preempted:
            self._admit_waiting(out, budget)
        out.num_batched_tokens = sum(n for _, n in out.scheduled)
        return out

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        now = time.monotonic()
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self.kv.allocate_slots(req, n):
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
            self.running.append(req)
            out.scheduled.append((req, n))
            budget -= n

    def _preempt(self, req: Request) -> None:
        # Recompute: drop the KV; the prompt and the tokens generated so far are prefilled again.
        self.running.remove(req)
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def finish(self, req: Request) -> None:
        """Remove a finished or aborted request from the queues and free its blocks."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req)
