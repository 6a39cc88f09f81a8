"""Beam search (engine/beam_search.py, ``LLM.beam_search``): the search's bookkeeping against
hand-worked steps, and on the default model against an exhaustive search of a tiny space."""

from __future__ import annotations

import math

import pytest

from fairswitch import BeamSearchParams, LLM, SamplingParams
from fairswitch.engine.beam_search import BeamSearch

EOS = 9


def test_each_step_keeps_the_best_continuations_and_sets_aside_those_that_end():
    search = BeamSearch([1, 2], BeamSearchParams(beam_width=2, max_tokens=3), {EOS})
    search.advance([{5: math.log(0.5), 6: math.log(0.3), EOS: math.log(0.2)}])
    assert [b.tokens for b in search.live] == [[1, 2, 5], [1, 2, 6]]
    assert [b.tokens for b in search.ended] == [[1, 2, EOS]]
    search.advance([{EOS: math.log(0.9), 7: math.log(0.1)},  # (beam [1, 2, 5])
                    {8: math.log(0.8), 7: math.log(0.2)}])  # (beam [1, 2, 6])
    assert [b.tokens for b in search.live] == [[1, 2, 6, 8], [1, 2, 6, 7]]
    assert not search.finished
    search.advance([{EOS: 0.0}, {EOS: 0.0}])
    assert search.finished and not search.live
    best = search.best()
    # scores: logprob / length, the length without a final EOS: [1, 2, 5, EOS] ln(0.45) / 3,
    # [1, 2, 6, 8, EOS] ln(0.24) / 4, [1, 2, 6, 7, EOS] ln(0.06) / 4, [1, 2, EOS] ln(0.2) / 2
    assert [b.tokens for b in best] == [[1, 2, 5, EOS], [1, 2, 6, 8, EOS]]
    assert best[0].cum_logprob == pytest.approx(math.log(0.45))
    assert [search.generated(b) for b in best] == [[5], [6, 8]]
    assert {(b.finish_reason, b.stop_reason) for b in best} == {("stop", EOS)}


def test_length_penalty_and_ignore_eos():
    params = BeamSearchParams(beam_width=1, max_tokens=1, length_penalty=0.0)
    search = BeamSearch([1], params, {EOS})
    search.advance([{EOS: math.log(0.6), 4: math.log(0.4)}])
    (best,) = search.best()
    assert best.tokens == [1, EOS] and best.finish_reason == "stop"
    ignoring = BeamSearch([1], BeamSearchParams(beam_width=1, max_tokens=1, ignore_eos=True),
                          {EOS})
    ignoring.advance([{EOS: math.log(0.6), 4: math.log(0.4)}])
    (best,) = ignoring.best()
    assert best.tokens == [1, EOS] and best.finish_reason == "length"
    assert ignoring.generated(best) == [EOS]


@pytest.mark.parametrize("bad, error", [
    (dict(beam_width=0, max_tokens=4), ValueError), (dict(beam_width=11, max_tokens=4), ValueError),
    (dict(beam_width=2, max_tokens=0), ValueError), (dict(beam_width=2.0, max_tokens=4), TypeError),
    (dict(beam_width=2, max_tokens=4, length_penalty=float("nan")), TypeError),
    (dict(beam_width=2, max_tokens=4, temperature=-1.0), ValueError),
    (dict(beam_width=2, max_tokens=4, length_penalty=51), ValueError),
])
def test_bad_params_are_refused(bad, error):
    with pytest.raises(error):
        BeamSearchParams(**bad)


@pytest.fixture(scope="module")
def llm():
    return LLM(num_gpu_blocks=256, max_model_len=64)


def test_the_best_beam_is_the_best_two_token_continuation_of_the_kept_first_tokens(llm):
    """Two tokens, width 3: the first step keeps the 3 most likely first tokens, the second
    ranks their 6 likeliest continuations each: the best beam is the best of those pairs,
    scored here with the engine's own logprobs; and width 1 is greedy decoding."""
    prompt = "The capital of France is"
    (out,) = llm.beam_search([prompt], BeamSearchParams(beam_width=3, max_tokens=2,
                                                        ignore_eos=True))
    assert len(out.sequences) == 3
    scores = [s.cum_logprob for s in out.sequences]
    assert scores == sorted(scores, reverse=True)  # (same lengths: the penalty keeps the order)
    ids = llm.get_tokenizer().encode(prompt, add_special_tokens=False)
    first = llm.generate([ids], SamplingParams(max_tokens=1, logprobs=6), use_tqdm=False)[0]
    kept = sorted(first.outputs[0].logprobs[0].items(), key=lambda kv: -kv[1].logprob)[:3]
    best = -math.inf
    for a, lp_a in kept:
        second = llm.generate([ids + [a]], SamplingParams(max_tokens=1, logprobs=6),
                              use_tqdm=False)[0].outputs[0].logprobs[0]
        best = max(best, max(lp_a.logprob + lp.logprob for lp in second.values()))
    assert out.sequences[0].cum_logprob == pytest.approx(best, abs=1e-4)
    assert out.sequences[0].tokens[:len(ids)] == ids and len(out.sequences[0].tokens) == len(ids) + 2
    (greedy,) = llm.beam_search([ids], BeamSearchParams(beam_width=1, max_tokens=6,
                                                        ignore_eos=True))
    want = llm.generate([ids], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    assert greedy.sequences[0].tokens[len(ids):] == want.token_ids
    assert greedy.sequences[0].text == want.text


def test_prompts_search_together_and_too_long_is_refused_up_front(llm):
    outs = llm.beam_search(["Hello", [5, 6, 7]], BeamSearchParams(beam_width=2, max_tokens=3))
    assert [len(o.sequences) for o in outs] == [2, 2]
    assert all(s.finish_reason in ("stop", "length") for o in outs for s in o.sequences)
    with pytest.raises(ValueError, match="exceed max_model_len 64"):
        llm.beam_search([[5] * 60], BeamSearchParams(beam_width=2, max_tokens=8))
    with pytest.raises(TypeError, match="BeamSearchParams"):
        llm.beam_search(["x"], SamplingParams())
    assert not llm.engine.has_unfinished_requests()  # (the refusals queued nothing)


def test_the_server_answers_use_beam_search_with_the_n_best_beams(llm, openai_client):
    """vLLM's use_beam_search: the n choices are the n best beams, best first, whole or
    streamed; what beam search does not honour is a 400 naming it."""
    import openai

    (want,) = llm.beam_search(["Once upon a time"], BeamSearchParams(beam_width=3, max_tokens=4))
    ask = dict(model="fairswitch-tiny", prompt="Once upon a time", n=3, max_tokens=4,
               extra_body={"use_beam_search": True})
    out = openai_client.completions.create(**ask)
    assert [c.text for c in out.choices] == [s.text for s in want.sequences]
    assert [c.finish_reason for c in out.choices] == [s.finish_reason for s in want.sequences]
    assert out.usage.completion_tokens == sum(
        len(s.tokens) for s in want.sequences) - 3 * len(llm.get_tokenizer().encode(
            "Once upon a time", add_special_tokens=False)) - sum(
        s.finish_reason == "stop" for s in want.sequences)
    streamed = {}
    for chunk in openai_client.completions.create(**ask, stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert [streamed[i] for i in range(3)] == [c.text for c in out.choices]
    chat = openai_client.chat.completions.create(
        model="fairswitch-tiny", messages=[{"role": "user", "content": "Hi"}], n=2,
        max_tokens=3, extra_body={"use_beam_search": True, "length_penalty": 0.5})
    assert len(chat.choices) == 2 and all(c.message.content is not None for c in chat.choices)
    weather = {"type": "function", "function": {"name": "w", "parameters": {"type": "object"}}}
    for extra, param in (({"response_format": {"type": "json_object"}}, "response_format"),
                         ({"tools": [weather], "tool_choice": "required"}, "tool_choice")):
        with pytest.raises(openai.BadRequestError) as refused:  # (the field the request gave)
            openai_client.chat.completions.create(
                model="fairswitch-tiny", messages=[{"role": "user", "content": "Hi"}], n=2,
                max_tokens=3, extra_body={"use_beam_search": True}, **extra)
        assert refused.value.body["param"] == param, refused.value.body
    for extra, param in (({"stop": ["x"]}, "stop"), ({"logprobs": 2}, "logprobs"),
                         ({"n": 11}, "n"), ({"extra_body": {"use_beam_search": True,
                                                            "length_penalty": 1000}},
                                            "length_penalty")):
        with pytest.raises(openai.BadRequestError) as refused:
            openai_client.completions.create(**{**ask, **extra})
        assert refused.value.body["param"] == param, refused.value.body


def test_a_step_that_fails_ends_the_search_and_its_other_requests(monkeypatch):
    """One step request failing (here: the engine refuses it) ends the response, and the step's
    other requests are aborted with it, none left running."""
    import asyncio

    import aiohttp

    from fairswitch.config import EngineConfig
    from fairswitch.engine.async_engine import AsyncEngine
    from fairswitch.server import BackgroundServer, ServerSettings, build_app

    engine = AsyncEngine.from_config(EngineConfig.from_kwargs(num_gpu_blocks=128,
                                                              max_model_len=256))
    calls = []
    generate = engine.generate

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:  # (steps: 1 beam, then 4: the 2nd of step 3's 4)
            raise RuntimeError("refused")
        return generate(*args, **kwargs)

    monkeypatch.setattr(engine, "generate", failing)

    async def search(url: str) -> tuple[int, int]:
        async with aiohttp.ClientSession() as s:
            async with s.post(url, json={"prompt": "Hello", "max_tokens": 50, "n": 4,
                                         "ignore_eos": True, "use_beam_search": True}) as r:
                await r.read()
        live = await engine.run_in_engine(lambda e: len(e.requests))
        return r.status, live

    try:
        with BackgroundServer(build_app(engine, ServerSettings(), shutdown_engine=False)) as srv:
            status, live = asyncio.run(search(f"{srv.url}/v1/completions"))
        assert status == 500 and live == 0 and len(calls) == 9  # (no step 4)
    finally:
        engine.shutdown()


def test_shutdown_aborts_a_beam_search_with_a_503():
    import asyncio

    import aiohttp

    from fairswitch.config import EngineConfig
    from fairswitch.engine.async_engine import AsyncEngine
    from fairswitch.server import BackgroundServer, build_app

    engine = AsyncEngine.from_config(EngineConfig.from_kwargs(num_gpu_blocks=256,
                                                              max_model_len=1024))
    server = BackgroundServer(build_app(engine), shutdown_timeout=0.3).start()

    async def search_then_stop() -> tuple[int, dict]:
        async with aiohttp.ClientSession() as s:
            task = asyncio.create_task(s.post(f"{server.url}/v1/completions", json={
                "prompt": "long", "max_tokens": 1000, "n": 8, "ignore_eos": True,
                "use_beam_search": True}))
            await asyncio.sleep(0.5)
            await asyncio.to_thread(server.stop)
            r = await task
            return r.status, await r.json()
    try:
        status, body = asyncio.run(search_then_stop())
        assert status == 503 and "shutting down" in body["error"]["message"], body
    finally:
        server.stop()
        engine.shutdown()


def test_a_beam_search_keeps_its_queue_places_from_start_to_end():
    """Under --max-waiting a search holds a waiting-queue place for each beam for its whole
    life: a request arriving meanwhile that would leave its next step no room is the one
    refused (503), and the search ends whole (its steps took places as they came, so such a
    request could make a step meet a full queue partway: a 503 after the search had run)."""
    import asyncio

    import aiohttp

    from fairswitch.config import EngineConfig
    from fairswitch.engine.async_engine import AsyncEngine
    from fairswitch.server import BackgroundServer, ServerSettings, build_app

    engine = AsyncEngine.from_config(EngineConfig.from_kwargs(
        num_gpu_blocks=256, max_model_len=256, max_num_seqs=1, max_waiting=2))

    async def search_and_another(url: str) -> tuple[int, int, int, int]:
        async with aiohttp.ClientSession() as s:
            search = asyncio.create_task(s.post(url, json={
                "prompt": "Hello", "max_tokens": 40, "n": 2, "ignore_eos": True,
                "use_beam_search": True}))
            for _ in range(500):  # (until its places are reserved: its first step is added)
                if await engine.run_in_engine(lambda e: e.scheduler._reserved_places):
                    break
                await asyncio.sleep(0.01)
            async with s.post(url, json={"prompt": "Hi", "max_tokens": 2}) as other:
                other_status = other.status
            r = await search
            body = await r.json()
            async with s.post(url, json={"prompt": "Hi", "max_tokens": 2}) as after:
                return other_status, r.status, len(body.get("choices", [])), after.status
    try:
        with BackgroundServer(build_app(engine, ServerSettings(), shutdown_engine=False)) as srv:
            other, status, choices, after = asyncio.run(
                search_and_another(f"{srv.url}/v1/completions"))
        assert (other, status, choices, after) == (503, 200, 2, 200)
        assert not asyncio.run(engine.run_in_engine(lambda e: e.scheduler._reserved_places))
    finally:
        engine.shutdown()
