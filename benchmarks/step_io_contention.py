"""Step inputs and sampled tokens under swap traffic: copy engine (DMA) vs kernel copies (GPU).

A step sends its inputs to the device (``--input-kib``, a decode step's staging bytes), computes
(a CUDA graph of bf16 GEMMs, ~``--compute-ms``, whose first op reads the inputs) and reads
its sampled tokens back. Meanwhile a swap copy of ``--swap-mib`` runs on another stream, as a
resumed or preempted request's KV does: submitted right before the step, host->device (swap-in)
or device->host (swap-out), or none (idle). Two ways to move the step's own bytes, side by side:

- ``dma``: ``cudaMemcpyAsync`` from pinned memory (``copy_(non_blocking=True)``) and
  ``tensor.tolist()`` back: the copy engines, shared with the swap copy.
- ``kernel``: runner/host_link.py (kernels/host_copy.py): a kernel reads and writes the pinned
  buffers over PCIe.

Reported per way and condition: the median step time (host: from writing the inputs to holding
the tokens) and the swap copy's own bandwidth. Claims: ``step_speedup_under_swap_in`` = dma's
median step / kernel's during a swap-in; ``step_speedup_under_swap_out`` likewise;
``idle_step_ratio_kernel_vs_dma`` = kernel / dma with no swap (what the kernel path costs when
nothing contends); ``swap_in_gb_s_kernel_vs_dma`` = the swap-in's bandwidth beside kernel-copied
inputs / beside DMA-copied ones (the kernel's PCIe reads must not slow the swap).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np
import torch


from fairswitch.runner.host_link import StagingBuffer, TokenReturn
from results_io import command_line, write_results

CONDITIONS = ("idle", "swap-in", "swap-out")
WAYS = ("dma", "kernel")


class Step:
    """Inputs -> a CUDA graph of GEMMs (as a decode step replays one) -> argmax tokens, moving
    its own bytes one ``way``."""

    def __init__(self, way: str, input_bytes: int, batch: int, hidden: int, layers: int,
                 device: torch.device) -> None:
        self.way, self.batch = way, batch
        self.staging = StagingBuffer(input_bytes, device)
        self.ids, self.h_ids = self.staging.take(torch.int64, input_bytes // 8)
        self._host, self._dev = self.staging._host, self.staging._dev  # what dma copies
        self.h_ids[:] = 0
        self.staging.send()
        self.tokens = TokenReturn(batch)
        g = torch.Generator(device=device).manual_seed(0)
        table = torch.randn(4096, hidden, device=device, dtype=torch.bfloat16, generator=g)
        # Four weights of hidden^2 (512 MiB at 8192): every GEMM reads HBM, not L2.
        weights = [torch.randn(hidden, hidden, device=device, dtype=torch.bfloat16,
                               generator=g) / hidden ** 0.5 for _ in range(4)]

        def compute() -> torch.Tensor:
            x = table[self.ids[:batch]]
            for i in range(layers):
                x = torch.relu(x @ weights[i % 4])
            return x.argmax(dim=-1)

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            compute()  # warm-up outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=stream):
            self.out = compute()
        torch.cuda.synchronize()

    def run(self, step: int) -> list[int]:
        self.staging.wait_sent()
        self.h_ids[:] = (step * 7 + np.arange(len(self.h_ids))) % 4096
        if self.way == "dma":
            self._dev.copy_(self._host, non_blocking=True)
        else:
            self.staging.send()
        self.graph.replay()
        return self.out.tolist() if self.way == "dma" else self.tokens.fetch(self.out)


def measure(step: Step, condition: str, steps: int, swap_host: torch.Tensor,
            swap_dev: torch.Tensor, side: torch.cuda.Stream) -> dict[str, Any]:
    times, gb_s = [], []
    for i in range(steps + 3):  # 3 warm-up steps
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if condition != "idle":
            with torch.cuda.stream(side):
                start.record(side)
                if condition == "swap-in":
                    swap_dev.copy_(swap_host, non_blocking=True)
                else:
                    swap_host.copy_(swap_dev, non_blocking=True)
                end.record(side)
        t0 = time.perf_counter()
        step.run(i)
        t = time.perf_counter() - t0
        torch.cuda.synchronize()
        if i >= 3:
            times.append(t)
            if condition != "idle":
                gb_s.append(swap_host.numel() * swap_host.element_size()
                            / (start.elapsed_time(end) * 1e-3) / 1e9)
    return {"way": step.way, "condition": condition,
            "step_ms_median": 1e3 * statistics.median(times),
            "step_ms_mean": 1e3 * statistics.fmean(times), "step_ms_max": 1e3 * max(times),
            "swap_gb_s_median": statistics.median(gb_s) if gb_s else None}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input-kib", type=float, default=40.0,
                   help="bytes a step sends (a decode graph's staging at batch 32, 4608 context)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--hidden", type=int, default=8192)
    p.add_argument("--layers", type=int, default=0,
                   help="GEMMs per step (0: as many as take about --compute-ms)")
    p.add_argument("--compute-ms", type=float, default=6.0)
    p.add_argument("--swap-mib", type=float, default=150.0,
                   help="one swap copy (1200 tokens of Llama-3-8B KV are 150 MiB)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--output", default="benchmarks/results/step_io_contention.json")
    p.add_argument("--commit", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device: the copy engines are what is measured")
    dev = torch.device("cuda")
    input_bytes = int(args.input_kib * 1024) // 8 * 8
    layers = args.layers or _calibrate(args, input_bytes, dev)
    swap_host = torch.ones(int(args.swap_mib * (1 << 20)) // 4, dtype=torch.int32).pin_memory()
    swap_dev = torch.empty_like(swap_host, device=dev)
    side = torch.cuda.Stream()
    rows = []
    for way in WAYS:
        step = Step(way, input_bytes, args.batch, args.hidden, layers, dev)
        rows += [measure(step, c, args.steps, swap_host, swap_dev, side) for c in CONDITIONS]
    print(f"inputs {input_bytes / 1024:.0f} KiB, {layers} GEMMs of [{args.batch}, {args.hidden}]"
          f" per step, swap copy {args.swap_mib:.0f} MiB")
    print(f"{'way':<8}{'condition':<10}{'median ms':>11}{'mean ms':>9}{'max ms':>8}"
          f"{'swap GB/s':>11}")
    for r in rows:
        bw = f"{r['swap_gb_s_median']:.1f}" if r["swap_gb_s_median"] else "-"
        print(f"{r['way']:<8}{r['condition']:<10}{r['step_ms_median']:>11.2f}"
              f"{r['step_ms_mean']:>9.2f}{r['step_ms_max']:>8.2f}{bw:>11}")
    by = {(r["way"], r["condition"]): r for r in rows}

    def ratio(cond: str, key: str = "step_ms_median") -> float:
        return by[("dma", cond)][key] / by[("kernel", cond)][key]

    claims = [
        {"name": "step_speedup_under_swap_in", "value": ratio("swap-in"), "unit": "x"},
        {"name": "step_speedup_under_swap_out", "value": ratio("swap-out"), "unit": "x"},
        {"name": "idle_step_ratio_kernel_vs_dma", "value": 1 / ratio("idle"), "unit": "x"},
        {"name": "swap_in_gb_s_kernel_vs_dma",
         "value": 1 / ratio("swap-in", "swap_gb_s_median"), "unit": "x"},
    ]
    for c in claims:
        print(f"{c['name']}: {c['value']:.2f}{c['unit']}")
    figures = {"input_bytes": input_bytes, "batch": args.batch, "hidden": args.hidden,
               "layers": layers, "swap_bytes": swap_host.numel() * 4, "steps": args.steps,
               "rows": rows}
    return write_results(args.output, command=command_line(), figures=figures, claims=claims,
                         commit=args.commit)


def _calibrate(args: argparse.Namespace, input_bytes: int, dev: torch.device) -> int:
    """GEMMs per step so that an idle step computes for about ``--compute-ms``."""
    step = Step("kernel", input_bytes, args.batch, args.hidden, 40, dev)
    for i in range(5):
        step.run(i)
    t0 = time.perf_counter()
    for i in range(20):
        step.run(i)
    per_gemm = (time.perf_counter() - t0) / 20 / 40
    del step
    return max(1, round(args.compute_ms * 1e-3 / per_gemm))


if __name__ == "__main__":
    main()
