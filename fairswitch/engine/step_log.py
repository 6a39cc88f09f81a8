"""A per-step record of what the engine did and the state it left: the trace to read when a tail
latency needs explaining (a stall, a burst of preemptions, a full KV cache), step by step.

Off unless asked for (``fairswitch bench --step-log DIR``): one row per step that ran a batch,
kept in memory and written as one JSON object ``{"columns": [...], "rows": [[...], ...],
"meta": {...}}`` (meta: ``num_gpu_blocks``, ``block_size``); ``fairswitch steps`` reads it
(bench/step_report.py).

    t_s       seconds since the log started, at the step's start
    step_s    the step's wall time (schedule + model + outputs)
    sched_s   of which scheduling (incl. waiting for swap copies)
    exec_s    of which the model step: inputs, forward, sampling (waits for the GPU); the rest
              of step_s is the host's handling of the outputs (absent from logs written before
              it was added)
    cpu_s     CPU time the process used during the step, all threads (absent likewise): well
              below step_s means the process was waiting, descheduled or blocked, not working
    gc_s      time in garbage collections during the step, any thread's (absent likewise; one
              holds the GIL: the step waits for it unless it is waiting on the GPU meanwhile)
    jit_s     time compiling Triton kernels during the step (absent likewise; after start-up a
              compile is a new kernel specialization: runner/jit_watch.py)
    seqs      requests in the batch; tokens: tokens in the batch; prefill: of which prompt tokens
    running / waiting / swapped / pending_in: queue lengths after scheduling
    free      free KV blocks as the scheduler counts them (free + reserved + evictable)
    evictable cached blocks nobody references; reserved: unused tails of block groups
    in_flight GPU blocks held by copies (draining swap-outs, write-backs)
    preempted requests preempted in the step; rank_total: rank preemptions so far
    stall_s   swap-manager host time so far (switch_stall_s)
    ahead_s   time scheduling the next step while this one ran (async scheduling; part of
              exec_s, not of sched_s, which is then only the time to schedule a step nobody
              scheduled ahead; absent from older logs). With async scheduling a row is the step
              whose tokens the call collected; exec_s also holds launching the next one
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fairswitch.engine.gc_control import GC_CLOCK

COLUMNS = ("t_s", "step_s", "sched_s", "exec_s", "cpu_s", "gc_s", "jit_s", "seqs", "tokens",
           "prefill", "running", "waiting", "swapped", "pending_in", "free", "evictable",
           "reserved", "in_flight", "preempted", "rank_total", "stall_s", "ahead_s")
# Logs written before these columns existed are still read.
_ADDED_LATER = ("exec_s", "cpu_s", "gc_s", "jit_s", "ahead_s")


@dataclass
class StepStats:
    """Cumulative wall time per phase of ``step()`` (perf_counter; a step ends with a device
    sync when tokens are sampled, so execute_s includes the GPU time). With async scheduling
    the next step's scheduling runs inside execute_s, while the GPU computes: it counts in
    schedule_s too."""

    num_steps: int = 0
    schedule_s: float = 0.0
    execute_s: float = 0.0  # input preparation + forward + sampling (+ scheduling ahead)
    prepare_s: float = 0.0  # the input-preparation part of execute_s (host only)
    output_s: float = 0.0  # detokenize, stop checks, outputs

    def add(self, schedule: float, execute: float, output: float, prepare: float) -> None:
        self.num_steps += 1
        self.schedule_s += schedule
        self.execute_s += execute
        self.output_s += output
        self.prepare_s += prepare


class StepLog:
    def __init__(self, max_rows: int = 2_000_000, meta: dict[str, Any] | None = None) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.meta = dict(meta or {})
        self.t0 = time.perf_counter()
        self.max_rows = max_rows
        self.rows: list[tuple[float | int, ...]] = []
        self.num_dropped = 0  # rows past max_rows
        GC_CLOCK.install()  # for the gc_s column

    def record(self, engine: Any, sched: Any, t_start: float, t_sched: float, t_exec: float,
               t_end: float, cpu_s: float, gc_s: float, jit_s: float,
               ahead_s: float = 0.0) -> None:
        """One step of ``engine`` (an ``Engine``) that ran ``sched`` (its ``SchedulerOutput``)."""
        if len(self.rows) >= self.max_rows:
            self.num_dropped += 1
            return
        s, kv, swap = engine.scheduler, engine.kv.blocks, engine.kv.swap
        pc = kv.prefix_cache
        self.rows.append((
            round(t_start - self.t0, 6), round(t_end - t_start, 6), round(t_sched - t_start, 6),
            round(t_exec - t_sched, 6), round(cpu_s, 6), round(gc_s, 6), round(jit_s, 6),
            len(sched.scheduled), sched.num_batched_tokens,
            sum(n for _, n in sched.scheduled if n > 1),
            len(s.running), len(s.waiting), len(s.swapped),
            swap.num_pending_in,
            kv.num_free_blocks, len(pc.evictable) if pc is not None else 0,
            kv.num_reserved_blocks,
            swap.num_gpu_blocks_in_flight(),
            len(sched.preempted), s.num_rank_preemptions,
            round(swap.stall_s, 6), round(ahead_s, 6),
        ))

    def to_json(self) -> dict[str, Any]:
        return {"columns": list(COLUMNS), "rows": [list(r) for r in self.rows],
                "num_dropped": self.num_dropped, "meta": self.meta}

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), separators=(",", ":")))
        return path


def read_step_log(path: str | Path) -> dict[str, Any]:
    """A written step log, checked: ``{"columns", "rows", "meta", "num_dropped"}``; a file that
    is not one raises ValueError naming the file and what is wrong."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a step log (not UTF-8 text: {e.reason})") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from e
    if not isinstance(data, dict) or not {"columns", "rows"} <= data.keys():
        raise ValueError(f"{path}: not a step log (no 'columns' and 'rows')")
    missing = [c for c in COLUMNS if c not in data["columns"] and c not in _ADDED_LATER]
    if missing:
        raise ValueError(f"{path}: step log lacks columns {missing}")
    width = len(data["columns"])
    if not isinstance(data["rows"], list):
        raise ValueError(f"{path}: not a step log ('rows' is not a list)")
    for i, row in enumerate(data["rows"]):
        if not isinstance(row, list) or len(row) != width:
            raise ValueError(f"{path}: row {i} has {len(row) if isinstance(row, list) else '?'} "
                             f"values, expected {width}")
        bad = next((v for v in row if not _finite_number(v)), row)
        if bad is not row:
            raise ValueError(f"{path}: row {i} holds {bad!r:.40}, not a finite number")
    data.setdefault("meta", {})
    data.setdefault("num_dropped", 0)
    if not isinstance(data["meta"], dict):
        raise ValueError(f"{path}: 'meta' must be an object, got {data['meta']!r:.40}")
    blocks = data["meta"].get("num_gpu_blocks")
    if blocks is not None and (type(blocks) is not int or blocks < 0):
        raise ValueError(f"{path}: meta's num_gpu_blocks must be an integer >= 0, got "
                         f"{blocks!r:.40}")
    if type(data["num_dropped"]) is not int or data["num_dropped"] < 0:
        raise ValueError(f"{path}: num_dropped must be an integer >= 0, got "
                         f"{data['num_dropped']!r:.40}")
    return data


def _finite_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)
