"""Request bodies -> prompt token ids off the event loop, with a length check before tokenizing.

Everything whose cost grows with the body runs in a small thread pool the server owns
(``PromptWorker.run``): decoding the JSON, rendering the chat template, tokenizing, checking token
ids, detokenizing, encoding a large response. On the event loop, tokenizing a long prompt would
stall every stream and /health for seconds. A tokenizer's plain ``encode`` also holds the GIL
from start to end, which would stall the loop from any thread, so the worker tokenizes through
the batch call (``tokenizer([text])``), which releases it while the Rust code runs.

A prompt that cannot fit is refused before it is tokenized. No token stands for more characters
than the longest string in the vocabulary (a byte-level BPE token's string has one character per
byte, at least as many as the characters it decodes to), so a text of more than
``(max_model_len - 1) x longest`` characters has more tokens than the context leaves for the
prompt. The bound is doubled for tokenizers that normalize text: NFC (Qwen2) composes up to three
code points into one character of two bytes.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from fairswitch.server.errors import bad_request

T = TypeVar("T")


def max_chars_per_token(tokenizer: Any) -> int:
    """An upper bound on the characters one token of ``tokenizer`` stands for."""
    strings = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return 2 * max((len(s) for s in strings if s), default=1)


class PromptWorker:
    def __init__(self, tokenizer: Any, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.chars_per_token = max_chars_per_token(tokenizer)
        self.max_prompt_chars = (max_model_len - 1) * self.chars_per_token
        self._pool = ThreadPoolExecutor(min(4, os.cpu_count() or 1),
                                        thread_name_prefix="fairswitch-prompts")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on a worker thread; its exceptions (APIError) are raised here."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def check_length(self, text: str, param: str) -> None:
        """Refuse a prompt text that has more tokens than fit, whatever its tokenization."""
        if len(text) > self.max_prompt_chars:
            raise bad_request(
                f"the prompt has {len(text)} characters, more than any {self.max_model_len - 1} "
                f"tokens can hold (max_model_len is {self.max_model_len}: at most "
                f"{self.max_model_len - 1} prompt tokens x {self.chars_per_token} characters "
                f"per token = {self.max_prompt_chars} characters)", param)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """Token ids of ``text``; on a worker thread. ``verbose=False``: transformers' tokenizers
        would warn that a prompt longer than the model "will result in indexing errors" (the
        server refuses it instead, with the numbers)."""
        batch = self.tokenizer([text], add_special_tokens=add_special_tokens, verbose=False)
        return list(batch["input_ids"][0])

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
