"""Engine decode step vs its roofline, and the host's share of a step (GPU).

What is measured, in one run on one model (default Llama-3-8B shapes, dummy weights, bf16):
- the device-copy bandwidth: a large tensor ``copy_`` (read + write bytes / time);
- for each batch size B: B requests with ~``--ctx`` prompt tokens are prefilled, then ``--steps``
  decode steps of the full engine (``Engine.step``: schedule, inputs, forward via CUDA graph or
  eager, sampling, outputs) are timed with a device sync each step (sampling syncs anyway);
- the matmul peak: a large square matmul's FLOP/s in the model's dtype;
- roofline time of a decode step, each part at its own bound: the matmuls (every linear layer
  and the LM head) take max(their weight bytes / copy bandwidth, 2 x B x their parameters /
  matmul peak): below a batch of about peak / bandwidth (~185 on the H200) they are bound by
  reading the weights, above it by the tensor cores; the other weights (norms), the B embedding
  rows looked up (a gather: the table is not read whole) and the KV bytes attention reads are
  bytes / copy bandwidth. The claims ``decode_step_vs_roofline_b64`` (and ``_b256``) = measured
  step time / roofline time at B=64 (B=256); ``decode_step_vs_memory_roofline_b*`` beside them
  count every weight byte (the whole embedding table too) and KV byte at the copy bandwidth and
  no compute: what ``decode_step_vs_roofline_b*`` measured before c92837a;
- ``sched_cpu_fraction_b256``: (scheduler + input preparation host time) / step wall time at B=256.

With tensor parallelism (``--tensor-parallel-size N``) the figures are rank 0's: its share of the
weights and of the KV heads against one GPU's copy bandwidth (the ranks run in lockstep), and the
claim is ``tp_decode_step_vs_roofline_b64``. A few more steps per batch size then run under the
profiler: ``allreduce_fraction`` = the time rank 0's GPU spends in NCCL kernels (the all-reduces,
including any wait for the other ranks to reach them) / the steps' wall time.

With ``--compare-async`` every batch size is also timed on an engine whose steps run in turn
(``--no-async-scheduling``), built after the first is freed: claim ``pipelined_decode_speedup_b64``
= step time in turn / step time with async scheduling (each step launched behind the one in
flight) at B=64.
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from typing import Any

import torch


from engine_options import add_engine_options, engine_config
from fairswitch.engine.engine import Engine
from fairswitch.model.llama import Linear
from fairswitch.sampling_params import SamplingParams
from results_io import command_line, write_results


def device_seconds(device: torch.device, fn: Callable[[], Any], reps: int,
                   warmup: int = 3) -> float:
    """Seconds ``fn``'s device work takes per call: ``warmup`` calls, then ``reps`` timed
    between CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / 1e3 / reps


def copy_bandwidth(device: torch.device, nbytes: int = 4 << 30) -> float:
    """Bytes moved (read + write) per second by a device-to-device copy."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / device_seconds(device, lambda: dst.copy_(src), reps=10)


def prefill_batch(engine: Engine, batch: int, ctx: int, steps: int, seed: int,
                  adapters: list[Any] | None = None) -> list[str]:
    """Add ``batch`` requests of ``ctx`` random prompt tokens (request i with LoRA adapter
    ``adapters[i % len(adapters)]``, if given) and run until all are decoding."""
    gen = torch.Generator().manual_seed(seed + batch)
    vocab = min(engine.hf_config.vocab_size, 100_000)
    # Generous max_tokens: early-admitted requests decode while later ones still prefill.
    params = SamplingParams(max_tokens=steps + 200, temperature=0.0, ignore_eos=True,
                            detokenize=False)
    adapters = adapters or [None]
    ids = [engine.add_request(prompt_token_ids=torch.randint(0, vocab, (ctx,), generator=gen)
                              .tolist(), params=params,
                              lora_request=adapters[i % len(adapters)]) for i in range(batch)]
    while any(engine.requests[r].num_output_tokens < 2 for r in ids):
        engine.step()
    running = len(engine.scheduler.running)
    assert running == batch, f"only {running} of {batch} requests fit the KV cache"
    return ids


def time_steps(engine: Engine, ids: list[str], steps: int) -> dict[str, Any]:
    """Time ``steps`` decode steps of the running batch ``ids`` (left running: ``abort_all``).

    One untimed step first: with async scheduling each call collects the step the call before
    launched, so timing from the first call after a sync would count a step that ran before
    the clock started (a call of ~4 ms instead of ~16 at B=256). From a call's end the engine is
    in its steady state, in turn or pipelined: the mean call is the step period."""
    batch = len(ids)
    engine.step()
    engine.stats = type(engine.stats)()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    wall = (time.perf_counter() - t0) / steps
    st = engine.stats
    seq_lens = [engine.requests[r].num_tokens for r in ids]
    return {"batch": batch, "step_ms": wall * 1e3, "mean_seq_len": sum(seq_lens) / batch,
            "kv_tokens_read": sum(seq_lens),
            "schedule_ms": st.schedule_s / st.num_steps * 1e3,
            "prepare_ms": st.prepare_s / st.num_steps * 1e3,
            "output_ms": st.output_s / st.num_steps * 1e3,
            "host_fraction": (st.schedule_s + st.prepare_s) / (wall * st.num_steps),
            "tok_s": batch / wall}


def step_times(engine: Engine, batches: list[int], args: argparse.Namespace,
               adapters: list[Any] | None = None) -> dict[int, float]:
    """Decode step milliseconds of each batch size (``prefill_batch``, ``time_steps``)."""
    steps = {}
    for b in batches:
        ids = prefill_batch(engine, b, args.ctx, args.steps + 1, args.seed, adapters)
        steps[b] = time_steps(engine, ids, args.steps)["step_ms"]
        abort_all(engine, ids)
    return steps


def abort_all(engine: Engine, ids: list[str]) -> None:
    """End the timed batch (its KV may be written to the CPU tier: not part of any timing)."""
    for r in ids:
        engine.abort_request(r)


def collective_fraction(engine: Engine, batch: int, args: argparse.Namespace,
                        steps: int = 5) -> float:
    """Share of the wall time of ``steps`` decode steps (and ``time_steps``'s untimed one)
    that rank 0's GPU spends in NCCL kernels, profiled apart from the timed steps (the profiler
    slows the host)."""
    ids = prefill_batch(engine, batch, args.ctx, steps + 1, args.seed)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        time_steps(engine, ids, steps)
        wall_s = time.perf_counter() - t0
    abort_all(engine, ids)
    nccl_us = sum(e.device_time_total for e in prof.key_averages() if "nccl" in e.key.lower())
    return nccl_us / 1e6 / wall_s


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, n: int = 8192) -> float:
    """FLOP/s of an n x n x n matmul in ``dtype`` (the model's): what the tensor cores sustain."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    return 2 * n ** 3 / device_seconds(device, lambda: a @ b, reps=20)


def step_traffic(model: torch.nn.Module, kv_token_bytes: int) -> dict[str, int]:
    """What one decode step of ``model`` (this rank's shard) must read and multiply, by kind:
    ``matmul_params``/``matmul_bytes``: the linear layers' weights and the LM head (the embedding
    table when tied); ``embedding_row_bytes``: one looked-up row of an untied embedding table (a
    gather reads B of them); ``other_bytes``: every other weight (norms); ``kv_token_bytes``."""
    matmul = [m.weight for m in model.modules() if isinstance(m, Linear)]
    embed = model.embed_tokens
    if model.lm_head is None:  # tied: the LM head multiplies by the embedding table
        matmul.append(embed)
    counted = {id(p) for p in matmul} | {id(embed)}
    return {"matmul_params": sum(p.numel() for p in matmul),
            "matmul_bytes": sum(p.numel() * p.element_size() for p in matmul),
            # tied: the LM head reads the whole table, which holds the rows looked up
            "embedding_row_bytes": 0 if model.lm_head is None else
            embed.shape[1] * embed.element_size(),
            "other_bytes": sum(p.numel() * p.element_size() for p in model.parameters()
                               if id(p) not in counted),
            "all_weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "kv_token_bytes": kv_token_bytes}


def step_roofline(traffic: dict[str, int], batch: int, kv_tokens: int, copy_bw: float,
                  peak_flops: float) -> dict[str, float]:
    """Roofline milliseconds of a decode step of ``batch`` sequences reading ``kv_tokens`` KV
    entries: ``roofline_ms`` with the matmuls at the slower of their weight reads and their
    FLOPs, ``memory_roofline_ms`` with every weight (the whole embedding table too, as before)
    and KV byte at the copy bandwidth and no compute."""
    read = (traffic["other_bytes"] + batch * traffic["embedding_row_bytes"]
            + kv_tokens * traffic["kv_token_bytes"]) / copy_bw
    matmul_memory = traffic["matmul_bytes"] / copy_bw
    matmul_compute = 2 * batch * traffic["matmul_params"] / peak_flops
    return {"roofline_ms": (max(matmul_memory, matmul_compute) + read) * 1e3,
            "matmul_compute_bound": matmul_compute > matmul_memory,
            "memory_roofline_ms": (traffic["all_weight_bytes"]
                                   + kv_tokens * traffic["kv_token_bytes"]) / copy_bw * 1e3}


def model_traffic(engine: Engine) -> dict[str, int]:
    return step_traffic(engine.runner.model,
                        engine.kv.layout.block_bytes // engine.kv.block_size)


def time_batches(engine: Engine, batches: list[int], args: argparse.Namespace, bw: float,
                 peak_flops: float) -> list[dict[str, Any]]:
    traffic = model_traffic(engine)
    rows = []
    for b in batches:
        ids = prefill_batch(engine, b, args.ctx, args.steps + 1, args.seed)
        r = time_steps(engine, ids, args.steps)
        abort_all(engine, ids)
        r.update(step_roofline(traffic, b, r["kv_tokens_read"], bw, peak_flops))
        r["vs_roofline"] = r["step_ms"] / r["roofline_ms"]
        r["vs_memory_roofline"] = r["step_ms"] / r["memory_roofline_ms"]
        r["async_scheduling"] = engine.config.scheduler.async_scheduling
        if engine.config.model.tensor_parallel_size > 1:
            r["allreduce_fraction"] = collective_fraction(engine, b, args)
        rows.append(r)
    return rows


def print_rows(rows: list[dict[str, Any]]) -> None:
    print(f"{'B':>5}{'step ms':>10}{'roofline ms':>13}{'x roofline':>12}{'x memory':>10}"
          f"{'sched+prep ms':>15}{'host frac':>11}{'tok/s':>10}{'allreduce':>11}")
    for r in rows:
        share = f"{r['allreduce_fraction']:>11.3f}" if "allreduce_fraction" in r else ""
        print(f"{r['batch']:>5}{r['step_ms']:>10.2f}{r['roofline_ms']:>13.2f}"
              f"{r['vs_roofline']:>12.2f}{r['vs_memory_roofline']:>10.2f}"
              f"{r['schedule_ms'] + r['prepare_ms']:>15.3f}"
              f"{r['host_fraction']:>11.3f}{r['tok_s']:>10.0f}{share}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_engine_options(p, fixed={"max_num_seqs": "the largest of --batches",
                                 "max_model_len": "--ctx + --steps + 256"},
                       model="llama-3-8b", load_format="dummy", max_num_batched_tokens=8192)
    p.add_argument("--batches", default="1,16,64,256")
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--compare-async", action="store_true",
                   help="also time every batch with the steps in turn (no async scheduling)")
    p.add_argument("--output", default="benchmarks/results/decode_step.json")
    p.add_argument("--commit", default=None)
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    base = engine_config(p, args, max_num_seqs=max(batches),
                         max_model_len=args.ctx + args.steps + 256)
    if args.compare_async and not base.scheduler.async_scheduling:
        p.error("--compare-async compares against async scheduling: drop --no-async-scheduling")
    device = torch.device("cuda")
    bw = copy_bandwidth(device)
    engine = Engine(base)
    peak_flops = matmul_peak_flops(device, engine.dtype)
    cfg = engine.hf_config
    traffic = model_traffic(engine)
    figures = {"model": args.model, "dtype": str(engine.dtype), "model_arch": [cfg.architecture],
               "copy_bandwidth_bytes_s": bw, "matmul_peak_flops": peak_flops,
               "weight_bytes": traffic["all_weight_bytes"], "traffic": traffic,
               "kv_bytes_per_token": traffic["kv_token_bytes"], "ctx": args.ctx,
               "steps": args.steps,
               "cuda_graphs": engine.runner.graphs is not None,
               "attention_backend": engine.runner.backend.name,
               "tensor_parallel_size": base.model.tensor_parallel_size}
    rows = time_batches(engine, batches, args, bw, peak_flops)
    in_turn: list[dict[str, Any]] = []
    if args.compare_async:
        del engine
        gc.collect()
        torch.cuda.empty_cache()
        in_turn = time_batches(Engine(base.with_options(async_scheduling=False)), batches, args,
                               bw, peak_flops)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s; matmul peak {peak_flops / 1e12:.0f} TFLOP/s; "
          f"weights {traffic['all_weight_bytes'] / 1e9:.2f} GB (matmuls "
          f"{traffic['matmul_bytes'] / 1e9:.2f}); KV {traffic['kv_token_bytes']} B/token")
    print_rows(rows)
    if in_turn:
        print("steps in turn (no async scheduling):")
        print_rows(in_turn)
        for a, b in zip(rows, in_turn):
            print(f"B={a['batch']}: step in turn / async = {b['step_ms'] / a['step_ms']:.2f}x")
    by_b = {r["batch"]: r for r in rows}
    claims = []
    tp = base.model.tensor_parallel_size
    prefix = "tp_" if tp > 1 else ""
    for b in (64, 256):
        if b in by_b:
            claims.append({"name": f"{prefix}decode_step_vs_roofline_b{b}",
                           "value": by_b[b]["vs_roofline"], "unit": "x"})
            claims.append({"name": f"{prefix}decode_step_vs_memory_roofline_b{b}",
                           "value": by_b[b]["vs_memory_roofline"], "unit": "x"})
    for b in by_b if tp > 1 else ():
        claims.append({"name": f"tp_allreduce_fraction_b{b}",
                       "value": by_b[b]["allreduce_fraction"], "unit": "fraction"})
    if 256 in by_b:
        claims.append({"name": "sched_cpu_fraction_b256", "value": by_b[256]["host_fraction"],
                       "unit": "fraction"})
    if in_turn and 64 in by_b:
        serial = next(r for r in in_turn if r["batch"] == 64)
        claims.append({"name": "pipelined_decode_speedup_b64",
                       "value": serial["step_ms"] / by_b[64]["step_ms"], "unit": "x"})
    figures.update(rows=rows, rows_in_turn=in_turn)
    return write_results(args.output, command=command_line(), figures=figures, claims=claims,
                           commit=args.commit)


if __name__ == "__main__":
    main()
