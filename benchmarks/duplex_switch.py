"""Full-duplex context switches: one batch of requests swaps out while another swaps in.

Measured in one run on one KV geometry (default Llama-3-8B: 32 layers, 8 KV heads, head dim 128,
bf16, 16-token blocks = 2 MiB per block), through the engine's own swap manager and copy streams:
- peaks: large pinned copies each way alone, and both at once on two streams (the link's
  full-duplex limit; the best of several ways to copy);
- for each switching mode (``duplex``: swap-outs and swap-ins on their own streams, the engine's
  default; ``single-stream``: both on one stream, as before): batch B (on the CPU) swaps in alone;
  then batch A (on the GPU, as many bytes) swaps out and B swaps in, submitted together, the
  swap-outs first (a rank preemption: the loser leaves, the winner returns).
Claims: ``duplex_switch_bw_fraction_of_peak`` (A's and B's bytes over the time until both landed,
over the two-stream peak) and ``swap_in_latency_under_swap_out`` (B's swap-in time with A's
swap-out in flight over B's alone), both for the duplex mode; the single-stream figures beside.
Each figure is the median of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from fairswitch.kv.cache_manager import KVCacheManager
from fairswitch.kv.copy_backend import cupy_available, make_copy_backend
from fairswitch.kv.kv_cache import KVLayout
from fairswitch.kv.swap_manager import SwapManager
from fairswitch.request import Request
from fairswitch.sampling_params import SamplingParams
from results_io import command_line, write_results
from switch_setup import SwitchSetup, add_switch_args

MODES = ("duplex", "single-stream")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_bandwidth(device: torch.device, nbytes: int, repeats: int = 3) -> dict[str, Any]:
    """Bytes/s of large pinned copies: each direction alone, and both at once on two streams;
    the best of torch copies and raw memcpyAsync on CuPy streams (where CuPy is installed), in
    one piece and in 64 MiB pieces, so that the limit is the link's and not one API's."""
    on_cuda = device.type == "cuda"
    host_out = torch.empty(nbytes, dtype=torch.uint8, pin_memory=on_cuda)
    host_in = torch.empty(nbytes, dtype=torch.uint8, pin_memory=on_cuda)
    dev_out = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dev_in = torch.empty(nbytes, dtype=torch.uint8, device=device)
    out, in_ = (host_out, dev_out), (dev_in, host_in)
    methods = {"torch": _torch_copier(device)}
    if on_cuda and cupy_available():
        methods["cupy"] = _cupy_copier(device)
    found: dict[str, float] = {}
    for name, (copy, sync) in methods.items():
        for piece in (nbytes, 64 << 20):
            def run(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
                sync()
                t0 = time.perf_counter()
                for _ in range(repeats):
                    for k, (dst, src) in enumerate(pairs):
                        for at in range(0, nbytes, piece):
                            copy(k, dst, src, at, min(piece, nbytes - at))
                sync()
                return repeats * nbytes * len(pairs) / (time.perf_counter() - t0)

            run([out, in_])  # warm-up
            for key, pairs in (("out", [out]), ("in", [in_]), ("both", [out, in_])):
                found[f"{key}/{name}/{piece >> 20}MiB"] = run(pairs)
    best = {key: max(v for k, v in found.items() if k.startswith(key + "/"))
            for key in ("out", "in", "both")}
    return {**best, "measured": found}


def _torch_copier(device: torch.device) -> tuple[Any, Any]:
    if device.type != "cuda":
        def copy(k, dst, src, at, n):
            dst[at:at + n].copy_(src[at:at + n])
        return copy, lambda: None
    streams = [torch.cuda.Stream(device) for _ in range(2)]

    def copy(k, dst, src, at, n):
        with torch.cuda.stream(streams[k]):
            dst[at:at + n].copy_(src[at:at + n], non_blocking=True)
    return copy, lambda: torch.cuda.synchronize(device)


def _cupy_copier(device: torch.device) -> tuple[Any, Any]:
    import cupy

    with cupy.cuda.Device(device.index or 0):
        streams = [cupy.cuda.Stream(non_blocking=True) for _ in range(2)]
    memcpy = cupy.cuda.runtime.memcpyAsync

    def copy(k, dst, src, at, n):
        memcpy(dst.data_ptr() + at, src.data_ptr() + at, n, 4, streams[k].ptr)

    def sync():
        for s in streams:
            s.synchronize()
        torch.cuda.synchronize(device)
    return copy, sync


def _batch(kv: KVCacheManager, name: str, lengths: list[int]) -> list[Request]:
    reqs = []
    for i, n in enumerate(lengths):
        r = Request(f"{name}{i}", [0] * n, SamplingParams(max_tokens=1), 0.0)
        assert kv.allocate_slots(r, n), "GPU pool too small for the batches"
        r.num_computed_tokens = n
        reqs.append(r)
    return reqs


def _setup(mode: str, args: argparse.Namespace, layout: KVLayout, gpu_pool: torch.Tensor,
           cpu_pool: torch.Tensor, lengths: list[int]) -> tuple[SwapManager, list, list]:
    """A fresh swap manager: batch A on the GPU, batch B swapped out (landed)."""
    device = gpu_pool.device
    kv = KVCacheManager(gpu_pool.shape[0], args.block_size, block_groups=True)
    out = make_copy_backend(args.copy_backend, device, per_layer=False)
    in_ = make_copy_backend(args.copy_backend, device, per_layer=False) if mode == "duplex" \
        else out
    swap = SwapManager(kv, gpu_pool, cpu_pool, out, block_bytes=layout.block_bytes,
                       in_backend=in_)
    a, b = _batch(kv, "a", lengths), _batch(kv, "b", lengths)
    for r in b:
        swap.swap_out(r)
    for t in list(swap.outgoing.values()):
        t.backend.wait(t.handle)
    swap.poll()
    assert not swap.outgoing
    return swap, a, b


def _swap_in(swap: SwapManager, b: list[Request]) -> float:
    """Submit B's swap-ins; seconds until the last has landed (from the first submission)."""
    t0 = time.perf_counter()
    for r in b:
        swap.swap_in(r)
    for r in b:
        t = swap.incoming[r]
        t.backend.wait(t.handle)
    return time.perf_counter() - t0


def run_mode(mode: str, args: argparse.Namespace, layout: KVLayout, gpu_pool: torch.Tensor,
             cpu_pool: torch.Tensor, lengths: list[int]) -> dict[str, Any]:
    device = gpu_pool.device
    alone, under, both, queued_in = [], [], [], []
    for _ in range(args.repeats):
        swap, _, b = _setup(mode, args, layout, gpu_pool, cpu_pool, lengths)
        _sync(device)
        alone.append(_swap_in(swap, b))
        swap, a, b = _setup(mode, args, layout, gpu_pool, cpu_pool, lengths)
        stats_before = swap.in_backend.stats.queued_s_in
        _sync(device)
        t0 = time.perf_counter()
        for r in a:
            swap.swap_out(r)
        under.append(_swap_in(swap, b))
        for t in list(swap.outgoing.values()):
            t.backend.wait(t.handle)
        both.append(time.perf_counter() - t0)
        swap.poll()
        queued_in.append(swap.in_backend.stats.queued_s_in - stats_before)
    nbytes = sum(-(-n // args.block_size) for n in lengths) * layout.block_bytes
    row = {"mode": mode, "bytes_each_way": nbytes,
           "swap_in_alone_s": statistics.median(alone),
           "swap_in_under_swap_out_s": statistics.median(under),
           "both_landed_s": statistics.median(both),
           "swap_in_queued_device_s": statistics.median(queued_in),
           "runs": {"alone": alone, "under": under, "both": both}}
    row["aggregate_bw"] = 2 * nbytes / row["both_landed_s"]
    row["swap_in_latency_ratio"] = row["swap_in_under_swap_out_s"] / row["swap_in_alone_s"]
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_switch_args(p, ("auto", "torch", "cupy"), "auto")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--output", default="benchmarks/results/duplex_switch.json")
    args = p.parse_args(argv)
    setup = SwitchSetup.from_args(args)
    device, lengths, layout = setup.device, setup.lengths, setup.layout
    batch_blocks = setup.batch_blocks
    gpu_pool, cpu_pool = setup.pools(2 * batch_blocks + 64)  # both batches at once
    peak = peak_bandwidth(device, min(1 << 30, batch_blocks * layout.block_bytes))
    rows = [run_mode(m, args, layout, gpu_pool, cpu_pool, lengths) for m in MODES]
    for r in rows:
        r["fraction_of_duplex_peak"] = r["aggregate_bw"] / peak["both"]
    print(f"peak pinned copy: out {peak['out'] / 1e9:.1f} GB/s, in {peak['in'] / 1e9:.1f} GB/s, "
          f"both at once {peak['both'] / 1e9:.1f} GB/s")
    print(f"{'mode':<15}{'GB each':>8}{'in alone ms':>12}{'in under out':>13}{'ratio':>7}"
          f"{'both ms':>9}{'GB/s':>7}{'of peak':>9}")
    for r in rows:
        print(f"{r['mode']:<15}{r['bytes_each_way'] / 1e9:>8.2f}"
              f"{r['swap_in_alone_s'] * 1e3:>12.1f}{r['swap_in_under_swap_out_s'] * 1e3:>13.1f}"
              f"{r['swap_in_latency_ratio']:>7.2f}{r['both_landed_s'] * 1e3:>9.1f}"
              f"{r['aggregate_bw'] / 1e9:>7.1f}{r['fraction_of_duplex_peak']:>9.2f}")
    duplex, single = rows
    faster_in = single["swap_in_under_swap_out_s"] / duplex["swap_in_under_swap_out_s"]
    faster_both = single["both_landed_s"] / duplex["both_landed_s"]
    print(f"duplex vs single stream: the swap-in under a swap-out {faster_in:.2f}x faster, "
          f"both batches landed {faster_both:.2f}x faster")
    claims = [
        {"name": "duplex_switch_bw_fraction_of_peak", "value": duplex["fraction_of_duplex_peak"],
         "unit": "fraction"},
        {"name": "swap_in_latency_under_swap_out", "value": duplex["swap_in_latency_ratio"],
         "unit": "x"},
        {"name": "single_stream_switch_bw_fraction_of_peak",
         "value": single["fraction_of_duplex_peak"], "unit": "fraction"},
        {"name": "single_stream_swap_in_latency_under_swap_out",
         "value": single["swap_in_latency_ratio"], "unit": "x"},
    ]
    figures = {"geometry": setup.geometry(args),
               "request_tokens": lengths, "peak_bw": peak, "copy_backend": args.copy_backend,
               "repeats": args.repeats, "modes": rows}
    return write_results(args.output, command=command_line(), figures=figures, claims=claims,
                         commit=args.commit)


if __name__ == "__main__":
    main()
