"""``fairswitch replay``: multi-turn chat replay. Every turn sends the conversation's whole
history, waits for the answer and the user's think time, then sends the next; many conversations
run at once. Reports latency by turn number and how much of the history was served from reused
KV (usage's cached tokens per turn, and the engine's reuse counters)."""

from __future__ import annotations

import argparse
from typing import Any

from fairswitch.cli.replay_args import (add_replay_args, check_replay_args, config_json,
                                        load_trace, print_failures, report_header, run_target)


def add_parser(subs: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subs.add_parser("replay", help="multi-turn chat replay: latency by turn, KV reuse hits",
                        description="Replay multi-turn conversations (full history each turn, "
                                    "think time between turns) against a server (--url) or an "
                                    "in-process engine.")
    add_replay_args(p)
    p.set_defaults(run=run)
    return p


def replay(args: argparse.Namespace) -> dict[str, Any]:
    """Run, print the report, write the JSON when asked; returns the JSON report."""
    from fairswitch.bench.report import format_table, write_json
    from fairswitch.bench.turns import format_reuse, format_turns, reuse_summary, turn_summary
    from fairswitch.config import parse_client_weights

    weights = parse_client_weights(args.client_weights) or None  # (refused before the run)
    check_replay_args(args)
    trace = load_trace(args)
    result = run_target(args, trace, "replay")
    summary = result.summarize(weights=weights)
    turns = turn_summary(result.records)
    reuse = reuse_summary(result.records, result.switch_metrics)
    print(format_table(summary, "Multi-turn Replay Result"))
    print(f"\nBy turn:\n{format_turns(turns)}")
    print(f"\nKV reuse:\n{format_reuse(reuse)}")
    print_failures(summary, "replay")
    report = {**report_header(args, trace), "engine_config": config_json(result.engine_config),
              "summary": summary, "turns": turns, "reuse": reuse}
    if args.output_json is not None:
        print(f"wrote {write_json(args.output_json, report)}")
    return report


def run(args: argparse.Namespace) -> int:
    replay(args)
    return 0
