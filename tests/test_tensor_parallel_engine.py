"""Tensor parallelism end to end on the CPU (gloo): the engine starts its worker ranks, and every
request ends exactly as with one rank, under forced swap and recompute preemptions, with and
without async scheduling, with reuse from the GPU and CPU tiers; bad sizes fail before anything
starts, and a dead or hung worker fails the step instead of hanging it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import openai
import pytest
import torch

from fairswitch import LLM, SamplingParams
from fairswitch.config import EngineConfig
from fairswitch.engine.async_engine import AsyncEngine

PROMPTS = ["The quick brown fox jumps over the lazy dog because", "def fibonacci(n):",
           "Paged attention stores the KV cache in fixed-size blocks, so that memory is "
           "allocated on demand", "Hi"]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def expected(llama_dir):
    llm = LLM(model=str(llama_dir), num_gpu_blocks=256, swap_space=0)
    return tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False))


@pytest.mark.parametrize("tp, mode, async_scheduling", [
    (2, "swap", True), (2, "recompute", False), (4, "swap", False), (2, "auto", True)])
def test_same_tokens_as_one_rank_under_preemption(llama_dir, expected, tp, mode,
                                                  async_scheduling):
    # 12 blocks of 4 tokens cannot hold the four requests at once: constant preemption.
    llm = LLM(model=str(llama_dir), tensor_parallel_size=tp, num_gpu_blocks=12, block_size=4,
              max_model_len=48, swap_space=0.01, preemption_mode=mode,
              async_scheduling=async_scheduling)
    try:
        assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == expected
        sched = llm.engine.scheduler
        assert sched.num_preemptions > 0
        if mode == "swap":
            assert sched.preemptions_by_mode["swap"] > 0
        llm.engine.check_accounting()
    finally:
        llm.shutdown()
    assert not any(p.is_alive() for p in llm.engine.workers.procs)


def test_logprobs_and_penalties_with_two_ranks(llama_dir):
    """The LM head's extra rows for prompt logprobs run on every rank (a collective), and
    penalized sampling on the driver: same tokens and values as one rank."""
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=2,
                            prompt_logprobs=1, repetition_penalty=1.3, min_tokens=2)
    one = LLM(model=str(llama_dir), num_gpu_blocks=64, max_model_len=64)
    want = one.generate(PROMPTS, params, use_tqdm=False)
    llm = LLM(model=str(llama_dir), tensor_parallel_size=2, num_gpu_blocks=64, max_model_len=64)
    try:
        got = llm.generate(PROMPTS, params, use_tqdm=False)
    finally:
        llm.shutdown()
    assert tokens(got) == tokens(want)
    for g, w in zip(got, want):
        def chosen(out):
            return [e[t].logprob for e, t in zip(out.outputs[0].logprobs,
                                                  out.outputs[0].token_ids)]
        assert chosen(g) == pytest.approx(chosen(w), abs=1e-4)
        assert len(g.prompt_logprobs) == len(w.prompt_logprobs)


def test_chunked_prefill_and_four_ranks_with_replicated_kv_heads(llama_dir, expected):
    """Prompts prefilled in chunks of 8 tokens; at 4 ranks each holds one of the 2 KV heads,
    replicated."""
    llm = LLM(model=str(llama_dir), tensor_parallel_size=4, num_gpu_blocks=64,
              max_num_batched_tokens=8, max_num_seqs=2, max_model_len=64)
    try:
        assert llm.engine.kv.layout.num_kv_heads == 1
        assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == expected
        llm.engine.check_accounting()
    finally:
        llm.shutdown()


def test_multi_turn_reuse_from_both_tiers(llama_dir):
    """A second turn continuing the first reuses its KV (GPU tier, then the CPU tier after the
    GPU copy was evicted): the same tokens as one rank."""
    first = "Once upon a time in a land far away there lived a"
    results = {}
    for tp in (1, 2):
        llm = LLM(model=str(llama_dir), tensor_parallel_size=tp, num_gpu_blocks=40, block_size=4,
                  max_model_len=160, swap_space=0.01)
        try:
            out = llm.generate([first], GREEDY, use_tqdm=False)[0]
            turn2 = list(out.prompt_token_ids) + list(out.outputs[0].token_ids) + [11, 12, 13]
            a = tokens(llm.generate([turn2], GREEDY, use_tqdm=False))
            filler = list(range(2000, 2000 + 36 * 4))  # evicts the cached turn from the GPU
            llm.generate([filler], SamplingParams(max_tokens=2, ignore_eos=True),
                         use_tqdm=False)
            b = tokens(llm.generate([turn2], GREEDY, use_tqdm=False))
            metrics = llm.engine.switch_metrics()
            llm.engine.check_accounting()
        finally:
            llm.shutdown()
        results[tp] = (a, b, {k: metrics[k] for k in ("swap_bytes_out", "swap_bytes_in",
                                                      "reuse_bytes_saved", "reused_tokens_cpu")},
                       metrics["swap_copies"])
        assert metrics["reused_tokens"] > 0
        if tp == 2:
            assert metrics["reused_tokens_cpu"] > 0
    assert results[1][:2] == results[2][:2]
    # The same switches, so the same bytes: every rank's (the driver's alone read half of one
    # rank's figures), in as many copies on each rank's link.
    assert results[1][2] == results[2][2] and results[1][2]["swap_bytes_in"] > 0
    assert results[2][3] == 2 * results[1][3]


def test_an_engine_dropped_without_shutdown_stops_its_workers(llama_dir):
    """atexit's hold on the worker group kept the workers, this rank's KV cache and the
    process group alive until the process ended: a second engine could not start."""
    import gc
    import weakref

    llm = LLM(model=str(llama_dir), tensor_parallel_size=2, num_gpu_blocks=32, block_size=4,
              max_model_len=64)
    first = tokens(llm.generate(["dropped"], GREEDY, use_tqdm=False))
    procs, kv = llm.engine.workers.procs, weakref.ref(llm.engine.kv.cache.tensor)
    del llm
    gc.collect()
    assert kv() is None and not any(p.is_alive() for p in procs)
    again = LLM(model=str(llama_dir), tensor_parallel_size=2, num_gpu_blocks=32, block_size=4,
                max_model_len=64)
    try:
        assert tokens(again.generate(["dropped"], GREEDY, use_tqdm=False)) == first
    finally:
        again.shutdown()


def test_spawned_ranks_take_the_device_the_driver_resolved():
    from fairswitch.config import EngineConfig
    from fairswitch.distributed.workers import spawned_config

    auto = EngineConfig.from_kwargs(tensor_parallel_size=2)
    assert spawned_config(auto, torch.device("cuda")).model.device == "cuda"
    assert spawned_config(auto, torch.device("cpu")).model.device == "cpu"
    given = EngineConfig.from_kwargs(tensor_parallel_size=2, device="cpu")
    assert spawned_config(given, torch.device("cpu")) is given


def test_a_worker_whose_driver_is_gone_exits_and_removes_the_plan_file(tmp_path):
    """A driver killed while its ranks were starting left each worker waiting in the
    rendezvous for distributed_timeout_s (600 s by default), and the plan queue's file in
    /dev/shm for good. The worker's watch ends it once the driver's pid is not its parent's."""
    plans = tmp_path / "plans"
    plans.write_bytes(b"ring")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])  # a driver that has exited
    gone.wait()
    code = ("from fairswitch.distributed.plan_queue import QueueHandle\n"
            "from fairswitch.distributed.workers import _exit_with_driver\n"
            f"_exit_with_driver({gone.pid}, QueueHandle({str(plans)!r}, 1, 1, 1), 0.01)")
    out = subprocess.run([sys.executable, "-c", code], timeout=120, capture_output=True)
    assert out.returncode == 1 and not plans.exists(), out.stderr[-1000:]


def test_sizes_the_heads_do_not_split_fail_before_anything_starts(llama_dir):
    with pytest.raises(ValueError, match="not divisible by tensor_parallel_size=3"):
        LLM(model=str(llama_dir), tensor_parallel_size=3, num_gpu_blocks=64)
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1"):
        LLM(model=str(llama_dir), tensor_parallel_size=0)


def test_a_worker_that_dies_starting_fails_at_once_and_says_why(tmp_path):
    """A script without a main guard: its spawned worker re-runs it and dies before joining the
    group. The driver says so as soon as it happens, not after distributed_timeout_s."""
    script = tmp_path / "no_guard.py"
    script.write_text("from fairswitch import LLM\n"
                      "LLM(tensor_parallel_size=2, num_gpu_blocks=64, max_model_len=64, "
                      "distributed_timeout_s=600)\n")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 1
    last = run.stderr.strip().splitlines()[-1]
    assert "fairswitch-tp1 (exit code 1) exited during start-up" in last
    assert "if __name__ == '__main__':" in last


def test_a_step_that_fails_on_a_worker_names_it(tmp_path):
    """The driver's side of the broken collective only says "connection closed": the error
    names the worker that exited, whose own error is on stderr."""
    script = tmp_path / "worker_fails.py"
    script.write_text(
        "from fairswitch import LLM, SamplingParams\n"
        "from fairswitch.runner.model_runner import ModelRunner\n"
        "if __name__ == '__mp_main__':  # the spawned worker's copy of this script\n"
        "    run, calls = ModelRunner.run_plan, []\n"
        "    def failing(self, plan, tokens):\n"
        "        calls.append(1)\n"
        "        if len(calls) == 3:\n"
        "            raise RuntimeError('boom on the worker')\n"
        "        return run(self, plan, tokens)\n"
        "    ModelRunner.run_plan = failing\n"
        "if __name__ == '__main__':\n"
        "    llm = LLM(tensor_parallel_size=2, num_gpu_blocks=64, max_model_len=64)\n"
        "    try:\n"
        "        llm.generate(['Hi'], SamplingParams(max_tokens=8), use_tqdm=False)\n"
        "    except RuntimeError as e:\n"
        "        print('driver:', e)\n")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=300)
    assert "boom on the worker" in run.stderr
    assert "driver: a tensor-parallel step failed (fairswitch-tp1 exit code 1, its error on " \
           "stderr" in run.stdout, (run.stdout, run.stderr[-2000:])


def test_shutdown_kills_the_workers_when_a_step_is_stuck(llama_dir):
    """A rank stops answering mid-step: shutdown does not wait out distributed_timeout_s (the
    step waits in a collective), it kills the workers, which fails the step."""
    engine = AsyncEngine.from_config(EngineConfig.from_kwargs(
        model=str(llama_dir), tensor_parallel_size=2, num_gpu_blocks=64, max_model_len=64,
        distributed_timeout_s=300))
    worker = engine.engine.workers.procs[0]

    async def main() -> BaseException | None:
        os.kill(worker.pid, signal.SIGSTOP)  # alive, but it never answers again
        stream = engine.generate("Hi", GREEDY, request_id="stuck")
        task = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(1.0)  # the step waits for the worker
        await asyncio.to_thread(engine.shutdown, 1.0)
        try:
            while True:
                await task
                task = asyncio.ensure_future(stream.__anext__())
        except StopAsyncIteration:
            return None
        except Exception as e:  # noqa: BLE001
            return e
    try:
        error = asyncio.run(asyncio.wait_for(main(), 120))  # (not the 300 s timeout)
    finally:
        if worker.is_alive():
            os.kill(worker.pid, signal.SIGKILL)
    assert engine.failed and isinstance(error, RuntimeError), error
    worker.join(10)
    assert not worker.is_alive()


def test_a_dead_worker_fails_the_step(llama_dir):
    llm = LLM(model=str(llama_dir), tensor_parallel_size=2, num_gpu_blocks=64, max_model_len=64)
    try:
        worker = llm.engine.workers.procs[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(10)
        with pytest.raises(RuntimeError, match=r"fairswitch-tp1 exit code -9 \(SIGKILL: out of "
                           r"memory\?\)"):
            llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False)
        assert not llm.engine.has_unfinished_requests()  # generate aborted what it added
        assert not llm.engine.workers.alive()  # the other ranks were stopped
        with pytest.raises(RuntimeError, match="worker"):  # and stays failed, no hang
            llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
    finally:
        llm.shutdown()


def test_a_worker_killed_mid_step_is_named(llama_dir):
    """Killed in a collective (the OOM killer, say), it was left out of the error as one of the
    ranks the driver itself had killed: the message was gloo's "connection reset" alone."""
    llm = LLM(model=str(llama_dir), tensor_parallel_size=2, num_gpu_blocks=64, max_model_len=64)
    try:
        worker = llm.engine.workers.procs[0]
        threading.Timer(1.0, os.kill, (worker.pid, signal.SIGKILL)).start()
        with pytest.raises(RuntimeError, match=r"fairswitch-tp1 exit code -9 \(SIGKILL"):
            for _ in range(1000):  # (steps until the kill lands)
                llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False)
    finally:
        llm.shutdown()


@pytest.mark.parametrize("dies", [False, True])
def test_the_driver_destroys_its_graphs_before_leaving_the_group(llama_dir, monkeypatch, dies):
    """NCCL's destroy and abort wait for ever while a CUDA graph that captured one of the
    group's collectives lives: the driver releases its graphs first, waiting for the device on
    an orderly shutdown and not after a failure. (CPU: no graphs; the order is what is tested.)"""
    import torch.distributed as dist

    from fairswitch.distributed import workers as workers_mod

    llm = LLM(model=str(llama_dir), tensor_parallel_size=2, num_gpu_blocks=64, max_model_len=64)
    group = llm.engine.workers
    assert group.release_graphs == llm.engine.runner.release_graphs  # set by the builder
    calls = []
    group.release_graphs = lambda wait: calls.append(("release graphs", wait))
    destroy, leave = dist.destroy_process_group, workers_mod.leave_group
    monkeypatch.setattr(dist, "destroy_process_group",
                        lambda *a: (calls.append(("destroy",)), destroy(*a))[1])
    monkeypatch.setattr(workers_mod, "leave_group",
                        lambda abort: (calls.append(("leave", abort)), leave(abort))[1])
    if dies:
        os.kill(group.procs[0].pid, signal.SIGKILL)
        group.procs[0].join(10)
        with pytest.raises(RuntimeError, match="worker"):
            llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
        assert calls[:2] == [("release graphs", False), ("leave", True)]
    else:
        llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
        llm.shutdown()
        assert calls[:2] == [("release graphs", True), ("destroy",)]
    llm.shutdown()
    assert not group.alive()


def test_release_graphs_resets_every_graph_and_leaves_the_runner_eager():
    from fairswitch.runner.cuda_graph import release_graphs

    class Graph:
        def __init__(self):
            self.reset_calls = 0

        def reset(self):
            self.reset_calls += 1

    graphs = {1: (Graph(), None), 2: (Graph(), None)}
    held = [g for g, _ in graphs.values()]
    release_graphs(graphs)
    assert graphs == {} and [g.reset_calls for g in held] == [1, 1]

    class Holder:
        released = 0

        def release(self):
            Holder.released += 1

    runner = LLM(model="fairswitch-tiny", num_gpu_blocks=64, max_model_len=64).engine.runner
    runner.graphs, runner.mixed_graphs = Holder(), Holder()
    runner.release_graphs(wait=False)
    assert Holder.released == 2 and runner.graphs is None and runner.mixed_graphs is None
    runner.release_graphs(wait=True)  # nothing left: no device wait either


def test_without_shared_memory_plans_go_over_gloo(llama_dir, expected, monkeypatch):
    monkeypatch.setattr("fairswitch.distributed.workers.PlanWriter", _no_room)
    timeout_s = 8.0  # (start-up must fit in it too)
    threads = torch.get_num_threads()
    llm = LLM(model=str(llama_dir), tensor_parallel_size=2, num_gpu_blocks=256, swap_space=0,
              distributed_timeout_s=timeout_s)
    try:
        assert llm.engine.workers.plans is None
        assert tokens(llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False)) == expected[:2]
        # Idle for longer than the timeout: the worker waits for the next plan as long as it
        # takes (an idle server is not a hung rank).
        time.sleep(timeout_s + 1)
        assert llm.engine.workers.alive()
        assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == expected
        llm.shutdown()
        # (it said "a tensor-parallel worker has died (... exit code 0)")
        with pytest.raises(RuntimeError, match="the engine was shut down"):
            llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
        assert torch.get_num_threads() == threads  # the driver's share of the cores ended
    finally:
        llm.shutdown()


def _no_room(num_readers):
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("plans", ["shared memory", "gloo"])
def test_a_hung_worker_fails_the_step_after_the_timeout(llama_dir, capfd, monkeypatch, plans):
    """...and, half-way through the timeout, the driver says where it waits (stall_report).
    Plans over gloo (no room in /dev/shm, a plan past a slot, launched ranks) waited for a hung
    worker as long as the plans group does, a year."""
    if plans == "gloo":
        monkeypatch.setattr("fairswitch.distributed.workers.PlanWriter", _no_room)
    llm = LLM(model=str(llama_dir), tensor_parallel_size=2, num_gpu_blocks=64, max_model_len=64,
              distributed_timeout_s=10.0)  # (start-up must fit in it too)
    worker = llm.engine.workers.procs[0]
    try:
        assert tokens(llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False))  # the ranks work
        capfd.readouterr()
        os.kill(worker.pid, signal.SIGSTOP)  # alive, but it never answers again
        with pytest.raises(RuntimeError, match="tensor-parallel"):
            llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False)
        assert "in _step" in capfd.readouterr().err  # the driver's stack, from within the step
        assert not llm.engine.has_unfinished_requests()
        worker.join(10)
        assert not worker.is_alive()  # stopped (killed) with the others
        with pytest.raises(RuntimeError, match="stopped"):  # and the engine stays failed
            llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
    finally:
        if worker.is_alive():
            os.kill(worker.pid, signal.SIGKILL)
        llm.shutdown()


def _children(pid: int) -> set[int]:
    kids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.add(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return kids


def _running(pid: int) -> bool:
    """Alive and not a zombie (a zombie is an exited child its parent has not reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read().replace("\0", " ")
    except FileNotFoundError:
        return ""


@contextlib.contextmanager
def _serve_two_ranks():
    """``fairswitch serve --tensor-parallel-size 2`` on the embedded model, in a subprocess:
    (process, base URL, its children: the second rank and multiprocessing's helper)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fairswitch.cli.main", "serve", "--port", "0",
         "--served-model-name", "tiny", "--num-gpu-blocks", "128", "--max-model-len", "256",
         "--tensor-parallel-size", "2", "--shutdown-timeout", "0.2", "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)  # its own process group, as a terminal or supervisor makes
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    try:
        line = lines.get(timeout=180)
        assert line and line.startswith("fairswitch serve: tiny on http://"), \
            (line, proc.stderr.read() if line is None else "")
        children = _children(proc.pid)
        assert children
        yield proc, line.rsplit(" ", 1)[1].strip(), children
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _assert_gone(pids: set[int]) -> None:
    deadline = time.monotonic() + 20  # (multiprocessing's resource tracker exits on EOF)
    while (left := [pid for pid in pids if _running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, [_cmdline(pid) for pid in left]


def _client(url: str):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)


def test_serve_with_two_ranks_answers_as_one_rank_and_leaves_no_process():
    """A greedy completion through the OpenAI client equals the one-rank engine's, and a Ctrl-C
    (SIGINT to the whole process group, workers included) drains the server as with one rank:
    the running stream ends with the shutdown's in-band error, then every rank stops."""
    prompt = "The capital of France is"
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    want = LLM(num_gpu_blocks=128, max_model_len=256).generate([prompt], params,
                                                              use_tqdm=False)[0].outputs[0].text
    with _serve_two_ranks() as (proc, url, children), _client(url) as client:
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=16,
                                        temperature=0.0, extra_body={"ignore_eos": True})
        assert out.choices[0].text == want
        stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=200,
                                           stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))
        os.killpg(proc.pid, signal.SIGINT)
        with pytest.raises(openai.APIError, match="shutting down"):
            list(stream)
        assert proc.wait(timeout=60) == 0
        _assert_gone(children)


def test_serve_answers_503_and_exits_when_a_rank_dies():
    """A dead worker: the request gets a 503 (not a hang), the server exits with status 1 and
    leaves no process behind."""
    with _serve_two_ranks() as (proc, url, children), _client(url) as client:
        worker = next(pid for pid in children if "multiprocessing.spawn" in _cmdline(pid))
        os.kill(worker, signal.SIGKILL)
        with pytest.raises(openai.APIStatusError) as err:
            client.completions.create(model="tiny", prompt="Hello", max_tokens=8)
        assert err.value.status_code == 503, err.value
        assert proc.wait(timeout=60) == 1
        _assert_gone(children)


@pytest.mark.gpu
def test_two_ranks_on_one_gpu_give_one_ranks_tokens(llama_dir):
    """The CUDA path (Triton kernels, CUDA copy streams, swaps) with two ranks sharing the one
    GPU over gloo (NCCL wants a GPU per rank; gloo's collectives cannot be graphed, so these
    steps run eagerly), float32 so that the sums' order cannot flip a greedy token."""
    import torch

    if torch.cuda.device_count() != 1:
        pytest.skip("needs exactly one GPU (with more, each rank gets its own: NCCL)")
    opts = dict(model=str(llama_dir), device="cuda", dtype="float32", block_size=8,
                max_model_len=48, num_gpu_blocks=7, swap_space=0.01, preemption_mode="swap",
                policy="trace", priority_update_prob=0.5, min_run_steps=1, max_num_seqs=2)
    want = tokens(LLM(**opts).generate(PROMPTS, GREEDY, use_tqdm=False))
    llm = LLM(tensor_parallel_size=2, **opts)
    try:
        assert llm.engine.runner.graphs is None  # gloo: eager steps
        assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == want
        assert llm.engine.scheduler.preemptions_by_mode["swap"] > 0
        llm.engine.check_accounting()
    finally:
        llm.shutdown()


@pytest.mark.gpu
@pytest.mark.parametrize("async_scheduling", [True, False])
def test_two_ranks_on_two_gpus_over_nccl_with_graphs(llama_dir, async_scheduling):
    """A GPU per rank: NCCL, the collectives captured in the CUDA graphs, each rank swapping
    its own share over its own link; the tokens are one rank's (float32) under forced swaps."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    opts = dict(model=str(llama_dir), device="cuda", dtype="float32", block_size=8,
                max_model_len=48, num_gpu_blocks=7, swap_space=0.01, preemption_mode="swap",
                policy="trace", priority_update_prob=0.5, min_run_steps=1, max_num_seqs=2,
                async_scheduling=async_scheduling,
                distributed_timeout_s=90)  # a stall: stacks at 45 s, an error at 90 s
    want = tokens(LLM(**opts).generate(PROMPTS, GREEDY, use_tqdm=False))
    llm = LLM(tensor_parallel_size=2, **opts)
    try:
        assert llm.engine.runner.graphs is not None  # NCCL: decode steps graphed
        assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == want
        assert llm.engine.scheduler.preemptions_by_mode["swap"] > 0
        llm.engine.check_accounting()
    finally:
        llm.shutdown()


def test_ranks_started_by_a_launcher_meet_by_env(tmp_path):
    """torchrun starts both ranks (``env://``, as across hosts): rank 0 runs the command, rank 1
    becomes a worker; the output is one rank's and every process ends."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["-m", "fairswitch.cli.main", "generate", "--num-gpu-blocks", "128",
            "--max-model-len", "256", "--device", "cpu", "--max-tokens", "12", "--ignore-eos", "--no-progress",
            "--json", "The capital of France is"]
    one = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(port), *args, "--tensor-parallel-size", "2"],
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert two.stdout == one.stdout and '"token_ids"' in one.stdout
