"""Iteration-level scheduler: continuous batching with chunked prefill under a token budget, and
preemption so that the batch converges to the best-ranked requests that fit.

Who is best is the ranking policy's call (ranking.py: fcfs, priority, vtc, trace); this module only
compares ranks. Each step:

1. swap-ins that landed rejoin ``running``; the policy updates ranks (trace priorities); requests
   kept out longer than ``max_starvation_s`` become *starving* and rank first until they have run
   ``min_run_steps`` and sampled a token.
2. Priority preemption: while the best queued request finds no room (batch at ``max_num_seqs`` or
   too few KV blocks) and outranks the worst running request that has sat in the batch
   ``min_run_steps`` steps by more than ``preempt_threshold``, that running request is preempted
   (threshold + minimum run = hysteresis: priorities flipping every step do not thrash). Steps
   count whether or not the token budget reached it: one left out by a long better-ranked prefill
   would otherwise stay too new to preempt, and the better-ranked one would go in its place.
3. Running requests, best first, ask for the tokens they have not computed (a prompt chunk or the
   token sampled last step) within ``max_num_batched_tokens``; when KV blocks run out, copies
   still holding blocks (swap-outs, write-backs) are waited for first, then the lowest-ranked
   running request is preempted.
4. If step 3 preempted nobody: queued requests in rank order, swapped ones first unless a new one
   outranks them by more than the threshold; resumed requests are scheduled before new prefills;
   the first that does not fit stops admission (no overtaking; but a request whose LoRA adapter
   finds no slot is passed by those without an adapter, lora/slots.py). A queued request fits
   when the blocks it needs leave ``growth_headroom`` free blocks per running request (steps 2
   and 4 alike): without that room the batch's next block would preempt someone again at once,
   and a full cache would swap the same requests in and out every few steps.

Preempted requests swap out or are recomputed per victim (preemption.py). Queues: ``waiting`` (new,
or preempted by recompute), ``swapped`` (KV on the CPU), both ranked (queues.py); ``running`` (a
list, sorted by rank each step). Swap-ins in flight belong to the swap manager until they land.

The contract is two calls per step (plus ``add_request`` and ``finish`` for arrivals and aborts):

    out = schedule()                   the step's chunks; their tokens count as computed now,
                                       each token the step samples is a placeholder
                                       (PLACEHOLDER_TOKEN) at the end of its request's tokens,
                                       and their service is charged to the ranking policy
    ... the runner runs ``out`` (it may run a later step before this one's tokens are back) ...
    update_from_output(out, sampled)   placeholders become the sampled tokens, stop checks run,
                                       finished requests leave and free their KV

``revert(out)`` undoes a scheduled step whose tokens were lost (an error while it ran), its
charge included. What is charged, and when, is decided in ``_charge``.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from fairswitch.config import SchedulerConfig
from fairswitch.kv.memory import KVMemory
from fairswitch.lora.slots import AdapterSlots
from fairswitch.request import PLACEHOLDER_TOKEN, Request, RequestStatus
from fairswitch.scheduler.preemption import RECOMPUTE, SWAP, PreemptionPolicy
from fairswitch.scheduler.queues import ClientQueue, HeapQueue
from fairswitch.scheduler.ranking import make_ranking


class QueueFullError(RuntimeError):
    """The waiting queue is at ``max_waiting``; the caller should retry later."""


class TokenSink(Protocol):
    """What a sampled token does to its request (engine/output_processor.py: detokenize, stop
    checks); the scheduler calls it and frees the requests it finishes."""

    def append_token(self, request: Request, token_id: int,
                     logprobs: dict[int, tuple[float, int]] | None = None) -> None: ...

    def at_length_limit(self, request: Request) -> bool: ...


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Request, int]] = field(default_factory=list)  # (request, new tokens)
    num_batched_tokens: int = 0
    preempted: list[Request] = field(default_factory=list)
    # Per scheduled request: tokens computed before this step (where its chunk starts), and
    # whether the chunk reaches its last token (the step samples the next one).
    starts: list[int] = field(default_factory=list)
    samples: list[bool] = field(default_factory=list)
    # Per scheduled request: prompt tokens the step charged to its client (``revert`` takes them
    # back; the output token a sampling step charged goes with its placeholder).
    prompt_charges: list[int] = field(default_factory=list)
    # LoRA adapters to copy into device slots before the step: (slot, adapter) (lora/slots.py)
    lora_loads: list = field(default_factory=list)

    @classmethod
    def planned(cls, scheduled: list[tuple[Request, int]]) -> SchedulerOutput:
        """An output for ``scheduled`` as the requests stand now (see ``plan``)."""
        out = cls(scheduled)
        out.plan()
        return out

    def plan(self) -> None:
        """Record where each chunk starts (the request's computed tokens now) and whether it
        reaches the request's last token; ``Scheduler.schedule`` then advances the requests."""
        self.starts = [r.num_computed_tokens for r, _ in self.scheduled]
        self.samples = [r.num_computed_tokens + n == r.num_tokens for r, n in self.scheduled]
        self.num_batched_tokens = sum(n for _, n in self.scheduled)

    def chunks(self):
        """(request, start, tokens, samples) per scheduled request."""
        return ((r, s, n, x) for (r, n), s, x in zip(self.scheduled, self.starts, self.samples))


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVMemory, tokens: TokenSink,
                 clock: Callable[[], float] = time.monotonic,
                 adapters: AdapterSlots | None = None) -> None:
        """``adapters``: the LoRA slots a seated request's adapter needs (none: no request
        has an adapter)."""
        self.config = config
        self.adapters = adapters if adapters is not None else AdapterSlots(0)
        self.kv = kv.blocks
        self.swap = kv.swap
        self.tokens = tokens
        self.clock = clock
        self.kv_token_bytes = kv.layout.block_bytes / kv.block_size
        self.preemption = PreemptionPolicy(config.preemption_mode, config.swap_link_gb_s * 1e9,
                                           config.prefill_tokens_per_s)
        if kv.link_probe is not None:  # the cost model starts from this machine's link
            self.preemption.observe_link(*kv.link_probe)
        self.ranking = make_ranking(config)
        self.waiting = self.ranking.make_queue()
        self.swapped = self.ranking.make_queue()
        self.running: list[Request] = []
        # (since, push order, request), oldest first: the starvation bound's watch (a heap:
        # a request preempted before it ran min_run_steps goes back with its older time)
        self._kept_out: list[tuple[float, int, Request]] = []
        self._kept_out_order = itertools.count()
        # Waiting-queue places held for the choices yet to join, by their first choice's id
        self._held_places: dict[str, int] = {}
        # Places reserved for a caller's whole life (reserve_places), by its hold's id: those of
        # its requests in the waiting queue use them, the rest stay free for it.
        self._reserved_places: dict[str, int] = {}
        self._seq = itertools.count()
        self.num_preemptions = 0
        self.num_rank_preemptions = 0  # of which: for a better-ranked request (not memory)
        self.preemptions_by_mode = {SWAP: 0, RECOMPUTE: 0}
        self.switch_stall_s = 0.0  # time spent blocked on swap-ins with nothing else to run
        self.num_reused_tokens = 0  # prompt tokens whose KV came from the prefix cache
        self.num_reused_tokens_cpu = 0  # ... from its CPU tier (fetched instead of recomputed)
        self.num_queried_tokens = 0  # prompt tokens looked up in the prefix cache (both tiers)

    def add_request(self, request: Request, queue_places: int = 1,
                    held_by: str | None = None) -> None:
        """Queue a request. ``queue_places``: how many free places in the waiting queue
        (``max_waiting``) admitting it takes: 1, or n for the first of n choices admitted
        together. Its n - 1 other places are held for the others (they join once its prompt is
        in the prefix cache), which pass ``held_by=`` its id and take a held place, until
        ``release_places``; ``held_by=`` a ``reserve_places`` hold takes one of its places.
        QueueFullError if the queue has not that many places; ValueError if it never can (a
        group larger than the queue)."""
        cap = self.config.max_waiting
        if held_by is not None and held_by in self._reserved_places:
            if self._waiting_under(held_by) >= self._reserved_places[held_by]:
                raise QueueFullError(f"the {self._reserved_places[held_by]} places reserved "
                                     f"for {held_by!r} are all taken")
            request.queue_hold = held_by
        elif held_by is not None and self._held_places.get(held_by):
            self._held_places[held_by] -= 1
            if not self._held_places[held_by]:
                del self._held_places[held_by]
        elif held_by is not None and cap is not None:
            # Its group's first was refused (the queue was full), or the response ended: a
            # place of its own would admit part of a group that was refused as a whole.
            raise QueueFullError(f"no place is held for {held_by!r}: its group was not "
                                 f"admitted ({cap} requests wait at most)")
        elif cap is not None and queue_places:
            if queue_places > 1 and queue_places > cap:
                raise ValueError(f"{queue_places} choices of one request need {queue_places} "
                                 f"places in the waiting queue, which holds {cap} (max_waiting)")
            if self._places_taken() + queue_places > cap:
                raise QueueFullError(f"waiting queue is full ({cap} requests)")
        if queue_places > 1 and held_by is None and cap is not None:
            self._held_places[request.request_id] = queue_places - 1
        request.seq = next(self._seq)
        self.ranking.on_arrival(request)
        self._keep_out(request, self.waiting)

    def reserve_places(self, hold_id: str, n: int) -> None:
        """Reserve ``n`` places in the waiting queue until ``release_places(hold_id)``: requests
        added with ``held_by=hold_id`` take them, as many at a time as there are, and give them
        back when they leave the queue (a beam search's steps, none of which may meet a full
        queue partway). QueueFullError if the queue has not ``n`` free places; ValueError if it
        never can. Nothing is kept without ``max_waiting``."""
        cap = self.config.max_waiting
        if hold_id in self._reserved_places or hold_id in self._held_places:
            raise ValueError(f"places are already held for {hold_id!r}")
        if cap is None:
            return
        if n > cap:
            raise ValueError(f"{n} requests at a time need {n} places in the waiting queue, "
                             f"which holds {cap} (max_waiting)")
        if self._places_taken() + n > cap:
            raise QueueFullError(f"waiting queue is full ({cap} requests)")
        self._reserved_places[hold_id] = n

    def release_places(self, request_id: str) -> None:
        """Give up the waiting-queue places still held for the choices of ``request_id`` (its
        response ended before they all joined), or reserved under that id."""
        self._held_places.pop(request_id, None)
        self._reserved_places.pop(request_id, None)

    def _places_taken(self) -> int:
        """Places in the waiting queue: its requests, and those held or reserved for others."""
        free_reserved = sum(max(0, n - self._waiting_under(hold))
                            for hold, n in self._reserved_places.items())
        return len(self.waiting) + sum(self._held_places.values()) + free_reserved

    def _waiting_under(self, hold_id: str) -> int:
        return sum(1 for req in self.waiting if req.queue_hold == hold_id)

    def has_unfinished(self) -> bool:
        # Copies still in flight count: their blocks return to the pools only when they land.
        return bool(self.waiting or self.running or self.swapped or self.swap.has_in_flight())

    def schedule(self) -> SchedulerOutput:
        """The next step (empty when nothing can run); its requests advance as it is decided:
        see the module's docstring."""
        out = SchedulerOutput()
        for req in self.running:
            req.num_seated_steps += 1
        self._land(self.swap.poll())
        self._update_ranks()
        self.running.sort(key=self.ranking.sort_key)
        self._preempt_for_rank(out)
        budget, short = self._schedule_running(out, self.config.max_num_batched_tokens)
        if not short:
            self._admit(out, budget)
        if not out.scheduled and self.swap.num_pending_in:
            # Nothing can run until a swap-in lands: waiting is the only option left.
            t0 = time.perf_counter()
            self._land(self.swap.wait_incoming())
            self.switch_stall_s += time.perf_counter() - t0
            self._schedule_running(out, self.config.max_num_batched_tokens)
        out.plan()
        self._advance(out)
        out.lora_loads = self.adapters.take_loads()
        return out

    def _advance(self, out: SchedulerOutput) -> None:
        """The step will run: its tokens count as computed; each token it samples is a
        placeholder until ``update_from_output``; its requests have run one more step
        (``min_run_steps``, the starvation bound: served once it has also sampled). A request whose placeholder ends it by length
        is ``finishing``: a step scheduled before its token is back neither runs nor preempts it.
        Its service is charged now (``_charge``)."""
        min_run = max(1, self.config.min_run_steps)
        for req, start, n, samples in out.chunks():
            # Prompt tokens past the ones charged before (a recomputed prompt is not charged again).
            num_prompt = max(0, min(start + n, req.num_prompt_tokens)
                             - req.num_charged_prompt_tokens)
            out.prompt_charges.append(num_prompt)
            self._charge(req, num_prompt, int(samples))
            req.num_computed_tokens = start + n
            req.num_run_steps += 1
            # A starving request is served once it has sampled: a prompt (or a recomputed
            # context) prefilled in more chunks than min_run_steps would otherwise lose its
            # protection part way, and two requests that cannot fit together could preempt
            # each other by recompute forever, neither finishing its prefill.
            if req.starving and req.num_run_steps >= min_run and samples:
                req.starving = False
            if samples:
                req.token_ids.append(PLACEHOLDER_TOKEN)
                req.finishing = self.tokens.at_length_limit(req)

    def update_from_output(self, out: SchedulerOutput, sampled: dict[Request, int],
                           logprobs: dict[Request, dict[int, tuple[float, int]]] | None = None
                           ) -> list[Request]:
        """The step's sampled tokens are back: each replaces its request's placeholder (one of
        a step scheduled after this one stays, after it), stop conditions are checked, finished
        requests leave and free their KV, and the service is charged. Returns the requests that
        got a token, in step order; the token of a request finished since (an abort) is dropped."""
        now = self.clock()
        updated = []
        for req, _, _, samples in out.chunks():
            if not samples or req.is_finished:
                continue
            token = sampled.get(req)
            if token is None:
                raise RuntimeError(f"the step sampled no token for request {req.request_id!r}")
            num_placeholders = _drop_placeholders(req)
            self.tokens.append_token(req, token, logprobs.get(req) if logprobs else None)
            if req.num_output_tokens == 1:  # its prompt is computed: others may share it
                self.kv.cache_prompt(req)
            m = req.metrics
            if m.first_token_time is None:
                m.first_token_time = now
            m.last_token_time = now
            if req.is_finished:
                m.finished_time = now
                # The tokens that later steps in flight sample for it will be dropped: not served.
                self._charge(req, 0, 1 - num_placeholders)
                self.finish(req)
            elif num_placeholders > 1:  # a later step in flight samples the next ones
                req.token_ids.extend([PLACEHOLDER_TOKEN] * (num_placeholders - 1))
                req.finishing = self.tokens.at_length_limit(req)
            else:
                req.finishing = False
            updated.append(req)
        return updated

    def revert(self, out: SchedulerOutput) -> None:
        """The step's tokens are lost (an error while it ran): its requests go back to where they
        were before it (the KV it wrote is computed again) and its charge is taken back. Revert
        newest step first."""
        self.adapters.requeue(out.lora_loads)  # (they may not have been made)
        for (req, start, _, samples), num_prompt in zip(out.chunks(), out.prompt_charges,
                                                        strict=True):
            num_output = 0  # its placeholder is gone already if the request finished since
            if samples and req.token_ids and req.token_ids[-1] == PLACEHOLDER_TOKEN:
                req.token_ids.pop()
                num_output = 1
            self._charge(req, -num_prompt, -num_output)
            req.finishing = False
            req.num_computed_tokens = min(req.num_computed_tokens, start)
            req.num_cpu_tokens = min(req.num_cpu_tokens, req.num_computed_tokens)

    def observe_step(self, out: SchedulerOutput, seconds: float) -> None:
        """Prefill-heavy steps tell the cost model how fast recomputing is on this machine."""
        num_prefill = sum(n for _, n in out.scheduled if n > 1)
        if num_prefill >= 256 and 2 * num_prefill >= out.num_batched_tokens:
            self.preemption.observe_prefill(num_prefill, seconds)

    def metrics(self) -> dict[str, float]:
        """Preemption and reuse counters (cumulative since start)."""
        return {
            "preemptions_swap": self.preemptions_by_mode[SWAP],
            "preemptions_recompute": self.preemptions_by_mode[RECOMPUTE],
            # of which for a better-ranked queued request (the rest: KV blocks ran out)
            "preemptions_rank": self.num_rank_preemptions,
            "link_gb_s": self.preemption.link_bytes_per_s / 1e9,  # as measured (cost model)
            "prefill_tokens_per_s": self.preemption.prefill_tokens_per_s,
            "switch_wait_s": self.switch_stall_s + self.swap.blocking_copy_s,
            "num_swapped": len(self.swapped),
            "reused_tokens": self.num_reused_tokens,
            "reused_tokens_cpu": self.num_reused_tokens_cpu,
            "queried_tokens": self.num_queried_tokens,
            "reuse_bytes_saved": (self.num_reused_tokens + self.num_reused_tokens_cpu)
            * self.kv_token_bytes,
        }

    def _charge(self, req: Request, num_prompt: int, num_output: int) -> None:
        """Charge ``req``'s client for prompt and output tokens (negative: take a charge back).

        The rule (VTC's service, Sheng et al. 2024, as delivered to the client, once):
        - when: as the step is scheduled (``_advance``), so the next ``schedule()`` already
          counts the step in flight; with async scheduling a charge after the tokens are back
          would lag one step behind the decisions.
        - prompt: each prompt token once, when its KV first becomes the request's, computed or
          reused from the prefix cache (the client gets the same service either way).
        - output: each token the request is given, once, when the step sampling it is scheduled.
        - preemption: recomputing a prompt and the tokens generated so far is the server's cost,
          not charged again (``num_charged_prompt_tokens`` is a high-water mark; prefilled
          output tokens are not output); a swap-out and swap-in compute nothing, charge nothing.
        - what is not served is taken back: a reverted step's tokens (``revert``), and a token
          sampled for a request that finished while it was in flight (dropped: ``finish``).
        So ``num_charged_output_tokens == num_output_tokens`` (placeholders included) always,
        and the client's counter advances by (w_in x prompt + w_out x output) / its weight.
        """
        if num_prompt or num_output:
            req.num_charged_prompt_tokens += num_prompt
            req.num_charged_output_tokens += num_output
            self.ranking.on_served(req, num_prompt, num_output)

    # ---- ranks ----------------------------------------------------------------------------

    def _keep_out(self, req: Request, queue: HeapQueue | ClientQueue,
                  since: float | None = None) -> None:
        """Queue ``req``, out of the batch since ``since`` (default: now)."""
        req.kept_out_since = self.clock() if since is None else since
        if self.config.max_starvation_s:
            heapq.heappush(self._kept_out,
                           (req.kept_out_since, next(self._kept_out_order), req))
        queue.push(req)

    def _requeue(self, req: Request) -> None:
        for queue in (self.waiting, self.swapped):
            if req in queue:
                queue.update(req)

    def _update_ranks(self) -> None:
        for req in self.ranking.on_step():
            self._requeue(req)
        bound = self.config.max_starvation_s
        if not bound:
            return
        now = self.clock()
        kept_out = self._kept_out
        while kept_out and now - kept_out[0][0] > bound:
            since, _, req = heapq.heappop(kept_out)
            if req.kept_out_since == since and not req.starving:  # still out since then
                req.starving = True
                self._requeue(req)

    def _outranks(self, a: Request, b: Request) -> bool:
        ra, rb = self.ranking.rank(a), self.ranking.rank(b)
        # (the difference first: ints stay exact, 2**62 outranks 2**62 + 1)
        return rb - ra > self.ranking.preempt_threshold or (ra == -math.inf and rb > ra)

    def _next_kept_out(self) -> Request | None:
        """Best queued request: the swapped head unless the waiting head outranks it."""
        w, s = self.waiting.peek(), self.swapped.peek()
        if w is None or s is None:
            return s if w is None else w
        return w if self._outranks(w, s) else s

    # ---- preemption -------------------------------------------------------------------------

    def _headroom(self, num_running: int) -> int:
        """Free blocks to leave for the growth of ``num_running`` requests (none when idle)."""
        return self.config.growth_headroom * num_running

    def _num_seated(self) -> int:
        """Requests holding a seat in the batch: running, or waiting for their swap-in."""
        return len(self.running) + self.swap.num_pending_in

    def _batch_headroom(self) -> int:
        return self._headroom(self._num_seated())

    def _blocks_to_start(self, req: Request) -> int:
        if req in self.swapped:
            return self.kv.blocks_needed(req.num_cpu_tokens + 1)
        n = min(req.num_tokens - req.num_computed_tokens, self.config.max_num_batched_tokens)
        return self.kv.num_new_blocks(req, n)

    def _preempt_for_rank(self, out: SchedulerOutput) -> None:
        swap = self.swap
        seats = self.config.max_num_seqs - self._num_seated()
        # Blocks of swap-outs still draining will be free soon: counting them stops a request
        # that waits for them from preempting one victim per step.
        free = self.kv.num_free_blocks + swap.num_gpu_blocks_in_flight()
        min_run = self.config.min_run_steps
        held: list[tuple[Request, HeapQueue | ClientQueue]] = []  # room counted for them
        no_slot: list[tuple[Request, HeapQueue | ClientQueue]] = []
        while (cand := self._next_kept_out()) is not None:
            if self._waits_for_slot(cand, no_slot):
                continue  # (no preemption here frees a slot for sure)
            need = self._blocks_to_start(cand)
            headroom = self._headroom(self.config.max_num_seqs - seats)
            if seats > 0 and need + headroom <= free:
                if not out.preempted:
                    break  # there was room all along: admission takes it
                # A victim's seat: set the candidate aside and look at the next one.
                queue = self.swapped if cand in self.swapped else self.waiting
                queue.remove(cand)
                held.append((cand, queue))
                seats -= 1
                free -= need
                continue
            victim = next((r for r in reversed(self.running) if r.num_seated_steps >= min_run
                           and not r.starving and not r.finishing), None)
            if victim is None or not self._outranks(cand, victim):
                break
            free += len(victim.block_table)
            seats += 1
            self._preempt(victim)
            out.preempted.append(victim)
            self.num_rank_preemptions += 1
        for cand, queue in held + no_slot:
            queue.push(cand)

    def _waits_for_slot(self, req: Request,
                        aside: list[tuple[Request, HeapQueue | ClientQueue]]) -> bool:
        """Whether queued ``req`` waits for a LoRA slot (then it is taken out of its queue into
        ``aside``, to go back after this pass): its adapter finds no free slot, or a request
        ranked before it did. Requests without an adapter pass it; those with one wait behind
        it, so that the slots drain until one frees for it (it cannot starve)."""
        if req.lora_adapter is None or (not aside and self.adapters.can_seat(req)):
            return False
        queue = self.swapped if req in self.swapped else self.waiting
        queue.remove(req)
        aside.append((req, queue))
        return True

    def _preempt(self, req: Request) -> None:
        mode = self.preemption.choose(req, self.swap)
        # One that had not run min_run_steps since its admission (a seat the token budget did
        # not reach, or memory ran out) has been out of the batch, for the starvation bound,
        # since before that admission: else admit-and-preempt cycles would restart its clock.
        since = req.out_since if req.num_run_steps < self.config.min_run_steps else None
        if mode == SWAP:
            self.swap.swap_out(req)  # (raising, it leaves the request running, not lost)
            self.running.remove(req)
            req.status = RequestStatus.SWAPPED
            self._keep_out(req, self.swapped, since)
        else:
            # Recompute: drop the KV; the prompt and the tokens generated so far prefill again.
            self.running.remove(req)
            self.swap.drop_gpu(req)
            self.swap.drop_cpu_copy(req)
            req.num_computed_tokens = 0
            req.status = RequestStatus.WAITING
            self._keep_out(req, self.waiting, since)
        self.adapters.unseat(req)
        req.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.preemptions_by_mode[mode] += 1

    # ---- running and admission ----------------------------------------------------------------

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> tuple[int, bool]:
        """Schedule running requests not scheduled yet, in list order; (budget left, preempted?)."""
        scheduled = {id(r) for r, _ in out.scheduled}
        short = False
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if id(req) in scheduled or req.finishing:  # its last token is being computed
                i += 1
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate_slots(req, n):
                if self.swap.reclaim_in_flight():
                    continue  # blocks held by copies came back: no victim needed yet
                # The lowest ranked (sorted at the start of the step) that will run again.
                victim = next(r for r in reversed(self.running) if not r.finishing or r is req)
                if id(victim) in scheduled:  # a resumed request scheduled earlier this step
                    k = next(k for k, (r, _) in enumerate(out.scheduled) if r is victim)
                    budget += out.scheduled.pop(k)[1]
                self._preempt(victim)
                out.preempted.append(victim)
                short = True
                if victim is req:
                    return budget, True  # everyone after it is gone too
            out.scheduled.append((req, n))
            scheduled.add(id(req))
            budget -= n
            i += 1
        return budget, short

    def _land(self, ready: list[Request]) -> None:
        """Swap-ins that landed rejoin the running set (ahead of new admissions)."""
        for req in ready:
            req.status = RequestStatus.RUNNING
            req.num_run_steps = req.num_seated_steps = 0
            self.running.append(req)

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        no_slot: list[tuple[Request, HeapQueue | ClientQueue]] = []
        try:
            self._admit_in_order(out, budget, no_slot)
        finally:
            for req, queue in no_slot:
                queue.push(req)

    def _admit_in_order(self, out: SchedulerOutput, budget: int,
                        no_slot: list[tuple[Request, HeapQueue | ClientQueue]]) -> None:
        swap, max_seqs = self.swap, self.config.max_num_seqs
        now = self.clock()
        resuming = False  # swap-ins started here: scheduled before any new prefill
        next_token_blocks = 0  # blocks the resumed requests' next tokens will take
        while budget > 0:
            req = self._next_kept_out()
            if req is None or self._num_seated() >= max_seqs:
                break
            if self._waits_for_slot(req, no_slot):
                continue
            if req in self.swapped:
                # Room for its saved KV plus the token it computes next (and theirs before it).
                saved = self.kv.blocks_needed(req.num_cpu_tokens)
                extra = self.kv.blocks_needed(req.num_cpu_tokens + 1) - saved
                room = self.kv.num_free_blocks - next_token_blocks - self._batch_headroom()
                if not swap.can_swap_in(req) or saved + extra > room:
                    break
                swap.swap_in(req)  # (raising, it leaves the request swapped, not lost)
                self.adapters.seat(req)
                self.swapped.remove(req)
                req.out_since, req.kept_out_since = req.kept_out_since, None
                next_token_blocks += extra
                resuming = True
                continue
            if resuming:
                budget, short = self._land_resumed(out, budget)
                resuming = False
                if short or budget <= 0:
                    return
            n = self._admit_waiting(req, out, budget, now)
            if n is None:
                break
            if n == 0:  # its cached KV is coming back from the CPU tier: lands like a swap-in
                resuming = True
                continue
            budget -= n
        if resuming:
            self._land_resumed(out, budget)

    def _land_resumed(self, out: SchedulerOutput, budget: int) -> tuple[int, bool]:
        landed = self.swap.poll()
        if not landed:
            return budget, False
        self._land(landed)
        return self._schedule_running(out, budget)

    def _admit_waiting(self, req: Request, out: SchedulerOutput, budget: int,
                       now: float) -> int | None:
        """Admit a waiting request: tokens scheduled, 0 if it waits for a CPU-tier fetch, None
        if it does not fit."""
        # Prompt logprobs need the logits of every prompt position: nothing reused.
        computes_all = req.prompt_logprobs is not None
        reused = 0 if computes_all else self.kv.attach_cached_prefix(req)
        headroom = self._batch_headroom()
        fetched = 0 if computes_all else self._fetch_from_cpu_tier(req, headroom)
        n = min(req.num_tokens - req.num_computed_tokens, budget)
        if not fetched and (self.kv.num_new_blocks(req, n) + headroom > self.kv.num_free_blocks
                            or not self.kv.allocate_slots(req, n)):
            if reused:  # let go of the shared prefix while it waits
                self.kv.free(req)
                req.num_computed_tokens = 0
            return None
        if req.metrics.first_scheduled_time is None:
            # Reuse of an earlier request's KV is counted once, at the first admission: a
            # request recomputed after a preemption that finds its own blocks still cached
            # (its output tokens' too) reused nothing of anyone's (and its usage's
            # cached_tokens would pass its prompt).
            req.num_cached_tokens = reused + fetched
            self.num_reused_tokens += reused
            self.num_reused_tokens_cpu += fetched
            if not computes_all:
                self.kv.count_lookup(req, reused)
                self.num_queried_tokens += req.num_tokens
            req.metrics.first_scheduled_time = now
        self.waiting.remove(req)
        self.adapters.seat(req)
        req.out_since, req.kept_out_since = req.kept_out_since, None
        req.num_run_steps = req.num_seated_steps = 0
        if fetched:
            req.status = RequestStatus.SWAPPED
            return 0
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        out.scheduled.append((req, n))
        return n

    def _fetch_from_cpu_tier(self, req: Request, headroom: int) -> int:
        """Start fetching CPU-tier blocks that continue the request's GPU hits; tokens fetched."""
        tier = self.swap.tier
        if tier is None:
            return 0
        hits = tier.match(req.token_ids, req.num_tokens - 1, req.block_hashes,
                          first_block=len(req.block_table), salt=req.cache_salt)
        # Room for the fetched blocks and the rest of the prompt with its next token.
        need = self.kv.blocks_needed(req.num_tokens + 1) - len(req.block_table)
        if not hits or need + headroom > self.kv.num_free_blocks:
            return 0
        self.swap.fetch_cached(req, hits)
        return len(hits) * self.kv.block_size

    def finish(self, req: Request) -> None:
        """Remove a finished or aborted request from the queues and free its blocks (after any
        copy still reading them lands); a placeholder it has goes (a step in flight computes its
        next token, which ``update_from_output`` then drops)."""
        for queue in (self.running, self.waiting, self.swapped):
            if req in queue:
                queue.remove(req)
                break
        self._charge(req, 0, -_drop_placeholders(req))  # tokens in flight for it: never served
        req.finishing = False
        req.kept_out_since = None
        self.adapters.unseat(req)
        self.ranking.on_finish(req)
        self.swap.release(req)


def _drop_placeholders(req: Request) -> int:
    """Remove the placeholders ending ``req.token_ids``; how many there were."""
    n = 0
    while req.token_ids and req.token_ids[-1] == PLACEHOLDER_TOKEN:
        req.token_ids.pop()
        n += 1
    return n
