"""When conversations arrive, from which client, at which priority, and how long users think.

Applies to any list of conversations (ShareGPT or synthetic): each client is an independent
arrival process (Poisson or gamma) at its share of the total rate, and the conversations, in the
order given, take the merged arrivals one by one; so a client's share of the trace is its share
of the rate, as in VTC's experiments with unequal client rates. Priorities are static classes
drawn per conversation; runtime priority *changes* are the scheduler's ``trace`` policy, and
``priority_update_config`` only records the settings for it (no second mechanism here).

``timed_arrivals`` is the other way round: every arrival of each client's stream over a stated
time, Poisson at the client's rate while it is on (``OnOff``: clients that join and leave), for
workloads whose load is a rate held for a duration rather than a number of conversations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from fairswitch.bench.trace import Conversation
from fairswitch.config import SchedulerConfig
from workloads.arrivals import arrival_times, check_process
from workloads.dists import Dist, stream_rng

_ARRIVALS, _THINK, _PRIORITY = 1, 2, 3  # stream_rng keys: one generator per purpose


def parse_client_rates(spec: str) -> tuple[float, ...]:
    """``"4,2,1,1"`` -> relative rates of clients 0..3 (any positive numbers)."""
    try:
        rates = tuple(float(x) for x in spec.split(","))
    except ValueError:
        raise ValueError(f"bad client rates {spec!r}: expected numbers like 4,2,1,1") from None
    if not all(math.isfinite(r) and r > 0 for r in rates):
        raise ValueError(f"bad client rates {spec!r}: each must be finite and > 0")
    return rates


def parse_priority_classes(spec: str) -> tuple[tuple[int, float], ...]:
    """``"0:0.2,1:0.8"`` -> ((class, probability), ...); the probabilities must sum to 1."""
    classes: list[tuple[int, float]] = []
    for item in spec.split(","):
        level, sep, prob = item.partition(":")
        try:
            classes.append((int(level), float(prob)))
        except ValueError:
            raise ValueError(f"bad priority class {item!r} in {spec!r}: expected CLASS:PROB, "
                             "e.g. 0:0.2,1:0.8") from None
        if not sep:
            raise ValueError(f"bad priority class {item!r} in {spec!r}: expected CLASS:PROB")
    levels = [c for c, _ in classes]
    if len(set(levels)) != len(levels):
        raise ValueError(f"bad priority classes {spec!r}: a class is listed twice")
    if not all(math.isfinite(p) and p >= 0 for _, p in classes):
        raise ValueError(f"bad priority classes {spec!r}: probabilities must be >= 0")
    if abs(sum(p for _, p in classes) - 1.0) > 1e-6:
        raise ValueError(f"bad priority classes {spec!r}: probabilities sum to "
                         f"{sum(p for _, p in classes):g}, not 1")
    return tuple(classes)


@dataclass(frozen=True, slots=True)
class Timing:
    rate: float  # first turns per second, all clients together
    cv: float = 1.0  # of the inter-arrival gaps: 1 = Poisson, > 1 burstier (gamma)
    think: Dist = field(default_factory=lambda: Dist("fixed", (0.0,)))  # seconds between turns
    client_rates: tuple[float, ...] = (1.0,)  # relative: client i gets rate * r_i / sum(r)
    priority_classes: tuple[tuple[int, float], ...] = ((0, 1.0),)

    def __post_init__(self) -> None:
        check_process(self.rate, self.cv)
        if not self.client_rates or not all(math.isfinite(r) and r > 0 for r in self.client_rates):
            raise ValueError(f"client rates must be finite and > 0, got {self.client_rates}")
        if not self.priority_classes or sum(p for _, p in self.priority_classes) <= 0:
            raise ValueError(f"priority classes need a positive probability, "
                             f"got {self.priority_classes}")


def client_name(i: int) -> str:
    return f"client-{i}"


def apply_timing(conversations: list[Conversation], timing: Timing,
                 seed: int) -> list[Conversation]:
    """Copies with arrival_s, client, priority and think_s set, sorted by arrival."""
    n = len(conversations)
    total = sum(timing.client_rates)
    times, owners = [], []
    for i, share in enumerate(timing.client_rates):
        # Each client alone could supply all n arrivals; the first n of the merge are kept.
        rng = stream_rng(seed, _ARRIVALS, i)
        times.append(arrival_times(rng, timing.rate * share / total, n, timing.cv))
        owners.append(np.full(n, i))
    all_times, all_owners = np.concatenate(times), np.concatenate(owners)
    first = np.argsort(all_times, kind="stable")[:n]
    if n:  # the replay starts with the first arrival rather than an idle gap
        all_times -= all_times[first[0]]
    levels = [c for c, _ in timing.priority_classes]
    probs = np.array([p for _, p in timing.priority_classes])
    priorities = stream_rng(seed, _PRIORITY).choice(levels, size=n, p=probs / probs.sum())
    think_rng = stream_rng(seed, _THINK)
    out = []
    for conv, k, prio in zip(conversations, first, priorities):
        think = timing.think.sample(think_rng, len(conv.turns))
        think[0] = 0.0  # the first turn follows the arrival, not an answer
        turns = [replace(t, think_s=round(float(s), 6)) for t, s in zip(conv.turns, think)]
        out.append(replace(conv, turns=turns, arrival_s=round(float(all_times[k]), 6),
                           client=client_name(int(all_owners[k])), priority=int(prio)))
    out.sort(key=lambda c: (c.arrival_s, c.id))
    return out


def priority_update_config(pattern: str, prob: float, num_levels: int, seed: int,
                           classes: tuple[tuple[int, float], ...]) -> dict[str, object] | None:
    """SchedulerConfig fields that replay runtime priority updates; None for ``pattern`` none.

    Validated by SchedulerConfig itself, so a trace never records settings the engine refuses.
    """
    if pattern == "none":
        return None
    fields = {"policy": "trace", "priority_updates": pattern, "priority_update_prob": prob,
              "num_priority_levels": num_levels, "priority_update_seed": seed}
    SchedulerConfig(**fields)  # raises ValueError naming the bad value
    outside = [c for c, _ in classes if not 0 <= c < num_levels]
    if outside:
        raise ValueError(f"priority classes {outside} are outside the {num_levels} levels "
                         f"0..{num_levels - 1} that priority updates move between")
    return fields


@dataclass(frozen=True, slots=True)
class OnOff:
    """A client that sends only while on: during ``[phase + k*(on + off), phase + k*(on + off) +
    on)`` for every integer k (so with a phase it may start in the middle of an off period)."""

    on_s: float
    off_s: float
    phase_s: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.on_s) and self.on_s > 0 and math.isfinite(self.off_s)
                and self.off_s >= 0 and math.isfinite(self.phase_s)):
            raise ValueError(f"on/off periods must be finite, on > 0 and off >= 0, got {self}")

    @property
    def duty(self) -> float:
        """The fraction of the time the client is on."""
        return self.on_s / (self.on_s + self.off_s)

    def is_on(self, times: np.ndarray) -> np.ndarray:
        return np.mod(np.asarray(times, dtype=float) - self.phase_s,
                      self.on_s + self.off_s) < self.on_s


def timed_arrivals(rates: Sequence[float], duration_s: float, seed: int,
                   on_off: Sequence[OnOff | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(times, client index) of every arrival in ``[0, duration_s)``, ascending: client i is a
    Poisson stream at ``rates[i]`` per second while it is on (``on_off[i]``; None: always on).

    A Poisson process over an interval is a Poisson number of points placed uniformly; thinning
    it to the on periods keeps it Poisson there. Each client draws from its own generator, so
    adding a client does not move the others' arrivals.
    """
    if not (math.isfinite(duration_s) and duration_s > 0):
        raise ValueError(f"duration_s must be finite and > 0, got {duration_s}")
    on_off = list(on_off) if on_off is not None else [None] * len(rates)
    if len(on_off) != len(rates):
        raise ValueError(f"{len(rates)} rates but {len(on_off)} on/off patterns")
    times, owners = [np.zeros(0)], [np.zeros(0, dtype=np.int64)]
    for i, (rate, pattern) in enumerate(zip(rates, on_off)):
        check_process(rate)
        rng = stream_rng(seed, _ARRIVALS, i)
        t = np.sort(rng.uniform(0.0, duration_s, size=rng.poisson(rate * duration_s)))
        if pattern is not None:
            t = t[pattern.is_on(t)]
        times.append(t)
        owners.append(np.full(t.size, i, dtype=np.int64))
    all_times, all_owners = np.concatenate(times), np.concatenate(owners)
    order = np.argsort(all_times, kind="stable")
    return all_times[order], all_owners[order]
