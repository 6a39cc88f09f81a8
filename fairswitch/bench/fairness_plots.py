"""PNG figures of a fairness run, drawn from its recorded figures (``fairness_report.run_figures``)
so that a results file can be plotted again without the run.

- ``<prefix>_service.png``: accumulated service per client over time, one panel per policy side
  by side (one line per client, same colour for a client in every panel);
- ``<prefix>_window_diff.png``: per window, the largest service difference between clients
  backlogged through it, per policy, against VTC's bound.

matplotlib is optional (the ``plots`` extra) and drawn on ``Figure`` directly, as plots.py does.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fairswitch.bench.plots import figure_class


def write_fairness_plots(rows: Mapping[str, Mapping[str, Any]], bound: float, window_s: float,
                         out_dir: Path, prefix: str) -> list[Path]:
    """``rows``: policy -> its run figures. Returns the paths written."""
    if not rows:
        raise ValueError("write_fairness_plots needs at least one run")
    figure = figure_class()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [_service(figure, rows, out_dir / f"{prefix}_service.png"),
            _window_diff(figure, rows, bound, window_s, out_dir / f"{prefix}_window_diff.png")]


def _service(figure: Any, rows: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    fig = figure(figsize=(5.5 * len(rows), 4.5))
    axes = fig.subplots(1, len(rows), sharey=True, squeeze=False)[0]
    clients = sorted({c for row in rows.values() for c in row["service_curves"] if c != "t_s"})
    for ax, (policy, row) in zip(axes, rows.items()):
        curves = row["service_curves"]
        for i, client in enumerate(clients):
            if client in curves:
                ax.plot(curves["t_s"], curves[client], color=f"C{i}", label=client)
        ax.set_title(f"{policy}: {row['output_tok_s']:.0f} output tok/s")
        ax.set_xlabel("time since the run started (s)")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("accumulated service (in x w_in + out x w_out)")
    axes[0].legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _window_diff(figure: Any, rows: Mapping[str, Mapping[str, Any]], bound: float,
                 window_s: float, path: Path) -> Path:
    fig = figure(figsize=(9, 4.5))
    ax = fig.add_subplot()
    for i, (policy, row) in enumerate(rows.items()):
        windows = sorted((int(k), v) for k, v in row["window_diffs"].items())
        if windows:
            ax.plot([(k + 0.5) * window_s for k, _ in windows], [v for _, v in windows],
                    marker="o", ms=3, color=f"C{i}", label=policy)
    ax.axhline(bound, color="k", linestyle="--", label="VTC's bound")
    ax.set_yscale("symlog", linthresh=max(bound / 100, 1.0))
    ax.set_xlabel(f"time since the run started (s), {window_s:g} s windows")
    ax.set_ylabel("max service difference, backlogged pairs")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
