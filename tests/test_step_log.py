"""The engine's step log: one row per step that ran a batch, consistent with the engine's own
counters, written as columns + rows JSON."""

import json
import os
import subprocess
import sys

import pytest

from fairswitch import LLM, SamplingParams
from fairswitch.engine.step_log import COLUMNS, StepLog


def test_step_log_rows_match_the_engine(tmp_path):
    # 24 blocks of 4 tokens for 6 requests of ~40 tokens: memory preemptions happen.
    llm = LLM(num_gpu_blocks=24, block_size=4, max_model_len=96, swap_space=0.01,
              enable_prefix_caching=True)
    engine = llm.engine
    engine.step_log = log = StepLog()
    for i in range(6):
        engine.add_request(f"prompt {i} " * 8, SamplingParams(max_tokens=30, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    col = {name: i for i, name in enumerate(COLUMNS)}
    rows = log.rows
    assert rows and all(len(r) == len(COLUMNS) for r in rows)
    assert len(rows) == engine.stats.num_steps
    assert sum(r[col["preempted"]] for r in rows) == engine.scheduler.num_preemptions > 0
    assert rows[-1][col["rank_total"]] == engine.scheduler.num_rank_preemptions
    assert all(0 <= r[col["free"]] <= 24 and r[col["seqs"]] >= 1 for r in rows)
    assert all(r[col["prefill"]] <= r[col["tokens"]] for r in rows)
    times = [r[col["t_s"]] for r in rows]
    assert times == sorted(times) and all(r[col["step_s"]] >= r[col["sched_s"]] >= 0
                                          for r in rows)
    assert all(r[col["exec_s"]] > 0 and r[col["sched_s"]] + r[col["exec_s"]]
               <= r[col["step_s"]] + 1e-5 and r[col["cpu_s"]] > 0 for r in rows)
    assert all(0 <= r[col["gc_s"]] <= r[col["step_s"]] + 1e-5 for r in rows)
    # CPU time spans all threads (torch's intra-op pool on CPU): bounded by wall x cores.
    cores = os.cpu_count() or 1
    assert all(r[col["cpu_s"]] <= r[col["step_s"]] * cores + 0.01 for r in rows)

    data = json.loads(log.write(tmp_path / "a" / "full.json").read_text())
    assert data["columns"] == list(COLUMNS) and data["rows"] == [list(r) for r in rows]
    assert data["num_dropped"] == 0


def test_step_log_stops_at_its_bound():
    llm = LLM(num_gpu_blocks=32, block_size=4, max_model_len=64)
    engine = llm.engine
    engine.step_log = log = StepLog(max_rows=3)
    engine.add_request("hello there", SamplingParams(max_tokens=8, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    assert len(log.rows) == 3 and log.num_dropped == engine.stats.num_steps - 3
    with pytest.raises(ValueError, match="max_rows"):
        StepLog(max_rows=0)


def _log(rows: list[dict], num_blocks: int | None = 100) -> dict:
    base = dict.fromkeys(COLUMNS, 0)
    return {"columns": list(COLUMNS), "rows": [[{**base, **r}[c] for c in COLUMNS] for r in rows],
            "meta": {"num_gpu_blocks": num_blocks} if num_blocks else {}, "num_dropped": 0}


def test_step_summary_and_windows_by_hand():
    from fairswitch.bench.step_report import format_windows, step_windows, summarize_steps

    log = _log([
        dict(t_s=0.0, step_s=0.010, sched_s=0.001, seqs=4, tokens=4, running=4, free=50),
        dict(t_s=0.5, step_s=0.030, sched_s=0.002, seqs=3, tokens=40, prefill=38, running=3,
             waiting=2, free=5, preempted=1, gc_s=0.012),
        dict(t_s=1.2, step_s=0.020, sched_s=0.001, seqs=2, tokens=2, running=2, swapped=1,
             free=4, preempted=2),
    ])
    s = summarize_steps(log, full_fraction=0.05)
    assert s["num_steps"] == 3 and s["span_s"] == pytest.approx(1.22)
    assert s["busy_s"] == pytest.approx(0.06) and s["schedule_s"] == pytest.approx(0.004)
    assert s["gc_s"] == pytest.approx(0.012) and s["gc_max_s"] == pytest.approx(0.012)
    assert s["decode_steps"] == {"count": 2, "mean_ms": pytest.approx(15.0),
                                 "total_s": pytest.approx(0.03), "mean_seqs": 3.0}
    assert s["prompt_steps"] == {"count": 1, "mean_ms": pytest.approx(30.0),
                                 "total_s": pytest.approx(0.03), "prompt_tokens": 38}
    assert s["preempted"] == 3 and s["min_free_blocks"] == 4 and s["max_waiting"] == 2
    # free <= 5 of 100 blocks: the last two steps
    assert s["cache_full_steps"] == 2 and s["cache_full_s"] == pytest.approx(0.05)
    assert "cache_full_s" not in summarize_steps(_log([dict(seqs=1)], num_blocks=None))
    w = step_windows(log, window_s=1.0)
    assert [r["start_s"] for r in w] == [0.0, 1.0]
    assert w[0]["steps"] == 2 and w[0]["running"] == 3.5 and w[0]["tok_s"] == 7.0
    assert w[0]["step_ms"] == pytest.approx(20.0) and w[1]["preempted"] == 2
    half = step_windows(log, window_s=0.5)  # (printed as 0, 0, 1: whole seconds)
    assert [line.split()[0] for line in format_windows(half).splitlines()[2:]] == [
        "0.00", "0.50", "1.00"]
    assert summarize_steps(_log([]))["num_steps"] == 0 and step_windows(_log([])) == []
    with pytest.raises(ValueError):
        step_windows(log, 0)
    with pytest.raises(ValueError):
        summarize_steps(log, 1.0)


def test_steps_cli_reads_an_engine_log_and_refuses_bad_files(tmp_path, capsys):
    from fairswitch.cli.main import main

    llm = LLM(num_gpu_blocks=24, block_size=4, max_model_len=96, swap_space=0.01)
    engine = llm.engine
    engine.step_log = StepLog(meta={"num_gpu_blocks": 24})
    for i in range(4):
        engine.add_request(f"prompt {i} " * 8, SamplingParams(max_tokens=20, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    path = engine.step_log.write(tmp_path / "full.json")
    out_json = tmp_path / "report.json"
    assert main(["steps", str(path), "--window-s", "0.5", "--output-json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    assert "full:" in printed and "KV cache full" in printed and "ms/step" in printed
    report = json.loads(out_json.read_text())["full"]
    assert report["summary"]["num_steps"] == engine.stats.num_steps
    assert report["summary"]["preempted"] == engine.scheduler.num_preemptions

    # A log written before exec_s, cpu_s and gc_s existed is still read; its summary has no
    # model time.
    old = json.loads(path.read_text())
    keep = [i for i, name in enumerate(old["columns"]) if name not in ("exec_s", "cpu_s", "gc_s",
                                                                           "jit_s")]
    old = {**old, "columns": [old["columns"][i] for i in keep],
           "rows": [[r[i] for i in keep] for r in old["rows"]]}
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert main(["steps", str(tmp_path / "old.json")]) == 0
    assert "model" not in capsys.readouterr().out.splitlines()[0]

    bad = tmp_path / "bad.json"
    for text, message in (("{", "not JSON"), ('{"a": 1}', "not a step log"),
                          ('{"columns": ["t_s"], "rows": []}', "step log lacks columns"),
                          (json.dumps({"columns": list(COLUMNS), "rows": [[1, 2]]}),
                           "row 0 has 2 values"),
                          # Used to raise from numpy or the summary, without the file's name.
                          (json.dumps({**old, "rows": [["x"] * len(old["columns"])]}),
                           "row 0 holds 'x', not a finite number"),
                          (json.dumps({**old, "meta": [1, 2]}), "'meta' must be an object"),
                          (json.dumps({**old, "meta": {"num_gpu_blocks": "x"}}),
                           "meta's num_gpu_blocks must be an integer >= 0, got 'x'")):
        bad.write_text(text)
        assert main(["steps", str(bad)]) == 2
        assert f"{bad}: {message}" in capsys.readouterr().err
    for option in (["--window-s", "nan"], ["--window-s", "inf"], ["--full-fraction", "1"]):
        assert main(["steps", str(path), *option]) == 2
        assert f"{option[0]} must be" in capsys.readouterr().err

    # One step hours after the others: two windows, not a walk through every empty one between.
    late = {**old, "rows": [old["rows"][0], [1e9, *old["rows"][0][1:]]]}
    (tmp_path / "late.json").write_text(json.dumps(late))
    assert main(["steps", str(tmp_path / "late.json"), "--output-json", str(out_json)]) == 0
    assert [w["start_s"] for w in json.loads(out_json.read_text())["late"]["windows"]] == [
        0.0, 1e9]


def test_steps_cli_stops_quietly_when_its_reader_does(tmp_path):
    """``fairswitch steps LOG | head``: the closed pipe ends the command without an error."""
    path = tmp_path / "long.json"
    path.write_text(json.dumps(_log([dict(t_s=float(i), step_s=0.01, seqs=1, tokens=1)
                                     for i in range(5000)])))
    report = tmp_path / "report.json"
    proc = subprocess.Popen([sys.executable, "-m", "fairswitch.cli.main", "steps", str(path),
                             "--window-s", "1", "--output-json", str(report)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().startswith(b"long:")
    proc.stdout.close()
    err = proc.communicate(timeout=60)[1].decode()
    assert proc.returncode == 1 and "error" not in err and "Exception" not in err, err
    assert len(json.loads(report.read_text())["long"]["windows"]) == 5000  # the work completed
