"""What ``fairswitch bench`` and ``fairswitch replay`` share: the trace, how it is replayed, and
the target (a running server with ``--url``, else an engine built in-process from the engine
options, exactly as ``fairswitch serve`` would build it)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
import sys
from pathlib import Path
from typing import Any

from fairswitch.bench.replay import ReplayOptions
from fairswitch.bench.runner import RunResult, replay_engine, replay_http
from fairswitch.bench.trace import Trace, read_trace
from fairswitch.cli.files import check_input_file, check_writable
from fairswitch.cli.files import read_chat_template
from fairswitch.config import EngineConfig, add_engine_args


def add_replay_args(p: argparse.ArgumentParser) -> None:
    w = p.add_argument_group("workload")
    w.add_argument("--trace", type=Path, required=True,
                   help="trace to replay (JSONL, one conversation per line; see "
                        "fairswitch/bench/trace.py)")
    w.add_argument("--num-conversations", type=int, default=None, metavar="N",
                   help="replay only the first N conversations (by arrival) (default: all)")
    w.add_argument("--time-scale", type=float, default=1.0,
                   help="multiply the trace's arrival and think times (0.5: twice as fast; "
                        "default: 1)")
    w.add_argument("--request-rate", type=float, default=None,
                   help="conversations per second, Poisson, replacing the trace's arrivals "
                        "('inf': all at once) (default: the trace's arrivals)")
    w.add_argument("--arrival-seed", type=int, default=0,
                   help="seed of the --request-rate arrivals (default: 0)")
    w.add_argument("--max-concurrency", type=int, default=None,
                   help="most requests in flight at once, client side (default: no bound)")
    w.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature of every request (default: 0, greedy)")
    w.add_argument("--warmup-requests", type=int, default=2,
                   help="two-turn warm-up conversations sent before the measured replay (one-time "
                        "costs of a fresh process or engine stay out of the figures) (default: 2)")
    w.add_argument("--output-json", type=Path, default=None, help="write the report as JSON")
    w.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    w.add_argument("--step-log", type=Path, default=None, metavar="DIR",
                   help="in-process only: write every engine step of the measured replay (batch, "
                        "queues, free KV blocks, preemptions, timings) to DIR/<run>.json "
                        "(fairswitch/engine/step_log.py)")
    t = p.add_argument_group("target")
    t.add_argument("--url", default=None,
                   help="base URL of a running OpenAI-compatible server, e.g. "
                        "http://127.0.0.1:8000 (default: an in-process engine built from the "
                        "engine options below)")
    t.add_argument("--api-key", default=None, help="API key sent as 'Authorization: Bearer'")
    t.add_argument("--served-model-name", default=None,
                   help="model name sent to the server (default: the first of its /v1/models)")
    t.add_argument("--endpoint", choices=("chat", "completions"), default="chat",
                   help="chat: /v1/chat/completions; completions: /v1/completions on the token "
                        "ids of the server's /tokenize of the messages (default: chat)")
    t.add_argument("--chat-template", default=None,
                   help="in-process: Jinja chat template (a file, or the template itself) "
                        "replacing the tokenizer's, as for fairswitch serve")
    add_engine_args(p)


def check_replay_args(args: argparse.Namespace) -> None:
    """Refuse, before an engine is built, what would fail the warm-up or every request (the
    sampling temperature, the chat template), and output paths that could not be written
    after the replay."""
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.warmup_requests < 0:
        raise ValueError(f"--warmup-requests must be >= 0, got {args.warmup_requests}")
    read_chat_template(args.chat_template)
    if args.output_json is not None:
        check_writable(args.output_json, "--output-json")
    if args.step_log is not None and args.url is None:  # (with --url: refused by run_target)
        check_writable(args.step_log, "--step-log", directory=True)


def load_trace(args: argparse.Namespace) -> Trace:
    trace = read_trace(check_input_file(args.trace, "trace"))
    n = args.num_conversations
    if n is not None:
        if n < 1:
            raise ValueError(f"--num-conversations must be >= 1, got {n}")
        trace = Trace(trace.conversations[:n], trace.meta)
    return trace


def replay_options(args: argparse.Namespace) -> ReplayOptions:
    return ReplayOptions(time_scale=args.time_scale, request_rate=args.request_rate,
                         seed=args.arrival_seed, max_concurrency=args.max_concurrency,
                         progress=not args.no_progress)


def engine_run_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of ``runner.replay_engine`` / ``compare_engines`` beyond the config."""
    return {"chat_template": read_chat_template(args.chat_template),
            "temperature": args.temperature, "warmup_requests": args.warmup_requests,
            "step_log_dir": args.step_log}


def run_target(args: argparse.Namespace, trace: Trace, desc: str) -> RunResult:
    """One replay of ``trace`` against the target the options name."""
    if args.url is not None:
        if args.step_log is not None:
            raise ValueError("--step-log records an in-process engine: it cannot be used with "
                             "--url")
        return replay_http(trace, args.url, replay_options(args), desc=desc,
                           warmup_requests=args.warmup_requests, api_key=args.api_key,
                           model=args.served_model_name, endpoint=args.endpoint,
                           temperature=args.temperature)
    return replay_engine(trace, EngineConfig.from_cli_args(args), replay_options(args),
                         desc=desc, **engine_run_kwargs(args))


def print_failures(summary: dict[str, Any], name: str) -> None:
    """Why requests failed, on stderr (the table only counts them; the JSON lists each)."""
    from fairswitch.bench.report import format_failures

    if summary["failures"]:
        skipped = summary.get("skipped_turns")
        print(f"{name}: failed requests: {summary['failed']}"
              + (f" (later turns not sent: {skipped})" if skipped else "") + ", errors:\n"
              + format_failures(summary["failures"]), file=sys.stderr)


def report_header(args: argparse.Namespace, trace: Trace) -> dict[str, Any]:
    """What every JSON report starts with: how it was made and on what workload."""
    rate = args.request_rate
    return {
        "command": shlex.join(sys.argv),
        "trace": str(args.trace), "trace_meta": trace.meta,
        "num_conversations": len(trace.conversations), "num_requests": trace.num_requests,
        "target": args.url or "in-process",
        "replay": {"time_scale": args.time_scale,
                   "request_rate": "inf" if rate is not None and math.isinf(rate) else rate,
                   "arrival_seed": args.arrival_seed, "max_concurrency": args.max_concurrency,
                   "warmup_requests": args.warmup_requests,
                   "temperature": args.temperature,
                   "endpoint": args.endpoint if args.url else None},
    }


def config_json(config: EngineConfig | None) -> dict[str, Any] | None:
    """The config's fields, and the block size in use where ``block_size`` was left unset."""
    if config is None:
        return None
    out = dataclasses.asdict(config)
    out["cache"]["tokens_per_block"] = config.cache.tokens_per_block
    return out
