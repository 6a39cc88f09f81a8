"""The experts' grouped GEMMs (kernels/fused_moe.py) against their memory bound and the torch path.

What is measured, in one run, for one sparse layer of each model's shapes (default Qwen3-30B-A3B:
128 experts of 768, 8 a token, hidden 2048; Mixtral-8x7B: 8 of 14336, 2 a token, hidden 4096),
bf16, routing from random router logits (as uniform over the experts as a trained router aims):
- the device-copy bandwidth (read + write bytes / time of a large copy);
- per batch size B: ``fused_moe`` (alignment, both GEMMs, SiLU, the sum over each token's
  experts) replayed from a CUDA graph, as a decode step runs it, over enough copies of the
  weights that no call finds the previous one's in L2;
- its bytes: the weights of every expert the batch routes to (gate, up and down: 3 x H x I each)
  plus the activations written and read back between the launches; fraction of the copy rate =
  bytes / time / copy bandwidth (a decode step's experts are memory-bound: at B=256, 2048 rows
  over 128 experts make 16 rows an expert);
- the torch reference (reference.fused_moe: expert by expert over its tokens, eager) for scale.
Claims ``moe_kernel_fraction_of_copy_bw_b{1,16,64}`` (the first model) and
``moe_kernel_vs_torch_b64``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from attention_kernels import bench, num_copies
from decode_step import copy_bandwidth
from fairswitch.kernels import fused_moe as kernel
from fairswitch.kernels import reference
from fairswitch.model.moe import route
from results_io import command_line, write_results

SHAPES = {"qwen3-30b-a3b": dict(experts=128, top_k=8, hidden=2048, inter=768),
          "mixtral-8x7b": dict(experts=8, top_k=2, hidden=4096, inter=14336)}


def layer_rows(name: str, batches: list[int], copy_bw: float, seed: int) -> list[dict[str, Any]]:
    s = SHAPES[name]
    E, k, H, inter = s["experts"], s["top_k"], s["hidden"], s["inter"]
    dtype, dev = torch.bfloat16, torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(seed)
    expert_bytes = 3 * H * inter * 2
    rows = []
    for b in batches:
        x = torch.randn(b, H, generator=g, device=dev).to(dtype)
        weights, ids = route(torch.randn(b, E, generator=g, device=dev), k, True)
        touched = int(ids.unique().numel())
        act_bytes = b * k * (2 * inter * 2 * 2 + inter * 2 * 2 + H * 2 * 2) + 2 * b * H * 2
        moved = touched * expert_bytes + act_bytes
        layers = [(torch.randn(E, 2 * inter, H, generator=g, device=dev, dtype=dtype) * 0.02,
                   torch.randn(E, H, inter, generator=g, device=dev, dtype=dtype) * 0.02)
                  for _ in range(num_copies(moved))]
        fns = [lambda w13=w13, w2=w2: kernel.fused_moe(x, w13, w2, weights, ids)
               for w13, w2 in layers]
        ours = bench(fns)
        w13, w2 = layers[0]
        torch.testing.assert_close(kernel.fused_moe(x, w13, w2, weights, ids).float(),
                                   reference.fused_moe(x, w13, w2, weights, ids).float(),
                                   atol=3e-2, rtol=3e-2)
        torch.cuda.synchronize()
        reps = 20
        start = time.perf_counter()
        for i in range(reps):
            reference.fused_moe(x, *layers[i % len(layers)], weights, ids)
        torch.cuda.synchronize()
        torch_s = (time.perf_counter() - start) / reps
        rows.append({"model": name, "batch": b, "experts_touched": touched,
                     "bytes": moved, "ours_ms": ours * 1e3, "torch_ms": torch_s * 1e3,
                     "ours_fraction_of_copy_bw": moved / ours / copy_bw,
                     "ours_vs_torch": torch_s / ours})
        del layers, fns
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="1,16,64,256")
    p.add_argument("--models", default="qwen3-30b-a3b,mixtral-8x7b",
                   help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="benchmarks/results/moe_kernel.json")
    p.add_argument("--commit", default=None)
    args = p.parse_args(argv)
    batches = [int(v) for v in args.batches.split(",")]
    copy_bw = copy_bandwidth(torch.device("cuda"))
    table = [r for name in args.models.split(",")
             for r in layer_rows(name, batches, copy_bw, args.seed)]
    print(f"device copy bandwidth (read+write): {copy_bw / 1e12:.2f} TB/s")
    print(f"{'model':>15}{'B':>5}{'experts':>9}{'MB':>9}{'ours ms':>10}{'of copy':>9}"
          f"{'torch ms':>10}{'vs torch':>10}")
    for r in table:
        print(f"{r['model']:>15}{r['batch']:>5}{r['experts_touched']:>9}{r['bytes'] / 1e6:>9.1f}"
              f"{r['ours_ms']:>10.4f}{r['ours_fraction_of_copy_bw']:>9.2f}{r['torch_ms']:>10.3f}"
              f"{r['ours_vs_torch']:>9.1f}x")
    first = [r for r in table if r["model"] == table[0]["model"]]
    claims = [{"name": f"moe_kernel_fraction_of_copy_bw_b{r['batch']}",
               "value": r["ours_fraction_of_copy_bw"], "unit": "fraction"}
              for r in first if r["batch"] in (1, 16, 64)]
    claims += [{"name": "moe_kernel_vs_torch_b64", "value": r["ours_vs_torch"], "unit": "x"}
               for r in first if r["batch"] == 64]
    figures = {"dtype": "bfloat16", "shapes": {m: SHAPES[m] for m in args.models.split(",")},
               "copy_bandwidth_bytes_s": copy_bw, "rows": table}
    return write_results(args.output, command=command_line(), figures=figures, claims=claims,
                         commit=args.commit)


if __name__ == "__main__":
    main()
