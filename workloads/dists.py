"""Seeded distributions named by short specs, for token lengths, turn counts and think times.

Specs (what a command line takes, and what trace_meta records)::

    fixed:V              always V
    uniform:LO,HI        uniform on [LO, HI] (integers: each of LO..HI equally likely)
    exponential:MEAN     exponential with that mean
    lognormal:MEDIAN,SIGMA  exp(N(ln MEDIAN, SIGMA^2)): long-tailed, like real prompt lengths

All values are >= 0; integer samples are rounded and clipped to the caller's [lo, hi].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

def stream_rng(seed: int, *keys: int) -> np.random.Generator:
    """An independent generator per (seed, purpose): changing how think times are drawn must not
    move the arrivals of the same seed."""
    return np.random.default_rng([seed, *keys])


_ARITY = {"fixed": 1, "uniform": 2, "exponential": 1, "lognormal": 2}


@dataclass(frozen=True, slots=True)
class Dist:
    kind: str
    params: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.kind not in _ARITY:
            raise ValueError(f"unknown distribution {self.kind!r} (known: {', '.join(_ARITY)})")
        if len(self.params) != _ARITY[self.kind]:
            raise ValueError(f"{self.kind} takes {_ARITY[self.kind]} parameter(s), "
                             f"got {len(self.params)}")
        if not all(math.isfinite(p) and p >= 0 for p in self.params):
            raise ValueError(f"{self}: parameters must be finite and >= 0")
        if self.kind == "uniform" and self.params[0] > self.params[1]:
            raise ValueError(f"{self}: LO must be <= HI")
        if self.kind in ("exponential", "lognormal") and self.params[0] <= 0:
            raise ValueError(f"{self}: the mean / median must be > 0")

    def __str__(self) -> str:
        return f"{self.kind}:{','.join(f'{p:g}' for p in self.params)}"

    @property
    def mean(self) -> float:
        a = self.params[0]
        if self.kind == "uniform":
            return (a + self.params[1]) / 2
        if self.kind == "lognormal":
            return a * math.exp(self.params[1] ** 2 / 2)
        return a

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` float samples."""
        p = self.params
        if self.kind == "fixed":
            return np.full(n, p[0], dtype=np.float64)
        if self.kind == "uniform":
            return rng.uniform(p[0], p[1], size=n)
        if self.kind == "exponential":
            return rng.exponential(p[0], size=n)
        return rng.lognormal(math.log(p[0]), p[1], size=n)

    def sample_int(self, rng: np.random.Generator, n: int, lo: int = 1,
                   hi: int | None = None) -> np.ndarray:
        """``n`` integer samples, clipped to [lo, hi]."""
        if self.kind == "uniform":
            # Rounding a continuous uniform would give the two end values half the weight.
            a, b = math.ceil(self.params[0]), math.floor(self.params[1])
            if a > b:
                raise ValueError(f"{self}: holds no integer")
            values = rng.integers(a, b + 1, size=n)
        else:  # clipped as floats: a sample past int64 would wrap to its lowest value
            values = np.rint(self.sample(rng, n))
            return np.clip(values, lo, hi if hi is not None else 2.0 ** 62).astype(np.int64)
        return np.clip(values, lo, hi if hi is not None else np.iinfo(np.int64).max)


def parse_dist(spec: str) -> Dist:
    """``"lognormal:256,0.8"`` -> Dist; a bare number means ``fixed``."""
    kind, sep, rest = spec.strip().partition(":")
    if not sep:
        kind, rest = "fixed", spec
    try:
        params = tuple(float(x) for x in rest.split(","))
    except ValueError:
        raise ValueError(f"bad distribution {spec!r}: parameters must be numbers") from None
    try:
        return Dist(kind.strip().lower(), params)
    except ValueError as e:
        raise ValueError(f"bad distribution {spec!r}: {e}") from None
