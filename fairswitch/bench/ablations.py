"""The engine configurations a comparison run can name (``fairswitch bench --compare``).

Each name sets every context-switch mechanism explicitly, so a comparison means the same thing
whatever switches the base command line carried: ``full`` has them all on, ``baseline`` is
vLLM 0.3.3's switching (``CacheConfig.baseline``; its synchronous swaps also mean no async
scheduling), and each ``no-*`` is ``full`` with one mechanism off (``early-swap-in``: ``full``
with that option on; ``full-fp8``: ``full`` with an fp8 KV cache, and with it fp8's default block
size where the base leaves it unset). Everything else (model, KV size and, but for ``full-fp8``,
KV dtype, scheduler, policy) comes from the base configuration.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from fairswitch.config import EngineConfig

# cpu_kv_reuse None: on wherever it can be (not with --swap-space 0, nor in no-reuse).
_FULL: dict[str, Any] = {"baseline": False, "block_groups": True, "enable_prefix_caching": True,
                         "cpu_kv_reuse": None, "async_swap": True, "duplex_swap": True,
                         "incremental_swap": True,
                         "per_layer_swap": False, "early_swap_in": False,
                         "async_scheduling": True}
_SCHEDULER_KEYS = {"async_scheduling"}  # the rest are CacheConfig's

ABLATIONS: dict[str, dict[str, Any]] = {
    "full": {},
    "baseline": {"baseline": True},
    "no-groups": {"block_groups": False},
    "no-async": {"async_swap": False},
    "no-duplex": {"duplex_swap": False},  # swap-outs and swap-ins on one stream
    "no-incremental": {"incremental_swap": False},
    "no-reuse": {"enable_prefix_caching": False},  # both tiers
    "no-cpu-reuse": {"cpu_kv_reuse": False},  # GPU prefix cache only
    "per-layer": {"per_layer_swap": True},
    "early-swap-in": {"early_swap_in": True},  # full plus an option that is off by default
    "no-async-sched": {"async_scheduling": False},
    "full-fp8": {"kv_cache_dtype": "fp8"},  # half the bytes per token: twice the tokens per GiB
}


def parse_names(text: str) -> list[str]:
    """``"full,baseline"`` -> ``["full", "baseline"]``; unknown or repeated names are refused."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in ABLATIONS]
    if unknown:
        raise ValueError(f"unknown configuration(s) {', '.join(unknown)}; "
                         f"known: {', '.join(ABLATIONS)}")
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"--compare needs distinct configuration names, got {text!r}")
    return names


def ablation_config(name: str, base: EngineConfig) -> EngineConfig:
    """``base`` with the mechanisms ``name`` stands for (a new object; ``base`` is untouched)."""
    config = copy.deepcopy(base)
    settings = {**_FULL, **ABLATIONS[name]}
    # replace() runs CacheConfig.__post_init__ again, which applies what baseline implies.
    config.cache = dataclasses.replace(config.cache, **{
        k: v for k, v in settings.items() if k not in _SCHEDULER_KEYS})
    config.scheduler = dataclasses.replace(config.scheduler, **{
        k: v for k, v in settings.items() if k in _SCHEDULER_KEYS})
    return config
