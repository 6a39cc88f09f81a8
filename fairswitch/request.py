"""A request's state as it moves through the engine: tokens, progress, KV blocks, status.

``token_ids`` holds prompt + generated tokens; ``num_computed_tokens`` says how many of them have
their KV in the cache. Each step the scheduler lets the computed tokens catch up with the tokens
(a prefill chunk, or the one token sampled last step); there are no separate prefill/decode phases.

    token_ids:  [ p0 p1 ... pN-1 | o0 o1 ... oM-1 ]
                 <--- num_computed_tokens --->      (KV cached)
                                          <------>  scheduled this step
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from fairswitch.outputs import RequestMetrics
from fairswitch.sampling_params import SamplingParams


# Stands in ``token_ids`` for a token its launched step has not returned yet (async scheduling,
# engine.py); a step launched behind that one reads it from the device (model_runner.py).
PLACEHOLDER_TOKEN = -1


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    SWAPPED = 2  # preempted with its KV in the CPU swap space (or on its way back)
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return {
            RequestStatus.FINISHED_STOPPED: "stop",
            RequestStatus.FINISHED_LENGTH: "length",
            RequestStatus.FINISHED_ABORTED: "abort",
        }.get(self)


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float
    prompt: str | None = None
    priority: int = 0
    client_id: str | None = None
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    # KV saved in the CPU swap space: blocks, and how many leading tokens they hold validly.
    cpu_block_table: list[int] = field(default_factory=list)
    num_cpu_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose KV was reused from the prefix cache
    grouped: bool = False  # has a block group been reserved for it (kv/cache_manager.py)
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    # Scheduler bookkeeping (scheduler.py): arrival order, when it was last kept out of the batch,
    # steps run since (re)admission, starvation, and the service already charged to its client.
    seq: int = 0
    queue_hold: str | None = None  # the reserve_places hold whose place it takes while waiting
    kept_out_since: float | None = None
    out_since: float | None = None  # kept_out_since before its current seat
    num_run_steps: int = 0
    num_seated_steps: int = 0  # steps in ``running`` since (re)admission, served or not
    starving: bool = False
    num_charged_prompt_tokens: int = 0
    num_charged_output_tokens: int = 0
    # Async scheduling: the token its launched step is computing ends it by length, so the
    # step scheduled meanwhile neither runs it nor preempts it (scheduler.py, engine.py).
    finishing: bool = False
    # Chained hashes of its full blocks computed so far (reuse_index.block_hashes extends them;
    # tokens are only ever appended, so they stay valid).
    block_hashes: list[bytes] = field(default_factory=list)
    # Owned by input_batch.py: (the block_table list it mirrors, that list as an int32 array).
    block_table_array: Any = None
    # Owned by the output processor (detokenizer state) and the sampler (torch.Generator).
    detokenizer: Any = None
    generator: Any = None
    grammar: Any = None  # structured output's matcher (structured_output.py), fed each token
    # LoRA (lora/): the adapter asked for, its weights as read (host), the device slot it holds
    # while seated (-1: none; lora/slots.py)
    lora_request: Any = None
    lora_adapter: Any = None
    lora_slot: int = -1
    # Seeds its prefix-cache hashes: KV computed under one adapter (or salt) is never another's.
    cache_salt: bytes = b""
    pooling: Any = None  # PoolingParams of an embedding request: its last prompt token's state
    embedding: list[float] | None = None  # ... once computed (model_runner.collect)
    # Why the engine aborted it, where the request itself is the cause (CompletionOutput.error).
    abort_error: str | None = None
    bad_words_ids: list[list[int]] = field(default_factory=list)  # SamplingParams.bad_words'
    allowed_ids: Any = None  # SamplingParams.allowed_token_ids on the device (the sampler's)
    # Asked-for logprobs (SamplingParams.logprobs / prompt_logprobs): one entry per output
    # token, {token id: (logprob, rank)}, and per prompt position (None at 0; filled by the
    # runner as the prompt is computed).
    logprobs: list[dict[int, tuple[float, int]]] | None = None
    prompt_logprobs: list[dict[int, tuple[float, int]] | None] | None = None
    metrics: RequestMetrics = field(init=False)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        self.metrics = RequestMetrics(arrival_time=self.arrival_time)
        params = self.sampling_params
        if params.logprobs is not None:
            self.logprobs = []
        if params.prompt_logprobs is not None:
            self.prompt_logprobs = [None] * len(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def is_finished(self) -> bool:
        return self.status.finished
