"""Prompts -> token ids, checked before anything is queued (the mirror of output_processor.py).

A prompt is text (tokenized here) or a list of token ids; it must be non-empty, in the vocabulary,
and short enough to leave room for one output token within ``max_model_len``. Anything else is a
``ValueError`` naming the problem, raised before the request exists.
"""

from __future__ import annotations

from typing import Any

from fairswitch.sampling_params import SamplingParams


class InputProcessor:
    def __init__(self, tokenizer: Any, vocab_size: int, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len

    def check_params(self, params: SamplingParams) -> None:
        """What ``SamplingParams`` cannot check alone: token ids against this vocabulary, and
        ``n`` (one engine request is one sequence: ``LLM.generate`` and the server fan out)."""
        bad = [t for t in (params.logit_bias or {}) if t >= self.vocab_size]
        if bad:
            raise ValueError(f"logit_bias token ids must be in [0, {self.vocab_size}), got "
                             f"{bad[:5]}")
        if params.n != 1:
            raise ValueError(f"an engine request samples one sequence (n=1), got n={params.n}: "
                             "add one request per SamplingParams.copies() (LLM.generate and "
                             "the server do)")

    def validate(self, prompt: str | list[int] | None,
                 prompt_token_ids: list[int] | None) -> tuple[str | None, list[int]]:
        """(text, token ids) of a prompt; ValueError if it is empty, too long or out of vocab."""
        if prompt_token_ids is None and isinstance(prompt, list):
            prompt, prompt_token_ids = None, prompt
        if prompt_token_ids is not None:
            ids = list(prompt_token_ids)
            vocab = self.vocab_size
            bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool)
                   or not 0 <= t < vocab]
            if bad:
                raise ValueError(
                    f"prompt token ids must be integers in [0, {vocab}), got {bad[:5]}")
            text = prompt
        elif isinstance(prompt, str):
            ids, text = self.tokenizer.encode(prompt), prompt
        else:
            raise ValueError(f"prompt must be a string or a list of token ids, got {prompt!r:.80}")
        if not ids or (text is not None and not text):
            raise ValueError("prompt is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens but max_model_len is {self.max_model_len}: "
                f"at most {self.max_model_len - 1} prompt tokens leave room for one output token")
        return text, ids
