"""Context-switch bandwidth at tensor parallelism: N ranks (one process per GPU, each GPU on its
own PCIe link) swap their own shares of a batch's KV (--kv-heads / N heads each) at the same time.

Measured in one run, the ranks joined in a gloo group (barriers only; rank r on cuda:r), on one
KV geometry (default Llama-3-8B: 32 layers, 8 KV heads, head dim 128, bf16, 16-token blocks;
each rank holds its share of the heads) at --tensor-parallel-size N (default 2):
- single-link peak: each rank alone, the others waiting, makes one large pinned copy each way
  (switch_bandwidth.peak_bandwidth); the reference peak is the sum over the ranks;
- host aggregate: every rank's large pinned copies at once (a figure: whether the host or the
  links limit);
- fairswitch: every rank allocates the same requests after the same churn on its own pools
  (switch_bandwidth.prepare_mode), then all swap the batch out at once, then all swap it back in
  (a barrier before each phase).
A phase's aggregate bandwidth = all ranks' bytes / (latest end - earliest start), over
``time.perf_counter`` (the host's monotonic clock, shared by its processes). Claims:
``tp_switch_bw_fraction_of_peak`` (aggregate over summed single-link peak, swap-out and swap-in
averaged), ``tp_switch_aggregate_out_gb_s`` and ``tp_switch_aggregate_in_gb_s``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from results_io import command_line, write_results
from switch_bandwidth import (
    peak_bandwidth,
    pinned_pair,
    pool_blocks,
    prepare_mode,
    timed_copies,
)
from switch_setup import SwitchSetup, add_switch_args

from fairswitch.distributed.workers import free_port


def single_link_peak(rank: int, size: int, device: torch.device, nbytes: int) -> dict[str, float]:
    """This rank's ``peak_bandwidth`` (bytes/s each way), measured while the others wait."""
    rates = (0.0, 0.0)
    for r in range(size):
        dist.barrier()
        if r == rank:
            rates = peak_bandwidth(device, nbytes)
    dist.barrier()
    return {"out_bw": rates[0], "in_bw": rates[1]}


def concurrent_copies(device: torch.device, nbytes: int, repeats: int = 3) -> dict[str, Any]:
    """This rank's bytes and (start, end) of ``repeats`` large pinned copies each way, every
    rank starting each direction at a barrier."""
    host, dev = pinned_pair(device, nbytes)
    phases: dict[str, Any] = {"bytes": repeats * nbytes}
    for direction, dst, src in (("out", host, dev), ("in", dev, host)):
        timed_copies(dst, src, device, 1)  # warm-up
        dist.barrier()
        phases[direction] = timed_copies(dst, src, device, repeats)
    return phases


def switch_phases(args: argparse.Namespace, setup: SwitchSetup) -> dict[str, Any]:
    """This rank's fairswitch figures (``run_mode``'s) plus the (start, end) of its swap-out
    and swap-in, every rank starting each phase at a barrier."""
    gpu_pool, cpu_pool = setup.pools(pool_blocks(setup))
    run = prepare_mode("fairswitch", args, setup.layout, gpu_pool, cpu_pool, setup.lengths)
    dist.barrier()
    out = run.swap_out()
    dist.barrier()
    in_ = run.swap_in()
    return {**run.row(out[1] - out[0], in_[1] - in_[0]), "out": out, "in": in_}


def rank_args(args: argparse.Namespace, rank: int) -> argparse.Namespace:
    """The options as rank ``rank`` sees them: its device (cuda:<rank>, or the CPU) and its
    share of the KV heads."""
    device = f"cuda:{rank}" if torch.device(args.device).type == "cuda" else args.device
    return argparse.Namespace(**{**vars(args), "device": device,
                                 "kv_heads": args.kv_heads // args.tensor_parallel_size})


def measure_rank(rank: int, args: argparse.Namespace) -> dict[str, Any]:
    """Rank ``rank``'s figures, in step with the other ranks (same barriers, same order)."""
    args = rank_args(args, rank)
    setup = SwitchSetup.from_args(args)
    if setup.device.type == "cuda":
        torch.cuda.set_device(setup.device)  # pinned memory and streams: no context on cuda:0
    # The same large copy as switch_bandwidth: half the pool, at most 1 GiB.
    nbytes = min(1 << 30, pool_blocks(setup) * setup.layout.block_bytes // 2)
    return {"rank": rank, "device": str(setup.device), "kv_heads": args.kv_heads,
            "single_link": single_link_peak(rank, args.tensor_parallel_size, setup.device,
                                            nbytes),
            "concurrent_copies": concurrent_copies(setup.device, nbytes),
            "fairswitch": switch_phases(args, setup)}


def _rank_main(rank: int, args: argparse.Namespace, init_method: str, out_dir: str) -> None:
    """A spawned rank: join the group, measure, leave its figures in out_dir/rank<r>.json."""
    dist.init_process_group("gloo", init_method=init_method, rank=rank,
                            world_size=args.tensor_parallel_size)
    try:
        figures = measure_rank(rank, args)
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(figures))


def run_ranks(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Spawn the N ranks; their figures, in rank order."""
    size = args.tensor_parallel_size
    init_method = f"tcp://127.0.0.1:{free_port()}"
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_rank_main, args=(args, init_method, out_dir), nprocs=size, join=True)
        return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(size)]


def aggregate_bw(phases: list[dict[str, Any]], direction: str) -> float:
    """bytes/s of all ranks' ``direction`` phase: their bytes over the time from the earliest
    start to the latest end."""
    start = min(p[direction][0] for p in phases)
    end = max(p[direction][1] for p in phases)
    return sum(p["bytes"] for p in phases) / (end - start)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # Torch streams only: CuPy's events follow CuPy's current device, not the rank's.
    add_switch_args(p, ("torch",), "torch")
    p.add_argument("--tensor-parallel-size", type=int, default=2)
    p.add_argument("--output", default="benchmarks/results/tp_switch_bandwidth.json")
    args = p.parse_args(argv)
    size = args.tensor_parallel_size
    if size < 1 or args.kv_heads % size:
        p.error(f"--kv-heads {args.kv_heads} does not divide among --tensor-parallel-size "
                f"{size} ranks")
    if torch.device(args.device).type == "cuda" and torch.cuda.device_count() < size:
        p.error(f"{size} ranks need {size} GPUs, one each; this host has "
                f"{torch.cuda.device_count()}")
    return args


def print_table(ranks: list[dict[str, Any]], total: dict[str, Any]) -> None:
    host = total["concurrent_copies"]
    print(f"all ranks' pinned copies at once: out {host['out_bw'] / 1e9:.1f} GB/s, "
          f"in {host['in_bw'] / 1e9:.1f} GB/s")
    print(f"{'rank':<6}{'GB':>7}{'out GB/s':>10}{'in GB/s':>9}{'link out':>10}{'link in':>9}"
          f"{'copies':>8}")
    rows = [(str(r["rank"]), r["fairswitch"], r["single_link"]) for r in ranks]
    for name, fast, link in [*rows, ("all", total["fairswitch"], total["single_link"])]:
        print(f"{name:<6}{fast['bytes'] / 1e9:>7.2f}{fast['out_bw'] / 1e9:>10.1f}"
              f"{fast['in_bw'] / 1e9:>9.1f}{link['out_bw'] / 1e9:>10.1f}"
              f"{link['in_bw'] / 1e9:>9.1f}{fast['copies']:>8}")
    print(f"aggregate / summed single-link peak: out {total['out_fraction']:.2f}, "
          f"in {total['in_fraction']:.2f}, mean {total['fraction_of_peak']:.2f}")


def totals(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """The ranks together: aggregate bandwidths and their fractions of the summed peaks."""
    fast = [r["fairswitch"] for r in ranks]
    copies = [r["concurrent_copies"] for r in ranks]
    link = {d: sum(r["single_link"][d] for r in ranks) for d in ("out_bw", "in_bw")}
    switch = {"bytes": sum(f["bytes"] for f in fast), "copies": sum(f["copies"] for f in fast),
              "out_bw": aggregate_bw(fast, "out"), "in_bw": aggregate_bw(fast, "in")}
    out_fraction = switch["out_bw"] / link["out_bw"]
    in_fraction = switch["in_bw"] / link["in_bw"]
    return {"single_link": link, "fairswitch": switch,
            "concurrent_copies": {"out_bw": aggregate_bw(copies, "out"),
                                  "in_bw": aggregate_bw(copies, "in")},
            "out_fraction": out_fraction, "in_fraction": in_fraction,
            "fraction_of_peak": (out_fraction + in_fraction) / 2}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    ranks = run_ranks(args)
    total = totals(ranks)
    print_table(ranks, total)
    claims = [
        {"name": "tp_switch_bw_fraction_of_peak", "value": total["fraction_of_peak"],
         "unit": "fraction"},
        {"name": "tp_switch_aggregate_out_gb_s", "value": total["fairswitch"]["out_bw"] / 1e9,
         "unit": "GB/s"},
        {"name": "tp_switch_aggregate_in_gb_s", "value": total["fairswitch"]["in_bw"] / 1e9,
         "unit": "GB/s"},
    ]
    setup = SwitchSetup.from_args(args)
    figures = {"geometry": setup.geometry(args), "tensor_parallel_size": args.tensor_parallel_size,
               "request_tokens": setup.lengths, "copy_backend": args.copy_backend,
               "total": total, "ranks": ranks}
    return write_results(args.output, command=command_line(), figures=figures, claims=claims,
                         commit=args.commit)


if __name__ == "__main__":
    main()
