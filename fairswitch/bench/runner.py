"""One replay run against a target, with the engine's switch metrics; and comparison runs.

A target is a server already running (its URL) or an engine built here from an ``EngineConfig``
and shut down when the run ends. Comparison runs build, replay and shut down one engine after
another in this process, freeing its memory before the next is built, so every configuration
sees the same trace on the same machine in one command.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fairswitch.bench import scrape
from fairswitch.bench.ablations import ablation_config
from fairswitch.bench.records import RequestRecord
from fairswitch.bench.replay import ReplayOptions, ReplayResult, TurnSender, replay
from fairswitch.bench.trace import Conversation, Trace, Turn
from fairswitch.config import EngineConfig
from fairswitch.engine.step_log import StepLog

T = TypeVar("T")

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class RunResult:
    records: list[RequestRecord]
    duration_s: float
    unsent: dict[tuple[int, str], int] = field(default_factory=dict)  # ReplayResult's
    switch_metrics: dict[str, float] = field(default_factory=dict)
    target: str = ""  # the URL, or "in-process"
    engine_config: EngineConfig | None = None  # in-process runs
    stopped: str | None = None  # why the replay's stop rule stopped it early (ReplayResult)

    @property
    def num_skipped_turns(self) -> int:
        return sum(self.unsent.values())

    def summarize(self, slo: Any = None, window_s: float = 10.0,
                  weights: dict[str, float] | None = None) -> dict[str, Any]:
        """``metrics.summarize`` of the records, with the switch metrics as ``engine``."""
        from fairswitch.bench.metrics import summarize

        summary = summarize(self.records, self.duration_s or None, slo, window_s, weights,
                            unsent=self.unsent)
        summary["engine"] = self.switch_metrics
        summary["skipped_turns"] = self.num_skipped_turns
        if self.stopped is not None:
            summary["stopped"] = self.stopped
        return summary


async def warm_up(sender: TurnSender, num_requests: int) -> None:
    """Send requests outside the measured run: the first requests of a process pay one-time
    costs (allocator growth, lazy initialization, kernel compilation for a prefill over a cached
    prefix) that would land on whichever run comes first. Each is a two-turn conversation, the
    i-th with a first message of 16 x 4^i words, so the second turn reuses a prefix."""
    if num_requests < 0:
        raise ValueError(f"warmup_requests must be >= 0, got {num_requests}")
    for i in range(num_requests):
        first = Turn(" ".join(["warm"] * (16 * 4**i)), output_tokens=4, assistant="ok")
        conv = Conversation(f"warmup-{i}", 0.0, [first, Turn("Hi", output_tokens=4)])
        for turn in range(len(conv.turns)):
            rec = RequestRecord(f"warmup-{i}-{turn}", conv.id, turn, conv.client, 0, 0.0)
            await sender.send(conv, turn, rec, lambda: 0.0)


def counter_growth(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Switch metrics over the measured run: counters minus their value after the warm-up."""
    # The /metrics counters, and the cumulative figures /metrics does not export.
    counters = set(scrape.COUNTERS.values()) | {"reuse_hit_blocks", "reuse_queried_blocks",
                                                 "reuse_bytes_saved", "gc_full_collections",
                                                 "kernel_compiles"}
    grown = {k: v - before.get(k, 0.0) if k in counters else v for k, v in after.items()}
    return scrape.with_derived(grown)


def replay_http(trace: Trace, url: str, options: ReplayOptions | None = None, *,
                desc: str = "replay", warmup_requests: int = 1, **client_kw: Any) -> RunResult:
    """Replay through a running server; ``client_kw`` go to ``HTTPClient`` (api_key, model,
    endpoint, temperature). Switch metrics are the growth of its ``/metrics`` counters over the
    run (empty when the server exports none)."""
    from fairswitch.bench.http_client import HTTPClient, HTTPRequestError

    async def scrape_text(client: HTTPClient) -> str | None:
        try:
            return await client.metrics_text()
        except (HTTPRequestError, OSError) as e:
            logger.warning("cannot scrape %s/metrics: %s", url, e)
            return None

    async def main() -> RunResult:
        async with HTTPClient(url, **client_kw) as client:
            try:
                await warm_up(client, warmup_requests)
            except HTTPRequestError as e:
                raise ConnectionError(f"the warm-up request to {url} failed: {e}") from e
            before = await scrape_text(client)
            result = await replay(trace, client, options, desc=desc)
            after = await scrape_text(client)
        metrics = scrape.switch_metrics_delta(before, after) if before and after else {}
        return RunResult(result.records, result.duration_s, result.unsent, metrics,
                         target=url, stopped=result.stopped)

    return asyncio.run(main())


def replay_engine(trace: Trace, config: EngineConfig, options: ReplayOptions | None = None, *,
                  desc: str = "replay", warmup_requests: int = 1,
                  step_log_dir: Path | None = None, **client_kw: Any) -> RunResult:
    """Build an engine from ``config``, replay through it in-process (``client_kw`` go to
    ``InProcClient``: chat_template, temperature), read its switch metrics, shut it down.
    ``step_log_dir``: record every step of the measured replay to ``<dir>/<desc>.json``."""
    step_log = Path(step_log_dir) / f"{desc}.json" if step_log_dir is not None else None
    result, metrics = run_in_process(
        config, lambda engine, client: _replay_in_process(engine, client, trace, options, desc,
                                                          warmup_requests, step_log),
        **client_kw)
    return RunResult(result.records, result.duration_s, result.unsent, metrics,
                     target="in-process", engine_config=config, stopped=result.stopped)


def run_in_process(config: EngineConfig,
                   work: Callable[[Any, TurnSender], Coroutine[Any, Any, T]],
                   **client_kw: Any) -> T:
    """Build an ``AsyncEngine`` from ``config``, run ``work(engine, client)`` (``client_kw`` go to
    its ``InProcClient``), shut the engine down and free its memory: the next engine sizes its
    KV cache from what is free."""
    from fairswitch.bench.inproc_client import InProcClient
    from fairswitch.engine.async_engine import AsyncEngine

    engine = AsyncEngine.from_config(config)
    try:
        client = InProcClient(engine, **client_kw)
        out = asyncio.run(work(engine, client))
        del client
    finally:
        engine.shutdown()
        del engine
        free_memory()
    return out


async def _replay_in_process(engine: Any, client: TurnSender, trace: Trace,
                             options: ReplayOptions | None, desc: str,
                             warmup_requests: int, step_log: Path | None
                             ) -> tuple[ReplayResult, dict[str, float]]:
    await warm_up(client, warmup_requests)
    before = await engine.run_in_engine(lambda e: e.switch_metrics())
    if step_log is not None:
        await engine.run_in_engine(lambda e: setattr(e, "step_log", StepLog(meta={
            "num_gpu_blocks": e.kv.num_blocks, "block_size": e.kv.block_size})))
    result = await replay(trace, client, options, desc=desc)
    after = await engine.run_in_engine(lambda e: e.switch_metrics())
    if step_log is not None:
        log = await engine.run_in_engine(lambda e: e.step_log)
        log.write(step_log)
        logger.info("step log: %s (%d steps)", step_log, len(log.rows))
    return result, counter_growth(before, after)


def compare_engines(trace: Trace, base: EngineConfig, names: list[str],
                    options: ReplayOptions | None = None, **client_kw: Any) -> dict[str, RunResult]:
    """Replay ``trace`` once per named configuration (see ``ablations``), one after another
    (the pinned swap space of one engine serves the next: ``keep_pinned``)."""
    from fairswitch.kv.host_memory import keep_pinned

    runs: dict[str, RunResult] = {}
    with keep_pinned():
        for i, name in enumerate(names):
            t0 = time.perf_counter()
            runs[name] = run = replay_engine(trace, ablation_config(name, base), options,
                                             desc=name, **client_kw)
            # A line per configuration as it ends: a long comparison cut short shows how far
            # it got, also with progress bars off.
            print(f"[{i + 1}/{len(names)}] {name}: {len(run.records)} requests replayed in "
                  f"{run.duration_s:.0f} s ({time.perf_counter() - t0:.0f} s with start-up)",
                  flush=True)
    return runs


def free_memory() -> None:
    # The next engine sizes its KV cache from free device memory: the last one's must be gone.
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
