"""KVMemory, the one owner of KV memory: sizing, the null swap space, its own accounting check,
and one KVLayout for every pool."""

from __future__ import annotations

import logging

import pytest
import torch

from fairswitch import LLM, SamplingParams
from fairswitch.config import CacheConfig, EngineConfig
from fairswitch.kv.kv_cache import KVLayout
from fairswitch.kv.memory import KVMemory, num_gpu_blocks
from fairswitch.kv.no_swap import NoSwapSpace
from fairswitch.kv.swap_manager import SwapManager
from fairswitch.request import Request

CPU = torch.device("cpu")
LAYOUT = KVLayout(num_layers=2, block_size=4, num_kv_heads=2, head_dim=8, dtype=torch.float32)


def test_layout_bytes_are_those_of_the_pools_it_shapes():
    memory = KVMemory(CacheConfig(block_size=4, swap_space=64 * LAYOUT.block_bytes / 2**30),
                      LAYOUT, 16, CPU, max_model_len=64)
    for pool in (memory.cache.tensor, memory.swap.cpu_tensor):
        assert pool[0].numel() * pool.element_size() == LAYOUT.block_bytes
    assert memory.swap.cpu_pool.num_blocks == 64 and memory.num_blocks == 16
    assert LAYOUT.block_bytes == 2 * 2 * 4 * 2 * 8 * 4  # layers x K/V x tokens x heads x dim x 4
    assert memory.link_probe is not None and memory.link_probe[0] > 0


def test_sizing_from_memory_is_capped_and_must_hold_one_full_request():
    cache = CacheConfig(block_size=4, kv_cache_memory_gib=1.0)
    # 1 GiB holds far more than 2 sequences x 16 blocks: capped at what they could use.
    assert num_gpu_blocks(cache, LAYOUT, 2, 64, profile=None) == 2 * 16
    assert num_gpu_blocks(CacheConfig(block_size=4, num_gpu_blocks=40), LAYOUT, 2, 64, None) == 40
    profiled = CacheConfig(block_size=4)
    assert num_gpu_blocks(profiled, LAYOUT, 2, 64, lambda: 20.5 * LAYOUT.block_bytes) == 20
    with pytest.raises(ValueError, match="less than max_model_len=64"):
        num_gpu_blocks(CacheConfig(block_size=4, num_gpu_blocks=15), LAYOUT, 2, 64, None)


def test_no_swap_space_recomputes_and_holds_no_cpu_block():
    memory = KVMemory(CacheConfig(block_size=4, swap_space=0), LAYOUT, 16, CPU, 64)
    assert isinstance(memory.swap, NoSwapSpace) and memory.link_probe is None
    req = Request("r", [1] * 8, SamplingParams(), 0.0)
    assert memory.blocks.allocate_slots(req, 8)
    req.num_computed_tokens = 8
    assert not memory.swap.can_swap_out(req) and not memory.swap.can_swap_in(req)
    memory.check([req])
    memory.swap.release(req)
    memory.check([])
    assert memory.blocks.num_free_blocks == 16
    assert memory.metrics([])["cpu_kv_usage"] == 0.0


def test_a_swap_space_smaller_than_one_block_is_named_in_a_warning(caplog):
    """It became no swap space without a word: --preemption-mode swap recomputed every victim."""
    with caplog.at_level("WARNING", logger="fairswitch.kv.memory"):
        memory = KVMemory(CacheConfig(block_size=4, swap_space=0.5 * LAYOUT.block_bytes / 2**30),
                          LAYOUT, 16, CPU, 64)
    assert isinstance(memory.swap, NoSwapSpace)
    assert "holds no KV block" in caplog.text and "recomputed" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="fairswitch.kv.memory"):
        KVMemory(CacheConfig(block_size=4, swap_space=0), LAYOUT, 16, CPU, 64)  # asked for none
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_engine_without_swap_space_preempts_by_recompute(llama_dir):
    prompts = ["The quick brown fox jumps over the lazy dog because", "def fibonacci(n):",
               "Hi there", "Paged attention stores the KV cache in fixed-size blocks"]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    roomy = LLM(model=str(llama_dir), num_gpu_blocks=256, swap_space=0)
    want = [o.outputs[0].token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]
    # Asks for swaps, and there is no space: less than one block (swap_space=0 is refused).
    tight = LLM(model=str(llama_dir), num_gpu_blocks=12, block_size=4, max_model_len=48,
                swap_space=1e-9, preemption_mode="swap")
    outs = tight.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want
    sched = tight.engine.scheduler
    assert sched.num_preemptions > 0 and sched.preemptions_by_mode["swap"] == 0
    tight.engine.check_accounting()


def test_check_finds_a_block_nobody_owns_and_a_block_owned_twice():
    memory = KVMemory(CacheConfig(block_size=4, swap_space=16 * LAYOUT.block_bytes / 2**30,
                                  enable_prefix_caching=False, block_groups=False),
                      LAYOUT, 16, CPU, 64)
    a, b = (Request(n, [1] * 8, SamplingParams(), 0.0) for n in "ab")
    assert memory.blocks.allocate_slots(a, 8)
    memory.check([a])
    with pytest.raises(AssertionError, match="GPU blocks in use"):
        memory.check([])  # a's blocks are held by no live request
    b.block_table = list(a.block_table)
    with pytest.raises(AssertionError, match="two block tables"):
        memory.check([a, b])
    b.block_table = []
    a.num_computed_tokens = 8
    assert isinstance(memory.swap, SwapManager)
    memory.swap.swap_out(a)
    memory.swap.poll()
    memory.check([a])
    with pytest.raises(AssertionError, match="CPU blocks in use"):
        memory.check([])


def test_with_options_replaces_and_validates_again():
    base = EngineConfig.from_kwargs(block_size=8, max_num_seqs=4)
    copy = base.with_options(max_num_seqs=2, baseline=True)
    assert (copy.scheduler.max_num_seqs, copy.cache.tokens_per_block) == (2, 16)  # baseline's
    assert (base.scheduler.max_num_seqs, base.cache.tokens_per_block) == (4, 8)
    assert copy.with_options(baseline=False).cache.tokens_per_block == 8  # as given
    with pytest.raises(TypeError, match="unknown engine option"):
        base.with_options(max_seqs=2)
    with pytest.raises(ValueError, match="block_size"):
        base.with_options(block_size=3)


def test_block_size_defaults_by_cache_dtype():
    """Left unset, blocks are 16 tokens, 32 in an fp8 cache (its decode kernel reads a 32-token
    page of a head faster); unset stays unset through with_options, so a copy that changes the
    dtype takes that dtype's default, and a size given is kept."""
    base = EngineConfig.from_kwargs()
    assert base.cache.block_size is None and base.cache.tokens_per_block == 16
    fp8 = base.with_options(kv_cache_dtype="fp8")
    assert fp8.cache.tokens_per_block == 32
    assert fp8.with_options(kv_cache_dtype="auto").cache.tokens_per_block == 16
    assert base.with_options(block_size=8, kv_cache_dtype="fp8").cache.tokens_per_block == 8
    assert fp8.with_options(baseline=True).cache.tokens_per_block == 16  # vLLM 0.3.3's blocks
    assert fp8.with_options(baseline=True).with_options(
        baseline=False).cache.tokens_per_block == 32  # (an ablation's full-fp8 from --baseline)


def test_a_swap_space_past_the_hosts_memory_is_refused(monkeypatch):
    """It ended in the allocator's traceback (or the OOM killer) instead of naming the option."""
    import fairswitch.kv.memory as memory

    monkeypatch.setattr(memory, "host_memory_bytes", lambda: 100 * LAYOUT.block_bytes)
    # On a CPU the 16 blocks of the engine's own cache are host memory too.
    with pytest.raises(ValueError, match="swap_space .* beside the KV cache .* is more than 90% "
                       "of this host's"):
        KVMemory(CacheConfig(block_size=4, swap_space=75 * LAYOUT.block_bytes / 2**30),
                 LAYOUT, 16, CPU, max_model_len=64)
    fits = KVMemory(CacheConfig(block_size=4, swap_space=74 * LAYOUT.block_bytes / 2**30),
                    LAYOUT, 16, CPU, max_model_len=64)
    assert fits.swap.cpu_pool.num_blocks == 74
    with pytest.raises(ValueError, match=r"^a KV cache of 91 blocks \(.* GiB\) is more than 90% "
                       "of this host's .*: lower --num-gpu-blocks or --kv-cache-memory-gib"):
        KVMemory(CacheConfig(block_size=4), LAYOUT, 91, CPU, max_model_len=64)
    # Tensor-parallel ranks on one host each hold theirs: bounded together.
    with pytest.raises(ValueError, match=r"^a KV cache of 46 blocks on each of this host's 2 "
                       r"ranks \(.* GiB\) is more than 90%"):
        KVMemory(CacheConfig(block_size=4), LAYOUT, 46, CPU, max_model_len=64, ranks_on_host=2)
    with pytest.raises(ValueError, match=r"^swap_space .* on each of this host's 2 ranks"):
        KVMemory(CacheConfig(block_size=4, swap_space=30 * LAYOUT.block_bytes / 2**30),
                 LAYOUT, 16, CPU, max_model_len=64, ranks_on_host=2)
