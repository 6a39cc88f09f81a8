"""Prompts -> token ids, checked before anything is queued (the mirror of output_processor.py).

A prompt is text (tokenized here) or a list of token ids; it must be non-empty, in the vocabulary,
and short enough to leave room for one output token within ``max_model_len``. A prompt of the wrong
type is a ``TypeError`` (as ``LLM.generate`` raises it), anything else a ``ValueError``; both name
the problem and are raised before the request exists.
"""

from __future__ import annotations

import functools
from typing import Any

from fairswitch.sampling_params import SamplingParams
from fairswitch.unicode_text import lone_surrogate, not_text_message


class InputProcessor:
    def __init__(self, tokenizer: Any, vocab_size: int, max_model_len: int,
                 eos_token_ids: set[int] | frozenset[int] = frozenset()) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids

    def check_params(self, params: SamplingParams) -> None:
        """What ``SamplingParams`` cannot check alone: token ids against this vocabulary, and
        ``n`` (one engine request is one sequence: ``LLM.generate`` and the server fan out)."""
        bad = [t for t in (params.logit_bias or {}) if t >= self.vocab_size]
        if bad:
            raise ValueError(f"logit_bias token ids must be in [0, {self.vocab_size}), got "
                             f"{bad[:5]}")
        allowed = params.allowed_token_ids
        if allowed is not None:  # (again: a field set after construction is not checked)
            bad = [t for t in allowed if not 0 <= t < self.vocab_size]
            if bad or not allowed:
                raise ValueError(f"allowed_token_ids must be a non-empty list of ids in [0, "
                                 f"{self.vocab_size}), got {bad[:5] or allowed}")
            self._check_something_allowed(params)
        if params.n != 1:
            raise ValueError(f"an engine request samples one sequence (n=1), got n={params.n}: "
                             "add one request per SamplingParams.copies() (LLM.generate and "
                             "the server do)")

    def validate(self, prompt: str | list[int] | None, prompt_token_ids: list[int] | None,
                 truncate: int | None = None) -> tuple[str | None, list[int]]:
        """(text, token ids) of a prompt, only its last ``truncate`` tokens if given (-1: as many
        as leave room for one output token, max_model_len - 1; the text stays whole); TypeError if one is of the wrong type, ValueError
        if it is empty, too long or out of vocab."""
        if prompt_token_ids is None and isinstance(prompt, list):
            prompt, prompt_token_ids = None, prompt
        if prompt_token_ids is None and not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str or a list of token ids, got "
                            f"{type(prompt).__name__}")
        if prompt is not None and not isinstance(prompt, str):  # (the text of the ids)
            raise TypeError(f"prompt must be a str or None with prompt_token_ids, got "
                            f"{type(prompt).__name__}")
        if prompt_token_ids is not None:
            if not isinstance(prompt_token_ids, (list, tuple)):
                raise TypeError(f"prompt_token_ids must be a list of token ids, got "
                                f"{type(prompt_token_ids).__name__}")
            ids = list(prompt_token_ids)
            wrong = next((j for j, t in enumerate(ids) if not isinstance(t, int)
                          or isinstance(t, bool)), None)
            if wrong is not None:
                raise TypeError(f"prompt token ids must be ints, got {ids[wrong]!r:.40} at "
                                f"index {wrong}")
            vocab = self.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(
                    f"prompt token ids must be integers in [0, {vocab}), got {bad[:5]}")
            text = prompt
        else:
            char = lone_surrogate(prompt)
            if char is not None:
                raise ValueError(f"prompt holds {not_text_message(char)}")
            ids, text = self.tokenizer.encode(prompt), prompt
        if not ids or (text is not None and not text):
            raise ValueError("prompt is empty")
        if truncate is not None:
            if truncate >= self.max_model_len:
                raise ValueError(f"truncate_prompt_tokens ({truncate}) must be less than "
                                 f"max_model_len ({self.max_model_len}): a prompt leaves room "
                                 f"for one token")
            ids = ids[-(self.max_model_len - 1 if truncate == -1 else truncate):]
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens but max_model_len is {self.max_model_len}: "
                f"at most {self.max_model_len - 1} prompt tokens leave room for one output token")
        return text, ids

    def _check_something_allowed(self, params: SamplingParams) -> None:
        """ValueError where allowed_token_ids leaves no token to sample: every one a bad word,
        or (before min_tokens) a stop token, which min_tokens masks."""
        allowed = set(params.allowed_token_ids)
        banned = {ids[0] for ids in self.bad_words_ids(params) if len(ids) == 1}
        if allowed <= banned:
            raise ValueError("allowed_token_ids allows only tokens that bad_words bans")
        if params.min_tokens:
            stops = set(params.stop_token_ids) | (set() if params.ignore_eos
                                                  else set(self.eos_token_ids))
            if allowed <= stops:
                raise ValueError("allowed_token_ids allows only stop tokens (EOS or "
                                 "stop_token_ids), which min_tokens keeps from being sampled")

    def bad_words_ids(self, params: SamplingParams) -> list[list[int]]:
        """The token sequences of ``params.bad_words``: each word as written (leading spaces
        dropped), and after a space (a word within the text) unless that ends with the first
        (a space token before it: banning the first bans it). vLLM keeps the second only where
        it has as many tokens, so a word that a space makes one token (" ventured" against
        "vent", "ured") could still be written after a space there."""
        return [list(ids) for ids in self._bad_words_ids(tuple(params.bad_words or ()))]

    @functools.lru_cache(maxsize=64)  # (a request's n copies, a client's repeated list)
    def _bad_words_ids(self, words: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
        out: list[tuple[int, ...]] = []
        for word in words:
            alone = tuple(self.tokenizer.encode(word.lstrip(), add_special_tokens=False))
            spaced = tuple(self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
            if alone:
                out.append(alone)
            if spaced and (not alone or spaced[-len(alone):] != alone):
                out.append(spaced)
        return tuple(out)
