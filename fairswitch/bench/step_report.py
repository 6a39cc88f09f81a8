"""Reading a step log (engine/step_log.py): where the time of a run went, step by step.

``summarize_steps``: the run in one dict: steps, busy time, decode-only steps against steps with
prompt tokens (count, mean and total time), time with the KV cache full (free blocks at most
``full_fraction`` of the cache), preemptions, largest queues. ``step_windows``: the same per
window of ``window_s`` seconds: mean running / waiting / swapped / free blocks, preemptions,
steps, mean step time and tokens sampled per second (one per decode, and per completed prompt
chunk: counted as a batch's sequences, an upper bound by the chunks that do not finish a prompt).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def _cols(log: dict[str, Any]) -> tuple[dict[str, int], np.ndarray]:
    cols = {name: i for i, name in enumerate(log["columns"])}
    rows = np.asarray(log["rows"], dtype=float).reshape(-1, len(cols))
    return cols, rows


def _ms(x: np.ndarray) -> float:
    return float(x.mean() * 1e3) if len(x) else 0.0


def summarize_steps(log: dict[str, Any], full_fraction: float = 0.05) -> dict[str, Any]:
    if not 0 <= full_fraction < 1:
        raise ValueError(f"full_fraction must be in [0, 1), got {full_fraction}")
    c, a = _cols(log)
    num_blocks = log.get("meta", {}).get("num_gpu_blocks")
    if not len(a):
        return {"num_steps": 0, "num_dropped": log.get("num_dropped", 0)}
    step = a[:, c["step_s"]]
    prompt = a[:, c["prefill"]] > 0
    out: dict[str, Any] = {
        "num_steps": len(a),
        "num_dropped": log.get("num_dropped", 0),
        "span_s": float(a[-1, c["t_s"]] + step[-1] - a[0, c["t_s"]]),
        "busy_s": float(step.sum()),
        "schedule_s": float(a[:, c["sched_s"]].sum()),
        "model_s": float(a[:, c["exec_s"]].sum()) if "exec_s" in c else None,
        # scheduling the next step while the GPU ran this one (async scheduling; in model_s)
        "ahead_s": float(a[:, c["ahead_s"]].sum()) if "ahead_s" in c else None,
        "cpu_s": float(a[:, c["cpu_s"]].sum()) if "cpu_s" in c else None,
        # garbage-collector pauses inside steps: their total and the longest step's share
        "gc_s": float(a[:, c["gc_s"]].sum()) if "gc_s" in c else None,
        "gc_max_s": float(a[:, c["gc_s"]].max()) if "gc_s" in c else None,
        # Triton compiles inside steps (new kernel specializations after start-up)
        "jit_s": float(a[:, c["jit_s"]].sum()) if "jit_s" in c else None,
        "jit_steps": int((a[:, c["jit_s"]] > 0).sum()) if "jit_s" in c else None,
        "decode_steps": {"count": int((~prompt).sum()), "mean_ms": _ms(step[~prompt]),
                         "total_s": float(step[~prompt].sum()),
                         "mean_seqs": float(a[~prompt, c["seqs"]].mean()) if (~prompt).any()
                         else 0.0},
        "prompt_steps": {"count": int(prompt.sum()), "mean_ms": _ms(step[prompt]),
                         "total_s": float(step[prompt].sum()),
                         "prompt_tokens": int(a[:, c["prefill"]].sum())},
        "preempted": int(a[:, c["preempted"]].sum()),
        "max_running": int(a[:, c["running"]].max()),
        "max_waiting": int(a[:, c["waiting"]].max()),
        "max_swapped": int(a[:, c["swapped"]].max()),
        "min_free_blocks": int(a[:, c["free"]].min()),
    }
    if num_blocks:
        full = a[:, c["free"]] <= full_fraction * num_blocks
        out["num_gpu_blocks"] = int(num_blocks)
        out["cache_full_s"] = float(step[full].sum())  # busy time with the cache full
        out["cache_full_steps"] = int(full.sum())
    return out


def step_windows(log: dict[str, Any], window_s: float = 10.0) -> list[dict[str, float]]:
    if not (math.isfinite(window_s) and window_s > 0):
        raise ValueError(f"window_s must be finite and > 0, got {window_s}")
    c, a = _cols(log)
    if not len(a):
        return []
    which = np.floor(a[:, c["t_s"]] / window_s)
    rows = []
    for w in np.unique(which):  # (the windows with steps: a gap of hours is not iterated)
        r = a[which == w]
        rows.append({
            "start_s": float(w * window_s),
            "running": float(r[:, c["running"]].mean()),
            "waiting": float(r[:, c["waiting"]].mean()),
            "swapped": float(r[:, c["swapped"]].mean()),
            "free": float(r[:, c["free"]].mean()),
            "preempted": int(r[:, c["preempted"]].sum()),
            "steps": len(r),
            "step_ms": _ms(r[:, c["step_s"]]),
            "tok_s": float(r[:, c["seqs"]].sum() / window_s),
        })
    return rows


def format_summary(name: str, s: dict[str, Any]) -> str:
    if not s["num_steps"]:
        return f"{name}: no steps recorded"
    d, p = s["decode_steps"], s["prompt_steps"]
    model = "" if s.get("model_s") is None else f", model {s['model_s']:.1f} s"
    model += "" if not s.get("ahead_s") else (f" (of which scheduling ahead "
                                              f"{s['ahead_s']:.1f} s)")
    model += "" if s.get("cpu_s") is None else f", process CPU {s['cpu_s']:.1f} s"
    model += "" if s.get("gc_s") is None else (f", garbage collection {s['gc_s']:.2f} s, "
                                               f"at most {s['gc_max_s'] * 1e3:.0f} ms a step")
    model += "" if not s.get("jit_steps") else (f", Triton compiles {s['jit_s']:.2f} s in "
                                                f"{s['jit_steps']} steps")
    lines = [
        f"{name}: {s['num_steps']} steps over {s['span_s']:.1f} s, busy {s['busy_s']:.1f} s "
        f"(scheduling {s['schedule_s']:.1f} s{model})",
        f"  decode-only steps:      {d['count']:>7} x {d['mean_ms']:6.2f} ms = "
        f"{d['total_s']:7.1f} s (mean batch {d['mean_seqs']:.1f})",
        f"  steps with prompt tokens: {p['count']:>5} x {p['mean_ms']:6.2f} ms = "
        f"{p['total_s']:7.1f} s ({p['prompt_tokens']} prompt tokens)",
        f"  preempted {s['preempted']}; most running {s['max_running']}, waiting "
        f"{s['max_waiting']}, swapped {s['max_swapped']}; fewest free blocks "
        f"{s['min_free_blocks']}",
    ]
    if "cache_full_s" in s:
        lines.append(f"  KV cache full ({s['cache_full_steps']} steps): {s['cache_full_s']:.1f} s "
                     f"of busy time ({s['num_gpu_blocks']} blocks)")
    if s["num_dropped"]:
        lines.append(f"  (the log stopped at its bound: {s['num_dropped']} steps not recorded)")
    return "\n".join(lines)


def format_windows(rows: list[dict[str, float]]) -> str:
    head = (f"{'t (s)':>7}{'running':>9}{'waiting':>9}{'swapped':>9}{'free':>8}"
            f"{'preempt':>9}{'steps':>7}{'ms/step':>9}{'tok/s':>8}")
    lines = [head, "-" * len(head)]
    # (whole seconds unless windows are shorter: 0.5 s windows printed 0, 0, 1)
    places = 0 if all(float(r["start_s"]).is_integer() for r in rows) else 2
    for r in rows:
        lines.append(f"{r['start_s']:>7.{places}f}{r['running']:>9.1f}{r['waiting']:>9.1f}"
                     f"{r['swapped']:>9.1f}{r['free']:>8.0f}{r['preempted']:>9d}{r['steps']:>7d}"
                     f"{r['step_ms']:>9.2f}{r['tok_s']:>8.0f}")
    return "\n".join(lines)
