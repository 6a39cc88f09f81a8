"""The server's periodic stats line, as vLLM logs it (``--disable-log-stats`` turns it off):
every ``interval_s``, the prompt and generation throughput since the last line, the queues, KV
usage, the prefix cache's hit rate and the preemptions. An idle server logs one line that it
went idle, then none until work comes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from fairswitch.engine.async_engine import AsyncEngine, EngineDeadError
from fairswitch.server.metrics import ServerMetrics, engine_snapshot

logger = logging.getLogger("fairswitch.server.stats")


@dataclass
class _Totals:
    """The counters a line reports the change of."""
    time: float
    prompt_tokens: int
    generation_tokens: int
    queried_tokens: int
    reused_tokens: int
    preemptions: int

    @classmethod
    def now(cls, metrics: ServerMetrics, snapshot: dict[str, Any]) -> _Totals:
        return cls(time.monotonic(), metrics.num_prompt_tokens, metrics.num_generation_tokens,
                   snapshot["queried_tokens"],
                   snapshot["reused_tokens"] + snapshot["reused_tokens_cpu"],
                   snapshot["preemptions_recompute"] + snapshot["preemptions_swap"])


def stats_line(before: _Totals, after: _Totals, snapshot: dict[str, Any]) -> str:
    seconds = max(after.time - before.time, 1e-9)
    prompt = after.prompt_tokens - before.prompt_tokens
    queried = after.queried_tokens - before.queried_tokens
    reused = after.reused_tokens - before.reused_tokens
    hit = f"{100 * reused / queried:.1f}%" if queried else "-"
    return (f"Avg prompt throughput: {prompt / seconds:.1f} tokens/s, Avg generation "
            f"throughput: {(after.generation_tokens - before.generation_tokens) / seconds:.1f} "
            f"tokens/s, Running: {snapshot['num_running']} reqs, Waiting: "
            f"{snapshot['num_waiting']} reqs, Swapped: {snapshot['num_swapped']} reqs, "
            f"GPU KV cache usage: {100 * snapshot['gpu_kv_usage']:.1f}%, CPU KV cache usage: "
            f"{100 * snapshot['cpu_kv_usage']:.1f}%, Prefix cache hit rate: {hit}, "
            f"Preemptions: {after.preemptions - before.preemptions}")


async def log_stats(engine: AsyncEngine, metrics: ServerMetrics, interval_s: float) -> None:
    """Log a stats line every ``interval_s`` until cancelled or the engine stops."""
    try:
        before = _Totals.now(metrics, await engine.run_in_engine(engine_snapshot))
    except EngineDeadError:
        return
    idle = True  # (said so at the start: nothing to say until work comes)
    while True:
        await asyncio.sleep(interval_s)
        try:
            snapshot = await engine.run_in_engine(engine_snapshot)
        except EngineDeadError:
            return
        after = _Totals.now(metrics, snapshot)
        busy = (after.prompt_tokens, after.generation_tokens) != (
            before.prompt_tokens, before.generation_tokens) or any(
            snapshot[k] for k in ("num_running", "num_waiting", "num_swapped"))
        if busy or not idle:  # (the first idle interval's line shows the zeros once)
            logger.info(stats_line(before, after, snapshot))
        idle = not busy
        before = after
