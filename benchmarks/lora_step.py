"""What serving LoRA adapters costs a decode step (GPU): the same batch, on the same model, of
an engine without LoRA and of one with ``--enable-lora`` whose requests run with
``--adapters`` different adapters (rank ``--rank`` on all seven projections, random weights,
written as PEFT writes them), and of that engine with no request on an adapter (what enabling
LoRA alone costs: its CUDA graphs always run the slots' matmuls).

Claims: ``lora_decode_step_overhead_b{B}`` = step time with adapters / step time without LoRA,
for each batch B of ``--batches``. Engines are built one after the other (the first freed).
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from decode_step import step_times
from engine_options import add_engine_options, engine_config
from fairswitch.engine.engine import Engine
from fairswitch.lora.adapter import TARGETS, part_shapes
from fairswitch.lora.request import LoRARequest
from results_io import command_line, write_results


def write_random_adapter(folder: Path, config: Any, rank: int, seed: int) -> Path:
    """A rank-``rank`` adapter of every projection of ``config``'s model, in PEFT's files."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    shapes = part_shapes(config)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for peft_name, (module, part) in TARGETS.items():
            fan_in, outs = shapes[module]
            kind = module.split(".")[0]
            prefix = f"base_model.model.model.layers.{layer}.{kind}.{peft_name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) * 0.01
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(outs[part], rank, generator=gen) \
                * 0.01
    folder.mkdir(parents=True)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
         "target_modules": list(TARGETS)}))
    return folder


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_engine_options(p, fixed={"max_num_seqs": "the largest of --batches",
                                 "max_model_len": "--ctx + --steps + 256",
                                 "enable_lora": "off, then on", "max_loras": "--adapters",
                                 "max_lora_rank": "--rank"},
                       model="llama-3-8b", load_format="dummy", max_num_batched_tokens=8192)
    p.add_argument("--batches", default="16,64")
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--output", default="benchmarks/results/lora_step.json")
    p.add_argument("--commit", default=None)
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    base = engine_config(p, args, max_num_seqs=max(batches),
                         max_model_len=args.ctx + args.steps + 256)
    engine = Engine(base)
    config = engine.hf_config
    plain = step_times(engine, batches, args)
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory() as tmp:
        loras = [LoRARequest(f"a{i}", i + 1, str(write_random_adapter(
            Path(tmp) / f"a{i}", config, args.rank, args.seed + i)))
            for i in range(args.adapters)]
        engine = Engine(base.with_options(enable_lora=True, max_loras=args.adapters,
                                          max_lora_rank=args.rank))
        with_lora = step_times(engine, batches, args, loras)
        enabled_only = step_times(engine, batches, args)
        graphs = engine.runner.graphs is not None
    rows = [{"batch": b, "no_lora_step_ms": plain[b], "lora_step_ms": with_lora[b],
             "lora_enabled_unused_step_ms": enabled_only[b],
             "overhead": with_lora[b] / plain[b]} for b in batches]
    print(f"{args.adapters} adapters of rank {args.rank}, {args.model}, ctx {args.ctx}:")
    print(f"{'B':>5}{'no LoRA ms':>12}{'adapters ms':>13}{'enabled, none ms':>18}"
          f"{'overhead':>10}")
    for r in rows:
        print(f"{r['batch']:>5}{r['no_lora_step_ms']:>12.2f}{r['lora_step_ms']:>13.2f}"
              f"{r['lora_enabled_unused_step_ms']:>18.2f}{r['overhead']:>9.2f}x")
    figures = {"model": args.model, "adapters": args.adapters, "rank": args.rank,
               "ctx": args.ctx, "steps": args.steps, "cuda_graphs": graphs, "rows": rows}
    claims = [{"name": f"lora_decode_step_overhead_b{r['batch']}", "value": r["overhead"],
               "unit": "x"} for r in rows]
    return write_results(args.output, command=command_line(), figures=figures, claims=claims,
                         commit=args.commit)


if __name__ == "__main__":
    main()
