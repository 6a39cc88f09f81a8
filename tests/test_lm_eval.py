"""lm-evaluation-harness against ``fairswitch serve``: its ``local-completions`` model runs a
loglikelihood task (prompt logprobs through ``echo``) and a generate-until task, both defined on
local data (tests/data/lm_eval, nothing downloaded), with no failed request; the loglikelihoods
it reports equal the engine's own prompt logprobs for the same tokens."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fairswitch import LLM, SamplingParams
from fairswitch.model.default_model import default_model_dir

pytest.importorskip("lm_eval")

TASKS = Path(__file__).resolve().parent / "data" / "lm_eval"
ENGINE = ["--num-gpu-blocks", "128", "--max-model-len", "256"]


@pytest.fixture()
def server():
    proc = subprocess.Popen([sys.executable, "-m", "fairswitch.cli.main", "serve", "--port", "0",
                             "--served-model-name", "tiny", *ENGINE],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)],
                     daemon=True).start()
    try:
        line = lines.get(timeout=180)
        assert line and " on http://" in line, proc.stderr.read() if line is None else line
        yield line.rsplit(" ", 1)[1].strip()
    finally:
        proc.terminate()
        proc.wait(30)


def _samples(out: Path, task: str) -> list[dict]:
    (path,) = out.rglob(f"samples_{task}_*.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_lm_eval_local_completions_runs_both_task_kinds(server, tmp_path):
    tokenizer = default_model_dir()
    out = tmp_path / "out"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "TOKENIZERS_PARALLELISM": "false"}
    args = [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions",
            "--model_args", f"base_url={server}/v1/completions,model=tiny,"
            f"tokenizer_backend=huggingface,tokenizer={tokenizer},num_concurrent=2,"
            "max_retries=1,tokenized_requests=True",
            "--tasks", "fairswitch_loglikelihood,fairswitch_generate",
            "--include_path", str(TASKS), "--output_path", str(out), "--log_samples"]
    done = subprocess.run(args, cwd=TASKS, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    ll = _samples(out, "fairswitch_loglikelihood")
    gen = _samples(out, "fairswitch_generate")
    assert len(ll) == 6 and len(gen) == 4
    assert all(isinstance(s["resps"][0][0], str) for s in gen)

    # The same pairs, encoded as lm-eval encodes them, through the engine in-process.
    llm = LLM(num_gpu_blocks=128, max_model_len=256)
    tok = llm.get_tokenizer()
    for sample in ll:
        context, continuation = sample["arguments"]["gen_args_0"]["arg_0"], \
            sample["arguments"]["gen_args_0"]["arg_1"]
        whole = tok.encode(context + continuation, add_special_tokens=False)
        ctx = tok.encode(context, add_special_tokens=False)
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
        got = llm.generate([whole], params, use_tqdm=False)[0].prompt_logprobs
        want = sum(got[i][whole[i]].logprob for i in range(len(ctx), len(whole)))
        logprob, _ = sample["resps"][0][0]  # (as the samples file writes them: text)
        assert float(logprob) == pytest.approx(want, abs=1e-3), (context, continuation)
