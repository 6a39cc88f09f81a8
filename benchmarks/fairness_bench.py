"""VTC vs FCFS under overload, at loads set from the engine's measured capacity (issue 26).

Capacity: the request rate the engine sustains on a workload's request lengths, measured by a
closed loop that keeps it saturated (fairswitch/bench/overload.py), once per length family
(``synthetic``, ``sharegpt``), and written to ``<output-dir>/fairness_capacity_<lengths>.json``;
later commands take it back with ``--capacity-from`` (or ``--capacity-rps``) instead of measuring
again.

Runs: per workload (workloads/fairness.py) and load (a multiple of the capacity, all clients
together), each policy's engine serves the same trace for ``--duration-s`` and the run is cut
there (an overloaded queue never drains). One file per workload and load,
``<output-dir>/fairness_<workload>_<load>x.json``, plots in ``<plots-dir>/fairness_<workload>_
<load>x/``. Measures (fairswitch/bench/service_diff.py): for every pair of clients and every
interval both are backlogged in, the service difference, its worst case against VTC's bound
computed from this run's configuration, the per-window distribution, throughput, light clients'
TTFT, accumulated service per client. Claims: ``<policy>_max_backlogged_diff_vs_bound``,
``vtc_service_diff_reduction_vs_fcfs`` (FCFS's worst difference / VTC's),
``vtc_throughput_vs_fcfs``; with client weights, ``weighted_vtc_service_ratio_error``.

    PYTHONPATH=. python3 benchmarks/fairness_bench.py --capacity-only \\
        --workloads rates-4-2-1-1,sharegpt-onoff-8
    PYTHONPATH=. python3 benchmarks/fairness_bench.py --workloads rates-4-2-1-1 --loads 3 \\
        --capacity-from
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from engine_options import add_engine_options, engine_config
from results_io import command_line, write_results

from fairswitch.bench.fairness_report import run_figures, weighted_ratio
from fairswitch.bench.overload import TimedJob, capacity, timed_runs
from fairswitch.bench.replay import ReplayOptions
from fairswitch.bench.service_diff import vtc_bound
from fairswitch.cli.replay_args import config_json
from fairswitch.config import EngineConfig
from fairswitch.kv.host_memory import keep_pinned
from workloads.fairness import (
    WORKLOADS,
    LengthLimits,
    Workload,
    build_trace,
    probe_trace,
)

_IN_OUTPUT_DIR = object()  # --capacity-from without a value


def capacity_file(lengths: str) -> str:
    return f"fairness_capacity_{lengths}.json"


def _names(spec: str) -> list[str]:
    return [x.strip() for x in spec.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--workloads", default="rates-4-2-1-1", help=f"comma-separated, of {', '.join(WORKLOADS)}")
    a("--loads", default="1.5,3", help="offered load, multiples of the capacity, comma-separated")
    a("--policies", default=None,
      help="comma-separated (default: vtc for weighted workloads, else fcfs,vtc)")
    a("--duration-s", type=float, default=180.0, help="how long requests arrive; then the cut")
    a("--window-s", type=float, default=10.0, help="window of the per-window distribution")
    a("--trace-seed", type=int, default=0, help="seed of the arrivals and request texts")
    a("--max-input-tokens", type=int, default=1024, help="clip of a request's prompt")
    a("--max-output-tokens", type=int, default=512, help="clip of a request's output")
    a("--capacity-rps", type=float, default=None,
      help="the capacity (requests/s) on the chosen workloads' lengths: no measurement")
    a("--capacity-from", type=Path, nargs="?", const=_IN_OUTPUT_DIR, default=None,
      help="capacities measured before with the same engine configuration: a directory "
           f"holding {capacity_file('<lengths>')} per length family (no value: --output-dir), "
           "or one file (a capacity file or a run's)")
    a("--capacity-only", action="store_true", help="measure the capacity, write it, stop")
    a("--capacity-s", type=float, default=60.0, help="length of one capacity measurement")
    a("--capacity-warmup-s", type=float, default=15.0, help="of it, left out (the batch fills)")
    a("--capacity-concurrency", type=int, default=None,
      help="requests the capacity loop keeps in flight (default: 2 x --max-num-seqs)")
    a("--capacity-requests", type=int, default=4000, help="requests the capacity loop can send")
    a("--output-dir", type=Path, default=Path("benchmarks/results"))
    a("--plots-dir", type=Path, default=Path("benchmarks/results/plots"))
    a("--no-plots", action="store_true")
    a("--no-progress", action="store_true")
    a("--commit", default=None)
    add_engine_options(
        p, fixed={"policy": "--policies", "client_weights": "the workload's weights"},
        shown={"max_starvation_s": "0, off: under minutes of overload every request of an "
                                   "over-share client would end up starving and rank first"},
        model="llama-3-8b", load_format="dummy", kv_cache_memory_gib=3.0, max_num_seqs=128,
        swap_space=16.0, max_starvation_s=0.0)
    args = p.parse_args(argv)
    for name in _names(args.workloads):
        if name not in WORKLOADS:
            p.error(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
    try:
        loads = [float(x) for x in _names(args.loads)]
    except ValueError:
        p.error(f"--loads takes numbers, got {args.loads!r}")
    if not loads or min(loads) <= 0:
        p.error("--loads needs at least one multiple > 0")
    if args.capacity_rps is not None and args.capacity_from is not None:
        p.error("--capacity-rps and --capacity-from are alternatives")
    if args.capacity_only and (args.capacity_rps is not None or args.capacity_from is not None):
        p.error("--capacity-only measures the capacity: it takes no --capacity-rps/-from")
    if args.capacity_from is _IN_OUTPUT_DIR:
        args.capacity_from = args.output_dir
    if args.capacity_warmup_s >= args.capacity_s:
        p.error("--capacity-warmup-s must be shorter than --capacity-s")
    return p, args


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """An engine configuration without what one run of the benchmark changes, its block size
    the one in use (a file written before ``block_size`` could be left unset holds it there)."""
    scheduler = {k: v for k, v in config.get("scheduler", {}).items()
                 if k not in ("policy", "client_weights")}
    cache = dict(config.get("cache", {}))
    if "tokens_per_block" in cache:
        cache["block_size"] = cache.pop("tokens_per_block")
    return {**config, "scheduler": scheduler, "cache": cache}


def capacity_from(path: Path, base: EngineConfig, lengths: list[str]) -> dict[str, float]:
    """Each length family's capacity from ``path`` (see ``--capacity-from``)."""
    capacities = {}
    for k in lengths:
        file = path / capacity_file(k) if path.is_dir() else path
        figures = json.loads(file.read_text())["figures"]
        recorded = _comparable(figures["engine_config"])
        ours = _comparable(config_json(base))
        differ = sorted(f"{section}.{name}" for section in ours for name in ours[section]
                        if name in recorded.get(section, {})
                        and recorded[section][name] != ours[section][name])
        if differ:
            raise ValueError(f"{file} was measured with another engine configuration "
                             f"({', '.join(differ)}): measure again or give --capacity-rps")
        if k not in figures["capacity_rps"]:
            raise ValueError(f"{file} holds no capacity for {k} lengths")
        capacities[k] = float(figures["capacity_rps"][k])
    return capacities


def measure_capacity(args: argparse.Namespace, base: EngineConfig, lengths: list[str],
                     limits: LengthLimits) -> list[dict[str, Any]]:
    """Measure the capacity of each length family, one engine for all; write one file each."""
    concurrency = args.capacity_concurrency or 2 * base.scheduler.max_num_seqs
    options = ReplayOptions(max_concurrency=concurrency, progress=not args.no_progress)
    probes = {k: probe_trace(k, args.capacity_requests, args.trace_seed, limits) for k in lengths}
    jobs = [TimedJob(f"capacity-{k}", trace, args.capacity_s, options)
            for k, trace in probes.items()]
    facts, runs = timed_runs(base.with_options(policy="fcfs"), jobs)
    results = []
    for (k, trace), run in zip(probes.items(), runs):
        mean_out = sum(c.turns[0].output_tokens for c in trace.conversations) / len(
            trace.conversations)
        detail = capacity(run, len(trace.conversations), mean_out, args.capacity_warmup_s)
        print(f"capacity on {k} lengths: {detail['capacity_rps']:.2f} requests/s "
              f"({detail['output_tok_s']:.0f} output tok/s, mean output {mean_out:.0f} tokens, "
              f"{concurrency} in flight)")
        figures = {"capacity_rps": {k: detail["capacity_rps"]}, "capacity": detail,
                   "capacity_s": args.capacity_s, "capacity_concurrency": concurrency,
                   "kv_tokens": facts.kv_tokens, "engine_config": config_json(base)}
        claims = [{"name": f"capacity_rps_{k}", "value": detail["capacity_rps"],
                   "unit": "req/s"}]
        results.append(write_results(args.output_dir / capacity_file(k), command=command_line(),
                                     figures=figures, claims=claims, commit=args.commit))
    return results


def _load_name(load: float) -> str:
    return f"{load:g}x"


def run_workload(args: argparse.Namespace, base: EngineConfig, workload: Workload,
                 load: float, capacity_rps: float, limits: LengthLimits,
                 capacity_source: str) -> dict[str, Any]:
    trace = build_trace(workload, load * capacity_rps, args.duration_s, args.trace_seed, limits)
    policies = _names(args.policies) if args.policies else (
        ["vtc"] if workload.weights_spec else ["fcfs", "vtc"])
    sched = base.scheduler
    light = workload.light_clients(load)
    runs, facts = {}, None
    for policy in policies:
        config = base.with_options(policy=policy, client_weights=workload.weights_spec)
        options = ReplayOptions(progress=not args.no_progress)
        facts, (run,) = timed_runs(config, [TimedJob(f"{workload.name} {load:g}x {policy}",
                                                     trace, args.duration_s, options)])
        runs[policy] = run
    longest_input = max(r.prompt_tokens for run in runs.values() for r in run.records)
    bound = vtc_bound(sched.vtc_input_weight, sched.vtc_output_weight, longest_input,
                      facts.batch_tokens, min(workload.weights.values()))
    rows = {}
    for policy, run in runs.items():
        rows[policy] = {"policy": policy, "engine": run.switch_metrics, **run_figures(
            run.records, run.until_s, input_weight=sched.vtc_input_weight,
            output_weight=sched.vtc_output_weight, weights=workload.weights,
            window_s=args.window_s, bound=bound, light_clients=light)}
    claims, ratio = _claims(rows, workload, runs, sched)
    name = f"fairness_{workload.name}_{_load_name(load)}"
    _print(name, rows, bound)
    figures = {
        "workload": workload.name, "load": load, "capacity_rps": {workload.lengths: capacity_rps},
        "capacity_source": capacity_source, "offered_rps": load * capacity_rps,
        "duration_s": args.duration_s, "window_s": args.window_s, "trace_seed": args.trace_seed,
        "trace_meta": trace.meta, "num_requests": trace.num_requests,
        "demands": dict(zip(workload.client_names, workload.demands(load))),
        "weights": workload.weights, "light_clients": light,
        "bound": {"value": bound, "input_weight": sched.vtc_input_weight,
                  "output_weight": sched.vtc_output_weight, "longest_input": longest_input,
                  "batch_tokens": facts.batch_tokens, "kv_tokens": facts.kv_tokens,
                  "max_num_seqs": facts.max_num_seqs, "max_model_len": facts.max_model_len,
                  "min_client_weight": min(workload.weights.values())},
        "weighted_service_ratio": ratio, "engine_config": config_json(base),
        "policies": rows}
    result = write_results(args.output_dir / f"{name}.json", command=command_line(),
                           figures=figures, claims=claims, commit=args.commit)
    if not args.no_plots:  # after the results: a missing matplotlib loses no run
        from fairswitch.bench.fairness_plots import write_fairness_plots

        for path in write_fairness_plots(rows, bound, args.window_s, args.plots_dir / name,
                                         name):
            print(f"wrote {path}")
    return result


def _claims(rows: dict[str, dict[str, Any]], workload: Workload, runs: dict[str, Any],
            sched: Any) -> tuple[list[dict[str, Any]], float | None]:
    claims = [{"name": f"{policy}_max_backlogged_diff_vs_bound",
               "value": rows[policy]["max_backlogged_diff_vs_bound"], "unit": "x"}
              for policy in ("vtc", "fcfs")
              if policy in rows and rows[policy]["max_backlogged_diff_vs_bound"] is not None]
    if "vtc" in rows and "fcfs" in rows:
        vtc, fcfs = rows["vtc"], rows["fcfs"]
        if vtc["max_backlogged_diff"] and fcfs["max_backlogged_diff"] is not None:
            claims.append({"name": "vtc_service_diff_reduction_vs_fcfs",
                           "value": fcfs["max_backlogged_diff"] / vtc["max_backlogged_diff"],
                           "unit": "x"})
        if fcfs["output_tok_s"]:
            claims.append({"name": "vtc_throughput_vs_fcfs",
                           "value": vtc["output_tok_s"] / fcfs["output_tok_s"], "unit": "x"})
    ratio = None
    if workload.weights_spec and "vtc" in runs:
        # The two most differently weighted clients: the claim is that service follows weight.
        order = sorted(workload.weights, key=workload.weights.get)
        heavy, light = order[-1], order[0]
        run = runs["vtc"]
        ratio = weighted_ratio(run.records, run.until_s, heavy, light,
                               input_weight=sched.vtc_input_weight,
                               output_weight=sched.vtc_output_weight)
        expected = workload.weights[heavy] / workload.weights[light]
        if ratio is not None:
            claims.append({"name": "weighted_vtc_service_ratio", "value": ratio, "unit": "x"})
            claims.append({"name": "weighted_vtc_service_ratio_error",
                           "value": abs(ratio / expected - 1.0), "unit": "fraction"})
    return claims, ratio


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _print(name: str, rows: dict[str, dict[str, Any]], bound: float) -> None:
    """Per policy: the worst backlogged difference and its per-window distribution (service
    units), the worst difference between merely pending clients, light clients' TTFT."""
    print(f"{name}: VTC's bound {bound:.0f}")
    print(f"{'policy':<8}{'done':>7}{'tok/s':>8}{'max diff':>10}{'/bound':>8}{'win P50':>9}"
          f"{'win P90':>9}{'win max':>9}{'pending':>10}{'light TTFT P90 ms':>19}")
    for policy, r in rows.items():
        w = r["window_diff"]
        light = r["light_ttft"]["p90_ms"] if r["light_ttft"] else None
        print(f"{policy:<8}{r['num_finished']:>7}{r['output_tok_s']:>8.0f}"
              f"{_fmt(r['max_backlogged_diff'], '.0f'):>10}"
              f"{_fmt(r['max_backlogged_diff_vs_bound'], '.2f'):>8}"
              f"{_fmt(w['p50'], '.0f'):>9}{_fmt(w['p90'], '.0f'):>9}{_fmt(w['max'], '.0f'):>9}"
              f"{_fmt(r['max_pending_diff'], '.0f'):>10}{_fmt(light, '.0f'):>19}")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p, args = parse_args(argv)
    base = engine_config(p, args, policy="fcfs", client_weights=None)  # each run sets its own
    workloads = [WORKLOADS[name] for name in _names(args.workloads)]
    lengths = sorted({w.lengths for w in workloads})
    limits = LengthLimits(args.max_input_tokens, args.max_output_tokens)
    results = []
    with keep_pinned():  # one pinned swap space serves the engines built one after another
        if args.capacity_rps is not None:
            if len(lengths) > 1:
                p.error("--capacity-rps is one rate: choose workloads of one length family")
            capacities, source = {lengths[0]: args.capacity_rps}, "--capacity-rps"
        elif args.capacity_from is not None:
            try:
                capacities = capacity_from(args.capacity_from, base, lengths)
            except (OSError, KeyError, ValueError) as e:
                p.error(f"--capacity-from: {e}")
            source = str(args.capacity_from)
        else:
            measured = measure_capacity(args, base, lengths, limits)
            if args.capacity_only:
                return measured
            capacities = {k: v for r in measured for k, v in r["figures"]["capacity_rps"].items()}
            source = "measured"
        for workload in workloads:
            for load in (float(x) for x in _names(args.loads)):
                results.append(run_workload(args, base, workload, load,
                                            capacities[workload.lengths], limits, source))
    return results


if __name__ == "__main__":
    main()
