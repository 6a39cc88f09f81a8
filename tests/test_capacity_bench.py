"""benchmarks/capacity.py: the bisection on a fake probe, the claims, and one tiny CPU run of
every default configuration (full-fp8 included) recorded as a results file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fairswitch.bench.ablations import ablation_config, parse_names
from fairswitch.config import EngineConfig

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
TINY_TRACE = Path(__file__).resolve().parents[1] / "workloads" / "traces" / "tiny.jsonl"


@pytest.fixture
def capacity(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH_DIR))  # it imports its sibling results_io
    import capacity
    return capacity


@pytest.mark.parametrize("threshold", [1.3, 2.0, 7.77, 15.9])
def test_bisection_brackets_the_threshold(capacity, threshold):
    seen = []

    def probe(load):
        seen.append(load)
        return {"load_conv_s": load, "pass": load <= threshold}
    cap, bracketed, probes = capacity.bisect_capacity(probe, 1.0, 16.0, 5)
    assert bracketed and [p["load_conv_s"] for p in probes] == seen
    assert cap <= threshold < cap + (16.0 - 1.0) / 2 ** 5
    # --high first, then the midpoints; --low only when no midpoint passed
    assert seen[0] == 16.0 and len(seen) == (7 if cap == 1.0 else 6)
    assert (1.0 in seen) == (cap == 1.0)


def test_bisection_outside_the_bracket(capacity):
    def fake(threshold):
        return lambda load: {"load_conv_s": load, "pass": load <= threshold}
    cap, bracketed, probes = capacity.bisect_capacity(fake(0.5), 1.0, 16.0, 5)
    assert (cap, bracketed, probes[-1]["load_conv_s"], len(probes)) == (None, True, 1.0, 7)
    cap, bracketed, probes = capacity.bisect_capacity(fake(20.0), 1.0, 16.0, 5)
    assert (cap, bracketed, len(probes)) == (16.0, False, 1)
    with pytest.raises(ValueError):
        capacity.bisect_capacity(fake(1.0), 2.0, 1.0, 3)


@pytest.mark.parametrize("threshold, cap, loads", [
    (20.0, 19.9375, [16.0, 19.0, 22.0, 20.5, 19.75, 20.125, 19.9375]),  # moved up twice
    # every midpoint fails: the moved bracket's low end (19) passed already, not probed again
    (19.05, 19.0, [16.0, 19.0, 22.0, 20.5, 19.75, 19.375, 19.1875]),
    (40.0, 22.0, [16.0, 19.0, 22.0]),  # still passing after two moves: a lower bound
])
def test_bracket_moves_up_while_high_passes(capacity, threshold, cap, loads):
    def probe(load):
        return {"load_conv_s": load, "pass": load <= threshold}
    got, bracketed, probes = capacity.bisect_capacity(probe, 13.0, 16.0, 4, grow=2)
    assert [p["load_conv_s"] for p in probes] == loads
    assert got == cap and bracketed == (threshold < 22.0)


def test_claims_are_capacity_ratios(capacity):
    claims = {c["name"]: c["value"] for c in capacity.claims(
        {"full": 8.0, "full-fp8": 12.0, "baseline": 2.0})}
    assert claims["capacity_at_slo_vs_baseline"] == 4.0
    assert claims["capacity_at_slo_fp8_vs_bf16"] == 1.5
    assert claims["baseline_capacity_conv_s"] == 2.0
    assert "capacity_at_slo_vs_baseline" not in {  # no capacity: no ratio
        c["name"] for c in capacity.claims({"full": 8.0, "baseline": None})}


def test_full_fp8_is_a_configuration():
    assert parse_names("full,full-fp8,baseline") == ["full", "full-fp8", "baseline"]
    base = EngineConfig()
    assert ablation_config("full-fp8", base).cache.kv_cache_dtype == "fp8"
    assert ablation_config("full", base).cache.kv_cache_dtype == base.cache.kv_cache_dtype


@pytest.mark.parametrize("option", [["--request-rate", "3"], ["--max-concurrency", "4"]])
def test_options_that_would_set_the_arrivals_are_refused(capacity, option, capsys):
    with pytest.raises(SystemExit):
        capacity.main(["--trace", str(TINY_TRACE), *option])
    assert "the load scales the trace's own arrivals" in capsys.readouterr().err


@pytest.mark.parametrize("option,message", [
    (["--window-s", "0"], "--window-s must be finite and > 0"),
    (["--temperature", "-1"], "--temperature"),
    (["--output", "."], "is a directory, not a file"),
    (["--tbt-slo-ms", "100"], "give --tpot-slo-ms, not --tbt-slo-ms")])
def test_options_a_probe_would_refuse_are_refused_before_any(capacity, option, message, capsys):
    """They failed after the first probe's replay, or (--output) after every probe."""
    with pytest.raises(SystemExit):
        capacity.main(["--trace", "no-such-trace.jsonl", *option])
    assert message in capsys.readouterr().err


def test_capacity_smoke(capacity, tmp_path):
    out = tmp_path / "results" / "capacity.json"
    returned = capacity.main([
        "--trace", str(TINY_TRACE), "--device", "cpu", "--num-gpu-blocks", "64",
        "--max-model-len", "256", "--swap-space", "0.05", "--no-progress",
        "--warmup-requests", "0", "--low", "4", "--high", "40", "--steps", "2", "--grow", "0",
        "--ttft-slo-ms", "60000", "--tpot-slo-ms", "10000", "--output", str(out)])
    result = json.loads(out.read_text())
    assert result == returned
    assert all(isinstance(result[k], str) and result[k] for k in ("device", "date", "commit",
                                                                  "command"))
    configs = result["figures"]["configs"]
    assert list(configs) == ["full", "full-fp8", "baseline"]
    for run in configs.values():  # generous SLOs: the highest load passes
        assert run["capacity_conv_s"] == 40.0 and not run["bracketed"]
        assert [p["load_conv_s"] for p in run["probes"]] == [40.0]
        assert all(p["pass"] and p["ttft_p99_ms"] > 0 and p["stopped"] is None
                   for p in run["probes"])
        assert set(run["by_priority_at_capacity"]) == {"0", "1"}
    assert result["claims"] == []  # bounds only: no capacity, no ratio claimed
    plot = result["figures"]["plot"]  # beside the results file, None without matplotlib
    assert plot is None or Path(plot) == tmp_path / "results/plots/capacity/capacity.png"


def test_a_probe_that_misses_its_target_stops_early(capacity, tmp_path):
    """A TTFT target no CPU run can meet: every probe is stopped once its P99 is certainly over
    it (the engine aborts the requests in flight), and nothing passes."""
    out = tmp_path / "capacity.json"
    capacity.main([
        "--trace", str(TINY_TRACE), "--device", "cpu", "--num-gpu-blocks", "64",
        "--max-model-len", "256", "--swap-space", "0.05", "--no-progress",
        "--warmup-requests", "0", "--configs", "full", "--low", "4", "--high", "40",
        "--steps", "1", "--ttft-slo-ms", "0.001", "--output", str(out)])
    run = json.loads(out.read_text())["figures"]["configs"]["full"]
    assert run["capacity_conv_s"] is None
    assert [p["load_conv_s"] for p in run["probes"]] == [40.0, 22.0, 4.0]
    for p in run["probes"]:
        assert not p["pass"] and "over the TTFT target of 0.001 ms" in p["stopped"]


def test_a_configuration_can_have_its_own_bracket(capacity, tmp_path):
    """--bracket: fp8 and bf16 capacities lie ~2x apart, so one bracket for both spent most of
    a GPU run on probes far from one of them."""
    out = tmp_path / "capacity.json"
    capacity.main([
        "--trace", str(TINY_TRACE), "--device", "cpu", "--num-gpu-blocks", "64",
        "--max-model-len", "256", "--swap-space", "0.05", "--no-progress",
        "--warmup-requests", "0", "--configs", "full,baseline", "--low", "4", "--high", "40",
        "--bracket", "baseline=2:8", "--steps", "1", "--grow", "0",
        "--ttft-slo-ms", "60000", "--tpot-slo-ms", "10000", "--output", str(out)])
    configs = json.loads(out.read_text())["figures"]["configs"]
    assert [p["load_conv_s"] for p in configs["full"]["probes"]] == [40.0]
    assert [p["load_conv_s"] for p in configs["baseline"]["probes"]] == [8.0]
    assert configs["baseline"]["bracket"] == [2.0, 8.0]
    assert configs["full"]["resolution_conv_s"] == 18.0


@pytest.mark.parametrize("spec,message", [
    ("full=5", "expected CONFIG=LOW:HIGH"), ("full=6:5", "0 < LOW < HIGH"),
    ("full=a:b", "expected CONFIG"), ("fp8=1:2", "'fp8' is not one of --configs"),
    ("full=0:inf", "0 < LOW < HIGH")])
def test_a_bad_bracket_is_refused_before_any_probe(capacity, spec, message, capsys):
    with pytest.raises(SystemExit):
        capacity.main(["--trace", "no-such-trace.jsonl", "--configs", "full,baseline",
                       "--bracket", spec])
    assert message in capsys.readouterr().err


def test_a_configuration_has_one_bracket(capacity):
    with pytest.raises(ValueError, match="has a bracket already"):
        capacity.parse_brackets(["full=1:2", "full=3:4"], ["full"], 1.0, 2.0)
