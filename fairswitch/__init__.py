"""fairswitch: a fairness-aware, preemptive LLM serving engine.

Request lifecycle (one file per stage):
  server -> engine/async_engine.py -> engine/engine.py -> scheduler/scheduler.py
  -> kv/ (block pool, per-request block tables) -> runner/model_runner.py -> model/llama.py
  -> runner/attention.py (paged attention backend) -> runner/sampler.py -> engine/output_processor.py
"""

from __future__ import annotations

from fairswitch.config import EngineConfig
from fairswitch.engine.beam_search import BeamSearchParams
from fairswitch.lora.request import LoRARequest
from fairswitch.outputs import (CompletionOutput, EmbeddingOutput, EmbeddingRequestOutput,
                                RequestOutput)
from fairswitch.pooling_params import PoolingParams
from fairswitch.sampling_params import SamplingParams
from fairswitch.structured_output import StructuredOutputsParams

__version__ = "0.1.0"


def __getattr__(name: str):
    # The engine classes pull in torch; load them on first use so that
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
    "LLM", "AsyncEngine", "Engine", "EngineConfig", "SamplingParams", "StructuredOutputsParams",
    "RequestOutput", "CompletionOutput", "BeamSearchParams", "PoolingParams",
    "EmbeddingRequestOutput", "EmbeddingOutput", "LoRARequest", "__version__",
]
