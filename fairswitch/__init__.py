"""fairswitch: a fairness-aware, preemptive LLM serving engine.

Request lifecycle (one file per stage):
  server -> engine/async_engine.py -> engine/engine.py -> scheduler/scheduler.py
  -> kv/ (block pool, per-request block tables) -> runner/model_runner.py -> model/llama.py
  -> runner/attention.py (paged attention backend) -> runner/sampler.py -> engine/output_processor.py
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"


def _map_kernels_namespace() -> None:
    # An installed wheel carries kernels/ as fairswitch/kernels (pyproject's package-dir), and an
    # editable install maps it with a finder. Running straight from a source tree has neither, so
    # the top-level kernels/ directory is registered as fairswitch.kernels by hand.
    if importlib.util.find_spec("fairswitch.kernels") is not None:
        return
    src = Path(__file__).resolve().parent.parent / "kernels"
    if not (src / "__init__.py").is_file():
        return
    spec = importlib.util.spec_from_file_location(
        "fairswitch.kernels", src / "__init__.py", submodule_search_locations=[str(src)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fairswitch.kernels"] = module
    spec.loader.exec_module(module)


_map_kernels_namespace()

from fairswitch.config import EngineConfig  # noqa: E402
from fairswitch.outputs import CompletionOutput, RequestOutput  # noqa: E402
from fairswitch.sampling_params import SamplingParams  # noqa: E402


def __getattr__(name: str):
    # The engine classes pull in torch and transformers; load them on first use so that
    # `import fairswitch` (and `fairswitch --help`) stays fast.
    if name == "LLM":
        from fairswitch.engine.llm import LLM

        return LLM
    if name == "AsyncEngine":
        from fairswitch.engine.async_engine import AsyncEngine

        return AsyncEngine
    if name == "Engine":
        from fairswitch.engine.engine import Engine

        return Engine
    raise AttributeError(f"module 'fairswitch' has no attribute {name!r}")


__all__ = [
    "LLM", "AsyncEngine", "Engine", "EngineConfig", "SamplingParams", "RequestOutput",
    "CompletionOutput", "__version__",
]
