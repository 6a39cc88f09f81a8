"""Build a replayable trace (fairswitch/bench/trace.py format) from ShareGPT or synthetic text.

    python -m workloads.build sharegpt --num-conversations 1000 --rate 3 --output t.jsonl.gz
    python -m workloads.build synthetic --client-rates 4,2,1,1 --rate 16 --output t.jsonl

The same command and seed give the same bytes. The first line records trace_meta: the exact
command, seed, tokenizer, every parameter, the counts, and (with --priority-updates) the
SchedulerConfig fields that replay runtime priority changes through the ``trace`` policy.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections import Counter
from collections.abc import Callable
from itertools import islice
from pathlib import Path
from typing import Any

from fairswitch.bench.trace import Conversation, write_trace
from workloads.dists import Dist, parse_dist
from workloads.sharegpt_multiturn import iter_sharegpt_conversations
from workloads.streams import (Timing, apply_timing, parse_client_rates, parse_priority_classes,
                               priority_update_config)
from workloads.synthetic import Shape, synthetic_conversations
from workloads.tokens import Limits, load_tokenizer


def _typed(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    # argparse hides a type function's ValueError message behind "invalid value"; keep ours.
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = parse.__name__
    return convert


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    a = common.add_argument
    a("--output", type=Path, required=True, help="trace path (.jsonl, or .jsonl.gz compressed)")
    a("--seed", type=int, default=0, help="seed of every random draw (>= 0)")
    a("--num-conversations", type=int, default=1000)
    a("--tokenizer", default=None, help="HF tokenizer directory (default: cl100k_base)")
    a("--max-input-tokens", type=int, default=1024, help="clip of one user message")
    a("--max-output-tokens", type=int, default=512, help="clip of one reply / output_tokens")
    a("--max-context", type=int, default=4096, help="a conversation's whole history, outputs too")
    a("--max-turns", type=int, default=8)
    a("--rate", type=float, default=2.0, help="conversations (first turns) per second, in all")
    a("--cv", type=float, default=1.0, help="inter-arrival CV: 1 Poisson, > 1 bursty (gamma)")
    a("--think", type=_typed(parse_dist), default=parse_dist("exponential:10"),
      help="think time between turns, seconds (fixed:V, uniform:A,B, exponential:MEAN, ...)")
    a("--client-rates", type=_typed(parse_client_rates), default=(1.0,),
      help="relative rates of clients client-0, client-1, ... e.g. 4,2,1,1")
    a("--priority-classes", type=_typed(parse_priority_classes), default=((0, 1.0),),
      help="static priority CLASS:PROB per conversation, e.g. 0:0.2,1:0.8 (lower runs first)")
    a("--priority-updates", choices=("none", "random", "markov"), default="none",
      help="runtime priority changes to replay with the scheduler's trace policy")
    a("--priority-update-prob", type=float, default=0.01, help="per iteration and request")
    a("--priority-levels", type=int, default=4, help="levels the updates move between")

    p = argparse.ArgumentParser(prog="python -m workloads.build", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="source", required=True)
    sg = sub.add_parser("sharegpt", parents=[common], help="multi-turn ShareGPT conversations")
    sg.add_argument("--min-turns", type=int, default=1)
    sg.add_argument("--overflow", choices=("trim", "skip"), default="trim",
                    help="a conversation longer than --max-context: keep its earliest turns "
                         "that fit, or skip it")
    syn = sub.add_parser("synthetic", parents=[common], help="synthetic conversations")
    syn.add_argument("--turns", type=_typed(parse_dist), default=parse_dist("fixed:2"))
    syn.add_argument("--input-tokens", type=_typed(parse_dist),
                     default=parse_dist("lognormal:128,0.8"))
    syn.add_argument("--output-tokens", type=_typed(parse_dist),
                     default=parse_dist("lognormal:128,0.8"))
    return p


def trace_counts(convs: list[Conversation]) -> dict[str, Any]:
    turns = [t for c in convs for t in c.turns]
    n = max(len(turns), 1)
    return {
        "conversations": len(convs),
        "requests": len(turns),
        "mean_turns": round(len(turns) / max(len(convs), 1), 3),
        "mean_input_tokens": round(sum(t.input_tokens for t in turns) / n, 1),
        "mean_output_tokens": round(sum(t.output_tokens for t in turns) / n, 1),
        "first_arrival_span_s": round(max((c.arrival_s for c in convs), default=0.0), 3),
        "per_client": dict(sorted(Counter(c.client for c in convs).items())),
        "per_priority": {str(k): v for k, v in sorted(Counter(c.priority for c in convs).items())},
    }


def build(argv: list[str]) -> tuple[list[Conversation], dict[str, Any], Path]:
    """(conversations, trace_meta, output path) for a command line; ValueError if it is bad."""
    args = _parser().parse_args(argv)
    if args.seed < 0 or args.num_conversations < 1:
        raise ValueError("--seed must be >= 0 and --num-conversations >= 1")
    limits = Limits(args.max_input_tokens, args.max_output_tokens, args.max_context,
                    args.max_turns, getattr(args, "min_turns", 1),
                    getattr(args, "overflow", "trim") == "trim")
    timing = Timing(args.rate, args.cv, args.think, args.client_rates, args.priority_classes)
    scheduler = priority_update_config(args.priority_updates, args.priority_update_prob,
                                       args.priority_levels, args.seed, args.priority_classes)
    tokenizer, tokenizer_name = load_tokenizer(args.tokenizer)
    meta: dict[str, Any] = {}
    if args.source == "sharegpt":
        stats: Counter[str] = Counter()
        convs = list(islice(iter_sharegpt_conversations(tokenizer, limits, stats),
                            args.num_conversations))
        meta["sharegpt"] = dict(stats)
    else:
        shape = Shape(args.turns, args.input_tokens, args.output_tokens)
        convs = synthetic_conversations(args.num_conversations, shape, limits, tokenizer,
                                        args.seed)
    if not convs:
        raise ValueError("no conversation qualified: loosen the limits")
    convs = apply_timing(convs, timing, args.seed)
    params = {k: str(v) if isinstance(v, Dist) else v for k, v in vars(args).items()
              if k not in ("output", "seed", "source", "tokenizer")}
    meta = {"command": shlex.join(["python", "-m", "workloads.build", *argv]),
            "source": args.source, "seed": args.seed, "tokenizer": tokenizer_name,
            "params": params, "counts": trace_counts(convs), **meta}
    if scheduler is not None:
        meta["scheduler"] = scheduler
    return convs, meta, args.output


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        convs, meta, output = build(argv)
    except ValueError as e:
        _parser().error(str(e))
    write_trace(output, convs, meta)
    c = meta["counts"]
    print(f"{output}: {c['conversations']} conversations, {c['requests']} requests, "
          f"{c['mean_turns']:.2f} turns each, mean input {c['mean_input_tokens']:.1f} / output "
          f"{c['mean_output_tokens']:.1f} tokens per request, first turns over "
          f"{c['first_arrival_span_s']:.1f} s")


if __name__ == "__main__":
    main()
