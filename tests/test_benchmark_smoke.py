"""Smoke test of benchmarks/throughput.py at tiny CPU scale: it runs end to end, both engines produce
exactly the requested tokens, and the recorded JSON carries what a claim needs. No timing checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def test_throughput_smoke(tmp_path, monkeypatch):
    # The script imports its sibling results_io as a top-level module, as when run directly.
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    import throughput
    from fairswitch.model.default_model import default_model_dir
    from fairswitch.model.loader import load_tokenizer

    out = tmp_path / "results" / "throughput.json"
    argv = ["--model", "fairswitch-tiny", "--device", "cpu", "--num-prompts", "8",
            "--max-prompt-len", "64", "--max-output-len", "16", "--hf-batch-size", "4",
            "--disable-tqdm", "--output", str(out)]
    returned = throughput.main(argv)

    result = json.loads(out.read_text())
    assert result == returned
    for key in ("device", "date", "commit", "command"):
        assert isinstance(result[key], str) and result[key]
    assert result["device"].startswith("cpu: ")
    claims = {c["name"]: c for c in result["claims"]}
    assert set(claims) == {"throughput_vs_transformers", "fairswitch_output_tok_s",
                           "transformers_output_tok_s"}
    assert claims["throughput_vs_transformers"]["unit"] == "x"
    assert all(c["value"] > 0 for c in claims.values())

    # The same seeded workload, rebuilt: each engine must have produced exactly its tokens.
    workload = throughput.sample_workload(load_tokenizer(default_model_dir()), 8, 64, 16, seed=0,
                                          trace=str(throughput.DEFAULT_PAIRS_TRACE))
    assert len(workload) == 8
    assert all(4 <= len(p) <= 64 and 4 <= n <= 16 for p, n in workload)
    wanted_out = sum(n for _, n in workload)
    wanted_prompt = sum(len(p) for p, _ in workload)
    figures = result["figures"]
    for engine in ("fairswitch", "transformers"):
        f = figures[engine]
        assert f["num_requests"] == 8
        assert f["output_tokens"] == wanted_out
        assert f["prompt_tokens"] == wanted_prompt
        assert all(f[k] > 0 for k in ("elapsed_s", "requests_per_s", "output_tok_s",
                                       "total_tok_s"))
    # Static batches generate up to their longest request: never less than what was asked.
    assert figures["transformers"]["generated_tokens_incl_padding"] >= wanted_out
    assert figures["comparison"] == "same requests"


def test_gc_pause_smoke(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    import gc

    import gc_pause

    out = tmp_path / "gc_pause.json"
    result = gc_pause.main(["--model", "fairswitch-tiny", "--device", "cpu", "--requests", "4",
                            "--prompt-tokens", "16", "--output-tokens", "4", "--max-model-len",
                            "128", "--repeats", "2", "--output", str(out)])
    assert json.loads(out.read_text()) == result
    assert gc.get_freeze_count() == 0  # the benchmark leaves nothing frozen behind
    f = result["figures"]
    assert f["frozen_objects"] > f["serving_objects"] > 0 and f["startup_objects"] > 0
    claims = {c["name"]: c["value"] for c in result["claims"]}
    assert set(claims) == {"gc_full_collection_ms", "gc_full_collection_ms_frozen",
                           "gc_pause_reduction_frozen"}
    assert claims["gc_pause_reduction_frozen"] == pytest.approx(
        claims["gc_full_collection_ms"] / claims["gc_full_collection_ms_frozen"])


def test_async_overhead_smoke(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    import async_overhead

    out = tmp_path / "async_overhead.json"
    result = async_overhead.main(["--model", "fairswitch-tiny", "--device", "cpu", "--requests",
                                  "2,3", "--prompt-tokens", "8", "--output-tokens", "6",
                                  "--rounds", "1", "--max-model-len", "128",
                                  "--kv-cache-memory-gib", "0.01", "--output", str(out)])
    assert json.loads(out.read_text()) == result
    rows = result["figures"]["rows"]
    assert [r["batch"] for r in rows] == [2, 3]
    for r in rows:
        # 6 tokens each: after the prompt step, 5 decode steps of the whole batch, so 4 periods
        # between their starts; streamed, an add may miss the first step (adds travel to the
        # engine thread), or two with async scheduling (the step in flight and the one launched
        # behind it), which leaves 3 or 2.
        assert r["direct"]["steps"] == 4
        assert r["async"]["steps"] in (2, 3, 4) and r["http"]["steps"] in (2, 3, 4)
    claims = {c["name"]: c["value"] for c in result["claims"]}
    for mode in ("async", "http"):
        assert claims[f"{mode}_step_overhead_b3"] == pytest.approx(
            claims[f"{mode}_decode_step_ms_b3"] / claims["direct_decode_step_ms_b3"])
    with pytest.raises(SystemExit):
        async_overhead.main(["--requests", "2,x", "--output", str(out)])
