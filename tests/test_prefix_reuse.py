"""Multi-turn KV reuse: the next turn's prompt starts with the whole history and skips its prefill."""

from __future__ import annotations

import pytest

from fairswitch import LLM, SamplingParams
from fairswitch.kv import reuse_index as pcmod
from fairswitch.kv.block_pool import BlockPool
from fairswitch.kv.reuse_index import ReuseTier

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def conversation(llm: LLM) -> tuple[list[list[int]], list[int]]:
    """Three turns; each prompt = previous prompt + previous answer + a new user message."""
    tok = llm.get_tokenizer()
    history = tok.encode("System: you are terse.\nUser: tell me about paged attention please.")
    outputs, cached = [], []
    for msg in ["\nUser: and swapping?", "\nUser: and fairness?", ""]:
        out = llm.generate([history], GREEDY, use_tqdm=False)[0]
        outputs.append(out.outputs[0].token_ids)
        cached.append(out.num_cached_tokens)
        history = history + out.outputs[0].token_ids + tok.encode(msg) if msg else history
    return outputs, cached


def test_next_turn_reuses_kv_and_outputs_are_unchanged(llama_dir):
    plain = LLM(model=str(llama_dir), num_gpu_blocks=128, block_size=4, max_model_len=256,
                enable_prefix_caching=False)
    reuse = LLM(model=str(llama_dir), num_gpu_blocks=128, block_size=4, max_model_len=256)
    want, cached_plain = conversation(plain)
    got, cached = conversation(reuse)
    assert got == want
    assert cached_plain == [0, 0, 0]
    assert cached[0] == 0 and cached[1] > 0 and cached[2] > cached[1]
    pc = reuse.engine.kv.blocks.prefix_cache
    assert pc.num_hit_blocks * 4 == sum(cached) == reuse.engine.scheduler.num_reused_tokens
    reuse.engine.check_accounting()


def test_cached_blocks_never_block_live_requests(llama_dir):
    llm = LLM(model=str(llama_dir), num_gpu_blocks=16, block_size=4, max_model_len=60,
              swap_space=0)
    tok = llm.get_tokenizer()
    for i in range(6):  # fill the cache with unrelated finished requests
        llm.generate(f"cache filler number {i} with some words", GREEDY, use_tqdm=False)
    pc = llm.engine.kv.blocks.prefix_cache
    assert pc.num_blocks > 0 and llm.engine.kv.blocks.num_free_blocks == 16
    big = tok.encode("a long prompt " * 14)[:50]
    out = llm.generate([big], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 8  # needed 15 of 16 blocks: cache was evicted
    assert llm.engine.scheduler.num_preemptions == 0
    llm.engine.check_accounting()


def test_full_prompt_hit_still_computes_last_token(llama_dir):
    llm = LLM(model=str(llama_dir), num_gpu_blocks=64, block_size=4, max_model_len=128)
    ids = list(range(1000, 1016))  # exactly 4 full blocks
    a = llm.generate([ids], GREEDY, use_tqdm=False)[0]
    b = llm.generate([ids], GREEDY, use_tqdm=False)[0]
    assert b.num_cached_tokens == 12  # 3 blocks: the last block holds the token to sample from
    assert a.outputs[0].token_ids == b.outputs[0].token_ids


def test_a_recomputed_request_finding_its_own_blocks_reuses_nothing():
    """Preempted by recompute, a request's blocks (its output tokens' too) stay in the prefix
    cache, and on readmission it found them again: each time they were added to its
    num_cached_tokens (the usage's cached_tokens: 36 for a 25-token prompt) and to the
    scheduler's reuse counter, as if another request's KV had been reused."""
    import random

    llm = LLM(num_gpu_blocks=24, block_size=4, max_model_len=96, preemption_mode="recompute",
              swap_space=0, async_scheduling=False, max_num_seqs=8)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 12000) for _ in range(rng.randint(5, 30))] for _ in range(8)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=40, ignore_eos=True),
                        use_tqdm=False)
    assert sum(o.metrics.num_preemptions for o in outs) > 0
    assert all(o.num_cached_tokens == 0 for o in outs)  # no prompt shares a block with another
    assert llm.engine.scheduler.num_reused_tokens == 0
    assert llm.engine.kv.blocks.prefix_cache.num_hit_blocks == 0  # (the block hit rate's)
    llm.engine.check_accounting()


def test_hash_collision_is_caught_by_token_check(monkeypatch):
    cache = ReuseTier(block_size=2)
    monkeypatch.setattr(pcmod, "block_hashes",
                        lambda t, n, bs, known=None, salt=b"": [42] * (n // bs))
    cache.register([1, 2, 3, 4], 4, [5, 6])
    assert cache.match([1, 2, 9, 9, 0], 4) == [5]  # second block's hash matches, tokens do not
    assert cache.match([7, 7, 3, 4], 4) == []


def test_a_block_hash_is_a_sha256_chain_over_the_whole_prefix():
    """The tokens check cannot see a block's parent, so the hash must resist collisions; Python's
    hash of an int tuple does not (a crafted prompt could read another user's cached KV)."""
    import hashlib
    from array import array

    tokens = [5, 6, 7, 8, 9, 10]
    want, parent = [], b""
    for i in range(3):
        parent = hashlib.sha256(parent + array("q", tokens[2 * i:2 * i + 2]).tobytes()).digest()
        want.append(parent)
    assert pcmod.block_hashes(tokens, 6, 2) == want
    # the same block after another parent: another name
    assert pcmod.block_hashes([1, 2, 7, 8], 4, 2)[1] != want[1]
    # a salt (a request's LoRA adapter) is the first block's parent: the whole chain differs
    salted = pcmod.block_hashes(tokens, 6, 2, salt=b"lora:1")
    assert salted[0] == hashlib.sha256(b"lora:1" + array("q", tokens[:2]).tobytes()).digest()
    assert not set(salted) & set(want)


def test_lru_eviction_order():
    pool = BlockPool(4)
    cache = ReuseTier(block_size=1)
    blocks = pool.allocate(3)
    for b in blocks:
        cache.take(b)
    cache.register([10, 11, 12], 3, blocks)
    for b in (blocks[1], blocks[0], blocks[2]):  # released in this order: LRU first
        assert cache.release(b) is False
    assert [cache.evict() for _ in range(3)] == [blocks[1], blocks[0], blocks[2]]
    with pytest.raises(KeyError):
        cache.evict()


def evict_gpu_cache(llm: LLM) -> None:
    """An unrelated request that needs almost the whole GPU pool: at most 4 blocks cached before
    it survive on the GPU (its own blocks are cached after it; fresh tokens every call)."""
    kv = llm.engine.kv
    evict_gpu_cache.calls = getattr(evict_gpu_cache, "calls", 0) + 1
    start = 2000 + 1000 * evict_gpu_cache.calls
    filler = list(range(start, start + kv.num_blocks * kv.block_size - 16))
    llm.generate([filler], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    assert kv.blocks.prefix_cache.num_blocks - len(filler) // kv.block_size <= 4


@pytest.mark.parametrize("delay", [0, 3])
def test_cpu_tier_hit_fetches_instead_of_recomputing(llama_dir, delay):
    from helpers import slow_link

    opts = dict(num_gpu_blocks=40, block_size=4, max_model_len=160)
    plain = LLM(model=str(llama_dir), enable_prefix_caching=False, swap_space=0, **opts)
    tiered = LLM(model=str(llama_dir), swap_space=0.01, **opts)
    if delay:  # slow link: write-backs and fetches land several polls later
        slow_link(tiered.engine.kv.swap, delay)
    tok = plain.get_tokenizer()
    history = tok.encode("User: explain how a CPU tier keeps KV for the next turn, briefly.")
    for msg in ["\nUser: and when the GPU cache was evicted?", "\nUser: thanks"]:
        want = plain.generate([history], GREEDY, use_tqdm=False)[0]
        got = tiered.generate([history], GREEDY, use_tqdm=False)[0]
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        evict_gpu_cache(tiered)  # the next turn's history survives only on the CPU
        tiered.engine.check_accounting()
        history = history + want.outputs[0].token_ids + tok.encode(msg)
    final = tiered.generate([history], GREEDY, use_tqdm=False)[0]
    assert final.outputs[0].token_ids == plain.generate([history], GREEDY,
                                                        use_tqdm=False)[0].outputs[0].token_ids
    m = tiered.engine.switch_metrics()
    assert m["reused_tokens_cpu"] > 0 and m["cpu_tier_blocks"] > 0
    assert final.num_cached_tokens >= len(history) - 2 * 4 - 1  # all but the last blocks
    tiered.engine.check_accounting()


def test_abort_during_cpu_tier_fetch_keeps_pools_whole(llama_dir):
    from helpers import slow_link

    llm = LLM(model=str(llama_dir), num_gpu_blocks=40, block_size=4, max_model_len=160,
              swap_space=0.01)
    engine = llm.engine
    slow_link(engine.kv.swap, 4)
    prompt = list(range(3000, 3050))
    llm.generate([prompt], GREEDY, use_tqdm=False)
    evict_gpu_cache(llm)
    # Something else runs meanwhile, so the scheduler does not wait for the fetch to land.
    engine.add_request(prompt_token_ids=[5, 6, 7], params=SamplingParams(max_tokens=8,
                                                                         ignore_eos=True))
    engine.step()
    rid = engine.add_request(prompt_token_ids=prompt + [7, 8, 9], params=GREEDY)
    engine.step()
    assert engine.requests[rid] in engine.kv.swap.incoming  # fetching from the CPU tier
    engine.abort_request(rid)
    engine.check_accounting()
    while engine.has_unfinished_requests():
        engine.step()
    engine.check_accounting()
    tier = engine.kv.swap.tier
    assert tier.num_blocks == len(tier.evictable) > 0  # the fetch's pins were dropped
    assert engine.kv.blocks.num_free_blocks == 40


def test_block_hashes_extend_a_requests_known_hashes():
    """A request's hashes are computed once: later calls hash only blocks past the known ones
    (appended in place), with the same result as hashing from block 0."""
    from fairswitch.kv.reuse_index import block_hashes

    tokens = list(range(100, 150))
    known: list[int] = []
    assert block_hashes(tokens, 3, 4, known) == [] and known == []
    first = block_hashes(tokens, 21, 4, known)  # 5 full blocks
    assert first == block_hashes(tokens, 21, 4) and known == first
    known[0] = -1  # the known ones are trusted, not recomputed
    assert block_hashes(tokens, 12, 4, known) == [-1, *first[1:3]]
    known[0] = first[0]
    tokens += [7] * 6  # tokens are appended as the request generates
    assert block_hashes(tokens, 56, 4, known) == block_hashes(tokens, 56, 4)
    assert len(known) == 14


def test_one_tier_class_serves_both_tiers():
    """The GPU tier indexes blocks still referenced (evictable once released); the CPU tier
    indexes written-back blocks (evictable at once, pinned while a fetch reads them); a CPU
    match continues where the GPU hits stop."""
    tokens = list(range(16))
    gpu, cpu = ReuseTier(block_size=4), ReuseTier(block_size=4)
    for b in (10, 11):
        gpu.take(b)
    gpu.register(tokens, 8, [10, 11])
    assert not gpu.evictable and gpu.release(10) is False and list(gpu.evictable) == [10]
    for i, h in enumerate(pcmod.block_hashes(tokens, 16, 4)):
        assert cpu.add(h, tuple(tokens[4 * i:4 * i + 4]), 20 + i)
    assert list(cpu.evictable) == [20, 21, 22, 23]
    assert not cpu.add(pcmod.block_hashes(tokens, 4, 4)[0], tuple(tokens[:4]), 99)
    first = len(gpu.match(tokens, 15))
    assert first == 2 and cpu.match(tokens, 15, first_block=first) == [22]  # 3 full blocks < 15
    cpu.take(22)
    assert 22 not in cpu.evictable and [cpu.evict() for _ in range(3)] == [20, 21, 23]
    assert cpu.release(22) is False and cpu.evict() == 22 and cpu.num_blocks == 0


def _history_blocks(tier: ReuseTier, first: int, last: int) -> int:
    """Blocks of ``tier`` whose tokens start in [first, last)."""
    return sum(first <= tier._key_of[b][1][0] < last for b in tier.blocks())


def test_one_eviction_costs_the_next_turn_one_block_of_reuse():
    """A finished request's blocks were released head first, so the first one evicted was its
    prefix's head: the next turn reused nothing while the other 7 stayed cached for nothing."""
    greedy = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    llm = LLM(num_gpu_blocks=16, block_size=4, max_model_len=64, swap_space=0,
              async_scheduling=False)
    kv = llm.engine.kv
    turn1 = list(range(1000, 1032))  # 8 full blocks
    answer = llm.generate([turn1], greedy, use_tqdm=False)[0].outputs[0].token_ids
    free = kv.blocks.pool.num_free_blocks  # a request that needs one cached block more
    llm.generate([list(range(5000, 5000 + 4 * (free + 1) - 1))], greedy, use_tqdm=False)
    assert _history_blocks(kv.blocks.prefix_cache, 1000, 1032) == 7
    out = llm.generate([turn1 + answer + [7, 8, 9]], greedy, use_tqdm=False)[0]
    assert out.num_cached_tokens == 7 * 4


def test_cpu_tier_evicts_a_prefix_from_its_end():
    """Write-backs indexed a request's blocks head first: one eviction cut the history's head
    off, and turn 2 could fetch none of the 7 blocks that stayed."""
    block_bytes = 6 * 2 * 4 * 2 * 64 * 4  # the embedded model's, block_size 4, fp32
    llm = LLM(num_gpu_blocks=16, block_size=4, max_model_len=64,
              swap_space=10 * block_bytes / 2**30, async_scheduling=False)
    tier = llm.engine.kv.swap.tier
    greedy = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    turn1 = list(range(1000, 1032))  # 8 full blocks of 10
    answer = llm.generate([turn1], greedy, use_tqdm=False)[0].outputs[0].token_ids
    llm.generate([list(range(5000, 5012))], greedy, use_tqdm=False)  # its write-back evicts 1
    assert _history_blocks(tier, 1000, 1032) == 7
    turn2 = turn1 + answer + [7, 8, 9]
    assert len(tier.match(turn2, len(turn2) - 1)) == 7
    llm.engine.check_accounting()


def test_cache_salt_keeps_cached_kv_to_its_own_requests():
    """vLLM's cache_salt: a prompt reuses cached KV only from requests of the same salt (no
    salt is a salt of its own); over HTTP the field does the same."""
    from fairswitch import LLM, SamplingParams
    from fairswitch.engine.async_engine import AsyncEngine
    from fairswitch.server import BackgroundServer, ServerSettings, build_app

    llm = LLM(num_gpu_blocks=128, max_model_len=256, block_size=4)
    prompt = list(range(100, 140))
    greedy = SamplingParams(max_tokens=2, temperature=0.0)

    def cached(salt: str | None) -> int:
        p = {"prompt_token_ids": prompt} | ({"cache_salt": salt} if salt else {})
        return llm.generate(p, greedy, use_tqdm=False)[0].num_cached_tokens

    assert [cached(s) for s in ("a", "a", "b", None, None, "a")] == [0, 36, 0, 0, 36, 36]
    with pytest.raises(ValueError, match=r"\['cache_salt'\] must be a non-empty string"):
        llm.generate({"prompt": "x", "cache_salt": ""}, use_tqdm=False)
    with pytest.raises(TypeError, match=r"\['cache_salt'\] must be a str"):
        llm.generate([{"prompt": "x"}, {"prompt": "y", "cache_salt": 3}], use_tqdm=False)
    # Beam search and score keep a prompt's salt for every request they make.
    from fairswitch import BeamSearchParams

    seen = []
    add = llm.engine.add_request
    llm.engine.add_request = lambda *a, **kw: (seen.append(kw.get("cache_salt")), add(*a, **kw))[1]
    llm.beam_search([{"prompt_token_ids": prompt, "cache_salt": "s"}],
                    BeamSearchParams(beam_width=2, max_tokens=2))
    llm.score({"prompt": "a", "cache_salt": "t"}, ["b", {"prompt": "c", "cache_salt": "u"}])
    llm.engine.add_request = add
    assert set(seen[:-3]) == {"s"} and seen[-3:] == ["t", None, "u"]
    with pytest.raises(ValueError, match="may hold 'cache_salt'"):
        llm.generate({"prompt": "x", "salt": "a"}, use_tqdm=False)
    llm.shutdown()

    import openai

    engine = AsyncEngine.from_config(llm.engine.config)
    try:
        with BackgroundServer(build_app(engine, ServerSettings(), shutdown_engine=False)) as srv:
            client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0)

            def served(salt: str | None) -> int:
                out = client.completions.create(
                    model="fairswitch-tiny", prompt=prompt, max_tokens=2,
                    extra_body={"cache_salt": salt} if salt else None)
                details = out.usage.prompt_tokens_details
                return details.cached_tokens if details else 0

            assert [served(s) for s in ("t1", "t1", "t2")] == [0, 36, 0]
            with pytest.raises(openai.BadRequestError, match="cache_salt"):
                client.completions.create(model="fairswitch-tiny", prompt="x", max_tokens=1,
                                          extra_body={"cache_salt": ""})
    finally:
        engine.shutdown()


def test_reset_prefix_cache_forgets_both_tiers_and_loses_no_block(llama_dir):
    """vLLM's LLM.reset_prefix_cache: after it no request reuses KV cached before it, on the GPU
    or in the CPU tier; blocks a request still holds are forgotten and freed with it, so the
    pools stay whole."""
    llm = LLM(model=str(llama_dir), num_gpu_blocks=40, block_size=4, max_model_len=160,
              swap_space=0.01)
    tok = llm.get_tokenizer()
    prompt = tok.encode("User: explain how a CPU tier keeps KV for the next turn, briefly.")
    first = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    again = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert again.num_cached_tokens > 0
    kv = llm.engine.kv
    evict_gpu_cache(llm)  # the prompt's KV now lives in the CPU tier too
    assert kv.swap.tier.num_blocks > 0
    assert llm.reset_prefix_cache() is True
    assert kv.blocks.prefix_cache.num_blocks == 0 and kv.swap.tier.num_blocks == 0
    assert kv.blocks.num_free_blocks == kv.num_blocks
    llm.engine.check_accounting()
    after = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert after.num_cached_tokens == 0
    assert after.outputs[0].token_ids == first.outputs[0].token_ids
    # While a request runs: its blocks are forgotten, not taken; it finishes, they are freed.
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    llm.engine.add_request(request_id="r", prompt_token_ids=prompt, params=params)
    llm.engine.step()
    llm.reset_prefix_cache()
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    llm.engine.check_accounting()
    assert llm.generate([prompt], GREEDY, use_tqdm=False)[0].num_cached_tokens > 0


def test_reset_prefix_cache_with_copies_in_flight(llama_dir):
    """A reset while a CPU-tier fetch reads blocks (they stay held until it lands, then return
    to the pool: the accounting holds throughout) and while a write-back is on its way to the
    tier (it lands forgotten: no later request reuses its KV)."""
    from helpers import slow_link

    opts = dict(num_gpu_blocks=40, block_size=4, max_model_len=160, swap_space=0.01)
    llm = LLM(model=str(llama_dir), **opts)
    engine = llm.engine
    slow_link(engine.kv.swap, 4)
    prompt = list(range(600, 650))  # (apart from evict_gpu_cache's fillers)
    llm.generate([prompt], GREEDY, use_tqdm=False)
    evict_gpu_cache(llm)  # the prompt's KV survives in the CPU tier only
    # (something else running, so the engine does not wait for the fetch to land)
    engine.add_request(prompt_token_ids=[5, 6, 7], params=SamplingParams(max_tokens=8,
                                                                         ignore_eos=True))
    engine.step()
    rid = engine.add_request(prompt_token_ids=prompt + [7, 8, 9], params=GREEDY)
    engine.step()
    assert engine.requests[rid] in engine.kv.swap.incoming  # fetching from the tier
    llm.reset_prefix_cache()
    engine.check_accounting()
    while engine.has_unfinished_requests():
        engine.step()
        engine.check_accounting()
    llm.shutdown()

    llm = LLM(model=str(llama_dir), **opts)
    engine = llm.engine
    slow_link(engine.kv.swap, 6)
    prompt = list(range(700, 750))
    engine.add_request(request_id="w", prompt_token_ids=prompt, params=GREEDY)
    while "w" in engine.requests:
        engine.step()
    assert engine.kv.swap._writebacks  # its KV on its way to the CPU tier
    llm.reset_prefix_cache()
    for i in range(3):  # unrelated work: the write-back lands meanwhile
        llm.generate([list(range(100 + i * 10, 105 + i * 10))],
                     SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert not engine.kv.swap._writebacks
    engine.check_accounting()
    assert llm.generate([prompt + [1, 2]], GREEDY, use_tqdm=False)[0].num_cached_tokens == 0
    llm.shutdown()
