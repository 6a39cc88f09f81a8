"""Per-client service and fairness of a replay (VTC's measure; DESIGN.md "Metrics").

A client's service is ``prompt tokens x 1 + output tokens x 2`` (the weights VTC charges by
default), divided by the client's weight when one is given, so that a weight-2 client getting twice
the tokens counts as treated equally. Service is credited when the client can see it: each output
token at its token time, the prompt at the request's first token time (its prefill ran somewhere
before that, but a client cannot tell when). Tokens streamed to a request that later failed are
still credited: the engine spent the work and the client received them.

Time is cut into windows ``[t0 + k*w, t0 + (k+1)*w)`` from the first arrival to the last finish
(the final window may be partial). A client is *backlogged* in a window when one of its requests
is pending, i.e. its interval ``[arrival, finish)`` overlaps the window: a client with nothing
pending cannot be starved, so unfairness is only measured between backlogged clients. VTC's bound
(Sheng et al., OSDI'24, Thm 4.1) is stated for clients backlogged during a whole interval, so the
max difference is also reported over windows that both clients' pending intervals cover entirely
(``continuously_backlogged``): a client whose few requests end early in a window got little
service there without having been treated unfairly.
``finish`` is ``end_s``, else the last token time, else the arrival (a request that never got an
answer nor an end time has no pending interval we can trust).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fairswitch.bench.records import RequestRecord

INPUT_TOKEN_COST = 1.0
OUTPUT_TOKEN_COST = 2.0


def finish_time(rec: RequestRecord) -> float:
    if rec.end_s is not None:
        return rec.end_s
    return rec.token_times_s[-1] if rec.token_times_s else rec.arrival_s


def client_weights(clients: Sequence[str], weights: Mapping[str, float] | None) -> np.ndarray:
    """One weight per client, 1.0 for clients the mapping does not name."""
    weights = weights or {}
    for client, w in weights.items():
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0):
            raise ValueError(f"weight of client {client!r} must be finite and > 0, got {w!r}")
    return np.array([float(weights.get(c, 1.0)) for c in clients])


def jain_index(values: Sequence[float] | np.ndarray) -> float | None:
    """(sum x)^2 / (n * sum x^2): 1.0 when all equal, 1/n when one gets everything.

    None for no values or when all are zero (0/0: nobody was served, so neither fair nor unfair).
    """
    x = np.asarray(values, dtype=float)
    sq = float(np.sum(x * x))
    if x.size == 0 or sq == 0.0:
        return None
    return float(np.sum(x)) ** 2 / (x.size * sq)


@dataclass(slots=True)
class ServiceWindows:
    t0_s: float
    window_s: float
    clients: list[str]          # sorted; row order of the arrays
    service: np.ndarray         # [num_clients, num_windows] weighted service credited per window
    backlogged: np.ndarray      # [num_clients, num_windows] bool: pending at some time in it
    continuous: np.ndarray      # [num_clients, num_windows] bool: pending during all of it

    @property
    def num_windows(self) -> int:
        return self.service.shape[1]

    def window_start(self, k: int) -> float:
        return self.t0_s + k * self.window_s


def service_windows(records: Sequence[RequestRecord], window_s: float,
                    weights: Mapping[str, float] | None = None) -> ServiceWindows:
    if not (math.isfinite(window_s) and window_s > 0):
        raise ValueError(f"window_s must be finite and > 0, got {window_s}")
    clients = sorted({r.client for r in records})
    if not records:
        empty = np.zeros((0, 0), dtype=bool)
        return ServiceWindows(0.0, window_s, [], np.zeros((0, 0)), empty, empty)
    row = {c: i for i, c in enumerate(clients)}
    t0 = min(r.arrival_s for r in records)
    t_end = max(max(finish_time(r) for r in records),
                max((r.token_times_s[-1] for r in records if r.token_times_s), default=t0))
    n = max(1, math.ceil((t_end - t0) / window_s))

    def window_of(times: np.ndarray) -> np.ndarray:
        # Clipped: an event exactly at t_end (or a rounding hair past it) is in the last window.
        return np.clip(np.floor((times - t0) / window_s).astype(np.int64), 0, n - 1)

    service = np.zeros((len(clients), n))
    backlogged = np.zeros((len(clients), n), dtype=bool)
    pending: list[list[tuple[float, float]]] = [[] for _ in clients]  # [arrival, finish) each
    for rec in records:
        i = row[rec.client]
        if rec.token_times_s:
            times = np.asarray(rec.token_times_s, dtype=float)
            service[i] += np.bincount(window_of(times), minlength=n) * OUTPUT_TOKEN_COST
            service[i, window_of(times[:1])[0]] += rec.prompt_tokens * INPUT_TOKEN_COST
        fin = finish_time(rec)
        pending[i].append((rec.arrival_s, fin))
        if fin > rec.arrival_s:
            lo = int(window_of(np.array([rec.arrival_s]))[0])
            # Last window whose start lies before the finish: [arrival, finish) is half-open.
            hi = min(n - 1, math.ceil((fin - t0) / window_s) - 1)
            backlogged[i, lo:hi + 1] = True
    service /= client_weights(clients, weights)[:, None]
    continuous = np.zeros_like(backlogged)
    ends = [min(t0 + (k + 1) * window_s, t_end) for k in range(n)]  # the last may be partial
    for i, intervals in enumerate(pending):
        for lo, hi in merge_intervals(intervals):
            # Windows [t0 + k*w, t0 + (k+1)*w) that lie inside [lo, hi).
            first = math.ceil((lo - t0) / window_s)
            for k in range(max(0, first), n):
                if ends[k] > hi:
                    break
                continuous[i, k] = True
    return ServiceWindows(t0, window_s, clients, service, backlogged, continuous)


def merge_intervals(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Union of half-open intervals as disjoint ones, in order (empty ones dropped)."""
    out: list[tuple[float, float]] = []
    for lo, hi in sorted(i for i in intervals if i[1] > i[0]):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def fairness_summary(records: Sequence[RequestRecord], window_s: float,
                     weights: Mapping[str, float] | None = None) -> dict:
    """Run-level service and Jain's index, plus per-window max difference and Jain's index.

    Per window, both measures are taken over the backlogged clients only; the max difference needs
    two of them and is None otherwise, and such windows are left out of the max/mean over windows.
    """
    sw = service_windows(records, window_s, weights)
    totals = sw.service.sum(axis=1)
    windows: list[dict] = []
    diffs: list[float] = []
    jains: list[float] = []
    strict: list[float] = []  # between clients backlogged during the whole window
    for k in range(sw.num_windows):
        both = sw.service[np.flatnonzero(sw.continuous[:, k]), k]
        if both.size >= 2:
            strict.append(float(both.max() - both.min()))
        rows = np.flatnonzero(sw.backlogged[:, k])
        served = sw.service[rows, k]
        diff = float(served.max() - served.min()) if rows.size >= 2 else None
        jain = jain_index(served)
        if diff is not None:
            diffs.append(diff)
        if jain is not None:
            jains.append(jain)
        windows.append({
            "start_s": sw.window_start(k),
            "service": {c: float(sw.service[i, k]) for i, c in enumerate(sw.clients)},
            "backlogged": [sw.clients[i] for i in rows],
            "max_service_diff": diff,
            "jain": jain,
        })
    return {
        "window_s": window_s,
        "weights": {c: float(w) for c, w in zip(sw.clients, client_weights(sw.clients, weights))},
        "service": {c: float(t) for c, t in zip(sw.clients, totals)},
        "jain": jain_index(totals),
        "max_service_diff": {"max": max(diffs) if diffs else None, "mean": _mean(diffs),
                             "num_windows": len(diffs)},
        "window_jain": {"min": min(jains) if jains else None, "mean": _mean(jains),
                        "num_windows": len(jains)},
        "max_service_diff_continuous": {"max": max(strict) if strict else None,
                                        "mean": _mean(strict), "num_windows": len(strict)},
        "windows": windows,
    }
