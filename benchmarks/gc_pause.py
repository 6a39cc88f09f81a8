"""Garbage-collector pause: how long one full collection stalls a serving process, with the
start-up heap frozen (``freeze_gc``, what the server and the bench do) and without.

A full (generation 2) collection holds the GIL while it walks every tracked object, so the
engine's step waits for it. The engine is built as serving builds it (default Llama-3-8B shapes,
dummy weights, CUDA graphs); then the start-up heap is frozen (``gc.freeze``) and ``--requests``
requests are served, their outputs kept as a client would, so that the heap holds what serving
allocates too. Timed: a full collection's pause (median of ``--repeats``) with that heap frozen
out of it, and with everything unfrozen, one after the other in this process.

Claims: ``gc_full_collection_ms`` (unfrozen), ``gc_full_collection_ms_frozen``, and
``gc_pause_reduction_frozen`` = unfrozen / frozen.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
from typing import Any


from engine_options import add_engine_options, random_token_ids
from fairswitch.config import EngineConfig
from fairswitch.engine.engine import Engine
from fairswitch.sampling_params import SamplingParams
from results_io import command_line, write_results


def full_collection_ms(repeats: int) -> float:
    pauses = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        gc.collect()
        pauses.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(pauses)


def serve(engine: Engine, args: argparse.Namespace) -> list[Any]:
    rng = random.Random(args.seed)
    params = SamplingParams(max_tokens=args.output_tokens, temperature=0.0, ignore_eos=True)
    for _ in range(args.requests):
        engine.add_request(prompt_token_ids=random_token_ids(rng, args.prompt_tokens,
                                                             engine.hf_config.vocab_size),
                           params=params)
    outputs = []
    while engine.has_unfinished_requests():
        outputs.extend(engine.step())
    return outputs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_engine_options(p, model="llama-3-8b", load_format="dummy", kv_cache_memory_gib=3.0,
                       max_model_len=4608, max_num_seqs=64, swap_space=0)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--output", default="benchmarks/results/gc_pause.json")
    p.add_argument("--commit", default=None)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.requests < 0:
        p.error("--repeats must be >= 1 and --requests >= 0")
    config = EngineConfig.from_cli_args(args)

    t0 = time.perf_counter()
    engine = Engine(config)
    build_s = time.perf_counter() - t0
    startup_objects = len(gc.get_objects())
    gc.collect()
    gc.freeze()
    outputs = serve(engine, args)
    frozen_objects = gc.get_freeze_count()
    serving_objects = len(gc.get_objects())  # tracked and not frozen
    frozen_ms = full_collection_ms(args.repeats)
    gc.unfreeze()
    unfrozen_ms = full_collection_ms(args.repeats)
    ratio = unfrozen_ms / frozen_ms
    print(f"engine built in {build_s:.1f} s; tracked objects: {startup_objects} at start-up, "
          f"{frozen_objects} frozen, {serving_objects} allocated by serving {args.requests} "
          f"requests ({len(outputs)} outputs kept)")
    print(f"full collection: {unfrozen_ms:.2f} ms unfrozen, {frozen_ms:.3f} ms with the "
          f"start-up heap frozen: {ratio:.0f}x shorter")
    figures = {"model": args.model, "build_s": build_s, "startup_objects": startup_objects,
               "frozen_objects": frozen_objects, "serving_objects": serving_objects,
               "requests": args.requests, "prompt_tokens": args.prompt_tokens,
               "output_tokens": args.output_tokens, "repeats": args.repeats,
               "full_collection_ms": unfrozen_ms, "full_collection_ms_frozen": frozen_ms,
               "gc_threshold": list(gc.get_threshold())}
    claims = [
        {"name": "gc_full_collection_ms", "value": unfrozen_ms, "unit": "ms"},
        {"name": "gc_full_collection_ms_frozen", "value": frozen_ms, "unit": "ms"},
        {"name": "gc_pause_reduction_frozen", "value": ratio, "unit": "x"},
    ]
    return write_results(args.output, command=command_line(), figures=figures, claims=claims,
                         commit=args.commit)


if __name__ == "__main__":
    main()
