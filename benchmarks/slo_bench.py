"""SLO benchmark: ``fairswitch bench`` recorded as a result file (device, date, commit, command).

Takes every option of ``fairswitch bench`` (trace, target, SLOs, ``--compare``) plus ``--output``.
Claims: for one run its TTFT/TBT tails, throughput and SLO attainment; with ``--compare``, each
configuration's P99 TTFT, P99 TBT and throughput as ratios against the baseline (above 1: better
than the baseline), the figures ``fairswitch bench`` prints, and ``full`` against every other
configuration compared (``full_p99_ttft_vs_no-duplex``...), printed after them; with ``full``
and ``full-fp8`` both compared, ``fp8_kv_throughput_vs_bf16``. ``--claim-prefix`` names a
setting's claims apart (``qwen32b_p99_ttft_speedup_vs_baseline``).

    python3 benchmarks/slo_bench.py --trace workloads/traces/T.jsonl --compare full,baseline \\
        --ttft-slo-ms 2000 --tbt-slo-ms 200 --output benchmarks/results/slo_compare.json
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


from fairswitch.bench.report import comparison_ratios, get_path
from fairswitch.cli.bench import DESCRIPTION, add_bench_args, bench
from results_io import check_output, command_line, write_results

# (claim suffix, path into a summary, unit)
RUN_CLAIMS = (("ttft_p99_ms", ("ttft", "p99_ms"), "ms"), ("tbt_p99_ms", ("tbt", "p99_ms"), "ms"),
              ("output_tok_s", ("output_throughput",), "tok/s"),
              ("slo_attainment", ("slo_attainment", "both"), "fraction"),
              ("goodput_req_s", ("goodput",), "req/s"),
              ("jain_index", ("fairness", "jain"), "index"))
RATIO_CLAIMS = (("p99_ttft_vs", "P99 TTFT (ms)"), ("p99_tbt_vs", "P99 TBT (ms)"),
                ("p999_tbt_vs", "P99.9 TBT (ms)"),  # (README's tables quote P99.9 TBT)
                ("output_tok_s_vs", "Output throughput (tok/s)"))


# The names for fairswitch (``full``) against ``baseline``: label in comparison ratios.
HEADLINE_CLAIMS = (("p99_ttft_speedup_vs_baseline", "P99 TTFT (ms)"),
                   ("p999_tbt_speedup_vs_baseline", "P99.9 TBT (ms)"),
                   ("throughput_ratio_vs_baseline", "Output throughput (tok/s)"))


def claims(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Named values of the report; figures that do not exist (no SLO given) are left out."""
    runs = report["runs"] if "runs" in report else {"": {"summary": report["summary"]}}
    out = []
    for name, run in runs.items():
        for suffix, path, unit in RUN_CLAIMS:
            value = get_path(run["summary"], path)
            if value is not None:
                out.append({"name": f"{name}_{suffix}" if name else suffix, "value": value,
                            "unit": unit})
    baseline = report.get("baseline")
    full = report.get("ratios", {}).get("full") if baseline == "baseline" else None
    for name, label in HEADLINE_CLAIMS if full else ():
        if full[label] is not None:
            out.append({"name": name, "value": full[label], "unit": "x"})
    for name, ratios in report.get("ratios", {}).items():
        for prefix, label in RATIO_CLAIMS if name != baseline else ():
            if ratios[label] is not None:
                out.append({"name": f"{name}_{prefix}_{baseline}", "value": ratios[label],
                            "unit": "x"})
    for other, ratios in full_against_others(report).items():
        for prefix, label in RATIO_CLAIMS:
            if ratios[label] is not None:
                out.append({"name": f"full_{prefix}_{other}", "value": ratios[label],
                            "unit": "x"})
    runs = report.get("runs", {})
    if "full" in runs and "full-fp8" in runs:  # the same engine with its KV cache in fp8
        fp8, bf16 = (get_path(runs[n]["summary"], ("output_throughput",))
                     for n in ("full-fp8", "full"))
        if fp8 is not None and bf16:  # none when full finished nothing (its failures say why)
            out.append({"name": "fp8_kv_throughput_vs_bf16", "value": fp8 / bf16, "unit": "x"})
    return out


def full_against_others(report: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """``full`` against each compared configuration other than the baseline (an ablation):
    the same ratios, with that configuration as the denominator."""
    runs = report.get("runs", {})
    if "full" not in runs:
        return {}
    summaries = {name: run["summary"] for name, run in runs.items()}
    return {other: comparison_ratios(summaries, other)["full"] for other in runs
            if other not in ("full", report.get("baseline"))}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=DESCRIPTION)
    p.add_argument("--output", type=Path, default=Path("benchmarks/results/slo_bench.json"),
                   help="result file (default: benchmarks/results/slo_bench.json)")
    p.add_argument("--commit", default=None, help="commit to record (default: git HEAD)")
    p.add_argument("--claim-prefix", default="",
                   help="put before every claim's name, for a setting of its own (qwen32b_)")
    add_bench_args(p)
    args = p.parse_args(argv)
    check_output(p, args.output)
    report = bench(args)
    for other, ratios in full_against_others(report).items():
        print(f"full vs {other}: " + ", ".join(
            f"{label} {value:.2f}x" for label, value in ratios.items() if value is not None))
    named = [{**c, "name": args.claim_prefix + c["name"]} for c in claims(report)]
    for c in named:
        if c["unit"] == "x":
            print(f"{c['name']}: {c['value']:.2f}x")
    return write_results(args.output, command=command_line(), figures=report, claims=named,
                         commit=args.commit)


if __name__ == "__main__":
    main()
