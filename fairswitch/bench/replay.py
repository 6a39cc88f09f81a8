"""Replaying a trace against a client: when each request is sent, and how many at once.

Both replay clients (HTTP and in-process) share this loop; a client only knows how to send one
turn and fill in its ``RequestRecord``. Each conversation is one task:

    arrival_s (scaled) -> turn 0 sent ... answer done -> think_s (scaled) -> turn 1 sent ...

so a conversation never has two turns in flight, and many conversations overlap. A turn that
fails is recorded with its error and ends its conversation (a user who got no answer does not ask
the follow-up); every other conversation goes on.

``max_concurrency`` bounds the requests in flight, client side, as ``vllm bench serve`` does: a
request that waits for a slot is sent (and its ``arrival_s`` taken) when it gets one.

``stop_when`` (e.g. ``slo_stop.SloStop``) is asked every ``STOP_CHECK_S`` while the replay runs;
once it names a reason, every conversation is cancelled (the client aborts its requests), the
requests in flight are recorded as failed with that reason and the rest are never sent.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from tqdm import tqdm

from fairswitch.bench.records import RequestRecord
from fairswitch.bench.trace import Conversation, Trace

Clock = Callable[[], float]  # seconds since the replay started
# (records so far, clock) -> why the replay should stop now, or None
StopRule = Callable[[Sequence[RequestRecord], float], str | None]
STOP_CHECK_S = 0.25


class TurnSender(Protocol):
    async def send(self, conv: Conversation, turn: int, record: RequestRecord,
                   clock: Clock) -> None:
        """Send ``conv``'s turn ``turn`` (full history) and fill ``record`` as tokens arrive:
        prompt_tokens, token_times_s, cached_tokens, end_s. Raise on failure."""


@dataclass(slots=True)
class ReplayOptions:
    time_scale: float = 1.0               # multiplies every trace time (arrivals and think times)
    request_rate: float | None = None     # conversations/s (Poisson); replaces the trace arrivals
    seed: int = 0                         # of the Poisson arrivals
    max_concurrency: int | None = None    # requests in flight at once (None: no bound)
    progress: bool = True
    stop_when: StopRule | None = None     # asked while the replay runs: stop it early

    def __post_init__(self) -> None:
        if not (math.isfinite(self.time_scale) and self.time_scale >= 0):
            raise ValueError(f"time_scale must be finite and >= 0, got {self.time_scale}")
        if self.request_rate is not None and not self.request_rate > 0:
            raise ValueError(f"request_rate must be > 0 (inf: all at once), "
                             f"got {self.request_rate}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")


@dataclass(slots=True)
class ReplayResult:
    records: list[RequestRecord]   # one per request sent, in send order
    duration_s: float              # first arrival to the last response
    # Turns never sent (an earlier turn failed, or a stop), by (priority, client).
    unsent: dict[tuple[int, str], int] = field(default_factory=dict)
    stopped: str | None = None     # why ``stop_when`` stopped the replay; None: it ran to the end

    @property
    def num_skipped_turns(self) -> int:
        return sum(self.unsent.values())


def arrival_times(trace: Trace, options: ReplayOptions) -> list[float]:
    """When each conversation's first turn is due, in seconds from the start of the replay."""
    convs = trace.conversations
    if options.request_rate is None:
        return [c.arrival_s * options.time_scale for c in convs]
    if math.isinf(options.request_rate):
        return [0.0] * len(convs)
    rng = random.Random(options.seed)
    t, out = 0.0, []
    for _ in convs:
        out.append(t)
        t += rng.expovariate(options.request_rate)
    return out


async def replay(trace: Trace, sender: TurnSender, options: ReplayOptions | None = None,
                 *, desc: str = "replay") -> ReplayResult:
    """Replay every conversation of ``trace`` through ``sender``; never raises for one request."""
    options = options or ReplayOptions()
    records: list[RequestRecord] = []
    slots = asyncio.Semaphore(options.max_concurrency) if options.max_concurrency else None
    bar = tqdm(total=trace.num_requests, desc=desc, unit="req", disable=not options.progress)
    num_failed = 0
    start = time.monotonic()

    def clock() -> float:
        return time.monotonic() - start

    async def sleep_until(t: float) -> None:
        delay = t - clock()
        if delay > 0:
            await asyncio.sleep(delay)

    num_sent = [0] * len(trace.conversations)  # turns sent, by conversation

    async def one_turn(k: int, conv: Conversation, i: int) -> RequestRecord:
        rec = RequestRecord(request_id=f"{conv.id}:{i}", conversation_id=conv.id, turn=i,
                            client=conv.client, priority=conv.priority, arrival_s=clock())
        records.append(rec)
        num_sent[k] += 1
        try:
            await sender.send(conv, i, rec, clock)
            if not rec.token_times_s:
                raise RuntimeError("the response carried no tokens")
        except Exception as e:  # noqa: BLE001 - recorded; the replay goes on
            rec.error = f"{type(e).__name__}: {e}"
        if rec.end_s is None:
            rec.end_s = clock()
        return rec

    async def conversation(k: int, conv: Conversation, arrival: float) -> None:
        nonlocal num_failed
        await sleep_until(arrival)
        for i, turn in enumerate(conv.turns):
            if i > 0:
                await asyncio.sleep(turn.think_s * options.time_scale)
            if slots is None:
                rec = await one_turn(k, conv, i)
            else:
                async with slots:
                    rec = await one_turn(k, conv, i)
            bar.update(1)
            if not rec.ok:
                num_failed += 1
                bar.update(len(conv.turns) - i - 1)
                bar.set_postfix(failed=num_failed)
                return

    tasks = [asyncio.ensure_future(conversation(k, c, t)) for k, (c, t) in
             enumerate(zip(trace.conversations, arrival_times(trace, options)))]
    stopped: str | None = None
    stop_rule = options.stop_when

    async def watch() -> None:
        nonlocal stopped
        try:
            while stopped is None:
                await asyncio.sleep(STOP_CHECK_S)
                stopped = stop_rule(records, clock())
        finally:  # also when the rule raises (a bug: raised below, once the replay has ended)
            for task in tasks:
                task.cancel()

    watcher = asyncio.ensure_future(watch()) if stop_rule is not None else None
    try:
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        if watcher is not None:
            watcher.cancel()
        bar.close()
    if watcher is not None and watcher.done() and not watcher.cancelled() and watcher.exception():
        raise watcher.exception()
    for outcome in outcomes:  # a conversation raises only when cancelled by the stop
        if isinstance(outcome, BaseException) and not isinstance(outcome, asyncio.CancelledError):
            raise outcome
    if stopped is not None:
        now = clock()
        for r in records:
            if r.end_s is None:
                r.error, r.end_s = f"replay stopped: {stopped}", now
    first = min((r.arrival_s for r in records), default=0.0)
    last = max((r.end_s or r.arrival_s for r in records), default=first)
    unsent: Counter[tuple[int, str]] = Counter()
    for conv, n in zip(trace.conversations, num_sent):
        if len(conv.turns) > n:
            unsent[conv.priority, conv.client] += len(conv.turns) - n
    return ReplayResult(records, last - first, dict(unsent), stopped)
