"""Soak: 2000 requests from 64 concurrent clients (random endpoints, streaming or not, priorities,
client ids, and ~10% of clients disconnecting early), over a small KV cache (requests wait for
blocks, and may be preempted). Afterwards every block is free, the accounting holds, every
request that was not cancelled got exactly its max_tokens, and the server still answers."""

from __future__ import annotations

import asyncio
import json
import random
import time

import aiohttp
import pytest

from fairswitch.config import EngineConfig
from fairswitch.engine.async_engine import AsyncEngine

NUM_REQUESTS = 2000
NUM_CLIENTS = 64
NUM_BLOCKS = 40  # fewer than 64 running requests of 1-2 blocks each need


@pytest.fixture(scope="module")
def engine():
    eng = AsyncEngine.from_config(EngineConfig.from_kwargs(
        num_gpu_blocks=NUM_BLOCKS, max_model_len=256, max_num_seqs=NUM_CLIENTS))
    yield eng
    eng.shutdown()


async def _one(s: aiohttp.ClientSession, url: str, rng: random.Random, i: int) -> str:
    """One request; returns "ok" or "cancelled" (asserts on anything else)."""
    chat = rng.random() < 0.5
    stream = rng.random() < 0.5
    max_tokens = rng.randint(1, 4)
    cancel = rng.random() < 0.1
    words = " ".join(f"w{rng.randint(0, 999)}" for _ in range(rng.randint(1, 8)))
    body: dict = {"max_tokens": max_tokens, "ignore_eos": True, "stream": stream,
                  "priority": rng.randint(-3, 3), "temperature": 1.0 if rng.random() < 0.1 else 0.0}
    if chat:
        body["messages"] = [{"role": "user", "content": words}]
    else:
        body["prompt"] = words
    if stream:
        body["stream_options"] = {"include_usage": True}
    headers = {}
    client = f"client-{rng.randint(0, 7)}"
    if rng.random() < 0.5:
        headers["X-Client-Id"] = client
    else:
        body["user"] = client
    path = "/v1/chat/completions" if chat else "/v1/completions"

    if cancel and stream:
        async with s.post(url + path, json=body, headers=headers) as r:
            assert r.status == 200
            for _ in range(rng.randint(0, 2)):
                await r.content.readline()
            r.close()
        return "cancelled"
    if cancel:
        try:
            async with asyncio.timeout(rng.uniform(0.0, 0.2)):
                async with s.post(url + path, json=body, headers=headers) as r:
                    await r.read()
        except TimeoutError:
            return "cancelled"
        return "cancelled"  # it finished first; counts as neither

    async with s.post(url + path, json=body, headers=headers) as r:
        text = await r.text()
        assert r.status == 200, text
    if stream:
        events = text[:-2].split("\n\n")
        assert events[-1] == "data: [DONE]", text[-200:]
        usage = json.loads(events[-2][len("data: "):])["usage"]
    else:
        usage = json.loads(text)["usage"]
    assert usage["completion_tokens"] == max_tokens, (i, body, usage)
    return "ok"


def test_soak(server, engine):
    rng = random.Random(20261121)
    jobs = iter(range(NUM_REQUESTS))
    results: list[str] = []

    async def worker(s: aiohttp.ClientSession, seed: int) -> None:
        wrng = random.Random(seed)
        for i in jobs:
            results.append(await _one(s, server.url, wrng, i))

    async def main() -> None:
        connector = aiohttp.TCPConnector(limit=NUM_CLIENTS)
        async with aiohttp.ClientSession(connector=connector) as s:
            await asyncio.gather(*(worker(s, rng.randrange(2**32)) for _ in range(NUM_CLIENTS)))

    t0 = time.monotonic()
    asyncio.run(main())
    elapsed = time.monotonic() - t0
    assert len(results) == NUM_REQUESTS
    assert results.count("ok") > 0.85 * NUM_REQUESTS

    async def idle() -> tuple[int, int, int, int]:
        for _ in range(400):
            await engine.sync()
            if not await engine.run_in_engine(lambda e: e.has_unfinished_requests()):
                break
            await asyncio.sleep(0.05)
        await engine.run_in_engine(lambda e: e.check_accounting())
        return await engine.run_in_engine(lambda e: (
            e.kv.blocks.num_free_blocks, e.kv.num_blocks, len(e.requests), e.scheduler.num_preemptions))
    free, total, live, preemptions = asyncio.run(idle())
    assert (free, live) == (total, 0)

    async def after() -> tuple[int, int]:
        async with aiohttp.ClientSession() as s:
            async with s.get(server.url + "/health") as r:
                health = r.status
            async with s.post(server.url + "/v1/completions",
                              json={"prompt": "after", "max_tokens": 2}) as r:
                return health, r.status
    assert asyncio.run(after()) == (200, 200)
    print(f"soak: {NUM_REQUESTS} requests in {elapsed:.1f}s, {preemptions} preemptions")
