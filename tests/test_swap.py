"""Context switches: swap vs recompute preemption, async copies, incremental swap-out, accounting."""

from __future__ import annotations

import random

import pytest

from fairswitch import LLM, SamplingParams
from fairswitch.kv.copy_backend import DelayedCopyBackend, SyncCopyBackend
from fairswitch.kv.extents import copy_extents, num_extents, split_extents
from fairswitch.kv.no_swap import NoSwapSpace
from fairswitch.request import Request
from fairswitch.scheduler.preemption import PreemptionPolicy
from helpers import slow_link

PROMPTS = ["The quick brown fox jumps over the lazy dog because", "def fibonacci(n):",
           "Paged attention stores the KV cache in fixed-size blocks, so that memory is "
           "allocated on demand", "Hi"]
N_OUT = 12


def greedy(n: int = N_OUT) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def expected(llama_dir):
    llm = LLM(model=str(llama_dir), num_gpu_blocks=256, swap_space=0)
    outs = llm.generate(PROMPTS, greedy(), use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions == 0
    return [o.outputs[0].token_ids for o in outs]


def tight_llm(llama_dir, mode: str, delay: int = 0, swap_space: float = 0.01,
              async_scheduling: bool = True, duplex: bool = True) -> LLM:
    # 12 blocks of 4 tokens cannot hold all four requests at once: constant preemption.
    llm = LLM(model=str(llama_dir), num_gpu_blocks=12, block_size=4, max_model_len=48,
              preemption_mode=mode, swap_space=swap_space, async_scheduling=async_scheduling)
    if delay:
        slow_link(llm.engine.kv.swap, delay, duplex)
    return llm


@pytest.mark.parametrize("mode, delay, duplex", [
    ("swap", 0, True), ("swap", 3, True), ("swap", 3, False), ("recompute", 0, True),
    ("auto", 0, True), ("auto", 2, True), ("auto", 2, False)])
def test_outputs_identical_under_forced_preemption(llama_dir, expected, mode, delay, duplex):
    llm = tight_llm(llama_dir, mode, delay, duplex=duplex)
    outs = llm.generate(PROMPTS, greedy(), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    sched = llm.engine.scheduler
    assert sched.num_preemptions > 0
    if mode == "swap":
        assert sched.preemptions_by_mode == {"swap": sched.num_preemptions, "recompute": 0}
        assert llm.engine.kv.swap.out_backend.stats.bytes_out > 0
    if mode == "recompute":
        assert sched.preemptions_by_mode["swap"] == 0
    engine = llm.engine
    engine.check_accounting()
    assert engine.kv.blocks.num_free_blocks == 12
    assert cpu_pool_whole(engine)


def cpu_pool_whole(engine) -> bool:
    """Every CPU block is free or cached by the CPU reuse tier, evictable (no fetch pins it)."""
    swap = engine.kv.swap
    cached = len(swap.tier.evictable) if swap.tier is not None else 0
    assert swap.tier is None or swap.tier.num_blocks == cached
    return swap.cpu_pool.num_free_blocks + cached == swap.cpu_pool.num_blocks


def test_full_cpu_pool_falls_back_to_recompute(llama_dir, expected):
    # Room for one small request's KV on the CPU: the rest must be recomputed.
    block_bytes = 2 * 2 * 4 * 2 * 16 * 4  # layers x K/V x tokens x kv heads x dim x fp32
    llm = tight_llm(llama_dir, "swap", swap_space=3 * block_bytes / 2**30)
    assert llm.engine.kv.layout.block_bytes == block_bytes
    assert llm.engine.kv.swap.cpu_pool.num_blocks == 3
    outs = llm.generate(PROMPTS, greedy(), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert llm.engine.scheduler.preemptions_by_mode["recompute"] > 0
    llm.engine.check_accounting()


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_aborts_mid_copy_and_random_churn_keep_pools_whole(llama_dir, async_scheduling):
    llm = tight_llm(llama_dir, "swap", delay=2, async_scheduling=async_scheduling)
    engine = llm.engine
    rng = random.Random(1)  # a run with swaps and fetches to abort mid-copy
    ids = [engine.add_request(PROMPTS[i % 4] * rng.randint(1, 2),
                              SamplingParams(max_tokens=rng.randint(2, 12), ignore_eos=True))
           for i in range(10)]
    steps = 0
    aborted_in_flight = 0
    while engine.has_unfinished_requests():
        engine.step()
        engine.check_accounting()
        steps += 1
        in_flight = [r.request_id for r in (*engine.kv.swap.outgoing, *engine.kv.swap.incoming)]
        if steps % 4 == 0 or in_flight:  # every copy in flight, and churn every 4th step
            victim = in_flight[0] if in_flight else rng.choice(ids)
            aborted_in_flight += bool(in_flight)
            engine.abort_request(victim)
    assert aborted_in_flight > 0  # the interesting case happened
    assert not engine.kv.swap.has_in_flight()
    assert engine.kv.blocks.num_free_blocks == 12
    assert cpu_pool_whole(engine)


def test_incremental_swap_out_moves_only_new_blocks(llama_dir):
    llm = LLM(model=str(llama_dir), num_gpu_blocks=64, block_size=4, max_model_len=64,
              swap_space=0.01)
    engine = llm.engine
    swap, sched = engine.kv.swap, engine.scheduler
    rid = engine.add_request(prompt_token_ids=list(range(1000, 1018)), params=greedy(30))
    req = engine.requests[rid]
    while req.num_output_tokens < 2:
        engine.step()
    block = swap.block_bytes
    # First swap-out: every computed token's block (19 tokens -> 5 blocks).
    sched.running.remove(req)
    swap.swap_out(req)
    swap.poll()
    assert swap.out_backend.stats.bytes_out == 5 * block
    assert swap.out_backend.stats.num_copies == 1  # 5 consecutive blocks -> one extent
    swap.swap_in(req)
    sched._land(swap.poll())
    for _ in range(6):
        engine.step()  # 6 more tokens: positions 19..24
    before = swap.out_backend.stats.bytes_out
    sched.running.remove(req)
    swap.swap_out(req)
    # Saved: 19 tokens = 4 full blocks + a partial one; now 25 computed -> blocks 4..6 move.
    assert swap.out_backend.stats.bytes_out - before == 3 * block
    swap.poll()
    swap.swap_in(req)
    sched._land(swap.poll())
    while engine.has_unfinished_requests():
        engine.step()
    engine.check_accounting()


def test_copy_extents_coalesce_and_baseline_copies_per_layer():
    assert copy_extents([7, 8, 9, 2, 3], [40, 41, 42, 43, 44]) == [(7, 40, 3), (2, 43, 2)]
    assert copy_extents([], []) == []
    assert num_extents([3, 4, 5, 9, 10, 1]) == 3
    import torch

    src = torch.randn(10, 3, 2, 4, 2, 8)
    dst = torch.zeros(10, 3, 2, 4, 2, 8)
    fast, base = SyncCopyBackend(), SyncCopyBackend(per_layer=True)
    fast.submit(src, dst, copy_extents([0, 1, 2], [5, 6, 7]), to_host=True)
    assert torch.equal(dst[5:8], src[0:3]) and fast.stats.num_copies == 1
    base.submit(src, dst, copy_extents([0, 1, 2], [5, 6, 7]), to_host=True)
    assert base.stats.num_copies == 3 * 3 * 2  # blocks x layers x K/V
    assert base.stats.bytes_out == fast.stats.bytes_out


def test_policy_prefers_cheaper_mode(llama_dir):
    llm = LLM(model=str(llama_dir), num_gpu_blocks=64, block_size=4, max_model_len=64,
              swap_space=0.01)
    swap = llm.engine.kv.swap
    req = Request("x", list(range(40)), SamplingParams(), 0.0)
    req.num_computed_tokens = 40
    req.block_table = list(range(10))
    slow = PreemptionPolicy("auto", link_bytes_per_s=1.0, prefill_tokens_per_s=1e6)
    fast_link = PreemptionPolicy("auto", link_bytes_per_s=1e12, prefill_tokens_per_s=10.0)
    assert slow.choose(req, swap) == "recompute"
    assert fast_link.choose(req, swap) == "swap"
    assert PreemptionPolicy("swap").choose(req, NoSwapSpace(swap.gpu)) == "recompute"  # no space
    assert PreemptionPolicy("recompute").choose(req, swap) == "recompute"
    short = PreemptionPolicy("auto", link_bytes_per_s=1e12, prefill_tokens_per_s=10.0,
                             min_swap_tokens=100)
    assert short.choose(req, swap) == "recompute"
    with pytest.raises(ValueError, match="preemption_mode"):
        PreemptionPolicy("sometimes")


def test_cost_model_rates_are_measured(llama_dir):
    """The link rate comes from a probe copy at startup and prefill throughput from prefill-heavy
    steps: neither stays at the configured starting values, and the probe leaves no trace."""
    llm = LLM(model=str(llama_dir), num_gpu_blocks=128, block_size=4, max_model_len=512,
              swap_space=0.01, swap_link_gb_s=1e-6, prefill_tokens_per_s=1e-3)
    policy, swap = llm.engine.scheduler.preemption, llm.engine.kv.swap
    assert policy.num_link_samples == 1 and policy.link_bytes_per_s > 1e3
    assert swap.out_backend.stats.num_copies == 0 and swap.cpu_pool.num_used_blocks == 0
    llm.generate([list(range(100, 400))], greedy(2), use_tqdm=False)  # one 300-token prefill
    assert policy.num_prefill_samples >= 1 and policy.prefill_tokens_per_s > 1.0
    m = llm.engine.switch_metrics()
    assert m["link_gb_s"] == policy.link_bytes_per_s / 1e9
    with pytest.raises(RuntimeError, match="empty"):
        llm.engine.add_request(prompt_token_ids=[1, 2, 3], params=greedy(4))
        llm.engine.step()
        swap.probe_link()
    # A sample that cannot be a rate leaves the average alone.
    before = policy.prefill_tokens_per_s
    policy.observe_prefill(100, 0.0)
    assert policy.prefill_tokens_per_s == before


def test_baseline_mode_and_ablations_same_outputs_more_copies(llama_dir, expected):
    """vLLM-0.3.3-style switching gives the same tokens, with many more, smaller copies."""
    metrics = {}
    for name, opts in {"fairswitch": {}, "baseline": {"baseline": True},
                       "no_incremental": {"incremental_swap": False},
                       "sync": {"async_swap": False}}.items():
        # The baseline's 16-token blocks: 2 of them still force preemptions (when no headroom
        # is kept: with it, one request at a time would fit).
        small = dict(num_gpu_blocks=2, max_model_len=32, growth_headroom=0) if (
            name == "baseline") else dict(num_gpu_blocks=12, max_model_len=48)
        llm = LLM(model=str(llama_dir), block_size=4, preemption_mode="swap", swap_space=0.01,
                  **small, **opts)
        outs = llm.generate(PROMPTS, greedy(), use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected, name
        llm.engine.check_accounting()
        metrics[name] = llm.engine.switch_metrics()
    base, fast = metrics["baseline"], metrics["fairswitch"]
    assert base["preemptions_swap"] > 0 and fast["preemptions_swap"] > 0
    # Baseline: every copy is one layer's K or V of one 16-token block (16 x 2 heads x 16 x 4 B).
    base_bytes = base["swap_bytes_out"] + base["swap_bytes_in"]
    assert base["swap_copies"] == base_bytes / 2048
    # fairswitch: every copy is at least one whole block across all layers (2 KiB at 4 tokens),
    # and consecutive blocks share a copy.
    fast_bytes = fast["swap_bytes_out"] + fast["swap_bytes_in"]
    assert fast["swap_copies"] * 2048 <= fast_bytes
    for m in metrics.values():  # waits are part of the stall; synchronous copies always wait
        assert m["switch_stall_s"] >= m["switch_wait_s"] >= 0.0
    assert metrics["sync"]["switch_wait_s"] > 0 and base["switch_wait_s"] > 0
    assert metrics["no_incremental"]["swap_bytes_out"] >= fast["swap_bytes_out"]


def test_baseline_overrides_switch_options():
    from fairswitch.config import EngineConfig

    cc = EngineConfig.from_kwargs(baseline=True, block_size=4).cache
    assert (cc.tokens_per_block, cc.enable_prefix_caching, cc.async_swap, cc.incremental_swap,
            cc.per_layer_swap) == (16, False, False, False, True)


def _counting_steps(engine) -> list[int]:
    """Count the engine's steps and check its accounting after every one, and that no step
    seats more requests than ``max_num_seqs`` (swap-ins landing early included)."""
    steps: list[int] = []
    step, schedule = engine.step, engine.scheduler.schedule
    max_seqs = engine.config.scheduler.max_num_seqs

    def counted():
        out = step()
        engine.check_accounting()
        steps.append(1)
        return out

    def seated():
        out = schedule()
        assert len(out.scheduled) <= max_seqs, (len(out.scheduled), max_seqs)
        return out

    engine.step, engine.scheduler.schedule = counted, seated
    return steps


@pytest.mark.parametrize("mode", ["swap", "auto"])
def test_early_swap_in_same_outputs_fewer_steps(llama_dir, expected, mode):
    """With early landing a resumed request runs in the step its swap-in is issued (the double
    moves the bytes when compute is ordered after the copy, the host sees it done 3 polls later):
    same tokens, and the host never blocks on a swap-in, where without it every step that has
    nothing else to run waits for the copy. Two seats and priorities redrawn often: many
    swap-ins."""
    waits, steps = {}, {}
    for early in (False, True):
        llm = LLM(model=str(llama_dir), num_gpu_blocks=12, block_size=4, max_model_len=48,
                  preemption_mode=mode, swap_space=0.01, early_swap_in=early, max_num_seqs=2,
                  policy="trace", priority_update_prob=0.5, min_run_steps=1)
        slow_link(llm.engine.kv.swap, 3)
        assert llm.engine.kv.swap.early_landing == early
        counted = _counting_steps(llm.engine)
        outs = llm.generate(PROMPTS, greedy(), use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected, early
        assert llm.engine.scheduler.preemptions_by_mode["swap"] > 0
        assert cpu_pool_whole(llm.engine) and llm.engine.kv.blocks.num_free_blocks == 12
        assert len(counted) > 0
        waits[early] = llm.engine.scheduler.switch_stall_s
        steps[early] = len(counted)
    assert waits[True] == 0.0 < waits[False]
    assert steps[True] < steps[False]


def test_early_landed_swap_ins_hold_their_seats(llama_dir, expected):
    """Several swapped requests resuming in one step, each running before the host sees its
    copy land: each takes a seat from its swap-in on, so the step never holds more than
    max_num_seqs requests (on the GPU its sampling buffers would overflow); same tokens."""
    llm = LLM(model=str(llama_dir), num_gpu_blocks=24, block_size=4, max_model_len=48,
              preemption_mode="swap", swap_space=0.01, early_swap_in=True, max_num_seqs=2,
              policy="trace", priority_update_prob=0.5, min_run_steps=1)
    slow_link(llm.engine.kv.swap, 3)
    _counting_steps(llm.engine)  # asserts the seats
    outs = llm.generate(PROMPTS * 2, greedy(), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected * 2
    assert llm.engine.scheduler.preemptions_by_mode["swap"] > 0


def test_early_landed_requests_preempted_or_aborted_mid_copy_keep_pools_whole(llama_dir):
    """Aborts and recompute preemptions of running requests whose swap-in is still in flight
    (the host has not seen it land): no request lands twice, the transfers keep their blocks until
    they land, the pools come back whole, and the survivors' tokens match a run without
    preemption."""
    rng = random.Random(3)
    prompts = [PROMPTS[i % 4] * rng.randint(1, 2) for i in range(12)]
    params = [SamplingParams(max_tokens=rng.randint(2, 12), ignore_eos=True, temperature=0.0)
              for _ in prompts]
    roomy = LLM(model=str(llama_dir), num_gpu_blocks=256, swap_space=0)
    want = [o.outputs[0].token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]
    llm = LLM(model=str(llama_dir), num_gpu_blocks=12, block_size=4, max_model_len=48,
              preemption_mode="auto", swap_space=0.01, early_swap_in=True)
    engine = llm.engine
    slow_link(engine.kv.swap, 4)
    _counting_steps(engine)
    drops_mid_copy = []
    drop_gpu = engine.kv.swap.drop_gpu

    def counted_drop(req):  # recompute preemption of a request whose swap-in is in flight
        drops_mid_copy.append(req in engine.kv.swap.incoming)
        drop_gpu(req)

    engine.kv.swap.drop_gpu = counted_drop
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    got: dict[str, list[int]] = {}
    aborted: set[str] = set()
    hit = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                got[out.request_id] = out.outputs[0].token_ids
        early = [r for r, t in engine.kv.swap.incoming.items()
                 if t.landed_early and r in engine.scheduler.running]
        if early and rng.random() < 0.5:  # a running request whose swap-in is still in flight
            hit += 1
            if hit % 2:
                aborted.add(early[0].request_id)
                engine.abort_request(early[0].request_id)
            else:  # preempted for recompute: its blocks must outlive the copy
                sched = engine.scheduler
                sched.preemption.mode = "recompute"
                sched._preempt(early[0])
                sched.preemption.mode = "auto"
    assert hit > 0 and any(drops_mid_copy)
    survivors = [i for i, rid in enumerate(ids) if rid not in aborted]
    assert len(survivors) >= 6
    assert [got[ids[i]] for i in survivors] == [want[i] for i in survivors]
    assert not engine.kv.swap.has_in_flight()
    assert cpu_pool_whole(engine) and engine.kv.blocks.num_free_blocks == 12


def test_growth_headroom_same_outputs_fewer_preemptions(llama_dir):
    """Admitting or resuming a request only while a free block per running request is left
    stops the preempt / resume ping-pong of a full cache: same tokens, fewer preemptions."""
    rng = random.Random(1)
    prompts = [[rng.randrange(100, 5000) for _ in range(rng.randint(4, 24))] for _ in range(16)]
    params = greedy(24)
    roomy = LLM(model=str(llama_dir), num_gpu_blocks=256, swap_space=0)
    want = [o.outputs[0].token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]
    preemptions = {}
    for headroom in (0, 1):
        llm = LLM(model=str(llama_dir), num_gpu_blocks=24, block_size=4, max_model_len=64,
                  preemption_mode="swap", swap_space=0.05, growth_headroom=headroom)
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == want, headroom
        llm.engine.check_accounting()
        preemptions[headroom] = llm.engine.switch_metrics()["preemptions_swap"]
    assert 0 < preemptions[1] < preemptions[0]


def test_memory_pressure_waits_for_draining_copies_before_another_victim(llama_dir, expected):
    """When a running request needs a block and copies still hold some (a swap-out draining),
    the scheduler waits for them instead of preempting one more request: fewer preemptions
    than when every shortage takes a victim, same tokens, pools whole."""
    from fairswitch.kv.swap_manager import SwapManager

    preemptions, reclaimed = {}, {}
    for wait in (True, False):
        llm = LLM(model=str(llama_dir), num_gpu_blocks=12, block_size=4, max_model_len=48,
                  preemption_mode="swap", swap_space=0.01, growth_headroom=0)
        swap = llm.engine.kv.swap
        slow_link(swap, 6)
        calls = []

        def reclaim(self=swap, wait=wait, calls=calls):
            calls.append(wait and SwapManager.reclaim_in_flight(self))
            return calls[-1]

        swap.reclaim_in_flight = reclaim
        outs = llm.generate(PROMPTS, greedy(), use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected, wait
        llm.engine.check_accounting()
        assert cpu_pool_whole(llm.engine) and llm.engine.kv.blocks.num_free_blocks == 12
        preemptions[wait] = llm.engine.switch_metrics()["preemptions_swap"]
        reclaimed[wait] = sum(calls)
    assert reclaimed[True] > 0
    assert 0 < preemptions[True] < preemptions[False]


def test_split_extents_keeps_every_copy_in_bounded_pieces():
    assert split_extents([(0, 10, 5), (7, 3, 2)], 2) == [(0, 10, 2), (2, 12, 2), (4, 14, 1),
                                                         (7, 3, 2)]
    assert split_extents([(4, 0, 3)], 8) == [(4, 0, 3)]


@pytest.mark.parametrize("duplex", [True, False])
def test_a_swap_in_lands_while_a_swap_out_is_in_flight_only_in_full_duplex(duplex):
    """A rank preemption: A swaps out, B (on the CPU) swaps in. Full duplex, B's copy is on its
    own stream and lands while A's is still in flight; on one stream it lands only after A's.
    Either way B's bytes arrive intact and the pools come back whole."""
    import torch

    from fairswitch.kv.cache_manager import KVCacheManager
    from fairswitch.kv.swap_manager import SwapManager

    kv = KVCacheManager(16, 4)
    gpu, cpu = torch.zeros(16, 1), torch.zeros(16, 1)
    out = DelayedCopyBackend(10**6)
    swap = SwapManager(kv, gpu, cpu, out, block_bytes=4,
                       in_backend=DelayedCopyBackend(2) if duplex else out)
    a, b = (Request(name, [1] * 16, greedy(), 0.0) for name in "ab")
    for req in (b, a):
        assert kv.allocate_slots(req, 16)
        req.num_computed_tokens = 16
    gpu[b.block_table] = 7.0
    swap.swap_out(b)
    out.wait(swap.outgoing[b].handle)
    swap.poll()
    assert not swap.outgoing and b.cpu_block_table
    swap.swap_out(a)  # its copy will not land by itself
    swap.swap_in(b)
    landed = [r for _ in range(4) for r in swap.poll()]
    if duplex:
        assert landed == [b] and a in swap.outgoing
        out.wait(swap.outgoing[a].handle)
    else:
        assert landed == []  # queued behind A's swap-out
        assert swap.wait_incoming() == [b] and a not in swap.outgoing  # A's landed first
    assert torch.equal(gpu[b.block_table], torch.full((4, 1), 7.0))
    swap.poll()
    swap.release(a)
    swap.release(b)
    assert kv.num_free_blocks == 16 and swap.cpu_pool.num_used_blocks == 0


def test_full_duplex_is_a_stream_per_direction(llama_dir):
    """The engine's swap space: swap-outs, swap-ins and write-backs on streams of their own
    (one per direction and one for background traffic), or swaps on one stream without duplex;
    the copy counters add up every stream."""
    for duplex in (True, False):
        llm = LLM(model=str(llama_dir), num_gpu_blocks=12, block_size=4, max_model_len=48,
                  preemption_mode="swap", swap_space=0.01, duplex_swap=duplex)
        swap = llm.engine.kv.swap
        assert (swap.in_backend is not swap.out_backend) == duplex
        assert swap.writeback_backend not in (swap.in_backend, swap.out_backend)
        assert len(swap.copy_stats()) == 2 + duplex
        llm.generate(PROMPTS, greedy(), use_tqdm=False)
        m = llm.engine.switch_metrics()
        moved = sum(b.stats.bytes_out + b.stats.bytes_in for b in
                    {id(b): b for b in (swap.out_backend, swap.in_backend,
                                        swap.writeback_backend)}.values())
        assert m["swap_bytes_in"] > 0 and m["swap_bytes_out"] + m["swap_bytes_in"] == moved
        if duplex:
            assert swap.in_backend.stats.bytes_out == 0 and swap.out_backend.stats.bytes_in == 0


def test_reclaim_waits_for_the_oldest_copy_only():
    """Short of blocks, the scheduler asks the swap manager to reclaim: it waits for one copy at
    a time, oldest first (copies on one stream land in order), not for every copy in flight."""
    import torch

    from fairswitch.kv.cache_manager import KVCacheManager
    from fairswitch.kv.swap_manager import SwapManager

    kv = KVCacheManager(16, 4)
    swap = SwapManager(kv, torch.zeros(16, 1), torch.zeros(16, 1), DelayedCopyBackend(10**6),
                       block_bytes=4)
    reqs = []
    for i in range(2):
        req = Request(f"r{i}", [1] * 16, greedy(), 0.0)
        assert kv.allocate_slots(req, 16)
        req.num_computed_tokens = 16
        swap.swap_out(req)
        reqs.append(req)
    assert kv.num_free_blocks == 8  # both requests' blocks drain
    assert swap.reclaim_in_flight()
    assert kv.num_free_blocks == 12 and list(swap.outgoing) == [reqs[1]]
    assert swap.reclaim_in_flight()
    assert kv.num_free_blocks == 16 and not swap.outgoing
    assert not swap.reclaim_in_flight()


def test_release_during_an_early_landed_fetch_gives_back_the_group_reservation():
    """A request aborted while its CPU-tier fetch is still in flight (it already runs, early
    landing) hands its blocks to the copy and gives back its group's unused tail at once, as a
    request released with no copy in flight does."""
    import torch

    from fairswitch.kv.cache_manager import KVCacheManager
    from fairswitch.kv.reuse_index import ReuseTier, block_hashes
    from fairswitch.kv.swap_manager import SwapManager

    kv = KVCacheManager(32, 4, block_groups=True)
    tier = ReuseTier(4)
    swap = SwapManager(kv, torch.zeros(32, 1), torch.zeros(16, 1), DelayedCopyBackend(10**6),
                       block_bytes=4, cpu_tier=tier, early_landing=True)
    tokens = [5, 6, 7, 8]
    (cached,) = swap.cpu_pool.allocate(1)
    tier.add(block_hashes(tokens, 4, 4)[0], tuple(tokens), cached)
    req = Request("r", tokens + [9, 10, 11, 12], greedy(40), 0.0)
    swap.fetch_cached(req, [cached])
    assert swap.num_pending_in == 1  # it holds a seat until handed over
    assert swap.poll() == [req]  # it runs already, its copy in flight
    assert req in swap.incoming and swap.num_pending_in == 0
    assert kv.allocate_slots(req, 4)  # the rest of its prompt: a group with a reserved tail
    assert kv.reserved[req]
    swap.release(req)
    assert req not in kv.reserved and kv.num_reserved_blocks == 0
    while swap.reclaim_in_flight():
        pass
    assert kv.pool.num_free_blocks == 32 and not swap.has_in_flight()


def test_without_incremental_swap_a_request_out_again_before_its_swap_in_lands_keeps_its_copy(
        llama_dir):
    """vLLM-style swaps (no incremental swap) free the CPU copy once a swap-in lands, but not
    when the request, run early, was swapped out again meanwhile: that copy is then its only one
    (and its new swap-out still writes it)."""
    llm = LLM(model=str(llama_dir), num_gpu_blocks=64, block_size=4, max_model_len=64,
              swap_space=0.01, incremental_swap=False, early_swap_in=True,
              async_scheduling=False)
    engine, params = llm.engine, greedy(20)
    swap, sched = engine.kv.swap, engine.scheduler
    slow_link(swap, 3)
    req = engine.requests[engine.add_request(PROMPTS[0], params)]
    while req.num_output_tokens < 3:
        engine.step()
    sched._preempt(req)  # swapped out; wait for it to land
    while req in swap.outgoing:
        swap.poll()
    sched.swapped.remove(req)
    swap.swap_in(req)  # lands early: runs before its copy is seen to land
    sched._land(swap.poll())
    assert req in swap.incoming and req in sched.running
    sched._preempt(req)  # out again, before the host has seen the swap-in land
    assert req in swap.outgoing
    while req in swap.incoming:
        swap.poll()
    assert req.cpu_block_table and req.num_cpu_tokens >= len(PROMPTS[0]) // 4
    got = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            got = out.outputs[0].token_ids
    engine.check_accounting()
    want = LLM(model=str(llama_dir), num_gpu_blocks=64, swap_space=0).generate(
        [PROMPTS[0]], params, use_tqdm=False)[0].outputs[0].token_ids
    assert got == want


_BLOCK_BYTES = 6 * 2 * 4 * 2 * 64 * 4  # the embedded model's KV block at block_size 4, fp32


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def test_a_request_swapped_out_while_its_early_fetch_is_in_flight_leaks_no_tier_block():
    """With early landing a request runs before the host sees its CPU-tier fetch land; swapped
    out and back in meanwhile, its swap-in's record replaced the fetch's, whose tier blocks
    stayed referenced (never evictable) for good. check_accounting now compares the tier's
    references with the fetches in flight."""
    llm = LLM(num_gpu_blocks=16, block_size=4, max_model_len=60,
              swap_space=64 * _BLOCK_BYTES / 2**30, early_swap_in=True, preemption_mode="swap",
              policy="priority", preempt_threshold=0.0, min_run_steps=1, async_scheduling=False,
              growth_headroom=0)
    engine, swap = llm.engine, llm.engine.kv.swap
    history = list(range(1000, 1016))
    llm.generate([history], _greedy(2), use_tqdm=False)  # written back to the CPU tier
    for i in range(4):  # and pushed out of the GPU's
        llm.generate([list(range(2000 + 40 * i, 2030 + 40 * i))], _greedy(2), use_tqdm=False)
    swap.set_backends(SyncCopyBackend(), DelayedCopyBackend(12), SyncCopyBackend())
    rid = engine.add_request(prompt_token_ids=history + [7, 8, 9], params=_greedy(20),
                             priority=5)
    engine.step()
    engine.step()
    assert engine.requests[rid].num_cached_tokens == 16 and engine.requests[rid] in swap.incoming
    engine.add_request(prompt_token_ids=list(range(3000, 3040)), params=_greedy(2), priority=0)
    while engine.has_unfinished_requests():
        engine.step()
        engine.check_accounting()
    assert engine.scheduler.preemptions_by_mode["swap"] >= 1
    assert not swap.has_in_flight() and not swap.tier.refs


def test_a_write_back_in_flight_does_not_turn_a_swap_into_a_recompute():
    """A finished request's write-back to the CPU tier took every free CPU block, and while it
    was in flight can_swap_out did not count them: a live victim was recomputed. It waits for
    the write-back now and evicts what it cached (cached KV never keeps a live request out)."""
    llm = LLM(num_gpu_blocks=16, block_size=4, max_model_len=64,
              swap_space=8 * _BLOCK_BYTES / 2**30, preemption_mode="swap", policy="priority",
              preempt_threshold=0.0, min_run_steps=1, async_scheduling=False)
    engine, swap = llm.engine, llm.engine.kv.swap
    swap.set_backends(SyncCopyBackend(), SyncCopyBackend(), DelayedCopyBackend(50))
    live = engine.add_request(prompt_token_ids=list(range(2000, 2018)), params=_greedy(30),
                              priority=5)
    done = engine.add_request(prompt_token_ids=list(range(1000, 1028)), params=_greedy(1),
                              priority=5)
    while done in engine.requests:
        engine.step()
    victim = engine.requests[live]  # room for its KV only once the write-back has landed
    assert swap.cpu_pool.num_free_blocks < swap.cpu_blocks_needed(victim) <= \
        swap.cpu_pool.num_free_blocks + swap.num_cpu_blocks_in_flight()
    engine.add_request(prompt_token_ids=list(range(3000, 3048)), params=_greedy(2), priority=0)
    for _ in range(3):
        engine.step()
        engine.check_accounting()
    assert engine.scheduler.preemptions_by_mode == {"swap": 1, "recompute": 0}
    assert victim.request_id in engine.requests


def test_a_finished_request_s_swap_copy_goes_to_the_cpu_tier_uncopied():
    """The blocks its swap copy held were copied from the GPU again by the write-back, and the
    copy freed: 18 blocks written back here, 10 of them already on the CPU."""
    llm = LLM(num_gpu_blocks=16, block_size=4, max_model_len=64,
              swap_space=64 * _BLOCK_BYTES / 2**30, preemption_mode="swap", policy="priority",
              preempt_threshold=0.0, min_run_steps=1, async_scheduling=False)
    engine, swap = llm.engine, llm.engine.kv.swap
    engine.add_request(prompt_token_ids=list(range(2000, 2032)), params=_greedy(4), priority=5)
    engine.step()
    engine.add_request(prompt_token_ids=list(range(3000, 3040)), params=_greedy(1), priority=0)
    while engine.has_unfinished_requests():
        engine.step()
        engine.check_accounting()
    assert engine.scheduler.preemptions_by_mode == {"swap": 1, "recompute": 0}
    swapped, _, written_back = (s.bytes_out // _BLOCK_BYTES for s in swap.copy_stats())
    assert (swapped, written_back) == (8, 10)  # the second request's 10; the first's 8 reused
    assert swap.tier.num_blocks == 18
