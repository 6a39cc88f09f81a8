"""/v1/embeddings (OpenAI's, as vLLM serves it): ``input`` is a string, a list of token ids, or
a list of either (at most ``MAX_INPUTS``); each is one embedding request to the engine
(PoolingParams: the last token's state, unit length), all of a request's admitted together.
``encoding_format`` "float" (default) or "base64" (little-endian float32, as OpenAI's clients
decode it); ``dimensions`` keeps the first values (Matryoshka models) before normalizing; vLLM's
``normalize``, ``truncate_prompt_tokens``, ``priority`` and ``add_special_tokens`` too.
"""

from __future__ import annotations

import base64
import struct
from dataclasses import dataclass
from typing import Any

from fairswitch.pooling_params import PoolingParams
from fairswitch.server.errors import bad_request
from fairswitch.server.protocol import (MAX_CHOICES, _bool, _int, _log_ignored, _str,
                                        _truncation, describe, parse_prompts)

MAX_INPUTS = MAX_CHOICES  # one request's inputs (OpenAI's: 2048), each an engine request
_KNOWN = frozenset({"input", "model", "encoding_format", "dimensions", "user", "normalize",
                    "truncate_prompt_tokens", "priority", "add_special_tokens"})


@dataclass
class EmbeddingRequest:
    inputs: list[str | list[int]]
    model: str | None
    base64: bool
    pooling: PoolingParams
    truncate_prompt_tokens: int | None
    priority: int
    user: str | None
    add_special_tokens: bool


def parse_embedding(body: Any) -> EmbeddingRequest:
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {describe(body)}")
    value = body.get("input")
    if isinstance(value, list) and len(value) > MAX_INPUTS and isinstance(value[0], (str, list)):
        raise bad_request(f"'input' holds {len(value)} inputs; at most {MAX_INPUTS}", "input")
    inputs = parse_prompts(value, 1, "input")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64", None):
        raise bad_request(f"'encoding_format' must be 'float' or 'base64', got "
                          f"{describe(encoding)}", "encoding_format")
    _log_ignored(body, _KNOWN)
    return EmbeddingRequest(
        inputs=inputs, model=_str(body, "model"), base64=encoding == "base64",
        pooling=PoolingParams(normalize=_bool(body, "normalize", True),
                              dimensions=_int(body, "dimensions", None, low=1)),
        truncate_prompt_tokens=_truncation(body), priority=_int(body, "priority", 0),
        user=_str(body, "user"), add_special_tokens=_bool(body, "add_special_tokens", True))


def embedding_response(response_id: str, created: int, model: str, vectors: list[list[float]],
                       num_prompt_tokens: int, as_base64: bool) -> dict[str, Any]:
    def encoded(vector: list[float]) -> list[float] | str:
        if not as_base64:
            return vector
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()

    return {"id": response_id, "object": "list", "created": created, "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": encoded(v)}
                     for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": num_prompt_tokens, "total_tokens": num_prompt_tokens}}
