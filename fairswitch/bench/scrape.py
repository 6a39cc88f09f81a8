"""A server's switch metrics from its Prometheus ``/metrics``, under the keys of
``Engine.switch_metrics()``, so that HTTP and in-process runs report the same fields.

A server's counters count since it started, and it may have served other work before the
benchmark: ``switch_metrics_delta`` takes the counters' growth over the run (scraped before and
after) and the gauges as they were at the end.
"""

from __future__ import annotations

import math
import re

_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')
_LABEL_ESCAPE = re.compile(r"\\(.)")

# (metric name without prefix, label that must match or None) -> switch_metrics() key
COUNTERS: dict[tuple[str, tuple[str, str] | None], str] = {
    ("num_preemptions_total", ("mode", "swap")): "preemptions_swap",
    ("num_preemptions_total", ("mode", "recompute")): "preemptions_recompute",
    ("num_rank_preemptions_total", None): "preemptions_rank",
    ("swap_bytes_total", ("direction", "out")): "swap_bytes_out",
    ("swap_bytes_total", ("direction", "in")): "swap_bytes_in",
    ("swap_copies_total", None): "swap_copies",
    ("swap_busy_seconds_total", ("direction", "out")): "swap_busy_s_out",
    ("swap_busy_seconds_total", ("direction", "in")): "swap_busy_s_in",
    ("swap_queued_seconds_total", ("direction", "out")): "swap_queued_s_out",
    ("swap_queued_seconds_total", ("direction", "in")): "swap_queued_s_in",
    ("switch_stall_seconds_total", None): "switch_stall_s",
    ("switch_wait_seconds_total", None): "switch_wait_s",
    ("kv_reuse_hits_total", ("tier", "gpu")): "reused_tokens",
    ("kv_reuse_hits_total", ("tier", "cpu")): "reused_tokens_cpu",
    ("gc_pause_seconds_total", None): "gc_pause_s",
    ("kernel_compile_seconds_total", None): "kernel_compile_s",
}
GAUGES: dict[tuple[str, tuple[str, str] | None], str] = {
    ("num_requests_swapped", None): "num_swapped",
    ("gpu_cache_usage_perc", None): "gpu_kv_usage",
    ("cpu_cache_usage_perc", None): "cpu_kv_usage",
}


def parse_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample line; label values with escapes are unescaped."""
    samples = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, labels = line, {}
        if "{" in line:
            name, rest = line.split("{", 1)
            body, _, value_text = rest.rpartition("}")
            labels = _parse_labels(body)
        else:
            name, _, value_text = line.partition(" ")
        value_text = value_text.split()[0]  # a timestamp may follow the value
        value = {"+Inf": math.inf, "-Inf": -math.inf}.get(value_text)
        samples.append((name, labels, float(value_text) if value is None else value))
    return samples


def _parse_labels(body: str) -> dict[str, str]:
    return {m[1]: _LABEL_ESCAPE.sub(lambda e: "\n" if e[1] == "n" else e[1], m[2])
            for m in _LABEL.finditer(body)}


def _select(samples, table) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, labels, value in samples:
        _, colon, short = name.rpartition(":")  # under any server's --metrics-prefix
        if not colon:
            continue
        for (metric, label), key in table.items():
            if metric == short and (label is None or labels.get(label[0]) == label[1]):
                out[key] = out.get(key, 0.0) + value  # summed over model_name labels
    return out


def switch_metrics(text: str) -> dict[str, float]:
    """Counters (cumulative) and gauges of one scrape, with derived ``swap_bytes_per_copy``."""
    samples = parse_samples(text)
    return with_derived({**_select(samples, COUNTERS), **_select(samples, GAUGES)})


def switch_metrics_delta(before: str, after: str) -> dict[str, float]:
    """Counters' growth between two scrapes, gauges from the second."""
    first, last = parse_samples(before), parse_samples(after)
    start, end = _select(first, COUNTERS), _select(last, COUNTERS)
    delta = {key: value - start.get(key, 0.0) for key, value in end.items()}
    return with_derived({**delta, **_select(last, GAUGES)})


def with_derived(metrics: dict[str, float]) -> dict[str, float]:
    if "swap_copies" in metrics:
        copies = metrics["swap_copies"]
        moved = metrics.get("swap_bytes_out", 0.0) + metrics.get("swap_bytes_in", 0.0)
        metrics["swap_bytes_per_copy"] = moved / copies if copies else 0.0
    return metrics
