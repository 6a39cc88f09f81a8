"""Beam search (vLLM's ``LLM.beam_search``), built on one-token generations: each step asks the
engine for every live beam's next token with its ``2 x beam_width`` most likely alternatives
(prefix caching keeps the beams' shared KV), keeps the ``beam_width`` best continuations by
length-penalized cumulative log-probability, and sets aside each beam that ends with an
end-of-sequence token. The search is here, engine-free; ``LLM.beam_search`` drives its steps.

Scores are vLLM's: ``cum_logprob / len(tokens) ** length_penalty``, the length counting the
prompt (and not a final end-of-sequence token). Log-probabilities are the model's raw ones (as
logprobs are here), so ``temperature`` changes nothing but the token each step samples, which
the search does not use.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from fairswitch.outputs import RequestOutput
from fairswitch.sampling_params import MAX_LOGPROBS, SamplingParams

MAX_BEAM_WIDTH = MAX_LOGPROBS // 2  # (each step asks for 2 x beam_width alternatives)
# length ** length_penalty stays a finite float, nonzero, for lengths up to 2^20 tokens
MAX_LENGTH_PENALTY = 50


@dataclass(frozen=True)
class BeamSearchParams:
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        for name in ("beam_width", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an integer, got {value!r:.40}")
        if not 1 <= self.beam_width <= MAX_BEAM_WIDTH:
            raise ValueError(f"beam_width must be in [1, {MAX_BEAM_WIDTH}], got "
                             f"{self.beam_width}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not isinstance(self.ignore_eos, bool):
            raise TypeError(f"ignore_eos must be a bool, got {self.ignore_eos!r:.40}")
        for name in ("temperature", "length_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise TypeError(f"{name} must be a finite number, got {value!r:.40}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not -MAX_LENGTH_PENALTY <= self.length_penalty <= MAX_LENGTH_PENALTY:
            raise ValueError(f"length_penalty must be in [-{MAX_LENGTH_PENALTY}, "
                             f"{MAX_LENGTH_PENALTY}], got {self.length_penalty}")

    def step_params(self) -> SamplingParams:
        """What each beam asks of the engine at a step: one token, its alternatives."""
        return SamplingParams(max_tokens=1, logprobs=2 * self.beam_width,
                              temperature=self.temperature, ignore_eos=True, detokenize=False)


@dataclass
class BeamSearchSequence:
    """One beam: ``tokens`` are the prompt's and then the generated ones (as vLLM's);
    ``text`` the generated text (a final end-of-sequence token left out; vLLM's offline
    ``beam_search`` puts the prompt's text before it), set at the end."""

    tokens: list[int]
    cum_logprob: float = 0.0
    finish_reason: str | None = None  # "stop" (end of sequence) or "length", at the end
    text: str = ""

    @property
    def stop_reason(self) -> int | None:
        """The end-of-sequence token a beam that stopped ended with (vLLM's stop_reason)."""
        return self.tokens[-1] if self.finish_reason == "stop" else None


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence] = field(default_factory=list)  # best first


class BeamSearch:
    """One prompt's search: ``live`` beams take a step each ``advance``, until ``finished``."""

    def __init__(self, prompt_ids: list[int], params: BeamSearchParams,
                 eos_token_ids: set[int]) -> None:
        self.params = params
        self.num_prompt_tokens = len(prompt_ids)
        self.eos_token_ids = set() if params.ignore_eos else set(eos_token_ids)
        self.live = [BeamSearchSequence(list(prompt_ids))]
        self.ended: list[BeamSearchSequence] = []
        self.steps = 0

    @property
    def finished(self) -> bool:
        return not self.live or self.steps >= self.params.max_tokens

    def advance(self, alternatives: list[dict[int, float]]) -> None:
        """One step: for each live beam (in order), its next token's alternatives (token id ->
        log-probability)."""
        if len(alternatives) != len(self.live):
            raise ValueError(f"{len(self.live)} live beams but {len(alternatives)} steps")
        grown = []
        for beam, alts in zip(self.live, alternatives):
            for token, logprob in alts.items():
                child = BeamSearchSequence(beam.tokens + [token], beam.cum_logprob + logprob)
                if token in self.eos_token_ids:
                    child.finish_reason = "stop"
                    self.ended.append(child)
                else:
                    grown.append(child)
        grown.sort(key=self.score, reverse=True)
        self.live = grown[:self.params.beam_width]
        self.steps += 1

    def score(self, beam: BeamSearchSequence) -> float:
        length = len(beam.tokens) - (beam.finish_reason == "stop")
        return beam.cum_logprob / length ** self.params.length_penalty

    def best(self) -> list[BeamSearchSequence]:
        """The ``beam_width`` best beams, ended or not (those "length"), best first."""
        for beam in self.live:
            beam.finish_reason = "length"
        return sorted(self.ended + self.live, key=self.score,
                      reverse=True)[:self.params.beam_width]

    def generated(self, beam: BeamSearchSequence) -> list[int]:
        """A beam's generated tokens, a final end-of-sequence token left out (its text's)."""
        end = len(beam.tokens) - (beam.finish_reason == "stop")
        return beam.tokens[self.num_prompt_tokens:end]


def advance_all(searches: list[BeamSearch], outputs: Iterable[RequestOutput]) -> None:
    """One step of ``searches``: ``outputs`` are their live beams' one-token generations (with
    ``step_params``' logprobs), search by search and beam by beam."""
    found = iter(outputs)
    for search in searches:
        search.advance([{token: lp.logprob for token, lp in
                         next(found).outputs[0].logprobs[0].items()} for _ in search.live])
