"""AsyncEngine: per-request async streams, concurrency, cancellation frees KV blocks."""

from __future__ import annotations

import asyncio
import concurrent.futures

import pytest

from fairswitch import SamplingParams
from fairswitch.config import EngineConfig
from fairswitch.engine.async_engine import AsyncEngine, EngineDeadError

NUM_BLOCKS = 256


@pytest.fixture(scope="module")
def engine():
    eng = AsyncEngine.from_config(EngineConfig.from_kwargs(num_gpu_blocks=NUM_BLOCKS))
    yield eng
    eng.shutdown()


def free_blocks(engine: AsyncEngine):
    return engine.run_in_engine(lambda e: e.kv.blocks.num_free_blocks)


async def collect(engine, prompt, n, **kw):
    outs = [o async for o in engine.generate(
        prompt, SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0), **kw)]
    return outs


def test_stream_yields_tokens_and_finishes(engine):
    async def main():
        outs = await collect(engine, "stream me", 8)
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])
        assert len(outs[-1].outputs[0].token_ids) == 8
        assert sum(len(o.outputs[0].new_token_ids) for o in outs) == 8
        assert "".join(o.outputs[0].new_text for o in outs) == outs[-1].outputs[0].text
    asyncio.run(main())


def test_request_ids_that_are_not_strings_or_are_zero(engine):
    """The engine keys requests by str: an int id streams (it hung, its outputs dropped), and
    0 is an id like any other (not replaced by a random one)."""
    async def main():
        for rid in (5, 0):
            outs = await asyncio.wait_for(collect(engine, "ids", 3, request_id=rid), 60)
            assert outs[-1].finished and outs[-1].request_id == str(rid)
    asyncio.run(main())


def test_many_concurrent_streams(engine):
    async def main():
        results = await asyncio.gather(*(collect(engine, f"prompt {i}", 4 + i % 5)
                                         for i in range(24)))
        for i, outs in enumerate(results):
            assert len(outs[-1].outputs[0].token_ids) == 4 + i % 5
        assert await free_blocks(engine) == NUM_BLOCKS
    asyncio.run(main())


def test_cancel_mid_stream_frees_blocks(engine):
    async def main():
        async def consume():
            async for _ in engine.generate("cancel me " * 10,
                                           SamplingParams(max_tokens=10_000, ignore_eos=True),
                                           request_id="victim"):
                pass
        task = asyncio.create_task(consume())
        for _ in range(200):
            await asyncio.sleep(0.01)
            if await free_blocks(engine) < NUM_BLOCKS:
                break
        assert await free_blocks(engine) < NUM_BLOCKS  # it is running and holds blocks
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await engine.sync()
        assert await free_blocks(engine) == NUM_BLOCKS
        assert await engine.run_in_engine(lambda e: len(e.requests)) == 0
    asyncio.run(main())


def test_breaking_out_of_the_stream_aborts(engine):
    async def main():
        gen = engine.generate("break early", SamplingParams(max_tokens=10_000, ignore_eos=True))
        async for out in gen:
            if len(out.outputs[0].token_ids) >= 3:
                break
        await gen.aclose()
        await engine.sync()
        assert await free_blocks(engine) == NUM_BLOCKS
    asyncio.run(main())


def test_explicit_abort_ends_stream(engine):
    async def main():
        outs = []

        async def consume():
            async for o in engine.generate("abort me", SamplingParams(max_tokens=10_000,
                                                                      ignore_eos=True),
                                           request_id="to-abort"):
                outs.append(o)
        task = asyncio.create_task(consume())
        while not outs:
            await asyncio.sleep(0.01)
        await engine.abort("to-abort")
        await asyncio.wait_for(task, 10)
        assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
        assert await free_blocks(engine) == NUM_BLOCKS
    asyncio.run(main())


def test_bad_request_raises_and_engine_keeps_serving(engine):
    async def main():
        with pytest.raises(ValueError, match="prompt is empty"):
            await collect(engine, "", 4)
        outs = await collect(engine, "still alive", 3)
        assert len(outs[-1].outputs[0].token_ids) == 3
    asyncio.run(main())


@pytest.mark.parametrize("prompt, kw, match", [
    (None, {}, "^prompt must be a str or a list of token ids, got NoneType"),
    (5, {}, "^prompt must be a str or a list of token ids, got int"),
    ((1, 2), {}, "^prompt must be a str or a list of token ids, got tuple"),
    ([1, "x"], {}, "^prompt token ids must be ints, got 'x' at index 1"),
    ([1, True], {}, "^prompt token ids must be ints, got True at index 1"),
    (None, {"prompt_token_ids": 7}, "^prompt_token_ids must be a list of token ids, got int"),
    (3, {"prompt_token_ids": [1, 2]}, "^prompt must be a str or None with prompt_token_ids"),
])
def test_a_prompt_of_the_wrong_type_is_a_type_error_as_in_llm_generate(engine, prompt, kw,
                                                                       match):
    async def main():
        with pytest.raises(TypeError, match=match):
            await collect(engine, prompt, 2, **kw)
        outs = await collect(engine, "still alive", 2)
        assert len(outs[-1].outputs[0].token_ids) == 2
        assert await free_blocks(engine) == NUM_BLOCKS
    asyncio.run(main())


@pytest.mark.parametrize("params", ["x", {"max_tokens": 2}])
def test_params_of_the_wrong_type_are_a_type_error_as_in_llm_generate(engine, params):
    async def main():
        with pytest.raises(TypeError, match="^params must be SamplingParams, got "):
            [o async for o in engine.generate("hi", params)]
        assert await free_blocks(engine) == NUM_BLOCKS
    asyncio.run(main())


def test_cancelled_add_neither_kills_the_engine_nor_leaks(engine):
    """Cancelling generate() while the add is still queued on the engine thread: the command is
    skipped or, if it already ran, the request is aborted; the engine keeps running."""
    async def main():
        async def impatient(i):
            async for _ in engine.generate(f"cancel {i}", SamplingParams(max_tokens=10_000,
                                                                         ignore_eos=True)):
                pass
        tasks = [asyncio.create_task(impatient(i)) for i in range(60)]
        for i, t in enumerate(tasks):
            if i % 3 == 0:
                await asyncio.sleep(0)
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await engine.sync()
        await engine.sync()
        assert engine.is_running
        assert await engine.run_in_engine(lambda e: len(e.requests)) == 0
        assert await free_blocks(engine) == NUM_BLOCKS
        outs = await collect(engine, "still alive", 3)
        assert len(outs[-1].outputs[0].token_ids) == 3
    asyncio.run(main())


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_outputs_go_out_in_one_batch_while_the_next_step_runs(async_scheduling):
    """A step's outputs reach the event loop in one hand-over, made while a later step runs on
    the device; the last step's when nothing is left to run. Without async scheduling the runner
    makes it from inside the next step's launch; with it, the engine hands them over as soon as
    it returns them, the next step being launched already."""
    eng = AsyncEngine.from_config(EngineConfig.from_kwargs(
        num_gpu_blocks=NUM_BLOCKS, async_scheduling=async_scheduling))
    events: list = []
    runner, real_deliver = eng.engine.runner, eng._deliver
    real_launch, real_collect = runner.launch, runner.collect

    launching = [False]  # inside a launch; set back once the launch counted itself

    def launched():  # the step event, fired before the hand-over's own callback
        if launching[0]:
            events.append("launched")
            launching[0] = False

    eng.engine.events.on_gpu_busy.insert(0, launched)

    def launch(sched, *args):
        launching[0] = True
        pending = real_launch(sched, *args)
        if launching[0] and pending.requests:  # the launch fired no event
            events.append("launched")
        launching[0] = False
        return pending

    def collect_tokens(pending):
        result = real_collect(pending)
        if pending.requests:
            events.append("returned")
        return result

    def deliver(items, request_ids=None):
        events.append(("deliver", len(items)))
        real_deliver(items, request_ids)

    handovers = []

    async def main():
        loop = asyncio.get_running_loop()
        real_call = loop.call_soon_threadsafe

        def call_soon_threadsafe(callback, *args, **kwargs):
            handovers.append(len(args[0]) if args and isinstance(args[0], list) else None)
            return real_call(callback, *args, **kwargs)

        loop.call_soon_threadsafe = call_soon_threadsafe
        await eng.run_in_engine(lambda e: None)
        return await asyncio.gather(*(collect(eng, "same length prompt", 6) for _ in range(4)))

    runner.launch, runner.collect, eng._deliver = launch, collect_tokens, deliver
    try:
        results = asyncio.run(main())
    finally:
        eng.shutdown()
    assert all(len(outs[-1].outputs[0].token_ids) == 6 for outs in results)
    delivered = [(i, e[1]) for i, e in enumerate(events) if isinstance(e, tuple)]
    assert sum(n for _, n in delivered) == sum(len(outs) for outs in results)
    steps_with_tokens = events.count("launched")
    assert len(delivered) <= steps_with_tokens + 1  # one hand-over per step, not per request
    *during, (last, _) = delivered
    # Steps launched and not yet returned when each hand-over was made.
    in_flight = [events[:i].count("launched") - events[:i].count("returned") for i, _ in delivered]
    assert during and all(n > 0 for n in in_flight[:-1])
    assert in_flight[-1] == 0 and events[last - 1] == "returned"  # the final outputs: at the end
    # One callback into the loop per hand-over, carrying all of it (not one per output).
    token_handovers = [n for n in handovers if n is not None]
    assert token_handovers == [n for _, n in delivered]


def test_with_synchronous_swaps_outputs_go_out_before_scheduling():
    """The baseline's scheduling waits for its swap copies: the last step's outputs must not
    wait with it."""
    from fairswitch import LLM

    llm = LLM(num_gpu_blocks=NUM_BLOCKS, baseline=True)
    engine, order = llm.engine, []
    real_schedule = engine.scheduler.schedule

    def schedule():
        order.append("schedule")
        return real_schedule()

    engine.scheduler.schedule = schedule
    engine.events.on_gpu_busy.append(lambda: order.append("handover"))
    engine.add_request("sync swaps", SamplingParams(max_tokens=3, ignore_eos=True))
    engine.step()
    assert order == ["handover", "schedule"]


def _recording(eng: AsyncEngine) -> list:
    """Every hand-over as the list of (request id, number of tokens, finished) it carried."""
    handed: list = []
    real_deliver = eng._deliver

    def deliver(items, request_ids=None):
        handed.append([(o.request_id, len(o.outputs[0].token_ids), o.finished) for o in items])
        real_deliver(items, request_ids)

    eng._deliver = deliver
    return handed


def test_an_abort_hands_over_the_held_back_outputs_first():
    eng = AsyncEngine.from_config(EngineConfig.from_kwargs(num_gpu_blocks=NUM_BLOCKS))
    handed = _recording(eng)

    def held_then_abort(engine):
        rid = engine.add_request("abort me", SamplingParams(max_tokens=50, ignore_eos=True))
        eng._pending = engine.step()  # as if the engine thread held this step's outputs back
        eng._abort_and_notify(rid)
        return rid

    try:
        rid = asyncio.run(eng.run_in_engine(held_then_abort))
    finally:
        eng.shutdown()
    assert handed == [[(rid, 1, False)], [(rid, 1, True)]]  # the token first, then the abort


def test_a_step_that_samples_nothing_hands_over_the_last_steps_outputs():
    """A prompt chunk that samples nothing gives the engine no moment to hand over in; the last
    step's outputs go out right after it rather than waiting for a step that samples."""
    eng = AsyncEngine.from_config(EngineConfig.from_kwargs(
        num_gpu_blocks=NUM_BLOCKS, max_num_batched_tokens=16, block_size=4, max_model_len=512))
    handed, steps = _recording(eng), []
    real_step = eng.engine.step

    def step(**kwargs):
        steps.append(len(handed))  # hand-overs made before this step started
        return real_step(**kwargs)

    eng.engine.step = step

    async def main():
        def add(engine):
            engine.add_request(prompt_token_ids=[5] * 8, request_id="short",
                               params=SamplingParams(max_tokens=1, ignore_eos=True))
            engine.add_request(prompt_token_ids=[6] * 60, request_id="long",
                               params=SamplingParams(max_tokens=1, ignore_eos=True))
        await eng.run_in_engine(add)
        while await eng.run_in_engine(lambda e: e.has_unfinished_requests()):
            await asyncio.sleep(0.01)

    try:
        asyncio.run(main())
    finally:
        eng.shutdown()
    # Step 1 runs "short" whole (it finishes) and the first 8 tokens of "long"; steps 2-4 are
    # chunks of "long" that sample nothing: "short"'s output must be out before step 3.
    short = next(i for i, h in enumerate(handed) if any(r == "short" for r, _, _ in h))
    assert len(steps) >= 4 and steps[2] > short


def test_a_refused_generate_leaves_the_request_of_its_id_alone(engine):
    """A generate() whose add is refused (the id is taken in the engine) aborts nothing: the
    request holding the id is another caller's."""
    async def main():
        await engine.run_in_engine(lambda e: e.add_request(
            "first", SamplingParams(max_tokens=10_000, ignore_eos=True), request_id="taken"))
        with pytest.raises(ValueError, match="already in use"):
            await asyncio.wait_for(collect(engine, "second", 3, request_id="taken"), 30)
        await engine.sync()
        assert await engine.run_in_engine(lambda e: list(e.requests)) == ["taken"]
        await engine.abort("taken")
        assert await free_blocks(engine) == NUM_BLOCKS
    asyncio.run(main())


def test_a_command_that_comes_as_the_engine_stops_is_refused_not_lost():
    """A caller that passed the shut-down check just before the engine thread stopped: its
    command lands after the thread failed what was queued; it must fail too, not hang."""
    eng = AsyncEngine.from_config(EngineConfig.from_kwargs(num_gpu_blocks=NUM_BLOCKS))
    commands = eng._commands

    class StopsFirst:
        def put(self, item):
            eng.shutdown()  # the engine thread stops between the caller's check and its put
            commands.put(item)

        def get_nowait(self):
            return commands.get_nowait()

    eng._commands = StopsFirst()

    async def main():
        with pytest.raises(EngineDeadError, match="shut down"):
            await asyncio.wait_for(eng.sync(), 10)
        with pytest.raises(EngineDeadError, match="shut down"):
            await asyncio.wait_for(collect(eng, "too late", 3), 10)
    asyncio.run(main())


def test_a_failed_step_ends_every_stream_and_names_the_failure():
    """A step that raises stops the engine thread: every stream, every command still queued and
    every later call gets an EngineDeadError naming the failure, and the KV blocks are freed."""
    eng = AsyncEngine.from_config(EngineConfig.from_kwargs(num_gpu_blocks=NUM_BLOCKS))
    real_launch, launches, queued = eng.engine.runner.launch, [], []

    def launch(*args, **kwargs):
        launches.append(1)
        if len(launches) == 4:
            fut = concurrent.futures.Future()  # a caller's command, queued as the step fails
            queued.append(fut)
            eng._commands.put((lambda: None, fut))
            raise RuntimeError("injected launch failure")
        return real_launch(*args, **kwargs)

    eng.engine.runner.launch = launch

    async def main():
        results = await asyncio.wait_for(asyncio.gather(
            *(collect(eng, f"doomed {i}", 100) for i in range(3)), return_exceptions=True), 30)
        assert all(isinstance(r, EngineDeadError) and "injected" in str(r) for r in results)
        assert eng.failed and not eng.is_running
        with pytest.raises(EngineDeadError, match="injected"):
            await asyncio.wait_for(collect(eng, "later", 3), 10)

    try:
        asyncio.run(main())
    finally:
        eng.shutdown()
    assert "injected" in str(queued[0].exception(timeout=10))
    assert eng.engine.kv.blocks.num_free_blocks == NUM_BLOCKS and not eng.engine.requests


def test_a_stream_whose_event_loop_closed_is_aborted(engine):
    """A loop closed without finalizing its async generators leaves a stream nobody reads: its
    request is aborted (it ran on to max_tokens, holding its KV blocks)."""
    loop = asyncio.new_event_loop()

    async def start():
        outputs = engine.generate("orphan", SamplingParams(max_tokens=10_000, ignore_eos=True),
                                  request_id="orphan")
        await outputs.__anext__()
        return outputs

    orphan = loop.run_until_complete(start())
    loop.close()

    async def main():
        for _ in range(500):
            if not await engine.run_in_engine(lambda e: list(e.requests)):
                break
            await asyncio.sleep(0.01)
        assert await engine.run_in_engine(lambda e: list(e.requests)) == []
        assert await free_blocks(engine) == NUM_BLOCKS
    asyncio.run(main())
    del orphan


def test_a_with_block_shuts_the_engine_down():
    """The thread holds the engine, so a dropped one was never collected: its model, KV cache
    and a thread waking twice a second stayed for good. A ``with`` block stops it."""
    with AsyncEngine.from_config(EngineConfig.from_kwargs(num_gpu_blocks=64,
                                                          max_model_len=64)) as eng:
        async def main() -> int:
            outs = [o async for o in eng.generate("hi", SamplingParams(max_tokens=2))]
            return len(outs[-1].outputs[0].token_ids)
        assert asyncio.run(main()) == 2
    assert not eng.is_running and not eng._thread.is_alive()


def test_a_request_id_stays_taken_until_its_abort_has_run():
    """A stream left early gave its id up before its abort ran: a caller reusing the id meanwhile
    had its own request aborted by that abort, and waited for good. Now the id is refused until
    the abort has run, then free."""
    import threading

    with AsyncEngine.from_config(EngineConfig.from_kwargs(num_gpu_blocks=64,
                                                          max_model_len=64)) as eng:
        inside, gate = threading.Event(), threading.Event()

        def hold(_engine) -> None:
            inside.set()
            gate.wait(30)

        async def main() -> int:
            first = eng.generate("hello", SamplingParams(max_tokens=50, ignore_eos=True),
                                 request_id="x")
            await first.__anext__()
            held = asyncio.ensure_future(eng.run_in_engine(hold))  # the engine thread waits
            await asyncio.to_thread(inside.wait, 30)
            await first.aclose()  # its abort is queued behind ``hold``
            with pytest.raises(ValueError, match="'x' is already in use"):
                await eng.generate("again", SamplingParams(max_tokens=2),
                                   request_id="x").__anext__()
            gate.set()
            await held
            await eng.sync()  # the abort has run: the id is free
            outs = [o async for o in eng.generate("again", SamplingParams(max_tokens=2),
                                                  request_id="x")]
            return len(outs[-1].outputs[0].token_ids)

        assert asyncio.run(main()) == 2
