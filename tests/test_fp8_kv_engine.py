"""--kv-cache-dtype fp8 through the whole engine on the CPU (the torch reference path): the pool is
e4m3 (a quarter of fp32's bytes, half of bf16's), greedy replies of the trained default model stay
close to the unquantized KV's, and swaps, recompute and the baseline's copies move fp8 blocks
without changing a token."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fairswitch import LLM, SamplingParams
from fairswitch.config import EngineConfig
from fairswitch.kv.kv_cache import FP8_DTYPE, KVLayout
from workloads.chat_prompts import CHAT_PROMPTS

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
PROMPTS = CHAT_PROMPTS[1:7]


def chats(prompts: list[str]) -> list[list[dict]]:
    return [[{"role": "user", "content": p}] for p in prompts]


def greedy(n: int = 40) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def fp8_replies() -> list[list[int]]:
    llm = LLM(kv_cache_dtype="fp8", dtype="float32", num_gpu_blocks=256, max_model_len=256)
    assert llm.engine.kv.cache.tensor.dtype == FP8_DTYPE
    return [o.outputs[0].token_ids for o in llm.chat(chats(PROMPTS), greedy(), use_tqdm=False)]


def test_an_fp8_pool_holds_four_times_the_fp32_tokens_in_the_same_memory():
    fp32, fp8 = (LLM(kv_cache_dtype=d, dtype="float32", kv_cache_memory_gib=0.01,
                     max_model_len=64, swap_space=0) for d in ("auto", "fp8"))
    a, b = fp32.engine.kv.layout, fp8.engine.kv.layout
    assert a.dtype == torch.float32 and b.dtype == FP8_DTYPE
    assert (a.block_size, b.block_size) == (16, 32)  # each dtype's default
    assert b.block_bytes * 4 // 2 == a.block_bytes  # a quarter of the bytes a token
    tokens = [m.engine.kv.cache.num_blocks * m.engine.kv.block_size for m in (fp32, fp8)]
    assert tokens[1] == 4 * tokens[0]
    bf16 = KVLayout(2, 16, 2, 64, torch.bfloat16)
    assert KVLayout(2, 16, 2, 64, FP8_DTYPE).block_bytes * 2 == bf16.block_bytes


def test_replies_stay_close_to_the_unquantized_kv(monkeypatch):
    """The same measure benchmarks/fp8_kv_accuracy.py records (there on the GPU, vs bf16)."""
    monkeypatch.syspath_prepend(str(BENCH_DIR))  # the script imports its siblings
    import fp8_kv_accuracy

    base = EngineConfig.from_kwargs(dtype="float32", max_model_len=512, num_gpu_blocks=256)
    figures = fp8_kv_accuracy.compare(LLM.from_config(base),
                                      LLM.from_config(base.with_options(kv_cache_dtype="fp8")),
                                      PROMPTS, max_tokens=32)
    assert figures["positions"] >= 100
    assert figures["top1_agreement"] >= 0.95, figures
    assert figures["kl_mean"] < 0.01, figures
    assert figures["identical_replies"] >= 1, figures


@pytest.mark.parametrize("options", [
    {"preemption_mode": "swap"}, {"preemption_mode": "recompute"},
    {"preemption_mode": "swap", "baseline": True}])
def test_preemption_moves_fp8_blocks_without_changing_a_token(fp8_replies, options):
    # 10 blocks of 16 tokens hold about two of the six conversations: constant preemption.
    tight = LLM(kv_cache_dtype="fp8", dtype="float32", num_gpu_blocks=10, block_size=16,
                max_model_len=160, swap_space=0.05, **options)
    outs = tight.chat(chats(PROMPTS), greedy(), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == fp8_replies
    engine = tight.engine
    assert engine.scheduler.num_preemptions > 0
    if options["preemption_mode"] == "swap":
        swap = engine.kv.swap
        assert swap.cpu_tensor.dtype == FP8_DTYPE
        assert swap.out_backend.stats.bytes_out > 0
    engine.check_accounting()


def test_an_unknown_kv_cache_dtype_is_refused():
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLM(kv_cache_dtype="int4")
    with pytest.raises(ValueError, match="kv_cache_dtype"):  # by the config, before any loading
        EngineConfig.from_kwargs(kv_cache_dtype="int4")
