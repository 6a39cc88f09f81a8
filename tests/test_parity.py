"""Greedy token-for-token parity with transformers' own models on the same checkpoint (CPU, fp32)."""

from __future__ import annotations

import pytest

from fairswitch import LLM, SamplingParams
from helpers import hf_greedy

PROMPTS = [
    "The quick brown fox jumps over the lazy dog because",
    "def fibonacci(n):",
    "Paged attention stores the KV cache in fixed-size blocks, so that memory is allocated "
    "on demand and fragmentation stays small; the scheduler can then batch many requests",
    "Hi",
]
N_OUT = 12


def greedy(n: int = N_OUT) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module",
                params=["llama", "qwen2", "qwen3", "phi3", "mixtral", "qwen3_moe"])
def model_dir(request):
    return request.getfixturevalue(f"{request.param}_dir" if request.param != "qwen2"
                                   else "qwen_dir")


@pytest.fixture(scope="module")
def expected(model_dir):
    llm = LLM(model=str(model_dir), num_gpu_blocks=256)
    tok = llm.get_tokenizer()
    ids = [tok.encode(p) for p in PROMPTS]
    return ids, [hf_greedy(model_dir, p, N_OUT) for p in ids]


def test_single_prompts(model_dir, expected):
    ids, want = expected
    llm = LLM(model=str(model_dir), num_gpu_blocks=256)
    for p, w in zip(ids, want):
        out = llm.generate([p], greedy(), use_tqdm=False)[0]
        assert out.outputs[0].token_ids == w


def test_batch_of_different_lengths(model_dir, expected):
    ids, want = expected
    llm = LLM(model=str(model_dir), num_gpu_blocks=256)
    outs = llm.generate(ids, greedy(), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want


def test_chunked_prefill(model_dir, expected):
    ids, want = expected
    # A 7-token budget splits the longer prompts over several steps, mixed with decodes.
    llm = LLM(model=str(model_dir), num_gpu_blocks=256, max_num_batched_tokens=7, block_size=4)
    outs = llm.generate(ids, greedy(), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want
    assert len(ids[2]) > 7


def test_requests_join_running_batch(model_dir, expected):
    ids, want = expected
    llm = LLM(model=str(model_dir), num_gpu_blocks=256)
    engine = llm.engine
    got: dict[str, list[int]] = {}
    engine.add_request(prompt_token_ids=ids[0], params=greedy(), request_id="r0")
    pending = list(range(1, len(ids)))
    steps = 0
    while engine.has_unfinished_requests() or pending:
        if pending and steps % 3 == 2:  # a new request every third step, mid-decode of others
            i = pending.pop(0)
            engine.add_request(prompt_token_ids=ids[i], params=greedy(), request_id=f"r{i}")
        for out in engine.step():
            if out.finished:
                got[out.request_id] = out.outputs[0].token_ids
        steps += 1
    assert [got[f"r{i}"] for i in range(len(ids))] == want


def test_preemption_by_recompute_keeps_outputs(model_dir, expected):
    ids, want = expected
    # 12 blocks of 4 tokens cannot hold all four requests: some get preempted and recomputed.
    llm = LLM(model=str(model_dir), num_gpu_blocks=12, block_size=4, max_model_len=48)
    outs = llm.generate(ids, greedy(), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want
    assert llm.engine.scheduler.num_preemptions > 0
    llm.engine.check_accounting()
    assert llm.engine.kv.blocks.num_free_blocks == 12
