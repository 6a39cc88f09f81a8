"""PNG figures comparing runs: latency CDFs, latency tails over time, per-client service.

matplotlib is optional (the ``plots`` extra) and imported only here, when plots are asked for.
Figures are drawn on ``matplotlib.figure.Figure`` directly, never through pyplot: no display, no
global backend switch, no figure registry to leak, and the same records give the same files.
Each run keeps one colour (``C0``, ``C1``, ... in the order given) in every figure.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fairswitch.bench.fairness import jain_index, service_windows
from fairswitch.bench.records import RequestRecord

MAX_LEGEND_CLIENTS = 12


def figure_class() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plots need matplotlib: "
                          "pip install 'fairswitch[plots]'") from e
    return Figure


def _ttft(records: Sequence[RequestRecord]) -> tuple[np.ndarray, np.ndarray]:
    """(arrival time s, TTFT ms) of the successful requests."""
    ok = [r for r in records if r.ok]
    return (np.array([r.arrival_s for r in ok], dtype=float),
            np.array([r.ttft_s for r in ok], dtype=float) * 1000.0)


def _tbt(records: Sequence[RequestRecord]) -> tuple[np.ndarray, np.ndarray]:
    """(time of the later token s, gap ms) of every gap of the successful requests."""
    times, gaps = [np.zeros(0)], [np.zeros(0)]
    for r in records:
        if r.ok and r.output_tokens > 1:
            t = np.asarray(r.token_times_s, dtype=float)
            times.append(t[1:])
            gaps.append(np.diff(t) * 1000.0)
    return np.concatenate(times), np.concatenate(gaps)


def windowed_percentile(times: np.ndarray, values: np.ndarray, t0: float, window_s: float,
                        q: float) -> tuple[np.ndarray, np.ndarray]:
    """(window midpoints, q-th percentile of the values falling in each non-empty window)."""
    if times.size == 0:
        return np.zeros(0), np.zeros(0)
    k = np.floor((times - t0) / window_s).astype(np.int64)
    order = np.argsort(k, kind="stable")
    k, values = k[order], values[order]
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    groups = np.split(values, starts[1:])
    mids = t0 + (k[starts] + 0.5) * window_s
    return mids, np.array([np.percentile(g, q) for g in groups])


def _cdf(fig_cls: Any, series: dict[str, np.ndarray], xlabel: str, title: str, path: Path) -> Path:
    fig = fig_cls(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for i, (name, ms) in enumerate(series.items()):
        if ms.size == 0:
            continue
        x = np.sort(ms)
        y = np.arange(1, x.size + 1) / x.size
        # A log axis cannot show zero gaps (tokens of one chunk); the curve starts at their share.
        pos = x > 0
        ax.step(x[pos], y[pos], where="post", color=f"C{i}", label=f"{name} (n={x.size})")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of samples <= x")
    ax.set_ylim(0, 1.01)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right")
    fig.savefig(path, dpi=100)
    return path


def _over_time(fig_cls: Any, runs: dict[str, list[RequestRecord]], which: str, window_s: float,
               path: Path) -> Path:
    fig = fig_cls(figsize=(9, 4.5))
    ax = fig.add_subplot()
    for i, (name, records) in enumerate(runs.items()):
        times, ms = _ttft(records) if which == "TTFT" else _tbt(records)
        if times.size == 0:
            continue
        if which == "TTFT":  # one point per request; TBT has far too many gaps to scatter
            ax.scatter(times, ms, s=6, alpha=0.35, color=f"C{i}", linewidths=0)
        t0 = min(r.arrival_s for r in records)
        mids, p99 = windowed_percentile(times, ms, t0, window_s, 99)
        ax.plot(mids, p99, marker="o", ms=3, color=f"C{i}", label=f"{name} P99")
    ax.set_xlabel("time since replay start (s)")
    ax.set_ylabel(f"{which} (ms)")
    ax.set_title(f"{which} over time (P99 per {window_s:g} s window"
                 + (", points = requests)" if which == "TTFT" else ")"))
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left")
    fig.savefig(path, dpi=100)
    return path


def _service(fig_cls: Any, runs: dict[str, list[RequestRecord]], window_s: float,
             path: Path) -> Path:
    fig = fig_cls(figsize=(9, 2.6 * max(1, len(runs)) + 0.6))
    axes = fig.subplots(max(1, len(runs)), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (name, records) in zip(axes, runs.items()):
        sw = service_windows(records, window_s)
        starts = sw.t0_s + window_s * np.arange(sw.num_windows + 1)
        for i, client in enumerate(sw.clients):
            rate = sw.service[i] / window_s
            # Repeat the last value so the final window is drawn as a full step.
            ax.step(starts, np.r_[rate, rate[-1:]], where="post", label=client)
        jain = jain_index(sw.service.sum(axis=1))
        ax.set_title(f"{name}: service per client (Jain {jain:.3f})" if jain is not None
                     else f"{name}: service per client")
        ax.set_ylabel("(in + 2*out) tok/s")
        ax.grid(True, alpha=0.3)
        if 0 < len(sw.clients) <= MAX_LEGEND_CLIENTS:
            ax.legend(loc="upper right", fontsize="small")
    axes[-1].set_xlabel(f"time since replay start (s), {window_s:g} s windows")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def write_plots(runs: dict[str, list[RequestRecord]], out_dir: Path, prefix: str,
                window_s: float = 10.0) -> list[Path]:
    """Write ``{prefix}_{ttft_cdf,tbt_cdf,ttft_time,tbt_time,service}.png``; returns their paths."""
    if not runs:
        raise ValueError("write_plots needs at least one run")
    if not window_s > 0:
        raise ValueError(f"window_s must be > 0, got {window_s}")
    fig_cls = figure_class()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ttft = {name: _ttft(recs)[1] for name, recs in runs.items()}
    tbt = {name: _tbt(recs)[1] for name, recs in runs.items()}
    return [
        _cdf(fig_cls, ttft, "TTFT (ms)", "TTFT CDF", out_dir / f"{prefix}_ttft_cdf.png"),
        _cdf(fig_cls, tbt, "TBT (ms, every gap)", "TBT CDF", out_dir / f"{prefix}_tbt_cdf.png"),
        _over_time(fig_cls, runs, "TTFT", window_s, out_dir / f"{prefix}_ttft_time.png"),
        _over_time(fig_cls, runs, "TBT", window_s, out_dir / f"{prefix}_tbt_time.png"),
        _service(fig_cls, runs, window_s, out_dir / f"{prefix}_service.png"),
    ]
