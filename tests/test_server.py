"""The HTTP service over real loopback HTTP: both generation endpoints streamed and whole (raw
aiohttp and the real `openai` client), usage numbers, the side routes, scheduling fields reaching
the engine, and client disconnects freeing KV blocks."""

from __future__ import annotations

import asyncio
import json
import re
import time

import aiohttp
import openai
import pytest

from fairswitch.config import EngineConfig
from fairswitch.engine.async_engine import AsyncEngine
from fairswitch.server import BackgroundServer, ServerSettings, build_app

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "fairswitch-tiny"
NUM_BLOCKS = 512


@pytest.fixture(scope="module")
def engine():
    eng = AsyncEngine.from_config(EngineConfig.from_kwargs(num_gpu_blocks=NUM_BLOCKS,
                                                           max_model_len=256))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    app = build_app(engine, ServerSettings(api_key=KEY), shutdown_engine=False)
    with BackgroundServer(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0,
                       timeout=60) as c:
        yield c


def run(coro):
    return asyncio.run(coro)


async def post(url: str, body, headers=None) -> tuple[int, dict | str]:
    async with aiohttp.ClientSession(headers=AUTH) as s:
        async with s.post(url, json=body, headers=headers) as r:
            text = await r.text()
            try:
                return r.status, json.loads(text)
            except ValueError:
                return r.status, text


async def post_sse(url: str, body, headers=None) -> list:
    """The stream's events, parsed; asserts the framing (data: lines, blank-line separated)."""
    async with aiohttp.ClientSession(headers=AUTH) as s:
        async with s.post(url, json=body, headers=headers) as r:
            assert r.status == 200, await r.text()
            assert r.headers["Content-Type"].startswith("text/event-stream")
            raw = await r.text()
    assert raw.endswith("\n\n")
    events = raw[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), raw[:500]
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[len("data: "):]) for e in events[:-1]]


def engine_idle(engine) -> tuple[int, int, int]:
    """(free blocks, total blocks, live requests) once pending aborts have run."""
    async def check():
        await engine.sync()
        return await engine.run_in_engine(
            lambda e: (e.kv.blocks.num_free_blocks, e.kv.num_blocks, len(e.requests)))
    return run(check())


def wait_idle(engine, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while engine_idle(engine)[2] and time.monotonic() < deadline:
        time.sleep(0.05)
    free, total, live = engine_idle(engine)
    assert live == 0 and free == total == NUM_BLOCKS
    run(engine.run_in_engine(lambda e: e.check_accounting()))


# ---- generation ---------------------------------------------------------------------------------

def test_completion_whole_usage_counts(server, engine):
    prompt = "The quick brown fox jumps over"
    status, body = run(post(f"{server.url}/v1/completions", {
        "model": MODEL, "prompt": prompt, "max_tokens": 7, "ignore_eos": True,
        "temperature": 0}))
    assert status == 200, body
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["model"] == MODEL
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length"
    assert isinstance(choice["text"], str)
    n_prompt = len(engine.engine.tokenizer.encode(prompt))
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 7,
                             "total_tokens": n_prompt + 7}


def test_completion_stream_framing_and_usage(server, engine):
    prompt = "Streaming is"
    chunks = run(post_sse(f"{server.url}/v1/completions", {
        "prompt": prompt, "max_tokens": 6, "ignore_eos": True, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}}))
    *text_chunks, last = chunks
    assert all(c["object"] == "text_completion" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["usage"] is None for c in text_chunks)
    assert [c["choices"][0]["finish_reason"] for c in text_chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in text_chunks[:-1])
    assert last["choices"] == []
    n_prompt = len(engine.engine.tokenizer.encode(prompt))
    assert last["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 6,
                             "total_tokens": n_prompt + 6}
    # The streamed text is the whole text: same request, not streamed (greedy, alone).
    status, whole = run(post(f"{server.url}/v1/completions", {
        "prompt": prompt, "max_tokens": 6, "ignore_eos": True, "temperature": 0}))
    assert "".join(c["choices"][0]["text"] for c in text_chunks) == whole["choices"][0]["text"]


def test_continuous_usage_stats_puts_each_choices_usage_so_far_in_every_chunk(server):
    """vLLM's stream_options.continuous_usage_stats (with include_usage)."""
    chunks = run(post_sse(f"{server.url}/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "ignore_eos": True,
        "n": 2, "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}}))
    *per_choice, last = chunks
    prompt = last["usage"]["prompt_tokens"]
    seen = {0: 0, 1: 0}
    for chunk in per_choice:
        (choice,) = chunk["choices"]
        usage = chunk["usage"]
        assert usage["prompt_tokens"] == prompt
        assert usage["completion_tokens"] >= seen[choice["index"]]  # (its own, so far)
        assert usage["total_tokens"] == prompt + usage["completion_tokens"]
        seen[choice["index"]] = usage["completion_tokens"]
    assert seen == {0: 4, 1: 4} and last["usage"]["completion_tokens"] == 8
    plain = run(post_sse(f"{server.url}/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": True,
        "stream_options": {"continuous_usage_stats": True}}))  # (no include_usage: none)
    assert all("usage" not in c for c in plain)


def test_chat_stream_opens_with_role_and_counts_template_tokens(server, engine):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    chunks = run(post_sse(f"{server.url}/v1/chat/completions", {
        "messages": messages, "max_completion_tokens": 5, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True}}))
    first, *content, usage = chunks
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert content[-1]["choices"][0]["finish_reason"] == "length"
    assert all("role" not in c["choices"][0]["delta"] for c in content)
    expected = engine.engine.tokenizer.apply_chat_template(
        [messages[0], {"role": "user", "content": "Hi"}], tokenize=True,
        add_generation_prompt=True)
    assert usage["choices"] == [] and usage["usage"]["prompt_tokens"] == len(expected)
    assert usage["usage"]["completion_tokens"] == 5


def test_chat_whole_default_max_tokens_fills_context(server):
    status, body = run(post(f"{server.url}/v1/chat/completions", {
        "messages": [{"role": "user", "content": "go"}], "ignore_eos": True}))
    assert status == 200, body
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["total_tokens"] == 256  # max_tokens defaults to what the context leaves


def test_openai_client_parses_everything(client, engine):
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4,
                                    extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 4 and out.choices[0].finish_reason == "length"
    stream = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, stream=True,
                                       stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 4 and chunks[-1].choices == []
    assert chunks[-2].choices[0].finish_reason == "length"

    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_completion_tokens=3,
        extra_body={"ignore_eos": True}, user="carol")
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 3
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=3, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == 3
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert isinstance(text, str)

    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    with pytest.raises(openai.BadRequestError, match="'n' must be in"):
        client.completions.create(model=MODEL, prompt="x", n=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")


def test_prompt_as_token_ids_and_single_item_lists(server):
    for prompt in ([9906, 1917, 11], [[9906, 1917, 11]], ["Hello world,"]):
        status, body = run(post(f"{server.url}/v1/completions", {
            "prompt": prompt, "max_tokens": 2, "ignore_eos": True}))
        assert status == 200, body
        assert body["usage"]["prompt_tokens"] == 3 and body["usage"]["completion_tokens"] == 2


def test_stop_strings_and_seeds(server):
    url = f"{server.url}/v1/completions"
    base = {"prompt": "Once upon a time", "max_tokens": 12, "ignore_eos": True, "temperature": 0}
    _, full = run(post(url, base))
    text = full["choices"][0]["text"]
    stop = text[len(text) // 2:len(text) // 2 + 2]
    for value in (stop, ["zzzz-never", stop]):
        _, cut = run(post(url, {**base, "stop": value}))
        assert cut["choices"][0]["finish_reason"] == "stop"
        assert cut["choices"][0]["stop_reason"] == stop
        assert cut["choices"][0]["text"] == text[:text.index(stop)]
    seeded = {**base, "temperature": 1.0, "top_p": 0.9, "top_k": 50, "seed": 7}
    a = run(post(url, seeded))[1]["choices"][0]["text"]
    b = run(post(url, seeded))[1]["choices"][0]["text"]
    assert a == b


# ---- side routes ---------------------------------------------------------------------------------

async def get(url: str, headers=None) -> tuple[int, dict, str]:
    async with aiohttp.ClientSession() as s:
        async with s.get(url, headers=headers) as r:
            return r.status, dict(r.headers), await r.text()


_SAMPLE = re.compile(r'^fairswitch:[a-z0-9_]+(\{([a-z_]+="[^"]*",?)*\})? ([0-9.e+-]+|\+Inf)$')


def test_health_version_models(server):
    status, _, text = run(get(f"{server.url}/health"))  # public: no key needed
    assert status == 200
    status, _, text = run(get(f"{server.url}/version"))
    assert status == 200 and json.loads(text)["version"]
    status, _, text = run(get(f"{server.url}/v1/models", AUTH))
    data = json.loads(text)["data"]
    assert status == 200 and data[0]["id"] == MODEL and data[0]["max_model_len"] == 256
    status, _, text = run(get(f"{server.url}/v1/models/{MODEL}", AUTH))  # (models.retrieve)
    assert status == 200 and json.loads(text) == data[0]
    status, _, text = run(get(f"{server.url}/v1/models/org/other-model", AUTH))
    error = json.loads(text)["error"]
    assert status == 404 and error["code"] == "model_not_found" and "org/other-model" in error[
        "message"]
    assert run(get(f"{server.url}/v1/models/{MODEL}"))[0] == 401  # (the key, as the rest)


def test_metrics_prometheus_text(server):
    def scrape() -> dict[str, float]:
        status, headers, text = run(get(f"{server.url}/metrics"))
        assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
        values = {}
        for line in text.splitlines():
            if line.startswith("#"):
                assert re.match(r"^# (HELP|TYPE) fairswitch:[a-z0-9_]+ ", line), line
                continue
            assert _SAMPLE.match(line), line
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
        return values

    before = scrape()
    run(post(f"{server.url}/v1/completions", {"prompt": "count me", "max_tokens": 5,
                                              "ignore_eos": True}))
    after = scrape()
    lab = '{model_name="fairswitch-tiny"}'
    for name in ("num_requests_running", "num_requests_waiting", "num_requests_swapped",
                 "gpu_cache_usage_perc", "cpu_cache_usage_perc", "switch_stall_seconds_total",
                 "gc_pause_seconds_total", "kernel_compile_seconds_total"):
        assert f"fairswitch:{name}{lab}" in after, name
    assert f'fairswitch:num_preemptions_total{{model_name="{MODEL}",mode="recompute"}}' in after
    assert f'fairswitch:swap_bytes_total{{model_name="{MODEL}",direction="out"}}' in after
    assert f'fairswitch:kv_reuse_hits_total{{model_name="{MODEL}",tier="gpu"}}' in after

    def delta(name: str) -> float:
        return after[name] - before.get(name, 0.0)
    assert delta(f"fairswitch:generation_tokens_total{lab}") == 5
    assert delta(f"fairswitch:prompt_tokens_total{lab}") == 2
    assert delta(f'fairswitch:request_success_total{{model_name="{MODEL}",'
                 'finished_reason="length"}') == 1
    assert delta(f"fairswitch:time_to_first_token_seconds_count{lab}") == 1
    assert delta(f"fairswitch:e2e_request_latency_seconds_count{lab}") == 1
    assert delta(f"fairswitch:time_per_output_token_seconds_count{lab}") == 4  # every gap
    inf = f'fairswitch:time_per_output_token_seconds_bucket{{model_name="{MODEL}",le="+Inf"}}'
    assert after[inf] == after[f"fairswitch:time_per_output_token_seconds_count{lab}"]
    # vLLM V1's names: the same values, and a finished request's phases and lengths.
    assert after[f"fairswitch:kv_cache_usage_perc{lab}"] == \
        after[f"fairswitch:gpu_cache_usage_perc{lab}"]
    assert delta(f"fairswitch:inter_token_latency_seconds_count{lab}") == 4
    assert delta(f"fairswitch:prefix_cache_queries_total{lab}") == 2
    assert delta(f"fairswitch:prefix_cache_hits_total{lab}") == \
        delta(f'fairswitch:kv_reuse_hits_total{{model_name="{MODEL}",tier="gpu"}}') + \
        delta(f'fairswitch:kv_reuse_hits_total{{model_name="{MODEL}",tier="cpu"}}')
    for phase in ("queue", "prefill", "decode", "inference"):
        assert delta(f"fairswitch:request_{phase}_time_seconds_count{lab}") == 1, phase
    e2e = delta(f"fairswitch:e2e_request_latency_seconds_sum{lab}")
    parts = sum(delta(f"fairswitch:request_{phase}_time_seconds_sum{lab}")
                for phase in ("queue", "prefill", "decode"))
    assert parts == pytest.approx(e2e, abs=1e-6)
    assert delta(f"fairswitch:request_prompt_tokens_sum{lab}") == 2
    assert delta(f"fairswitch:request_generation_tokens_sum{lab}") == 5
    assert delta(f'fairswitch:request_generation_tokens_bucket{{model_name="{MODEL}",'
                 'le="5.0"}') == 1


def test_tokenize_detokenize(server, engine):
    status, body = run(post(f"{server.url}/tokenize", {"prompt": "hello world",
                                                        "return_token_strs": True}))
    assert status == 200 and body["count"] == len(body["tokens"]) == 2
    assert body["max_model_len"] == 256 and "".join(body["token_strs"]) == "helloĠworld"
    status, back = run(post(f"{server.url}/detokenize", {"tokens": body["tokens"]}))
    assert status == 200 and back == {"prompt": "hello world"}
    messages = [{"role": "user", "content": "Hi"}]
    status, chat = run(post(f"{server.url}/tokenize", {"messages": messages}))
    expected = engine.engine.tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True)
    assert status == 200 and chat["tokens"] == expected


def test_continue_final_message(server, engine):
    """vLLM's continue_final_message: the prompt ends inside the assistant's message, no end of
    turn after it; with add_generation_prompt (its default, true) it is a 400."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Well, I"}]
    fields = {"messages": messages, "continue_final_message": True,
              "add_generation_prompt": False}
    status, tokens = run(post(f"{server.url}/tokenize", fields))
    expected = engine.engine.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=False)
    assert status == 200 and expected.startswith(text := engine.engine.tokenizer.decode(
        tokens["tokens"])) and text.endswith("Well, I") and len(text) < len(expected)
    status, body = run(post(f"{server.url}/v1/chat/completions",
                            {**fields, "max_tokens": 2, "ignore_eos": True}))
    assert status == 200 and body["usage"]["prompt_tokens"] == tokens["count"], body
    for path in ("/v1/chat/completions", "/tokenize"):
        status, body = run(post(f"{server.url}{path}", {**fields, "add_generation_prompt": True}))
        assert status == 400 and body["error"]["param"] == "continue_final_message", body
    status, body = run(post(f"{server.url}/v1/chat/completions", {
        **fields, "messages": [{"role": "user", "content": " "}]}))
    assert status == 400 and "needs a final message with text" in body["error"]["message"]


# ---- scheduling fields, disconnects, concurrency -------------------------------------------------

async def _live_request_fields(url: str, engine, body: dict, headers=None) -> list:
    """Open a long stream, read one chunk, and read the live Request's scheduling fields."""
    async with aiohttp.ClientSession(headers=AUTH) as s:
        async with s.post(url, json=body, headers=headers) as r:
            assert r.status == 200
            await r.content.readline()
            return await engine.run_in_engine(
                lambda e: [(r.priority, r.client_id) for r in e.requests.values()])


def test_priority_and_client_id_reach_the_engine(server, engine):
    url = f"{server.url}/v1/completions"
    long = {"prompt": "hold on", "max_tokens": 200, "ignore_eos": True, "stream": True}
    fields = run(_live_request_fields(url, engine, {**long, "priority": -3, "user": "bob"},
                                      {"X-Client-Id": "alice"}))
    assert fields == [(-3, "alice")]  # the header wins over `user`
    wait_idle(engine)
    fields = run(_live_request_fields(f"{server.url}/v1/chat/completions", engine,
                                      {"messages": [{"role": "user", "content": "x"}],
                                       "max_tokens": 200, "ignore_eos": True, "stream": True,
                                       "priority": 4, "user": "bob"}))
    assert fields == [(4, "bob")]
    wait_idle(engine)


def test_disconnect_mid_stream_frees_blocks(server, engine):
    async def main():
        async with aiohttp.ClientSession(headers=AUTH) as s:
            async with s.post(f"{server.url}/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": "talk " * 40}], "max_tokens": 200,
                    "ignore_eos": True, "stream": True}) as r:
                for _ in range(3):
                    await r.content.readline()
                free, total, live = await engine.run_in_engine(
                    lambda e: (e.kv.blocks.num_free_blocks, e.kv.num_blocks, len(e.requests)))
                assert live == 1 and free < total
                r.close()  # drop the connection mid-stream
    run(main())
    wait_idle(engine)


def test_disconnect_while_waiting_for_whole_response_frees_blocks(server, engine):
    async def main():
        async with aiohttp.ClientSession(headers=AUTH) as s:
            task = asyncio.create_task(s.post(f"{server.url}/v1/completions", json={
                "prompt": "slow " * 20, "max_tokens": 200, "ignore_eos": True}))
            for _ in range(500):
                await asyncio.sleep(0.01)
                if await engine.run_in_engine(lambda e: e.kv.blocks.num_free_blocks < e.kv.num_blocks):
                    break
            else:
                pytest.fail("the request never ran")
            task.cancel()  # the client gives up: its connection closes
            with pytest.raises(asyncio.CancelledError):
                await task
    run(main())
    wait_idle(engine)


def test_disconnect_mid_beam_search_ends_the_search(server, engine, monkeypatch):
    """A beam search's steps end with its client: no step request is left, none starts."""
    calls = []
    generate = engine.generate

    def counted(*args, **kwargs):
        calls.append(kwargs.get("request_id"))
        return generate(*args, **kwargs)

    monkeypatch.setattr(engine, "generate", counted)

    async def main():
        async with aiohttp.ClientSession(headers=AUTH) as s:
            task = asyncio.create_task(s.post(f"{server.url}/v1/completions", json={
                "prompt": "slow " * 20, "max_tokens": 200, "n": 4, "ignore_eos": True,
                "use_beam_search": True}))
            for _ in range(1000):
                await asyncio.sleep(0.01)
                if len(calls) >= 12:  # (three steps of four beams)
                    break
            else:
                pytest.fail(f"the search never stepped ({len(calls)} requests)")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    run(main())
    wait_idle(engine)
    started = len(calls)
    time.sleep(0.5)
    assert len(calls) == started < 4 * 200


def test_many_concurrent_streams(server, engine):
    async def one(s: aiohttp.ClientSession, i: int) -> int:
        body = {"prompt": f"request number {i}", "max_tokens": 3 + i % 5, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        async with s.post(f"{server.url}/v1/completions", json=body) as r:
            events = (await r.text()).strip().split("\n\n")
        assert events[-1] == "data: [DONE]"
        return json.loads(events[-2][len("data: "):])["usage"]["completion_tokens"]

    async def main():
        async with aiohttp.ClientSession(headers=AUTH) as s:
            return await asyncio.gather(*(one(s, i) for i in range(48)))
    assert run(main()) == [3 + i % 5 for i in range(48)]
    wait_idle(engine)


def test_reused_prefix_is_reported_in_usage(server):
    prompt = "A long shared system prompt that repeats itself. " * 6  # > 2 KV blocks
    body = {"prompt": prompt, "max_tokens": 2, "ignore_eos": True}
    first = run(post(f"{server.url}/v1/completions", body))[1]["usage"]
    second = run(post(f"{server.url}/v1/completions", body))[1]["usage"]
    assert "prompt_tokens_details" not in first
    cached = second["prompt_tokens_details"]["cached_tokens"]
    assert 16 <= cached < second["prompt_tokens"] and cached % 16 == 0


def test_clients_leaving_during_the_add_do_not_kill_the_engine(server, engine):
    # A handler cancelled while AsyncEngine awaits the engine's acknowledgement of the add must
    # not cancel that engine command (the engine thread would die on it).
    async def impatient(s: aiohttp.ClientSession, delay: float) -> None:
        try:
            async with asyncio.timeout(delay):
                async with s.post(f"{server.url}/v1/completions",
                                  json={"prompt": "quick", "max_tokens": 50}) as r:
                    await r.read()
        except TimeoutError:
            pass

    async def main():
        async with aiohttp.ClientSession(headers=AUTH) as s:
            await asyncio.gather(*(impatient(s, i * 0.0005) for i in range(120)))
    run(main())
    assert engine.is_running
    wait_idle(engine)
    status, body = run(post(f"{server.url}/v1/completions", {"prompt": "alive", "max_tokens": 2}))
    assert status == 200, body


def test_prometheus_text_formatter():
    from fairswitch.server.metrics import Histogram, format_family

    text = format_family("fairswitch:x", "counter", 'a\\b\nc "q"', [("", {"l": 'q"\\\n'}, 1.5)])
    assert text == ('# HELP fairswitch:x a\\\\b\\nc "q"\n# TYPE fairswitch:x counter\n'
                    'fairswitch:x{l="q\\"\\\\\\n"} 1.5\n')
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 5.0):
        h.observe(v)
    assert h.samples({}) == [("_bucket", {"le": "0.1"}, 2), ("_bucket", {"le": "1.0"}, 3),
                             ("_bucket", {"le": "+Inf"}, 4), ("_sum", {}, 5.65),
                             ("_count", {}, 4)]
