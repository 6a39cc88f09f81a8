"""Smoke tests of the switch benchmarks at tiny CPU scale: each runs end to end and records its
claims; switch_bandwidth's fairswitch moves the same bytes as the baseline with far fewer copies,
tp_switch_bandwidth's ranks each move their share of the heads. No timing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from fairswitch.kv.kv_cache import KVLayout

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def test_switch_bandwidth_smoke(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    import switch_bandwidth

    out = tmp_path / "switch.json"
    switch_bandwidth.main(["--device", "cpu", "--layers", "2", "--kv-heads", "2", "--head-dim",
                           "32", "--requests", "4", "--min-tokens", "64", "--max-tokens", "512",
                           "--output", str(out)])
    result = json.loads(out.read_text())
    names = {c["name"] for c in result["claims"]}
    assert names == {"switch_bw_fraction_of_peak", "switch_bw_baseline_fraction_of_peak"}
    fast, base = result["figures"]["modes"]
    assert fast["bytes"] == base["bytes"] > 0
    assert fast["copies"] * 10 < base["copies"]
    assert fast["extents_after_swap_in"] == 4  # every request is back in one run of blocks


def test_tp_switch_bandwidth_smoke(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    import tp_switch_bandwidth

    out = tmp_path / "tp_switch.json"
    tp_switch_bandwidth.main(["--device", "cpu", "--tensor-parallel-size", "2", "--layers", "2",
                              "--kv-heads", "4", "--head-dim", "32", "--requests", "3",
                              "--min-tokens", "64", "--max-tokens", "256", "--output", str(out)])
    result = json.loads(out.read_text())
    claims = {c["name"]: c["value"] for c in result["claims"]}
    fraction = claims["tp_switch_bw_fraction_of_peak"]
    assert math.isfinite(fraction) and fraction > 0
    figures = result["figures"]
    ranks = [r["fairswitch"] for r in figures["ranks"]]
    assert [r["kv_heads"] for r in figures["ranks"]] == [2, 2]
    # One rank holding all 4 heads (float32 on the CPU) would move this much.
    blocks = sum(-(-n // 16) for n in figures["request_tokens"])
    all_heads = blocks * KVLayout(2, 16, 4, 32, torch.float32).block_bytes
    assert ranks[0]["bytes"] == ranks[1]["bytes"] == all_heads // 2 > 0
    assert figures["total"]["fairswitch"]["bytes"] == all_heads


def test_switch_stall_smoke(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    import switch_stall

    out = tmp_path / "stall.json"
    switch_stall.main(["--model", "fairswitch-tiny", "--device", "cpu", "--requests", "6",
                       "--min-prompt", "20", "--max-prompt", "60", "--output-tokens", "12",
                       "--max-num-seqs", "2", "--kv-cache-memory-gib", "0.05", "--swap-space",
                       "0.05", "--priority-update-prob", "0.3", "--modes",
                       "fairswitch,baseline,fairswitch-late", "--output", str(out)])
    result = json.loads(out.read_text())
    names = {c["name"] for c in result["claims"]}
    assert names == {"switch_stall_fraction", "switch_stall_fraction_baseline"}
    fast, base, late = result["figures"]["modes"]
    assert late["mode"] == "fairswitch-late"
    for r in (fast, base, late):
        assert r["output_tokens"] == 6 * 12
        assert r["preemptions_swap"] > 0 and 0 <= r["stall_fraction"] < 1
    assert base["block_size"] == 16 and base["swap_bytes_per_copy"] < fast["swap_bytes_per_copy"]


def test_duplex_switch_smoke(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    import duplex_switch

    out = tmp_path / "duplex.json"
    duplex_switch.main(["--device", "cpu", "--layers", "2", "--kv-heads", "2", "--head-dim",
                        "32", "--requests", "3", "--min-tokens", "64", "--max-tokens", "256",
                        "--repeats", "2", "--output", str(out)])
    result = json.loads(out.read_text())
    names = {c["name"] for c in result["claims"]}
    assert {"duplex_switch_bw_fraction_of_peak", "swap_in_latency_under_swap_out"} <= names
    duplex, single = result["figures"]["modes"]
    assert (duplex["mode"], single["mode"]) == ("duplex", "single-stream")
    assert duplex["bytes_each_way"] == single["bytes_each_way"] > 0
    assert set(result["figures"]["peak_bw"]) == {"out", "in", "both", "measured"}
