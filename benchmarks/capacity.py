"""Capacity at SLO: the highest load (conversations per second) at which P99 TTFT and P99 TPOT
stay within their targets (default 2 s and 100 ms, MLPerf Inference's conversational targets for
Llama-3.1-8B), for each engine configuration, found by bisection on the trace's pace.

Takes every option of ``fairswitch bench`` (trace, engine) plus ``--configs`` (names as for
``--compare``; default ``full,full-fp8,baseline``), ``--low``/``--high`` (a bracket in
conversations per second; ``--bracket CONFIG=LOW:HIGH`` gives one configuration its own) and
``--steps``. A load L replays the trace at ``--time-scale`` =
(the trace's own rate) / L, arrivals and think times alike, the trace's own rate being
(conversations - 1) / (last arrival - first arrival). Each configuration is bisected on its own,
one replay per probe: first at ``--high`` (while it passes, the bracket moves up by its width,
at most ``--grow`` times), then ``--steps`` midpoints, and at ``--low`` only if none of them
passed (passing is taken to be monotone in the load, and a passing replay, which runs to its
end, is the slow kind); a probe passes when no request failed and both P99s are within the
targets. The capacity is the highest passing load (resolution (high - low) / 2^steps); none
when ``--low`` fails, and only a lower bound when the bracket's top still passes
(``bracketed``: false). A probe stops as soon as it has certainly failed (a request failed, or
enough requests are over a target that the P99 is: ``fairswitch.bench.slo_stop``), which takes
seconds above the capacity where a whole replay takes minutes; ``--run-to-end`` replays every
probe to its end.

Figures: every probe (load, time-scale, P99 TTFT/TPOT, pass, and why it stopped early: its
P99s are then over the requests finished by then) and, at each capacity, the per-priority-class
figures. Plot: P99 TTFT and P99 TPOT vs load of the whole replays, a line per configuration and
a dotted line at its capacity if bracketed (``plots/<output name>/capacity.png``; needs
matplotlib). Claims: each ``<config>_capacity_conv_s``, ``capacity_at_slo_vs_baseline`` (full /
baseline) and ``capacity_at_slo_fp8_vs_bf16`` (full-fp8 / full), each only from bracketed
capacities.

    python3 benchmarks/capacity.py --trace workloads/traces/sharegpt_multiturn.jsonl.gz \\
        --num-conversations 180 --low 2 --high 5 --steps 3 --model llama-3-8b \\
        --load-format dummy --kv-cache-memory-gib 3 --swap-space 60 --max-model-len 4608 \\
        --max-num-seqs 64 --policy trace --priority-updates markov --priority-update-prob 0.01 \\
        --preemption-mode swap --no-progress --output benchmarks/results/capacity.json
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

from results_io import check_output, command_line, write_results

from fairswitch.bench.ablations import ablation_config, parse_names
from fairswitch.bench.runner import replay_engine
from fairswitch.bench.slo_stop import SloStop
from fairswitch.bench.trace import Trace
from fairswitch.cli.bench import add_bench_args, check_report_args
from fairswitch.cli.replay_args import engine_run_kwargs, load_trace, replay_options
from fairswitch.config import EngineConfig
from fairswitch.kv.host_memory import keep_pinned

Probe = Callable[[float], dict[str, Any]]  # load (conv/s) -> a record with a bool "pass"


def bisect_capacity(probe: Probe, low: float, high: float, steps: int, grow: int = 0
                    ) -> tuple[float | None, bool, list[dict[str, Any]]]:
    """(highest passing load, whether the bracket held it, every probe in order).

    Assumes passing is monotone in the load, so ``low`` is probed only when no midpoint passed.
    While ``high`` passes, the bracket moves up by its width (the old ``high`` its new ``low``),
    at most ``grow`` times. ``low`` failing gives None; the last ``high`` passing gives that
    ``high`` unbracketed (the capacity is at least that)."""
    if not 0 < low < high:
        raise ValueError(f"need 0 < low < high, got {low}, {high}")
    width, low_passed = high - low, False
    probes = [probe(high)]
    for _ in range(grow):
        if not probes[-1]["pass"]:
            break
        low, high, low_passed = high, high + width, True
        probes.append(probe(high))
    if probes[-1]["pass"]:
        return high, False, probes
    ok, bad = low, high
    for _ in range(steps):
        mid = (ok + bad) / 2
        probes.append(probe(mid))
        ok, bad = (mid, bad) if probes[-1]["pass"] else (ok, mid)
    if ok == low and not low_passed:
        probes.append(probe(low))
        if not probes[-1]["pass"]:
            return None, True, probes
    return ok, True, probes


def trace_rate(trace: Trace) -> float:
    """Conversations per second of the trace's own arrivals."""
    arrivals = [c.arrival_s for c in trace.conversations]
    span = max(arrivals) - min(arrivals) if len(arrivals) >= 2 else 0.0
    if span <= 0:
        raise ValueError("the trace's arrivals have no pace (fewer than two, or all at once)")
    return (len(arrivals) - 1) / span


def _p99(summary: dict[str, Any], metric: str) -> float | None:
    return summary[metric]["p99_ms"]


def passes(summary: dict[str, Any], ttft_slo_ms: float, tpot_slo_ms: float) -> bool:
    ttft, tpot = _p99(summary, "ttft"), _p99(summary, "tpot")
    return (summary["failed"] == 0 and summary["completed"] > 0 and ttft is not None
            and ttft <= ttft_slo_ms and (tpot is None or tpot <= tpot_slo_ms))


def by_priority(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {cls: {"completed": g["completed"], "failed": g["failed"],
                  "ttft_p99_ms": g["ttft"]["p99_ms"], "tpot_p99_ms": g["tpot"]["p99_ms"]}
            for cls, g in summary["by_priority"].items()}


def engine_probe(args: argparse.Namespace, name: str, trace: Trace, rate: float) -> Probe:
    """One replay of ``trace`` through configuration ``name`` at a load, as a probe record."""
    config = ablation_config(name, EngineConfig.from_cli_args(args))

    def probe(load: float) -> dict[str, Any]:
        a = copy.copy(args)
        a.time_scale = rate / load
        if args.step_log is not None:
            a.step_log = Path(args.step_log) / f"{name}_{load:.3f}"
        options = replay_options(a)
        if not args.run_to_end:
            options.stop_when = SloStop(trace.num_requests, args.ttft_slo_ms / 1e3,
                                        args.tpot_slo_ms / 1e3)
        print(f"=== {name} at {load:.3f} conv/s (time-scale {a.time_scale:.4f})", flush=True)
        run = replay_engine(trace, config, options, desc=name, **engine_run_kwargs(a))
        summary = run.summarize(window_s=args.window_s)
        record = {"load_conv_s": load, "time_scale": a.time_scale,
                  "ttft_p99_ms": _p99(summary, "ttft"), "tpot_p99_ms": _p99(summary, "tpot"),
                  "completed": summary["completed"], "failed": summary["failed"],
                  "duration_s": run.duration_s, "stopped": run.stopped,
                  "pass": run.stopped is None and passes(summary, args.ttft_slo_ms,
                                                         args.tpot_slo_ms),
                  "by_priority": by_priority(summary)}
        outcome = ("pass" if record["pass"] else "fail") + (
            f" (stopped after {run.duration_s:.0f} s: {run.stopped})" if run.stopped else "")
        print(f"{name} at {load:.3f} conv/s: P99 TTFT {record['ttft_p99_ms']} ms, P99 TPOT "
              f"{record['tpot_p99_ms']} ms: {outcome}", flush=True)
        return record
    return probe


def claims(capacities: dict[str, float | None]) -> list[dict[str, Any]]:
    """A claim per capacity found and per ratio of two; ``capacities`` holds only the bracketed
    ones (a load the bracket's top still passed is a bound, kept in the figures)."""
    out = [{"name": f"{name}_capacity_conv_s", "value": cap, "unit": "conv/s"}
           for name, cap in capacities.items() if cap is not None]
    for claim, num, den in (("capacity_at_slo_vs_baseline", "full", "baseline"),
                            ("capacity_at_slo_fp8_vs_bf16", "full-fp8", "full")):
        if capacities.get(num) is not None and capacities.get(den):
            out.append({"name": claim, "value": capacities[num] / capacities[den], "unit": "x"})
    return out


def plot(configs: dict[str, dict[str, Any]], path: Path, ttft_slo_ms: float,
         tpot_slo_ms: float) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, slo, label in ((axes[0], "ttft_p99_ms", ttft_slo_ms, "P99 TTFT (ms)"),
                                (axes[1], "tpot_p99_ms", tpot_slo_ms, "P99 TPOT (ms)")):
        for name, result in configs.items():
            points = sorted((p["load_conv_s"], p[key]) for p in result["probes"]
                            if p[key] is not None and not p["stopped"])  # whole replays only
            if points:
                line, = ax.plot(*zip(*points), marker="o", label=name)
                if result["bracketed"] and result["capacity_conv_s"] is not None:
                    # dotted: the capacity found (not a bound the bracket's top still passed)
                    ax.axvline(result["capacity_conv_s"], color=line.get_color(), linestyle=":")
        ax.axhline(slo, color="grey", linestyle="--", label="SLO")
        ax.set(xlabel="load (conversations/s)", ylabel=label, yscale="log")
        ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="full,full-fp8,baseline",
                   help="configurations to bisect, as for --compare (default: "
                        "full,full-fp8,baseline)")
    p.add_argument("--low", type=float, default=2.0,
                   help="lower end of the bracket, conversations/s (default: 2)")
    p.add_argument("--high", type=float, default=16.0,
                   help="upper end of the bracket, conversations/s (default: 16)")
    p.add_argument("--bracket", action="append", default=[], metavar="CONFIG=LOW:HIGH",
                   help="this configuration's own bracket instead of --low/--high (repeatable): "
                        "configurations whose capacities lie far apart each probe near theirs")
    p.add_argument("--steps", type=int, default=5, help="bisection steps (default: 5)")
    p.add_argument("--grow", type=int, default=2,
                   help="while --high passes, move the bracket up by its width, at most this "
                        "many times (default: 2)")
    p.add_argument("--tpot-slo-ms", type=float, default=100.0,
                   help="P99 TPOT target in ms (default: 100)")
    p.add_argument("--run-to-end", action="store_true",
                   help="replay every probe to its end (default: stop a probe once it has "
                        "certainly missed a target)")
    p.add_argument("--output", type=Path, default=Path("benchmarks/results/capacity.json"),
                   help="result file (default: benchmarks/results/capacity.json)")
    p.add_argument("--commit", default=None, help="commit to record (default: git HEAD)")
    add_bench_args(p)
    p.set_defaults(ttft_slo_ms=2000.0)  # the P99 TTFT target here (default: 2000)
    return p


def parse_brackets(specs: list[str], names: list[str], low: float, high: float
                   ) -> dict[str, tuple[float, float]]:
    """Each configuration's (low, high): --low/--high unless a ``CONFIG=LOW:HIGH`` names it."""
    brackets = {name: (low, high) for name in names}
    given: set[str] = set()
    for spec in specs:
        name, _, bounds = spec.partition("=")
        lo, sep, hi = bounds.partition(":")
        try:
            bracket = (float(lo), float(hi)) if sep else None
        except ValueError:
            bracket = None
        if bracket is None or not 0 < bracket[0] < bracket[1] < float("inf"):
            raise ValueError(f"--bracket {spec!r}: expected CONFIG=LOW:HIGH with 0 < LOW < HIGH")
        if name not in brackets:
            raise ValueError(f"--bracket {spec!r}: {name!r} is not one of --configs "
                             f"({', '.join(names)})")
        if name in given:
            raise ValueError(f"--bracket {spec!r}: {name!r} has a bracket already")
        given.add(name)
        brackets[name] = bracket
    return brackets


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        names = parse_names(args.configs)
    except ValueError as e:
        parser.error(str(e))
    if args.compare is not None or args.url is not None:
        parser.error("give the configurations with --configs (in-process only)")
    if args.request_rate is not None or args.max_concurrency is not None:
        parser.error("--request-rate and --max-concurrency would set the arrivals that the "
                     "load does: the load scales the trace's own arrivals")
    if args.steps < 0 or args.grow < 0 or not 0 < args.low < args.high:
        parser.error("need --steps >= 0, --grow >= 0 and 0 < --low < --high")
    try:
        brackets = parse_brackets(args.bracket, names, args.low, args.high)
    except ValueError as e:
        parser.error(str(e))
    if not (args.ttft_slo_ms > 0 and args.tpot_slo_ms > 0):
        parser.error("need --ttft-slo-ms > 0 and --tpot-slo-ms > 0")
    if args.tbt_slo_ms is not None:
        parser.error("the targets here are P99 TTFT and P99 TPOT: give --tpot-slo-ms, not "
                     "--tbt-slo-ms")
    try:  # what the probes' reports would refuse after a run
        check_report_args(args)
    except (ValueError, OSError) as e:
        parser.error(str(e))
    check_output(parser, args.output)
    trace = load_trace(args)
    rate = trace_rate(trace)

    configs: dict[str, dict[str, Any]] = {}
    with keep_pinned():  # one pinned swap space serves every engine
        for name in names:
            low, high = brackets[name]
            cap, bracketed, probes = bisect_capacity(engine_probe(args, name, trace, rate),
                                                     low, high, args.steps, args.grow)
            at_cap = next((p for p in probes if p["load_conv_s"] == cap and p["pass"]), None)
            configs[name] = {"capacity_conv_s": cap, "bracketed": bracketed,
                             "bracket": [low, high],
                             "resolution_conv_s": (high - low) / 2 ** args.steps,
                             "probes": probes,
                             "by_priority_at_capacity": at_cap and at_cap["by_priority"]}

    print(f"\nCapacity at P99 TTFT <= {args.ttft_slo_ms:g} ms, P99 TPOT <= "
          f"{args.tpot_slo_ms:g} ms")
    for name, result in configs.items():
        cap = result["capacity_conv_s"]
        note = (f" (resolution {result['resolution_conv_s']:.3f} conv/s)" if result["bracketed"]
                else " (at least: the bracket's top passed)")
        print(f"{name:>12}: {'below its low end' if cap is None else f'{cap:.3f} conv/s'}"
              f"{note}")
        for cls, g in (result["by_priority_at_capacity"] or {}).items():
            print(f"{'priority ' + cls:>24}: P99 TTFT {g['ttft_p99_ms']} ms, "
                  f"P99 TPOT {g['tpot_p99_ms']} ms, {g['completed']} requests")
    out = claims({name: r["capacity_conv_s"] for name, r in configs.items() if r["bracketed"]})
    for c in out:
        if c["unit"] == "x":
            print(f"{c['name']}: {c['value']:.2f}x")
    plots_dir = args.plots_dir or args.output.parent / "plots" / args.output.stem
    path = plot(configs, Path(plots_dir) / "capacity.png", args.ttft_slo_ms, args.tpot_slo_ms)
    figures = {"slo": {"ttft_p99_ms": args.ttft_slo_ms, "tpot_p99_ms": args.tpot_slo_ms},
               "trace_rate_conv_s": rate, "low": args.low, "high": args.high,
               "steps": args.steps, "grow": args.grow, "configs": configs,
               "plot": path and str(path)}
    return write_results(args.output, command=command_line(), figures=figures, claims=out,
                         commit=args.commit)


if __name__ == "__main__":
    main()
