"""``fairswitch steps``: read step logs (``fairswitch bench --step-log DIR``): where each run's
time went (decode-only steps against steps with prompt tokens, time with the KV cache full,
preemptions) and the run window by window."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from fairswitch.bench.step_report import (format_summary, format_windows, step_windows,
                                          summarize_steps)
from fairswitch.cli.files import check_input_file, check_writable
from fairswitch.engine.step_log import read_step_log


def add_parser(subs: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subs.add_parser("steps", help="read step logs: where a run's time went, window by window",
                        description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("logs", type=Path, nargs="+", metavar="LOG",
                   help="step log files (DIR/<run>.json written by bench --step-log)")
    p.add_argument("--window-s", type=float, default=10.0,
                   help="window of the per-window table (default: 10)")
    p.add_argument("--full-fraction", type=float, default=0.05,
                   help="the KV cache counts as full with at most this fraction of its blocks "
                        "free (default: 0.05)")
    p.add_argument("--no-windows", action="store_true", help="print the summaries only")
    p.add_argument("--output-json", type=Path, default=None,
                   help="write the summaries and windows as JSON")
    p.set_defaults(run=run)
    return p


class _Stdout:
    """Prints until whoever reads stdout stops (``fairswitch steps LOG | head``), then stays
    quiet: the work (the --output-json file) still completes."""

    def __init__(self) -> None:
        self.closed = False

    def print(self, text: str = "") -> None:
        if self.closed:
            return
        try:
            print(text)
            sys.stdout.flush()
        except BrokenPipeError:
            self.closed = True
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # the interpreter's last flush goes nowhere
            os.close(devnull)


def run(args: argparse.Namespace) -> int:
    if not (math.isfinite(args.window_s) and args.window_s > 0):
        raise ValueError(f"--window-s must be finite and > 0, got {args.window_s}")
    if not 0 <= args.full_fraction < 1:
        raise ValueError(f"--full-fraction must be in [0, 1), got {args.full_fraction}")
    for path in args.logs:
        check_input_file(path, "step log")
    if args.output_json is not None:
        check_writable(args.output_json, "--output-json")
    out = _Stdout()
    report = {}
    for path in args.logs:
        log = read_step_log(path)
        summary = summarize_steps(log, args.full_fraction)
        windows = step_windows(log, args.window_s)
        name = path.stem
        if name in report:
            name = str(path)
        report[name] = {"summary": summary, "windows": windows}
        out.print(format_summary(name, summary))
        if not args.no_windows and windows:
            out.print(format_windows(windows))
        out.print()
    if args.output_json is not None:
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        args.output_json.write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
        out.print(f"wrote {args.output_json}")
    return 1 if out.closed else 0
