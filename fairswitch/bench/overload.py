"""Timed runs against an in-process engine: replays cut at a stated time, and capacity probes.

An overloaded engine's queue grows for as long as requests arrive and takes as long again to
drain, so an overload run is cut instead (``Deadline``): at ``until_s`` every request in flight is
aborted and keeps the tokens it got; measures are taken over ``[0, until_s]``.

Capacity (``capacity``): the request rate an engine sustains on a family of request lengths. A
closed loop keeps ``concurrency`` requests in flight, more than a batch holds, so that a queue is
always waiting, as it is under overload; after a warm-up (the batch filling), the output tokens
delivered per second divided by the mean output tokens of a request is the rate at which requests
complete, which is the most the engine can be offered without its queue growing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from fairswitch.bench.records import RequestRecord
from fairswitch.bench.replay import Clock, ReplayOptions, TurnSender, replay
from fairswitch.bench.runner import counter_growth, run_in_process, warm_up
from fairswitch.bench.trace import Conversation, Trace
from fairswitch.config import EngineConfig

if TYPE_CHECKING:
    from fairswitch.engine.async_engine import AsyncEngine


class CutOff(RuntimeError):
    """The run ended before the request did."""


class Deadline:
    """A TurnSender that gives up at ``until_s`` on the replay's clock (its request is aborted)."""

    def __init__(self, sender: TurnSender, until_s: float) -> None:
        self.sender = sender
        self.until_s = until_s

    async def send(self, conv: Conversation, turn: int, record: RequestRecord,
                   clock: Clock) -> None:
        left = self.until_s - clock()
        if left <= 0:
            raise CutOff(f"not sent: the run ended at {self.until_s:g} s")
        try:
            await asyncio.wait_for(self.sender.send(conv, turn, record, clock), left)
        except asyncio.TimeoutError:  # TimeoutError from Python 3.11 on
            raise CutOff(f"cut at {self.until_s:g} s") from None


@dataclass(slots=True)
class TimedJob:
    name: str
    trace: Trace
    until_s: float
    options: ReplayOptions = field(default_factory=ReplayOptions)


@dataclass(slots=True)
class TimedRun:
    records: list[RequestRecord]  # those sent before until_s
    until_s: float
    switch_metrics: dict[str, float]


@dataclass(frozen=True, slots=True)
class EngineFacts:
    """What an engine was built with, for bounds that depend on it."""

    kv_tokens: int      # device KV blocks x block size
    max_model_len: int
    max_num_seqs: int

    @property
    def batch_tokens(self) -> int:
        """The most tokens a batch can hold: the KV cache, or max_num_seqs full requests."""
        return min(self.kv_tokens, self.max_num_seqs * self.max_model_len)


def timed_runs(config: EngineConfig, jobs: Sequence[TimedJob], *,
               warmup_requests: int = 1) -> tuple[EngineFacts, list[TimedRun]]:
    """Build one engine, warm it up, run the jobs one after another, shut it down."""
    return run_in_process(config, lambda engine, client: _run_all(engine, client, jobs,
                                                                  warmup_requests))


async def _run_all(engine: AsyncEngine, client: TurnSender, jobs: Sequence[TimedJob],
                   warmup_requests: int) -> tuple[EngineFacts, list[TimedRun]]:
    facts = await engine.run_in_engine(lambda e: EngineFacts(
        e.kv.num_blocks * e.kv.block_size, e.max_model_len, e.config.scheduler.max_num_seqs))
    await warm_up(client, warmup_requests)
    runs = []
    for job in jobs:
        before = await engine.run_in_engine(lambda e: e.switch_metrics())
        result = await replay(job.trace, Deadline(client, job.until_s), job.options,
                              desc=job.name)
        await engine.sync()  # the aborts of the cut requests have run
        after = await engine.run_in_engine(lambda e: e.switch_metrics())
        runs.append(TimedRun([r for r in result.records if r.arrival_s < job.until_s],
                             job.until_s, counter_growth(before, after)))
    return facts, runs


def output_tokens_between(records: Sequence[RequestRecord], start_s: float,
                          end_s: float) -> int:
    """Output tokens delivered in ``[start_s, end_s)``."""
    times = [np.asarray(r.token_times_s) for r in records if r.token_times_s]
    if not times:
        return 0
    t = np.concatenate(times)
    return int(np.count_nonzero((t >= start_s) & (t < end_s)))


def capacity(run: TimedRun, num_sent_max: int, mean_output_tokens: float,
             warmup_s: float) -> dict[str, float | int]:
    """The capacity measured by a closed-loop run of ``num_sent_max`` requests (see above).

    A loop that sent all its requests before the end stopped saturating the engine when it sent
    the last one: the window ends there.
    """
    end = run.until_s
    if len(run.records) >= num_sent_max:
        end = max(r.arrival_s for r in run.records)
    if end <= warmup_s:
        raise ValueError(f"the capacity probe saturated the engine for no time after its "
                         f"{warmup_s:g} s warm-up (ran until {end:.1f} s): give it more "
                         f"requests or time")
    tokens = output_tokens_between(run.records, warmup_s, end)
    tok_s = tokens / (end - warmup_s)
    return {"capacity_rps": tok_s / mean_output_tokens, "output_tok_s": tok_s,
            "mean_output_tokens": mean_output_tokens, "window_start_s": warmup_s,
            "window_end_s": end, "num_requests_sent": len(run.records),
            "num_completed": sum(1 for r in run.records if r.ok)}
