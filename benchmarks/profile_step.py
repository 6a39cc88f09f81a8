"""Where a decode step's GPU time goes: kernel-level profile of engine steps at one batch size.

Not a claim benchmark: a tool for finding what to fuse or fix next. Prints the top kernels by
total CUDA time over ``--steps`` steps of the engine after the batch is prefilled.
"""

from __future__ import annotations

import argparse

import torch


from decode_step import prefill_batch, time_steps
from engine_options import add_engine_options, engine_config
from fairswitch.engine.engine import Engine


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_engine_options(p, fixed={"max_num_seqs": "--batch", "max_model_len": "--ctx + 512"},
                       model="llama-3-8b", load_format="dummy", max_num_batched_tokens=8192)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args(argv)
    engine = Engine(engine_config(p, args, max_num_seqs=args.batch,
                                  max_model_len=args.ctx + 512))
    ids = prefill_batch(engine, args.batch, args.ctx, args.steps + 3, 0)
    for _ in range(3):
        engine.step()  # warm up this batch size
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        r = time_steps(engine, ids, args.steps)
    print(f"step {r['step_ms']:.2f} ms (profiled)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows,
                                    max_name_column_width=70))


if __name__ == "__main__":
    main()
