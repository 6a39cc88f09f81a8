"""fairswitch.bench.slo_stop: when a replay has certainly missed its P99 targets."""

from __future__ import annotations

import numpy as np
import pytest

from fairswitch.bench.records import RequestRecord
from fairswitch.bench.slo_stop import SloStop, misses_needed


@pytest.mark.parametrize("q", [0.5, 0.9, 0.99])
def test_misses_needed_is_exact_for_numpys_quantile(q):
    for n in range(1, 400):
        k = misses_needed(n, q)
        assert 1 <= k <= n
        # k values just over the limit (1.0) put the quantile over it, whatever the rest are...
        assert np.percentile([0.0] * (n - k) + [1.0 + 1e-9] * k, q * 100) > 1.0
        # ... and k - 1 do not always: with the rest at 0 the quantile stays within it.
        assert np.percentile([0.0] * (n - k + 1) + [1.0 + 1e-9] * (k - 1), q * 100) <= 1.0
        assert misses_needed(n + 1, q) >= k  # never fewer for more values
    with pytest.raises(ValueError):
        misses_needed(0, q)
    with pytest.raises(ValueError):
        misses_needed(10, 1.0)


def rec(i: int, arrival: float, tokens: list[float], end: float | None = None,
        error: str | None = None) -> RequestRecord:
    return RequestRecord(f"r{i}", f"c{i}", 0, "default", 0, arrival, token_times_s=tokens,
                         end_s=end, error=error)


def test_ttft_misses_count_requests_still_waiting():
    stop = SloStop(100, ttft_slo_s=2.0)  # P99 of 100 values: 2 misses settle it
    assert stop.need == 2
    late = rec(0, 0.0, [3.0])            # first token after 3 s: one miss
    waiting = rec(1, 1.0, [])            # no token yet
    on_time = [rec(i, 0.0, [0.5, 0.6], end=0.6) for i in range(2, 50)]
    assert stop([late, waiting, *on_time], now=2.9) is None   # waited 1.9 s: not yet a miss
    reason = stop([late, waiting, *on_time], now=3.1)
    assert reason is not None and "2 requests over the TTFT target of 2000 ms" in reason
    assert stop([rec(0, 0.0, [3.0]), rec(1, 0.0, [1.0])], now=10.0) is None


def test_tpot_misses_count_finished_requests_and_a_failure_stops_at_once():
    stop = SloStop(100, ttft_slo_s=2.0, tpot_slo_s=0.1)
    slow = [rec(i, 0.0, [0.1, 0.4, 0.7], end=0.7) for i in range(2)]  # TPOT 0.3 s
    running = rec(2, 0.0, [0.1, 0.5])   # slow so far, but its TPOT is known only at its end
    assert stop([slow[0], running], now=1.0) is None
    assert "TPOT target of 100 ms" in stop([*slow, running], now=1.0)
    assert SloStop(100, ttft_slo_s=2.0)([*slow], now=1.0) is None  # no TPOT target
    failed = rec(3, 0.0, [], end=0.1, error="ValueError: too long")
    assert "r3 failed: ValueError: too long" in stop([failed], now=0.2)
    with pytest.raises(ValueError):
        SloStop(100, ttft_slo_s=0.0)
