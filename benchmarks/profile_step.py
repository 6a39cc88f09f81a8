"""Where a decode step's GPU time goes: kernel-level profile of engine steps at one batch size.

Not a claim benchmark: a tool for finding what to fuse or fix next. Prints the top kernels by
total CUDA time over ``--steps`` steps of the engine after the batch is prefilled, then the time
per step by kind of kernel (matmuls, attention, KV writes, norms/RoPE/activation, sampling,
collectives, copies and gathers, other) and the GPU's idle time within a step.
"""

from __future__ import annotations

import argparse
import re

import torch

from decode_step import abort_all, prefill_batch, time_steps
from engine_options import add_engine_options, engine_config
from fairswitch.engine.engine import Engine


# (kind, pattern on a kernel's name), the first match wins.
KINDS = [
    ("attention", r"_decode_split_kernel|_decode_reduce_kernel|_prefill_kernel|flash|fmha"),
    ("kv write", r"_write_kv_kernel|reshape_and_cache"),
    ("norm/rope/act", r"_add_rmsnorm_kernel|_rope_kernel|_silu_mul_kernel|rms_?norm|silu"),
    ("collective", r"nccl"),
    ("matmul", r"gemm|gemv|cutlass|nvjet|xmma|cublas|sm\d+_.*_(tn|nt|nn|tt)\b|matmul"),
    ("sampling", r"argmax|softmax|topk|sort|multinomial|exponential|log_softmax|cumsum"),
    ("copy/gather", r"memcpy|memset|copy|_copy_words_kernel|CatArrayBatched|index"),
]


def kind_of(kernel: str) -> str:
    """The kind of work a kernel's name says it does (``other`` if none matches)."""
    for kind, pattern in KINDS:
        if re.search(pattern, kernel, re.IGNORECASE):
            return kind
    return "other"


def per_kind_ms(kernel_us: dict[str, float], steps: int) -> dict[str, float]:
    """Milliseconds per step by kind, from each kernel's total device microseconds."""
    out: dict[str, float] = {}
    for name, us in kernel_us.items():
        kind = kind_of(name)
        out[kind] = out.get(kind, 0.0) + us / 1e3 / steps
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def profiled_steps(kernel_calls: dict[str, int], num_layers: int, default: int) -> int:
    """Decode steps whose kernels the profile holds: each writes its KV once per layer (a step
    launched before the profile started or still in flight at its end may be partly in it)."""
    writes = sum(n for name, n in kernel_calls.items() if kind_of(name) == "kv write")
    return round(writes / num_layers) if writes else default


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_engine_options(p, fixed={"max_num_seqs": "--batch", "max_model_len": "--ctx + 512"},
                       model="llama-3-8b", load_format="dummy", max_num_batched_tokens=8192)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args(argv)
    engine = Engine(engine_config(p, args, max_num_seqs=args.batch,
                                  max_model_len=args.ctx + 512))
    ids = prefill_batch(engine, args.batch, args.ctx, args.steps + 4, 0)
    for _ in range(3):
        engine.step()  # warm up this batch size
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        r = time_steps(engine, ids, args.steps)
    abort_all(engine, ids)  # outside the profile: the KV it writes to the CPU tier is no step's
    print(f"step {r['step_ms']:.2f} ms (profiled)")
    events = prof.key_averages()
    print(events.table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))
    device_events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels = {e.key: e.device_time_total for e in device_events if e.device_time_total > 0}
    calls = {e.key: e.count for e in device_events}
    # (time_steps's untimed step runs in the profile too)
    steps = profiled_steps(calls, engine.hf_config.num_hidden_layers, args.steps + 1)
    kinds = per_kind_ms(kernels, steps)
    busy = sum(kinds.values())
    print(f"per step ({steps} steps' kernels), by kind (ms): "
          + ", ".join(f"{k} {v:.3f}" for k, v in kinds.items()))
    print(f"GPU busy {busy:.3f} ms of a {r['step_ms']:.3f} ms step: idle "
          f"{max(0.0, r['step_ms'] - busy):.3f} ms")


if __name__ == "__main__":
    main()
