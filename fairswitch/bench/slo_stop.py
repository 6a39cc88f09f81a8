"""Stopping a replay once its latency targets are certain to be missed.

A capacity search replays the same trace at many loads; above the capacity the queue grows and a
replay can run for minutes after its outcome is settled. ``SloStop`` watches the records while
the replay runs and names the reason once the outcome is settled: a request failed, or so many
requests are over a target that the run's quantile (P99) is over it whatever the remaining
requests do. It never stops a run that could still pass.

The quantile is numpy's default (linear interpolation), as ``metrics.summarize`` computes it.
Of n values, the q-quantile is certainly above a limit once ``misses_needed(n, q)`` of them are:
those fill the sorted positions from ``floor(q (n - 1))`` up, and interpolation cannot bring the
quantile below the value at that position. A request still waiting for its first token counts
as a TTFT miss once it has waited longer than the target; TPOT is known when a request ends.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from fairswitch.bench.records import RequestRecord


def misses_needed(n: int, q: float) -> int:
    """The fewest of ``n`` values over a limit that put their ``q``-quantile over it."""
    if n < 1 or not 0.0 < q < 1.0:
        raise ValueError(f"need n >= 1 and 0 < q < 1, got {n}, {q}")
    return n - math.floor(q * (n - 1))


class SloStop:
    """``stop_when`` for ``ReplayOptions``: a replay of ``num_requests`` requests whose
    ``quantile`` TTFT must stay within ``ttft_slo_s`` and TPOT within ``tpot_slo_s`` (None: no
    TPOT target). Counting against ``num_requests``, the whole trace, is safe for TPOT too: a
    quantile over fewer values needs no more misses (``misses_needed`` grows with n)."""

    def __init__(self, num_requests: int, ttft_slo_s: float, tpot_slo_s: float | None = None,
                 quantile: float = 0.99) -> None:
        if not ttft_slo_s > 0 or (tpot_slo_s is not None and not tpot_slo_s > 0):
            raise ValueError(f"SLOs must be > 0, got TTFT {ttft_slo_s}, TPOT {tpot_slo_s}")
        self.need = misses_needed(num_requests, quantile)
        self.ttft_slo_s, self.tpot_slo_s, self.quantile = ttft_slo_s, tpot_slo_s, quantile

    def __call__(self, records: Sequence[RequestRecord], now: float) -> str | None:
        """Why the run has already missed its targets, or None while it still can pass."""
        ttft_misses = tpot_misses = 0
        for r in records:
            if r.error is not None:
                return f"request {r.request_id} failed: {r.error}"
            if r.token_times_s:
                ttft_misses += r.token_times_s[0] - r.arrival_s > self.ttft_slo_s
            else:
                ttft_misses += now - r.arrival_s > self.ttft_slo_s
            if self.tpot_slo_s is not None and r.end_s is not None:
                tpot = r.tpot_s
                tpot_misses += tpot is not None and tpot > self.tpot_slo_s
        p = f"P{self.quantile * 100:g}"
        if ttft_misses >= self.need:
            return (f"{ttft_misses} requests over the TTFT target of {self.ttft_slo_s * 1e3:g} "
                    f"ms: the run's {p} TTFT is over it")
        if tpot_misses >= self.need:
            return (f"{tpot_misses} requests over the TPOT target of {self.tpot_slo_s * 1e3:g} "
                    f"ms: the run's {p} TPOT is over it")
        return None
