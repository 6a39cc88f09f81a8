"""Switch stall: how much of a preemption-heavy decode run the GPU sits idle for context switches.

One run, the same workload on two engines built one after the other (default Llama-3-8B shapes,
dummy weights, bf16): fairswitch (block groups, async copies per extent, incremental swap-out) and
baseline mode (vLLM 0.3.3: 16-token blocks from a free list, per-block-per-layer synchronous
copies, no incremental swap). The workload: ``--requests`` requests of random prompts
(``--min-prompt``..``--max-prompt`` tokens) decoding ``--output-tokens`` each, at most
``--max-num-seqs`` at a time, under the ``trace`` policy (priorities redrawn at random every
iteration with probability ``--priority-update-prob``), every victim swapped
(``--preemption-mode swap``).

The engine's step is synchronous with the GPU (sampling reads the tokens back), so host time spent
in the swap manager (planning, submitting copies, polling, waiting for copies) is time the GPU has
nothing queued: ``switch_stall_s``. Claims: ``switch_stall_fraction`` = stall / wall time for
fairswitch, ``switch_stall_fraction_baseline`` the same for the baseline.
"""

from __future__ import annotations

import argparse
import gc
import random
import time
from typing import Any

import torch


from engine_options import add_engine_options, engine_config, random_token_ids, vocab_size
from fairswitch.config import EngineConfig
from fairswitch.engine.engine import Engine
from fairswitch.sampling_params import SamplingParams
from results_io import command_line, write_results

MODES = {"fairswitch": {}, "baseline": {"baseline": True},
         # ablation: a resumed request joins the step after the host sees its swap-in land
         "fairswitch-late": {"early_swap_in": False}}


def run_mode(name: str, config: EngineConfig, args: argparse.Namespace,
             prompts: list[list[int]]) -> dict[str, Any]:
    engine = Engine(config.with_options(**MODES[name]))
    params = SamplingParams(max_tokens=args.output_tokens, temperature=0.0, ignore_eos=True,
                            detokenize=False)
    for p in prompts:
        engine.add_request(prompt_token_ids=p, params=params)
    num_tokens = 0
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        num_tokens += len(engine.step())
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    wall = time.perf_counter() - t0
    m = engine.switch_metrics()
    engine.check_accounting()
    row = {"mode": name, "wall_s": wall, "output_tokens": num_tokens, "tok_s": num_tokens / wall,
           "stall_fraction": m["switch_stall_s"] / wall, "wait_fraction": m["switch_wait_s"] / wall,
           "block_size": engine.kv.block_size, **m}
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_engine_options(
        p, fixed={"max_model_len": "--max-prompt + --output-tokens + 16",
                  "priority_update_seed": "--seed", "baseline": "--modes"},
        model="llama-3-8b", load_format="dummy", max_num_seqs=16, max_num_batched_tokens=8192,
        kv_cache_memory_gib=8.0, swap_space=16.0, preemption_mode="swap", policy="trace",
        priority_update_prob=0.02, enable_prefix_caching=False)
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--min-prompt", type=int, default=512)
    p.add_argument("--max-prompt", type=int, default=1536)
    p.add_argument("--output-tokens", type=int, default=192)
    p.add_argument("--modes", default="fairswitch,baseline",
                   help=f"engines to run, comma-separated, from {', '.join(MODES)} (fairswitch "
                   "and baseline are required: the claims compare them)")
    p.add_argument("--output", default="benchmarks/results/switch_stall.json")
    p.add_argument("--commit", default=None)
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    if not {"fairswitch", "baseline"} <= set(modes) or not set(modes) <= set(MODES):
        p.error(f"--modes {args.modes!r}: fairswitch and baseline, plus any of {', '.join(MODES)}")
    config = engine_config(p, args, max_model_len=args.max_prompt + args.output_tokens + 16,
                           priority_update_seed=args.seed, baseline=False)
    rng = random.Random(args.seed)
    vocab = vocab_size(args.model)
    prompts = [random_token_ids(rng, rng.randint(args.min_prompt, args.max_prompt), vocab)
               for _ in range(args.requests)]
    rows = [run_mode(name, config, args, prompts) for name in modes]
    print(f"{'mode':<16}{'wall s':>8}{'tok/s':>8}{'preempt':>9}{'GB moved':>10}{'copies':>9}"
          f"{'KiB/copy':>10}{'stall s':>9}{'stall %':>9}{'wait %':>8}")
    for r in rows:
        moved = (r["swap_bytes_out"] + r["swap_bytes_in"]) / 1e9
        print(f"{r['mode']:<16}{r['wall_s']:>8.2f}{r['tok_s']:>8.0f}"
              f"{r['preemptions_swap']:>9}{moved:>10.2f}{r['swap_copies']:>9}"
              f"{r['swap_bytes_per_copy'] / 1024:>10.0f}{r['switch_stall_s']:>9.3f}"
              f"{100 * r['stall_fraction']:>9.2f}{100 * r['wait_fraction']:>8.2f}")
    fast, base = (next(r for r in rows if r["mode"] == m) for m in ("fairswitch", "baseline"))
    print(f"stall fraction: fairswitch {fast['stall_fraction']:.4f}, baseline "
          f"{base['stall_fraction']:.4f}; throughput ratio {fast['tok_s'] / base['tok_s']:.2f}x")
    claims = [
        {"name": "switch_stall_fraction", "value": fast["stall_fraction"], "unit": "fraction"},
        {"name": "switch_stall_fraction_baseline", "value": base["stall_fraction"],
         "unit": "fraction"},
    ]
    figures = {"model": args.model, "requests": args.requests,
               "prompt_tokens": [len(x) for x in prompts], "output_tokens": args.output_tokens,
               "max_num_seqs": config.scheduler.max_num_seqs,
               "kv_cache_gib": config.cache.kv_cache_memory_gib,
               "update_prob": config.scheduler.priority_update_prob,
               "copy_backend": config.cache.swap_copy_backend,
               "throughput_ratio": fast["tok_s"] / base["tok_s"], "modes": rows}
    return write_results(args.output, command=command_line(), figures=figures, claims=claims,
                         commit=args.commit)


if __name__ == "__main__":
    main()
