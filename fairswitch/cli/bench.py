"""``fairswitch bench``: replay a trace, report latency percentiles, SLO attainment and fairness
(``vllm bench serve``'s table, then per-priority and per-client breakdowns and the engine's switch
metrics); with ``--compare`` the same trace runs against several engine configurations in turn
and the report compares them with the first named baseline."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from fairswitch.bench.ablations import ABLATIONS, parse_names
from fairswitch.bench.runner import RunResult, compare_engines
from fairswitch.bench.trace import Trace
from fairswitch.cli.files import check_writable
from fairswitch.cli.replay_args import (add_replay_args, check_replay_args, config_json,
                                        engine_run_kwargs, load_trace, print_failures,
                                        replay_options, report_header, run_target)
from fairswitch.config import EngineConfig


DESCRIPTION = ("Replay a trace against a server (--url) or an in-process engine and report "
               "latency, SLO attainment and fairness.")


def add_parser(subs: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subs.add_parser("bench", help="SLO benchmark: replay a trace, report TTFT/TBT and SLOs",
                        description=DESCRIPTION)
    add_bench_args(p)
    p.set_defaults(run=run)
    return p


def add_bench_args(p: argparse.ArgumentParser) -> None:
    """Every option of ``fairswitch bench`` (benchmarks/slo_bench.py takes the same)."""
    s = p.add_argument_group("report")
    s.add_argument("--ttft-slo-ms", type=float, default=None,
                   help="TTFT target in ms (SLO attainment, goodput) (default: none)")
    s.add_argument("--tbt-slo-ms", type=float, default=None,
                   help="target in ms for every gap between two tokens (default: none)")
    s.add_argument("--window-s", type=float, default=10.0,
                   help="window of the fairness measures and of the plots over time "
                        "(default: 10)")
    s.add_argument("--plots-dir", type=Path, default=None,
                   help="write PNG plots (latency CDFs and tails over time, per-client service) "
                        "here; needs matplotlib")
    s.add_argument("--compare", default=None, metavar="NAMES",
                   help="in-process only: run the trace once per engine configuration, "
                        f"comma-separated, from {', '.join(ABLATIONS)}; ratios are taken "
                        "against 'baseline' when named, else the first")
    add_replay_args(p)


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000.0


def _slo(args: argparse.Namespace) -> Any:
    from fairswitch.bench.metrics import SLO

    if args.ttft_slo_ms is None and args.tbt_slo_ms is None:
        return None
    return SLO(ttft_s=_seconds(args.ttft_slo_ms), tbt_s=_seconds(args.tbt_slo_ms))


def _summary(args: argparse.Namespace, result: RunResult) -> dict[str, Any]:
    from fairswitch.config import parse_client_weights

    return result.summarize(_slo(args), args.window_s,
                            parse_client_weights(args.client_weights) or None)


def check_report_args(args: argparse.Namespace) -> None:
    """Refuse, before the replay, what the report would refuse after it: the SLOs, the window,
    the client weights, output paths that cannot be written, and plots without matplotlib."""
    from fairswitch.bench.metrics import SLO
    from fairswitch.config import parse_client_weights

    SLO(ttft_s=_seconds(args.ttft_slo_ms), tbt_s=_seconds(args.tbt_slo_ms))
    if not (math.isfinite(args.window_s) and args.window_s > 0):
        raise ValueError(f"--window-s must be finite and > 0, got {args.window_s}")
    parse_client_weights(args.client_weights)
    check_replay_args(args)
    if args.plots_dir is not None:
        from fairswitch.bench.plots import figure_class

        try:
            figure_class()
        except ImportError as e:
            raise ValueError(f"--plots-dir: {e}") from e
        check_writable(args.plots_dir, "--plots-dir", directory=True)


def _finish(args: argparse.Namespace, report: dict[str, Any],
            runs: dict[str, RunResult]) -> dict[str, Any]:
    """Write the report, then the plots, then the report again naming them: a plot that fails
    (a full disk) costs the plots, not the run; its error goes into the report and stderr."""
    from fairswitch.bench.report import write_json

    report["plots"] = []
    if args.output_json is not None:
        write_json(args.output_json, report)
    if args.plots_dir is not None:
        from fairswitch.bench.plots import write_plots

        try:
            paths = write_plots({name: r.records for name, r in runs.items()}, args.plots_dir,
                                args.trace.stem, window_s=args.window_s)
            report["plots"] = [str(p) for p in paths]
        except Exception as e:  # noqa: BLE001 - any plot failure: keep the figures, say why
            report["plots_error"] = f"{type(e).__name__}: {e}"
            print(f"error: plots not written: {report['plots_error']}", file=sys.stderr)
    if args.output_json is not None:
        print(f"wrote {write_json(args.output_json, report)}")
    return report


def bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run, print the report, write what was asked for; returns the JSON report."""
    from fairswitch.bench.report import format_breakdown, format_table

    check_report_args(args)
    trace = load_trace(args)
    if args.compare is not None:
        return _compare(args, trace)
    result = run_target(args, trace, "bench")
    summary = _summary(args, result)
    print(format_table(summary, "Serving Benchmark Result"))
    for by in ("priority", "client"):
        print(f"\nBy {by}:\n{format_breakdown(summary, by)}")
    print_failures(summary, "bench")
    report = {**report_header(args, trace), "engine_config": config_json(result.engine_config),
              "summary": summary}
    return _finish(args, report, {"bench": result})


def _compare(args: argparse.Namespace, trace: Trace) -> dict[str, Any]:
    from fairswitch.bench.report import compare, comparison_ratios, format_table

    if args.url is not None:
        raise ValueError("--compare builds each engine in-process: it cannot be used with --url")
    names = parse_names(args.compare)
    baseline = "baseline" if "baseline" in names else names[0]
    runs = compare_engines(trace, EngineConfig.from_cli_args(args), names, replay_options(args),
                           **engine_run_kwargs(args))
    summaries = {name: _summary(args, r) for name, r in runs.items()}
    for name, summary in summaries.items():
        print(format_table(summary, f"{name}"))
        print_failures(summary, name)
    print(f"\nComparison:\n{compare(summaries, baseline)}")
    report = {**report_header(args, trace), "baseline": baseline,
              "runs": {name: {"engine_config": config_json(runs[name].engine_config),
                              "summary": summaries[name]} for name in names},
              "ratios": comparison_ratios(summaries, baseline)}
    return _finish(args, report, runs)


def run(args: argparse.Namespace) -> int:
    return 1 if "plots_error" in bench(args) else 0
