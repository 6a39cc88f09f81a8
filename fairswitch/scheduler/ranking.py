"""Ranking policies: who should run (preemption.py decides how a preempted request gives up its
KV). The scheduler only compares ranks; it knows no policy.

``score(req)`` is a float, lower = better; ties break on (arrival time, arrival order). A starving
request (scheduler.py) ranks first whatever its score. Hooks let a policy keep state:
``on_arrival`` / ``on_finish`` (request enters / leaves the scheduler), ``on_served`` (tokens it
is served by a step being scheduled, negative when taken back: ``Scheduler._charge`` says which),
``on_step`` (once per schedule(): returns requests whose score changed, so that queued ones are
re-ranked).

- fcfs: score = arrival time (seconds).
- priority: score = ``req.priority`` (lower first, like vLLM's ``priority``).
- vtc: Virtual Token Counter (Sheng et al., "Fairness in Serving Large Language Models", OSDI'24).
  Each client has a counter advanced by the service its requests get, input tokens x w_in + output
  tokens x w_out, divided by the client's weight, charged as steps are scheduled (so a decision
  counts the step in flight) and never for recomputation; score = the client's counter, so
  ``req.priority`` plays no part (requests of one client go by arrival). A client that becomes
  backlogged (its first live request) is lifted to the minimum counter of the backlogged clients,
  so idling earns no credit and a newcomer is neither starved nor allowed to monopolize.
  A queued client preempts a running one only once it is behind by one full step's worth of
  output service (``default_preempt_threshold``), not at every crossing of two counters.
- trace: priorities change while requests run (FastSwitch's evaluation): every iteration each live
  request's priority is redrawn with probability p over K levels, uniformly (random) or to a
  neighbouring level (markov), seeded. Score = the current ``req.priority``.
"""

from __future__ import annotations

import heapq
import math
import random

from fairswitch.config import SchedulerConfig, parse_client_weights
from fairswitch.request import Request
from fairswitch.scheduler.queues import ClientQueue, HeapQueue


class RankingPolicy:
    """The interface, and what every policy shares: the preemption threshold, starving requests
    first, ties broken by arrival."""

    uses_priority = False  # whether a request's own priority plays a part in its rank

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        threshold = config.preempt_threshold
        self.preempt_threshold = self.default_preempt_threshold() if threshold is None \
            else threshold

    def default_preempt_threshold(self) -> float:
        return 0.0  # any better rank (fcfs: earlier arrival; priority: a better level)

    def score(self, req: Request) -> float:
        raise NotImplementedError

    def rank(self, req: Request) -> float:
        return -math.inf if req.starving else self.score(req)

    def sort_key(self, req: Request) -> tuple[float, float, int]:
        return (self.rank(req), req.arrival_time, req.seq)

    def make_queue(self) -> HeapQueue | ClientQueue:
        return HeapQueue(self.sort_key)

    def on_arrival(self, req: Request) -> None:
        pass

    def on_finish(self, req: Request) -> None:
        pass

    def on_served(self, req: Request, num_prefill_tokens: int, num_output_tokens: int) -> None:
        pass

    def on_step(self) -> list[Request]:
        return []


class FCFSRanking(RankingPolicy):
    def score(self, req: Request) -> float:
        return req.arrival_time


class PriorityRanking(RankingPolicy):
    uses_priority = True

    def score(self, req: Request) -> float:
        return req.priority  # (an int: as a float, priorities past 2**53 could tie)


class VTCRanking(RankingPolicy):
    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        self.w_in = config.vtc_input_weight
        self.w_out = config.vtc_output_weight
        self.weights = parse_client_weights(config.client_weights)
        self.counters: dict[str | None, float] = {}
        self.num_live: dict[str | None, int] = {}  # unfinished requests per client with any
        self._floor = 0.0  # lift for a client arriving when nobody is live
        self._queues: list[ClientQueue] = []  # waiting and swapped: who is backlogged

    def default_preempt_threshold(self) -> float:
        # Counters of clients served side by side cross each other every few steps: with no
        # margin their requests would swap places at every crossing (measured on the H200: 12.6k
        # preemptions for 704 requests). A lead worth one full step of output is required first;
        # the service difference bound grows by the same amount.
        return self.config.vtc_output_weight * self.config.max_num_batched_tokens

    def client_score(self, client: str | None) -> float:
        return self.counters.get(client, 0.0)

    def score(self, req: Request) -> float:
        return self.counters.get(req.client_id, 0.0)

    def make_queue(self) -> ClientQueue:
        queue = ClientQueue(self.client_score)
        self._queues.append(queue)
        return queue

    def on_arrival(self, req: Request) -> None:
        """VTC's lift (Sheng et al. 2024, Algorithm 2): a client with nothing queued starts
        from at least the lowest counter among the backlogged clients (those with a request
        kept out of the batch: waiting or swapped), so neither idling nor a request running
        for a long time banks service that a backlogged client would then wait for. With nobody
        queued, from the lowest counter of the clients with unfinished requests, else from the
        last one's."""
        client = req.client_id
        if not any(client in q.num_queued for q in self._queues):
            backlogged = [c for q in self._queues for c in q.num_queued]
            floor = min((self.counters[c] for c in backlogged or self.num_live),
                        default=self._floor)
            self.counters[client] = max(self.counters.get(client, 0.0), floor)
        self.num_live[client] = self.num_live.get(client, 0) + 1

    def on_finish(self, req: Request) -> None:
        client = req.client_id
        self.num_live[client] -= 1
        if not self.num_live[client]:
            del self.num_live[client]
            if not self.num_live:
                self._floor = max(self._floor, self.counters[client])
            if len(self.counters) > 2 * len(self.num_live) + self.KEEP_IDLE:
                self._forget_idle()

    KEEP_IDLE = 1024  # idle clients' counters kept before a sweep (amortized O(1) a request)

    def _forget_idle(self) -> None:
        """Drop the counters of clients with nothing backlogged that are at or below the floor
        (the least backlogged counter, or the last one when none is): one of them arriving
        again would be lifted to a floor at least as high (it never falls), so its counter tells
        nothing. Without this a server whose requests name ever new clients (``user``,
        ``X-Client-Id``) keeps a counter for each forever."""
        floor = min((self.counters[c] for c in self.num_live), default=self._floor)
        for client in [c for c, v in self.counters.items()
                       if v <= floor and c not in self.num_live]:
            del self.counters[client]

    def on_served(self, req: Request, num_prefill_tokens: int, num_output_tokens: int) -> None:
        cost = self.w_in * num_prefill_tokens + self.w_out * num_output_tokens
        client = req.client_id
        weight = self.weights.get(client, 1.0) if client is not None else 1.0
        self.counters[client] = self.counters.get(client, 0.0) + cost / weight


class TraceRanking(PriorityRanking):
    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        self.rng = random.Random(config.priority_update_seed)
        self.p = config.priority_update_prob
        self.levels = config.num_priority_levels
        self.markov = config.priority_updates == "markov"
        self.step = 0
        self._due: list[tuple[int, int, Request]] = []  # (step of next update, seq, request)
        self._live: set[Request] = set()

    def _schedule_update(self, req: Request) -> None:
        if self.p <= 0:
            return
        # Steps until the next update: geometric, so each step costs O(updates), not O(requests).
        gap = 1 if self.p >= 1 else 1 + int(math.log(1.0 - self.rng.random()) / math.log(1 - self.p))
        heapq.heappush(self._due, (self.step + gap, req.seq, req))

    def on_arrival(self, req: Request) -> None:
        req.priority = min(max(req.priority, 0), self.levels - 1)
        self._live.add(req)
        self._schedule_update(req)

    def on_finish(self, req: Request) -> None:
        self._live.discard(req)

    def _redraw(self, level: int) -> int:
        if self.levels == 1:
            return level
        if self.markov:  # a neighbouring level, reflected at the ends
            step = self.rng.choice((-1, 1))
            new = level + step
            return new if 0 <= new < self.levels else level - step
        new = self.rng.randrange(self.levels - 1)  # uniform over the other levels
        return new + (new >= level)

    def on_step(self) -> list[Request]:
        self.step += 1
        changed = []
        due = self._due
        while due and due[0][0] <= self.step:
            _, _, req = heapq.heappop(due)
            if req not in self._live:
                continue
            req.priority = self._redraw(req.priority)
            changed.append(req)
            self._schedule_update(req)
        return changed


def make_ranking(config: SchedulerConfig) -> RankingPolicy:
    return {"fcfs": FCFSRanking, "priority": PriorityRanking, "vtc": VTCRanking,
            "trace": TraceRanking}[config.policy](config)
