"""Replay clients and the bench/replay commands: the replay loop's timing (arrivals, think time,
concurrency) against a fake client; the in-process and HTTP clients against the tiny model (one
complete record per turn, exact token counts, reuse on later turns, failures recorded); SSE token
accounting against a scripted server; `fairswitch bench`, `replay` and `--compare` end to end."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from fairswitch.bench.ablations import ABLATIONS, ablation_config, parse_names
from fairswitch.bench.inproc_client import InProcClient
from fairswitch.bench.records import RequestRecord
from fairswitch.bench.replay import ReplayOptions, replay
from fairswitch.bench.runner import replay_http
from fairswitch.bench.trace import Conversation, Trace, Turn, write_trace
from fairswitch.cli.main import main
from fairswitch.config import EngineConfig
from fairswitch.engine.async_engine import AsyncEngine
from fairswitch.server import BackgroundServer

MAX_MODEL_LEN = 256
ENGINE_ARGS = ["--num-gpu-blocks", "256", "--max-model-len", str(MAX_MODEL_LEN),
               "--swap-space", "0.05", "--no-progress"]
THINK_S = 0.15
# asyncio may fire a timer up to its clock resolution early; and other processes share this CPU,
# so a timer may fire late by much more. Timing checks allow for both.
EARLY_S = 1e-3
LATE_S = 0.15


def chat_trace(tag: str, *, too_long: bool = False) -> Trace:
    """Two overlapping 3- and 2-turn conversations; histories long enough to fill KV blocks.
    ``tag`` makes the text unique, so no other test's cached KV can serve its first turns."""
    words = " ".join(f"{tag}{i}" for i in range(40))
    a = Conversation("a", 0.0, client="alice", priority=1, turns=[
        Turn(f"first question {words}", output_tokens=5),
        Turn("and then?", assistant=f"an answer about {tag}", output_tokens=4, think_s=THINK_S),
        Turn("last one", assistant="another answer", output_tokens=3, think_s=THINK_S)])
    b = Conversation("b", 0.05, client="bob", turns=[
        Turn(f"other topic {words} {tag}", output_tokens=6),
        Turn("more", assistant="sure", output_tokens=2, think_s=THINK_S)])
    convs = [a, b]
    if too_long:  # over max_model_len: refused before anything runs
        convs.append(Conversation("long", 0.02, client="carol", turns=[
            Turn(" ".join(["word"] * (2 * MAX_MODEL_LEN)), output_tokens=3),
            Turn("never sent", output_tokens=3, think_s=0.0)]))
    return Trace(convs)


@pytest.fixture(scope="module")
def engine():
    eng = AsyncEngine.from_config(EngineConfig.from_kwargs(
        num_gpu_blocks=256, max_model_len=MAX_MODEL_LEN, swap_space=0.05))
    yield eng
    eng.shutdown()


def by_id(records: list[RequestRecord]) -> dict[str, RequestRecord]:
    return {r.request_id: r for r in records}


def check_chat_records(trace: Trace, records: list[RequestRecord]) -> None:
    """One complete record per turn, exact token counts, think time respected, later turns
    served partly from reused KV."""
    recs = by_id(records)
    assert len(records) == trace.num_requests
    for conv in trace.conversations:
        prev = None
        for i, turn in enumerate(conv.turns):
            rec = recs[f"{conv.id}:{i}"]
            assert rec.ok, rec.error
            assert (rec.client, rec.priority, rec.turn) == (conv.client, conv.priority, i)
            assert rec.output_tokens == turn.output_tokens
            assert rec.arrival_s <= rec.token_times_s[0] <= rec.end_s
            assert rec.token_times_s == sorted(rec.token_times_s)
            if prev is None:
                assert rec.cached_tokens == 0
            else:
                assert rec.arrival_s >= prev.end_s + turn.think_s - EARLY_S
                assert rec.prompt_tokens > prev.prompt_tokens
                # The previous prompt's full KV blocks (16 tokens each) are reused.
                assert 16 <= rec.cached_tokens <= prev.prompt_tokens
            prev = rec


def test_inproc_client(engine):
    trace = chat_trace("inproc")
    client = InProcClient(engine)
    result = asyncio.run(replay(trace, client, ReplayOptions(progress=False)))
    check_chat_records(trace, result.records)
    for rec in result.records:  # the server's chat template, to the token
        conv = next(c for c in trace.conversations if c.id == rec.conversation_id)
        assert rec.prompt_tokens == len(client.prompt(conv, rec.turn)[1])


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_http_client(engine, server, endpoint):
    trace = chat_trace(f"http{endpoint}")
    result = replay_http(trace, server.url, ReplayOptions(progress=False), endpoint=endpoint)
    check_chat_records(trace, result.records)
    inproc = InProcClient(engine)
    for rec in result.records:
        conv = next(c for c in trace.conversations if c.id == rec.conversation_id)
        assert rec.prompt_tokens == len(inproc.prompt(conv, rec.turn)[1])
    # /metrics' reuse counter grew by exactly the cached tokens the responses reported.
    assert result.switch_metrics["reused_tokens"] == sum(r.cached_tokens for r in result.records)


@pytest.mark.parametrize("kind", ["inproc", "http"])
def test_failing_request_is_recorded_and_the_run_goes_on(engine, server, kind):
    trace = chat_trace(f"fail{kind}", too_long=True)
    if kind == "inproc":
        result = asyncio.run(replay(trace, InProcClient(engine), ReplayOptions(progress=False)))
    else:
        result = replay_http(trace, server.url, ReplayOptions(progress=False))
    recs = by_id(result.records)
    failed = recs.pop("long:0")
    assert not failed.ok and "max_model_len" in failed.error and failed.end_s is not None
    assert "long:1" not in recs and result.num_skipped_turns == 1
    assert all(r.ok for r in recs.values()) and len(recs) == 5


class FakeSender:
    """Answers every turn after ``delay_s`` with its output tokens; tracks requests in flight."""

    def __init__(self, delay_s: float = 0.05) -> None:
        self.delay_s = delay_s
        self.in_flight = self.max_in_flight = 0

    async def send(self, conv, turn, record, clock):
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
            record.token_times_s = [clock()] * conv.turns[turn].output_tokens
            record.end_s = clock()
        finally:
            self.in_flight -= 1


def spaced_trace(n: int, gap_s: float, turns: int = 1, think_s: float = 0.0) -> Trace:
    return Trace([Conversation(f"c{i}", i * gap_s, [Turn("x", 2, think_s=think_s)
                                                     for _ in range(turns)]) for i in range(n)])


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_arrivals_and_think_times_are_scaled(scale):
    # Gaps and think times are long enough that an unscaled replay misses every window.
    trace = spaced_trace(3, 0.4, turns=2, think_s=0.4)
    result = asyncio.run(replay(trace, FakeSender(0.02),
                                ReplayOptions(time_scale=scale, progress=False)))
    recs = by_id(result.records)
    for i in range(3):
        due = i * 0.4 * scale
        assert due - EARLY_S <= recs[f"c{i}:0"].arrival_s < due + LATE_S
        first, second = recs[f"c{i}:0"], recs[f"c{i}:1"]
        resume = first.end_s + 0.4 * scale
        assert resume - EARLY_S <= second.arrival_s < resume + LATE_S


def test_request_rate_override_and_concurrency_bound():
    trace = spaced_trace(8, 10.0)  # trace arrivals 70 s apart would take far too long
    sender = FakeSender(0.05)
    result = asyncio.run(replay(trace, sender, ReplayOptions(
        request_rate=float("inf"), max_concurrency=3, progress=False)))
    assert all(r.ok for r in result.records) and len(result.records) == 8
    assert sender.max_in_flight == 3
    # 8 requests, 3 at a time, 50 ms each: three rounds.
    assert 0.15 - EARLY_S <= result.duration_s < 1.0


def test_stop_rule_ends_the_replay_and_records_why():
    trace = spaced_trace(6, 0.0, turns=3)  # all at once; every answer would take 10 s
    sender = FakeSender(10.0)
    seen = []

    def stop_when(records, now):
        seen.append((len(records), now))
        return "enough" if now > 0.3 else None

    result = asyncio.run(replay(trace, sender, ReplayOptions(progress=False,
                                                             stop_when=stop_when)))
    assert result.stopped == "enough"
    assert sender.in_flight == 0 and len(result.records) == 6  # the first turns, cancelled
    assert all(not r.ok and r.error == "replay stopped: enough" and r.end_s >= 0.3
               for r in result.records)
    assert result.num_skipped_turns == 12 and seen[-1][0] == 6
    done = asyncio.run(replay(spaced_trace(2, 0.0), FakeSender(0.01),
                              ReplayOptions(progress=False, stop_when=lambda r, now: None)))
    assert done.stopped is None and all(r.ok for r in done.records)


def test_turns_never_sent_are_counted_by_conversation_priority_and_client():
    """By conversation, not by id (a Trace built in Python may repeat one): the unsent turns
    of each class and client, for their SLO attainment."""

    class FailsFirstTurnOf(FakeSender):
        async def send(self, conv, turn, record, clock):
            if conv.priority == 1 and turn == 0:
                raise RuntimeError("refused")
            await super().send(conv, turn, record, clock)

    turns = [Turn("x", 2) for _ in range(3)]
    trace = Trace([Conversation("x", 0.0, turns, priority=1, client="a"),
                   Conversation("x", 0.0, turns, priority=0, client="b"),
                   Conversation("y", 0.0, turns, priority=1, client="b")])
    result = asyncio.run(replay(trace, FailsFirstTurnOf(0.01), ReplayOptions(progress=False)))
    assert result.unsent == {(1, "a"): 2, (1, "b"): 2} and result.num_skipped_turns == 4


def test_a_broken_stop_rule_raises_without_waiting_for_the_answers():
    answered = []

    class Sender(FakeSender):
        async def send(self, conv, turn, record, clock):
            await super().send(conv, turn, record, clock)
            answered.append(record.request_id)

    def stop_when(records, now):
        raise KeyError("bug")

    with pytest.raises(KeyError, match="bug"):
        asyncio.run(replay(spaced_trace(3, 0.0), Sender(10.0),
                           ReplayOptions(progress=False, stop_when=stop_when)))
    assert answered == []  # cancelled, not waited for


def scripted_app(events: list[str]) -> web.Application:
    """A server whose chat stream is ``events`` verbatim (plus /v1/models)."""
    async def chat(request: web.Request) -> web.StreamResponse:
        assert request.headers["X-Client-Id"] == "alice"
        body = await request.json()
        assert body["priority"] == 1 and body["ignore_eos"] and body["model"] == "scripted"
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for e in events:
            await resp.write(f"data: {e}\n\n".encode())
            await asyncio.sleep(0.02)
        await resp.write_eof()
        return resp

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "scripted"}]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    return app


def chunk(content: str | None, finish: str | None = None) -> str:
    delta = {"content": content} if content is not None else {"role": "assistant"}
    return json.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


def test_sse_merged_chunks_are_counted_from_usage():
    usage = {"prompt_tokens": 7, "completion_tokens": 5,
             "prompt_tokens_details": {"cached_tokens": 4}}
    events = [chunk(None), chunk("a"), chunk("bc"), chunk("d", "length"),
              json.dumps({"choices": [], "usage": usage}), "[DONE]"]
    trace = Trace([Conversation("s", 0.0, [Turn("hi", 5)], client="alice", priority=1)])
    with BackgroundServer(scripted_app(events)) as srv:
        rec = replay_http(trace, srv.url, ReplayOptions(progress=False),
                          warmup_requests=0).records[0]
    assert rec.ok and rec.prompt_tokens == 7 and rec.cached_tokens == 4
    assert rec.output_tokens == 5
    t = rec.token_times_s
    assert t[0] < t[1] < t[2] == t[3] == t[4]  # the 2 merged tokens sit at the last chunk


@pytest.mark.parametrize("events, message", [
    ([chunk(None), chunk("a"), json.dumps({"error": {"message": "engine died"}}), "[DONE]"],
     "engine died"),
    ([chunk(None), chunk("a"), chunk("b")], "[DONE]"),  # cut short
])
def test_sse_error_in_stream_fails_the_request(events, message):
    trace = Trace([Conversation("s", 0.0, [Turn("hi", 5), Turn("next", 5)], client="alice",
                                priority=1)])
    with BackgroundServer(scripted_app(events)) as srv:
        result = replay_http(trace, srv.url, ReplayOptions(progress=False), warmup_requests=0)
    [rec] = result.records
    assert not rec.ok and message in rec.error and result.num_skipped_turns == 1


def test_ablation_names_map_to_config_switches():
    base = EngineConfig.from_kwargs(block_size=32, enable_prefix_caching=False, num_gpu_blocks=64)
    full = ablation_config("full", base).cache
    assert (full.block_groups, full.enable_prefix_caching, full.async_swap,
            full.incremental_swap, full.per_layer_swap, full.block_size) == (
        True, True, True, True, False, 32)
    assert ablation_config("no-reuse", base).cache.enable_prefix_caching is False
    assert ablation_config("no-groups", base).cache.block_groups is False
    assert ablation_config("no-async", base).cache.async_swap is False
    assert ablation_config("no-incremental", base).cache.incremental_swap is False
    b = ablation_config("baseline", base).cache
    assert (b.tokens_per_block, b.per_layer_swap, b.block_groups, b.async_swap) == (16, True, False,
                                                                              False)
    base.scheduler.async_scheduling = False
    assert ablation_config("full", base).scheduler.async_scheduling is True
    off = ablation_config("no-async-sched", base)
    assert off.scheduler.async_scheduling is False and off.cache.async_swap is True
    assert base.cache.enable_prefix_caching is False and base.cache.block_size == 32  # untouched
    # full-fp8 from a --baseline command line: fp8's blocks, not the baseline's 16
    fp8 = ablation_config("full-fp8", EngineConfig.from_kwargs(baseline=True)).cache
    assert (fp8.kv_cache_dtype, fp8.tokens_per_block) == ("fp8", 32)
    assert parse_names("full, baseline") == ["full", "baseline"]
    for bad in ("full,full", "full,turbo", ""):
        with pytest.raises(ValueError):
            parse_names(bad)
    assert set(ABLATIONS) >= {"full", "baseline", "no-groups", "no-async", "no-incremental",
                              "no-reuse"}


@pytest.fixture()
def trace_file(tmp_path):
    path = tmp_path / "chat.jsonl"
    write_trace(path, chat_trace("cli").conversations, meta={"made_by": "test"})
    return path


def test_bench_cli_in_process(trace_file, tmp_path, capsys):
    out, plots = tmp_path / "bench.json", tmp_path / "plots"
    rc = main(["bench", "--trace", str(trace_file), *ENGINE_ARGS, "--ttft-slo-ms", "5000",
               "--tbt-slo-ms", "5000", "--output-json", str(out), "--plots-dir", str(plots)])
    assert rc == 0
    text = capsys.readouterr().out
    for part in ("Serving Benchmark Result", "By priority", "By client", "alice", "bob",
                 "reused_tokens"):
        assert part in text, part
    report = json.loads(out.read_text())
    s = report["summary"]
    assert (s["num_requests"], s["completed"], s["failed"]) == (5, 5, 0)
    assert s["total_output_tokens"] == 20 and s["slo_attainment"]["both"] == 1.0
    assert set(s["by_client"]) == {"alice", "bob"} and s["engine"]["reused_tokens"] > 0
    assert report["trace_meta"] == {"made_by": "test"} and report["target"] == "in-process"
    assert report["engine_config"]["cache"]["num_gpu_blocks"] == 256
    assert len(report["plots"]) == 5 and all(p.endswith(".png") for p in report["plots"])
    assert all((plots / p.split("/")[-1]).stat().st_size > 0 for p in report["plots"])


@pytest.mark.parametrize("options, message", [
    (["--window-s", "0"], "--window-s must be finite and > 0"),
    (["--window-s", "nan"], "--window-s must be finite and > 0"),
    (["--ttft-slo-ms", "-5"], "SLO ttft_s must be finite and > 0"),
    (["--client-weights", "a=0"], "client weight of 'a' must be a finite number > 0"),
    (["--client-weights", "a=x"], "client weight of 'a' must be a number, got 'x'"),
    (["--plots-dir", "PLOTS"], "--plots-dir: plots need matplotlib"),
    # Every request, or the warm-up, would fail (a bench of failures, exit status 0).
    (["--temperature", "-1"], "--temperature must be a finite number >= 0, got -1.0"),
    (["--temperature", "nan"], "--temperature must be a finite number >= 0, got nan"),
    (["--warmup-requests", "-1"], "--warmup-requests must be >= 0, got -1"),
    (["--chat-template", "{% if %}"], "--chat-template is not a Jinja template: "),
])
def test_bench_refuses_bad_report_options_before_the_replay(trace_file, tmp_path, capsys,
                                                            monkeypatch, options, message):
    """These were refused only after the whole replay (or, for plots, lost its JSON)."""
    import fairswitch.bench.plots as plots
    import fairswitch.cli.bench as cli_bench

    def no_matplotlib():
        raise ImportError("plots need matplotlib: pip install 'fairswitch[plots]'")

    def no_replay(*args, **kwargs):
        raise AssertionError("replayed before refusing its options")

    monkeypatch.setattr(plots, "figure_class", no_matplotlib)
    monkeypatch.setattr(cli_bench, "run_target", no_replay)
    options = [str(tmp_path / "plots") if o == "PLOTS" else o for o in options]
    assert main(["bench", "--trace", str(trace_file), *ENGINE_ARGS, *options]) == 2
    assert message in capsys.readouterr().err


def test_a_failed_plot_keeps_the_report(trace_file, tmp_path, capsys, monkeypatch):
    import fairswitch.bench.plots as plots

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plots, "write_plots", full_disk)
    out = tmp_path / "bench.json"
    assert main(["bench", "--trace", str(trace_file), *ENGINE_ARGS, "--output-json", str(out),
                 "--plots-dir", str(tmp_path / "plots")]) == 1
    assert "plots not written: OSError" in capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["summary"]["completed"] == 5 and report["plots"] == []
    assert "No space left" in report["plots_error"]


@pytest.mark.parametrize("command", ["bench", "replay"])
def test_failed_requests_say_why(tmp_path, capsys, command):
    """Failed requests were only counted ("Failed requests: 1"), in the table and the JSON."""
    trace, out = tmp_path / "long.jsonl", tmp_path / "report.json"
    write_trace(trace, chat_trace("why", too_long=True).conversations)
    assert main([command, "--trace", str(trace), *ENGINE_ARGS, "--num-conversations", "2",
                 "--warmup-requests", "0", "--output-json", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"{command}: failed requests: 1 (later turns not sent: 1), errors:" in err
    assert "1 x ValueError: prompt has" in err and f"max_model_len is {MAX_MODEL_LEN}" in err
    (failure,) = json.loads(out.read_text())["summary"]["failures"]
    assert (failure["request_id"], failure["conversation_id"], failure["turn"]) == ("long:0",
                                                                                  "long", 0)
    assert failure["error"].startswith("ValueError: prompt has")


def test_bench_cli_http(trace_file, server, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--trace", str(trace_file), "--url", server.url, "--no-progress",
                 "--num-conversations", "1", "--output-json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["target"] == server.url and report["num_requests"] == 3
    assert report["summary"]["completed"] == 3 and "swap_copies" in report["summary"]["engine"]


def test_replay_cli(trace_file, tmp_path, capsys):
    out = tmp_path / "replay.json"
    assert main(["replay", "--trace", str(trace_file), *ENGINE_ARGS,
                 "--output-json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "By turn" in text and "KV reuse" in text
    report = json.loads(out.read_text())
    turns = report["turns"]
    assert list(turns) == ["0", "1", "2"]
    assert [t["completed"] for t in turns.values()] == [2, 2, 1]
    assert turns["0"]["cached_tokens"] == 0 and turns["1"]["cached_tokens"] >= 32
    assert turns["1"]["ttft"]["count"] == 2 and turns["1"]["e2el"]["p99_ms"] > 0
    reuse = report["reuse"]
    assert reuse["engine"]["reused_tokens"] == reuse["cached_tokens"] > 0


def test_bench_compare(trace_file, tmp_path, capsys):
    out = tmp_path / "compare.json"
    assert main(["bench", "--trace", str(trace_file), *ENGINE_ARGS, "--compare",
                 "full,baseline", "--output-json", str(out)]) == 0
    assert "Comparison" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["baseline"] == "baseline" and list(report["runs"]) == ["full", "baseline"]
    full, base = (report["runs"][n] for n in ("full", "baseline"))
    assert full["summary"]["completed"] == base["summary"]["completed"] == 5
    assert base["engine_config"]["cache"]["per_layer_swap"] is True
    assert base["engine_config"]["cache"]["tokens_per_block"] == 16  # (baseline's blocks)
    assert full["summary"]["engine"]["reused_tokens"] > 0
    assert base["summary"]["engine"]["reused_tokens"] == 0  # baseline has no prefix caching
    assert all(v == 1.0 for v in report["ratios"]["baseline"].values() if v is not None)
    assert report["ratios"]["full"]["P99 TTFT (ms)"] > 0


def test_compare_refuses_url(trace_file, capsys):
    assert main(["bench", "--trace", str(trace_file), "--url", "http://127.0.0.1:9",
                 "--compare", "full,baseline"]) == 2
    assert "--compare" in capsys.readouterr().err


def test_unreachable_server_is_a_clean_error(trace_file, capsys):
    assert main(["bench", "--trace", str(trace_file), "--url", "http://127.0.0.1:9",
                 "--no-progress"]) == 2
    assert "cannot use the server at http://127.0.0.1:9" in capsys.readouterr().err
