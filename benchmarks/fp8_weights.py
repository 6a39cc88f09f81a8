"""FP8 weights (``--quantization fp8``) against the model's own dtype (GPU): decode steps of the
same batches, on engines built one after the other (the first freed), and the weight bytes each
holds.

    python3 benchmarks/fp8_weights.py --batches 1,16,64,256 \\
        --output benchmarks/results/fp8_weights.json

Claims: ``fp8_weights_decode_speedup_b{B}`` = bf16 step time / fp8 step time at batch B. The
accuracy of the same quantization is ``fp8_kv_accuracy.py --quantize weights``'s.
"""

from __future__ import annotations

import argparse
import gc
from typing import Any

import torch

from decode_step import step_times
from engine_options import add_engine_options, engine_config
from fairswitch.engine.engine import Engine
from results_io import command_line, write_results


def weight_bytes(engine: Engine) -> int:
    return sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_engine_options(p, fixed={"max_num_seqs": "the largest of --batches",
                                 "max_model_len": "--ctx + --steps + 256",
                                 "quantization": "none, then fp8"},
                       model="llama-3-8b", load_format="dummy", max_num_batched_tokens=8192)
    p.add_argument("--batches", default="1,16,64,256")
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--output", default="benchmarks/results/fp8_weights.json")
    p.add_argument("--commit", default=None)
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    base = engine_config(p, args, max_num_seqs=max(batches),
                         max_model_len=args.ctx + args.steps + 256)
    figures: dict[str, Any] = {"model": args.model, "ctx": args.ctx, "steps": args.steps}
    steps = {}
    for name, quantization in (("bf16", None), ("fp8", "fp8")):
        engine = Engine(base.with_options(quantization=quantization))
        figures[f"{name}_dtype"] = str(engine.dtype)
        figures[f"{name}_weight_bytes"] = weight_bytes(engine)
        figures[f"{name}_kv_blocks"] = engine.kv.cache.num_blocks
        steps[name] = step_times(engine, batches, args)
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    rows = [{"batch": b, "bf16_step_ms": steps["bf16"][b], "fp8_step_ms": steps["fp8"][b],
             "speedup": steps["bf16"][b] / steps["fp8"][b]} for b in batches]
    print(f"{args.model}, ctx {args.ctx}: weights {figures['bf16_weight_bytes'] / 1e9:.2f} GB "
          f"-> {figures['fp8_weight_bytes'] / 1e9:.2f} GB with fp8 (KV blocks "
          f"{figures['bf16_kv_blocks']} -> {figures['fp8_kv_blocks']})")
    print(f"{'B':>5}{'bf16 ms':>10}{'fp8 ms':>10}{'speedup':>10}")
    for r in rows:
        print(f"{r['batch']:>5}{r['bf16_step_ms']:>10.2f}{r['fp8_step_ms']:>10.2f}"
              f"{r['speedup']:>9.2f}x")
    figures["rows"] = rows
    claims = [{"name": f"fp8_weights_decode_speedup_b{r['batch']}", "value": r["speedup"],
               "unit": "x"} for r in rows]
    return write_results(args.output, command=command_line(), figures=figures, claims=claims,
                         commit=args.commit)


if __name__ == "__main__":
    main()
