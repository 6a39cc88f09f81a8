"""The fairness benchmark's workloads (VTC's, Sheng et al., OSDI'24 §5), at a load set in units
of the engine's capacity.

A workload is a set of clients, each with a share of the offered load (and optionally on/off
periods and a VTC weight), and a family of request lengths. ``build_trace(w, total_rps, ...)``
gives single-turn requests arriving over a stated duration, Poisson per client, such that the
time-averaged total rate is ``total_rps``: the benchmark passes ``load x capacity``, capacity being
the request rate the engine sustains on the same lengths (``probe_trace`` makes the requests
that measure it).

    rates-1-2, rates-1-4   two clients at constant rates 1:2 / 1:4
    rates-4-2-1-1          four clients 4:2:1:1 (light clients appear below 2x capacity)
    sharegpt-onoff-8       eight clients with ShareGPT lengths: client-0..3 always on at 4:2:1:1,
                           client-4..7 at 4:2:1:1 while on, 30 s on / 30 s off, phases 0/15/30/45 s
                           (clients leave and come back: VTC's counter lift at work)
    weighted-2-1           two clients at equal rates, VTC weights 2:1

Lengths: ``synthetic`` is 256 input and 256 output tokens per request (random one-token words,
so no two prompts share a KV block); ``sharegpt`` draws (prompt, reply) pairs from
``traces/sharegpt_pairs.jsonl``, each prompt prefixed with its request number so that a pair
drawn twice shares no prefix. Both are clipped to ``max_input_tokens`` / ``max_output_tokens``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from fairswitch.bench.trace import Conversation, Trace, Turn
from workloads.dists import stream_rng
from workloads.sharegpt import DEFAULT_PAIRS_TRACE, read_pairs_trace
from workloads.streams import OnOff, client_name, timed_arrivals
from workloads.synthetic import make_texts, word_pool
from workloads.tokens import clip_texts, count_tokens, load_tokenizer

SYNTHETIC_TOKENS = (256, 256)  # (input, output) of every synthetic request
_LENGTHS_STREAM = 20  # stream_rng key (streams.py uses 1..3, synthetic.py 10)


@dataclass(frozen=True, slots=True)
class ClientLoad:
    share: float                 # of the time-averaged total rate (relative to the other clients)
    on_off: OnOff | None = None  # None: always on
    weight: float = 1.0          # VTC client weight

    def __post_init__(self) -> None:
        if not (math.isfinite(self.share) and self.share > 0
                and math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"share and weight must be finite and > 0, got {self}")


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    clients: tuple[ClientLoad, ...]
    lengths: str  # "synthetic" or "sharegpt"

    @property
    def client_names(self) -> list[str]:
        return [client_name(i) for i in range(len(self.clients))]

    @property
    def weights(self) -> dict[str, float]:
        return {c: load.weight for c, load in zip(self.client_names, self.clients)}

    @property
    def weights_spec(self) -> str | None:
        """``--client-weights`` for the engine; None when every weight is 1."""
        if all(load.weight == 1.0 for load in self.clients):
            return None
        return ",".join(f"{c}={w:g}" for c, w in self.weights.items())

    def rates(self, total_rps: float) -> list[float]:
        """Each client's rate while on, so that the time-averaged total is ``total_rps``."""
        total_share = sum(c.share for c in self.clients)
        return [total_rps * c.share / total_share / (c.on_off.duty if c.on_off else 1.0)
                for c in self.clients]

    def demands(self, load: float) -> list[float]:
        """Time-averaged offered load per client, in units of the engine's capacity."""
        total_share = sum(c.share for c in self.clients)
        return [load * c.share / total_share for c in self.clients]

    def light_clients(self, load: float) -> list[str]:
        """Clients whose demand a weighted max-min fair share would meet in full: they should
        not be backlogged for long, and their TTFT is what fairness protects."""
        weights = [c.weight for c in self.clients]
        level = fair_level(self.demands(load), weights)
        return [name for name, d, w in zip(self.client_names, self.demands(load), weights)
                if d < level * w * (1 - 1e-9)]


WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    Workload("rates-1-2", (ClientLoad(1), ClientLoad(2)), "synthetic"),
    Workload("rates-1-4", (ClientLoad(1), ClientLoad(4)), "synthetic"),
    Workload("rates-4-2-1-1", tuple(ClientLoad(s) for s in (4, 2, 1, 1)), "synthetic"),
    Workload("sharegpt-onoff-8",
             tuple(ClientLoad(s) for s in (4, 2, 1, 1))
             + tuple(ClientLoad(s * 0.5, OnOff(30.0, 30.0, phase)) for s, phase in
                     zip((4, 2, 1, 1), (0.0, 15.0, 30.0, 45.0))), "sharegpt"),
    Workload("weighted-2-1", (ClientLoad(1, weight=2.0), ClientLoad(1, weight=1.0)),
             "synthetic"),
)}


def fair_level(demands: list[float], weights: list[float], capacity: float = 1.0) -> float:
    """Weighted max-min fair share (water-filling): the level L with sum(min(d_i, L w_i)) =
    capacity; client i gets min(d_i, L w_i). Infinite when the demands fit the capacity."""
    if sum(demands) <= capacity:
        return math.inf
    left, level = capacity, 0.0
    active = sorted(range(len(demands)), key=lambda i: demands[i] / weights[i])
    while active:
        i = active[0]
        level = left / sum(weights[j] for j in active)
        if demands[i] / weights[i] >= level:
            return level
        left -= demands[i]
        active.pop(0)
    return level


@dataclass(frozen=True, slots=True)
class LengthLimits:
    max_input_tokens: int = 1024
    max_output_tokens: int = 512


def request_texts(lengths: str, num: int, seed: int, limits: LengthLimits,
                  tokenizer: Any = None) -> list[tuple[str, int, int]]:
    """``num`` requests of a length family: (prompt text, its tokens, output tokens)."""
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer()[0]
    rng = stream_rng(seed, _LENGTHS_STREAM)
    if lengths == "synthetic":
        n_in = min(SYNTHETIC_TOKENS[0], limits.max_input_tokens)
        n_out = min(SYNTHETIC_TOKENS[1], limits.max_output_tokens)
        texts = make_texts(tokenizer, rng, word_pool(tokenizer), [n_in] * num)
        return [(text, n, n_out) for text, n in texts]
    if lengths == "sharegpt":
        pairs = _sharegpt_pairs(tokenizer, limits)
        picks = rng.integers(0, len(pairs), size=num)
        tags = [f"#{i} " for i in range(num)]
        tag_tokens = count_tokens(tokenizer, tags)
        return [(tag + pairs[k][0], pairs[k][1] + n_tag, pairs[k][2])
                for tag, n_tag, k in zip(tags, tag_tokens, picks.tolist())]
    raise ValueError(f"unknown lengths {lengths!r}: synthetic or sharegpt")


@functools.lru_cache(maxsize=4)
def _sharegpt_pairs(tokenizer: Any, limits: LengthLimits) -> list[tuple[str, int, int]]:
    """(clipped prompt, its tokens, reply tokens) of every committed pair; empty ones dropped."""
    pairs = read_pairs_trace(DEFAULT_PAIRS_TRACE)
    prompts = clip_texts(tokenizer, [p for p, _ in pairs], limits.max_input_tokens)
    replies = clip_texts(tokenizer, [r for _, r in pairs], limits.max_output_tokens)
    return [(text, n_in, n_out) for (text, n_in), (_, n_out) in zip(prompts, replies)
            if n_in > 0 and n_out > 0]


def _conversations(texts: list[tuple[str, int, int]], times: np.ndarray,
                   owners: np.ndarray, prefix: str) -> list[Conversation]:
    return [Conversation(f"{prefix}-{i:05d}", round(float(t), 6),
                         [Turn(user=text, input_tokens=n_in, output_tokens=n_out)],
                         client=client_name(int(owner)))
            for i, ((text, n_in, n_out), t, owner) in enumerate(zip(texts, times, owners))]


def build_trace(workload: Workload, total_rps: float, duration_s: float, seed: int = 0,
                limits: LengthLimits = LengthLimits(), tokenizer: Any = None) -> Trace:
    """Single-turn requests of every client arriving over ``[0, duration_s)``."""
    times, owners = timed_arrivals(workload.rates(total_rps), duration_s, seed,
                                   [c.on_off for c in workload.clients])
    texts = request_texts(workload.lengths, len(times), seed, limits, tokenizer)
    meta = {"workload": workload.name, "lengths": workload.lengths,
            "total_rps": total_rps, "duration_s": duration_s, "seed": seed,
            "rates_while_on": dict(zip(workload.client_names, workload.rates(total_rps))),
            "limits": {"max_input_tokens": limits.max_input_tokens,
                       "max_output_tokens": limits.max_output_tokens}}
    return Trace(_conversations(texts, times, owners, workload.name), meta)


def probe_trace(lengths: str, num: int, seed: int = 0, limits: LengthLimits = LengthLimits(),
                tokenizer: Any = None) -> Trace:
    """``num`` requests of a length family, all due at once, from one client: what the
    capacity measurement keeps the engine saturated with."""
    texts = request_texts(lengths, num, seed + 1, limits, tokenizer)  # not the runs' own texts
    zeros = np.zeros(num)
    return Trace(_conversations(texts, zeros, zeros.astype(np.int64), f"probe-{lengths}"),
                 {"lengths": lengths, "num": num})
