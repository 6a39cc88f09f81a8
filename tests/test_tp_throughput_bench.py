"""Smoke test of benchmarks/tp_throughput.py on the CPU (gloo): TP=1 and TP=2 run the same requests
end to end and the results carry the scaling claim; bad --tp-sizes fail before anything runs. No
timing checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def tp_throughput(monkeypatch):
    # The script imports its siblings (throughput, results_io) as top-level modules.
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    import tp_throughput

    return tp_throughput


@pytest.fixture
def pairs_trace(tmp_path) -> Path:
    words = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "and",
             "keeps", "running", "far", "away"]
    path = tmp_path / "pairs.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(8):
            prompt = " ".join(words[:6 + i])
            output = " ".join(reversed(words[:5 + i]))
            f.write(json.dumps({"prompt": prompt, "output": output}) + "\n")
    return path


def test_tp1_and_tp2_same_requests(tp_throughput, llama_dir, pairs_trace, tmp_path):
    out = tmp_path / "tp_throughput.json"
    result = tp_throughput.main([
        "--model", str(llama_dir), "--device", "cpu", "--tp-sizes", "1,2", "--num-prompts", "4",
        "--trace", str(pairs_trace), "--max-prompt-len", "16", "--max-output-len", "6",
        "--num-gpu-blocks", "64", "--swap-space", "0", "--disable-tqdm", "--output", str(out)])

    assert json.loads(out.read_text()) == result
    claims = {c["name"]: c for c in result["claims"]}
    assert set(claims) == {"tp2_throughput_vs_tp1", "tp1_output_tok_s", "tp2_output_tok_s"}
    ratio = claims["tp2_throughput_vs_tp1"]
    assert ratio["unit"] == "x"
    assert ratio["value"] > 0 and math.isfinite(ratio["value"])
    assert ratio["value"] == pytest.approx(claims["tp2_output_tok_s"]["value"]
                                           / claims["tp1_output_tok_s"]["value"])

    runs = result["figures"]["runs"]
    assert [r["tensor_parallel_size"] for r in runs] == [1, 2]
    assert all(r["num_requests"] == 4 for r in runs)
    assert runs[0]["output_tokens"] == runs[1]["output_tokens"] > 0
    assert runs[0]["prompt_tokens"] == runs[1]["prompt_tokens"] > 0
    assert result["figures"]["workload"]["num_prompts"] == 4


@pytest.mark.parametrize("sizes, message", [
    ("2,4", "must include 1"), ("1,x", "comma-separated integers"), ("0,1", ">= 1")])
def test_bad_tp_sizes_fail_before_running(tp_throughput, tmp_path, capsys, sizes, message):
    out = tmp_path / "never.json"
    with pytest.raises(SystemExit) as exc:
        tp_throughput.main(["--model", "fairswitch-tiny", "--device", "cpu", "--tp-sizes", sizes,
                            "--output", str(out)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_tensor_parallel_size_is_set_by_the_benchmark(tp_throughput, tmp_path, capsys):
    with pytest.raises(SystemExit):
        tp_throughput.main(["--model", "fairswitch-tiny", "--device", "cpu",
                            "--tensor-parallel-size", "2", "--output", str(tmp_path / "x.json")])
    assert "--tensor-parallel-size: set by this benchmark" in capsys.readouterr().err


def test_size_the_heads_do_not_divide_fails_before_running(tp_throughput, tmp_path, capsys):
    # fairswitch-tiny has 6 attention heads: 4 ranks cannot split them.
    with pytest.raises(SystemExit):
        tp_throughput.main(["--model", "fairswitch-tiny", "--device", "cpu", "--tp-sizes", "1,4",
                            "--output", str(tmp_path / "x.json")])
    assert "TP=4" in capsys.readouterr().err
