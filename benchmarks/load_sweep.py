"""Sweep one replay or engine setting and compare engine configurations at every point, in one run:
where does fairswitch's lead over the baseline grow or shrink?

Takes every option of ``slo_bench.py`` (``fairswitch bench``: trace, engine, SLOs, ``--compare``)
plus ``--sweep OPTION=V1,V2,...``, where OPTION is one of those options without its dashes
(``time-scale``, ``priority-update-prob``, ``num-conversations``, ``kv-cache-memory-gib``...). At
each value the ``--compare`` configurations replay the trace one after another, exactly as
``slo_bench.py`` would with that option set; the value given last on the command line wins.

Prints one row per point and configuration: throughput and the P99 TTFT / P99.9 TBT / throughput
ratios against the baseline. Claims: every ratio claim of ``slo_bench.py`` at every point, named
``<claim>@<option>=<value>`` (e.g. ``p99_ttft_speedup_vs_baseline@time-scale=0.5``).

    python3 benchmarks/load_sweep.py --sweep time-scale=0.1,0.5,1.5 \\
        --trace workloads/traces/sharegpt_multiturn.jsonl.gz --num-conversations 180 \\
        --compare full,baseline --model llama-3-8b --load-format dummy --kv-cache-memory-gib 3 \\
        --swap-space 60 --max-model-len 4608 --max-num-seqs 64 --policy trace \\
        --priority-updates markov --preemption-mode swap \\
        --output benchmarks/results/fastswitch_pace_sweep.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


from fairswitch.cli.bench import add_bench_args, bench
from fairswitch.kv.host_memory import keep_pinned
from results_io import check_output, command_line, write_results
from slo_bench import claims as bench_claims

COLUMNS = (("P99 TTFT", "P99 TTFT (ms)"), ("P99.9 TBT", "P99.9 TBT (ms)"),
           ("throughput", "Output throughput (tok/s)"))


def parse_sweep(spec: str) -> tuple[str, list[str]]:
    """``"time-scale=0.1,0.5"`` -> ("time-scale", ["0.1", "0.5"])."""
    option, sep, values = spec.partition("=")
    option = option.strip().lstrip("-")
    points = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not option or not points:
        raise ValueError(f"--sweep {spec!r} is not OPTION=V1,V2,...")
    if len(set(points)) != len(points):
        raise ValueError(f"--sweep {spec!r} repeats a value")
    return option, points


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sweep", required=True, metavar="OPTION=V1,V2,...",
                   help="the option to vary and its values")
    p.add_argument("--output", type=Path, default=Path("benchmarks/results/load_sweep.json"),
                   help="result file (default: benchmarks/results/load_sweep.json)")
    p.add_argument("--commit", default=None, help="commit to record (default: git HEAD)")
    add_bench_args(p)
    return p


def point_args(parser: argparse.ArgumentParser, argv: list[str], option: str,
               value: str) -> argparse.Namespace:
    """The command line with ``--option value`` appended: parsed, typed and checked like any."""
    args = parser.parse_args([*argv, f"--{option}", value])
    point = f"{option}_{value}"  # plain file names (no '=')
    if args.plots_dir is not None:
        args.plots_dir = Path(args.plots_dir) / point
    if args.step_log is not None:
        args.step_log = Path(args.step_log) / point
    if args.output_json is not None:  # one report per point
        path = Path(args.output_json)
        args.output_json = path.with_name(f"{path.stem}_{point}{path.suffix}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    try:
        option, values = parse_sweep(args.sweep)
    except ValueError as e:
        parser.error(str(e))
    if option in ("sweep", "output", "commit"):
        parser.error(f"--sweep: --{option} is not a setting of the run")
    if args.compare is None:
        parser.error("--sweep compares engine configurations at each point: give --compare")
    for value in values:  # every point's command line is checked (unknown option, bad value)
        point_args(parser, argv, option, value)
    check_output(parser, args.output)

    points: dict[str, dict[str, Any]] = {}
    claims: list[dict[str, Any]] = []
    with keep_pinned():  # one pinned swap space serves every engine of every point
        for value in values:
            print(f"\n=== {option} = {value} ===", flush=True)
            report = bench(point_args(parser, argv, option, value))
            points[value] = report
            claims += [{**c, "name": f"{c['name']}@{option}={value}"}
                       for c in bench_claims(report) if c["unit"] == "x"]

    print(f"\nSweep of {option} (ratios: the baseline's figure over the configuration's, "
          "throughput the other way; above 1 = better than the baseline)")
    header = f"{option:>22}{'config':>16}{'tok/s':>10}" + "".join(f"{c:>12}" for c, _ in COLUMNS)
    print(header)
    print("-" * len(header))
    for value, report in points.items():
        for name, run in report["runs"].items():
            ratios = report["ratios"][name]
            tok_s = run["summary"]["output_throughput"] or 0.0
            cells = "".join(f"{ratios[label]:>11.2f}x" if ratios[label] is not None
                            else f"{'-':>12}" for _, label in COLUMNS)
            print(f"{value:>22}{name:>16}{tok_s:>10.0f}{cells}")
    figures = {"sweep": option, "values": values, "points": points}
    return write_results(args.output, command=command_line(), figures=figures, claims=claims,
                         commit=args.commit)


if __name__ == "__main__":
    main()
