"""Benchmark metrics against hand-computed values: latency percentiles, SLO attainment and goodput,
per-class/per-client splits, VTC service and fairness windows, the report tables, the plots."""

from __future__ import annotations

import json
import sys

import pytest

from fairswitch.bench.fairness import jain_index, service_windows
from fairswitch.bench.metrics import SLO, group_summary, latency_stats, summarize
from fairswitch.bench.plots import write_plots
from fairswitch.bench.records import RequestRecord
from fairswitch.bench.report import (comparison_ratios, compare, format_breakdown,
                                     format_failures, format_table, write_json)

approx = pytest.approx


def rec(rid, client, priority, arrival, prompt, tokens, end, error=None):
    return RequestRecord(request_id=rid, conversation_id=rid, turn=0, client=client,
                         priority=priority, arrival_s=arrival, prompt_tokens=prompt,
                         token_times_s=list(tokens), end_s=end, error=error)


def schedule():
    """A: TTFT 0.2, gaps 0.1 and 0.2 (misses a 0.15 s TBT target by one gap).
    B: TTFT 0.2, gap 0.1.  C: failed after one token.  D: one token, TTFT 0.1, no gaps."""
    return [
        rec("A", "a", 0, 0.0, 10, [0.2, 0.3, 0.5], 0.8),
        rec("B", "b", 1, 1.0, 4, [1.2, 1.3], 1.4),
        rec("C", "b", 1, 1.5, 5, [1.7], 1.9, error="stream cut"),
        rec("D", "b", 0, 2.0, 6, [2.1], 2.2),
    ]


def test_percentiles_interpolate_linearly_like_numpy():
    s = latency_stats([1.0, 2.0, 3.0, 4.0])  # seconds in, ms out
    assert s["count"] == 4
    assert s["mean_ms"] == approx(2500)
    assert s["median_ms"] == approx(2500)
    assert s["p90_ms"] == approx(3700)   # 1 + 0.9 * 3
    assert s["p99_ms"] == approx(3970)   # 1 + 0.99 * 3
    assert s["p999_ms"] == approx(3997)
    assert s["max_ms"] == approx(4000)
    assert latency_stats([])["p99_ms"] is None
    with pytest.raises(ValueError, match="finite"):
        latency_stats([1.0, float("nan")])


def test_counts_throughput_and_latency_stats():
    s = summarize(schedule())
    assert (s["num_requests"], s["completed"], s["failed"]) == (4, 3, 1)
    assert s["duration_s"] == approx(2.2)                  # first arrival to last end
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (20, 6)  # C excluded
    assert s["request_throughput"] == approx(3 / 2.2)
    assert s["output_throughput"] == approx(6 / 2.2)
    assert s["total_token_throughput"] == approx(26 / 2.2)
    assert s["ttft"]["count"] == 3 and s["ttft"]["mean_ms"] == approx(500 / 3)
    assert s["ttft"]["median_ms"] == approx(200)
    # TBT pools every gap of every successful request: A's 0.1, 0.2 and B's 0.1.
    assert s["tbt"]["count"] == 3
    assert s["tbt"]["median_ms"] == approx(100) and s["tbt"]["max_ms"] == approx(200)
    assert s["tbt"]["p99_ms"] == approx(198)               # 100 + 0.98 * 100
    # TPOT only for requests with two tokens or more: A 0.15, B 0.1.
    assert s["tpot"]["count"] == 2 and s["tpot"]["mean_ms"] == approx(125)
    assert s["e2el"]["count"] == 3 and s["e2el"]["median_ms"] == approx(400)
    assert s["e2el"]["mean_ms"] == approx(1400 / 3)
    assert summarize(schedule(), duration_s=4.0)["request_throughput"] == approx(0.75)


def test_slo_attainment_and_goodput():
    s = summarize(schedule(), slo=SLO(ttft_s=0.15, tbt_s=0.15))
    # TTFT <= 0.15: only D. TBT: B and D (A has one 0.2 gap; C failed). Both: D.
    assert s["slo_attainment"] == {"ttft": 0.25, "tbt": 0.5, "both": 0.25, "num_met": 1}
    assert s["goodput"] == approx(1 / 2.2)
    s = summarize(schedule(), slo=SLO(ttft_s=0.3, tbt_s=0.15))
    assert s["slo_attainment"] == {"ttft": 0.75, "tbt": 0.5, "both": 0.5, "num_met": 2}
    s = summarize(schedule(), slo=SLO(tbt_s=0.2))  # a gap equal to the target meets it
    assert s["slo_attainment"] == {"ttft": None, "tbt": 0.75, "both": 0.75, "num_met": 3}
    assert s["slo"] == {"ttft_s": None, "tbt_s": 0.2}
    # Turns never sent (their conversation's earlier turn failed) are misses: failing a turn
    # must not raise the attainment by dropping the turns after it from the count.
    s = summarize(schedule(), slo=SLO(tbt_s=0.2), unsent={(0, "a"): 2})
    assert s["slo_attainment"] == {"ttft": None, "tbt": 0.5, "both": 0.5, "num_met": 3}
    # ... in their priority's and client's attainment too (they were left out there), and a
    # group that sent nothing at all is reported.
    plain = summarize(schedule(), slo=SLO(tbt_s=0.2))
    for split, key in (("by_priority", "0"), ("by_client", "a")):
        group, before = s[split][key], plain[split][key]
        n = before["completed"] + before["failed"]
        assert group["slo_attainment"]["both"] == approx(
            before["slo_attainment"]["num_met"] / (n + 2))
    s = summarize(schedule(), slo=SLO(tbt_s=0.2), unsent={(5, "z"): 3})
    assert s["by_priority"]["5"]["slo_attainment"]["both"] == 0.0
    assert s["by_client"]["z"]["completed"] == 0
    plain = summarize(schedule())
    assert plain["slo"] is None and plain["goodput"] is None and plain["slo_attainment"] is None
    with pytest.raises(ValueError, match="ttft_s"):
        SLO(ttft_s=0.0)


def test_priority_and_client_splits():
    s = summarize(schedule(), slo=SLO(ttft_s=0.3, tbt_s=0.15))
    assert list(s["by_priority"]) == ["0", "1"] and list(s["by_client"]) == ["a", "b"]
    p0, p1 = s["by_priority"]["0"], s["by_priority"]["1"]
    assert (p0["completed"], p0["failed"], p1["completed"], p1["failed"]) == (2, 0, 1, 1)
    assert p0["ttft"]["median_ms"] == approx(150)          # A 0.2, D 0.1
    assert p0["slo_attainment"]["both"] == 0.5 and p1["slo_attainment"]["both"] == 0.5
    a, b = s["by_client"]["a"], s["by_client"]["b"]
    assert a["tbt"]["count"] == 2 and a["slo_attainment"]["both"] == 0.0
    assert (b["completed"], b["failed"]) == (2, 1)
    assert b["slo_attainment"]["both"] == approx(2 / 3)
    assert b["e2el"]["mean_ms"] == approx(300)             # B 0.4, D 0.2
    # Called alone, a group computes the same as its slice of summarize().
    assert group_summary(schedule()[1:], SLO(ttft_s=0.3, tbt_s=0.15)) == b


def test_service_per_client_with_weights_and_run_jain():
    # a: 10 + 2*3 = 16.  b: B 4 + 2*2, C 5 + 2*1 (tokens it received before failing), D 6 + 2*1.
    f = summarize(schedule())["fairness"]
    assert f["service"] == {"a": 16.0, "b": 23.0}
    assert f["jain"] == approx(39**2 / (2 * (16**2 + 23**2)))
    f = summarize(schedule(), weights={"b": 2.0})["fairness"]
    assert f["service"] == {"a": 16.0, "b": 11.5}
    assert f["weights"] == {"a": 1.0, "b": 2.0}
    assert f["jain"] == approx(27.5**2 / (2 * (16**2 + 11.5**2)))
    with pytest.raises(ValueError, match="weight of client 'b'"):
        summarize(schedule(), weights={"b": 0.0})


def windows_schedule():
    """Equal service over the run (8 each), unequal per 1 s window:

        window      [0,1)        [1,2)        [2,3)
        x backlog   4 (2+2)      2            2          arrival 0.0, end 2.5
        y backlog   8 (4+2+2)    -            -          arrival 0.2, end 0.9
        z           -            0 (backlog)  8          arrival 1.2, end 2.9
    """
    return [
        rec("x", "x", 0, 0.0, 2, [0.5, 1.5, 2.5], 2.5),
        rec("y", "y", 0, 0.2, 4, [0.6, 0.7], 0.9),
        rec("z", "z", 0, 1.2, 0, [2.2, 2.4, 2.6, 2.8], 2.9),
    ]


def test_backlogged_windows_and_max_service_difference():
    sw = service_windows(windows_schedule(), window_s=1.0)
    assert sw.clients == ["x", "y", "z"] and sw.num_windows == 3
    assert sw.service.tolist() == [[4, 2, 2], [8, 0, 0], [0, 0, 8]]
    assert sw.backlogged.tolist() == [[True, True, True], [True, False, False],
                                      [False, True, True]]
    f = summarize(windows_schedule(), window_s=1.0)["fairness"]
    assert f["jain"] == approx(1.0)
    assert [w["backlogged"] for w in f["windows"]] == [["x", "y"], ["x", "z"], ["x", "z"]]
    assert [w["max_service_diff"] for w in f["windows"]] == [4.0, 2.0, 6.0]
    assert f["max_service_diff"] == {"max": 6.0, "mean": 4.0, "num_windows": 3}
    window_jain = [0.9, 0.5, 100 / 136]                     # (sum)^2 / (n * sum of squares)
    assert [w["jain"] for w in f["windows"]] == approx(window_jain)
    assert f["window_jain"]["min"] == approx(0.5)
    assert f["window_jain"]["mean"] == approx(sum(window_jain) / 3)


def test_continuously_backlogged_windows():
    # The schedule above: x pending [0, 2.5), y [0.2, 0.9), z [1.2, 2.9); windows end 1, 2, 2.9.
    sw = service_windows(windows_schedule(), window_s=1.0)
    assert sw.continuous.tolist() == [[True, True, False], [False, False, False],
                                      [False, False, True]]
    f = summarize(windows_schedule(), window_s=1.0)["fairness"]
    assert f["max_service_diff_continuous"] == {"max": None, "mean": None, "num_windows": 0}
    # Two clients pending over the whole run (one of them through two back-to-back requests).
    records = [rec("a1", "a", 0, 0.0, 0, [0.1, 0.2], 1.0), rec("a2", "a", 0, 1.0, 0, [1.5], 2.0),
               rec("b", "b", 0, 0.0, 0, [0.5, 1.6, 1.7, 1.8], 2.0)]
    f = summarize(records, window_s=1.0)["fairness"]
    # service a: 4, 2; b: 2, 6 -> differences 2 and 4
    assert f["max_service_diff_continuous"] == {"max": 4.0, "mean": 3.0, "num_windows": 2}


def test_backlog_interval_is_half_open_and_lone_clients_have_no_difference():
    # x is done at 1.0 exactly, when y arrives: they are never backlogged in one window.
    records = [rec("x", "x", 0, 0.0, 1, [0.5], 1.0), rec("y", "y", 0, 1.0, 1, [1.5], 2.0)]
    f = summarize(records, window_s=1.0)["fairness"]
    assert [w["backlogged"] for w in f["windows"]] == [["x"], ["y"]]
    assert [w["max_service_diff"] for w in f["windows"]] == [None, None]
    assert f["max_service_diff"] == {"max": None, "mean": None, "num_windows": 0}
    assert [w["jain"] for w in f["windows"]] == [1.0, 1.0]  # one client is trivially fair


def test_jain_index():
    assert jain_index([5.0, 5.0, 5.0]) == approx(1.0)
    assert jain_index([9.0, 0.0, 0.0]) == approx(1 / 3)
    assert jain_index([1.0, 3.0]) == approx(16 / 20)
    assert jain_index([]) is None and jain_index([0.0, 0.0]) is None


def test_empty_and_all_failed_inputs_are_json_without_nan():
    s = summarize([], slo=SLO(ttft_s=1.0))
    assert (s["completed"], s["failed"], s["duration_s"]) == (0, 0, None)
    assert s["request_throughput"] is None
    assert s["ttft"]["count"] == 0 and s["ttft"]["p99_ms"] is None
    assert s["slo_attainment"]["both"] is None and s["goodput"] is None
    assert s["fairness"]["service"] == {} and s["fairness"]["jain"] is None
    json.dumps(s, allow_nan=False)
    failed = [rec("f", "a", 0, 0.0, 3, [], 1.0, error="timeout")]
    s = summarize(failed, slo=SLO(ttft_s=1.0))
    assert (s["completed"], s["failed"], s["request_throughput"]) == (0, 1, 0.0)
    assert s["tbt"]["max_ms"] is None and s["slo_attainment"]["both"] == 0.0
    assert s["fairness"]["service"] == {"a": 0.0} and s["fairness"]["jain"] is None
    json.dumps(s, allow_nan=False)
    with pytest.raises(ValueError, match="window_s"):
        summarize(schedule(), window_s=0)
    with pytest.raises(ValueError, match="duration_s"):
        summarize(schedule(), duration_s=-1.0)


def _row(label, value):
    return "{:<40} {:<10}".format(label, value).rstrip()


def test_table_rows_and_sections():
    s = summarize(schedule(), slo=SLO(ttft_s=0.3, tbt_s=0.15))
    table = format_table(s)
    lines = table.splitlines()
    assert lines[0] == "============ Serving Benchmark Result ============"
    for row in [_row("Successful requests:", 3), _row("Failed requests:", 1),
                _row("Benchmark duration (s):", "2.20"), _row("Total input tokens:", 20),
                _row("Total generated tokens:", 6), _row("Request throughput (req/s):", "1.36"),
                _row("Mean TTFT (ms):", "166.67"), _row("Median TTFT (ms):", "200.00"),
                _row("P99 TBT (ms):", "198.00"), _row("Mean TPOT (ms):", "125.00"),
                _row("Median E2EL (ms):", "400.00"), _row("Request goodput (req/s):", "0.91"),
                _row("SLO attainment TTFT (%):", "75.00"),
                _row("SLO attainment (all targets) (%):", "50.00")]:
        assert row in lines, row
    assert "---------------Time to First Token----------------" in lines
    assert any(line.startswith("Jain's index (service, run):") for line in lines)
    assert "Engine" not in table
    s["engine"] = {"preemptions_swap": 7, "switch_stall_s": 0.25}
    lines = format_table(s).splitlines()
    assert _row("preemptions_swap:", 7) in lines and _row("switch_stall_s:", "0.25") in lines
    assert _row("Mean TTFT (ms):", "n/a") in format_table(summarize([])).splitlines()


def test_breakdown_tables():
    s = summarize(schedule(), slo=SLO(ttft_s=0.3, tbt_s=0.15))
    by_client = format_breakdown(s, by="client").splitlines()
    assert by_client[0].split() == ["client", "ok", "fail", "TTFT", "p50", "TTFT", "p99", "TBT",
                                    "p99", "TBT", "p99.9", "E2EL", "p50", "SLO", "%", "service"]
    assert by_client[2].split()[:3] == ["a", "1", "0"] and by_client[2].split()[-1] == "16.0"
    assert by_client[3].split()[:3] == ["b", "2", "1"] and by_client[3].split()[-2] == "66.7"
    by_prio = format_breakdown(s, by="priority").splitlines()
    assert [line.split()[0] for line in by_prio[2:4]] == ["0", "1"]
    with pytest.raises(ValueError):
        format_breakdown(s, by="model")


def _scaled(records, k):
    return [rec(r.request_id, r.client, r.priority, r.arrival_s * k, r.prompt_tokens,
                [t * k for t in r.token_times_s], r.end_s * k, r.error) for r in records]


def test_failures_keep_each_error_and_the_report_counts_them():
    """A failed request was only counted: the summary now says which and why."""
    s = summarize(schedule())
    assert s["failures"] == [{"request_id": "C", "conversation_id": "C", "turn": 0,
                              "error": "stream cut"}]
    assert summarize([rec("E", "b", 0, 0.0, 5, [], 0.1)])["failures"][0]["error"] == "no tokens"
    errors = [{"error": e} for e in ["ValueError: too long"] * 3 + ["boom"] + [f"e{i}" for i in
                                                                            range(6)]]
    lines = format_failures(errors, max_lines=3).splitlines()
    assert lines[:2] == ["     3 x ValueError: too long", "     1 x boom"]
    assert len(lines) == 4 and lines[-1].endswith("... and 5 other errors")
    assert format_failures([{"error": "x" * 500 + "\nsecond line"}], width=40) == \
        "     1 x " + "x" * 37 + "..."


def test_compare_ratios():
    slo = SLO(ttft_s=10.0)
    runs = {"vllm": summarize(schedule(), slo=slo),
            "fast": summarize(_scaled(schedule(), 0.5), slo=slo)}
    ratios = comparison_ratios(runs, "vllm")
    assert set(ratios["vllm"].values()) == {1.0}
    # Every latency halves and the duration halves: all ratios are 2 (better) either way round.
    assert ratios["fast"] == approx(dict.fromkeys(ratios["fast"], 2.0))
    json.dumps(ratios, allow_nan=False)
    text = compare(runs, "vllm")
    assert "P99.9 TTFT (ms)" in text and "2.00x" in text and "baseline: vllm" in text
    runs["none"] = summarize(schedule())  # no SLO: no goodput to compare
    assert comparison_ratios(runs, "vllm")["none"]["Goodput (req/s)"] is None
    with pytest.raises(KeyError, match="baseline"):
        comparison_ratios(runs, "sglang")


def test_write_json_is_atomic_and_refuses_nan(tmp_path):
    path = tmp_path / "sub" / "result.json"
    write_json(path, {"a": 1, "b": None})
    assert json.loads(path.read_text()) == {"a": 1, "b": None}
    with pytest.raises(ValueError):
        write_json(path, {"a": float("nan")})
    assert json.loads(path.read_text()) == {"a": 1, "b": None}  # the old file survives
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]  # no temp file left


def test_write_plots_makes_pngs(tmp_path):
    runs = {"base": schedule(), "fast": _scaled(schedule(), 0.5), "empty": []}
    paths = write_plots(runs, tmp_path / "plots", "demo", window_s=0.5)
    assert [p.name for p in paths] == [f"demo_{n}.png" for n in ("ttft_cdf", "tbt_cdf", "ttft_time",
                                                                  "tbt_time", "service")]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_write_plots_names_the_extra_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"fairswitch\[plots\]"):
        write_plots({"base": schedule()}, tmp_path, "demo")


def test_scraped_metrics_carry_the_engines_switch_metrics(monkeypatch):
    """Every counter and gauge that HTTP runs read from /metrics renders the engine's value
    under the key ``Engine.switch_metrics()`` uses, so both kinds of run report the same."""
    from fairswitch import LLM, SamplingParams
    from fairswitch.bench import scrape
    from fairswitch.server.metrics import ServerMetrics, engine_snapshot

    llm = LLM(num_gpu_blocks=32, block_size=4, max_model_len=64, swap_space=0.01)
    llm.generate(["scrape me"], SamplingParams(max_tokens=3, ignore_eos=True))
    from fairswitch.engine.gc_control import GC_CLOCK
    from fairswitch.runner.jit_watch import JIT_CLOCK

    # distinct values, so that two counters swapped in the rendering would show
    monkeypatch.setattr(GC_CLOCK, "total_s", 1.25)
    monkeypatch.setattr(JIT_CLOCK, "total_s", 2.5)
    snapshot = engine_snapshot(llm.engine)
    assert snapshot["gc_pause_s"] == 1.25 and snapshot["kernel_compile_s"] == 2.5
    keys = set(scrape.COUNTERS.values()) | set(scrape.GAUGES.values())
    for prefix in ("fairswitch:", "vllm:"):  # (--metrics-prefix)
        text = ServerMetrics("m", prefix).render(snapshot)
        assert f"\n{prefix}num_requests_waiting{{" in text
        assert all(line.startswith(prefix) for line in text.splitlines()
                   if line and not line.startswith("#"))
        scraped = scrape.switch_metrics(text)
        assert keys <= scraped.keys()
        for key in keys:
            assert scraped[key] == pytest.approx(snapshot[key]), key


def test_a_runs_copy_times_are_its_own():
    """The swap copies' busy and queued seconds are totals since start-up, as the other
    counters: a run's figures used to include every earlier run's on the same engine (and an
    HTTP run, scraping /metrics, did not get them at all)."""
    from fairswitch.bench import scrape
    from fairswitch.bench.runner import counter_growth

    keys = ("swap_busy_s_out", "swap_busy_s_in", "swap_queued_s_out", "swap_queued_s_in")
    assert set(keys) <= set(scrape.COUNTERS.values())
    grown = counter_growth({k: 5.0 for k in keys}, {k: 7.0 for k in keys})
    assert all(grown[k] == 2.0 for k in keys)
