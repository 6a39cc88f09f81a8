"""Triton compiles timed through Triton's JIT hooks; after start-up each is logged by kernel."""

from __future__ import annotations

import logging

import pytest

from fairswitch.runner.jit_watch import JitClock

knobs = pytest.importorskip("triton").knobs


@pytest.fixture
def hooks():
    saved = (knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook)
    yield
    knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = saved


def test_clock_times_compiles_chains_hooks_and_logs_those_while_serving(hooks, caplog):
    calls = []
    def before(**kw):
        calls.append(("before", kw["repr"]))
        return False

    def after(**kw):
        calls.append(("after", kw["repr"]))

    knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = before, after
    clock = JitClock()
    assert clock.install() and clock.install()  # idempotent
    assert knobs.runtime.jit_cache_hook == clock._before

    # Triton calls the hooks around a compile, with keyword arguments
    assert knobs.runtime.jit_cache_hook(repr="_k1(a: i32)", key=1) is False  # compile goes on
    knobs.runtime.jit_post_compile_hook(repr="_k1(a: i32)", key=1)
    knobs.runtime.jit_post_compile_hook(repr="_k1(a: i32)", key=9)  # no start seen: not counted
    assert clock.count == 1 and clock.total_s > 0
    assert not [r for r in caplog.records if "Triton compiled" in r.message]  # start-up

    clock.serving = True
    with caplog.at_level(logging.WARNING, logger="fairswitch.runner.jit_watch"):
        knobs.runtime.jit_cache_hook(repr="_k2(a: i32:16)", key=2)
        knobs.runtime.jit_post_compile_hook(repr="_k2(a: i32:16)", key=2)
    assert clock.count == 2
    assert any("_k2(a: i32:16)" in r.message for r in caplog.records)
    assert calls == [("before", "_k1(a: i32)"), ("after", "_k1(a: i32)"),
                     ("after", "_k1(a: i32)"),  # the previous hook still hears of it
                     ("before", "_k2(a: i32:16)"), ("after", "_k2(a: i32:16)")]

    clock.uninstall()
    assert knobs.runtime.jit_cache_hook is before and knobs.runtime.jit_post_compile_hook is after
    knobs.runtime.jit_cache_hook(repr="x", key=3)
    knobs.runtime.jit_post_compile_hook(repr="x", key=3)
    assert clock.count == 2 and calls[-1] == ("after", "x")


def test_overlapping_compiles_are_each_timed_and_a_replaced_hook_is_left_alone(hooks):
    knobs.runtime.jit_cache_hook = knobs.runtime.jit_post_compile_hook = None
    clock = JitClock()
    clock.install()
    knobs.runtime.jit_cache_hook(key=("a",))
    knobs.runtime.jit_cache_hook(key=("b",))  # a second compile starts before the first ends
    knobs.runtime.jit_post_compile_hook(key=("a",))
    knobs.runtime.jit_post_compile_hook(key=("b",))
    assert clock.count == 2
    mine = knobs.runtime.jit_post_compile_hook
    knobs.runtime.jit_post_compile_hook = theirs = lambda **kw: None  # another library's
    clock.uninstall()
    assert knobs.runtime.jit_post_compile_hook is theirs and mine is not theirs


def test_engine_reports_compiles_and_the_step_log_has_their_column():
    import time

    from fairswitch.engine.step_log import COLUMNS
    from fairswitch.runner.jit_watch import JIT_CLOCK
    from helpers import run_logged

    def compile_10_ms():  # as Triton reports a compile
        knobs.runtime.jit_cache_hook(repr="_k(x)", key=0)
        time.sleep(0.01)
        knobs.runtime.jit_post_compile_hook(repr="_k(x)", key=0)

    JIT_CLOCK.install()  # the engine hooks Triton when its kernels run; this one runs torch's
    engine, log, before = run_logged(compile_10_ms, max_tokens=2)
    col = COLUMNS.index("jit_s")
    assert len(log.rows) == 2 and all(r[col] >= 0.009 for r in log.rows)
    metrics = engine.switch_metrics()
    assert metrics["kernel_compiles"] == before["kernel_compiles"] + 2 and JIT_CLOCK.serving


def test_describe_names_the_kernel_and_its_specialized_arguments():
    from fairswitch.runner.jit_watch import describe

    class Jit:
        arg_names = ["q_ptr", "k_ptr", "num_seqs"]

    class Fn:
        name, jit_function = "_prefill_kernel", Jit()

    text = describe({"fn": Fn(), "compile": {"constants": {(2,): 1},
                                             "configs": [{(0,): [["tt.divisibility", 16]]}]}})
    assert text == ("_prefill_kernel constants={'num_seqs': 1} "
                    "specialized={'q_ptr': [['tt.divisibility', 16]]}")
    assert describe({"repr": "_k[num_warps=4](x: i32)"}).startswith("_k constants={}")
