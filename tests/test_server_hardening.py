"""The server under stress and at its edges: a huge prompt stalls neither /health nor other streams
(refused before it is tokenized when it cannot fit, tokenized off the event loop when it might);
a stream sends one chunk per token; every request leaves an access line, every refusal its cause;
the cache gauges say what they count; and `fairswitch serve` shuts down within its timeout: new
connections refused at once, streams ended with an in-band error then [DONE], whole requests
answered 503, exit status 0.

Timings are compared with the same run's normal pace (a ratio, with a generous factor), never with
an absolute time: the tests run on small CI machines."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import queue
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import pytest

from fairswitch.cli.main import build_parser
from fairswitch.config import EngineConfig
from fairswitch.engine.async_engine import AsyncEngine
from fairswitch.server import BackgroundServer, ServerSettings, build_app, inflight

MAX_MODEL_LEN = 4096  # the embedded model's context
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


@pytest.fixture(scope="module")
def engine():
    eng = AsyncEngine.from_config(EngineConfig.from_kwargs(num_gpu_blocks=512,
                                                           max_model_len=MAX_MODEL_LEN))
    yield eng
    eng.shutdown()


async def _stream_chunks(s: aiohttp.ClientSession, url: str, body: dict,
                         out: list[tuple[float, dict]]) -> None:
    """(arrival time, event) of every event of a stream but [DONE], as they come."""
    async with s.post(url, json=body) as r:
        assert r.status == 200, await r.text()
        async for line in r.content:
            if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                out.append((time.monotonic(), json.loads(line[6:])))


async def _health_latencies(s: aiohttp.ClientSession, url: str, stop: asyncio.Event,
                            out: list[tuple[float, float]]) -> None:
    """(sent at, latency) of /health requests sent one after another until ``stop``."""
    while not stop.is_set():
        t0 = time.monotonic()
        async with s.get(url + "/health") as r:
            assert r.status == 200
        out.append((t0, time.monotonic() - t0))


async def _under_load(url: str, big: bytes) -> tuple[float, float, tuple[int, dict],
                                                     list[tuple[float, float]],
                                                     list[tuple[float, dict]]]:
    """Post ``big`` while a stream runs and /health is polled: (sent at, answered at, (status,
    body) of the big request, the health latencies, the stream's chunks)."""
    stop = asyncio.Event()
    health: list[tuple[float, float]] = []
    chunks: list[tuple[float, dict]] = []
    async with aiohttp.ClientSession() as s:
        stream = asyncio.create_task(_stream_chunks(s, url + COMPLETIONS, {
            "prompt": "Keep talking", "max_tokens": 400, "ignore_eos": True, "stream": True},
            chunks))
        poller = asyncio.create_task(_health_latencies(s, url, stop, health))
        while len(chunks) < 30 or len(health) < 30:  # the normal pace, stream running
            await asyncio.sleep(0.01)
        sent = time.monotonic()
        async with s.post(url + COMPLETIONS, data=big,
                          headers={"Content-Type": "application/json"}) as r:
            result = r.status, await r.json()
        answered = time.monotonic()
        await asyncio.sleep(0.2)  # a few more answers and chunks after it
        stop.set()
        await poller
        stream.cancel()  # the client leaves: the server aborts the rest
        with contextlib.suppress(asyncio.CancelledError):
            await stream
        return sent, answered, result, health, chunks


def _overlapping(spans: list[tuple[float, float]], start: float, end: float) -> list[float]:
    """The lengths of the (start, length) spans that overlap [start, end]."""
    return [length for t, length in spans if t <= end and t + length >= start]


def _before(spans: list[tuple[float, float]], start: float) -> list[float]:
    return [length for t, length in spans if t + length < start]


# ---- nothing heavy on the event loop -----------------------------------------------------------

def _big_prompt_under_load(url: str, num_chars: int) -> tuple[int, str]:
    """Post a prompt of ``num_chars`` characters while a stream runs and /health is polled;
    assert that both kept their pace; returns the big request's status and error message.

    Kept its pace: the slowest /health answer while the big request ran is within 10x the
    slowest before it (thousands of answers, while the stream's steps hold the GIL at times), or
    a small part of the big request's own time (had the event loop worked on the big request,
    it would have been all of it); likewise the stream's longest gap vs 5x its median gap."""
    text = ("The quick brown fox jumps over the lazy dog. " * (num_chars // 45 + 1))[:num_chars]
    big = json.dumps({"prompt": text, "max_tokens": 1}).encode()
    sent, answered, (status, body), health, chunks = asyncio.run(_under_load(url, big))
    part = (answered - sent) / 4
    slowest, usual = max(_overlapping(health, sent, answered)), max(_before(health, sent))
    assert slowest < max(10 * usual, part), (slowest, usual, answered - sent)
    gaps = [(a[0], b[0] - a[0]) for a, b in itertools.pairwise(chunks)]
    longest = max(_overlapping(gaps, sent, answered))
    normal = statistics.median(_before(gaps, sent))
    assert longest < max(5 * normal, part), (longest, normal, answered - sent)
    return status, body["error"]["message"]


def test_a_prompt_too_long_to_fit_is_refused_before_tokenizing_and_stalls_nothing(server):
    # 6 MB: under the 8 MiB body limit, far over what 4095 tokens of the default model's
    # vocabulary can hold (its longest token is 256 characters; the bound allows twice that).
    status, message = _big_prompt_under_load(server.url, 6_000_000)
    assert status == 400
    assert re.search(r"6000000 characters.*max_model_len is 4096.*4095 prompt tokens x 512 "
                     r"characters per token = 2096640 characters", message), message


def test_a_long_prompt_that_might_fit_is_tokenized_off_the_event_loop(server):
    # Just under the character bound: tokenized (about a second), then refused by its count.
    status, message = _big_prompt_under_load(server.url, 1_040_000)
    assert status == 400
    assert re.search(r"prompt has \d{6} tokens but max_model_len is 4096", message), message


# ---- one chunk per token -----------------------------------------------------------------------

def _content_chunks(events: list[dict]) -> list[dict]:
    """The chunks that carry a token's text: not chat's opening role chunk, nor the usage one."""
    return [e for e in events if e["choices"] and "role" not in e["choices"][0].get("delta", {})]


def test_a_stream_sends_one_chunk_per_token_even_when_its_text_is_held_back(server):
    n = 32

    async def one(s: aiohttp.ClientSession, i: int) -> tuple[list[dict], str]:
        body = {"max_tokens": n, "ignore_eos": True, "stream": True, "temperature": 1.0,
                "seed": i, "stream_options": {"include_usage": True}}
        if i % 3 == 0:  # held back: the last characters might start a stop string
            body["stop"] = ["never-seen-stop-string"]
        chat = i % 2 == 0
        if chat:
            body["messages"] = [{"role": "user", "content": f"Say something, number {i}"}]
        else:
            body["prompt"] = f"Say something, number {i}"
        out: list[tuple[float, dict]] = []
        await _stream_chunks(s, server.url + (CHAT if chat else COMPLETIONS), body, out)
        return [e for _, e in out], "delta" if chat else "text"

    async def main() -> list[tuple[list[dict], str]]:
        async with aiohttp.ClientSession() as s:
            return await asyncio.gather(*(one(s, i) for i in range(12)))
    num_empty = 0
    for events, field in asyncio.run(main()):
        assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == n
        chunks = _content_chunks(events)
        assert len(chunks) == n
        texts = [c["choices"][0][field] for c in chunks]
        if field == "delta":  # every chunk has its content, "" while the text is held back
            texts = [t["content"] for t in texts]
        assert all(isinstance(t, str) for t in texts)
        num_empty += texts.count("")
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert num_empty > 0  # the case this test is about did occur


# ---- logs ----------------------------------------------------------------------------------------

def _records(caplog, logger: str, timeout: float = 10.0, count: int = 1) -> list[str]:
    """The messages of ``logger`` (the server logs from its own thread: wait for them)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [r.getMessage() for r in caplog.records if r.name == logger]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


async def _post(url: str, body: dict, headers: dict | None = None) -> int:
    async with aiohttp.ClientSession() as s, s.post(url, json=body, headers=headers) as r:
        await r.read()
        return r.status


def test_every_request_has_an_access_line_and_every_refusal_its_cause(server, caplog):
    caplog.set_level(logging.INFO, logger="fairswitch")
    status = asyncio.run(_post(server.url + CHAT, {
        "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5, "ignore_eos": True,
        "stream": True, "priority": -2}, headers={"X-Client-Id": "team-a"}))
    assert status == 200
    (line,) = _records(caplog, "fairswitch.server.access")
    assert re.fullmatch(r"POST /v1/chat/completions 200 client='team-a' priority=-2 "
                        r"prompt_tokens=\d+ output_tokens=5 ttft=\d+\.\d{3}s duration=\d+\.\d{3}s",
                        line), line
    caplog.clear()
    too_long = [1000] * (MAX_MODEL_LEN + 10)
    assert asyncio.run(_post(server.url + COMPLETIONS, {"prompt": too_long, "user": "bob"})) == 400
    (cause,) = _records(caplog, "fairswitch.server.errors")
    assert cause.startswith("POST /v1/completions: 400: prompt has 4106 tokens but "
                            "max_model_len is 4096"), cause
    (line,) = _records(caplog, "fairswitch.server.access")
    assert re.fullmatch(r"POST /v1/completions 400 duration=\d+\.\d{3}s", line), line
    caplog.clear()  # a long client id is cut in the log (not for the scheduler)
    assert asyncio.run(_post(server.url + COMPLETIONS, {"prompt": "x", "max_tokens": 1},
                             headers={"X-Client-Id": "z" * 5000})) == 200
    (line,) = _records(caplog, "fairswitch.server.access")
    assert f"client='{'z' * 64}...(5000 chars)' " in line and len(line) < 300, line


def test_a_stream_whose_client_went_away_is_logged_as_499(server, caplog, monkeypatch):
    """A write to a client that went away raises ConnectionResetError (when it comes before
    aiohttp cancels the handler): the handler ends the stream quietly, and its 200 was logged."""
    from fairswitch.server import streaming

    send, sent = streaming.send, []

    async def reset_after_one_chunk(resp, body) -> None:
        if sent:
            raise ConnectionResetError("the client went away")
        sent.append(body)
        await send(resp, body)
    monkeypatch.setattr(streaming, "send", reset_after_one_chunk)
    caplog.set_level(logging.INFO, logger="fairswitch")
    assert asyncio.run(_post(server.url + COMPLETIONS, {
        "prompt": "x", "max_tokens": 50, "ignore_eos": True, "stream": True})) == 200
    (line,) = _records(caplog, "fairswitch.server.access")
    assert line.startswith("POST /v1/completions 499 "), line


def test_access_lines_can_be_turned_off(engine, caplog):
    caplog.set_level(logging.INFO, logger="fairswitch")
    settings = ServerSettings(log_requests=False)
    with BackgroundServer(build_app(engine, settings, shutdown_engine=False)) as quiet:
        assert asyncio.run(_post(quiet.url + COMPLETIONS, {"prompt": "x", "max_tokens": 1})) == 200
        assert asyncio.run(_post(quiet.url + COMPLETIONS, {"prompt": ""})) == 400
        assert len(_records(caplog, "fairswitch.server.errors")) == 1  # refusals still are
    assert _records(caplog, "fairswitch.server.access", timeout=0) == []


def test_the_server_tokenizes_without_transformers_indexing_warning(tokenizer_dir):
    from transformers import AutoTokenizer

    from fairswitch.server.prompts import PromptWorker

    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    hf.model_max_length = 8
    warned: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warned.append(record.getMessage())  # type: ignore[method-assign]
    hf_logger = logging.getLogger("transformers")  # its records may not reach the root logger
    hf_logger.addHandler(handler)
    worker = PromptWorker(hf, max_model_len=8)
    try:
        assert len(worker.encode("word " * 20, add_special_tokens=False)) > 8
        assert warned == []
        hf("word " * 20)  # the plain call warns: the check above could have seen it
        assert any("indexing errors" in w for w in warned)
    finally:
        hf_logger.removeHandler(handler)
        worker.close()


# ---- metrics -------------------------------------------------------------------------------------

def test_cache_gauges_count_live_kv_apart_from_kv_kept_for_reuse():
    from fairswitch import LLM, SamplingParams
    from fairswitch.server.metrics import engine_snapshot

    llm = LLM(num_gpu_blocks=32, block_size=4, max_model_len=64, swap_space=0.01)
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    for prompt in ("a prompt long enough to fill a few blocks of four", "and then another"):
        llm.generate([prompt], params, use_tqdm=False)  # (the second lands the first's copy)
    m = engine_snapshot(llm.engine)
    # Nothing runs: no live KV anywhere, while both reuse tiers keep the finished prompts.
    assert m["gpu_kv_usage"] == 0 and m["cpu_kv_usage"] == 0
    assert m["gpu_kv_reuse"] > 0 and m["cpu_kv_reuse"] > 0
    cpu = llm.engine.kv.swap.cpu_pool
    assert m["cpu_kv_reuse"] == cpu.num_used_blocks / cpu.num_blocks


def test_every_exported_metric_is_documented(server):
    async def scrape() -> str:
        async with aiohttp.ClientSession() as s, s.get(server.url + "/metrics") as r:
            return await r.text()
    names = re.findall(r"^# TYPE fairswitch:(\w+) ", asyncio.run(scrape()), re.MULTILINE)
    assert {"gpu_cache_reuse_perc", "cpu_cache_reuse_perc", "switch_wait_seconds_total"} <= \
        set(names)
    docs = (Path(__file__).parents[1] / "docs" / "http.md").read_text()
    assert [n for n in names if f"`{n}" not in docs] == []


# ---- the command line ----------------------------------------------------------------------------

def test_serve_help_says_each_default_once():
    serve = build_parser()._commands["serve"]  # type: ignore[attr-defined]
    for action in serve._actions:
        text = action.help or ""
        assert text.count("(default") <= 1, (action.option_strings, text)


# ---- graceful shutdown ---------------------------------------------------------------------------

def _drain(stream, out: queue.Queue) -> None:
    for line in stream:
        out.put(line)
    out.put(None)


async def _refused(host: str, port: int, deadline: float) -> float | None:
    """When a new connection was first refused (None: not before ``deadline``)."""
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection(host, port)
            writer.close()
        except ConnectionRefusedError:
            return time.monotonic()
        except ConnectionResetError:  # queued as the socket closed: the next one is refused
            pass
        await asyncio.sleep(0.02)
    return None


async def _events(response: aiohttp.ClientResponse) -> list[tuple[float, str]]:
    """(arrival time, data) of the events of a stream, to its end."""
    events = []
    async for line in response.content:
        if line.startswith(b"data: "):
            events.append((time.monotonic(), line[6:].decode().strip()))
    return events


async def _num_running(s: aiohttp.ClientSession, url: str) -> int:
    async with s.get(url + "/metrics") as r:
        text = await r.text()
    return int(re.search(r"^fairswitch:num_requests_running\{.*\} (\d+)$", text, re.MULTILINE)[1])


async def _sigterm_during_requests(proc: subprocess.Popen, url: str) -> dict:
    """Long streams and a long whole request run; SIGTERM; what each of them saw, and when."""
    long = {"prompt": "Tell me everything", "max_tokens": 4000, "ignore_eos": True}
    host, port = url.removeprefix("http://").rsplit(":", 1)
    async with aiohttp.ClientSession() as s:
        streams = [await s.post(url + COMPLETIONS, json={**long, "stream": True})
                   for _ in range(4)]
        assert [r.status for r in streams] == [200] * 4
        # Whole requests of one choice and of two (each choice is an engine request to abort).
        wholes = [asyncio.create_task(_answer(s, url + COMPLETIONS, {**long, "n": n}))
                  for n in (1, 2)]
        while await _num_running(s, url) < 4 + 1 + 2:
            await asyncio.sleep(0.05)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        readers = [asyncio.create_task(_events(r)) for r in streams]
        refused = await _refused(host, int(port), signalled + 10)
        return {"signalled": signalled, "refused": refused,
                "streams": await asyncio.gather(*readers),
                "wholes": await asyncio.gather(*wholes)}


async def _answer(s: aiohttp.ClientSession, url: str, body: dict) -> tuple[int, dict, float]:
    """(status, JSON body, when it came) of a whole (not streamed) request."""
    async with s.post(url, json=body) as r:
        return r.status, await r.json(), time.monotonic()


def test_serve_shutdown_keeps_its_word():
    timeout_s = 2.0
    proc = subprocess.Popen(
        [sys.executable, "-m", "fairswitch.cli.main", "serve", "--port", "0",
         "--num-gpu-blocks", "512", "--max-model-len", str(MAX_MODEL_LEN),
         "--shutdown-timeout", str(timeout_s)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    errors: queue.Queue = queue.Queue()
    threading.Thread(target=_drain, args=(proc.stdout, lines), daemon=True).start()
    threading.Thread(target=_drain, args=(proc.stderr, errors), daemon=True).start()
    try:
        line = lines.get(timeout=180)
        assert line and line.startswith("fairswitch serve: fairswitch-tiny on http://"), line
        seen = asyncio.run(_sigterm_during_requests(proc, line.rsplit(" ", 1)[1].strip()))
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    t0 = seen["signalled"]
    # New connections were refused at once: before the grace period was over.
    assert seen["refused"] is not None and seen["refused"] - t0 < timeout_s / 2
    # Each stream ran through the grace period, then ended: an error event, then [DONE].
    for events in seen["streams"]:
        (t_error, error), (_, done) = events[-2:]
        assert done == "[DONE]" and "shutting down" in json.loads(error)["error"]["message"]
        assert 0.9 * timeout_s < t_error - t0 < 1.6 * timeout_s, t_error - t0
        assert all("error" not in json.loads(e) for _, e in events[:-2])
    for status, body, t_whole in seen["wholes"]:
        assert status == 503 and "shutting down" in body["error"]["message"]
        assert 0.9 * timeout_s < t_whole - t0 < 1.6 * timeout_s, t_whole - t0
    stdout = list(iter(lines.get, None))
    assert stdout == ["fairswitch serve: stopped\n"]
    # serve logs at INFO: the requests have their access lines, with how they ended.
    stderr = "".join(iter(errors.get, None))
    assert re.search(r"POST /v1/completions 200 client=None priority=0 prompt_tokens=\d+ "
                     r"output_tokens=\d+ ttft=[\d.]+s duration=[\d.]+s error='the request was "
                     r"aborted: the server is shutting down'", stderr), stderr
    assert re.search(r"POST /v1/completions 503 client=None .* duration=", stderr), stderr


def test_drain_does_not_wait_for_aborts_a_stuck_engine_never_takes(monkeypatch):
    """Every choice's engine request is aborted, and a drain whose aborts are not taken (the
    engine's step is stuck) gives up after the grace period instead of hanging the shutdown."""
    monkeypatch.setattr(inflight, "ABORT_GRACE_S", 0.2)

    async def main() -> tuple[list[str], float]:
        flight = inflight.InFlight(log_requests=False)
        flight._records[1] = inflight.AccessRecord(request_ids=["a", "a-1"])
        flight._idle.clear()
        asked: list[str] = []

        async def abort(request_id: str) -> None:
            asked.append(request_id)
            await asyncio.Event().wait()  # never taken
        start = time.monotonic()
        await asyncio.wait_for(flight.drain(0.05, abort), 30)
        return asked, time.monotonic() - start
    asked, took = asyncio.run(main())
    assert asked == ["a", "a-1"] and took < 10


def test_serve_log_options():
    parse = build_parser().parse_args
    args = parse(["serve", "--log-level", "DEBUG", "--disable-log-requests"])
    assert args.log_level == "debug" and args.disable_log_requests
    assert parse(["--log-level", "error", "serve"]).log_level == "error"  # not overwritten
    args = parse(["serve"])
    assert args.log_level is None and not args.disable_log_requests  # serve then logs at info


@pytest.mark.parametrize("choices", [{"prompt": "x", "n": 2}, {"prompt": ["x", "z"]}])
def test_n_choices_find_the_queue_full_before_their_stream_opens(choices):
    """The n choices (or a batch's prompts) are admitted together: a streamed request for two
    that the queue cannot take is a 503 with Retry-After (this was a 200 whose second choice
    failed in the stream)."""
    eng = AsyncEngine.from_config(EngineConfig.from_kwargs(
        num_gpu_blocks=256, max_model_len=256, max_num_seqs=1, max_waiting=2))
    long = {"prompt": "busy", "max_tokens": 200, "ignore_eos": True}
    pair = {**choices, "max_tokens": 3, "ignore_eos": True, "stream": True}

    async def main(url: str) -> tuple:
        async with aiohttp.ClientSession() as s:
            running = await s.post(url, json={**long, "stream": True})
            await running.content.readline()  # it runs: the one seat is taken
            waiting = asyncio.create_task(s.post(url, json=long))  # one place of two left
            for _ in range(500):
                await asyncio.sleep(0.01)
                if await eng.run_in_engine(lambda e: len(e.scheduler.waiting)) == 1:
                    break
            async with s.post(url, json=pair) as r:
                refused = r.status, r.headers.get("Retry-After"), await r.json()
            running.close()
            waiting.cancel()
            await asyncio.sleep(0.2)
            async with s.post(url, json=pair) as r:  # the queue is free again: both run
                events = [line for line in (await r.text()).splitlines() if line]
            return refused, r.status, events

    try:
        with BackgroundServer(build_app(eng, ServerSettings(), shutdown_engine=False)) as srv:
            (status, retry, body), ok, events = asyncio.run(main(srv.url + COMPLETIONS))
    finally:
        eng.shutdown()
    assert (status, retry, body["error"]["code"]) == (503, "1", "queue_full")
    assert ok == 200 and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert sorted(c["choices"][0]["index"] for c in chunks) == [0, 0, 0, 1, 1, 1]


def test_the_places_of_n_choices_are_held_until_they_join():
    """While choice 0 of an n=2 request waits it fills one place of two, and the other is its
    second choice's: a request arriving meanwhile was queued into it, and the queue then held 3."""
    eng = AsyncEngine.from_config(EngineConfig.from_kwargs(
        num_gpu_blocks=256, max_model_len=256, max_num_seqs=1, max_waiting=2))
    long = {"prompt": "busy", "max_tokens": 200, "ignore_eos": True}
    pair = {"prompt": "x", "max_tokens": 3, "n": 2, "ignore_eos": True}
    waiting = lambda e: len(e.scheduler.waiting)  # noqa: E731

    async def main(url: str) -> tuple:
        async with aiohttp.ClientSession() as s:
            running = await s.post(url, json={**long, "stream": True})
            await running.content.readline()  # it runs: the one seat is taken
            queued = asyncio.create_task(s.post(url, json=pair))  # both places are its
            for _ in range(500):
                await asyncio.sleep(0.01)
                if await eng.run_in_engine(waiting) == 1:
                    break
            async with s.post(url, json={"prompt": "y", "max_tokens": 2}) as r:
                refused = r.status
            running.close()
            async with await queued as r:
                pair_status, pair_body = r.status, await r.json()
            # The response is over: nothing is held, the two places take two requests.
            asked = [asyncio.create_task(s.post(url, json={"prompt": "y", "max_tokens": 2}))
                     for _ in range(3)]
            statuses = sorted([(await t).status for t in asked])
            return refused, pair_status, pair_body, statuses

    try:
        with BackgroundServer(build_app(eng, ServerSettings(), shutdown_engine=False)) as srv:
            refused, pair_status, pair_body, statuses = asyncio.run(main(srv.url + COMPLETIONS))
    finally:
        eng.shutdown()
    assert refused == 503
    assert pair_status == 200 and len(pair_body["choices"]) == 2
    assert statuses[:2] == [200, 200]  # (the third finds the seat or the queue free, or not)
