"""The engine's step log: one row per step that ran a batch, consistent with the engine's own
counters, written as columns + rows JSON."""

import json

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
