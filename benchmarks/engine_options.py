"""A benchmark's engine options: the engine's own command line (``add_engine_args``, every
``--option`` of ``fairswitch serve``) with the script's defaults, and the options its measurement
sets itself.

    p = argparse.ArgumentParser(description=...)
    add_engine_options(p, fixed={"max_num_seqs": "the largest of --batches"},
                       model="llama-3-8b", load_format="dummy")
    p.add_argument("--batches", default="1,16,64")  # the script's own options
    args = p.parse_args(argv)
    base = engine_config(p, args, max_num_seqs=max(batches))
    engine = Engine(base.with_options(async_scheduling=False))  # what one run changes

The defaults are the script's (so that running it with no options measures what it always did)
and ``--help`` shows them; an option the measurement sets itself says so in ``--help``, and
giving it on the command line is an error rather than silently overridden.
"""

from __future__ import annotations

import argparse
import random
import re
from typing import Any

from fairswitch.config import EngineConfig, add_engine_args

# The "(default: X)" that add_engine_args appends to a help text that does not explain its own.
_ENGINE_DEFAULT = re.compile(r" \(default: [^()]*\)$")


def add_engine_options(p: argparse.ArgumentParser, fixed: dict[str, str] | None = None,
                       shown: dict[str, str] | None = None, **defaults: Any) -> None:
    """``add_engine_args(p)`` with ``defaults`` (flat engine option names: ``max_num_seqs=16``)
    replacing the engine's. ``fixed``: option -> how the benchmark sets it (see ``engine_config``);
    ``shown``: option -> how ``--help`` describes a default that is not a plain value."""
    fixed, shown = fixed or {}, shown or {}
    actions = add_engine_args(p)
    unknown = (set(defaults) | set(fixed) | set(shown)) - set(actions)
    if unknown:  # a misspelt default would be ignored by EngineConfig.from_cli_args
        raise TypeError(f"not engine options: {sorted(unknown)}")
    p.set_defaults(**defaults)
    for name, value in defaults.items():
        action = actions[name]
        action.help = (_ENGINE_DEFAULT.sub("", action.help or "")
                       + f" (default here: {shown.get(name, value)})")
    for name, how in fixed.items():
        action = actions[name]
        action.help = (_ENGINE_DEFAULT.sub("", action.help or "")
                       + f" (set by this benchmark: {how})")


def engine_config(p: argparse.ArgumentParser, args: argparse.Namespace,
                  **fixed: Any) -> EngineConfig:
    """``EngineConfig.from_cli_args(args)`` with ``fixed`` (flat options the measurement sets
    itself) replaced; ``p.error`` if the command line gave one of them a value of its own."""
    given = [name for name in fixed if getattr(args, name) != p.get_default(name)]
    if given:
        p.error(", ".join("--" + name.replace("_", "-") for name in given)
                + ": set by this benchmark itself (see --help)")
    return EngineConfig.from_cli_args(args).with_options(**fixed)


def random_token_ids(rng: random.Random, length: int, vocab_size: int) -> list[int]:
    """A random prompt: ids 1000-29999, ordinary text tokens of Llama 3's vocabulary (what the
    recorded runs drew); in a smaller vocabulary, its upper three quarters."""
    low, high = min(1000, vocab_size // 4), min(30000, vocab_size)
    return [rng.randrange(low, high) for _ in range(length)]


def vocab_size(model: str) -> int:
    """The vocabulary size of ``model`` (a checkpoint directory, fairswitch-tiny or a shipped
    config name), read from its config without building anything."""
    from fairswitch.model.loader import load_checkpoint_config, resolve_model

    return load_checkpoint_config(resolve_model(model)).vocab_size
