"""The figures of one timed fairness run (benchmarks/fairness_bench.py), JSON-ready.

Everything is measured over ``[0, until_s]``, the run being cut there: throughput is what was
delivered in it over its length; a request with no first token by ``until_s`` has its TTFT
counted as ``until_s - arrival`` (a lower bound: it is *censored*, and counted as such).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fairswitch.bench.metrics import latency_stats
from fairswitch.bench.records import RequestRecord
from fairswitch.bench.service_diff import (
    backlog_intervals,
    backlogged_differences,
    overlaps,
    service_curves,
    service_ratio,
    window_differences,
)


def ttft_summary(records: Sequence[RequestRecord], until_s: float) -> dict[str, Any]:
    """TTFT stats (ms) with censored requests counted at ``until_s - arrival``."""
    ttfts, censored = [], 0
    for r in records:
        if r.token_times_s and r.token_times_s[0] <= until_s:
            ttfts.append(r.token_times_s[0] - r.arrival_s)
        else:
            ttfts.append(until_s - r.arrival_s)
            censored += 1
    return {**latency_stats(ttfts), "num_censored": censored}


def distribution(values: Sequence[float]) -> dict[str, float | int | None]:
    if not values:
        return {"count": 0, "p50": None, "p90": None, "max": None}
    p50, p90 = np.percentile(values, [50, 90])
    return {"count": len(values), "p50": float(p50), "p90": float(p90), "max": float(max(values))}


def run_figures(records: Sequence[RequestRecord], until_s: float, *, input_weight: float,
                output_weight: float, weights: Mapping[str, float] | None, window_s: float,
                bound: float, light_clients: Sequence[str] = (),
                grid_s: float = 1.0) -> dict[str, Any]:
    """Throughput, the backlogged-interval difference (worst case, against ``bound``; and between
    merely pending clients), its per-window distribution, TTFT (light clients, every client) and
    the service curves sampled every ``grid_s`` (unweighted: what each client got)."""
    cost = {"input_weight": input_weight, "output_weight": output_weight}
    curves = service_curves(records, until_s, weights=weights, **cost)
    raw = service_curves(records, until_s, **cost)
    backlog = backlog_intervals(records, until_s)
    diffs = backlogged_differences(curves, backlog)
    worst = max(diffs, key=lambda d: d.diff, default=None)
    windows = window_differences(curves, backlog, window_s)
    pending = backlogged_differences(curves, backlog_intervals(records, until_s, queued=False))
    grid = np.arange(0.0, until_s + grid_s / 2, grid_s)
    output_tokens = sum(sum(1 for t in r.token_times_s if t <= until_s) for r in records)
    by_client: dict[str, list[RequestRecord]] = {}
    for r in records:
        by_client.setdefault(r.client, []).append(r)
    light_set = set(light_clients)
    light = [r for r in records if r.client in light_set]
    return {
        "num_requests": len(records),
        "num_finished": sum(1 for r in records if r.ok),
        "output_tok_s": output_tokens / until_s,
        "service_per_s": sum(float(c.at(until_s)) for c in raw.values()) / until_s,
        "service": {c: float(curve.at(until_s)) for c, curve in raw.items()},
        "max_backlogged_diff": None if worst is None else worst.diff,
        "max_backlogged_diff_vs_bound": None if worst is None else worst.diff / bound,
        "worst_interval": None if worst is None else {
            "clients": list(worst.clients), "start_s": worst.start_s, "end_s": worst.end_s},
        "num_backlogged_intervals": len(diffs),
        # The same between clients with a request queued *or running* (not VTC's setting).
        "max_pending_diff": max((d.diff for d in pending), default=None),
        "window_diff": distribution(list(windows.values())),
        "window_diffs": {str(k): v for k, v in windows.items()},
        "light_clients": list(light_clients),
        "light_ttft": ttft_summary(light, until_s) if light else None,
        "ttft_by_client": {c: ttft_summary(rs, until_s) for c, rs in sorted(by_client.items())},
        "service_curves": {"t_s": grid.tolist(),
                           **{c: curve.at(grid).tolist() for c, curve in raw.items()}},
    }


def weighted_ratio(records: Sequence[RequestRecord], until_s: float, heavy: str, light: str,
                   *, input_weight: float, output_weight: float) -> float | None:
    """Service ``heavy`` got over ``light``'s while both were backlogged (unweighted)."""
    raw = service_curves(records, until_s, input_weight=input_weight,
                         output_weight=output_weight)
    backlog = backlog_intervals(records, until_s)
    if heavy not in raw or light not in raw:
        return None
    return service_ratio(raw[heavy], raw[light], overlaps(backlog[heavy], backlog[light]))
