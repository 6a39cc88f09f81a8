"""Incremental detokenization: turn one new token id at a time into the text it adds.

Decoding token by token breaks multi-byte characters and tokenizers that merge spaces, so each step
decodes a short window that starts a few tokens back and emits only what that window adds past the
text already emitted. A window whose text ends in U+FFFD ends in an incomplete UTF-8 sequence: the
whole characters before it are emitted (a stop string among them is found now, not only once the
request ends) and the window waits for the token that completes the last one.
"""

from __future__ import annotations

from typing import Any

_CONTEXT_TOKENS = 5  # prompt tokens kept as left context so the first output token decodes right


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, vocab_size: int, prompt_token_ids: list[int],
                 skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._skip_special = skip_special_tokens
        self._ids = [t for t in prompt_token_ids[-_CONTEXT_TOKENS:] if t < vocab_size]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._pending_emitted = 0  # characters emitted of the window past read_offset
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (may be empty)."""
        if token_id >= self._vocab_size:
            # Models pad their vocabulary past the tokenizer's; such ids have no text.
            return ""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        if len(full) <= len(prefix):
            return ""
        if full.endswith("\ufffd"):  # the whole characters before the incomplete one, once
            whole = full[len(prefix):].rstrip("\ufffd")
            if not full.startswith(prefix) or len(whole) <= self._pending_emitted:
                return ""
            delta = whole[self._pending_emitted:]
            self._pending_emitted = len(whole)
        else:
            delta = full[len(prefix) + self._pending_emitted:]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            self._pending_emitted = 0
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end of a request: emit whatever is pending, even an incomplete character."""
        if self._read_offset == len(self._ids):
            return ""
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        delta = full[len(prefix) + self._pending_emitted:] if full.startswith(prefix) else ""
        self._prefix_offset = self._read_offset = len(self._ids)
        self._pending_emitted = 0
        self.text += delta
        return delta
