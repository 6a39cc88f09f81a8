"""Per-request sampling and stopping parameters, validated on construction (vLLM's field names):
a field of the wrong type is a TypeError, a value out of range a ValueError, each naming the field
first (the server turns either into a 400 naming it)."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

from fairswitch.structured_output import StructuredOutputsParams

# Temperatures below this sample greedily, as in vLLM: the distribution is the argmax's to within
# float32 rounding, and far smaller ones would overflow the scaled logits.
GREEDY_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    """As vLLM defines them. Penalties follow vLLM (and OpenAI): ``presence_penalty`` is
    subtracted from the logit of every token the output contains, ``frequency_penalty`` once per
    occurrence in the output, and ``repetition_penalty`` divides a positive logit (multiplies a
    negative one) of every token of the prompt or the output. ``logprobs`` / ``prompt_logprobs``:
    how many most likely tokens to return beside the sampled (or prompt) token, each with its
    log-probability under the model's raw logits (before penalties and temperature); None: no
    logprobs. ``n`` copies of a request are sampled independently (``LLM.generate``; a seed gives
    copy i the seed ``seed + i``)."""
    max_tokens: int | None = 16  # None: up to max_model_len (the prompt's room), as vLLM
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0  # no EOS, stop token or stop string before this many output tokens
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    detokenize: bool = True
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    allowed_token_ids: list[int] | None = None  # the only tokens it may sample (vLLM's)
    # Words never to be written: each one's tokens (with and without a leading space), the
    # last one masked where the output so far ends with the others (vLLM's).
    bad_words: list[str] | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    n: int = 1
    # The reply held to a JSON schema, a regex, a choice or a grammar (structured_output.py).
    structured_outputs: StructuredOutputsParams | None = None
    # Keep only the prompt's last k tokens (-1: as many as leave room for one output token).
    truncate_prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        # vLLM's forms: None for none, one string or one id for a list of one
        if self.stop is None or isinstance(self.stop, str):
            self.stop = [] if self.stop is None else [self.stop]
        if self.stop_token_ids is None or isinstance(self.stop_token_ids, int):
            self.stop_token_ids = [] if self.stop_token_ids is None else [self.stop_token_ids]
        for name in ("stop", "stop_token_ids"):
            if not isinstance(getattr(self, name), (list, tuple)):
                raise TypeError(f"{name} must be a list, got {getattr(self, name)!r}")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens",
                     "detokenize"):
            if not isinstance(getattr(self, name), bool):  # "no" would be true
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        if self.max_tokens is not None:  # None: as many as the context has room for
            _check_int("max_tokens", self.max_tokens)
            if self.max_tokens < 1:
                raise ValueError(f"max_tokens must be at least 1 or None, got {self.max_tokens}")
        _check_is_number("temperature", self.temperature)
        if not (self.temperature >= 0.0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        _check_is_number("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_int("top_k", self.top_k)
        if not -1 <= self.top_k < 2**31:
            raise ValueError(f"top_k must be -1, 0 (disabled) or a positive int32, got {self.top_k}")
        if self.seed is not None:
            _check_int("seed", self.seed)
            if not -(2**63) <= self.seed < 2**64:  # what a torch.Generator accepts
                raise ValueError(f"seed must fit in 64 bits, got {self.seed}")
        for s in self.stop:
            if not isinstance(s, str):
                raise TypeError(f"stop strings must be strings, got {s!r}")
            if not s:
                raise ValueError("stop strings must not be empty")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids entry", t)
            if t < 0:
                raise ValueError(f"stop_token_ids must be >= 0, got {t}")
        if self.stop and not self.detokenize:
            raise ValueError("stop strings need detokenize=True")
        _check_number("min_p", self.min_p, 0.0, 1.0)
        _check_int("min_tokens", self.min_tokens)
        if not 0 <= self.min_tokens <= (self.max_tokens or self.min_tokens):
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], "
                             f"got {self.min_tokens}")
        _check_number("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_number("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _check_number("repetition_penalty", self.repetition_penalty, 0.0, float("inf"))
        if self.repetition_penalty == 0.0:
            raise ValueError("repetition_penalty must be > 0, got 0")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise TypeError(f"logit_bias must map token ids to numbers, got "
                                f"{self.logit_bias!r}")
            self.logit_bias = {_token_id(t): _bias(b) for t, b in self.logit_bias.items()}
        if self.allowed_token_ids is not None:
            if not isinstance(self.allowed_token_ids, (list, tuple)) or not self.allowed_token_ids:
                raise ValueError(f"allowed_token_ids must be a non-empty list of token ids, got "
                                 f"{self.allowed_token_ids!r:.60}")
            for t in self.allowed_token_ids:
                _check_int("allowed_token_ids entry", t)
                if t < 0:  # (the vocabulary's upper bound is checked against the model)
                    raise ValueError(f"allowed_token_ids must be >= 0, got {t}")
            self.allowed_token_ids = sorted(set(self.allowed_token_ids))  # (at most the vocab)
        if self.bad_words is not None:
            if not isinstance(self.bad_words, (list, tuple)):
                raise TypeError(f"bad_words must be a list of strings, got {self.bad_words!r:.60}")
            if len(self.bad_words) > MAX_BAD_WORDS:
                raise ValueError(f"bad_words holds {len(self.bad_words)} words; at most "
                                 f"{MAX_BAD_WORDS} are allowed")
            for word in self.bad_words:
                if not isinstance(word, str):
                    raise TypeError(f"bad_words must be strings, got {word!r:.40}")
                if not word.strip():
                    raise ValueError("bad_words must not be empty or only whitespace")
                if len(word) > MAX_BAD_WORD_CHARS:
                    raise ValueError(f"bad_words must be at most {MAX_BAD_WORD_CHARS} "
                                     f"characters each, got one of {len(word)}")
            self.bad_words = list(self.bad_words)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value)
                if not 0 <= value <= MAX_LOGPROBS:
                    raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}], got {value}")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs,
                                                                  StructuredOutputsParams):
            raise TypeError(f"structured_outputs must be StructuredOutputsParams, got "
                            f"{type(self.structured_outputs).__name__}")
        if self.truncate_prompt_tokens is not None:
            _check_int("truncate_prompt_tokens", self.truncate_prompt_tokens)
            if self.truncate_prompt_tokens < 1 and self.truncate_prompt_tokens != -1:
                raise ValueError(f"truncate_prompt_tokens must be -1 (all that fit) or at least "
                                 f"1, got {self.truncate_prompt_tokens}")
        _check_int("n", self.n)
        if not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be in [1, {MAX_N}], got {self.n}")
        if self.seed is not None and self.seed + self.n - 1 >= 2**64:  # copy i: seed + i
            raise ValueError(f"seed must fit in 64 bits for each of the n={self.n} copies "
                             f"(seed + {self.n - 1} at most {2**64 - 1}), got {self.seed}")

    # Asked every step for every request; properties, not values derived at construction, so
    # that fields set (or changed in place) afterwards count, as in vLLM.
    @property
    def has_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    @property
    def needs_history(self) -> bool:
        """Does sampling depend on the tokens so far (all of them known, none in flight):
        penalties, bad words, or a grammar fed each token?"""
        return self.has_penalties or bool(self.bad_words) or self.structured_outputs is not None

    @property
    def shapes_logits(self) -> bool:
        """Is anything done to the logits before temperature (bias, penalties, min_tokens,
        allowed tokens, bad words, a grammar's mask)?"""
        return (bool(self.logit_bias) or self.has_penalties or self.min_tokens > 0
                or self.structured_outputs is not None or self.allowed_token_ids is not None
                or bool(self.bad_words))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    def copies(self) -> list[SamplingParams]:
        """The ``n`` one-sequence requests this stands for: copy i seeded ``seed + i``."""
        if self.n == 1:
            return [self]
        return [dataclasses.replace(self, n=1, seed=None if self.seed is None else self.seed + i)
                for i in range(self.n)]


MAX_LOGPROBS = 20  # OpenAI's top_logprobs limit
# Each bad word is looked for in the output at every step of its request: a bounded list keeps
# that (and its tokenization when the request is added) small beside the step.
MAX_BAD_WORDS = 1024
MAX_BAD_WORD_CHARS = 1024
MAX_N = 64


def _check_is_number(name: str, value: object) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {value!r}")


def _check_number(name: str, value: object, low: float, high: float) -> None:
    _check_is_number(name, value)
    if not low <= value <= high:  # (NaN is in no range)
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")


def _token_id(value: object) -> int:
    if isinstance(value, str):  # JSON object keys are strings
        digits = value.strip()
        if not re.fullmatch(r"-?[0-9]+", digits):
            raise TypeError(f"logit_bias token id must be an integer, got {value!r:.40}")
        if len(digits) > 18:  # (int() refuses past 4300 digits; no vocabulary comes near)
            raise ValueError(f"logit_bias token ids must be in the vocabulary, got one of "
                             f"{len(digits)} digits")
        value = int(digits)
    _check_int("logit_bias token id", value)
    if value < 0:  # (the vocabulary's upper bound is checked against the model)
        raise ValueError(f"logit_bias token ids must be >= 0, got {value}")
    return value  # type: ignore[return-value]


def _bias(value: object) -> float:
    _check_number("logit_bias value", value, -100.0, 100.0)
    return float(value)  # type: ignore[arg-type]


def _check_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
