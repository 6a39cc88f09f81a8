"""The fairness benchmark (issue 26): VTC's measures against hand-computed values and brute force
(service curves, backlogged intervals, the difference over them and per window, the bound, the
service ratio), the workloads' arrivals and fair shares, timed runs cut at a deadline and the
capacity estimate, and benchmarks/fairness_bench.py end to end on the CPU at toy scale."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from fairswitch.bench.fairness_report import run_figures, ttft_summary, weighted_ratio
from fairswitch.bench.overload import CutOff, Deadline, TimedRun, capacity
from fairswitch.bench.records import RequestRecord
from fairswitch.bench.replay import ReplayOptions, replay
from fairswitch.bench.service_diff import (
    ServiceCurve,
    backlog_intervals,
    backlogged_differences,
    full_windows,
    overlaps,
    service_curves,
    service_ratio,
    spreads,
    vtc_bound,
    window_differences,
)
from fairswitch.bench.trace import Conversation, Trace, Turn
from workloads.fairness import (
    WORKLOADS,
    LengthLimits,
    build_trace,
    fair_level,
    probe_trace,
)
from workloads.streams import OnOff, timed_arrivals

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
approx = pytest.approx


def rec(client, arrival, prompt, tokens, end=None, error=None, rid="r"):
    tokens = [float(t) for t in tokens]
    return RequestRecord(request_id=rid, conversation_id=rid, turn=0, client=client, priority=0,
                         arrival_s=arrival, prompt_tokens=prompt, token_times_s=tokens,
                         end_s=end if end is not None else (tokens[-1] if tokens else arrival),
                         error=error)


def curve(times, steps):
    return ServiceCurve(np.asarray(times, dtype=float), np.cumsum(np.asarray(steps, dtype=float)))


# ---- service curves and backlog -------------------------------------------------------------

def test_service_curve_credits_the_prompt_at_the_first_token_and_divides_by_weight():
    records = [rec("a", 0.0, 10, [1.0, 2.0]), rec("a", 0.5, 4, [2.0, 3.0]),
               rec("b", 0.0, 6, [1.5]), rec("c", 0.0, 3, [])]
    curves = service_curves(records, weights={"b": 2.0})
    a = curves["a"]
    # 1.0: 10 + 2; 2.0: 2 + (4 + 2); 3.0: 2
    assert a.at(np.array([0.5, 1.0, 1.9, 2.0, 3.0, 9.0])).tolist() == [0, 12, 12, 20, 22, 22]
    assert a.before(np.array([1.0, 2.0, 3.0])).tolist() == [0, 12, 20]
    assert curves["b"].at(2.0) == (6 + 2) / 2
    assert curves["c"].at(5.0) == 0  # nothing served: a flat curve
    cut = service_curves(records, until_s=2.5, input_weight=0.5, output_weight=1.0)
    assert cut["a"].at(10.0) == 5 + 1 + 1 + 2 + 1  # the token at 3.0 is after the cut


def test_backlog_is_a_queued_request_and_intervals_are_merged_and_cut_at_the_end():
    records = [rec("a", 0.0, 1, [1.0, 1.5], end=2.0), rec("a", 1.5, 1, [3.0], end=3.0),
               rec("a", 4.0, 1, [9.0], end=9.0), rec("b", 1.0, 1, [2.5], end=2.5)]
    queued = backlog_intervals(records, until_s=6.0)  # arrival to first token
    assert queued["a"].tolist() == [[0.0, 1.0], [1.5, 3.0], [4.0, 6.0]]
    assert queued["b"].tolist() == [[1.0, 2.5]]
    assert overlaps(queued["a"], queued["b"]).tolist() == [[1.5, 2.5]]  # [1, 1] is empty
    pending = backlog_intervals(records, until_s=6.0, queued=False)  # arrival to finish
    assert pending["a"].tolist() == [[0.0, 3.0], [4.0, 6.0]]
    assert overlaps(pending["a"], pending["b"]).tolist() == [[1.0, 2.5]]
    assert overlaps(np.array([[0, 2], [3, 5], [6, 9]]),
                    np.array([[1, 4], [4.5, 7]])).tolist() == [[1, 2], [3, 4], [4.5, 5], [6, 7]]
    assert overlaps(queued["a"], np.zeros((0, 2))).shape == (0, 2)


# ---- the difference over backlogged intervals ------------------------------------------------

def test_the_difference_is_the_largest_over_sub_intervals_not_the_end_to_end_one():
    # a is served first, then b catches up: end to end they got the same, but over [0, 2] a was
    # 30 ahead.
    a = curve([1.0, 2.0], [10, 20])
    b = curve([3.0, 4.0], [15, 15])
    assert spreads(a, b, np.array([[0.0, 5.0]])).tolist() == [30.0]
    assert spreads(a, b, np.array([[2.5, 5.0]])).tolist() == [30.0]  # b's 30 inside
    assert spreads(a, b, np.array([[0.0, 0.5], [1.5, 2.5]])).tolist() == [0.0, 20.0]
    # An event at an interval's start counts inside it (the value just before is the start).
    assert spreads(a, b, np.array([[1.0, 1.0]])).tolist() == [10.0]


def brute_force(a: ServiceCurve, b: ServiceCurve, lo: float, hi: float) -> float:
    points = np.concatenate(([lo], a.times, b.times))
    points = np.unique(points[(points >= lo) & (points <= hi)])
    d = np.concatenate(([a.before(lo) - b.before(lo)], a.at(points) - b.at(points)))
    return float(max(abs(y - x) for i, x in enumerate(d) for y in d[i:]))


def test_spreads_match_brute_force_on_random_curves():
    rng = np.random.default_rng(7)
    for _ in range(20):
        a = curve(np.sort(rng.uniform(0, 10, 30)), rng.integers(1, 50, 30))
        b = curve(np.sort(rng.uniform(0, 10, 20)), rng.integers(1, 80, 20))
        edges = np.sort(rng.uniform(0, 10, 6)).reshape(-1, 2)
        got = spreads(a, b, edges)
        assert got.tolist() == approx([brute_force(a, b, lo, hi) for lo, hi in edges])


def test_differences_per_pair_and_interval_and_per_window():
    # a and b are pending together over [0, 4): a gets 100/s, b nothing until 2 s, then
    # 200/s; c is pending only over [5, 6).
    records = [rec("a", 0.0, 0, np.arange(0.5, 4.0, 0.5), end=4.0),
               rec("b", 0.0, 0, np.arange(2.25, 4.0, 0.25), end=4.0),
               rec("c", 5.0, 0, [5.5], end=6.0)]
    curves = service_curves(records, input_weight=0.0, output_weight=50.0)
    backlog = backlog_intervals(records, queued=False)
    diffs = backlogged_differences(curves, backlog)
    assert [(d.clients, d.start_s, d.end_s) for d in diffs] == [(("a", "b"), 0.0, 4.0)]
    # a is 200 ahead at 2.0 and b catches up 150 by 3.75: the spread is 200 (at 2.0, D = 200;
    # its lowest is 0 at the start).
    assert diffs[0].diff == approx(200.0)
    windows = window_differences(curves, backlog, window_s=1.0)
    # [0, 1]: a gets 50 at 0.5 and 50 at 1.0 (the window's end counts); [1, 2]: a is 50 ahead
    # before 1.0 and 200 at 2.0; [2, 3]: 150 ahead before, 200 at 2.0, 100 at 2.75; [3, 4]: 100
    # ahead before, level at 3.75.
    assert windows == approx({0: 100.0, 1: 150.0, 2: 100.0, 3: 100.0})
    assert full_windows(np.array([[0.5, 3.2], [4.0, 6.0]]), 1.0).tolist() == [1, 2, 4, 5]


def test_vtc_bound_and_service_ratio():
    assert vtc_bound(1.0, 2.0, longest_input=1000, batch_tokens=24576) == 2 * 2 * 24576
    assert vtc_bound(1.0, 2.0, longest_input=60000, batch_tokens=24576) == 2 * 60000
    assert vtc_bound(1.0, 2.0, 10, 100, min_client_weight=0.5) == 800
    a, b = curve([1.0, 2.0, 3.0], [20, 20, 20]), curve([1.5, 2.5], [10, 10])
    assert service_ratio(a, b, np.array([[0.0, 3.0]])) == 3.0
    assert service_ratio(a, b, np.array([[0.0, 1.2], [2.2, 3.0]])) == 4.0  # 40 against 10
    assert service_ratio(a, b, np.array([[0.0, 0.5]])) is None
    assert service_ratio(a, b, np.zeros((0, 2))) is None


def test_run_figures_cut_runs_censor_ttft_and_count_light_clients():
    records = [rec("heavy", 0.0, 4, [1.0, 2.0, 3.0], end=3.0),
               rec("heavy", 0.5, 4, [3.5], end=4.0, error="cut at 4 s"),
               rec("light", 1.0, 2, [1.5, 2.5], end=2.5),
               rec("light", 3.0, 2, [], end=4.0, error="cut at 4 s")]
    ttft = ttft_summary(records[2:], until_s=4.0)
    assert ttft["num_censored"] == 1 and ttft["count"] == 2
    assert ttft["max_ms"] == approx(1000.0)  # censored at 4.0 - 3.0
    f = run_figures(records, 4.0, input_weight=1.0, output_weight=2.0, weights=None,
                    window_s=1.0, bound=100.0, light_clients=["light"])
    assert f["num_requests"] == 4 and f["num_finished"] == 2
    assert f["output_tok_s"] == approx(6 / 4.0)
    assert f["service"] == {"heavy": (4 + 3 * 2) + (4 + 2), "light": 2 + 2 * 2}
    assert f["light_ttft"]["num_censored"] == 1
    assert f["service_curves"]["t_s"] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert f["service_curves"]["heavy"] == [0, 6, 8, 10, 16]
    assert f["max_backlogged_diff_vs_bound"] == f["max_backlogged_diff"] / 100.0
    assert f["worst_interval"]["clients"] == ["heavy", "light"]
    # Pending intervals hold the queued ones: the difference over them is never smaller.
    assert f["max_pending_diff"] >= f["max_backlogged_diff"] > 0
    # Both queued over [1, 1.5) and [3, 3.5): heavy gets 6 and 8, light 4 and 0.
    assert weighted_ratio(records, 4.0, "heavy", "light", input_weight=1.0,
                          output_weight=2.0) == approx(14 / 4)


# ---- workloads ---------------------------------------------------------------------------

def test_timed_arrivals_are_poisson_at_the_rates_and_only_while_on():
    times, owners = timed_arrivals([20.0, 40.0], 100.0, seed=3)
    assert np.all(np.diff(times) >= 0) and times.min() >= 0 and times.max() < 100.0
    counts = np.bincount(owners)
    assert counts[0] == approx(2000, rel=0.1) and counts[1] == approx(4000, rel=0.1)
    again, _ = timed_arrivals([20.0, 40.0], 100.0, seed=3)
    assert np.array_equal(times, again)
    pattern = OnOff(on_s=10.0, off_s=30.0, phase_s=5.0)
    t, o = timed_arrivals([20.0, 50.0], 100.0, seed=3, on_off=[None, pattern])
    assert np.array_equal(t[o == 0], times[owners == 0])  # a client's stream is its own
    on = t[o == 1]
    assert pattern.is_on(on).all() and ((on % 40.0 >= 5.0) & (on % 40.0 < 15.0)).all()
    assert on.size == approx(50.0 * 30.0, rel=0.1)  # on over [5, 15), [45, 55), [85, 95)
    assert pattern.duty == 0.25


def test_fair_shares_and_light_clients():
    assert fair_level([0.5, 0.2], [1, 1]) == float("inf")  # everyone fits
    assert fair_level([1.0, 2.0], [1, 1]) == approx(0.5)
    assert fair_level([0.75, 0.375, 0.1875, 0.1875], [1, 1, 1, 1]) == approx(0.3125)
    assert fair_level([1.0, 1.0], [2, 1]) == approx(1 / 3)
    mix = WORKLOADS["rates-4-2-1-1"]
    assert mix.light_clients(1.5) == ["client-2", "client-3"]
    assert mix.light_clients(3.0) == []
    assert WORKLOADS["rates-1-4"].light_clients(1.5) == ["client-0"]
    onoff = WORKLOADS["sharegpt-onoff-8"]
    rates = onoff.rates(12.0)
    duty = [c.on_off.duty if c.on_off else 1.0 for c in onoff.clients]
    assert sum(r * d for r, d in zip(rates, duty)) == approx(12.0)
    assert WORKLOADS["weighted-2-1"].weights_spec == "client-0=2,client-1=1"
    assert mix.weights_spec is None


def test_traces_have_the_workload_s_clients_lengths_and_rate():
    limits = LengthLimits(max_input_tokens=24, max_output_tokens=8)
    trace = build_trace(WORKLOADS["rates-1-2"], 30.0, 20.0, seed=1, limits=limits)
    clients = [c.client for c in trace.conversations]
    assert set(clients) == {"client-0", "client-1"}
    assert len(clients) == approx(600, rel=0.15)
    assert clients.count("client-1") == approx(2 * clients.count("client-0"), rel=0.25)
    assert all(c.turns[0].input_tokens == 24 and c.turns[0].output_tokens == 8
               for c in trace.conversations)
    assert len({c.turns[0].user for c in trace.conversations}) == len(clients)  # no shared text
    assert max(c.arrival_s for c in trace.conversations) < 20.0
    probe = probe_trace("sharegpt", 50, limits=limits)
    assert {c.arrival_s for c in probe.conversations} == {0.0}
    assert all(1 <= c.turns[0].output_tokens <= 8 and c.turns[0].input_tokens <= 24 + 4
               for c in probe.conversations)
    assert len({c.turns[0].user for c in probe.conversations}) == 50  # a tag each


# ---- timed runs and capacity ------------------------------------------------------------

class SlowSender:
    """A fake engine: one token every 0.05 s."""

    async def send(self, conv, turn, record, clock):
        record.prompt_tokens = 3
        for _ in range(conv.turns[turn].output_tokens):
            await asyncio.sleep(0.05)
            record.token_times_s.append(clock())
        record.end_s = clock()


def test_a_deadline_cuts_requests_in_flight_and_keeps_their_tokens():
    trace = Trace([Conversation("short", 0.0, [Turn("q", 2)]),
                   Conversation("long", 0.0, [Turn("q", 100)]),
                   Conversation("late", 0.5, [Turn("q", 2)])])
    result = asyncio.run(replay(trace, Deadline(SlowSender(), 0.3),
                                ReplayOptions(progress=False)))
    by_id = {r.conversation_id: r for r in result.records}
    assert by_id["short"].ok
    assert not by_id["long"].ok and by_id["long"].error.startswith("CutOff: cut at 0.3 s")
    assert 3 <= by_id["long"].output_tokens <= 6
    assert "not sent" in by_id["late"].error and by_id["late"].output_tokens == 0
    assert issubclass(CutOff, RuntimeError)


def test_capacity_is_output_tokens_per_second_over_the_mean_output():
    # 10 requests in flight, a token every 0.1 s among them: 10 tok/s; 4 tokens a request.
    records = [rec("p", 0.0, 1, np.arange(0.1, 6.0, 0.1)[i::10].round(6), rid=str(i))
               for i in range(10)]
    run = TimedRun(records, until_s=6.0, switch_metrics={})
    cap = capacity(run, num_sent_max=1000, mean_output_tokens=4.0, warmup_s=1.0)
    assert cap["window_end_s"] == 6.0 and cap["output_tok_s"] == approx(10.0, rel=0.05)
    assert cap["capacity_rps"] == approx(2.5, rel=0.05)
    dry = capacity(dataclasses.replace(run, records=records[:3] + [rec("p", 3.0, 1, [3.1])]),
                   num_sent_max=4, mean_output_tokens=4.0, warmup_s=1.0)
    assert dry["window_end_s"] == 3.0  # the loop sent its last request then
    with pytest.raises(ValueError, match="warm-up"):
        capacity(run, num_sent_max=1000, mean_output_tokens=4.0, warmup_s=7.0)


def test_a_capacity_file_compares_the_block_size_in_use(monkeypatch):
    """Files written before the block size could be left unset hold 16 in ``block_size``; an
    engine that leaves it unset with a bf16 cache uses 16 too, with fp8 32."""
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    import fairness_bench
    from fairswitch.cli.replay_args import config_json
    from fairswitch.config import EngineConfig

    old = {"cache": {"block_size": 16}, "scheduler": {"policy": "vtc"}}
    for dtype, size in (("auto", 16), ("fp8", 32)):
        ours = fairness_bench._comparable(config_json(EngineConfig.from_kwargs(
            kv_cache_dtype=dtype)))
        assert ours["cache"]["block_size"] == size and "tokens_per_block" not in ours["cache"]
    assert fairness_bench._comparable(old)["cache"] == {"block_size": 16}


# ---- the script, end to end ------------------------------------------------------------

def test_fairness_bench_end_to_end(tmp_path, monkeypatch, llama_dir, capsys):
    monkeypatch.syspath_prepend(str(BENCH_DIR))  # it imports its sibling scripts
    import fairness_bench

    engine = ["--model", str(llama_dir), "--load-format", "auto", "--device", "cpu",
              "--num-gpu-blocks", "64", "--swap-space", "0.05", "--max-num-seqs", "4",
              "--max-model-len", "128", "--max-input-tokens", "16", "--max-output-tokens", "8",
              "--no-progress", "--output-dir", str(tmp_path), "--plots-dir", str(tmp_path / "plots")]
    (cap,) = fairness_bench.main([*engine, "--capacity-only", "--workloads", "weighted-2-1",
                                  "--capacity-s", "1.5", "--capacity-warmup-s", "0.5",
                                  "--capacity-requests", "300", "--capacity-concurrency", "8"])
    cap_file = tmp_path / "fairness_capacity_synthetic.json"  # one file per length family
    assert json.loads(cap_file.read_text()) == cap
    rps = cap["figures"]["capacity_rps"]["synthetic"]
    assert rps > 0 and cap["claims"][0] == {"name": "capacity_rps_synthetic", "value": rps,
                                            "unit": "req/s"}

    (result,) = fairness_bench.main([*engine, "--workloads", "weighted-2-1", "--loads", "3",
                                     "--policies", "fcfs,vtc", "--duration-s", "1.5",
                                     "--window-s", "0.5", "--capacity-from"])
    out = tmp_path / "fairness_weighted-2-1_3x.json"
    assert json.loads(out.read_text()) == result
    figures = result["figures"]
    assert figures["offered_rps"] == approx(3 * rps) and figures["capacity_source"] == str(tmp_path)
    bound = figures["bound"]
    assert bound["batch_tokens"] == min(64 * 16, 4 * 128) and bound["min_client_weight"] == 1.0
    assert bound["value"] == vtc_bound(1.0, 2.0, bound["longest_input"], bound["batch_tokens"])
    rows = figures["policies"]
    assert set(rows) == {"fcfs", "vtc"}
    for row in rows.values():
        assert row["num_requests"] > 0 and row["output_tok_s"] > 0
        assert set(row["service"]) == {"client-0", "client-1"}
    claims = {c["name"]: c["value"] for c in result["claims"]}
    assert claims["vtc_max_backlogged_diff_vs_bound"] == rows["vtc"]["max_backlogged_diff_vs_bound"]
    assert claims["fcfs_max_backlogged_diff_vs_bound"] == \
        rows["fcfs"]["max_backlogged_diff_vs_bound"]
    assert claims["vtc_throughput_vs_fcfs"] == approx(rows["vtc"]["output_tok_s"]
                                                      / rows["fcfs"]["output_tok_s"])
    if rows["vtc"]["max_backlogged_diff"]:
        assert claims["vtc_service_diff_reduction_vs_fcfs"] == approx(
            rows["fcfs"]["max_backlogged_diff"] / rows["vtc"]["max_backlogged_diff"])
    ratio = claims["weighted_vtc_service_ratio"]
    assert claims["weighted_vtc_service_ratio_error"] == approx(abs(ratio / 2 - 1))
    plots = tmp_path / "plots" / "fairness_weighted-2-1_3x"
    assert sorted(p.name for p in plots.iterdir()) == ["fairness_weighted-2-1_3x_service.png",
                                                       "fairness_weighted-2-1_3x_window_diff.png"]
    assert "VTC's bound" in capsys.readouterr().out

    # A capacity measured with another engine configuration is refused.
    short = [*engine, "--workloads", "weighted-2-1", "--duration-s", "1"]  # should it run
    with pytest.raises(SystemExit):
        fairness_bench.main([*short, "--max-num-batched-tokens", "512",
                             "--capacity-from", str(cap_file)])
    with pytest.raises(SystemExit):  # the benchmark sets the policy itself
        fairness_bench.main([*short, "--policy", "vtc", "--capacity-rps", "1"])
    for given in (["--capacity-rps", "1"],  # one rate for two length families
                  ["--capacity-from"]):  # no capacity measured on ShareGPT lengths
        with pytest.raises(SystemExit):
            fairness_bench.main([*short, "--workloads", "rates-1-2,sharegpt-onoff-8", *given])
