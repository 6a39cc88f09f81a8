"""The multi-turn view of a replay (``fairswitch replay``): latency by turn number, and how much
of each turn's prompt (the whole history) was served from reused KV.

Later turns carry longer histories, so without reuse their TTFT grows with the turn number;
with reuse only the new user message needs prefill. ``cached_tokens`` comes from each response's
usage (``prompt_tokens_details.cached_tokens``); the engine's own reuse counters
(``reused_tokens``, ``reuse_hit_blocks`` / ``reuse_queried_blocks``) are reported beside them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from fairswitch.bench.metrics import latency_stats
from fairswitch.bench.records import RequestRecord
from fairswitch.bench.report import fmt_value

REUSE_COUNTERS = ("reused_tokens", "reuse_hit_blocks", "reuse_queried_blocks",
                  "reuse_bytes_saved", "reused_tokens_cpu")


def _share(num: float, den: float) -> float | None:
    return num / den if den else None


def turn_summary(records: Sequence[RequestRecord]) -> dict[str, dict[str, Any]]:
    """Per turn number ("0", "1", ...): counts, TTFT/E2EL stats (ms), prompt and cached tokens."""
    by_turn: dict[int, list[RequestRecord]] = defaultdict(list)
    for rec in records:
        by_turn[rec.turn].append(rec)
    out: dict[str, dict[str, Any]] = {}
    for turn in sorted(by_turn):
        ok = [r for r in by_turn[turn] if r.ok]
        prompt = sum(r.prompt_tokens for r in ok)
        cached = sum(r.cached_tokens for r in ok)
        out[str(turn)] = {
            "completed": len(ok), "failed": len(by_turn[turn]) - len(ok),
            "prompt_tokens": prompt, "cached_tokens": cached,
            "cached_fraction": _share(cached, prompt),
            "ttft": latency_stats([r.ttft_s for r in ok]),
            "e2el": latency_stats([r.e2e_s for r in ok]),
        }
    return out


def reuse_summary(records: Sequence[RequestRecord],
                  engine: dict[str, float] | None = None) -> dict[str, Any]:
    """Cached prompt tokens over the run (from usage), with the engine's reuse counters."""
    ok = [r for r in records if r.ok]
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    later = [r for r in ok if r.turn > 0]
    later_prompt = sum(r.prompt_tokens for r in later)
    later_cached = sum(r.cached_tokens for r in later)
    engine = engine or {}
    counters = {k: engine[k] for k in REUSE_COUNTERS if k in engine}
    if "reuse_queried_blocks" in counters:
        counters["block_hit_rate"] = _share(counters["reuse_hit_blocks"],
                                            counters["reuse_queried_blocks"])
    return {"prompt_tokens": prompt, "cached_tokens": cached,
            "cached_fraction": _share(cached, prompt),
            "later_turns_prompt_tokens": later_prompt, "later_turns_cached_tokens": later_cached,
            "later_turns_cached_fraction": _share(later_cached, later_prompt),
            "requests_with_hits": sum(r.cached_tokens > 0 for r in ok),
            "engine": counters}


def format_turns(turns: dict[str, dict[str, Any]]) -> str:
    cols = ["ok", "fail", "TTFT p50", "TTFT p90", "TTFT p99", "E2EL p50", "E2EL p90",
            "E2EL p99", "prompt", "cached", "cached %"]
    head = f"{'turn':>4} " + " ".join(f"{c:>9}" for c in cols)
    lines = [head, "-" * len(head)]
    for turn, t in turns.items():
        frac = t["cached_fraction"]
        cells = [t["completed"], t["failed"], t["ttft"]["median_ms"], t["ttft"]["p90_ms"],
                 t["ttft"]["p99_ms"], t["e2el"]["median_ms"], t["e2el"]["p90_ms"],
                 t["e2el"]["p99_ms"], t["prompt_tokens"], t["cached_tokens"],
                 None if frac is None else 100.0 * frac]
        lines.append(f"{turn:>4} " + " ".join(f"{fmt_value(c, 1):>9}" for c in cells))
    lines.append("(latencies in ms; prompt and cached: tokens summed over the turn's completed "
                 "requests)")
    return "\n".join(lines)


def format_reuse(reuse: dict[str, Any]) -> str:
    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100.0 * x:.1f}%"

    lines = [f"cached prompt tokens (usage): {reuse['cached_tokens']} of "
             f"{reuse['prompt_tokens']} ({pct(reuse['cached_fraction'])}); turns after the "
             f"first: {reuse['later_turns_cached_tokens']} of {reuse['later_turns_prompt_tokens']}"
             f" ({pct(reuse['later_turns_cached_fraction'])}); requests with a hit: "
             f"{reuse['requests_with_hits']}"]
    engine = reuse["engine"]
    if engine:
        lines.append("engine reuse counters: " + ", ".join(
            f"{k}={pct(v) if k == 'block_hit_rate' else fmt_value(v, 0)}" for k, v in engine.items()))
    return "\n".join(lines)
