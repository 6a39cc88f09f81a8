"""VTC's fairness measure (Sheng et al., OSDI'24, §3 and Thm 4.3): the service difference between
two clients over every interval in which both are backlogged, and the bound VTC guarantees on it.

A client's *service curve* S(t) is the weighted service it has received by time t: prompt tokens
x ``input_weight`` credited at the request's first token, each output token x ``output_weight``
at its token time (as ``fairness.py`` credits it), divided by the client's weight. For clients a
and b and a maximal interval I in which both are backlogged, the measure is

    max over t1 < t2 in I of |(S_a(t2) - S_a(t1)) - (S_b(t2) - S_b(t1))|  =  max D - min D on I

with D = S_a - S_b, a step function that moves only at a's or b's events; so each interval costs
one pass over the events inside it (``spreads``). Windows of a fixed length that both clients are
backlogged through give the same measure per window, whose distribution says whether the worst
case is typical::

    S_a  ___/-------/-----------------
    S_b  ____________________/---/----
         |<--- I: both backlogged --->|

a is two steps ahead in the middle of I and level at its end: the measure is the two steps
(highest D - lowest D), not the difference over the whole of I (none).

*Backlogged* means that the client has a request *queued*: arrived, and its first token not yet
out. That is the setting of VTC's bound, whose proof rests on the scheduler being able to pick
the client's waiting request instead of another's. A client whose requests all run is served as
fast as its requests can go: its demand, not the scheduler, limits it, and over a long interval
any scheduler gives it less than a client with a queue. (A preempted request waiting to resume
is not seen: records hold token times only.) The difference between clients merely *pending*,
a request queued or running until it finishes, is measured too (``queued=False``); the bound is
not about it. Intervals are cut at the end of the run.

VTC's bound (Thm 4.3): for backlogged clients, the difference is at most
``2 x max(input_weight x L_input, output_weight x M)``, L_input the longest input and M the most
tokens a batch can hold; here M is the engine's KV capacity in tokens, capped by what
``max_num_seqs`` requests of ``max_model_len`` tokens can hold. Weighted clients' counters move
by cost / weight, so the bound on weighted service is divided by the smallest weight.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from fairswitch.bench.fairness import (
    INPUT_TOKEN_COST,
    OUTPUT_TOKEN_COST,
    client_weights,
    finish_time,
    merge_intervals,
)
from fairswitch.bench.records import RequestRecord


@dataclass(slots=True)
class ServiceCurve:
    times: np.ndarray    # ascending event times (s)
    service: np.ndarray  # cumulative service after each event

    def at(self, t: np.ndarray | float) -> np.ndarray:
        """S(t), events at t included."""
        return self._after(np.searchsorted(self.times, t, side="right"))

    def before(self, t: np.ndarray | float) -> np.ndarray:
        """S just before t (events at t left out)."""
        return self._after(np.searchsorted(self.times, t, side="left"))

    def _after(self, num_events: np.ndarray) -> np.ndarray:
        """The service of the first ``num_events`` events."""
        return np.concatenate(([0.0], self.service))[num_events]


def service_curves(records: Sequence[RequestRecord], until_s: float | None = None, *,
                   input_weight: float = INPUT_TOKEN_COST,
                   output_weight: float = OUTPUT_TOKEN_COST,
                   weights: Mapping[str, float] | None = None) -> dict[str, ServiceCurve]:
    """Each client's service curve from the records (events after ``until_s`` left out)."""
    clients = sorted({r.client for r in records})
    divide = dict(zip(clients, client_weights(clients, weights)))
    events: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {c: [] for c in clients}
    for rec in records:
        if not rec.token_times_s:
            continue
        t = np.asarray(rec.token_times_s, dtype=float)
        cost = np.full(t.size, output_weight)
        cost[0] += input_weight * rec.prompt_tokens
        events[rec.client].append((t, cost))
    curves = {}
    for client, parts in events.items():
        t = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0)
        cost = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0)
        if until_s is not None:
            t, cost = t[t <= until_s], cost[t <= until_s]
        order = np.argsort(t, kind="stable")
        curves[client] = ServiceCurve(t[order], np.cumsum(cost[order]) / divide[client])
    return curves


def backlog_intervals(records: Sequence[RequestRecord], until_s: float | None = None, *,
                      queued: bool = True) -> dict[str, np.ndarray]:
    """Per client, the disjoint ``[lo, hi)`` (rows of an [n, 2] array, in order) in which one of
    its requests is queued (from its arrival to its first token), or with ``queued=False``
    pending (to its finish); cut at ``until_s``."""
    intervals: dict[str, list[tuple[float, float]]] = {}
    for rec in records:
        hi = finish_time(rec)
        if queued and rec.token_times_s:
            hi = min(hi, rec.token_times_s[0])
        if until_s is not None:
            hi = min(hi, until_s)
        intervals.setdefault(rec.client, []).append((rec.arrival_s, hi))
    return {c: np.array(merge_intervals(v), dtype=float).reshape(-1, 2)
            for c, v in sorted(intervals.items())}


def overlaps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The intersections of two sorted lists of disjoint intervals (rows ``[lo, hi)``)."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i, 0], b[j, 0]), min(a[i, 1], b[j, 1])
        if lo < hi:
            out.append((lo, hi))
        if a[i, 1] < b[j, 1]:
            i += 1
        else:
            j += 1
    return np.array(out, dtype=float).reshape(-1, 2)


def spreads(a: ServiceCurve, b: ServiceCurve, intervals: np.ndarray) -> np.ndarray:
    """max D - min D on each interval (rows [lo, hi], sorted, disjoint), D = S_a - S_b, from its
    value just before lo through every event of a or b in [lo, hi]."""
    if len(intervals) == 0:
        return np.zeros(0)
    lo, hi = intervals[:, 0], intervals[:, 1]
    base = a.before(lo) - b.before(lo)
    times = np.union1d(a.times, b.times)
    d = np.append(a.at(times) - b.at(times), 0.0)  # a dummy last, so reduceat takes len(times)
    start = np.searchsorted(times, lo, side="left")
    end = np.searchsorted(times, hi, side="right")
    top, bottom = base.copy(), base.copy()
    has = end > start
    if has.any():
        # reduceat over [start_k, end_k) and the gaps between: the even results are the intervals.
        bounds = np.stack([start[has], end[has]], axis=1).ravel()
        top[has] = np.maximum(top[has], np.maximum.reduceat(d, bounds)[::2])
        bottom[has] = np.minimum(bottom[has], np.minimum.reduceat(d, bounds)[::2])
    return top - bottom


def full_windows(intervals: np.ndarray, window_s: float, t0: float = 0.0) -> np.ndarray:
    """Indices k of the windows ``[t0 + k*w, t0 + (k+1)*w)`` lying inside one of the intervals."""
    ks = [np.arange(np.ceil((lo - t0) / window_s), np.floor((hi - t0) / window_s))
          for lo, hi in intervals]
    return np.concatenate(ks).astype(np.int64) if ks else np.zeros(0, dtype=np.int64)


def vtc_bound(input_weight: float, output_weight: float, longest_input: int,
              batch_tokens: int, min_client_weight: float = 1.0) -> float:
    """VTC's bound on the service difference of two backlogged clients (Thm 4.3)."""
    return 2.0 * max(input_weight * longest_input, output_weight * batch_tokens) \
        / min_client_weight


@dataclass(slots=True)
class PairDiff:
    clients: tuple[str, str]
    start_s: float
    end_s: float
    diff: float


def backlogged_differences(curves: Mapping[str, ServiceCurve],
                           backlog: Mapping[str, np.ndarray]) -> list[PairDiff]:
    """The measure for every pair of clients and every interval both are backlogged in."""
    out = []
    for a, b in combinations(sorted(backlog), 2):
        both = overlaps(backlog[a], backlog[b])
        empty = ServiceCurve(np.zeros(0), np.zeros(0))
        for (lo, hi), diff in zip(both, spreads(curves.get(a, empty), curves.get(b, empty),
                                                both)):
            out.append(PairDiff((a, b), float(lo), float(hi), float(diff)))
    return out


def window_differences(curves: Mapping[str, ServiceCurve], backlog: Mapping[str, np.ndarray],
                       window_s: float, t0: float = 0.0) -> dict[int, float]:
    """Per window both clients of some pair are backlogged through: the largest measure over
    such pairs, inside the window."""
    if not window_s > 0:
        raise ValueError(f"window_s must be > 0, got {window_s}")
    empty = ServiceCurve(np.zeros(0), np.zeros(0))
    worst: dict[int, float] = {}
    for a, b in combinations(sorted(backlog), 2):
        ks = full_windows(overlaps(backlog[a], backlog[b]), window_s, t0)
        windows = np.stack([t0 + ks * window_s, t0 + (ks + 1) * window_s], axis=1)
        for k, diff in zip(ks.tolist(), spreads(curves.get(a, empty), curves.get(b, empty),
                                                 windows)):
            worst[k] = max(worst.get(k, 0.0), float(diff))
    return dict(sorted(worst.items()))


def service_ratio(a: ServiceCurve, b: ServiceCurve, intervals: np.ndarray) -> float | None:
    """Service a got over b's, summed over the intervals (rows [lo, hi]); None if b got none."""
    if len(intervals) == 0:
        return None
    lo, hi = intervals[:, 0], intervals[:, 1]
    got_a = float(np.sum(a.at(hi) - a.before(lo)))
    got_b = float(np.sum(b.at(hi) - b.before(lo)))
    return got_a / got_b if got_b > 0 else None
