"""benchmarks/slo_bench.py at tiny CPU scale: one in-process run of a hand-built trace is recorded
with device/date/commit/command, the bench report as figures, and claims named after it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fairswitch.bench.trace import Conversation, Turn, write_trace

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def test_slo_bench_smoke(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH_DIR))  # it imports its sibling results_io
    import slo_bench

    trace = tmp_path / "t.jsonl"
    write_trace(trace, [Conversation(f"c{i}", 0.05 * i, [Turn(f"question {i}", 4)],
                                     client=f"u{i % 2}") for i in range(4)])
    out = tmp_path / "results" / "slo.json"
    returned = slo_bench.main(["--trace", str(trace), "--num-gpu-blocks", "64",
                               "--max-model-len", "128", "--swap-space", "0.05",
                               "--no-progress", "--ttft-slo-ms", "60000", "--output", str(out),
                               "--claim-prefix", "tiny_"])
    result = json.loads(out.read_text())
    assert result == returned
    assert all(isinstance(result[k], str) and result[k] for k in ("device", "date", "commit",
                                                                  "command"))
    assert result["figures"]["summary"]["completed"] == 4
    claims = {c["name"].removeprefix("tiny_"): c for c in result["claims"]}
    assert all(c["name"].startswith("tiny_") for c in result["claims"])  # --claim-prefix
    assert claims["slo_attainment"]["value"] == 1.0
    assert claims["ttft_p99_ms"]["unit"] == "ms" and claims["ttft_p99_ms"]["value"] > 0
    assert claims["output_tok_s"]["value"] > 0 and "jain_index" in claims


def test_compare_claims_are_ratios_against_the_baseline(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    import slo_bench

    def summary(ttft: float) -> dict:
        return {"ttft": {"p99_ms": ttft}, "tbt": {"p99_ms": None}, "output_throughput": 10.0}
    report = {"baseline": "baseline",
              "runs": {"full": {"summary": summary(50.0)}, "baseline": {"summary": summary(200.0)}},
              "ratios": {"full": {"P99 TTFT (ms)": 4.0, "P99 TBT (ms)": None,
                                  "P99.9 TBT (ms)": 6.0, "Output throughput (tok/s)": 1.0},
                         "baseline": {"P99 TTFT (ms)": 1.0, "P99 TBT (ms)": None,
                                      "P99.9 TBT (ms)": 1.0,
                                      "Output throughput (tok/s)": 1.0}}}
    claims = {c["name"]: (c["value"], c["unit"]) for c in slo_bench.claims(report)}
    assert claims == {"full_ttft_p99_ms": (50.0, "ms"), "baseline_ttft_p99_ms": (200.0, "ms"),
                      "full_output_tok_s": (10.0, "tok/s"),
                      "baseline_output_tok_s": (10.0, "tok/s"),
                      "full_p99_ttft_vs_baseline": (4.0, "x"),
                      "full_p999_tbt_vs_baseline": (6.0, "x"),
                      "full_output_tok_s_vs_baseline": (1.0, "x"),
                      # the headline names: full against baseline
                      "p99_ttft_speedup_vs_baseline": (4.0, "x"),
                      "p999_tbt_speedup_vs_baseline": (6.0, "x"),
                      "throughput_ratio_vs_baseline": (1.0, "x")}


def test_full_is_also_compared_with_each_ablation(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    import slo_bench

    def summary(ttft: float, tok_s: float) -> dict:
        return {"ttft": {"p99_ms": ttft}, "tbt": {"p99_ms": None}, "output_throughput": tok_s}
    report = {"baseline": "baseline",
              "runs": {"full": {"summary": summary(50.0, 30.0)},
                       "baseline": {"summary": summary(200.0, 10.0)},
                       "no-duplex": {"summary": summary(100.0, 20.0)}}}
    claims = {c["name"]: c["value"] for c in slo_bench.claims(report)}
    assert claims["full_p99_ttft_vs_no-duplex"] == 2.0
    assert claims["full_output_tok_s_vs_no-duplex"] == 1.5
    assert not any(name.startswith("full_") and name.endswith("_vs_full") for name in claims)


def test_fp8_kv_throughput_claim_when_full_and_full_fp8_are_compared(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    import slo_bench

    def summary(tok_s: float) -> dict:
        return {"ttft": {"p99_ms": 1.0}, "tbt": {"p99_ms": None}, "output_throughput": tok_s}
    report = {"baseline": "full",
              "runs": {"full": {"summary": summary(20.0)}, "full-fp8": {"summary": summary(33.0)}}}
    claims = {c["name"]: c["value"] for c in slo_bench.claims(report)}
    assert claims["fp8_kv_throughput_vs_bf16"] == 33.0 / 20.0
    report["runs"]["full"]["summary"] = summary(0.0)  # full finished nothing: no ratio, no crash
    assert "fp8_kv_throughput_vs_bf16" not in {c["name"] for c in slo_bench.claims(report)}


def test_an_output_that_cannot_be_written_is_refused_before_the_run(tmp_path, monkeypatch,
                                                                    capsys):
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    import load_sweep
    import slo_bench

    with pytest.raises(SystemExit):
        slo_bench.main(["--trace", "no-such-trace.jsonl", "--output", str(tmp_path)])
    with pytest.raises(SystemExit):
        load_sweep.main(["--trace", "no-such-trace.jsonl", "--compare", "full",
                         "--sweep", "time-scale=1", "--output", str(tmp_path)])
    assert capsys.readouterr().err.count("is a directory, not a file") == 2


def test_load_sweep_compares_engines_at_every_point(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    import load_sweep

    trace = tmp_path / "t.jsonl"
    write_trace(trace, [Conversation(f"c{i}", 0.05 * i, [Turn(f"question {i}", 4)],
                                     client=f"u{i % 2}") for i in range(4)])
    out = tmp_path / "sweep.json"
    engine = ["--trace", str(trace), "--num-gpu-blocks", "64", "--max-model-len", "128",
              "--swap-space", "0.05", "--no-progress", "--output", str(out)]
    common = [*engine, "--compare", "full,baseline"]
    result = load_sweep.main(["--sweep", "max-num-seqs=1,4", *common,
                              "--output-json", str(tmp_path / "report.json"),
                              "--step-log", str(tmp_path / "steps")])
    assert json.loads(out.read_text()) == result
    for value in ("1", "4"):  # each point's own report and step logs
        report = json.loads((tmp_path / f"report_max-num-seqs_{value}.json").read_text())
        assert report == result["figures"]["points"][value]
        for name in ("full", "baseline"):
            log = json.loads((tmp_path / "steps" / f"max-num-seqs_{value}" / f"{name}.json")
                             .read_text())
            seqs = log["columns"].index("seqs")
            assert log["rows"] and max(r[seqs] for r in log["rows"]) <= int(value)
    figures = result["figures"]
    assert figures["sweep"] == "max-num-seqs" and figures["values"] == ["1", "4"]
    for value in ("1", "4"):
        point = figures["points"][value]
        for name in ("full", "baseline"):
            run = point["runs"][name]
            assert run["summary"]["completed"] == 4
            assert run["engine_config"]["scheduler"]["max_num_seqs"] == int(value)
    claims = {c["name"]: c for c in result["claims"]}
    for value in ("1", "4"):
        claim = claims[f"throughput_ratio_vs_baseline@max-num-seqs={value}"]
        assert claim["unit"] == "x" and claim["value"] == \
            figures["points"][value]["ratios"]["full"]["Output throughput (tok/s)"]
    assert "Sweep of max-num-seqs" in capsys.readouterr().out

    for bad in ("max-num-seqs", "max-num-seqs=", "max-num-seqs=1,1", "output=x",
                "no-such-option=1", "max-num-seqs=zero"):
        with pytest.raises(SystemExit):
            load_sweep.main(["--sweep", bad, *common])
    with pytest.raises(SystemExit):  # nothing to compare at each point
        load_sweep.main(["--sweep", "max-num-seqs=1", *engine])
