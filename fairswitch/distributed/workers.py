"""The ranks of a tensor-parallel engine: the driver (rank 0, the engine's own process: the
scheduler, the KV bookkeeping, sampling) and workers (ranks 1..N-1, processes it starts).

    driver                                         worker r
    init_process_group(rank 0)                     init_process_group(rank r)
    build its share of the model and of the KV pools (builder.build_rank), the same on every rank
    number of GPU blocks: the minimum over the ranks (each profiles its own device)
    per step: broadcast (plan, swap-copy log) ---> replay the copies, run the plan
              run the plan, sample, broadcast the tokens ---> keep them (next plan's placeholders)
    shutdown: broadcast None --------------------> exit

The driver spawns the workers on its host, or, when a launcher started every rank (torchrun,
across hosts: ``env://``), rank 0 is the driver and every other rank becomes a worker as soon as
it builds its engine, whatever command it was started with (``serve_as_worker``).

Plans and copy logs go to spawned workers through shared memory (``plan_queue.py``), to launched
ranks (other hosts) over a gloo group; the model's collectives and the tokens over the
tensor-parallel group (NCCL with a GPU per rank, else gloo). Failures: a worker that dies makes
the driver's next collective raise (its peer's connection is gone; ``alive`` says so before the
plan goes out), and one that hangs makes it raise once ``distributed_timeout_s`` has passed (gloo;
NCCL's watchdog ends the process instead). Either way the step raises, ``fail`` stops every worker
(the ranks cannot be known to agree after a step that broke off) and the engine stays failed: the
requests in flight get the error instead of waiting. A spawned worker that exits before it joins
the group fails the driver's start-up at once (``wait_for_spawned``), not after the timeout.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from fairswitch.distributed.parallel_state import TPGroup
from fairswitch.distributed.plan_queue import (ORDERED_STORES, PlanReader, PlanWriter,
                                                QueueHandle)
from fairswitch.distributed.stall_report import report_stall

logger = logging.getLogger(__name__)

class RanksStoppedError(RuntimeError):
    """A tensor-parallel step broke off and the workers were stopped: the engine is shut down."""


def rank_device(device: torch.device, rank: int) -> torch.device:
    """A rank's device: on CUDA its GPU on this host (LOCAL_RANK under a launcher; GPUs shared
    round-robin when there are fewer than ranks, for tests: then the ranks talk over gloo)."""
    if device.type != "cuda":
        return device
    local = int(os.environ.get("LOCAL_RANK", rank))
    count = torch.cuda.device_count()
    return torch.device("cuda", ((device.index or 0) + local) % max(1, count))


def local_world_size(size: int) -> int:
    """How many of a group of ``size`` ranks run on this host: all, unless a launcher says."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", size))


def collective_backend(device: torch.device, size: int) -> str:
    """NCCL when every rank of this host has a GPU of its own, else gloo (CPU, or ranks sharing
    a GPU)."""
    if device.type == "cuda" and torch.cuda.device_count() >= local_world_size(size):
        return "nccl"
    return "gloo"


def share_cpu_threads(device: torch.device, size: int) -> None:
    """On the CPU, give each of this host's ranks its share of the cores for torch's intra-op
    threads (each would take them all: oversubscribed ranks that wait for each other at every
    collective ran 20x slower than with a share), unless OMP_NUM_THREADS says how many."""
    if device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, (cores or 1) // local_world_size(size)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# How long a worker waits for the driver's next plan over gloo: as long as the driver lives (an
# idle engine sends none; a driver that dies closes its connections, which ends the wait at once).
PLAN_WAIT = datetime.timedelta(days=365)


class Ranks:
    """What a rank has once it joined: the tensor-parallel group (the model's collectives), a gloo
    group that times out after ``distributed_timeout_s`` (start-up agreements) and a gloo group
    for plans, in which a worker waits for the next one as long as it takes (``PLAN_WAIT``) and
    the driver, sending, at most ``distributed_timeout_s`` (gloo's timeouts are each process's
    own: a send left waiting on a hung worker would hold the group's teardown a year)."""

    def __init__(self, rank: int, size: int, rendezvous: str | Any, backend: str,
                 timeout_s: float, device: torch.device) -> None:
        """``rendezvous``: an init method (``env://``) or a store. A collective that waits longer
        than ``timeout_s`` for a rank raises. With NCCL the communicator is made here, on
        ``device`` (this rank's GPU), not lazily by the first collective: that one may be in a
        CUDA graph being captured, where making a communicator is not allowed."""
        timeout = datetime.timedelta(seconds=timeout_s)
        nccl = backend == "nccl"
        if nccl:
            torch.cuda.set_device(device)
        meet = ({"init_method": rendezvous} if isinstance(rendezvous, str)
                else {"store": rendezvous})
        dist.init_process_group(backend, rank=rank, world_size=size, timeout=timeout,
                                device_id=device if nccl else None, **meet)
        self.tp = TPGroup(rank, size, dist.group.WORLD)
        self.control = (dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo"
                        else dist.group.WORLD)
        self.plans = dist.new_group(backend="gloo", timeout=PLAN_WAIT if rank else timeout)


def _started_key(rank: int) -> str:
    return f"fairswitch/started/{rank}"


def spawned_store(port: int, size: int, timeout_s: float, rank: int) -> Any:
    """The rendezvous of the ranks the driver spawns: rank 0 (the driver) hosts it and returns
    at once; a worker connects and says it started (``wait_for_spawned``)."""
    store = dist.TCPStore("127.0.0.1", port, size, is_master=rank == 0,
                          timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)
    if rank:
        store.set(_started_key(rank), "1")
    return store


def wait_for_spawned(store: Any, procs: list[Any], timeout_s: float) -> None:
    """Until every spawned rank has started (joining the group is next), or raise at once when
    one exits first: the driver would otherwise wait ``timeout_s`` for it in the group's
    rendezvous, and then not say why."""
    keys = [_started_key(r) for r in range(1, len(procs) + 1)]
    deadline = time.monotonic() + timeout_s
    while not store.check(keys):
        mp.connection.wait([p.sentinel for p in procs], timeout=0.05)
        dead = [p for p in procs if p.exitcode is not None]
        if dead:
            raise RuntimeError(
                "tensor-parallel worker " + ", ".join(f"{p.name} (exit code {p.exitcode})"
                                                      for p in dead)
                + " exited during start-up (its error is above, on stderr). A script that "
                "starts an engine with tensor_parallel_size > 1 needs an `if __name__ == "
                "'__main__':` guard: the workers are spawned, and re-run the script's top level")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the tensor-parallel workers did not start within {timeout_s:g} "
                               "s (distributed_timeout_s)")


def launched_rank(size: int) -> int | None:
    """This process's rank when a launcher started every rank (torchrun: RANK and WORLD_SIZE
    in the environment, the group met by ``env://``), else None (the driver spawns them)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    world = int(os.environ["WORLD_SIZE"])
    if world != size:
        raise ValueError(f"the launcher started {world} processes but tensor_parallel_size is "
                         f"{size}: they must be equal")
    return int(os.environ["RANK"])


def serve_as_worker(config: Any, rank: int) -> None:
    """A launched rank other than 0: be a worker until the driver stops, then end the process
    (the command it was started with runs on rank 0 only)."""
    device = resolve_base_device(config)
    _worker_main(rank, config.model.tensor_parallel_size, config, "env://",
                 collective_backend(device, config.model.tensor_parallel_size),
                 config.model.distributed_timeout_s, reader=None)
    raise SystemExit(0)


def spawned_config(config: Any, device: torch.device) -> Any:
    """The config the driver spawns its ranks with: a device left to "auto" as the driver
    resolved it, so that no rank resolves it otherwise (every rank the same kind of device)."""
    if config.model.device != "auto":
        return config
    return config.with_options(device=device.type)


def resolve_base_device(config: Any) -> torch.device:
    from fairswitch.engine.builder import resolve_device

    return resolve_device(config.model.device)


def _how_it_ended(proc: Any) -> str:
    """A spawned rank's name and exit code; a SIGKILL it did not get from ``kill`` is most
    often the kernel's out-of-memory killer."""
    oom = " (SIGKILL: out of memory?)" if proc.exitcode == -signal.SIGKILL else ""
    return f"{proc.name} exit code {proc.exitcode}{oom}"


class WorkerGroup:
    """Started by the driver before it builds its own share of the model: it spawns ranks
    1..N-1 on this host, or, under a launcher (torchrun, several hosts), meets the ranks the
    launcher started (``env://``)."""

    def __init__(self, config: Any, device: torch.device) -> None:
        size, timeout_s = config.model.tensor_parallel_size, config.model.distributed_timeout_s
        if dist.is_initialized():
            raise RuntimeError("tensor parallelism starts its own process group: this process "
                               "already has one (one tensor-parallel engine per process)")
        backend = collective_backend(device, size)
        self._threads = torch.get_num_threads()  # the driver's, given back when it ends
        share_cpu_threads(device, size)
        # Plans, failure and shutdown come from the engine's thread and from atexit's.
        self._lock = threading.RLock()
        self.procs: list[Any] = []  # the spawned ranks (none under a launcher)
        self._killed: set[int] = set()  # pids of the ranks ``kill`` ended
        self.plans: PlanWriter | None = None  # to spawned ranks (launched ones: gloo)
        self.timeout_s = timeout_s
        # This rank's CUDA graphs, destroyed before it leaves the group (the builder sets it to
        # the runner's release_graphs; argument: wait for the device first).
        self.release_graphs: Callable[[bool], None] | None = None
        rendezvous: str | Any = "env://"
        if launched_rank(size) is None:
            # Bound before the workers start (port 0: the system picks one), so that no other
            # process can take the port between a look for a free one and the bind.
            rendezvous = spawned_store(0, size, timeout_s, rank=0)
            port = rendezvous.port
            try:
                self.plans = PlanWriter(num_readers=size - 1) if ORDERED_STORES else None
            except OSError as e:  # no room in shared memory: plans go over gloo instead
                logger.warning("tensor parallelism: no shared-memory plan queue (%s); plans "
                               "go over gloo, about a millisecond a step", e)
            config = spawned_config(config, device)
            ctx = mp.get_context("spawn")
            self.procs = [ctx.Process(target=_spawned_worker_main, name=f"fairswitch-tp{r}",
                                      daemon=True,
                                      args=(r, size, config, port, backend, timeout_s,
                                            self.plans.handle if self.plans else None,
                                            os.getpid()))
                          for r in range(1, size)]
        try:
            for p in self.procs:
                p.start()
            if self.procs:
                wait_for_spawned(rendezvous, self.procs, timeout_s)
            ranks = Ranks(0, size, rendezvous, backend, timeout_s, rank_device(device, 0))
            self.tp, self.control, self.plan_group = ranks.tp, ranks.control, ranks.plans
        except BaseException:
            for p in self.procs:
                if p.pid is not None:
                    p.kill()
                    p.join(10)
            torch.set_num_threads(self._threads)
            raise
        finally:
            if self.plans is not None:  # every worker mapped it before joining the group
                self.plans.unlink()
        self.copy_log: list[tuple] = []  # swap copies since the last plan (copy_mirror.py)
        self.failure: str | None = None  # why the workers were stopped (``fail``)
        self._stopped = False
        atexit.register(self.shutdown)  # workers end with the driver, also on a plain exit
        logger.info("tensor parallelism: %d ranks over %s", size, backend)

    def agree(self, num_blocks: int) -> int:
        """The number of GPU blocks every rank can hold (the minimum of the ranks' own)."""
        return _min_over_ranks(num_blocks, self.control)

    def send(self, plan: Any) -> None:
        """Hand a step's plan, with the swap copies logged since the last one, to the workers."""
        with self._lock:
            if self._stopped and self.failure is None:  # (their exits are no death to report)
                raise RanksStoppedError("the engine was shut down: its tensor-parallel workers "
                                        "have exited")
            ops, self.copy_log[:] = list(self.copy_log), []
            self._broadcast((plan, ops))

    def _broadcast(self, message: Any) -> None:
        if self.failure is not None:
            raise RanksStoppedError(f"the tensor-parallel workers were stopped "
                                    f"({self.failure}): the engine is shut down")
        if not self.alive():
            dead = ", ".join(_how_it_ended(p) for p in self.procs if not p.is_alive())
            self.fail(f"a tensor-parallel worker has died: {dead}")
            raise RanksStoppedError(f"a tensor-parallel worker has died ({dead}): the engine "
                                    "is shut down")
        if self.plans is None:
            self._broadcast_over_gloo(message)
        else:
            self.plans.put(message, self.timeout_s, self._check_alive,
                           self._broadcast_over_gloo)

    def _broadcast_over_gloo(self, message: Any) -> None:
        """Send a message over the plans group, waiting for the workers at most ``timeout_s``
        (``TimeoutError``; a hung worker used to hold the driver as long as the workers wait)."""
        for part in _plan_parts(message):
            work = dist.broadcast(part, src=0, group=self.plan_group, async_op=True)
            try:
                work.wait(timeout=datetime.timedelta(seconds=self.timeout_s))
            except RuntimeError as e:
                self._check_alive()
                raise TimeoutError(f"a tensor-parallel worker took no plan for "
                                   f"{self.timeout_s:.0f} s ({e})") from e

    def _check_alive(self) -> None:
        if not self.alive():
            raise RanksStoppedError("a tensor-parallel worker died while the driver waited "
                                    "for it to take a plan")

    def fail(self, cause: BaseException | str) -> None:
        """A step broke off (a rank died or did not answer, or the driver raised mid-step): the
        ranks cannot be known to agree any more, so every worker is stopped, without waiting
        for any of them, and every later plan raises."""
        with self._lock:
            if self.failure is not None:
                return
            self.failure = str(cause) or type(cause).__name__
            # Said before anything that could block: this is often the only trace of the cause.
            logger.error("tensor parallelism: stopping every rank after a failed step: %s",
                         self.failure, exc_info=cause if isinstance(cause, BaseException)
                         else None)
            self._stopped = True
            # A rank that died by itself (often the cause) is told from those ``kill`` ends by
            # having ended first: its exit can reach the driver (a collective's closed socket)
            # a moment before it can be reaped.
            ended = (mp.connection.wait([p.sentinel for p in self.procs], timeout=0.5)
                     if self.procs else [])
            for p in self.procs:
                if p.sentinel in ended:
                    p.join(1.0)
            self.kill()
            self._end(10.0, abort=True)

    def exits(self) -> str:
        """The spawned ranks that ended by themselves (not killed by ``fail``), with their exit
        codes: after a failed collective, the ones whose error (on stderr) is the cause."""
        return ", ".join(_how_it_ended(p) for p in self.procs
                         if p.exitcode is not None and p.pid not in self._killed)

    def failure_cause(self, error: BaseException) -> str:
        """``error`` (the driver's side of a failed collective: often just "connection closed"),
        led by the ranks that exited by themselves, if any."""
        exits = self.exits()
        return f"{exits}, its error on stderr; the driver's: {error}" if exits else str(error)

    def kill(self) -> None:
        """SIGKILL the spawned ranks now (it also ends a stopped or hung process), without the
        lock (a step waiting on them may hold it): ``fail``, and a shutdown that cannot wait for
        a step stuck in a collective, which then fails."""
        for p in self.procs:
            if p.is_alive():
                self._killed.add(p.pid)
                p.kill()

    def alive(self) -> bool:
        """Are the spawned ranks alive? (Launched ones are not watched: a collective with a
        dead one raises.)"""
        return all(p.is_alive() for p in self.procs)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the workers (they exit after their current step) and leave the group."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            try:
                if self.alive():
                    self._broadcast(None)
                    # Each worker leaves the group as soon as it reads None; leaving can take
                    # every rank (NCCL), so the driver leaves now too, then waits for them.
                    self._release_graphs(wait=True)
                    dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a dead peer: the others are terminated below
                logger.exception("stopping the tensor-parallel workers")
            self._end(timeout)

    def _end(self, timeout: float, abort: bool = False) -> None:
        """Reap the workers (killing any still running after ``timeout``: a hung one, or one
        that never heard the farewell) and leave the group; ``abort``: the peers are gone or
        cannot be trusted, so the group is aborted (NCCL's destroy would wait for collectives
        they never join)."""
        for p in self.procs:
            p.join(timeout)
            if p.is_alive():
                p.kill()
                p.join(timeout)
        self._release_graphs(wait=not abort)
        leave_group(abort)
        torch.set_num_threads(self._threads)  # (an engine after this one runs on its own)
        atexit.unregister(self.shutdown)

    def _release_graphs(self, wait: bool) -> None:
        """Destroy this rank's CUDA graphs, if any, before it leaves the group: NCCL's destroy
        and abort both wait, for ever and in a C call, while a graph that captured one of the
        group's collectives is alive (NCCL >= 2.26)."""
        if self.release_graphs is None:
            return
        try:
            self.release_graphs(wait)
        except Exception:  # noqa: BLE001 - leaving the group matters more
            logger.exception("tensor parallelism: destroying the CUDA graphs")
        self.release_graphs = None


def leave_group(abort: bool) -> None:
    """Leave the process group: destroy it (an orderly exit, every rank leaving), or abort it
    (peers dead or out of step: NCCL's destroy would wait for collectives they never join)."""
    if not dist.is_initialized():
        return
    abort_group = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if abort and abort_group is not None and dist.get_backend() == "nccl":
        abort_group()
    else:
        dist.destroy_process_group()


def _min_over_ranks(n: int, group: Any) -> int:
    t = torch.tensor([n], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return int(t.item())


def _plan_parts(message: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A message as gloo broadcasts it: its pickled size, then the pickle (``over_gloo``)."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return (torch.tensor([len(data)], dtype=torch.int64),
            torch.frombuffer(bytearray(data), dtype=torch.uint8))


def _receive_plans(reader: PlanReader | None, group: Any) -> Callable[[], Any]:
    """The worker's source of the driver's messages: shared memory (spawned by the driver,
    which it outlives by no more than a look: it exits once its parent has gone) or gloo."""

    def over_gloo() -> Any:
        size = torch.empty(1, dtype=torch.int64)
        dist.broadcast(size, src=0, group=group)
        data = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.broadcast(data, src=0, group=group)
        return pickle.loads(data.numpy().tobytes())

    if reader is None:
        return over_gloo
    parent = os.getppid()

    def driver_alive() -> None:
        if os.getppid() != parent:
            raise SystemExit("the tensor-parallel driver has gone")

    return lambda: reader.get(driver_alive, over_gloo)


def _exit_with_driver(driver: int, plans: QueueHandle | None, poll_s: float = 0.5) -> None:
    """A spawned worker's watch: once its driver is gone (killed, say, while the ranks were
    starting), end the worker at once, whatever it waits in (the rendezvous, a collective:
    up to distributed_timeout_s), and remove the plan queue's file if the driver had no time
    to. A step's plan read notices sooner (``driver_alive``)."""
    while os.getppid() == driver:
        time.sleep(poll_s)
    if plans is not None:
        with contextlib.suppress(OSError):
            os.unlink(plans.path)
    os._exit(1)


def _spawned_worker_main(rank: int, size: int, config: Any, port: int, backend: str,
                         timeout_s: float, plans: QueueHandle | None, driver: int) -> None:
    """A rank the driver spawned. It ignores SIGINT and SIGTERM: a terminal's Ctrl-C or a
    supervisor signals the whole process group, and the driver, which drains its requests
    first, ends its workers itself (a farewell plan, or SIGKILL; they also exit when it dies)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # (The driver's pid, not getppid(): the driver may have died while this process started.)
    threading.Thread(target=_exit_with_driver, args=(driver, plans), daemon=True,
                     name="fairswitch-driver-watch").start()
    # Mapped before joining the group: once every rank has joined, the driver unlinks it.
    reader = PlanReader(plans, rank - 1) if plans is not None else None
    _worker_main(rank, size, config, spawned_store(port, size, timeout_s, rank), backend,
                 timeout_s, reader)


def _worker_main(rank: int, size: int, config: Any, rendezvous: str | Any, backend: str,
                 timeout_s: float, reader: PlanReader | None) -> None:
    from fairswitch.distributed.copy_mirror import CopyReplay
    from fairswitch.engine.builder import build_rank

    device = rank_device(resolve_base_device(config), rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    share_cpu_threads(device, size)
    ranks = Ranks(rank, size, rendezvous, backend, timeout_s, device)
    receive = _receive_plans(reader, ranks.plans)
    try:
        part = build_rank(config, ranks.tp, device,
                          lambda n: _min_over_ranks(n, ranks.control))
        swap = part.kv.swap
        replay = CopyReplay(part.kv.cache.tensor, swap.cpu_tensor,
                            part.kv.copy_backends)
        tokens = None
        while True:
            message = receive()
            if message is None:
                break
            plan, ops = message
            with report_stall(timeout_s / 2):
                replay.apply(ops)
                tokens = part.runner.run_plan(plan, tokens)
        # The graphs first: NCCL's destroy waits for ever while one holding its collectives
        # lives (cuda_graph.release_graphs).
        part.runner.release_graphs(wait=True)
    except BaseException:
        # Said first, then gone, without leaving the group: leaving an NCCL group out of step
        # with the others can block for ever (graphs alive, collectives unmatched), and the
        # driver notices a dead worker.
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    leave_group(abort=False)
