"""Queues of requests kept out of the batch (waiting, swapped), ordered by the ranking policy.

Both queues answer ``peek`` (best-ranked request), ``pop``, ``push``, ``remove`` and ``update``
(re-rank one request whose key changed) in O(log n), so 10k queued requests cost little per step.

- ``HeapQueue``: keys fixed while queued (FCFS, static priority, trace priorities); a key change is
  a re-push. Removal is lazy: the entry is blanked and skipped when it reaches the top, and the
  heap is rebuilt without blanks once they outnumber the requests (amortized O(1) a removal).
- ``ClientQueue``: VTC. Keys (client counters) move all the time, for every request of a client at
  once, so requests are kept per client (FIFO by arrival) and ``peek`` asks the policy which
  backlogged client is behind: O(clients), which are few next to requests.

Starving requests (scheduler.py) rank first in either queue.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator
from typing import Any

from fairswitch.request import Request


class _Queue:
    """What both queues share: membership through ``_members`` (request -> where it is kept),
    and ``update`` / ``pop`` in terms of the subclass's ``push``, ``remove`` and ``peek``."""

    _members: dict[Request, Any]

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, req: Request) -> bool:
        return req in self._members

    def __iter__(self) -> Iterator[Request]:
        return iter(list(self._members))  # unordered

    def push(self, req: Request) -> None:
        raise NotImplementedError

    def remove(self, req: Request) -> None:
        raise NotImplementedError

    def peek(self) -> Request | None:
        raise NotImplementedError

    def update(self, req: Request) -> None:
        self.remove(req)
        self.push(req)

    def pop(self) -> Request:
        req = self.peek()
        if req is None:
            raise IndexError("pop from an empty queue")
        self.remove(req)
        return req


class HeapQueue(_Queue):
    def __init__(self, key: Callable[[Request], Any]) -> None:
        self._key = key
        self._heap: list[list] = []  # [key, push order, request | None]
        self._members: dict[Request, list] = {}  # request -> its heap entry
        self._order = itertools.count()  # a re-pushed request's stale entry never compares it

    def push(self, req: Request) -> None:
        entry = [self._key(req), next(self._order), req]
        self._members[req] = entry
        heapq.heappush(self._heap, entry)

    def remove(self, req: Request) -> None:
        self._members.pop(req)[2] = None
        # Blanks below the head are never popped: trace priorities re-rank queued requests
        # every step, and 1000 queued requests left 200k entries after 400 steps.
        if len(self._heap) > 2 * len(self._members) + 64:
            self._heap = [entry for entry in self._heap if entry[2] is not None]
            heapq.heapify(self._heap)

    def peek(self) -> Request | None:
        heap = self._heap
        while heap and heap[0][2] is None:
            heapq.heappop(heap)
        return heap[0][2] if heap else None


def _arrival_key(req: Request) -> tuple[float, int]:
    return (req.arrival_time, req.seq)


class ClientQueue(_Queue):
    """Per-client FIFOs; the head is the oldest request of the client the policy ranks first."""

    def __init__(self, client_score: Callable[[str | None], float]) -> None:
        self._client_score = client_score
        self._clients: dict[str | None, HeapQueue] = {}
        self._urgent = HeapQueue(_arrival_key)  # starving requests, whatever their client
        self._members: dict[Request, HeapQueue] = {}  # request -> the queue holding it
        self.num_queued: dict[str | None, int] = {}  # requests a client has here, starving too

    def push(self, req: Request) -> None:
        if req.starving:
            q = self._urgent
        else:
            q = self._clients.get(req.client_id)
            if q is None:
                q = self._clients[req.client_id] = HeapQueue(_arrival_key)
        q.push(req)
        self._members[req] = q
        self.num_queued[req.client_id] = self.num_queued.get(req.client_id, 0) + 1

    def remove(self, req: Request) -> None:
        q = self._members.pop(req)
        q.remove(req)
        if q is not self._urgent and not len(q):
            del self._clients[req.client_id]
        left = self.num_queued[req.client_id] - 1
        if left:
            self.num_queued[req.client_id] = left
        else:
            del self.num_queued[req.client_id]

    def peek(self) -> Request | None:
        head = self._urgent.peek()
        if head is not None:
            return head
        best = None
        for client, q in self._clients.items():
            req = q.peek()
            key = (self._client_score(client), req.arrival_time, req.seq)
            if best is None or key < best[0]:
                best = (key, req)
        return best[1] if best else None
