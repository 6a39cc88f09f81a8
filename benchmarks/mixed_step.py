"""Steps with prompt tokens: eager vs CUDA graphs (``--mixed-cuda-graphs``), side by side (GPU).

For each batch B and prompt chunk K: B requests decode while, every step, one new request of K
prompt tokens is prefilled beside them (it is aborted after its step, so every timed step has B
decodes + one K-token chunk). The same steps run on two engines built one after the other,
without and with the prefill/mixed graphs; a decode-only step of the same batch is timed as the
floor. Claim ``mixed_step_speedup_graphs``: eager step time / graphed step time, mean over the
(B, K) points.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from typing import Any

import torch


from decode_step import prefill_batch
from engine_options import add_engine_options, engine_config
from fairswitch.engine.engine import Engine
from fairswitch.sampling_params import SamplingParams
from results_io import command_line, write_results


def time_mixed(engine: Engine, batch: int, chunk: int, ctx: int, steps: int, seed: int,
               gen: torch.Generator) -> dict[str, float]:
    """``gen`` draws the chunks' prompts: one generator per engine, so no prompt repeats within
    an engine's run (a repeat would hit the prefix cache) and both engines see the same ones."""
    ids = prefill_batch(engine, batch, ctx, 2 * steps + 10, seed)
    vocab = min(engine.hf_config.vocab_size, 100_000)
    params = SamplingParams(max_tokens=4, ignore_eos=True, detokenize=False)

    def one(with_chunk: bool) -> float:
        rid = None
        if with_chunk:
            rid = engine.add_request(
                prompt_token_ids=torch.randint(0, vocab, (chunk,), generator=gen).tolist(),
                params=params)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if rid is not None:
            engine.abort_request(rid)
        return dt

    for _ in range(3):
        one(True)  # warm-up
    mixed = [one(True) for _ in range(steps)]
    decode = [one(False) for _ in range(steps)]
    for r in ids:
        engine.abort_request(r)
    return {"batch": batch, "chunk": chunk, "mixed_ms": statistics.median(mixed) * 1e3,
            "decode_ms": statistics.median(decode) * 1e3}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_engine_options(
        p, fixed={"max_num_seqs": "the largest of --batches + 1",
                  "max_model_len": "max(--ctx + 2 x --steps + 256, the largest of --chunks + 16)",
                  "mixed_cuda_graphs": "off, then on", "enforce_eager": "off"},
        model="llama-3-8b", load_format="dummy", max_num_batched_tokens=2048)
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--chunks", default="16,64,200,256,600,1024,2000")
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--output", default="benchmarks/results/mixed_step.json")
    p.add_argument("--commit", default=None)
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    chunks = [int(k) for k in args.chunks.split(",")]
    base = engine_config(p, args, max_num_seqs=max(batches) + 1,
                         max_model_len=max(args.ctx + 2 * args.steps + 256, max(chunks) + 16),
                         mixed_cuda_graphs=True, enforce_eager=False)
    runs: dict[str, list[dict[str, float]]] = {}
    capture_s = 0.0
    for mode in ("eager", "graphs"):
        engine = Engine(base.with_options(mixed_cuda_graphs=mode == "graphs"))
        assert (engine.runner.mixed_graphs is not None) == (mode == "graphs")
        gen = torch.Generator().manual_seed(args.seed)
        runs[mode] = [time_mixed(engine, b, k, args.ctx, args.steps, args.seed, gen)
                      for b in batches for k in chunks]
        if mode == "graphs":
            capture_s = engine.runner.mixed_graphs.capture_s  # type: ignore[union-attr]
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    print(f"{'B':>4}{'K':>6}{'eager ms':>10}{'graphs ms':>11}{'speedup':>9}{'decode ms':>11}")
    speedups = []
    for e, g in zip(runs["eager"], runs["graphs"]):
        speedups.append(e["mixed_ms"] / g["mixed_ms"])
        print(f"{e['batch']:>4}{e['chunk']:>6}{e['mixed_ms']:>10.2f}{g['mixed_ms']:>11.2f}"
              f"{speedups[-1]:>8.2f}x{g['decode_ms']:>11.2f}")
    claims = [{"name": "mixed_step_speedup_graphs", "value": statistics.mean(speedups),
               "unit": "x"}]
    print(f"graph capture: {capture_s:.1f} s")
    figures = {"model": args.model, "ctx": args.ctx, "steps": args.steps,
               "mixed_graph_capture_s": capture_s, "runs": runs}
    return write_results(args.output, command=command_line(), figures=figures, claims=claims,
                         commit=args.commit)


if __name__ == "__main__":
    main()
