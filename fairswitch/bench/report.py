"""Text reports of ``metrics.summarize`` results, and their JSON files.

``format_table`` keeps the layout of ``vllm bench serve`` (a 50-column banner, ``{:<40} {:<10}``
rows) so numbers can be read side by side with vLLM's; values that do not exist print as "n/a".
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from fairswitch.bench.metrics import PERCENTILES

WIDTH = 50

_LATENCY_SECTIONS = (  # summary key, section header, row label
    ("ttft", "Time to First Token", "TTFT"),
    ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
    ("tbt", "Inter-token Latency (every gap)", "TBT"),
    ("e2el", "End-to-end Latency", "E2EL"),
)
_STAT_LABELS = {"mean": "Mean", "median": "Median", "p90": "P90", "p95": "P95", "p99": "P99",
                "p999": "P99.9", "max": "Max"}

# Figures compare() prints: (label, path into the summary, True when higher is better).
KEY_FIGURES: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("P95 TTFT (ms)", ("ttft", "p95_ms"), False),
    ("P99 TTFT (ms)", ("ttft", "p99_ms"), False),
    ("P99.9 TTFT (ms)", ("ttft", "p999_ms"), False),
    ("P99 TBT (ms)", ("tbt", "p99_ms"), False),
    ("P99.9 TBT (ms)", ("tbt", "p999_ms"), False),
    ("Request throughput (req/s)", ("request_throughput",), True),
    ("Output throughput (tok/s)", ("output_throughput",), True),
    ("Goodput (req/s)", ("goodput",), True),
)


def fmt_value(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool) or isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        # Fixed digits as vLLM prints them, unless that would round a small value to zero.
        return f"{value:.{digits}f}" if abs(value) >= 0.01 or value == 0 else f"{value:.3g}"
    return str(value)


def _row(label: str, value: Any, digits: int = 2) -> str:
    return "{:<40} {:<10}".format(label, fmt_value(value, digits)).rstrip()


def _header(text: str, fill: str = "-") -> str:
    return "{s:{c}^{n}}".format(s=text, c=fill, n=WIDTH)


def _pct(fraction: float | None) -> float | None:
    return None if fraction is None else 100.0 * fraction


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        if isinstance(v, dict):
            out.extend(_flatten(v, f"{prefix}{k}."))
        else:
            out.append((f"{prefix}{k}", v))
    return out


def format_table(summary: dict, title: str = "Serving Benchmark Result") -> str:
    s = summary
    lines = [
        _header(f" {title} ", "="),
        _row("Successful requests:", s["completed"]),
        _row("Failed requests:", s["failed"]),
        _row("Benchmark duration (s):", s["duration_s"]),
        _row("Total input tokens:", s["total_input_tokens"]),
        _row("Total generated tokens:", s["total_output_tokens"]),
        _row("Request throughput (req/s):", s["request_throughput"]),
        _row("Output token throughput (tok/s):", s["output_throughput"]),
        _row("Total Token throughput (tok/s):", s["total_token_throughput"]),
    ]
    for key, header, label in _LATENCY_SECTIONS:
        lines.append(_header(header))
        stats = s[key]
        for name in ("mean", *PERCENTILES, "max"):
            lines.append(_row(f"{_STAT_LABELS[name]} {label} (ms):", stats[f"{name}_ms"]))
    if s.get("slo"):
        att = s["slo_attainment"]
        lines.append(_header("SLO"))
        lines.append(_row("TTFT target (ms):", _ms(s["slo"]["ttft_s"])))
        lines.append(_row("TBT target (ms, every gap):", _ms(s["slo"]["tbt_s"])))
        lines.append(_row("Request goodput (req/s):", s["goodput"]))
        lines.append(_row("SLO attainment TTFT (%):", _pct(att["ttft"])))
        lines.append(_row("SLO attainment TBT (%):", _pct(att["tbt"])))
        lines.append(_row("SLO attainment (all targets) (%):", _pct(att["both"])))
    fair = s.get("fairness")
    if fair and fair["service"]:
        lines.append(_header("Fairness"))
        lines.append(_row("Clients:", len(fair["service"])))
        lines.append(_row("Jain's index (service, run):", fair["jain"], 4))
        lines.append(_row("Jain's index (window min):", fair["window_jain"]["min"], 4))
        lines.append(_row("Jain's index (window mean):", fair["window_jain"]["mean"], 4))
        lines.append(_row(f"Max service diff (max, {fmt_value(fair['window_s'])} s win):",
                          fair["max_service_diff"]["max"]))
        lines.append(_row(f"Max service diff (mean, {fmt_value(fair['window_s'])} s win):",
                          fair["max_service_diff"]["mean"]))
        lines.append(_row("Max service diff (max, whole-window backlog):",
                          fair["max_service_diff_continuous"]["max"]))
    if s.get("engine"):
        lines.append(_header("Engine"))
        lines.extend(_row(f"{k}:", v) for k, v in _flatten(s["engine"]))
    lines.append("=" * WIDTH)
    return "\n".join(lines)


def format_breakdown(summary: dict, by: str = "priority") -> str:
    """One line per priority class or client: counts, TTFT/TBT tails, SLO attainment, service."""
    if by not in ("priority", "client"):
        raise ValueError(f"by must be 'priority' or 'client', got {by!r}")
    groups = summary[f"by_{by}"]
    service = summary.get("fairness", {}).get("service", {}) if by == "client" else {}
    cols = ["ok", "fail", "TTFT p50", "TTFT p99", "TBT p99", "TBT p99.9", "E2EL p50", "SLO %"]
    if by == "client":
        cols.append("service")
    name_w = max([len(by), *(len(k) for k in groups)])
    head = f"{by:<{name_w}} " + " ".join(f"{c:>10}" for c in cols)
    lines = [head, "-" * len(head)]
    for name, g in groups.items():
        att = g["slo_attainment"]
        cells = [g["completed"], g["failed"], g["ttft"]["median_ms"], g["ttft"]["p99_ms"],
                 g["tbt"]["p99_ms"], g["tbt"]["p999_ms"], g["e2el"]["median_ms"],
                 _pct(att["both"]) if att else None]
        if by == "client":
            cells.append(service.get(name))
        lines.append(f"{name:<{name_w}} " + " ".join(f"{fmt_value(c, 1):>10}" for c in cells))
    lines.append("(latencies in ms; SLO % = share of the group's requests meeting every target)")
    return "\n".join(lines)


def get_path(summary: dict, path: tuple[str, ...]) -> float | None:
    value: Any = summary
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None or den == 0 else num / den


def comparison_ratios(summaries: dict[str, dict],
                      baseline: str) -> dict[str, dict[str, float | None]]:
    """Per run and key figure: baseline/run for latencies, run/baseline for throughputs.

    Either way a ratio above 1 means the run did better than the baseline; None where a figure is
    missing or the denominator is zero.
    """
    if baseline not in summaries:
        raise KeyError(f"baseline {baseline!r} is not among the runs {sorted(summaries)}")
    base = summaries[baseline]
    out: dict[str, dict[str, float | None]] = {}
    for name, s in summaries.items():
        ratios: dict[str, float | None] = {}
        for label, path, higher_better in KEY_FIGURES:
            b, r = get_path(base, path), get_path(s, path)
            ratios[label] = _ratio(r, b) if higher_better else _ratio(b, r)
        out[name] = ratios
    return out


def compare(summaries: dict[str, dict], baseline: str) -> str:
    """A table of the key figures per run, each followed by its ratio to the baseline."""
    ratios = comparison_ratios(summaries, baseline)
    names = list(summaries)
    label_w = max(len(label) for label, _, _ in KEY_FIGURES)
    col_w = max(12, *(len(n) for n in names))
    head = f"{'':<{label_w}} " + " ".join(f"{n:>{col_w}}" for n in names)
    lines = [head, "-" * len(head)]
    for label, path, higher_better in KEY_FIGURES:
        values = [fmt_value(get_path(summaries[n], path)) for n in names]
        lines.append(f"{label:<{label_w}} " + " ".join(f"{v:>{col_w}}" for v in values))
        marks = [fmt_value(ratios[n][label]) + "x" if ratios[n][label] is not None else "n/a"
                 for n in names]
        how = "run/base" if higher_better else "base/run"
        lines.append(f"{'  ratio ' + how:<{label_w}} " + " ".join(f"{m:>{col_w}}" for m in marks))
    lines.append(f"(baseline: {baseline}; a ratio above 1 means better than the baseline)")
    return "\n".join(lines)


def format_failures(failures: list[dict], max_lines: int = 5, width: int = 160) -> str:
    """The distinct errors of failed requests (``metrics.failures``), most frequent first."""
    counts = Counter(f["error"] for f in failures)
    lines = [f"{n:>6} x {_cut(error, width)}" for error, n in counts.most_common(max_lines)]
    if len(counts) > max_lines:
        lines.append(f"{'':>6}   ... and {len(counts) - max_lines} other errors")
    return "\n".join(lines)


def _cut(text: str, width: int) -> str:
    text = " ".join(text.split())  # one line
    return text if len(text) <= width else text[:width - 3] + "..."


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as JSON atomically: readers see the old file or the whole new one.

    NaN and infinities are refused (they are not JSON; summaries use None instead).
    """
    path = Path(path)
    if path.is_dir():  # (os.replace would name the temporary file)
        raise IsADirectoryError(f"{path} is a directory, not a file")
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
