"""Triton paged attention vs torch SDPA on the same K/V laid out contiguously (GPU).

Every time is per call of a CUDA graph holding ten calls, as the engine runs attention; a decode
shape whose data is smaller than twice the L2 cache takes copies of it in turn, so that no call
reads what the call before it left in L2 (the engine's layers each read their own KV).

Decode: for B x ctx, time ``paged_decode_attention`` over a shuffled block table and SDPA over
contiguous [B, Hkv, ctx, D] tensors; report KV-read bandwidth (K and V bytes / time), its fraction
of the device-copy bandwidth measured in the same run (read + write bytes / time of a large copy),
and our time / SDPA's time. Claim ``decode_kernel_fraction_of_copy_bw`` at B=64, ctx=2048.

Prefill: causal attention of S sequences of L new tokens (no cached prefix) by
``paged_prefill_attention`` reading the paged cache, vs SDPA's flash backend on contiguous tensors;
TFLOP/s of each (4 * Hq * D * L * (L + 1) / 2 FLOPs per sequence), and our kernel's time on the
flat grid that CUDA graphs use (``max_query_len=None``). Claim ``prefill_kernel_vs_sdpa`` = our
TFLOP/s / SDPA's, at the largest prefill shape.

``--kv-cache-dtype fp8``: the same with the paged cache in e4m3 (the bf16 draws quantized, scales
1), our kernels dequantizing in registers; bytes read are the fp8 bytes, SDPA still reads the
bf16 tensors (what a bf16 cache would give). Claims ``fp8_kv_decode_kernel_fraction_of_copy_bw``
and ``fp8_kv_prefill_kernel_vs_sdpa``.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F


from fairswitch.kernels import paged_attention, reference
from fairswitch.config import CacheConfig
from fairswitch.kv.kv_cache import fp8_layer_views
from results_io import command_line, write_results
from decode_step import copy_bandwidth


def bench(fns, reps: int = 50, calls: int = 10) -> float:
    """Median seconds per call of ``fns`` (a callable, or several taken in turn) replayed
    ``calls`` at a time from a CUDA graph, as the engine runs attention: timed eagerly, a small
    shape measures the host's launch instead (on the H200 host about 120 us a launch, against
    10-40 us of kernel at B <= 16, ctx <= 2k). Several callables over different data keep the
    calls from finding the previous call's data in L2 (``num_copies``)."""
    import triton.testing

    fns = list(fns) if isinstance(fns, (list, tuple)) else [fns]
    for fn in fns:
        fn()  # compiles the Triton kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    seconds = triton.testing.do_bench(graph.replay, warmup=10, rep=reps,
                                      return_mode="median") / 1e3 / calls
    del graph
    return seconds


def num_copies(data_bytes: int, calls: int = 10) -> int:
    """Copies of a call's data to take in turn so that together they are twice the L2 cache:
    one call then never reads what the call before it left there (at most ``calls``)."""
    l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    return max(1, min(calls, -(-2 * l2 // max(1, data_bytes))))


def paged_pool(batch: int, ctx: int, hkv: int, d: int, bs: int, dtype, gen: torch.Generator,
               fp8: bool = False):
    """A one-layer pool holding batch x ctx tokens in shuffled blocks (in e4m3 if ``fp8``, each
    block stored by head as the engine's fp8 pools are), and the same K/V contiguous
    in ``dtype``."""
    blocks_per_seq = -(-ctx // bs)
    num_blocks = batch * blocks_per_seq
    pool = torch.randn((num_blocks, 1, 2, bs, hkv, d), dtype=dtype, device="cuda",
                       generator=gen)
    perm = torch.randperm(num_blocks, device="cuda", generator=gen)
    tables = perm.view(batch, blocks_per_seq).to(torch.int32)
    k_cache, v_cache = pool[:, 0, 0], pool[:, 0, 1]
    k = k_cache[tables.long()].flatten(1, 2)[:, :ctx].transpose(1, 2).contiguous()
    v = v_cache[tables.long()].flatten(1, 2)[:, :ctx].transpose(1, 2).contiguous()
    if fp8:
        q8 = reference.quantize_fp8(pool, 1.0)
        k_cache, v_cache = fp8_layer_views(q8[:, 0])  # stored by head, as the engine's
        k_cache.copy_(reference.quantize_fp8(pool[:, 0, 0], 1.0))  # the same K and V
        v_cache.copy_(reference.quantize_fp8(pool[:, 0, 1], 1.0))
    return k_cache, v_cache, tables, k, v


def kv_scales(fp8: bool) -> dict[str, torch.Tensor]:
    """The kernels' k_scale/v_scale arguments: 1-element tensors for an fp8 cache, else none."""
    if not fp8:
        return {}
    one = torch.ones(1, dtype=torch.float32, device="cuda")
    return {"k_scale": one, "v_scale": one}


def decode_rows(batches, ctxs, hq, hkv, d, bs, dtype, copy_bw, fp8=False
                ) -> list[dict[str, Any]]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    scales = kv_scales(fp8)
    rows = []
    for b in batches:
        for ctx in ctxs:
            if b * ctx * hkv * d * 2 * 2 * 2 > 40 << 30:  # pool + contiguous copy must fit
                continue
            first = paged_pool(b, ctx, hkv, d, bs, dtype, gen, fp8)
            kv_bytes = paged_attention.decode_kv_bytes(first[0], b * ctx)
            # each copy: the paged pool and the contiguous K/V SDPA reads
            copies = num_copies(kv_bytes + first[3].nbytes + first[4].nbytes)
            pools = [first, *(paged_pool(b, ctx, hkv, d, bs, dtype, gen, fp8)
                              for _ in range(copies - 1))]
            q = torch.randn((b, hq, d), dtype=dtype, device="cuda", generator=gen)
            seq_lens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
            ours = bench([lambda pool=pool: paged_attention.paged_decode_attention(
                q, pool[0], pool[1], pool[2], seq_lens, **scales) for pool in pools])
            q4 = q.unsqueeze(2)
            sdpa = bench([lambda pool=pool: F.scaled_dot_product_attention(
                q4, pool[3], pool[4], enable_gqa=True) for pool in pools])
            rows.append({"batch": b, "ctx": ctx, "ours_ms": ours * 1e3, "sdpa_ms": sdpa * 1e3,
                         "ours_kv_bw": kv_bytes / ours, "sdpa_kv_bw": kv_bytes / sdpa,
                         "ours_fraction_of_copy_bw": kv_bytes / ours / copy_bw,
                         "ours_vs_sdpa_time": ours / sdpa, "data_copies": len(pools)})
            del pools
            torch.cuda.empty_cache()
    return rows


def prefill_rows(shapes, hq, hkv, d, bs, dtype, fp8=False) -> list[dict[str, Any]]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator(device="cuda").manual_seed(1)
    scales = kv_scales(fp8)
    rows = []
    for seqs, length in shapes:
        k_cache, v_cache, tables, k, v = paged_pool(seqs, length, hkv, d, bs, dtype, gen, fp8)
        q = torch.randn((seqs * length, hq, d), dtype=dtype, device="cuda", generator=gen)
        qsl = torch.arange(0, (seqs + 1) * length, length, dtype=torch.int32, device="cuda")
        seq_lens = torch.full((seqs,), length, dtype=torch.int32, device="cuda")
        ours = bench(lambda: paged_attention.paged_prefill_attention(
            q, k_cache, v_cache, tables, qsl, seq_lens, length, **scales))
        flat = bench(lambda: paged_attention.paged_prefill_attention(  # the CUDA-graph grid
            q, k_cache, v_cache, tables, qsl, seq_lens, None, **scales))
        q4 = q.view(seqs, length, hq, d).transpose(1, 2)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            sdpa = bench(lambda: F.scaled_dot_product_attention(q4, k, v, is_causal=True,
                                                                enable_gqa=True))
        flops = 4 * hq * d * seqs * length * (length + 1) / 2
        rows.append({"seqs": seqs, "len": length, "ours_ms": ours * 1e3, "sdpa_ms": sdpa * 1e3,
                     "ours_tflops": flops / ours / 1e12, "sdpa_tflops": flops / sdpa / 1e12,
                     "ours_vs_sdpa": sdpa / ours, "flat_grid_ms": flat * 1e3,
                     "flat_grid_vs_sdpa": sdpa / flat})
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="1,16,64,256")
    p.add_argument("--ctxs", default="512,2048,8192,32768")
    p.add_argument("--prefill-shapes", default="16x512,8x1024,4x2048,2x4096")
    p.add_argument("--heads", default="32,8,128", help="query heads, kv heads, head dim")
    p.add_argument("--block-size", type=int, default=None,
                   help="tokens per block (default: the engine's for the cache dtype)")
    p.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto",
                   help="the paged cache's dtype: auto (bf16, the queries') or fp8 (e4m3)")
    p.add_argument("--output", default=None, help="default: benchmarks/results/"
                   "attention_kernels[_fp8].json")
    p.add_argument("--commit", default=None)
    args = p.parse_args(argv)
    fp8 = args.kv_cache_dtype == "fp8"
    if args.block_size is None:
        args.block_size = CacheConfig(kv_cache_dtype=args.kv_cache_dtype).tokens_per_block
    output = args.output or ("benchmarks/results/attention_kernels" + ("_fp8" if fp8 else "")
                             + ".json")
    hq, hkv, d = (int(x) for x in args.heads.split(","))
    dtype = torch.bfloat16
    copy_bw = copy_bandwidth(torch.device("cuda"))
    dec = decode_rows([int(x) for x in args.batches.split(",")],
                      [int(x) for x in args.ctxs.split(",")], hq, hkv, d, args.block_size, dtype,
                      copy_bw, fp8)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.prefill_shapes.split(",")]
    pre = prefill_rows(shapes, hq, hkv, d, args.block_size, dtype, fp8)
    print(f"device copy bandwidth (read+write): {copy_bw / 1e12:.2f} TB/s")
    print(f"{'B':>5}{'ctx':>7}{'ours ms':>10}{'sdpa ms':>10}{'ours TB/s':>11}{'of copy':>9}"
          f"{'ours/sdpa':>11}")
    for r in dec:
        print(f"{r['batch']:>5}{r['ctx']:>7}{r['ours_ms']:>10.4f}{r['sdpa_ms']:>10.4f}"
              f"{r['ours_kv_bw'] / 1e12:>11.2f}{r['ours_fraction_of_copy_bw']:>9.2f}"
              f"{r['ours_vs_sdpa_time']:>11.2f}")
    print(f"{'seqs':>5}{'len':>7}{'ours ms':>10}{'sdpa ms':>10}{'ours TF/s':>11}{'sdpa TF/s':>11}"
          f"{'ratio':>8}{'flat grid':>11}")
    for r in pre:
        print(f"{r['seqs']:>5}{r['len']:>7}{r['ours_ms']:>10.3f}{r['sdpa_ms']:>10.3f}"
              f"{r['ours_tflops']:>11.1f}{r['sdpa_tflops']:>11.1f}{r['ours_vs_sdpa']:>8.2f}"
              f"{r['flat_grid_vs_sdpa']:>10.2f}x")
    claims = []
    prefix = "fp8_kv_" if fp8 else ""
    anchor = [r for r in dec if r["batch"] == 64 and r["ctx"] == 2048]
    if anchor:
        claims.append({"name": f"{prefix}decode_kernel_fraction_of_copy_bw",
                       "value": anchor[0]["ours_fraction_of_copy_bw"], "unit": "fraction"})
    if pre:
        biggest = max(pre, key=lambda r: r["seqs"] * r["len"] ** 2)
        claims.append({"name": f"{prefix}prefill_kernel_vs_sdpa",
                       "value": biggest["ours_vs_sdpa"], "unit": "x"})
    figures = {"dtype": "bfloat16", "kv_cache_dtype": "float8_e4m3fn" if fp8 else "bfloat16",
               "heads": {"q": hq, "kv": hkv, "dim": d},
               "block_size": args.block_size, "copy_bandwidth_bytes_s": copy_bw,
               "block_layout": "[Hkv, 2, block_size * D] (K, V^T)" if fp8
               else "[2, block_size, Hkv, D]",
               "decode_launch": paged_attention.decode_launch(1 if fp8 else 2),
               "decode": dec, "prefill": pre}
    return write_results(output, command=command_line(), figures=figures, claims=claims,
                           commit=args.commit)


if __name__ == "__main__":
    main()
