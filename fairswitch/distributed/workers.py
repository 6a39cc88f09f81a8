"""The ranks of a tensor-parallel engine: the driver (rank 0, the engine's own process: the
scheduler, the KV bookkeeping, sampling) and workers (ranks 1..N-1, processes it starts).

    driver                                         worker r
    init_process_group(rank 0)                     init_process_group(rank r)
    build its share of the model and of the KV pools (builder.build_rank), the same on every rank
    number of GPU blocks: the minimum over the ranks (each profiles its own device)
    per step: broadcast (plan, swap-copy log) ---> replay the copies, run the plan
              run the plan, sample, broadcast the tokens ---> keep them (next plan's placeholders)
    shutdown: broadcast None --------------------> exit

Plans and copy logs go over a gloo group (host objects); the model's collectives and the tokens over
the tensor-parallel group (NCCL with a GPU per rank, else gloo). If a worker dies, the driver's next
collective raises (its peer's connection is gone) and ``alive`` says so: the engine fails the
requests in flight instead of waiting.
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing as mp
import socket
from typing import Any

import torch
import torch.distributed as dist

from fairswitch.distributed.parallel_state import TPGroup

logger = logging.getLogger(__name__)

_TIMEOUT = datetime.timedelta(minutes=10)  # first-step compiles and graph capture fit in it


def rank_device(device: torch.device, rank: int) -> torch.device:
    """A rank's device: on CUDA the rank-th GPU (sharing GPU 0's index space when there are
    fewer GPUs than ranks, for tests: then the ranks talk over gloo)."""
    if device.type != "cuda":
        return device
    count = torch.cuda.device_count()
    base = device.index or 0
    return torch.device("cuda", (base + rank) % max(1, count))


def collective_backend(device: torch.device, size: int) -> str:
    """NCCL when every rank has a GPU of its own, else gloo (CPU, or ranks sharing a GPU)."""
    if device.type == "cuda" and torch.cuda.device_count() >= size:
        return "nccl"
    return "gloo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_rank(rank: int, size: int, init_method: str, backend: str) -> tuple[TPGroup, Any]:
    """Join the group: (the tensor-parallel group, the gloo group for plans)."""
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                            timeout=_TIMEOUT)
    control = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
    return TPGroup(rank, size, dist.group.WORLD), control


class WorkerGroup:
    """Started by the driver before it builds its own share of the model."""

    def __init__(self, config: Any, device: torch.device) -> None:
        size = config.model.tensor_parallel_size
        if dist.is_initialized():
            raise RuntimeError("tensor parallelism starts its own process group: this process "
                               "already has one (one tensor-parallel engine per process)")
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        backend = collective_backend(device, size)
        ctx = mp.get_context("spawn")
        self.procs = [ctx.Process(target=_worker_main, name=f"fairswitch-tp{r}", daemon=True,
                                  args=(r, size, config, init_method, backend))
                      for r in range(1, size)]
        for p in self.procs:
            p.start()
        self.tp, self.control = init_rank(0, size, init_method, backend)
        self.copy_log: list[tuple] = []  # swap copies since the last plan (copy_mirror.py)
        self._stopped = False
        logger.info("tensor parallelism: %d ranks over %s", size, backend)

    def agree(self, num_blocks: int) -> int:
        """The number of GPU blocks every rank can hold (the minimum of the ranks' own)."""
        return _min_over_ranks(num_blocks, self.control)

    def send(self, plan: Any) -> None:
        """Hand a step's plan, with the swap copies logged since the last one, to the workers."""
        ops, self.copy_log[:] = list(self.copy_log), []
        self._broadcast((plan, ops))

    def _broadcast(self, message: Any) -> None:
        if not self.alive():
            dead = ", ".join(f"{p.name} exit code {p.exitcode}"
                             for p in self.procs if not p.is_alive())
            self.shutdown()  # the others cannot go on without it
            raise RuntimeError(f"a tensor-parallel worker has died ({dead}): the engine is "
                               "shut down")
        dist.broadcast_object_list([message], src=0, group=self.control)

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the workers (they exit after their current step) and leave the group."""
        if self._stopped:
            return
        self._stopped = True
        try:
            if self.alive():
                self._broadcast(None)
        except Exception:  # noqa: BLE001 - a dead peer: the others are terminated below
            logger.exception("stopping the tensor-parallel workers")
        for p in self.procs:
            p.join(timeout)
            if p.is_alive():
                p.terminate()
                p.join(timeout)
        if dist.is_initialized():
            dist.destroy_process_group()


def _min_over_ranks(n: int, group: Any) -> int:
    t = torch.tensor([n], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return int(t.item())


def _worker_main(rank: int, size: int, config: Any, init_method: str, backend: str) -> None:
    from fairswitch.distributed.copy_mirror import CopyReplay
    from fairswitch.engine.builder import build_rank, resolve_device

    tp, control = init_rank(rank, size, init_method, backend)
    try:
        device = rank_device(resolve_device(config.model.device), rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        part = build_rank(config, tp, device, lambda n: _min_over_ranks(n, control))
        swap = part.kv.swap
        replay = CopyReplay(part.kv.cache.tensor, swap.cpu_tensor,
                            part.kv.copy_backends)
        tokens = None
        while True:
            box: list[Any] = [None]
            dist.broadcast_object_list(box, src=0, group=control)
            if box[0] is None:
                break
            plan, ops = box[0]
            replay.apply(ops)
            tokens = part.runner.run_plan(plan, tokens)
    finally:
        dist.destroy_process_group()
