"""Triton compiles while serving: how many, how long, which kernel specialization.

Triton compiles a kernel the first time it is launched with a new specialization (constexprs,
and for plain integer and pointer arguments whether they equal 1 or are 16-aligned). A compile
takes 0.3-1 s of host time during which the step waits and the GPU idles, so one that happens
after start-up is a first-token or token-gap outlier of that size. ``JIT_CLOCK`` times every
compile through Triton's JIT hooks; the engine reports the count and time (switch metrics
``kernel_compiles`` / ``kernel_compile_s``, the step log's ``jit_s``) and logs each compile that
happens while serving with the kernel's signature, so the specialization can be warmed up or
made not to matter.
"""

from __future__ import annotations

import logging
import time
from typing import Any

logger = logging.getLogger(__name__)


class JitClock:
    def __init__(self) -> None:
        self.count = 0
        self.total_s = 0.0
        self.serving = False  # set once the engine has started: compiles from then on are logged
        self._starts: dict[Any, float] = {}  # by compile key: Triton may compile concurrently
        self._installed = False
        self._previous: tuple[Any, Any] = (None, None)

    def install(self) -> bool:
        """Hook Triton's JIT (idempotent); False where this Triton has no hooks to set."""
        if self._installed:
            return True
        try:
            from triton import knobs
        except ImportError:
            return False
        runtime = getattr(knobs, "runtime", None)
        if runtime is None or not hasattr(runtime, "jit_post_compile_hook"):
            return False
        self._previous = (runtime.jit_cache_hook, runtime.jit_post_compile_hook)
        runtime.jit_cache_hook = self._before
        runtime.jit_post_compile_hook = self._after
        self._installed = True
        return True

    def uninstall(self) -> None:
        """Put back the hooks found at install, unless someone replaced ours since."""
        if self._installed:
            from triton import knobs

            rt = knobs.runtime
            if rt.jit_cache_hook == self._before and rt.jit_post_compile_hook == self._after:
                rt.jit_cache_hook, rt.jit_post_compile_hook = self._previous
            self._installed = False
            self._starts.clear()

    @staticmethod
    def _key(kw: dict[str, Any]) -> Any:
        key = kw.get("key")
        try:
            hash(key)
        except TypeError:
            key = repr(key)
        return key

    def _before(self, **kw: Any) -> Any:
        self._starts[self._key(kw)] = time.perf_counter()
        previous = self._previous[0]
        return previous(**kw) if previous is not None else False  # False: go on and compile

    def _after(self, **kw: Any) -> Any:
        start = self._starts.pop(self._key(kw), None)
        if start is not None:
            seconds = time.perf_counter() - start
            self.count += 1
            self.total_s += seconds
            if self.serving:
                try:
                    what = describe(kw)
                except Exception:  # noqa: BLE001 - never fail Triton's compile for a log line
                    what = str(kw.get("repr", "?"))
                logger.warning("Triton compiled a kernel while serving (%.2f s, the step "
                               "waited): %s", seconds, what)
        previous = self._previous[1]
        return previous(**kw) if previous is not None else None


def describe(kw: dict[str, Any]) -> str:
    """The compiled kernel's name and specialization, from the hook's keyword arguments: the
    constexpr values and, per argument index, the attributes Triton specialized on (16-byte
    alignment / divisibility; arguments equal to 1 appear among the constants)."""
    fn = kw.get("fn")
    name = getattr(fn, "name", None) or kw.get("repr", "?").split("[", 1)[0]
    compile_kw = kw.get("compile") or {}
    names = list(getattr(getattr(fn, "jit_function", None), "arg_names", None) or [])

    def named(d: Any) -> dict[str, Any]:
        if not isinstance(d, dict):
            return {}
        out = {}
        for k, v in d.items():
            i = k[0] if isinstance(k, tuple) and len(k) == 1 else k
            out[names[i] if isinstance(i, int) and i < len(names) else str(k)] = v
        return out

    constants = named(compile_kw.get("constants"))
    configs = compile_kw.get("configs") or [{}]
    return f"{name} constants={constants} specialized={named(configs[0])}"


JIT_CLOCK = JitClock()
