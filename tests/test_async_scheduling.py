"""Async scheduling (engine.py ``Engine.step``): the next step is scheduled and launched
before the current one's tokens are waited for, its inputs that the current one samples copied
over on the device. Same tokens as scheduling in turn; a request that stops runs at most one step
more; aborts and preemptions between steps lose nothing; no placeholder token ever leaves the
engine, and between steps placeholders stand only for tokens of the step in flight."""

from __future__ import annotations

import random

import pytest

from fairswitch import LLM, SamplingParams
from fairswitch.request import PLACEHOLDER_TOKEN
from fairswitch.request import RequestStatus

PROMPTS = ["Once upon a time", "The capital of France is", "1, 2, 3,", "def main():"]


def tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def make_llm(async_scheduling: bool, **kwargs) -> LLM:
    # On the CPU in float32 wherever the tests run: they compare tokens between engines whose
    # batches differ, which bfloat16 on a GPU does not keep bit-exact (test_gpu.py checks
    # preemption with async scheduling on CUDA in float32).
    return LLM(num_gpu_blocks=kwargs.pop("num_gpu_blocks", 512), device="cpu",
               async_scheduling=async_scheduling, **kwargs)


def test_on_by_default_and_off_with_synchronous_swaps():
    assert LLM(num_gpu_blocks=512, device="cpu").engine._pipelined
    assert make_llm(True).engine._pipelined
    assert not make_llm(False).engine._pipelined
    assert not make_llm(True, async_swap=False).engine._pipelined
    assert not make_llm(True, baseline=True).engine._pipelined


def in_flight_requests(engine):
    step = engine._in_flight
    return step.pending.requests if step is not None else []


def assert_placeholders_only_in_flight(engine):
    """Between steps, a placeholder ends exactly the requests the step in flight samples."""
    flying = {id(r) for r in in_flight_requests(engine)}
    for r in engine.requests.values():
        n = r.token_ids.count(PLACEHOLDER_TOKEN)
        assert n == (id(r) in flying), r.request_id
        assert not n or r.token_ids[-1] == PLACEHOLDER_TOKEN
        assert r.num_computed_tokens < r.num_tokens or not n


def test_launches_the_next_step_before_waiting_for_this_one():
    """Each call schedules and launches the next step behind the one in flight, hands over
    (the gpu_busy step event, fired by the runner once the launch is queued) and only then
    waits; the next step is launched behind the previous one, whose tokens it reads on the
    device."""
    llm = make_llm(True)
    engine, events, afters = llm.engine, [], []
    runner, scheduler = engine.runner, engine.scheduler
    launch, collect, schedule = runner.launch, runner.collect, scheduler.schedule

    def recording_launch(sched, after=None):
        events.append("launch")
        afters.append(after)
        pending = launch(sched, after)
        launched.append(pending)
        return pending

    launched: list = []
    runner.launch = recording_launch
    runner.collect = lambda *a, **k: (events.append("collect"), collect(*a, **k))[1]
    scheduler.schedule = lambda: (events.append("schedule"), schedule())[1]
    engine.events.on_gpu_busy.append(lambda: events.append("gpu_busy"))
    rid = engine.add_request(PROMPTS[0], SamplingParams(max_tokens=3, ignore_eos=True))
    outs = [engine.step() for _ in range(3)]
    assert events == (["schedule", "launch"]  # nothing in flight yet: the prompt's step
                      + ["schedule", "launch", "gpu_busy", "collect"] * 2
                      # at its length limit: nothing to launch behind the last token's step
                      + ["schedule", "gpu_busy", "collect"])
    assert afters == [None, launched[0], launched[1]]  # each behind the one before
    assert [len(o[0].outputs[0].token_ids) for o in outs] == [1, 2, 3]
    assert outs[-1][0].finished and rid not in engine.requests and not engine.step_in_flight


@pytest.mark.parametrize("seed", [0, 1])
def test_same_tokens_as_scheduling_in_turn(seed):
    """Greedy, seeded sampling, stop strings, stop tokens and EOS: every request ends exactly as
    with scheduling in turn, under a cache small enough to preempt."""
    rng = random.Random(seed)
    base = make_llm(False).generate(PROMPTS, SamplingParams(max_tokens=24, temperature=0.0,
                                                            ignore_eos=True), use_tqdm=False)
    texts = [o.outputs[0].text for o in base]
    params = []
    for i in range(12):
        kind = i % 4
        if kind == 0:
            params.append(SamplingParams(max_tokens=rng.randint(1, 20), temperature=0.0,
                                         ignore_eos=True))
        elif kind == 1:
            params.append(SamplingParams(max_tokens=20, temperature=1.0, seed=rng.randint(0, 99),
                                         ignore_eos=True))
        elif kind == 2:  # stops on a string from the middle of its greedy text
            text = texts[i % 4]
            params.append(SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                                         stop=[text[6:9]]))
        else:  # stops on its greedy run's fourth token
            params.append(SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                                         stop_token_ids=[base[i % 4].outputs[0].token_ids[3]]))
    prompts = [PROMPTS[i % 4] for i in range(12)]
    runs = {}
    for ahead in (False, True):
        llm = make_llm(ahead, num_gpu_blocks=16, block_size=4, max_model_len=48, swap_space=0.01,
                       preemption_mode="auto", growth_headroom=0)
        outs = llm.generate(prompts, params, use_tqdm=False)
        runs[ahead] = [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason)
                       for o in outs]
        assert llm.engine.scheduler.num_preemptions > 0
        llm.engine.check_accounting()
        assert llm.engine.kv.blocks.num_free_blocks == 16
    assert runs[True] == runs[False]
    assert {r for _, _, r in runs[True]} == {"stop", "length"}


def test_a_request_that_stops_runs_one_step_more_at_most():
    """A request that a step ends by EOS was launched once more behind it (its stop was not
    known yet); that token is dropped, it is never launched again and its blocks come back."""
    llm = make_llm(True)
    engine = llm.engine
    first = llm.generate(PROMPTS[1], SamplingParams(max_tokens=4, temperature=0.0,
                                                    ignore_eos=True), use_tqdm=False)[0]
    ids = first.outputs[0].token_ids
    eos = ids[2]
    engine.output_processor.eos_token_ids = {eos}
    rid = engine.add_request(PROMPTS[1], SamplingParams(max_tokens=8, temperature=0.0))
    other = engine.add_request(PROMPTS[0], SamplingParams(max_tokens=6, ignore_eos=True))
    seen, done, launches = [], {}, []
    launch = engine.runner.launch
    engine.runner.launch = lambda sched, *a, **k: (
        launches.append([r.request_id for r, _ in sched.scheduled]), launch(sched, *a, **k))[1]
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen.append(out.request_id)
            if out.finished:
                done[out.request_id] = out.outputs[0]
        assert_placeholders_only_in_flight(engine)
    assert done[rid].token_ids == ids[:ids.index(eos) + 1]
    assert done[rid].finish_reason == "stop"
    assert seen.count(rid) == ids.index(eos) + 1 and len(done[other].token_ids) == 6
    # Launched for its prompt, each decode up to the stop, and once behind the stopping step.
    assert sum(rid in ids for ids in launches) == ids.index(eos) + 2
    engine.check_accounting()
    assert engine.kv.blocks.num_free_blocks == 512


def test_aborts_and_preemptions_between_steps_lose_nothing():
    """A request in the step in flight that is aborted, or preempted by a caller of the
    scheduler (it starts over: its prompt and tokens prefill again, the last one read from the
    step in flight), between steps: the aborted one is never launched again, and every other
    request's tokens are those of a run without either."""
    rng = random.Random(5)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    prompts = [PROMPTS[i % 4] * rng.randint(1, 2) for i in range(10)]
    want = tokens(make_llm(False).generate(prompts, params, use_tqdm=False))
    llm = make_llm(True, num_gpu_blocks=40, block_size=4, max_model_len=64, swap_space=0.01)
    engine = llm.engine
    ids = [engine.add_request(p, params) for p in prompts]
    launched = []
    launch = engine.runner.launch

    def recording_launch(sched, *args, **kwargs):
        launched.append({r.request_id for r, _ in sched.scheduled})
        assert all(r.status == RequestStatus.RUNNING for r, _ in sched.scheduled)
        return launch(sched, *args, **kwargs)

    engine.runner.launch = recording_launch
    got, gone, hits = {}, set(), 0

    def step():
        for out in engine.step():
            assert PLACEHOLDER_TOKEN not in out.outputs[0].token_ids
            if out.finished:
                got[out.request_id] = out.outputs[0].token_ids
        assert_placeholders_only_in_flight(engine)
        engine.check_accounting()

    while engine.has_unfinished_requests():
        step()
        flying = [r for r in in_flight_requests(engine) if not r.is_finished]
        if flying and rng.random() < 0.4:
            victim = rng.choice(flying)
            hits += 1
            next_launch = len(launched)
            if hits % 2:
                gone.add(victim.request_id)
                out = engine.abort_request(victim.request_id)
                assert PLACEHOLDER_TOKEN not in out.outputs[0].token_ids
                assert PLACEHOLDER_TOKEN not in victim.token_ids
                step()
                assert all(victim.request_id not in ids for ids in launched[next_launch:])
            else:  # recompute preemption from outside the step: it starts over (a fresh schedule
                # may take it back at once; recording_launch checks it runs only as RUNNING)
                engine.scheduler.preemption.mode = "recompute"
                engine.scheduler._preempt(victim)
                engine.scheduler.preemption.mode = "auto"
                step()
    assert hits >= 3
    for i, rid in enumerate(ids):
        if rid not in gone:
            assert got[rid] == want[i], rid
    assert engine.kv.blocks.num_free_blocks == 40 and not engine.kv.swap.has_in_flight()


def test_a_restarted_prompt_ends_in_the_token_the_step_in_flight_samples():
    """Preempted (recompute) while its next token is in flight, a request is taken back at once:
    the prefill of its prompt and tokens is launched behind that step and reads the token from
    it on the device. Its output is that of a run without the preemption."""
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    want = tokens(make_llm(False).generate([PROMPTS[2]], params, use_tqdm=False))
    engine = make_llm(True).engine
    rid = engine.add_request(PROMPTS[2], params)
    feeds, launch = [], engine.runner.launch

    def recording_launch(sched, *args, **kwargs):
        pending = launch(sched, *args, **kwargs)
        feeds.append([(n, r.token_ids[start + n - 1] == PLACEHOLDER_TOKEN)
                      for r, start, n, _ in sched.chunks()])
        return pending

    engine.runner.launch = recording_launch
    outs = engine.step()
    assert len(outs[0].outputs[0].token_ids) == 1 and engine.step_in_flight
    req = engine.requests[rid]
    engine.scheduler.preemption.mode = "recompute"
    engine.scheduler._preempt(req)
    engine.scheduler.preemption.mode = "auto"
    assert req.num_computed_tokens == 0 and req.token_ids[-1] == PLACEHOLDER_TOKEN
    last = None
    while engine.has_unfinished_requests():
        last = engine.step() or last
    prompt_len = len(req.prompt_token_ids)
    # prompt; first decode (reads token 1 from the prompt's step); the restarted prefill of the
    # prompt + token 1 + token 2 (read from the decode step in flight)
    assert feeds[:3] == [[(prompt_len, False)], [(1, True)], [(prompt_len + 2, True)]]
    assert [last[0].outputs[0].token_ids] == want


def test_a_request_at_its_length_limit_is_neither_scheduled_ahead_nor_preempted():
    """While the token that ends a request by max_tokens is computed, the step scheduled behind
    it leaves it out (no block for a token it will never have) and never picks it as a victim."""
    llm = make_llm(True, num_gpu_blocks=16, block_size=4, max_model_len=48, swap_space=0.01,
                   growth_headroom=0)
    engine = llm.engine
    schedule, finishing_seen = engine.scheduler.schedule, []

    def checked_schedule():
        finishing = [r for r in engine.scheduler.running if r.finishing]  # last token in flight
        finishing_seen.extend(finishing)
        out = schedule()
        assert not any(r in finishing for r, _ in out.scheduled)
        assert not any(r in finishing for r in out.preempted)
        return out

    engine.scheduler.schedule = checked_schedule
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
              for n in (1, 3, 5, 9, 14, 20) * 2]
    prompts = [PROMPTS[i % 4] for i in range(len(params))]
    want = tokens(make_llm(False).generate(prompts, params, use_tqdm=False))
    assert tokens(llm.generate(prompts, params, use_tqdm=False)) == want
    assert finishing_seen and engine.scheduler.num_preemptions > 0
    assert not any(r.finishing for r in finishing_seen)  # cleared once their tokens came back
    engine.check_accounting()


@pytest.mark.parametrize("seed", [None, 7])
def test_a_step_that_raises_after_its_launch_leaves_the_engine_steppable(seed):
    """An error while the step is in flight (here from a gpu_busy callback) loses that step's
    tokens, not the requests: the next steps compute them again and every request ends as
    without it, greedy or seeded (a lost draw is drawn again the same)."""
    params = SamplingParams(max_tokens=16, temperature=0.0 if seed is None else 0.8, seed=seed,
                            ignore_eos=True)
    prompts = PROMPTS * 3
    want = tokens(make_llm(False).generate(prompts, params, use_tqdm=False))
    llm = make_llm(True, num_gpu_blocks=16, block_size=4, max_model_len=48, swap_space=0.01,
                   growth_headroom=0)
    engine = llm.engine
    ids = [engine.add_request(p, params) for p in prompts]
    got, raised, step = {}, 0, 0

    def fail():
        if step % 3 == 2:
            raise KeyboardInterrupt

    engine.events.on_gpu_busy.append(fail)
    while engine.has_unfinished_requests():
        step += 1
        try:
            outs = engine.step()
        except KeyboardInterrupt:
            raised += 1
            assert not engine.step_in_flight
            assert all(PLACEHOLDER_TOKEN not in r.token_ids and not r.finishing
                       for r in engine.requests.values())
            outs = []
        for out in outs:
            if out.finished:
                got[out.request_id] = out.outputs[0].token_ids
        assert_placeholders_only_in_flight(engine)
        engine.check_accounting()
    assert raised >= 2 and engine.scheduler.num_preemptions > 0
    assert [got[i] for i in ids] == want


def test_a_step_collected_after_an_idle_spell_does_not_time_the_idle_spell():
    """Aborts can leave a step in flight with nobody left in it; the engine then idles with it
    uncollected. Collected later, it is not taken as a prefill that ran that long."""
    import time

    engine = make_llm(True, num_gpu_blocks=256, max_model_len=1024,
                      max_num_batched_tokens=512).engine
    policy = engine.scheduler.preemption
    params = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
    a = engine.add_request(prompt_token_ids=[5] * 100, params=params)
    engine.step()
    b = engine.add_request(prompt_token_ids=list(range(10, 410)), params=params)
    engine.step()  # b's 400-token prefill is in flight behind a's decode
    assert any(n == 400 for _, n in engine._in_flight.sched.scheduled)
    samples, rate = policy.num_prefill_samples, policy.prefill_tokens_per_s
    engine.abort_request(a)
    engine.abort_request(b)
    assert not engine.has_unfinished_requests() and engine.step_in_flight
    time.sleep(0.5)
    engine.add_request(prompt_token_ids=[7] * 10, params=params)
    engine.step()
    assert (policy.num_prefill_samples, policy.prefill_tokens_per_s) == (samples, rate)
    # A live prefill-heavy step is observed, timed by its own run (on the CPU: its launch), so
    # within the time the steps took (not a rate: this CPU's speed is not the test's to assume).
    observed = []
    real = policy.observe_prefill
    policy.observe_prefill = lambda n, s: (observed.append((n, s)), real(n, s))
    engine.add_request(prompt_token_ids=list(range(20, 420)), params=params)
    start = time.perf_counter()
    while policy.num_prefill_samples == samples:
        engine.step()
    elapsed = time.perf_counter() - start
    assert observed and all(n >= 1 and 0 < s <= elapsed for n, s in observed)


def test_outputs_that_raise_leave_the_step_in_flight_its_placeholders():
    """If handing a step's outputs over raises (here for its last request, whose token is
    appended by then), the requests of the step in flight keep their placeholders, so the next
    call settles that step correctly and every request ends as without the error."""
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    want = tokens(make_llm(False).generate(PROMPTS[:2], params, use_tqdm=False))
    engine = make_llm(True).engine
    ids = [engine.add_request(p, params) for p in PROMPTS[:2]]
    engine.step()
    real = engine.output_processor.make_output
    calls = {"n": 0}

    def failing_once(req):
        calls["n"] += 1
        if calls["n"] == 2:  # two requests per step: the second is the step's last
            raise RuntimeError("detokenizer broke")
        return real(req)

    engine.output_processor.make_output = failing_once
    with pytest.raises(RuntimeError, match="detokenizer"):
        engine.step()
    engine.output_processor.make_output = real
    assert_placeholders_only_in_flight(engine)
    got = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                got[out.request_id] = out.outputs[0].token_ids
    assert [got[i] for i in ids] == want
