"""The routes of embeddings, bodies in and out.

/v1/embeddings (OpenAI's, as vLLM serves it): ``input`` is a string, a list of token ids, or a
list of either (at most ``MAX_INPUTS``); each is one embedding request to the engine
(PoolingParams: the last token's state, unit length), all of a request's admitted together.
``encoding_format`` "float" (default) or "base64" (little-endian float32, as OpenAI's clients
decode it); ``dimensions`` keeps the first values (Matryoshka models) before normalizing; vLLM's
``normalize``, ``truncate_prompt_tokens``, ``priority`` and ``add_special_tokens`` too.

vLLM's /score (``text_1``, ``text_2``: one against each, or pairwise) and /rerank (Jina's and
Cohere's: ``query``, ``documents``, ``top_n``) score texts by the cosine similarity of their
embeddings, as vLLM does for embedding models.
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


@dataclass
class PairRequest:
    """A /score or /rerank request: the texts on each side (/rerank: the query, alone, and
    the documents)."""
    first: list[str]
    second: list[str]
    model: str | None
    top_n: int | None
    truncate_prompt_tokens: int | None
    priority: int
    user: str | None


def _texts(body: dict, name: str, one: bool = False) -> list[str]:
    """A field holding a string, or with ``one`` False a non-empty list of them (Cohere's
    ``{"text": ...}`` objects too), at most ``MAX_INPUTS``."""
    value = body.get(name)
    if value is None:
        raise bad_request(f"'{name}' is required", name)
    if isinstance(value, str) and value:
        return [value]
    if not one and isinstance(value, list) and value and len(value) <= MAX_INPUTS:
        texts = [v.get("text") if isinstance(v, dict) else v for v in value]
        if all(isinstance(t, str) and t for t in texts):
            return texts
    what = "a non-empty string" if one else \
        f"a non-empty string or a list of 1 to {MAX_INPUTS} of them"
    raise bad_request(f"'{name}' must be {what}, got {describe(value)}", name)


def _pair_request(body: Any, first: list[str], second: list[str], known: frozenset[str],
                  top_n: int | None = None) -> PairRequest:
    _log_ignored(body, known)
    return PairRequest(first, second, _str(body, "model"), top_n, _truncation(body),
                       _int(body, "priority", 0), _str(body, "user"))


def parse_score(body: Any) -> PairRequest:
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {describe(body)}")
    first, second = _texts(body, "text_1"), _texts(body, "text_2")
    if len(first) > 1 and len(first) != len(second):
        raise bad_request(f"'text_1' holds {len(first)} texts and 'text_2' {len(second)}: give "
                          "one text_1, or as many as text_2 (pairwise)", "text_1")
    return _pair_request(body, first, second, _KNOWN_SCORE)


def parse_rerank(body: Any) -> PairRequest:
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {describe(body)}")
    query, documents = _texts(body, "query", one=True), _texts(body, "documents")
    top_n = _int(body, "top_n", None, low=0)  # (0: all, as vLLM's)
    return _pair_request(body, query, documents, _KNOWN_RERANK, top_n or None)


def score_response(response_id: str, created: int, model: str, scores: list[float],
                   num_prompt_tokens: int) -> dict[str, Any]:
    return {"id": response_id, "object": "list", "created": created, "model": model,
            "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
            "usage": {"prompt_tokens": num_prompt_tokens, "total_tokens": num_prompt_tokens}}


def rerank_response(response_id: str, model: str, documents: list[str], scores: list[float],
                    top_n: int | None, num_prompt_tokens: int) -> dict[str, Any]:
    best = sorted(range(len(scores)), key=lambda i: -scores[i])[:top_n]
    return {"id": response_id, "model": model, "usage": {"total_tokens": num_prompt_tokens},
            "results": [{"index": i, "document": {"text": documents[i]},
                         "relevance_score": scores[i]} for i in best]}


_PAIR_COMMON = {"model", "truncate_prompt_tokens", "priority", "user"}
_KNOWN_SCORE = frozenset({"text_1", "text_2", *_PAIR_COMMON})
_KNOWN_RERANK = frozenset({"query", "documents", "top_n", "return_documents", *_PAIR_COMMON})
