"""Context-switch bandwidth: swap a batch of requests' KV out to pinned CPU memory and back.

Measured in one run on one KV geometry (default Llama-3-8B: 32 layers, 8 KV heads, head dim 128,
bf16, 16-token blocks = 2 MiB per block):
- peak: one large pinned copy each way (the link's limit for this machine);
- fairswitch: block groups (requests' blocks are runs), one async copy per extent, CUDA streams
  (or CuPy with --copy-backend cupy);
- baseline (vLLM 0.3.3): blocks from a plain free list after churn, one synchronous copy per block
  per layer per K/V.
Each mode allocates the same requests (lengths drawn from --min-tokens..--max-tokens) after the
same churn of short-lived allocations, swaps all of them out, then all back in; bandwidth = bytes
moved / wall time until the last copy has landed. Claims: ``switch_bw_fraction_of_peak`` and
``switch_bw_baseline_fraction_of_peak`` (swap-out and swap-in averaged).
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass
from typing import Any

import torch
from results_io import command_line, write_results
from switch_setup import SwitchSetup, add_switch_args

from fairswitch.kv.cache_manager import KVCacheManager
from fairswitch.kv.copy_backend import CopyBackend, make_copy_backend
from fairswitch.kv.extents import num_extents
from fairswitch.kv.kv_cache import KVLayout
from fairswitch.kv.swap_manager import SwapManager
from fairswitch.request import Request
from fairswitch.sampling_params import SamplingParams


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pinned_pair(gpu: torch.device, nbytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(host buffer, pinned on CUDA; device buffer) of ``nbytes`` bytes each."""
    return (torch.empty(nbytes, dtype=torch.uint8, pin_memory=gpu.type == "cuda"),
            torch.empty(nbytes, dtype=torch.uint8, device=gpu))


def timed_copies(dst: torch.Tensor, src: torch.Tensor, gpu: torch.device,
                 repeats: int) -> tuple[float, float]:
    """(start, end) ``time.perf_counter`` of ``repeats`` back-to-back copies src -> dst, end once
    the last has landed."""
    _sync(gpu)
    t0 = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src, non_blocking=True)
    _sync(gpu)
    return t0, time.perf_counter()


def peak_bandwidth(gpu: torch.device, nbytes: int) -> tuple[float, float]:
    """(device->host, host->device) bytes/s of one large pinned copy."""
    host, dev = pinned_pair(gpu, nbytes)
    rates = []
    for dst, src in ((host, dev), (dev, host)):
        timed_copies(dst, src, gpu, 1)  # warm-up
        t0, t1 = timed_copies(dst, src, gpu, 3)
        rates.append(3 * nbytes / (t1 - t0))
    return rates[0], rates[1]


def pool_blocks(setup: SwitchSetup) -> int:
    """GPU (and CPU) pool size for ``prepare_mode``: room for the batch, twice over, plus the
    churn's live requests (12 x up to 36 blocks)."""
    return 2 * setup.batch_blocks + 12 * 36 + 64


@dataclass
class SwitchRun:
    """One mode's batch, allocated after the churn and ready to swap. ``swap_out`` and then
    ``swap_in`` each return the (start, end) ``time.perf_counter`` of their phase, end once the
    last copy has landed; ``row`` turns their durations into the mode's figures."""
    name: str
    kv: KVCacheManager
    backend: CopyBackend
    swap: SwapManager
    reqs: list[Request]
    churn: list[Request]  # the churn's live requests, freed between the two phases
    nbytes: int  # the batch's KV, moved each way

    def swap_out(self) -> tuple[float, float]:
        _sync(self.swap.gpu_tensor.device)
        t0 = time.perf_counter()
        for r in self.reqs:
            self.swap.swap_out(r)
        for t in list(self.swap.outgoing.values()):
            self.backend.wait(t.handle)
        self.swap.poll()
        return t0, time.perf_counter()

    def swap_in(self) -> tuple[float, float]:
        for r in self.churn:  # the churn requests leave: room to bring the batch back
            self.kv.free(r)
        t0 = time.perf_counter()
        for r in self.reqs:
            self.swap.swap_in(r)
        landed = self.swap.wait_incoming()
        t1 = time.perf_counter()
        assert len(landed) == len(self.reqs)
        return t0, t1

    def row(self, t_out: float, t_in: float) -> dict[str, Any]:
        return {"mode": self.name, "bytes": self.nbytes, "out_s": t_out, "in_s": t_in,
                "out_bw": self.nbytes / t_out, "in_bw": self.nbytes / t_in,
                "copies": self.backend.stats.num_copies,
                "bytes_per_copy": self.backend.stats.bytes_per_copy,
                "extents_after_swap_in": sum(num_extents(r.block_table) for r in self.reqs)}


def prepare_mode(name: str, args: argparse.Namespace, layout: KVLayout, gpu_pool: torch.Tensor,
                 cpu_pool: torch.Tensor, lengths: list[int]) -> SwitchRun:
    """Mode ``name`` (fairswitch or baseline) on the pools: the churn, then the batch."""
    baseline = name == "baseline"
    kv = KVCacheManager(gpu_pool.shape[0], args.block_size, block_groups=not baseline)
    backend = make_copy_backend("torch" if baseline else args.copy_backend, gpu_pool.device,
                                per_layer=baseline)
    swap = SwapManager(kv, gpu_pool, cpu_pool, backend, block_bytes=layout.block_bytes,
                       async_copies=not baseline, incremental=not baseline)
    rng = random.Random(args.seed)
    # Churn: short-lived requests come and go first, as in a running server.
    live = []
    for i in range(400):
        r = Request(f"churn{i}", [0] * rng.randint(16, 512), SamplingParams(max_tokens=64), 0.0)
        if kv.allocate_slots(r, r.num_prompt_tokens):
            live.append(r)
        if live and (rng.random() < 0.6 or len(live) > 12):
            kv.free(live.pop(rng.randrange(len(live))))
    reqs = []
    for i, n in enumerate(lengths):
        r = Request(f"r{i}", [0] * n, SamplingParams(max_tokens=1), 0.0)
        assert kv.allocate_slots(r, n), "GPU pool too small for the batch"
        r.num_computed_tokens = n
        reqs.append(r)
    nbytes = sum(kv.blocks_needed(n) for n in lengths) * swap.block_bytes
    return SwitchRun(name, kv, backend, swap, reqs, live, nbytes)


def run_mode(name: str, args: argparse.Namespace, layout: KVLayout, gpu_pool: torch.Tensor,
             cpu_pool: torch.Tensor, lengths: list[int]) -> dict[str, Any]:
    """Mode ``name``'s figures: its batch swapped out, then back in."""
    run = prepare_mode(name, args, layout, gpu_pool, cpu_pool, lengths)
    out_start, out_end = run.swap_out()
    in_start, in_end = run.swap_in()
    return run.row(out_end - out_start, in_end - in_start)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_switch_args(p, ("torch", "cupy"), "torch")
    p.add_argument("--output", default="benchmarks/results/switch_bandwidth.json")
    args = p.parse_args(argv)
    setup = SwitchSetup.from_args(args)
    device, lengths, layout = setup.device, setup.lengths, setup.layout
    gpu_pool, cpu_pool = setup.pools(pool_blocks(setup))
    peak_out, peak_in = peak_bandwidth(device, min(1 << 30, gpu_pool.numel()
                                                   * gpu_pool.element_size() // 2))
    rows = [run_mode(m, args, layout, gpu_pool, cpu_pool, lengths)
            for m in ("fairswitch", "baseline")]
    for r in rows:
        r["fraction_of_peak"] = (r["out_bw"] / peak_out + r["in_bw"] / peak_in) / 2
    print(f"peak pinned copy: out {peak_out / 1e9:.1f} GB/s, in {peak_in / 1e9:.1f} GB/s")
    print(f"{'mode':<11}{'GB':>7}{'out GB/s':>10}{'in GB/s':>9}{'of peak':>9}{'copies':>9}"
          f"{'KiB/copy':>10}{'extents':>9}")
    for r in rows:
        print(f"{r['mode']:<11}{r['bytes'] / 1e9:>7.2f}{r['out_bw'] / 1e9:>10.1f}"
              f"{r['in_bw'] / 1e9:>9.1f}{r['fraction_of_peak']:>9.2f}{r['copies']:>9}"
              f"{r['bytes_per_copy'] / 1024:>10.0f}{r['extents_after_swap_in']:>9}")
    fast, base = rows
    claims = [
        {"name": "switch_bw_fraction_of_peak", "value": fast["fraction_of_peak"],
         "unit": "fraction"},
        {"name": "switch_bw_baseline_fraction_of_peak", "value": base["fraction_of_peak"],
         "unit": "fraction"},
    ]
    figures = {"geometry": setup.geometry(args),
               "request_tokens": lengths, "peak_out_bw": peak_out, "peak_in_bw": peak_in,
               "copy_backend": args.copy_backend, "modes": rows}
    return write_results(args.output, command=command_line(), figures=figures, claims=claims,
                           commit=args.commit)


if __name__ == "__main__":
    main()
