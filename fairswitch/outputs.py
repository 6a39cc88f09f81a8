"""What the engine hands back per request and step (vLLM-compatible shape)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Logprob:
    """A token's log-probability under the model's raw logits, its rank among the vocabulary
    (1: the most likely), and its text."""
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# Per position: the token there (sampled, or the prompt's) and the most likely ones.
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str  # cumulative, stop string already cut
    token_ids: list[int]  # cumulative
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that matched
    new_text: str = ""  # text added by this step (for streaming)
    new_token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] | None = None  # cumulative, one per token (if asked)
    cumulative_logprob: float | None = None
    new_logprobs: list[PositionLogprobs] = field(default_factory=list)  # this step's
    # Finished "abort" by the engine for a cause in the request itself (its structure and its
    # token restrictions leaving no token): why. None for an abort from outside.
    error: str | None = None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0
    embedding: list[float] | None = None  # an embedding request's (PoolingParams), finished
    # One per prompt token (None for the first, which nothing predicts), if asked.
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    lora_request: Any = None  # the LoRARequest it ran with (lora/request.py), if any


@dataclass
class EmbeddingOutput:
    embedding: list[float]


@dataclass
class EmbeddingRequestOutput:
    """``LLM.embed``'s result for one prompt, as vLLM's."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput
    finished: bool = True


@dataclass
class ScoringOutput:
    score: float


@dataclass
class ScoringRequestOutput:
    """``LLM.score``'s result for one pair, as vLLM's."""
    request_id: str
    prompt_token_ids: list[int]  # the pair's two texts' ids, one after the other
    outputs: ScoringOutput
    finished: bool = True
