"""Inter-arrival times of an open-loop request stream: Poisson, or gamma for bursty traffic.

A gamma renewal process with shape k = 1/cv^2 and mean gap 1/rate has gaps whose coefficient of
variation (std / mean) is cv: cv = 1 is exactly Poisson (exponential gaps), cv > 1 clusters
arrivals into bursts separated by lulls, cv < 1 is smoother than Poisson. The mean rate is the
same whatever cv, so only burstiness changes between runs that sweep it.
"""

from __future__ import annotations

import math

import numpy as np


def check_process(rate: float, cv: float = 1.0) -> None:
    """ValueError unless ``rate`` (per second) and ``cv`` are finite and > 0."""
    if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
        raise ValueError(f"arrival rate must be a finite number > 0 (per second), got {rate!r}")
    if not (isinstance(cv, (int, float)) and math.isfinite(cv) and cv > 0):
        raise ValueError(f"cv (burstiness) must be a finite number > 0, got {cv!r}")


def _check_count(n: int) -> None:
    if not (isinstance(n, int) and not isinstance(n, bool) and n >= 0):
        raise ValueError(f"the number of arrivals must be an integer >= 0, got {n!r}")


def poisson_gaps(rng: np.random.Generator, rate: float, n: int) -> np.ndarray:
    """``n`` exponential gaps (seconds) of a Poisson process at ``rate`` per second."""
    check_process(rate)
    _check_count(n)
    return rng.exponential(1.0 / rate, size=n)


def gamma_gaps(rng: np.random.Generator, rate: float, cv: float, n: int) -> np.ndarray:
    """``n`` gamma gaps (seconds): mean ``1/rate``, coefficient of variation ``cv``."""
    check_process(rate, cv)
    _check_count(n)
    shape = 1.0 / (cv * cv)
    return rng.gamma(shape, 1.0 / (rate * shape), size=n)


def arrival_times(rng: np.random.Generator, rate: float, n: int, cv: float = 1.0) -> np.ndarray:
    """Times (seconds, ascending) of the first ``n`` arrivals of a process started at 0.

    Gaps are exponential when cv == 1 (Poisson), gamma otherwise; the first arrival comes one
    gap after 0, so independent per-client streams do not all fire at once at the start.
    """
    gaps = poisson_gaps(rng, rate, n) if cv == 1 else gamma_gaps(rng, rate, cv, n)
    return np.cumsum(gaps)
