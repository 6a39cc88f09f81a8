"""OpenAI request bodies -> typed requests (every field's type and range checked here, with messages
that name the field), and the response/chunk bodies of the OpenAI (and vLLM) API.

Unknown fields are ignored with a warning that names them, as vLLM does; known fields this
engine cannot honour (``best_of``, beam search, tools, vLLM's structured output...) are refused
with a 400 naming them rather than silently dropped.

Logprobs come back in OpenAI's shapes: completions ``{"tokens", "token_logprobs",
"top_logprobs", "text_offset"}`` (with ``echo``, the prompt's first, with None for its first
token), chat ``{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}``. A logprob of
-inf is sent as -9999.0 (JSON has no infinity), as vLLM does.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

from fairswitch.chat_messages import MessageError, check_template_kwargs, parse_conversation
from fairswitch.engine.beam_search import MAX_BEAM_WIDTH, MAX_LENGTH_PENALTY, BeamSearchParams
from fairswitch.model.generation_config import SAMPLING_FIELDS
from fairswitch.outputs import Logprob, PositionLogprobs
from fairswitch.sampling_params import MAX_LOGPROBS, MAX_N, SamplingParams
from fairswitch.server.errors import bad_request
from fairswitch.server.reasoning import Reasoning
from fairswitch.server.tool_calls import ToolCalls, call_schema, required_schema
from fairswitch.server.tool_parsers import AutoToolCalls
from fairswitch.structured_output import KINDS as STRUCTURED_KINDS
from fairswitch.structured_output import StructuredOutputsParams

logger = logging.getLogger(__name__)

# Larger integers would overflow the int64 tensors and generators the engine builds from them.
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's (and vLLM's) default for /v1/completions


def describe(value: Any) -> str:
    if value is None:
        return "null"
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(value), type(value).__name__)
    text = json.dumps(value)
    return f"{kind} {text if len(text) <= 40 else text[:37] + '...'}"


def integral(value: Any) -> int | None:
    """``value`` as an int: an int, or a float with no fraction (pydantic's lax mode, so vLLM's,
    takes 5.0 for 5); None for anything else."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def _int(body: dict, name: str, default: int | None = None, *,
         low: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    given, value = value, integral(value)
    if value is None:
        raise bad_request(f"'{name}' must be an integer, got {describe(given)}", name)
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise bad_request(f"'{name}' must fit in a signed 64-bit integer, got {value}", name)
    if low is not None and value < low:
        raise bad_request(f"'{name}' must be at least {low}, got {value}", name)
    return value


def _number(body: dict, name: str, default: float | None) -> float | None:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise bad_request(f"'{name}' must be a number, got {describe(value)}", name)
    try:
        number = float(value)
    except OverflowError:  # an integer past float's range
        number = math.inf
    if not math.isfinite(number):  # JSON's 1e999 parses to inf
        raise bad_request(f"'{name}' must be a finite number, got {describe(value)}", name)
    return number


def _ranged(body: dict, name: str, default: float | None, low: float,
            high: float) -> float | None:
    value = _number(body, name, default)
    if value is not None and not low <= value <= high:
        raise bad_request(f"'{name}' must be in [{low:g}, {high:g}], got {value:g}", name)
    return value


def _bool(body: dict, name: str, default: bool, *, field: str | None = None) -> bool:
    """``field``: the name errors give, where ``body`` is an object inside the request."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        field = field or name
        raise bad_request(f"'{field}' must be a boolean, got {describe(value)}", field)
    return value


def _str(body: dict, name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise bad_request(f"'{name}' must be a string, got {describe(value)}", name)
    return value


MAX_STOP_STRINGS = 256
MAX_CHOICES = 1024  # a completions request's prompts x n: each an engine request
# Each output token is looked up in them, and under min_tokens each step masks them all: a list
# of a million ids (a 7.5 MB body) slowed every other stream's tokens sevenfold.
MAX_STOP_TOKEN_IDS = 1024


def _stop(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise bad_request(f"'stop' must be a string or a list of strings, got {describe(value)}",
                          "stop")
    if any(not s for s in items):
        raise bad_request("'stop' strings must not be empty", "stop")
    if len(items) > MAX_STOP_STRINGS:  # each is searched for after every token, on the engine
        raise bad_request(f"'stop' holds {len(items)} strings; at most {MAX_STOP_STRINGS} are "
                          "allowed", "stop")
    return items


def _int_list(body: dict, name: str, most: int) -> list[int]:
    value = body.get(name)
    if value is None:
        return []
    ids = _integers(value)
    if ids is None or not all(0 <= t <= _INT64_MAX for t in ids):
        raise bad_request(f"'{name}' must be a list of non-negative integers, "
                          f"got {describe(value)}", name)
    value = ids
    if len(value) > most:
        raise bad_request(f"'{name}' holds {len(value)} ids; at most {most} are allowed", name)
    return value


# (field, values that mean "off"): any other value is refused, since it would be ignored. Beside
# OpenAI's, vLLM's own fields that change what is generated: structured output (guided_*),
# prompt truncation, vocabulary restrictions, and the chat template's controls.
_UNSUPPORTED_COMMON = (
    ("best_of", (1,)),
    ("logits_processors", ([],)))
_UNSUPPORTED_COMPLETION = (("suffix", ("",)), ("prompt_embeds", ()))
_UNSUPPORTED_CHAT = (("functions", ([],)), ("function_call", ("none",)))


# What beam search leaves out (each step takes the likeliest tokens, by the raw logprobs): these
# fields, unless at their defaults, are refused with it. (field, values that mean "off")
_NOT_WITH_BEAMS = (
    ("stop", ([],)), ("stop_token_ids", ([],)), ("min_tokens", (0,)), ("logprobs", (None,)),
    ("prompt_logprobs", (None,)), ("structured_outputs", (None,)), ("logit_bias", (None,)),
    ("allowed_token_ids", (None,)), ("bad_words", (None,)), ("presence_penalty", (0.0,)),
    ("frequency_penalty", (0.0,)), ("repetition_penalty", (None, 1.0)),
    ("include_stop_str_in_output", (False,)))


# Structured output's fields: OpenAI's response_format, vLLM's guided_* (older) and
# structured_outputs (newer); one of them per request.
_GUIDED = (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
           ("guided_grammar", "grammar"), ("structural_tag", "structural_tag"))
_STRUCTURED_FIELDS = ("response_format", "structured_outputs", *(name for name, _ in _GUIDED))


def truncated(ids: list[int], k: int | None, max_model_len: int) -> list[int]:
    """A prompt's ids as ``truncate_prompt_tokens`` k leaves them (-1: as many as leave room
    for one output token, max_model_len - 1)."""
    if k is None:
        return ids
    k = max_model_len - 1 if k == -1 else k
    if k >= max_model_len:
        raise bad_request(f"'truncate_prompt_tokens' ({k}) must be less than max_model_len "
                          f"({max_model_len}): a prompt leaves room for one token",
                          "truncate_prompt_tokens")
    return ids[-k:]


def _truncation(body: dict) -> int | None:
    k = _int(body, "truncate_prompt_tokens", None, low=-1)
    if k == 0:
        raise bad_request("'truncate_prompt_tokens' must be -1 (all that fit) or at least 1, "
                          "got 0", "truncate_prompt_tokens")
    return k


def _structured(body: dict) -> tuple[StructuredOutputsParams | None, str | None]:
    """What the reply is held to, and the structured-output field of the request that says so
    (None, None: none does)."""
    given: dict[str, dict[str, Any]] = {}
    form = body.get("response_format")
    if form is not None:
        kind = form.get("type") if isinstance(form, dict) else None
        if kind not in ("text", "json_object", "json_schema", "structural_tag"):
            raise bad_request("'response_format' must be {\"type\": \"text\"}, {\"type\": "
                              "\"json_object\"}, {\"type\": \"json_schema\", \"json_schema\": "
                              "{\"schema\": ...}} or {\"type\": \"structural_tag\", ...}, got "
                              f"{describe(form)}", "response_format")
        if kind == "structural_tag":  # (vLLM's: the whole object is the tag)
            given["response_format"] = {"structural_tag": form}
        elif kind == "json_object":
            given["response_format"] = {"json_object": True}
        elif kind == "json_schema":
            spec = form.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise bad_request("'response_format.json_schema.schema' must be a JSON schema "
                                  f"object, got {describe(schema)}", "response_format")
            given["response_format"] = {"json": schema}
    for name, kind in _GUIDED:
        if body.get(name) is not None:
            given[name] = {kind: body[name]}
    outputs = body.get("structured_outputs")
    if outputs is not None:
        if not isinstance(outputs, dict):
            raise bad_request(f"'structured_outputs' must be an object, got "
                              f"{describe(outputs)}", "structured_outputs")
        # vLLM's options beside the kind: these two are what this server does anyway (it never
        # falls back to another grammar engine; JSON never has free whitespace here).
        options = {k: v for k, v in outputs.items()
                   if k in ("disable_fallback", "disable_any_whitespace") and isinstance(v, bool)}
        if other := sorted(k for k in outputs if k not in STRUCTURED_KINDS
                           and k not in options and outputs[k] not in (None, False)):
            raise bad_request(f"'structured_outputs.{other[0]}' is not supported by this "
                              f"server (got {describe(outputs[other[0]])})",
                              "structured_outputs")
        given["structured_outputs"] = {k: v for k, v in outputs.items()
                                       if k in STRUCTURED_KINDS and v not in (None, False)}
    if len(given) > 1:
        raise bad_request(f"give one structured-output field, got {', '.join(given)}",
                          next(iter(given)))
    if not given:
        return None, None
    (name, spec), = given.items()
    try:
        return StructuredOutputsParams(**spec), name
    except (TypeError, ValueError) as e:
        raise bad_request(f"'{name}': {e}", name) from e


# The fields the parsers read or refuse; any other is ignored, and logged.
_READ_COMMON = frozenset({
    "model", "stream", "stream_options", "n", "temperature", "top_p", "top_k", "max_tokens",
    "max_completion_tokens", "min_tokens", "min_p", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "logit_bias", "allowed_token_ids", "bad_words", "prompt_logprobs",
    "seed", "stop", "stop_token_ids",
    "ignore_eos", "include_stop_str_in_output", "skip_special_tokens", "priority", "user",
    "return_token_ids", "return_tokens_as_token_ids", "truncate_prompt_tokens",
    "use_beam_search", "length_penalty", "cache_salt", "request_id", *_STRUCTURED_FIELDS})
_KNOWN_COMPLETION = _READ_COMMON | {"prompt", "echo", "logprobs", "add_special_tokens"} | {
    name for name, _ in _UNSUPPORTED_COMMON + _UNSUPPORTED_COMPLETION}
_KNOWN_CHAT = _READ_COMMON | {"messages", "add_generation_prompt", "continue_final_message",
                              "logprobs", "top_logprobs", "add_special_tokens", "tools",
                              "tool_choice", "parallel_tool_calls", "chat_template_kwargs",
                              "include_reasoning", "documents", "echo", "chat_template"} | {
    name for name, _ in _UNSUPPORTED_COMMON + _UNSUPPORTED_CHAT}
_MAX_LOGGED_FIELDS = 10


def _log_ignored(body: dict, known: frozenset[str]) -> None:
    """Unknown fields are ignored, but named in a warning (as vLLM does): a misspelt field
    (``max_token``) shows in the server's log."""
    ignored = sorted(body.keys() - known)
    if ignored:
        names = ", ".join(repr(name[:40]) for name in ignored[:_MAX_LOGGED_FIELDS])
        more = len(ignored) - _MAX_LOGGED_FIELDS
        logger.warning("request fields this server does not know were ignored: %s%s", names,
                       f" and {more} more" if more > 0 else "")


def _refuse_unsupported(body: dict, fields: tuple) -> None:
    for name, off in fields:
        value = body.get(name)
        # 0 == False in Python: a boolean only matches a boolean.
        if value is not None and not any(
                value == o and isinstance(value, bool) == isinstance(o, bool) for o in off):
            raise bad_request(f"'{name}' is not supported by this server "
                              f"(got {describe(value)})", name)


@dataclass(kw_only=True)
class GenerationRequest:
    """The fields /v1/completions and /v1/chat/completions share."""

    model: str | None
    stream: bool
    include_usage: bool
    continuous_usage: bool  # every chunk carries its choice's usage so far
    max_tokens: int | None  # None: the endpoint's default
    # None: unset, the model's default (``sampling_params``), as min_p and repetition_penalty
    temperature: float | None
    top_p: float | None
    top_k: int | None
    seed: int | None
    stop: list[str]
    stop_token_ids: list[int]
    ignore_eos: bool
    include_stop_str_in_output: bool
    skip_special_tokens: bool
    priority: int
    user: str | None
    n: int
    min_tokens: int
    min_p: float | None
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float | None
    logit_bias: dict[int, float] | None
    allowed_token_ids: list[int] | None
    bad_words: list[str] | None
    logprobs: int | None  # top logprobs per token (None: no logprobs)
    prompt_logprobs: int | None  # vLLM's extension (completions: also set by echo + logprobs)
    structured_outputs: StructuredOutputsParams | None = None  # (_structured)
    structured_field: str | None = None  # the request's field that gave it (errors name it)
    return_token_ids: bool = False  # vLLM's: token ids beside the text (and the prompt's)
    # vLLM's: logprobs name each token "token_id:<id>" rather than by its text (None: the
    # server's --return-tokens-as-token-ids)
    return_tokens_as_token_ids: bool | None = None
    truncate_prompt_tokens: int | None = None  # vLLM's: keep the prompt's last k tokens
    # vLLM's: only requests with the same salt share cached KV (Engine.add_request)
    cache_salt: str | None = None
    # vLLM's: the reply's id (after its prefix) where no X-Request-Id header gives one
    request_id: str | None = None
    use_beam_search: bool = False  # vLLM's: the n choices are the n best beams
    length_penalty: float = 1.0  # (beam search's: score = logprob / length ** this)

    def sampling_params(self, max_tokens: int,
                        defaults: dict[str, Any] | None = None) -> SamplingParams:
        """One choice's parameters (``n`` copies are separate engine requests: ``copies``).
        ``defaults``: the model's, for the sampling fields the request left unset
        (``GenerationConfig.sampling``)."""
        given = {name: getattr(self, name) for name in SAMPLING_FIELDS
                 if getattr(self, name) is not None}
        try:
            return SamplingParams(
                **{**(defaults or {}), **given}, max_tokens=max_tokens, seed=self.seed,
                stop=self.stop,
                stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
                include_stop_str_in_output=self.include_stop_str_in_output,
                skip_special_tokens=self.skip_special_tokens, n=self.n,
                min_tokens=self.min_tokens,
                presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                logit_bias=self.logit_bias, allowed_token_ids=self.allowed_token_ids,
                bad_words=self.bad_words,
                logprobs=self.logprobs, prompt_logprobs=self.prompt_logprobs,
                structured_outputs=self.structured_outputs)
        except (TypeError, ValueError) as e:  # e.g. a logit bias not a number, or out of range
            raise bad_request(str(e), named_field(str(e))) from e

    def beam_params(self, max_tokens: int) -> BeamSearchParams:
        """vLLM's ``use_beam_search``: ``n`` beams (engine/beam_search.py). A field beam search
        does not honour, set, is a 400 naming it rather than ignored."""
        if self.n > MAX_BEAM_WIDTH:
            raise bad_request(f"'n' (the beam width) must be at most {MAX_BEAM_WIDTH} with "
                              f"use_beam_search, got {self.n}", "n")
        for name, off in _NOT_WITH_BEAMS:
            if getattr(self, name) not in off:
                if name == "structured_outputs":  # (as the request said it)
                    name = self.structured_field or name
                raise bad_request(f"'{name}' is not available with use_beam_search", name)
        return BeamSearchParams(beam_width=self.n, max_tokens=max_tokens,
                                ignore_eos=self.ignore_eos, temperature=self.temperature or 0.0,
                                length_penalty=self.length_penalty)

    def check_min_tokens(self, max_tokens: int) -> None:
        """``min_tokens`` within the ``max_tokens`` the request gets: the one it gave (checked
        when parsed), else the default, or the context's room (vLLM refuses it too)."""
        if self.min_tokens > max_tokens:
            limit = (f"'max_tokens' ({max_tokens})" if self.max_tokens is not None else
                     f"the {max_tokens} tokens this request may generate (no 'max_tokens' given: "
                     "the default, or the room the prompt leaves in the context)")
            raise bad_request(f"'min_tokens' ({self.min_tokens}) must not exceed {limit}",
                              "min_tokens")


def named_field(message: str) -> str | None:
    """The request field that a SamplingParams error, or the engine's check of a request, names
    first (their messages start with it)."""
    word = message.split(" ", 1)[0]
    return word if word in _FIELD_NAMES else None


_FIELD_NAMES = frozenset(f.name for f in fields(GenerationRequest))


@dataclass(kw_only=True)
class CompletionRequest(GenerationRequest):
    prompts: list[str | list[int]]  # one, or a batch (each with n choices)
    echo: bool  # the prompt comes back before the completion (with its logprobs, if asked)
    add_special_tokens: bool = True  # the tokenizer's BOS etc. around a text prompt


@dataclass(frozen=True)
class TemplateInputs:
    """What a chat template renders besides the messages."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[dict[str, Any]] | None = None  # shown to the model
    documents: list[dict[str, str]] | None = None  # vLLM's, for templates that do RAG
    kwargs: dict[str, Any] = field(default_factory=dict)  # chat_template_kwargs
    source: str | None = None  # the request's own chat_template (None: the server's)


@dataclass(kw_only=True)
class ChatRequest(GenerationRequest):
    messages: list[dict[str, Any]]
    template: TemplateInputs
    add_special_tokens: bool = False  # templates write their own (vLLM's default too)
    # tool_choice named or "required": replies are calls; "auto": replies may hold calls
    tool_calls: ToolCalls | AutoToolCalls | None = None
    reasoning: Reasoning | None = None  # replies' thinking apart from their answer
    echo: bool = False  # vLLM's: a reply continuing an assistant message starts with it

    def echoed(self) -> str:
        """The text ``echo`` puts before each reply: the final message's content where that
        message is the assistant's, whose role the reply has (vLLM's), else nothing."""
        last = self.messages[-1] if self.echo and self.messages else {}
        return (last.get("content") or "") if last.get("role") == "assistant" else ""


def _common(body: Any, unsupported: tuple, echo: bool = False) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {describe(body)}")
    n = _int(body, "n", 1)
    if not 1 <= n <= MAX_N:
        raise bad_request(f"'n' must be in [1, {MAX_N}], got {n}", "n")
    _refuse_unsupported(body, _UNSUPPORTED_COMMON + unsupported)
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request(f"'stream_options' must be an object, got {describe(options)}",
                          "stream_options")
    if options and not stream:  # (an empty object or null is no option: vLLM accepts them)
        raise bad_request("'stream_options' is only allowed with stream=true", "stream_options")
    include_usage = _bool(options or {}, "include_usage", False,
                          field="stream_options.include_usage")
    # vLLM's: with include_usage, every chunk's usage so far (its choice's), not only the last.
    continuous_usage = _bool(options or {}, "continuous_usage_stats", False,
                             field="stream_options.continuous_usage_stats") and include_usage
    if stream and body.get("prompt_logprobs") is not None:  # (as vLLM: whole responses only)
        raise bad_request("'prompt_logprobs' is not available with stream=true",
                          "prompt_logprobs")
    # Sampling fields left unset (None) take the model's defaults (``sampling_params``).
    temperature = _number(body, "temperature", None)
    if temperature is not None and temperature < 0:
        raise bad_request(f"'temperature' must be >= 0, got {temperature}", "temperature")
    top_p = _number(body, "top_p", None)
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise bad_request(f"'top_p' must be in (0, 1], got {top_p}", "top_p")
    top_k = _int(body, "top_k", None)
    if top_k is not None and top_k < -1:
        raise bad_request(f"'top_k' must be -1 or 0 (disabled) or positive, got {top_k}", "top_k")
    # (0 only with a completion's echo: the prompt, nothing generated; both are checked)
    max_tokens = _int(body, "max_tokens", None, low=0 if echo else 1)
    newer = _int(body, "max_completion_tokens", None, low=1)
    max_tokens = newer if newer is not None else max_tokens
    min_tokens = _int(body, "min_tokens", 0, low=0)
    if max_tokens is not None and min_tokens > max_tokens:
        raise bad_request(f"'min_tokens' ({min_tokens}) must not exceed 'max_tokens' "
                          f"({max_tokens})", "min_tokens")
    bias = body.get("logit_bias")
    if bias is not None and not isinstance(bias, dict):
        raise bad_request(f"'logit_bias' must be an object mapping token ids to numbers, got "
                          f"{describe(bias)}", "logit_bias")
    structured, structured_field = _structured(body)
    return dict(
        n=n, min_tokens=min_tokens, structured_outputs=structured,
        structured_field=structured_field,
        min_p=_ranged(body, "min_p", None, 0.0, 1.0),
        presence_penalty=_ranged(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_ranged(body, "frequency_penalty", 0.0, -2.0, 2.0),
        repetition_penalty=_ranged(body, "repetition_penalty", None, 1e-6, 100.0),
        logit_bias=bias or None,
        allowed_token_ids=_allowed_token_ids(body),
        bad_words=_bad_words(body),
        prompt_logprobs=_logprob_count(body, "prompt_logprobs"),
        return_token_ids=_bool(body, "return_token_ids", False),
        return_tokens_as_token_ids=_bool(body, "return_tokens_as_token_ids", None),
        truncate_prompt_tokens=_truncation(body), cache_salt=_cache_salt(body),
        request_id=_request_id(body),
        model=_str(body, "model"), stream=stream, include_usage=include_usage,
        continuous_usage=continuous_usage,
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        seed=_int(body, "seed"), stop=_stop(body),
        stop_token_ids=_int_list(body, "stop_token_ids", MAX_STOP_TOKEN_IDS),
        ignore_eos=_bool(body, "ignore_eos", False),
        include_stop_str_in_output=_bool(body, "include_stop_str_in_output", False),
        skip_special_tokens=_bool(body, "skip_special_tokens", True),
        priority=_int(body, "priority", 0), user=_str(body, "user"),
        use_beam_search=_bool(body, "use_beam_search", False),
        length_penalty=_ranged(body, "length_penalty", 1.0, -MAX_LENGTH_PENALTY,
                               MAX_LENGTH_PENALTY))


MAX_REQUEST_ID = 256  # characters of a client's request id (X-Request-Id or request_id)


def _request_id(body: dict) -> str | None:
    rid = _str(body, "request_id")
    if rid is not None and not 0 < len(rid) <= MAX_REQUEST_ID:
        raise bad_request(f"'request_id' must be 1 to {MAX_REQUEST_ID} characters",
                          "request_id")
    return rid


def _cache_salt(body: dict) -> str | None:
    salt = _str(body, "cache_salt")
    if salt == "":
        raise bad_request("'cache_salt' must be a non-empty string", "cache_salt")
    return salt


def _allowed_token_ids(body: dict) -> list[int] | None:
    value = body.get("allowed_token_ids")
    if value is None:
        return None
    ids = _token_ids(value)
    if ids is None:
        raise bad_request(f"'allowed_token_ids' must be a non-empty array of token ids, got "
                          f"{describe(value)}", "allowed_token_ids")
    return ids


def _bad_words(body: dict) -> list[str] | None:
    value = body.get("bad_words")
    if value is None or value == []:
        return None
    if not isinstance(value, list) or not all(isinstance(w, str) and w.strip() for w in value):
        raise bad_request(f"'bad_words' must be an array of non-blank strings, got "
                          f"{describe(value)}", "bad_words")
    return value


def _integers(value: Any) -> list[int] | None:
    """``value`` as a list of ints (integral floats taken); None if it is not one."""
    if not isinstance(value, list):
        return None
    ids = [integral(t) for t in value]
    return None if any(t is None for t in ids) else ids


def _token_ids(value: Any) -> list[int] | None:
    """``value`` as a non-empty list of token ids; None if it is not one."""
    return _integers(value) if value else None


def parse_prompts(value: Any, n: int, name: str = "prompt") -> list[str | list[int]]:
    """The prompts of a completions request: a string or a list of token ids, or a list of
    those (a batch: prompt i's choices are numbered from i * n, as in vLLM)."""
    if value is None:
        raise bad_request(f"'{name}' is required", name)
    if isinstance(value, str) or _token_ids(value) is not None:
        value = [value]
    if not isinstance(value, list) or not all(
            isinstance(p, str) or _token_ids(p) is not None or p == [] for p in value):
        raise bad_request(f"'{name}' must be a string, a list of token ids, or a list of "
                          f"those, got {describe(value)}", name)
    value = [p if isinstance(p, str) or p == [] else _token_ids(p) for p in value]
    if not value or any(not p for p in value):
        raise bad_request(f"'{name}' must not be empty", name)
    if len(value) * n > MAX_CHOICES:
        raise bad_request(f"{len(value)} prompts x n={n} are {len(value) * n} choices; a "
                          f"request has at most {MAX_CHOICES}", name)
    return value


def _logprob_count(body: dict, name: str) -> int | None:
    value = _int(body, name, None, low=0)
    if value is not None and value > MAX_LOGPROBS:
        raise bad_request(f"'{name}' must be at most {MAX_LOGPROBS}, got {value}", name)
    return value


def parse_completion(body: Any) -> CompletionRequest:
    echo = isinstance(body, dict) and _bool(body, "echo", False)
    common = _common(body, _UNSUPPORTED_COMPLETION, echo)
    logprobs = _logprob_count(body, "logprobs")
    if echo and logprobs is not None and common["prompt_logprobs"] is None:
        common["prompt_logprobs"] = logprobs  # the echoed prompt comes with its logprobs
    prompts = parse_prompts(body.get("prompt"), common["n"])
    _log_ignored(body, _KNOWN_COMPLETION)
    return CompletionRequest(prompts=prompts, echo=echo, logprobs=logprobs,
                             add_special_tokens=_bool(body, "add_special_tokens", True), **common)


def parse_messages(value: Any) -> list[dict[str, Any]]:
    """Chat messages with string content (and tool calls), checked as ``LLM.chat`` checks them
    (chat_messages.py)."""
    if value is None:
        raise bad_request("'messages' is required", "messages")
    if not isinstance(value, list):
        raise bad_request(f"'messages' must be an array, got {describe(value)}", "messages")
    try:
        return parse_conversation(value, "messages", describe)
    except MessageError as e:
        raise bad_request(str(e), e.field) from e


def parse_chat(body: Any, tool_parser: str | None = None,
               reasoning_parser: str | None = None) -> ChatRequest:
    """``tool_parser``: the parser of the model's own tool calls that tool_choice "auto" takes
    (``ServerSettings.tool_call_parser``, with auto tool choice enabled); None refuses "auto".
    ``reasoning_parser``: replies' thinking apart from their answer (reasoning.py); vLLM's
    ``include_reasoning: false`` leaves it out of the reply."""
    common = _common(body, _UNSUPPORTED_CHAT)
    top = _logprob_count(body, "top_logprobs")
    if top and not body.get("logprobs"):  # (0 asks for nothing: vLLM takes it too)
        raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    logprobs = (top or 0) if _bool(body, "logprobs", False) else None
    messages = parse_messages(body.get("messages"))
    tools, named, required, auto = _tools(body, tool_parser is not None)
    template = _template_inputs(body, tools)
    calls: ToolCalls | AutoToolCalls | None = None
    if auto:  # the model may call, in its own syntax: read by the parser
        calls = AutoToolCalls(tool_parser, _bool(body, "parallel_tool_calls", True))
        if tool_parser in ("hermes", "mistral") and "skip_special_tokens" not in body:
            # Tokenizers mark [TOOL_CALLS], some <tool_call>, special: the reply's text keeps
            # them (as vLLM's).
            common["skip_special_tokens"] = False
    elif named is not None or required:  # the reply is calls: held to their schema
        if common["structured_outputs"] is not None:
            raise bad_request(f"'tool_choice' {describe(body['tool_choice'])} holds the reply "
                              "to the calls' schema: give no other structured output",
                              "tool_choice")
        try:
            schema = (required_schema(tools) if required else
                      next(call_schema(t["function"]) for t in tools
                           if t["function"]["name"] == named))
        except ValueError as e:
            raise bad_request(str(e), "tools") from e
        calls = ToolCalls(named, _bool(body, "parallel_tool_calls", True))
        common["structured_outputs"] = StructuredOutputsParams(json=schema)
        common["structured_field"] = "tool_choice"
    include_reasoning = _bool(body, "include_reasoning", True)
    held = common["structured_outputs"]
    if held is not None and reasoning_parser == "deepseek_r1":
        # It always thinks first: the structure (response_format, a named or required tool
        # call) holds the answer after </think>, as vLLM's.
        common["structured_outputs"] = replace(held, after="</think>")
    elif held is not None and reasoning_parser == "qwen3":
        # It may think first: a reply opening with a <think> token is free up to </think>,
        # else held from its first token.
        common["structured_outputs"] = replace(held, after="</think>", opens="<think>")
    # Under qwen3 a held reply thinks only where it opens with <think> (by the structure, or by
    # that token): a JSON reply is all answer.
    reasoning = (Reasoning(reasoning_parser, include_reasoning,
                           opened_only=held is not None and reasoning_parser == "qwen3")
                 if reasoning_parser else None)
    _log_ignored(body, _KNOWN_CHAT)
    return ChatRequest(messages=messages, template=template, logprobs=logprobs,
                       add_special_tokens=_bool(body, "add_special_tokens", False),
                       tool_calls=calls, reasoning=reasoning, echo=_bool(body, "echo", False),
                       **common)


def _template_inputs(body: dict, tools: list[dict[str, Any]] | None) -> TemplateInputs:
    """vLLM's template controls: add_generation_prompt and continue_final_message (not both:
    the first starts a new assistant turn, the second continues the final message), the tools
    (``_tools``), documents and chat_template_kwargs."""
    continue_final = _bool(body, "continue_final_message", False)
    add_generation_prompt = _bool(body, "add_generation_prompt", True)
    if continue_final and add_generation_prompt:
        raise bad_request("'continue_final_message' and 'add_generation_prompt' cannot both be "
                          "true: set 'add_generation_prompt': false to continue the final "
                          "message", "continue_final_message")
    return TemplateInputs(add_generation_prompt=add_generation_prompt,
                          continue_final_message=continue_final, tools=tools,
                          documents=_documents(body), kwargs=_template_kwargs(body),
                          source=_str(body, "chat_template") or None)  # ("": the server's)


def _documents(body: dict) -> list[dict[str, str]] | None:
    """vLLM's ``documents``: objects of strings (``{"title", "text"}`` as templates that do
    RAG read them); none or ``[]``: None."""
    value = body.get("documents")
    if value is None or value == []:
        return None
    if not isinstance(value, list) or not all(
            isinstance(d, dict) and all(isinstance(k, str) and isinstance(v, str)
                                              for k, v in d.items()) for d in value):
        raise bad_request("'documents' must be an array of objects whose values are strings "
                          f"(e.g. {{\"title\": ..., \"text\": ...}}), got {describe(value)}",
                          "documents")
    return value


_TOOL_CHOICE_FORMS = ("'tool_choice' must be \"none\", \"auto\", \"required\" or {\"type\": "
                      "\"function\", \"function\": {\"name\": ...}}")


def _tools(body: dict, auto_tools: bool
           ) -> tuple[list[dict[str, Any]] | None, str | None, bool, bool]:
    """(the tools to render, the function the reply must call, whether it must call some,
    whether the model may call them in its own syntax). As vLLM: with tool_choice 'none' the
    tools are shown to the model and no call is made; a named function (``{"type":
    "function", "function": {"name": ...}}``) makes the reply that function's call and
    'required' one call or more to any of them, held to their schema (structured output,
    tool_calls.py); 'auto', the default with tools, needs a parser of the model's own syntax
    (``auto_tools``: ``--enable-auto-tool-choice --tool-call-parser``, tool_parsers.py)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if choice is None and tools:  # OpenAI's default with tools
        choice = "auto"
    if tools is not None and not isinstance(tools, list):
        raise bad_request(f"'tools' must be an array, got {describe(tools)}", "tools")
    if choice == "required" and not tools:  # nothing to call: none (as vLLM)
        choice = "none"
    named = None
    if isinstance(choice, dict):
        fn = choice.get("function")
        if (choice.get("type") != "function" or not isinstance(fn, dict)
                or not isinstance(fn.get("name"), str)):
            raise bad_request(_TOOL_CHOICE_FORMS + f", got {describe(choice)}", "tool_choice")
        named = fn["name"]
    elif choice not in (None, "none", "required", "auto"):
        raise bad_request(_TOOL_CHOICE_FORMS + f", got {describe(choice)}", "tool_choice")
    if not tools:
        if named is not None:
            raise bad_request(f"'tool_choice' names {named!r}, but 'tools' lists no function",
                              "tool_choice")
        return None, None, False, False
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if (not isinstance(tool, dict) or tool.get("type") != "function"
                or not isinstance(fn, dict) or not isinstance(fn.get("name"), str)
                or not fn["name"]):
            raise bad_request(f"'tools[{i}]' must be {{\"type\": \"function\", \"function\": "
                              f"{{\"name\": ..., ...}}}}, got {describe(tool)}", f"tools[{i}]")
        if not isinstance(fn.get("parameters") or {}, dict):  # (null: none, as vLLM takes)
            raise bad_request(f"'tools[{i}].function.parameters' must be a JSON schema object, "
                              f"got {describe(fn['parameters'])}", f"tools[{i}]")
    if choice == "auto" and not auto_tools:
        said = "'tool_choice' 'auto'" if body.get("tool_choice") is not None else (
            "'tools' without 'tool_choice' (OpenAI's default: 'auto')")
        raise bad_request(f"{said} needs a parser of the model's tool calls: start the server "
                          "with --enable-auto-tool-choice --tool-call-parser NAME, or give "
                          "'tool_choice': 'none' to show the tools to the model, 'required' or "
                          "a named function to make the reply calls", "tool_choice")
    if named is not None and named not in {t["function"]["name"] for t in tools}:
        raise bad_request(f"'tool_choice' names {named!r}, which 'tools' does not list",
                          "tool_choice")
    return tools, named, choice == "required", choice == "auto"


def _template_kwargs(body: dict) -> dict[str, Any]:
    kwargs = body.get("chat_template_kwargs")
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise bad_request(f"'chat_template_kwargs' must be an object, got {describe(kwargs)}",
                          "chat_template_kwargs")
    try:
        check_template_kwargs(kwargs)
    except ValueError as e:
        raise bad_request(f"'chat_template_kwargs' {e}", "chat_template_kwargs") from e
    return kwargs


def resolve_max_tokens(requested: int | None, num_prompt_tokens: int, max_model_len: int,
                       default: int | None, cap: int | None = None) -> int:
    """The request's max_tokens: refused (with the numbers) when prompt + max_tokens does not fit;
    absent: ``default``, or whatever room the context leaves when default is None. ``cap``: the
    model's max_new_tokens (generation_config.json), which bounds either, as in vLLM."""
    room = max_model_len - num_prompt_tokens
    if requested is None:
        chosen = room if default is None else min(default, room)
        return chosen if cap is None else min(chosen, cap)
    if requested > room:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {num_prompt_tokens + requested} tokens ({num_prompt_tokens} in the "
            f"prompt, {requested} for the completion). Please reduce the length of the prompt "
            "or the completion.", "max_tokens")
    return requested if cap is None else min(requested, cap)


# ---- response bodies --------------------------------------------------------------------------

def usage(num_prompt_tokens: int, num_completion_tokens: int,
          num_cached_tokens: int = 0, num_reasoning_tokens: int | None = None
          ) -> dict[str, Any]:
    """OpenAI's usage; ``num_reasoning_tokens`` (with a reasoning parser: the replies' tokens
    that are thinking) as ``completion_tokens_details.reasoning_tokens``."""
    body: dict[str, Any] = {"prompt_tokens": num_prompt_tokens,
                            "completion_tokens": num_completion_tokens,
                            "total_tokens": num_prompt_tokens + num_completion_tokens}
    if num_cached_tokens:  # prompt tokens whose KV came from the prefix cache
        body["prompt_tokens_details"] = {"cached_tokens": num_cached_tokens}
    if num_reasoning_tokens is not None:
        body["completion_tokens_details"] = {"reasoning_tokens": num_reasoning_tokens}
    return body


@dataclass
class ResponseFormat:
    """How one endpoint shapes its choices, whole and streamed (one choice, index 0)."""

    object: str  # "text_completion" | "chat.completion"
    chunk_object: str  # "text_completion" | "chat.completion.chunk"
    id_prefix: str
    chat: bool

    def envelope(self, response_id: str, created: int, model: str, choices: list[dict],
                 chunk: bool, **extra: Any) -> dict[str, Any]:
        return {"id": response_id, "object": self.chunk_object if chunk else self.object,
                "created": created, "model": model, "choices": choices, **extra}

    def choice(self, text: str, finish_reason: str | None, stop_reason: int | str | None,
               index: int = 0, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        body = ({"message": {"role": "assistant", "content": text}} if self.chat
                else {"text": text})
        return {"index": index, **body, "logprobs": logprobs, "finish_reason": finish_reason,
                "stop_reason": stop_reason}

    def opening_choices(self, n: int = 1, echoed: str = "") -> list[dict[str, Any]]:
        """Chat streams open with a chunk per choice that names the role (and holds the
        message a chat's ``echo`` repeats)."""
        if not self.chat:
            return []
        return [{"index": i, "delta": {"role": "assistant", "content": echoed},
                 "logprobs": None, "finish_reason": None} for i in range(n)]

    def delta_choice(self, text: str, finish_reason: str | None, stop_reason: int | str | None,
                     index: int = 0, logprobs: dict[str, Any] | None = None,
                     has_tokens: bool = True) -> dict[str, Any]:
        """One chunk's choice: a chunk per token, so a chat chunk whose token's text is held
        back says ``"content": ""`` (a chunk with no token, only a finish, has no content)."""
        if self.chat:
            body: dict[str, Any] = {"delta": {"content": text} if has_tokens else {}}
        else:
            body = {"text": text}
        choice = {"index": index, **body, "logprobs": logprobs, "finish_reason": finish_reason}
        if finish_reason is not None:
            choice["stop_reason"] = stop_reason
        return choice


COMPLETION = ResponseFormat("text_completion", "text_completion", "cmpl-", chat=False)
CHAT = ResponseFormat("chat.completion", "chat.completion.chunk", "chatcmpl-", chat=True)


# ---- /tokenize and /detokenize (vLLM's shapes) -------------------------------------------------

@dataclass(kw_only=True)
class TokenizeRequest:
    model: str | None
    prompt: str | None  # either a prompt...
    messages: list[dict[str, Any]] | None  # ...or a conversation rendered by the chat template
    template: TemplateInputs
    add_special_tokens: bool
    return_token_strs: bool


def parse_tokenize(body: Any) -> TokenizeRequest:
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {describe(body)}")
    messages = body.get("messages")
    prompt = None
    if messages is not None:
        messages = parse_messages(messages)
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise bad_request(f"'prompt' (a string) or 'messages' is required, got "
                              f"{describe(prompt)}", "prompt")
    return TokenizeRequest(
        model=_str(body, "model"), prompt=prompt, messages=messages,
        template=(_template_inputs(body, _tools(body, auto_tools=True)[0]) if messages is not None
                  else TemplateInputs()),
        # Chat templates write their own special tokens; a plain prompt gets the tokenizer's.
        add_special_tokens=_bool(body, "add_special_tokens", messages is None),
        return_token_strs=_bool(body, "return_token_strs", False))


def parse_detokenize(body: Any, vocab_size: int) -> tuple[str | None, list[int]]:
    """(model, token ids)."""
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {describe(body)}")
    tokens = body.get("tokens")
    ids = _integers(tokens)
    if ids is None or not all(0 <= t < vocab_size for t in ids):
        raise bad_request(f"'tokens' must be a list of token ids in [0, {vocab_size}), got "
                          f"{describe(tokens)}", "tokens")
    return _str(body, "model"), ids


# ---- logprobs ---------------------------------------------------------------------------------

def _finite(logprob: float) -> float:
    return max(logprob, -9999.0)


def token_id_text(token: int) -> str:
    """A token named by its id (vLLM's ``return_tokens_as_token_ids``): a piece of a character
    has no text of its own to show."""
    return f"token_id:{token}"


def completion_logprobs(token_ids: list[int], entries: list[PositionLogprobs | None],
                        text_of: Any, text_offset: int = 0, by_id: bool = False
                        ) -> dict[str, Any]:
    """OpenAI's completions shape for tokens ``token_ids`` with their ``entries`` (None: the
    prompt's first token, which nothing predicts); ``text_of(id)``: a token's text; ``by_id``:
    tokens named "token_id:<id>" instead (vLLM's ``return_tokens_as_token_ids``)."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for token, entry in zip(token_ids, entries):
        text = _text(entry[token] if entry else None, token, text_of, by_id)
        tokens.append(text)
        offsets.append(text_offset)
        text_offset += len(text)
        if entry is None:
            token_lps.append(None)
            tops.append(None)
            continue
        token_lps.append(_finite(entry[token].logprob))
        tops.append({_text(lp, t, text_of, by_id): _finite(lp.logprob)
                     for t, lp in entry.items()})
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
            "text_offset": offsets}


def prompt_logprobs(entries: list[PositionLogprobs | None], text_of: Any
                    ) -> list[dict[str, Any] | None]:
    """vLLM's ``prompt_logprobs``: per prompt token (None for the first, which nothing
    predicts) the token's and the top alternatives' ``{id: {logprob, rank, decoded_token}}``."""
    return [None if entry is None else
            {str(t): {"logprob": _finite(lp.logprob), "rank": lp.rank,
                      "decoded_token": _text(lp, t, text_of)} for t, lp in entry.items()}
            for entry in entries]


def chat_logprobs(token_ids: list[int], entries: list[PositionLogprobs], top: int,
                  text_of: Any, by_id: bool = False) -> dict[str, Any]:
    """OpenAI's chat shape: per token its text, logprob, UTF-8 bytes and ``top`` alternatives.
    ``by_id``: tokens named "token_id:<id>", the chosen one's bytes still its text's (vLLM's)."""
    content = []
    for token, entry in zip(token_ids, entries):
        text = _text(entry[token], token, text_of)
        ranked = sorted((lp.rank or 0, t, lp) for t, lp in entry.items() if lp.rank
                        and lp.rank <= top)
        content.append({"token": _text(entry[token], token, text_of, by_id),
                        "logprob": _finite(entry[token].logprob),
                        "bytes": list(text.encode()),
                        "top_logprobs": [{"token": (s := _text(lp, t, text_of, by_id)),
                                          "logprob": _finite(lp.logprob),
                                          "bytes": list(s.encode())} for _, t, lp in ranked]})
    return {"content": content}


def _text(lp: Logprob | None, token: int, text_of: Any, by_id: bool = False) -> str:
    """A token's name in logprobs: "token_id:<id>" ``by_id``, else its text as the engine
    decoded it (``lp``, None where nothing predicts the token), else ``text_of``'s."""
    if by_id:
        return token_id_text(token)
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return text_of(token)
