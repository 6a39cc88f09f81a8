"""The aiohttp application: OpenAI-compatible routes over one ``AsyncEngine``.

A generation request goes: body -> ``protocol`` (typed, validated) -> prompt token ids (the
tokenizer's chat template for chat) -> ``AsyncEngine.generate(priority=, client_id=)`` -> one JSON
body, or an SSE stream. The first output is awaited before the response starts, so a request the
engine refuses (bad prompt, queue full) still gets its HTTP status; after that, errors travel
in-band as ``data: {"error": ...}``. A stream sends one chunk per output that carries tokens, even
when their text is held back (a possible stop string, an incomplete character): clients count
chunks as tokens. The output iterator is always closed when the handler ends, whether it
finished, failed, or was cancelled because the client went away: closing it aborts the request
and frees its KV blocks.

Everything up to the prompt's token ids (JSON, chat template, tokenizer) runs on the prompt
worker's threads (prompts.py), never on the event loop; the engine thread detokenizes. The (Rust)
tokenizer is only read, which is safe from several threads. Requests in flight, their access
lines and the graceful shutdown are inflight.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from fairswitch import __version__
from fairswitch.engine.async_engine import AsyncEngine, EngineDeadError
from fairswitch.outputs import RequestOutput
from fairswitch.pooling_params import PoolingParams, pair_scores
from fairswitch.scheduler.scheduler import QueueFullError
from fairswitch.server import protocol, responses_request, streaming
from fairswitch.server.beam_choices import beam_outputs
from fairswitch.server.chat import ChatTemplate
from fairswitch.server.choices import (ChoiceShaper, Prompt, all_or_none, choice_outputs,
                                       choice_request_ids, last_output)
from fairswitch.server.cors import origin_hook, preflight_middleware
from fairswitch.server.embeddings import (EmbeddingRequest, PairRequest, embedding_response,
                                          parse_embedding, parse_rerank, parse_score,
                                          rerank_response, score_response)
from fairswitch.server.errors import (APIError, Handler, bad_request, error_middleware,
                                      log_refusal, quiet_protocol_errors)
from fairswitch.server.inflight import InFlight
from fairswitch.server.lora_routes import ServedAdapters
from fairswitch.server.metrics import (CONTENT_TYPE, RequestTracker, ServerMetrics,
                                       engine_snapshot)
from fairswitch.server.prompts import PromptWorker
from fairswitch.server.responses import ResponseShape
from fairswitch.server.serving import DRAIN_KEY
from fairswitch.server.settings import ServerSettings
from fairswitch.server.stats_log import log_stats
from fairswitch.unicode_text import lone_surrogate, not_text_message

logger = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/health", "/ping", "/version", "/metrics"})  # no API key needed


# The wait for the engine's last step once the drain has aborted the requests; a step still
# running then is stuck (AsyncEngine.shutdown).
ENGINE_STOP_S = 5.0


def _reply_ids(request: web.Request, prefix: str,
               body_id: str | None = None) -> tuple[str, str]:
    """(the reply's id, the base of its engine requests' ids): ``prefix`` and the request's
    X-Request-Id, else its body's ``request_id`` (vLLM's, in that order), else a new one. A
    client's id need not be unique (two requests may send the same): its engine requests' ids
    add one of their own."""
    given = request.headers.get("X-Request-Id") or body_id
    if not given:
        rid = prefix + uuid.uuid4().hex
        return rid, rid
    if len(given) > protocol.MAX_REQUEST_ID:
        raise bad_request(f"X-Request-Id is {len(given)} characters long; at most "
                          f"{protocol.MAX_REQUEST_ID} are taken")
    return prefix + given, f"{prefix}{given}-{uuid.uuid4().hex[:12]}"


async def _request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    """``app.on_response_prepare`` with --enable-request-id-headers: X-Request-Id on every
    response (streams and errors too), the request's own or a new one, as vLLM's middleware."""
    response.headers["X-Request-Id"] = request.headers.get("X-Request-Id") or uuid.uuid4().hex


def _auth_middleware(api_key: str) -> Any:
    expected = api_key.encode()

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in PUBLIC_PATHS:
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not token:
                raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'",
                               headers={"WWW-Authenticate": "Bearer"})
            # aiohttp decodes header bytes that are not UTF-8 as surrogates: compare the bytes
            if not hmac.compare_digest(token.strip().encode("utf-8", "surrogateescape"),
                                       expected):
                raise APIError(401, "incorrect API key", headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return auth


class OpenAIServer:
    """Route handlers; everything they share (engine, tokenizer, metrics) lives here."""

    def __init__(self, engine: AsyncEngine, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.model_name = settings.served_model_names[0]
        # (first: a bad --lora-modules adapter fails before any worker thread starts)
        self.adapters = ServedAdapters(engine, settings.served_model_names,
                                       settings.lora_modules)
        self.core = engine.engine  # read-only use: tokenizer, limits, prompt validation
        self.tokenizer = self.core.tokenizer
        self._token_texts: dict[int, str] = {}  # (at most the vocabulary's)
        self.chat_template = ChatTemplate(self.tokenizer, settings.chat_template,
                                          settings.trust_request_chat_template)
        self.prompts = PromptWorker(self.tokenizer, self.core.max_model_len)
        self.metrics = ServerMetrics(self.model_name, settings.metrics_prefix)
        self.in_flight = InFlight(settings.log_requests)
        self.created = int(time.time())

    # ---- shared steps -------------------------------------------------------------------------

    async def _body(self, request: web.Request) -> bytes:
        limit = self.settings.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise APIError(413, f"request body is too large: {request.content_length} bytes; "
                           f"the limit is {limit} bytes")
        try:
            return await request.read()  # aiohttp raises 413 itself past client_max_size
        except RequestPayloadError as e:  # (a body its Content-Encoding does not decode)
            raise bad_request(f"the request body cannot be read: {_payload_error(e)}") from e

    def _check_model(self, model: str | None) -> None:
        names = self.settings.served_model_names
        if model is not None and model not in names and model not in self.adapters.by_name:
            raise APIError(404, f"The model `{model}` does not exist; this server serves "
                           f"{', '.join(names + self.adapters.names())}.", param="model",
                           code="model_not_found")

    def _validate_prompt(self, text: str | None, ids: list[int] | None,
                         param: str) -> tuple[str | None, list[int]]:
        try:
            return self.core.validate_prompt(text, ids)
        except (TypeError, ValueError) as e:
            raise bad_request(str(e), param) from e

    # ---- generation ---------------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        req, prompts = await self.prompts.run(self._completion_prompts, await self._body(request))
        return await self._generate(request, req, protocol.COMPLETION, [
            (text, ids, protocol.resolve_max_tokens(
                req.max_tokens, len(ids), self.core.max_model_len,
                protocol.DEFAULT_COMPLETION_MAX_TOKENS, self.core.generation.max_new_tokens))
            for text, ids in prompts])

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        req, text, ids = await self.prompts.run(self._chat_prompt, await self._body(request))
        max_tokens = protocol.resolve_max_tokens(req.max_tokens, len(ids), self.core.max_model_len,
                                                 None, self.core.generation.max_new_tokens)
        return await self._generate(request, req, protocol.CHAT, [(text, ids, max_tokens)])

    async def responses(self, request: web.Request) -> web.StreamResponse:
        """The Responses API: a chat completion underneath (responses_request.py, its reply
        shaped by responses.py)."""
        body, translation, (req, text, ids) = await self.prompts.run(
            self._responses_prompt, await self._body(request))
        try:
            max_tokens = protocol.resolve_max_tokens(
                req.max_tokens, len(ids), self.core.max_model_len, None,
                self.core.generation.max_new_tokens)
            req.check_min_tokens(max(max_tokens, 1))  # (again in _generate: named so here)
        except APIError as e:
            raise translation.renamed(e) from e
        model = req.model if req.model in self.adapters.by_name else self.model_name
        return await self._generate(request, req, protocol.CHAT, [(text, ids, max_tokens)],
                                    ResponseShape(body, model, thinks=req.reasoning is not None))

    async def embeddings(self, request: web.Request) -> web.Response:
        """/v1/embeddings (embeddings.py)."""
        req, prompts = await self.prompts.run(self._embedding_prompts, await self._body(request))
        response_id, engine_id = _reply_ids(request, "embd-")
        vectors, num_tokens = await self._embed(request, engine_id, prompts, req.pooling,
                                                req.priority, req.user, req.model)
        return web.json_response(embedding_response(
            response_id, int(time.time()), req.model or self.model_name, vectors, num_tokens,
            req.base64))

    async def reset_prefix_cache(self, request: web.Request) -> web.Response:
        """vLLM's dev-mode POST /reset_prefix_cache: every cached prefix forgotten (between
        benchmark runs); 200 with an empty body, as vLLM."""
        await self.engine.run_in_engine(lambda engine: engine.reset_prefix_cache())
        return web.Response()

    async def invocations(self, request: web.Request) -> web.StreamResponse:
        """SageMaker's /invocations, as vLLM routes it: by the body's fields, a chat
        (``messages``), a completion (``prompt``), embeddings (``input``), a score (``text_1``)
        or a rerank (``query``)."""
        body = await self.prompts.run(_loads, await self._body(request))  # (read once: cached)
        route = next((handler for field, handler in (
            ("messages", self.chat_completions), ("prompt", self.completions),
            ("input", self.embeddings), ("text_1", self.score), ("query", self.rerank))
            if isinstance(body, dict) and field in body), None)
        if route is None:
            raise bad_request("/invocations takes a chat (messages), completion (prompt), "
                              "embeddings (input), score (text_1) or rerank (query) body")
        return await route(request)

    async def score(self, request: web.Request) -> web.Response:
        """vLLM's /score: the cosine similarity of text_1's and text_2's embeddings, one text_1
        against each text_2, or pairwise (embeddings.py)."""
        req, prompts = await self.prompts.run(self._score_prompts, await self._body(request))
        response_id, engine_id = _reply_ids(request, "score-")
        vectors, num_tokens = await self._embed(request, engine_id, prompts, PoolingParams(),
                                                req.priority, req.user, req.model)
        scores = pair_scores(vectors[:len(req.first)], vectors[len(req.first):])
        return web.json_response(score_response(
            response_id, int(time.time()), req.model or self.model_name, scores, num_tokens))

    async def rerank(self, request: web.Request) -> web.Response:
        """vLLM's (Jina's, Cohere's) /rerank: the documents by the cosine similarity of their
        embeddings to the query's, best first, ``top_n`` of them (embeddings.py)."""
        req, prompts = await self.prompts.run(self._rerank_prompts, await self._body(request))
        response_id, engine_id = _reply_ids(request, "rerank-")
        vectors, num_tokens = await self._embed(request, engine_id, prompts, PoolingParams(),
                                                req.priority, req.user, req.model)
        return web.json_response(rerank_response(
            response_id, req.model or self.model_name, req.second,
            pair_scores(vectors[:1], vectors[1:]), req.top_n, num_tokens))

    async def _embed(self, request: web.Request, engine_id: str,
                     prompts: list[tuple[str | None, list[int]]], pooling: PoolingParams,
                     priority: int, user: str | None, model: str | None
                     ) -> tuple[list[list[float]], int]:
        """The embeddings of ``prompts``, and their tokens: every one an embedding request,
        admitted together (a place in the waiting queue for each, or a 503); ``model``: the
        request's (an adapter's name: with that LoRA adapter)."""
        if self.in_flight.aborting:
            raise self._aborted()
        lora = self.adapters.lookup(model)
        record = self.in_flight.record(request)
        record.client_id = request.headers.get("X-Client-Id") or user
        record.priority = priority
        record.request_ids = [f"{engine_id}-{i}" for i in range(len(prompts))]

        async def embed(rid: str, text: str | None, ids: list[int]) -> RequestOutput:
            return await last_output(self.engine.generate(
                text, None, request_id=rid, prompt_token_ids=ids, priority=priority,
                client_id=record.client_id, held_by=engine_id, pooling=pooling,
                lora_request=lora))

        try:
            await self.engine.reserve_places(engine_id, len(prompts))
            outs = await all_or_none(embed(rid, text, ids)
                                     for rid, (text, ids) in zip(record.request_ids, prompts))
        except (QueueFullError, EngineDeadError, TypeError, ValueError) as e:
            raise _engine_error(e) from e
        finally:
            self.engine.release_places(engine_id)
            record.request_ids = []
        if aborted := [out for out in outs if out.outputs[0].finish_reason == "abort"]:
            raise self._aborted(aborted[0])
        num_prompt_tokens = sum(len(ids) for _, ids in prompts)
        record.num_prompt_tokens = num_prompt_tokens  # (the access line's)
        self.metrics.num_prompt_tokens += num_prompt_tokens
        return [out.embedding for out in outs], num_prompt_tokens

    def _score_prompts(self, raw: bytes) -> tuple[PairRequest, list[tuple[str | None,
                                                                         list[int]]]]:
        req = parse_score(_loads(raw))
        return req, self._pair_prompts(req, "text_1", "text_2")

    def _rerank_prompts(self, raw: bytes) -> tuple[PairRequest, list[tuple[str | None,
                                                                          list[int]]]]:
        req = parse_rerank(_loads(raw))
        return req, self._pair_prompts(req, "query", "documents")

    def _pair_prompts(self, req: PairRequest, first: str, second: str
                      ) -> list[tuple[str | None, list[int]]]:
        """The token ids of a score or rerank request's texts, first's then second's."""
        self._check_model(req.model)
        self._check_places(len(req.first) + len(req.second), second)
        return [self._text_prompt(text, req.truncate_prompt_tokens, param)
                for param, texts in ((first, req.first), (second, req.second)) for text in texts]

    def _check_places(self, count: int, param: str) -> None:
        """Texts embedded together: more than the waiting queue holds could never be."""
        cap = self.core.config.scheduler.max_waiting
        if cap is not None and count > cap:
            raise bad_request(f"{count} inputs need {count} places in the waiting queue, which "
                              f"holds {cap} on this server (--max-waiting)", param)

    def _embedding_prompts(self, raw: bytes) -> tuple[EmbeddingRequest,
                                                        list[tuple[str | None, list[int]]]]:
        """(request, [(input text, input token ids)]); on a prompt worker thread."""
        req = parse_embedding(_loads(raw))
        self._check_model(req.model)
        if (req.pooling.dimensions or 0) > self.core.hf_config.hidden_size:
            raise bad_request(f"'dimensions' must be at most the model's hidden size "
                              f"({self.core.hf_config.hidden_size}), got "
                              f"{req.pooling.dimensions}", "dimensions")
        self._check_places(len(req.inputs), "input")
        return req, [self._text_prompt(value, req.truncate_prompt_tokens, "input",
                                       req.add_special_tokens) if isinstance(value, str)
                     else self._checked(req.truncate_prompt_tokens, None, value, "input")
                     for value in req.inputs]

    def _completion_prompts(self, raw: bytes) -> tuple[protocol.CompletionRequest,
                                                         list[tuple[str | None, list[int]]]]:
        """(request, [(prompt text, prompt token ids)]); on a prompt worker thread."""
        req = protocol.parse_completion(_loads(raw))
        self._check_model(req.model)
        prompts = []
        for prompt in req.prompts:
            if isinstance(prompt, str):
                self.prompts.check_length(prompt, "prompt")
                text, ids = prompt, self.prompts.encode(
                    prompt, add_special_tokens=req.add_special_tokens)
            else:  # token ids
                text, ids = None, prompt
            prompts.append(self._checked(req.truncate_prompt_tokens, text, ids, "prompt"))
        return req, prompts

    def _checked(self, truncate: int | None, text: str | None, ids: list[int],
                 param: str) -> tuple[str | None, list[int]]:
        """(text, ids) of a prompt as it will run: cut by truncate_prompt_tokens (its text is
        then the ids' own), and checked."""
        kept = protocol.truncated(ids, truncate, self.core.max_model_len)
        if len(kept) < len(ids):
            text = None
        return self._validate_prompt(text, kept, param)

    def _text_prompt(self, text: str, truncate: int | None, param: str,
                     add_special_tokens: bool = True) -> tuple[str | None, list[int]]:
        """``_checked`` of a text: its length is checked before it is tokenized, unless it is
        to be cut to fit."""
        if truncate is None:
            self.prompts.check_length(text, param)
        return self._checked(truncate, text, self.prompts.encode(
            text, add_special_tokens=add_special_tokens), param)

    def _responses_prompt(self, raw: bytes) -> tuple[
            dict, responses_request.Translation, tuple[protocol.ChatRequest, str | None, list[int]]]:
        """(the Responses request, its chat request, the chat's ``_chat_prompt``); on a prompt
        worker thread. The chat path's errors name the Responses request's fields."""
        body = _loads(raw)
        translation = responses_request.Translation(body)
        try:
            return body, translation, self._chat_prompt_of(translation.chat)
        except APIError as e:
            raise translation.renamed(e) from e

    def _chat_prompt(self, raw: bytes) -> tuple[protocol.ChatRequest, str | None, list[int]]:
        """(request, prompt text, prompt token ids); on a prompt worker thread."""
        return self._chat_prompt_of(_loads(raw))

    def _chat_prompt_of(self, body: Any) -> tuple[protocol.ChatRequest, str | None, list[int]]:
        req = protocol.parse_chat(body, self.settings.tool_call_parser,
                                  self.settings.reasoning_parser)
        self._check_model(req.model)
        text = self.chat_template.render(req.messages, req.template)
        self.prompts.check_length(text, "messages")
        # Templates write their own special tokens (chat.py), unless the request asks.
        ids = self.prompts.encode(text, add_special_tokens=req.add_special_tokens)
        return req, *self._checked(req.truncate_prompt_tokens, text, ids, "messages")

    async def _generate(self, request: web.Request, req: protocol.GenerationRequest,
                        fmt: protocol.ResponseFormat,
                        prompts: list[tuple[str | None, list[int], int]],
                        shape: ResponseShape | None = None) -> web.StreamResponse:
        """``prompts``: (text, token ids, max_tokens) of each prompt, n choices each;
        ``shape``: the reply goes out as a Responses API response (else as ``fmt``'s)."""
        if self.in_flight.aborting:  # shutting down: requests still running are being aborted
            raise self._aborted()
        self._check_n(req.n, len(prompts))
        for _, _, max_tokens in prompts:
            req.check_min_tokens(max(max_tokens, 1))
        lora = self.adapters.lookup(req.model)
        response_id, engine_id = _reply_ids(request, fmt.id_prefix, req.request_id)
        client_id = request.headers.get("X-Client-Id") or req.user
        record = self.in_flight.record(request)
        record.client_id, record.priority = client_id, req.priority
        record.request_ids = choice_request_ids(engine_id, req.n * len(prompts))
        record.num_prompt_tokens = sum(len(ids) for _, ids, _ in prompts)
        echo = isinstance(req, protocol.CompletionRequest) and req.echo
        echo_texts = [text if text is not None else await self.prompts.run(self.tokenizer.decode,
                                                                           ids)
                      for text, ids, _ in prompts] if echo else None
        # (echo without generation: the engine samples one token, which is not shown)
        by_id = req.return_tokens_as_token_ids
        if by_id is None:  # (not the Responses API's: it finds its parts by the tokens' text)
            by_id = shape is None and self.settings.return_tokens_as_token_ids
        shaper = ChoiceShaper(fmt, req.logprobs, echo_texts,
                              echo and all(max_tokens == 0 for _, _, max_tokens in prompts),
                              self._token_text, req.n, req.return_token_ids,
                              getattr(req, "tool_calls", None), getattr(req, "reasoning", None),
                              req.echoed() if isinstance(req, protocol.ChatRequest) else "",
                              by_id)
        choices = [Prompt(text, ids, req.sampling_params(max(max_tokens, 1),
                                                         self.core.generation.sampling))
                   for text, ids, max_tokens in prompts]
        if req.use_beam_search:  # (the n choices: the n best beams)
            outputs = beam_outputs(
                self.engine, [(choice, req.beam_params(choice.params.max_tokens))
                              for choice in choices], engine_id,
                stopping=lambda: self.in_flight.aborting,
                on_step=lambda ids: setattr(record, "request_ids", ids),
                priority=req.priority, client_id=client_id, lora_request=lora,
                cache_salt=req.cache_salt)
        else:
            outputs = choice_outputs(self.engine, choices, engine_id, priority=req.priority,
                                     client_id=client_id, lora_request=lora,
                                     cache_salt=req.cache_salt)
        tracker = record.tracker = self.metrics.track()
        model = lora.name if lora is not None else self.model_name
        reply = _Reply(response_id, int(time.time()), model, fmt, shaper, req.n * len(prompts),
                       shape)
        # Closing the iterator aborts the requests in the engine unless they finished: on
        # errors, on a client that went away, and when aiohttp cancels this handler.
        async with contextlib.aclosing(outputs):
            try:
                try:
                    first = await _next_output(outputs)
                except APIError:
                    tracker.refused()
                    raise
                if first[1].outputs[0].finish_reason == "abort":  # before it began: a status
                    raise self._aborted(first[1])
                if req.stream:
                    return await self._stream(request, req, reply, first, outputs, tracker)
                return await self._whole(reply, first, outputs, tracker)
            finally:
                tracker.close()
                record.request_ids = []

    def _aborted(self, out: RequestOutput | None = None) -> APIError:
        """The error of a request the engine aborted: the shutdown's, the request's own (a
        structured output its token restrictions leave no way to continue: the output's
        ``error``), or the engine's."""
        if self.in_flight.aborting:
            return APIError(503, "the request was aborted: the server is shutting down")
        if out is not None and out.outputs[0].error is not None:
            return bad_request(out.outputs[0].error)
        return APIError(500, "the engine aborted the request (see the server's log)")

    def _check_n(self, n: int, num_prompts: int) -> None:
        """A request's choices are admitted together (choices.py): more than the waiting queue
        holds could never be, so that is the request's error, not a retry-later."""
        cap = self.core.config.scheduler.max_waiting
        total = n * num_prompts
        if total > 1 and cap is not None and total > cap:
            what = f"n={n} choices" if num_prompts == 1 else \
                f"{num_prompts} prompts x n={n} choices"
            raise bad_request(f"{what} need {total} places in the waiting queue, which holds "
                              f"{cap} on this server (--max-waiting)",
                              "n" if num_prompts == 1 else "prompt")

    def _token_text(self, token_id: int) -> str:
        """A token's own text (logprobs, reasoning_tokens), decoded once per id: these run on
        the event loop, a reply's tokens at a time."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text

    async def _whole(self, reply: _Reply, item: tuple[int, RequestOutput],
                     outputs: AsyncIterator[tuple[int, RequestOutput]],
                     tracker: RequestTracker) -> web.Response:
        done: dict[int, RequestOutput] = {}
        while True:
            index, out = item
            _observe(tracker, reply, index, out)
            if out.finished:
                if out.outputs[0].finish_reason == "abort":  # closing aborts the other choices
                    raise self._aborted(out)
                done[index] = out
                if len(done) == reply.n:
                    break
            item = await _next_output(outputs)
        choices = [reply.shaper.whole(i, done[i]) for i in range(reply.n)]
        extra = {}
        if reply.fmt.chat and done[0].prompt_logprobs is not None:  # vLLM's place for chat
            extra["prompt_logprobs"] = reply.shaper.prompt_logprobs(done[0])
        if reply.fmt.chat and reply.shaper.token_ids:  # (completions: each choice's)
            extra["prompt_token_ids"] = list(done[0].prompt_token_ids)
        body = reply.body(choices, usage=_usage(reply, done), **extra)
        if reply.shape is not None:
            body = reply.shape.whole(body)
        return web.json_response(body, dumps=streaming.dumps)

    async def _stream(self, request: web.Request, req: protocol.GenerationRequest, reply: _Reply,
                      item: tuple[int, RequestOutput],
                      outputs: AsyncIterator[tuple[int, RequestOutput]],
                      tracker: RequestTracker) -> web.StreamResponse:
        resp = await streaming.open_stream(request)
        # With include_usage every chunk carries "usage": null until the final usage chunk.
        extra = {"usage": None} if req.include_usage else {}
        done: dict[int, RequestOutput] = {}
        shape = reply.shape

        async def send(data: dict[str, Any]) -> None:  # a chunk, or an error's body
            if shape is None:
                await streaming.send(resp, data)
                return
            for event in shape.chunk(data):
                await streaming.send_event(resp, event)

        try:
            try:
                opening = reply.fmt.opening_choices(reply.n, reply.shaper.echoed)
                if shape is not None:
                    for event in shape.opening():
                        await streaming.send_event(resp, event)
                elif opening:
                    ids = ({"prompt_token_ids": list(item[1].prompt_token_ids)}
                           if reply.shaper.token_ids else {})  # (chat: the first chunk's)
                    if req.continuous_usage:  # a chunk per choice, each with its usage
                        usage = protocol.usage(len(item[1].prompt_token_ids), 0,
                                               item[1].num_cached_tokens)
                        for choice in opening:
                            await send(reply.body([choice], chunk=True, usage=usage, **ids))
                    else:
                        await send(reply.body(opening, chunk=True, **extra, **ids))
                while True:
                    index, out = item
                    _observe(tracker, reply, index, out)
                    if out.outputs[0].finish_reason == "abort":
                        raise self._aborted(out)
                    choice = reply.shaper.delta(index, out)
                    if choice is not None:
                        usage = {"usage": protocol.usage(
                            len(out.prompt_token_ids), reply.shaper.num_shown_tokens(out),
                            out.num_cached_tokens)} if req.continuous_usage else {}
                        await send(reply.body([choice], chunk=True, **{**extra, **usage}))
                    if out.finished:
                        done[index] = out
                        if len(done) == reply.n:
                            break
                    item = await _next_output(outputs)
                if req.include_usage:
                    await send(reply.body([], chunk=True, usage=_usage(reply, done)))
            except ConnectionResetError:
                raise
            except Exception as e:  # the status line is sent: report the error in-band
                if not isinstance(e, APIError):  # (writing a 500 response would break the body)
                    logger.exception("unhandled error in the stream of %s", reply.response_id)
                    e = APIError(500, "internal server error (logged on the server)")
                self.in_flight.record(request).error = e.message
                log_refusal(request, e, in_band=True)
                await send(e.body())
            if shape is None:
                await streaming.send_done(resp)
            else:
                await resp.write_eof()
        except ConnectionResetError:
            logger.debug("client went away during %s", reply.response_id)
            self.in_flight.record(request).client_closed = True
        return resp

    # ---- other routes -------------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        data = [self._model_card(name) for name in self.settings.served_model_names]
        data += self.adapters.cards(self.created, self.model_name)
        return web.json_response({"object": "list", "data": data})

    async def model(self, request: web.Request) -> web.Response:
        """OpenAI's ``GET /v1/models/{model}`` (``client.models.retrieve``)."""
        name = request.match_info["model"]
        self._check_model(name)
        card = next((c for c in self.adapters.cards(self.created, self.model_name)
                     if c["id"] == name), None)
        return web.json_response(card or self._model_card(name))

    def _model_card(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "fairswitch",
                "root": self.core.config.model.model, "parent": None,
                "max_model_len": self.core.max_model_len, "permission": []}

    async def health(self, request: web.Request) -> web.Response:
        if not self.engine.is_running:
            raise APIError(503, "the engine is not running")
        return web.Response(status=200)

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": __version__})

    async def prometheus(self, request: web.Request) -> web.Response:
        try:
            snapshot = await self.engine.run_in_engine(engine_snapshot)
        except EngineDeadError as e:
            raise APIError(503, f"the engine is not running: {e}") from e
        return web.Response(body=self.metrics.render(snapshot).encode(),
                            headers={"Content-Type": CONTENT_TYPE})

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await self.prompts.run(self._tokenize, await self._body(request))
        return web.Response(text=body, content_type="application/json")

    async def detokenize(self, request: web.Request) -> web.Response:
        body = await self.prompts.run(self._detokenize, await self._body(request))
        return web.Response(text=body, content_type="application/json")

    def _tokenize(self, raw: bytes) -> str:
        """The response body; on a prompt worker thread. No length limit: counting the tokens
        of a prompt too long for the model is what /tokenize is for."""
        req = protocol.parse_tokenize(_loads(raw))
        self._check_model(req.model)
        if req.messages is not None:
            text = self.chat_template.render(req.messages, req.template)
        else:
            text = req.prompt
        ids = self.prompts.encode(text, add_special_tokens=req.add_special_tokens)
        strs = self.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return json.dumps({"count": len(ids), "max_model_len": self.core.max_model_len,
                           "tokens": ids, "token_strs": strs})

    def _detokenize(self, raw: bytes) -> str:
        """The response body; on a prompt worker thread."""
        model, ids = protocol.parse_detokenize(_loads(raw), self.core.hf_config.vocab_size)
        self._check_model(model)
        return json.dumps({"prompt": self.tokenizer.decode(ids)})

    # ---- shutdown -----------------------------------------------------------------------------

    async def drain(self, timeout: float) -> None:
        """Shutdown (serving.py): new requests are refused; those in flight may run for
        ``timeout`` seconds, then the engine aborts the rest and their handlers end them."""
        await self.in_flight.drain(timeout, self._abort)

    async def _abort(self, request_id: str) -> None:
        with contextlib.suppress(EngineDeadError):  # then every request has its error already
            await self.engine.abort(request_id)


@dataclass(slots=True)
class _Reply:
    """The envelope every body/chunk of one response shares, and how its choices look."""

    response_id: str
    created: int
    model: str
    fmt: protocol.ResponseFormat
    shaper: ChoiceShaper
    n: int  # choices in all (each prompt's: shaper.n)
    shape: ResponseShape | None = None  # the Responses API's reply (else fmt's)

    def body(self, choices: list[dict], chunk: bool = False, **extra: Any) -> dict[str, Any]:
        return self.fmt.envelope(self.response_id, self.created, self.model, choices, chunk,
                                 **extra)


def _payload_error(e: RequestPayloadError) -> str:
    """aiohttp's reason, without its "400, message:" framing."""
    text = " ".join(str(e).split())
    return text.split("message:", 1)[-1].strip() or "malformed body"


def _observe(tracker: RequestTracker, reply: _Reply, index: int, out: RequestOutput) -> None:
    """Choice 0 times the request (TTFT, gaps, finish); the others add their tokens (and each
    prompt's first choice its prompt's)."""
    if index == 0:
        tracker.observe(out)
    else:
        tracker.count_tokens(out, own_prompt=index % reply.shaper.n == 0)


def _usage(reply: _Reply, done: dict[int, RequestOutput]) -> dict[str, Any]:
    """Each prompt counted once (its first choice's), every choice's tokens."""
    firsts = [done[i] for i in range(0, reply.n, reply.shaper.n)]
    thinking = [reply.shaper.num_reasoning_tokens(out) for out in done.values()]
    return protocol.usage(sum(len(out.prompt_token_ids) for out in firsts),
                          sum(reply.shaper.num_shown_tokens(out) for out in done.values()),
                          sum(out.num_cached_tokens for out in firsts),
                          None if None in thinking else sum(thinking))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


MAX_JSON_DEPTH = 128  # arrays and objects within each other; a tool's JSON schema needs ~10


def _loads(raw: bytes) -> Any:
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from None
    if _depth(body) > MAX_JSON_DEPTH:
        # json.loads takes ~1000 levels; the checks and templates behind it recurse, and a
        # value that deep ended in RecursionError: a 500
        raise bad_request(f"the request body nests arrays and objects more than "
                          f"{MAX_JSON_DEPTH} deep")
    _check_text(body)
    return body


def _depth(value: Any) -> int:
    """How deep arrays and objects nest in ``value`` (a scalar: 0); containers alone are
    stacked (a body of millions of numbers is walked in a fraction of its parse time)."""
    deepest = 0
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1)
                     for child in (item.values() if isinstance(item, dict) else item)
                     if isinstance(child, (dict, list)))
    return deepest


def _check_text(body: Any) -> None:
    """Refuse strings that are not Unicode text: JSON's ``\\ud800`` escapes (and UTF-8 bytes
    of a surrogate, which ``json.loads`` lets through) give lone surrogates."""
    char = lone_surrogate(body)
    if char is not None:
        raise bad_request(f"the request body holds {not_text_message(char)}")


async def _next_output(outputs: AsyncIterator[Any]) -> Any:
    """The next output; the engine's refusals become API errors."""
    try:
        return await outputs.__anext__()
    except (QueueFullError, EngineDeadError, TypeError, ValueError) as e:
        raise _engine_error(e) from e


def _engine_error(e: QueueFullError | EngineDeadError | TypeError | ValueError) -> APIError:
    """The API error of an engine's refusal."""
    if isinstance(e, QueueFullError):
        return APIError(503, f"the server is at capacity ({e}); retry later",
                        code="queue_full", headers={"Retry-After": "1"})
    if isinstance(e, EngineDeadError):
        return APIError(503, f"the engine is not running: {e}")
    return bad_request(str(e), protocol.named_field(str(e)))  # add_request's validation


def build_app(engine: AsyncEngine, settings: ServerSettings | None = None, *,
              shutdown_engine: bool = True) -> web.Application:
    """The application. With ``shutdown_engine`` the app owns the engine: its cleanup (after
    in-flight requests were given their grace period and aborted) shuts the engine down."""
    settings = settings or ServerSettings()
    quiet_protocol_errors()
    server = OpenAIServer(engine, settings)
    middlewares = [server.in_flight.middleware, error_middleware]
    if settings.api_key:
        middlewares.append(_auth_middleware(settings.api_key))
    if settings.cors is not None:
        middlewares.insert(0, preflight_middleware(settings.cors))
    # client_max_size: aiohttp refuses larger bodies (413) even when they come chunked.
    app = web.Application(middlewares=middlewares, client_max_size=settings.max_body_bytes)
    if settings.cors is not None:
        app.on_response_prepare.append(origin_hook(settings.cors))
    if settings.request_id_headers:
        app.on_response_prepare.append(_request_id_header)
    app[SERVER_KEY] = server
    app[DRAIN_KEY] = server.drain
    app.router.add_post("/v1/completions", server.completions)
    app.router.add_post("/v1/chat/completions", server.chat_completions)
    app.router.add_post("/v1/responses", server.responses)
    app.router.add_post("/v1/embeddings", server.embeddings)
    for path in ("/score", "/v1/score"):
        app.router.add_post(path, server.score)
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        app.router.add_post(path, server.rerank)
    app.router.add_get("/v1/models", server.models)
    app.router.add_get("/v1/models/{model:.+}", server.model)  # (names may hold '/')
    app.router.add_get("/health", server.health)
    app.router.add_get("/ping", server.health)
    app.router.add_post("/ping", server.health)  # (SageMaker's; GET: add_get's)
    app.router.add_post("/invocations", server.invocations)
    app.router.add_get("/version", server.version)
    app.router.add_get("/metrics", server.prometheus)
    app.router.add_post("/tokenize", server.tokenize)
    app.router.add_post("/detokenize", server.detokenize)
    if settings.dev_mode:  # (vLLM's VLLM_SERVER_DEV_MODE routes)
        app.router.add_post("/reset_prefix_cache", server.reset_prefix_cache)
    if settings.allow_runtime_lora_updating:
        app.router.add_post("/v1/load_lora_adapter", server.adapters.load)
        app.router.add_post("/v1/unload_lora_adapter", server.adapters.unload)

    async def stop_prompt_workers(app: web.Application) -> None:
        server.prompts.close()
        server.chat_template.close()  # (request templates' processes)
    app.on_cleanup.append(stop_prompt_workers)
    if settings.log_stats_interval_s is not None:
        app.cleanup_ctx.append(_stats_logging(engine, server.metrics,
                                              settings.log_stats_interval_s))
    if shutdown_engine:
        async def stop_engine(app: web.Application) -> None:
            await asyncio.to_thread(engine.shutdown, ENGINE_STOP_S)
        app.on_cleanup.append(stop_engine)
    return app


def _stats_logging(engine: AsyncEngine, metrics: ServerMetrics, interval_s: float
                   ) -> Callable[[web.Application], AsyncIterator[None]]:
    """The stats line's task, for the app's life (stats_log.py)."""
    async def run(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(log_stats(engine, metrics, interval_s))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return run


SERVER_KEY = web.AppKey("server", OpenAIServer)
