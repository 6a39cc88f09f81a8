"""Serving-path overhead: the decode step's period when outputs stream to asyncio consumers
(``AsyncEngine``, as the in-process bench runs it) and to HTTP clients (the OpenAI server, SSE)
against the engine stepped directly in one thread with nobody listening (the physical limit of
this engine and batch).

The engine thread and the event loop's thread share the GIL: the loop's work per step (one
callback and one consumer wake-up per request) competes with the engine's scheduling and input
preparation. The engine is built once (default Llama-3-8B shapes, dummy weights, CUDA graphs);
then, for each batch size in ``--requests``, that many requests of ``--prompt-tokens`` random
tokens decode ``--output-tokens`` tokens each, ignoring EOS, first stepped directly, then
through an ``AsyncEngine`` with one asyncio consumer per request recording each token's arrival
time (what ``InProcClient`` does), then through the HTTP server (in this process, on its own
thread, as ``fairswitch serve`` runs it) with one streaming ``/v1/completions`` client per
request in a separate process, ``--rounds`` times in turn. Timed: the interval between
the starts of consecutive steps in which every request decodes (the full batch's steady state),
median and mean per mode.

Claims, per batch size B: ``direct_decode_step_ms_bB``, ``async_decode_step_ms_bB``,
``http_decode_step_ms_bB`` (medians), ``async_step_overhead_bB`` = async / direct and
``http_step_overhead_bB`` = http / direct (1.0 = streaming costs the engine nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import multiprocessing
import random
import statistics
import sys
import time
from typing import Any


from engine_options import add_engine_options, random_token_ids
from fairswitch.config import EngineConfig
from fairswitch.engine.async_engine import AsyncEngine
from fairswitch.engine.engine import Engine
from fairswitch.engine.gc_control import frozen_heap
from fairswitch.sampling_params import SamplingParams
from fairswitch.server import BackgroundServer, ServerSettings, build_app
from results_io import command_line, write_results


class StepTimer:
    """Wraps ``engine.step`` while in its ``with`` block: the start time and output count of
    every step."""

    def __init__(self, engine: Engine) -> None:
        self.rows: list[tuple[float, int]] = []
        self._engine = engine
        self._step = engine.step

    def __enter__(self) -> StepTimer:
        self._engine.step = self._timed  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        del self._engine.step  # the instance attribute goes; the class's method shows again

    def _timed(self, **kwargs: Any) -> list:
        t = time.perf_counter()
        outputs = self._step(**kwargs)
        # Decodes only: every output's request had its first token from an earlier step.
        decodes = sum(len(o.outputs[0].token_ids) >= 2 for o in outputs)
        self.rows.append((t, decodes if decodes == len(outputs) else -1))
        return outputs

    def full_batch_periods(self, batch: int) -> list[float]:
        """Seconds between consecutive step starts where both steps were decode-only steps of
        the whole batch (the step that finishes the prompts gives every request a token too,
        but is not one)."""
        rows = self.rows
        return [b[0] - a[0] for a, b in zip(rows, rows[1:]) if a[1] == batch and b[1] == batch]


def prompts(n: int, length: int, rng: random.Random, vocab: int) -> list[list[int]]:
    return [random_token_ids(rng, length, vocab) for _ in range(n)]


def run_direct(engine: Engine, ids: list[list[int]], params: SamplingParams) -> list[float]:
    # frozen_heap: as an AsyncEngine freezes it while it serves (gc_control.py)
    with StepTimer(engine) as timer, frozen_heap():
        for p in ids:
            engine.add_request(prompt_token_ids=p, params=params)
        while engine.has_unfinished_requests():
            engine.step()
    return timer.full_batch_periods(len(ids))


async def _consume(engine: AsyncEngine, ids: list[int], params: SamplingParams) -> list[float]:
    times: list[float] = []
    async for out in engine.generate(None, params, prompt_token_ids=ids):
        now = time.perf_counter()
        times.extend([now] * len(out.outputs[0].new_token_ids))
    return times


def run_async(engine: Engine, ids: list[list[int]], params: SamplingParams) -> list[float]:
    async def main() -> list[list[float]]:
        return await asyncio.gather(*(_consume(server, p, params) for p in ids))

    with StepTimer(engine) as timer:
        server = AsyncEngine(engine)
        try:
            token_times = asyncio.run(main())
        finally:
            server.shutdown()
    if any(len(t) != params.max_tokens for t in token_times):
        raise RuntimeError("a request ended early: the measurement is not of a full batch")
    return timer.full_batch_periods(len(ids))


async def _stream_completions(url: str, model: str, ids: list[list[int]],
                              max_tokens: int) -> list[int]:
    import aiohttp

    async def one(session: aiohttp.ClientSession, prompt: list[int]) -> int:
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                "ignore_eos": True, "stream": True}
        chunks, finish = 0, None
        async with session.post(f"{url}/v1/completions", json=body) as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
            async for line in resp.content:
                if line.startswith(b"data: {"):
                    chunks += 1
                    finish = json.loads(line[6:])["choices"][0]["finish_reason"] or finish
        if finish != "length":
            raise RuntimeError(f"a stream ended with finish_reason {finish!r}, not 'length'")
        return chunks

    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=timeout) as session:
        return await asyncio.gather(*(one(session, p) for p in ids))


def http_clients(url: str, model: str, ids: list[list[int]], max_tokens: int) -> list[int]:
    """Run in a child process: stream every prompt at once; the chunks each stream carried."""
    return asyncio.run(_stream_completions(url, model, ids, max_tokens))


def run_http(engine: Engine, ids: list[list[int]], params: SamplingParams,
             clients: concurrent.futures.Executor) -> list[float]:
    name = engine.config.model.model
    with StepTimer(engine) as timer:
        server = AsyncEngine(engine)
        app = build_app(server, ServerSettings(served_model_names=[name]), shutdown_engine=False)
        try:
            with BackgroundServer(app) as http:
                clients.submit(http_clients, http.url, name, ids, params.max_tokens).result()
        finally:
            server.shutdown()
    return timer.full_batch_periods(len(ids))


def summary(periods: list[float]) -> dict[str, float]:
    if not periods:
        raise RuntimeError("no full-batch decode steps were timed: raise --output-tokens")
    ms = [p * 1e3 for p in periods]
    return {"steps": len(ms), "median_ms": statistics.median(ms), "mean_ms": statistics.fmean(ms),
            "p90_ms": sorted(ms)[int(0.9 * (len(ms) - 1))]}


def check_fits(engine: Engine, batches: list[int], tokens: int) -> None:
    """Every batch must fit the KV cache whole, or it never decodes as one batch."""
    runner = engine.runner
    per_request = -(-tokens // runner.block_size)
    if max(batches) * per_request > runner.num_blocks:
        raise SystemExit(f"a batch of {max(batches)} requests of {tokens} tokens needs "
                         f"{max(batches) * per_request} KV blocks, the cache has "
                         f"{runner.num_blocks}: raise --kv-cache-memory-gib")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_engine_options(p, model="llama-3-8b", load_format="dummy", kv_cache_memory_gib=8.0,
                       max_model_len=4608, max_num_seqs=64, swap_space=0)
    p.add_argument("--requests", default="32,64", help="batch sizes, comma-separated")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--output-tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--output", default="benchmarks/results/async_overhead.json")
    p.add_argument("--commit", default=None)
    args = p.parse_args(argv)
    try:
        batches = [int(b) for b in args.requests.split(",")]
    except ValueError:
        p.error(f"--requests must be comma-separated integers, got {args.requests!r}")
    if min(batches) < 1 or args.rounds < 1 or args.output_tokens < 3:
        p.error("--requests and --rounds must be >= 1, --output-tokens >= 3")
    if max(batches) > args.max_num_seqs:
        p.error("--requests must fit in one batch (<= --max-num-seqs)")

    engine = Engine(EngineConfig.from_cli_args(args))
    vocab = engine.hf_config.vocab_size
    check_fits(engine, batches, args.prompt_tokens + args.output_tokens)
    rng = random.Random(args.seed)
    params = SamplingParams(max_tokens=args.output_tokens, temperature=0.0, ignore_eos=True)
    run_direct(engine, prompts(2, args.prompt_tokens, rng, vocab), params)  # first-use costs, untimed
    rows, claims = [], []
    # The HTTP clients run in another process, so that they do not share the server's GIL.
    with concurrent.futures.ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("spawn")) as clients:
        for batch in batches:
            periods: dict[str, list[float]] = {"direct": [], "async": [], "http": []}
            for _ in range(args.rounds):
                periods["direct"] += run_direct(engine, prompts(batch, args.prompt_tokens, rng, vocab),
                                                params)
                periods["async"] += run_async(engine, prompts(batch, args.prompt_tokens, rng, vocab),
                                              params)
                periods["http"] += run_http(engine, prompts(batch, args.prompt_tokens, rng, vocab),
                                            params, clients)
            stats = {mode: summary(v) for mode, v in periods.items()}
            direct = stats["direct"]["median_ms"]
            row = {"batch": batch, **stats}
            for mode, s in stats.items():
                print(f"batch {batch} {mode:>6}: decode step period median {s['median_ms']:.3f} "
                      f"ms, mean {s['mean_ms']:.3f} ms, p90 {s['p90_ms']:.3f} ms over "
                      f"{s['steps']} steps")
                claims.append({"name": f"{mode}_decode_step_ms_b{batch}",
                               "value": s["median_ms"], "unit": "ms"})
            for mode in ("async", "http"):
                row[f"{mode}_step_overhead"] = ratio = stats[mode]["median_ms"] / direct
                claims.append({"name": f"{mode}_step_overhead_b{batch}", "value": ratio,
                               "unit": "x"})
            print(f"batch {batch}: streaming to asyncio consumers {row['async_step_overhead']:.3f}x"
                  f", to HTTP clients {row['http_step_overhead']:.3f}x the direct step period "
                  f"(context {args.prompt_tokens}-{args.prompt_tokens + args.output_tokens})")
            rows.append(row)
    figures = {"model": args.model, "prompt_tokens": args.prompt_tokens,
               "output_tokens": args.output_tokens, "rounds": args.rounds,
               "switch_interval_s": sys.getswitchinterval(), "rows": rows}
    return write_results(args.output, command=command_line(), figures=figures, claims=claims,
                         commit=args.commit)


if __name__ == "__main__":
    main()
