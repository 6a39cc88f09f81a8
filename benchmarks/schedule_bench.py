"""Scheduler overhead per iteration: ``schedule()`` + ``update_from_output()`` host time, no model
(CPU).

For each policy and each running-set size R (64/256/1024), R requests run (decoding) while
``--waiting`` (10k) more wait; outputs are fabricated (every scheduled request computes its tokens
and samples one; none finishes). Default scheduler settings (threshold 0, min_run_steps 4), so the
policies' own preemptions are part of the cost (reported as preemptions per step). Priorities are
random over 4 levels; VTC has 16 clients. Claim: ``schedule_ms_256_running`` = mean ms per
iteration with VTC, 256 running and 10k waiting (target < 1 ms).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path


import torch

from fairswitch.config import CacheConfig, SchedulerConfig
from fairswitch.engine.output_processor import OutputProcessor
from fairswitch.kv.kv_cache import KVLayout
from fairswitch.kv.memory import KVMemory
from fairswitch.request import Request
from fairswitch.sampling_params import SamplingParams
from fairswitch.scheduler.scheduler import Scheduler
from results_io import check_output, command_line, write_results

PROMPT_LEN, BLOCK_SIZE = 32, 16


def bench(policy: str, num_running: int, num_waiting: int, warmup: int, steps: int) -> dict:
    rng = random.Random(0)
    config = SchedulerConfig(policy=policy, max_num_seqs=num_running,
                             max_num_batched_tokens=max(4096, num_running * PROMPT_LEN),
                             priority_update_prob=0.01)
    # A KV pool of one-element heads: the scheduler's block accounting at full size, no memory.
    num_blocks = (num_running * 4 + 1000) * 16
    cache = CacheConfig(block_size=BLOCK_SIZE, block_groups=False, enable_prefix_caching=False,
                        swap_space=0)
    kv = KVMemory(cache, KVLayout(1, BLOCK_SIZE, 1, 1, torch.float32), num_blocks,
                  torch.device("cpu"), max_model_len=1 << 21)
    tokens = OutputProcessor(None, set(), 1 << 21)
    sched = Scheduler(config, kv, tokens)
    params = SamplingParams(max_tokens=1 << 20, ignore_eos=True)

    def add(i: int) -> None:
        req = Request(str(i), [1] * PROMPT_LEN, params, float(i), priority=rng.randint(0, 3),
                      client_id=f"c{i % 16}")
        tokens.init_request(req)
        sched.add_request(req)

    def step() -> tuple[float, int]:
        t0 = time.perf_counter()
        out = sched.schedule()
        t1 = time.perf_counter()
        sampled = {req: 2 for req, _, _, samples in out.chunks() if samples}  # the model's part
        t2 = time.perf_counter()
        sched.update_from_output(out, sampled)
        return (t1 - t0) + (time.perf_counter() - t2), len(out.preempted)

    for i in range(num_running):
        add(i)
    step()  # they all start
    for i in range(num_running, num_running + num_waiting):
        add(i)
    for _ in range(warmup):
        step()
    times, preempted = [], 0
    for _ in range(steps):
        dt, n = step()
        times.append(dt * 1e3)
        preempted += n
    return {"policy": policy, "running": num_running, "waiting": len(sched.waiting),
            "mean_ms": statistics.fmean(times), "p50_ms": statistics.median(times),
            "max_ms": max(times), "preemptions_per_step": preempted / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--running", type=int, nargs="+", default=[64, 256, 1024],
                        help="running-set sizes to time (default: 64 256 1024)")
    parser.add_argument("--waiting", type=int, default=10_000,
                        help="requests waiting meanwhile (default: 10000)")
    parser.add_argument("--policies", nargs="+", default=["fcfs", "priority", "vtc", "trace"],
                        help="scheduling policies to time (default: all four)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed iterations (default: 20)")
    parser.add_argument("--steps", type=int, default=100, help="timed iterations (default: 100)")
    parser.add_argument("--output", type=Path,
                        default=Path("benchmarks/results/schedule_bench.json"),
                        help="result file (default: benchmarks/results/schedule_bench.json)")
    parser.add_argument("--commit", default=None, help="commit to record (default: git HEAD)")
    args = parser.parse_args()
    check_output(parser, args.output)
    rows = []
    print(f"{'policy':>9} {'running':>8} {'waiting':>8} {'mean ms':>8} {'p50 ms':>8} "
          f"{'max ms':>8} {'preempt/step':>12}")
    for policy in args.policies:
        for num_running in args.running:
            row = bench(policy, num_running, args.waiting, args.warmup, args.steps)
            rows.append(row)
            print(f"{policy:>9} {num_running:>8} {row['waiting']:>8} {row['mean_ms']:>8.3f} "
                  f"{row['p50_ms']:>8.3f} {row['max_ms']:>8.3f} "
                  f"{row['preemptions_per_step']:>12.2f}", flush=True)
    claims = [{"name": "schedule_ms_256_running", "value": row["mean_ms"], "unit": "ms"}
              for row in rows if row["policy"] == "vtc" and row["running"] == 256]
    if claims:
        print(f"claim schedule_ms_256_running (vtc, {args.waiting} waiting): "
              f"{claims[0]['value']:.3f} ms (target < 1 ms)")
    write_results(args.output, command=command_line(), figures={"rows": rows}, claims=claims,
                  commit=args.commit)


if __name__ == "__main__":
    main()
