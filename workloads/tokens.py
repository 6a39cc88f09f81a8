"""Token measurement for trace builders: load a tokenizer, count tokens, clip text to a budget.

Traces record token counts measured with one tokenizer (named in trace_meta), so the numbers a
harness reads are the ones the engine will see for that model family.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

# Chat-template tokens a turn adds around its two messages (user + assistant). ChatML, the default
# model's template, adds 5 per message ("<|im_start|>", role, "\n" ... "<|im_end|>", "\n"), and
# the generation prompt of the last turn (3) fits in its assistant share; Llama 3's is the same.
TURN_OVERHEAD_TOKENS = 10

# A token of cl100k or Llama 3 spans at most a few dozen characters except in long runs of
# whitespace or punctuation; cutting text at this many characters per wanted token before
# tokenizing keeps 100 kB pastes cheap and rarely leaves fewer tokens than wanted.
_MAX_CHARS_PER_TOKEN = 16


@dataclass(frozen=True, slots=True)
class Limits:
    """Token budgets of a trace (the synthetic builder uses the max_* ones)."""

    max_input_tokens: int = 1024  # per user message
    max_output_tokens: int = 512  # per reply (output_tokens, and its history text)
    max_context: int = 4096  # the whole conversation: inputs, outputs and template tokens
    max_turns: int = 8
    min_turns: int = 1
    trim: bool = True  # over max_context: keep the earliest turns that fit (else skip it all)

    def __post_init__(self) -> None:
        for name in ("max_input_tokens", "max_output_tokens", "max_turns", "min_turns"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.min_turns > self.max_turns:
            raise ValueError(f"min_turns ({self.min_turns}) > max_turns ({self.max_turns})")
        if self.max_context < 2 + TURN_OVERHEAD_TOKENS:
            raise ValueError(f"max_context must be >= {2 + TURN_OVERHEAD_TOKENS} "
                             f"(one token in, one out, the template), got {self.max_context}")


def turns_within(lengths: Iterable[tuple[int, int]], max_context: int) -> int:
    """How many leading turns of (input, output) token lengths fit ``max_context`` together.

    A turn with no input or no output token (a text clipped to nothing) ends the count too.
    """
    num = context = 0
    for n_in, n_out in lengths:
        context += n_in + n_out + TURN_OVERHEAD_TOKENS
        if n_in == 0 or n_out == 0 or context > max_context:
            break
        num += 1
    return num


@functools.cache  # loading takes seconds; builders only read the tokenizer
def load_tokenizer(path: str | None = None) -> tuple[Any, str]:
    """(HF tokenizer, its name for trace_meta); default: cl100k_base, the tokenizer of the model
    shapes the benchmarks run (llama-3-8b ...)."""
    from fairswitch.model.loader import load_tokenizer as load_hf

    if path is None:
        from fairswitch.model.cl100k import NAME, ensure_cl100k_tokenizer

        return load_hf(ensure_cl100k_tokenizer()), NAME
    return load_hf(path), str(path)


def token_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text as a message body (no BOS or other special tokens added)."""
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def count_tokens(tokenizer: Any, texts: list[str]) -> list[int]:
    return [len(ids) for ids in token_ids(tokenizer, texts)]


def clip_texts(tokenizer: Any, texts: list[str], max_tokens: int) -> list[tuple[str, int]]:
    """Each text cut to at most ``max_tokens`` tokens, with its re-measured token count.

    Decoding a prefix of the ids and encoding it again can merge differently (and a cut inside a
    multi-byte character leaves a replacement character), so the clipped text is measured again
    and cut one token shorter until it fits: the recorded count is always the measured one.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    cut = [t[: max_tokens * _MAX_CHARS_PER_TOKEN] for t in texts]
    out: list[tuple[str, int]] = []
    for text, ids in zip(cut, token_ids(tokenizer, cut)):
        n, keep = len(ids), max_tokens
        while n > max_tokens:
            text = tokenizer.decode(ids[:keep]).rstrip("\ufffd")
            n, keep = count_tokens(tokenizer, [text])[0], keep - 1
        out.append((text, n))
    return out
