"""A step that raises part way (its outputs, a copy's submit, a swap-out) loses no request,
leaks no KV block, caches no block that was never written, and leaves the engine usable; the
async engine's thread, stopping on it, answers every caller."""

from __future__ import annotations

import asyncio
import concurrent.futures

import pytest

from fairswitch import LLM, SamplingParams
from fairswitch.config import EngineConfig
from fairswitch.engine.async_engine import AsyncEngine, EngineDeadError

PROMPTS = ["def main():", "Once upon a time", "Once upon a time", "1, 2, 3,",
           "The capital of France is", "def main():", "Once upon a time", "1, 2, 3,"]
GREEDY = SamplingParams(max_tokens=18, temperature=0.0, ignore_eos=True)
TIGHT = dict(num_gpu_blocks=16, block_size=4, max_model_len=48, swap_space=0.01,
             growth_headroom=0)


def tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def _fail_b_after_a_finished(engine, what: type[BaseException]):
    """The output processor raises for request "1" once request "0" of the same step has
    finished (and has been freed by the scheduler)."""
    processor = engine.output_processor
    real = processor.append_token
    fired = []

    def append_token(req, token, logprobs=None):
        a = engine.requests.get("0")
        if req.request_id == "1" and a is not None and a.is_finished and not fired:
            fired.append(1)
            raise what("injected: the detokenizer broke")
        return real(req, token, logprobs)

    processor.append_token = append_token
    return lambda: setattr(processor, "append_token", real)


@pytest.mark.parametrize("policy", ["fcfs", "vtc"])
@pytest.mark.parametrize("what", [RuntimeError, KeyboardInterrupt])
def test_outputs_that_fail_after_a_request_finished_abort_cleanly(policy, what):
    """The finished request stayed registered, and the cleanup finished it a second time: under
    vtc a KeyError (not the error raised), and two KV blocks leaked for good."""
    llm = LLM(num_gpu_blocks=64, max_model_len=128, policy=policy)
    restore = _fail_b_after_a_finished(llm.engine, what)
    with pytest.raises(what, match="detokenizer broke"):
        llm.generate(["Once upon a time", "The capital of France is"],
                     [SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True),
                      SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)],
                     use_tqdm=False)
    restore()
    assert not llm.engine.requests and llm.engine.kv.blocks.num_free_blocks == 64
    llm.engine.check_accounting()
    assert len(llm.generate(["hello"], GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 18


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_a_copy_to_the_gpu_that_fails_to_submit_caches_nothing_unwritten(k):
    """The k-th host-to-device copy (a CPU-tier fetch first, then swap-ins) raises when it is
    submitted. The swap-in's new blocks were in the request's block table, and freeing it cached
    them under its tokens: the next run of the same prompts read them (wrong tokens, silently);
    a fetch's GPU block and tier pins leaked."""
    want = tokens(LLM(**{**TIGHT, "num_gpu_blocks": 512}).generate(PROMPTS, GREEDY,
                                                                    use_tqdm=False))
    llm = LLM(**TIGHT, cpu_kv_reuse=True)
    llm.generate(PROMPTS[::-1], GREEDY, use_tqdm=False)  # fill both tiers
    swap = llm.engine.kv.swap
    real = swap.in_backend.submit
    calls = []

    def submit(src, dst, extents, to_host):
        calls.append(1)
        if len(calls) == k:
            raise RuntimeError("injected: the copy failed to start")
        return real(src, dst, extents, to_host)

    swap.in_backend.submit = submit
    with pytest.raises(RuntimeError, match="injected"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    swap.in_backend.submit = real
    llm.engine.check_accounting()
    assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == want
    llm.engine.check_accounting()


def test_a_swap_out_that_fails_leaves_its_request_running():
    """The victim left ``running`` before its copy was submitted: when that raised it was in no
    queue, and a caller stepping on never saw it finish."""
    llm = LLM(**TIGHT, preemption_mode="swap")
    engine, swap = llm.engine, llm.engine.kv.swap
    ids = [engine.add_request(p, SamplingParams(max_tokens=16, temperature=0.0,
                                                ignore_eos=True)) for p in PROMPTS]
    real = swap.out_backend.submit
    failed = []

    def submit(src, dst, extents, to_host):
        if to_host and not failed:
            failed.append(1)
            raise RuntimeError("injected: swap-out failed")
        return real(src, dst, extents, to_host)

    swap.out_backend.submit = submit
    finished, raised = set(), 0
    for _ in range(500):
        if not engine.has_unfinished_requests():
            break
        try:
            finished.update(o.request_id for o in engine.step() if o.finished)
        except RuntimeError:
            raised += 1
    assert raised == 1 and finished == set(ids) and not engine.requests
    engine.check_accounting()


def test_the_engine_thread_answers_every_caller_when_its_cleanup_fails_too():
    """A step fails, and aborting what is left fails as well (the same broken detokenizer): the
    thread's cleanup raised before it failed the commands queued meanwhile, whose callers then
    waited for good."""
    eng = AsyncEngine.from_config(EngineConfig.from_kwargs(num_gpu_blocks=256, policy="vtc"))
    processor = eng.engine.output_processor
    real_append, real_output = processor.append_token, processor.make_output
    queued: list[concurrent.futures.Future] = []

    def append_token(req, token, logprobs=None):
        a = eng.engine.requests.get("A")
        if req.request_id == "B" and a is not None and a.is_finished and not queued:
            queued.append(concurrent.futures.Future())  # another caller's command, meanwhile
            eng._commands.put((lambda: None, queued[0]))
            processor.make_output = broken_output
            raise RuntimeError("injected: the detokenizer broke")
        return real_append(req, token, logprobs)

    def broken_output(req):
        raise RuntimeError("injected: the detokenizer broke again")

    processor.append_token = append_token

    async def consume(rid: str, n: int) -> str:
        try:
            async for _ in eng.generate("same prompt", SamplingParams(max_tokens=n,
                                                                      ignore_eos=True),
                                        request_id=rid):
                pass
            return "finished"
        except EngineDeadError:
            return "dead"

    async def main() -> list[str]:
        return await asyncio.wait_for(asyncio.gather(
            consume("A", 3), consume("B", 30), consume("C", 30)), 30)

    try:
        assert asyncio.run(main()) == ["dead", "dead", "dead"]
        with pytest.raises(EngineDeadError):
            queued[0].result(timeout=10)
    finally:
        processor.append_token, processor.make_output = real_append, real_output
        eng.shutdown()
