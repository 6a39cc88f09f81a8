"""Inter-arrival times of an open-loop request stream: Poisson, or gamma for bursty traffic.

A gamma renewal process with shape k = 1/cv^2 and mean gap 1/rate has gaps whose coefficient of
variation (std / mean) is cv: cv = 1 is exactly Poisson (exponential gaps), cv > 1 clusters
arrivals into bursts separated by lulls, cv < 1 is smoother than Poisson. The mean rate is the
same whatever cv, so only burstiness changes between runs that sweep it.
"""

from __future__ import annotations

import math

import numpy as np


def _check_rate(rate: float) -> None:
    if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
        raise ValueError(f"arrival rate must be a finite number > 0 (requests/s), got {rate!r}")


def _check_count(n: int) -> None:
    if not (isinstance(n, int) and not isinstance(n, bool) and n >= 0):
        raise ValueError(f"the number of arrivals must be an integer >= 0, got {n!r}")


def poisson_gaps(rng: np.random.Generator, rate: float, n: int) -> np.ndarray:
    """``n`` exponential gaps (seconds) of a Poisson process at ``rate`` per second."""
    _check_rate(rate)
    _check_count(n)
    return rng.exponential(1.0 / rate, size=n)


def gamma_gaps(rng: np.random.Generator, rate: float, cv: float, n: int) -> np.ndarray:
    """``n`` gamma gaps (seconds): mean ``1/rate``, coefficient of variation ``cv``."""
    _check_rate(rate)
    _check_count(n)
    if not (isinstance(cv, (int, float)) and math.isfinite(cv) and cv > 0):
        raise ValueError(f"cv (burstiness) must be a finite number > 0, got {cv!r}")
    shape = 1.0 / (cv * cv)
    return rng.gamma(shape, 1.0 / (rate * shape), size=n)


def arrival_times(rng: np.random.Generator, rate: float, n: int, cv: float = 1.0) -> np.ndarray:
    """Times (seconds, ascending) of ``n`` arrivals at ``rate``/s with gap CV ``cv``.

    The first arrival is at 0 so that a replay does not open with an idle gap; the other n-1
    follow it by independent gaps (exponential when cv == 1, gamma otherwise).
    """
    _check_count(n)
    m = max(n - 1, 0)
    gaps = poisson_gaps(rng, rate, m) if cv == 1 else gamma_gaps(rng, rate, cv, m)
    return np.concatenate(([0.0], np.cumsum(gaps)))[:n]
