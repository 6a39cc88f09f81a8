"""The garbage collector around serving: pauses measured, the start-up heap frozen out of full
collections while an engine serves and given back to them when it stops."""

from __future__ import annotations

import gc
import weakref

from fairswitch.config import EngineConfig
from fairswitch.engine import gc_control
from fairswitch.engine.async_engine import AsyncEngine
from fairswitch.engine.gc_control import GCClock, frozen_heap
from fairswitch.engine.step_log import COLUMNS
from helpers import run_logged


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_clock_counts_collections_per_generation_and_their_time():
    clock = GCClock()
    clock.install()
    clock.install()  # idempotent: one hook
    try:
        gc.collect()
        gc.collect(0)
    finally:
        clock.uninstall()
    assert clock.count[2] == 1 and clock.count[0] >= 1
    assert clock.total_s > 0 and 0 < clock.max_s <= clock.total_s
    total = clock.total_s
    gc.collect()
    assert clock.total_s == total  # uninstalled: no longer counting
    assert clock._callback not in gc.callbacks


def test_frozen_heap_keeps_old_cycles_until_it_ends_and_nests():
    before = gc_control._num_frozen
    old = _Cycle()
    ref = weakref.ref(old)
    with frozen_heap():
        assert gc.get_freeze_count() > 0
        with frozen_heap():
            pass
        del old
        gc.collect()
        assert ref() is not None  # frozen: full collections skip it
        young = _Cycle()
        young_ref = weakref.ref(young)
        del young
        gc.collect()
        assert young_ref() is None  # what serving allocates is still collected
    assert gc_control._num_frozen == before
    if before == 0:
        assert gc.get_freeze_count() == 0
        gc.collect()
        assert ref() is None


def test_async_engine_freezes_while_serving_and_can_be_collected_after():
    before = gc_control._num_frozen
    engine = AsyncEngine.from_config(EngineConfig.from_kwargs(num_gpu_blocks=64, max_model_len=256))
    assert gc_control._num_frozen == before + 1 and gc.get_freeze_count() > 0
    kv = weakref.ref(engine.engine.runner.kv_cache)
    engine.shutdown()
    assert gc_control._num_frozen == before
    if before == 0:
        assert gc.get_freeze_count() == 0  # shut down: nothing stays frozen
    del engine
    gc.collect()
    if before == 0:
        assert kv() is None  # the cache is not kept alive by the frozen generation

    off = AsyncEngine.from_config(EngineConfig.from_kwargs(num_gpu_blocks=64, max_model_len=256,
                                                           freeze_gc=False))
    assert gc_control._num_frozen == before
    off.shutdown()


def test_a_collection_inside_a_step_shows_in_its_gc_column():
    engine, log, before = run_logged(gc.collect, max_tokens=3)
    gc_col = COLUMNS.index("gc_s")
    assert len(log.rows) == 3 and all(r[gc_col] > 0 for r in log.rows)
    metrics = engine.switch_metrics()
    assert metrics["gc_full_collections"] >= before["gc_full_collections"] + 3
    assert metrics["gc_pause_s"] > 0


def test_an_async_engine_dropped_without_shutdown_unfreezes_once_its_thread_ends():
    # frozen_heap() is a generator context: collecting the engine (and its ExitStack) closes it,
    # which runs its finally clause
    before = gc_control._num_frozen
    engine = AsyncEngine.from_config(EngineConfig.from_kwargs(num_gpu_blocks=64,
                                                              max_model_len=256))
    assert gc_control._num_frozen == before + 1
    engine._stopping = True  # its thread ends, as after a failure, but shutdown() never runs
    engine._wake.set()
    engine._thread.join(10)
    del engine
    gc.collect()
    assert gc_control._num_frozen == before
