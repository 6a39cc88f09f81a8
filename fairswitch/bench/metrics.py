"""Latency, throughput and SLO metrics of a replay, from its RequestRecords alone.

``summarize`` returns one JSON-serializable dict; the definitions are DESIGN.md's "Metrics":
TTFT = first token - arrival; TBT = every gap between consecutive tokens of a request, pooled over
requests; TPOT = (E2E - TTFT) / (n_out - 1) over requests with two tokens or more; E2EL = end -
arrival. Percentiles interpolate linearly (numpy's default, as ``vllm bench serve`` does).

Choices the design leaves open:
- A request failed when ``not record.ok``. Failed requests are counted, left out of latency stats
  and throughput, and count as missing the SLO: attainment fractions are over *all* requests, so a
  server cannot raise its attainment by dropping requests.
- Each failed request's error is kept (``failures``): a count alone does not say what went wrong.
- Values that do not exist (no samples, zero duration, no SLO given) are None, never NaN.
- Callers add engine counters as ``summary["engine"]`` (a flat dict); the reports print it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fairswitch.bench.fairness import fairness_summary, finish_time
from fairswitch.bench.records import RequestRecord

# name -> percentile; the stats dicts hold "<name>_ms" keys plus count, mean_ms and max_ms.
PERCENTILES: dict[str, float] = {"median": 50, "p90": 90, "p95": 95, "p99": 99, "p999": 99.9}
LATENCY_METRICS = ("ttft", "tpot", "tbt", "e2el")

# Timestamps are differences of float seconds: a gap meant to equal the target can come out a
# few ulps above it. Nanoseconds are far below any clock a client reads, so they do not count.
_SLACK_S = 1e-9


def _check_positive(value: float | None, name: str) -> None:
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)
                                  and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")


@dataclass(frozen=True)
class SLO:
    """Latency targets in seconds; None = no target on that metric."""

    ttft_s: float | None = None
    tbt_s: float | None = None

    def __post_init__(self) -> None:
        _check_positive(self.ttft_s, "SLO ttft_s")
        _check_positive(self.tbt_s, "SLO tbt_s")

    @property
    def is_set(self) -> bool:
        return self.ttft_s is not None or self.tbt_s is not None

    def meets_ttft(self, rec: RequestRecord) -> bool:
        return rec.ok and (self.ttft_s is None or rec.ttft_s <= self.ttft_s + _SLACK_S)

    def meets_tbt(self, rec: RequestRecord) -> bool:
        """Every gap within the target (one slow gap is a visible stall); no gaps meets it."""
        return rec.ok and (self.tbt_s is None
                           or all(g <= self.tbt_s + _SLACK_S for g in rec.tbt_gaps_s))

    def met(self, rec: RequestRecord) -> bool:
        return self.meets_ttft(rec) and self.meets_tbt(rec)

    def check(self, rec: RequestRecord) -> tuple[bool, bool]:
        """(meets the TTFT target, meets the TBT target); a failed request meets neither."""
        return self.meets_ttft(rec), self.meets_tbt(rec)


def latency_stats(values_s: Sequence[float] | np.ndarray) -> dict[str, float | int | None]:
    """count, mean, percentiles and max of latencies given in seconds, reported in ms."""
    ms = np.asarray(values_s, dtype=float) * 1000.0
    keys = ["mean_ms", *(f"{name}_ms" for name in PERCENTILES), "max_ms"]
    if ms.size == 0:
        return {"count": 0, **dict.fromkeys(keys)}
    if not np.isfinite(ms).all():
        raise ValueError("latencies must be finite (a record holds a NaN or infinite time)")
    qs = np.percentile(ms, list(PERCENTILES.values()))
    return {"count": int(ms.size), "mean_ms": float(ms.mean()),
            **{f"{name}_ms": float(q) for name, q in zip(PERCENTILES, qs)},
            "max_ms": float(ms.max())}


def _tbt_gaps(ok: Sequence[RequestRecord]) -> np.ndarray:
    gaps = [np.diff(np.asarray(r.token_times_s, dtype=float)) for r in ok]
    return np.concatenate(gaps) if gaps else np.zeros(0)


def _fraction(num: int, den: int) -> float | None:
    return num / den if den else None


def slo_attainment(checks: Sequence[tuple[bool, bool]], slo: SLO | None,
                   num_unsent: int = 0) -> dict | None:
    """Fractions of all requests meeting each target and both, from their ``SLO.check``
    results and ``num_unsent`` requests that were never sent (turns after a failed one: each a
    miss, or failing one turn would drop the rest from the count); None without targets."""
    if slo is None or not slo.is_set:
        return None
    n = len(checks) + num_unsent
    num_met = sum(t and b for t, b in checks)
    return {
        "ttft": None if slo.ttft_s is None else _fraction(sum(t for t, _ in checks), n),
        "tbt": None if slo.tbt_s is None else _fraction(sum(b for _, b in checks), n),
        "both": _fraction(num_met, n),
        "num_met": num_met,
    }


def group_summary(records: Sequence[RequestRecord], slo: SLO | None,
                  checks: Sequence[tuple[bool, bool]] | None = None,
                  num_unsent: int = 0) -> dict:
    """Counts, token totals, latency stats and SLO attainment of one set of requests.

    ``checks`` are the records' ``slo.check`` results when the caller already has them;
    ``num_unsent``: requests of the set never sent (``slo_attainment``).
    """
    if slo is not None and slo.is_set and checks is None:
        checks = [slo.check(r) for r in records]
    ok = [r for r in records if r.ok]
    return {
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "input_tokens": sum(r.prompt_tokens for r in ok),
        "output_tokens": sum(r.output_tokens for r in ok),
        "ttft": latency_stats([r.ttft_s for r in ok]),
        "tpot": latency_stats([r.tpot_s for r in ok if r.tpot_s is not None]),
        "tbt": latency_stats(_tbt_gaps(ok)),
        "e2el": latency_stats([r.e2e_s for r in ok]),
        "slo_attainment": slo_attainment(checks or [], slo, num_unsent),
    }


def failures(records: Sequence[RequestRecord]) -> list[dict]:
    """Each failed request and why (its error; a response without tokens has none)."""
    return [{"request_id": r.request_id, "conversation_id": r.conversation_id, "turn": r.turn,
             "error": r.error or "no tokens"} for r in records if not r.ok]


def run_span(records: Sequence[RequestRecord]) -> float | None:
    """First arrival to last finish (end time, else last token); None without records."""
    if not records:
        return None
    return max(finish_time(r) for r in records) - min(r.arrival_s for r in records)


def _rate(count: float, duration_s: float | None) -> float | None:
    return count / duration_s if duration_s else None


Unsent = Mapping[tuple[int, str], int]  # (priority, client) -> a trace's turns never sent


def _split(records: Sequence[RequestRecord], key: Callable[[RequestRecord], Hashable],
           slo: SLO | None, checks: Sequence[tuple[bool, bool]] | None,
           unsent: dict[Hashable, int]) -> dict[str, dict]:
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for i, rec in enumerate(records):
        groups[key(rec)].append(i)
    for k in unsent:  # (a group may have had nothing sent at all)
        groups.setdefault(k, [])
    # JSON keys are strings; sort on the original key so priorities order numerically.
    return {str(k): group_summary([records[i] for i in groups[k]], slo,
                                  None if checks is None else [checks[i] for i in groups[k]],
                                  unsent.get(k, 0))
            for k in sorted(groups)}


def _unsent_by(unsent: Unsent, which: int) -> dict[Hashable, int]:
    """The unsent turns summed by priority (``which`` 0) or by client (1)."""
    out: dict[Hashable, int] = defaultdict(int)
    for key, n in unsent.items():
        out[key[which]] += n
    return out


def summarize(records: list[RequestRecord], duration_s: float | None = None,
              slo: SLO | None = None, window_s: float = 10.0,
              weights: dict[str, float] | None = None, unsent: Unsent | None = None) -> dict:
    """Everything a benchmark reports about one run, as a JSON-serializable dict.

    ``duration_s`` defaults to the first arrival to the last finish. No records gives zero counts
    and None for every value that needs a sample or a duration. ``unsent``: the trace's requests
    never sent (the replay's skipped turns) by (priority, client), misses in the SLO attainment
    overall and in the priority's and the client's.
    """
    unsent = unsent or {}
    _check_positive(duration_s, "duration_s")
    _check_positive(window_s, "window_s")
    duration = duration_s if duration_s is not None else run_span(records)
    duration = duration if duration else None  # a zero span has no rate
    # Checked once per request: the TBT check walks every gap, and the splits reuse the result.
    checks = [slo.check(r) for r in records] if slo is not None and slo.is_set else None
    overall = group_summary(records, slo, checks, sum(unsent.values()))
    attainment = overall["slo_attainment"]
    return {
        "num_requests": len(records),
        "completed": overall["completed"],
        "failed": overall["failed"],
        "failures": failures(records),
        "duration_s": duration,
        "total_input_tokens": overall["input_tokens"],
        "total_output_tokens": overall["output_tokens"],
        "request_throughput": _rate(overall["completed"], duration),
        "output_throughput": _rate(overall["output_tokens"], duration),
        "total_token_throughput": _rate(overall["input_tokens"] + overall["output_tokens"],
                                        duration),
        **{m: overall[m] for m in LATENCY_METRICS},
        "slo": None if attainment is None else {"ttft_s": slo.ttft_s, "tbt_s": slo.tbt_s},
        "goodput": None if attainment is None else _rate(attainment["num_met"], duration),
        "slo_attainment": attainment,
        "by_priority": _split(records, lambda r: r.priority, slo, checks, _unsent_by(unsent, 0)),
        "by_client": _split(records, lambda r: r.client, slo, checks, _unsent_by(unsent, 1)),
        "fairness": fairness_summary(records, window_s, weights),
    }
