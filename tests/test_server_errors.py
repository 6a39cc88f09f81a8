"""Every way a request can be wrong gets its status and an OpenAI-shaped error naming the problem;
random bodies and garbage bytes never take the server down (nor produce a 500)."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import random
import re

import aiohttp
import pytest

from fairswitch.config import EngineConfig
from fairswitch.engine.async_engine import AsyncEngine
from fairswitch.server import BackgroundServer, ServerSettings, build_app, protocol
from fairswitch.server.app import SERVER_KEY
from fairswitch.server.errors import APIError

KEY = "sk-errors"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BODY = 64 * 1024
CHAT = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}


@pytest.fixture(scope="module")
def engine():
    # One running request at a time and one waiting: the third is refused (queue full).
    eng = AsyncEngine.from_config(EngineConfig.from_kwargs(
        num_gpu_blocks=256, max_model_len=256, max_num_seqs=1, max_waiting=1))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    settings = ServerSettings(served_model_names=["tiny", "tiny-alias"], api_key=KEY,
                              max_body_bytes=MAX_BODY)
    with BackgroundServer(build_app(engine, settings, shutdown_engine=False)) as srv:
        yield srv


async def request(url: str, method: str = "POST", *, body=None, data: bytes | None = None,
                  headers=None, auth: bool = True) -> tuple[int, dict, object]:
    hdrs = {**(AUTH if auth else {}), **(headers or {})}
    if body is not None:
        data = json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    async with aiohttp.ClientSession() as s:
        async with s.request(method, url, data=data, headers=hdrs) as r:
            json_body = r.content_type == "application/json"
            return r.status, dict(r.headers), await r.json() if json_body else await r.text()


def call(server, path: str, **kw) -> tuple[int, dict, object]:
    return asyncio.run(request(server.url + path, **kw))


def assert_error(result, status: int, *fragments: str, param: str | None = None) -> dict:
    got, headers, body = result
    assert got == status, body
    assert headers["Content-Type"].startswith("application/json")
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == ("invalid_request_error" if status < 500 else "server_error")
    for f in fragments:
        assert f in err["message"], (f, err["message"])
    if param is not None:
        assert err["param"] == param
    return err


# (path, body, status, fragments of the message, param)
BAD = [
    ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, 400, ["'max_tokens'", "integer"],
     "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, ["'max_tokens'", "at least 1"],
     "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2.5}, 400, ["'max_tokens'"], "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": True}, 400, ["'max_tokens'"], "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, ["'temperature'", "number"],
     "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, ["'temperature'", ">= 0"],
     "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": 10**400}, 400,
     ["'temperature'", "finite"], "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, ["'top_p'"], "top_p"),
    ("/v1/completions", {"prompt": "x", "top_p": [1]}, 400, ["'top_p'", "number"], "top_p"),
    ("/v1/completions", {"prompt": "x", "top_k": -2}, 400, ["'top_k'"], "top_k"),
    ("/v1/completions", {"prompt": "x", "top_k": 2**70}, 400, ["'top_k'", "64-bit"], "top_k"),
    ("/v1/completions", {"prompt": "x", "seed": 2**64}, 400, ["'seed'", "64-bit"], "seed"),
    ("/v1/completions", {"prompt": "x", "seed": "1"}, 400, ["'seed'", "integer"], "seed"),
    ("/v1/completions", {"prompt": "x", "stop": 3}, 400, ["'stop'"], "stop"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", ""]}, 400, ["'stop'", "empty"], "stop"),
    ("/v1/completions", {"prompt": "x", "stop": ["a"] * 257}, 400,
     ["'stop' holds 257 strings; at most 256"], "stop"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [5] * 1025}, 400,
     ["'stop_token_ids' holds 1025 ids; at most 1024"], "stop_token_ids"),
    ("/v1/completions", {"prompt": "x", "ignore_eos": "yes"}, 400, ["'ignore_eos'", "boolean"],
     "ignore_eos"),
    ("/v1/completions", {"prompt": "x", "stream": 1}, 400, ["'stream'", "boolean"], "stream"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400,
     ["stream=true"], "stream_options"),
    ("/v1/completions", {"prompt": "x", "stream": True, "stream_options": []}, 400,
     ["'stream_options'"], "stream_options"),
    ("/v1/chat/completions", {"messages": CHAT, "stream": True,
                              "stream_options": {"include_usage": "yes"}}, 400,
     ["'stream_options.include_usage' must be a boolean"], "stream_options.include_usage"),
    ("/v1/completions", {"prompt": "x", "stream": True,
                         "stream_options": {"continuous_usage_stats": "yes"}}, 400,
     ["'stream_options.continuous_usage_stats' must be a boolean"],
     "stream_options.continuous_usage_stats"),
    ("/v1/completions", {"prompt": "x", "priority": "high"}, 400, ["'priority'", "integer"],
     "priority"),
    ("/v1/completions", {"prompt": "x", "user": 7}, 400, ["'user'", "string"], "user"),
    ("/v1/completions", {"prompt": "x", "model": 3}, 400, ["'model'", "string"], "model"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, ["'n'", "in [1,"], "n"),
    ("/v1/completions", {"prompt": "x", "n": "2"}, 400, ["'n'", "integer"], "n"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400, ["'logprobs'", "at most 20"],
     "logprobs"),
    ("/v1/completions", {"prompt": "x", "echo": "yes"}, 400, ["'echo'", "boolean"], "echo"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, ["'max_tokens'", "at least 1"],
     "max_tokens"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 5}, 400,
     ["'presence_penalty'", "[-2, 2]"], "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}, 400,
     ["'repetition_penalty'"], "repetition_penalty"),
    ("/v1/completions", {"prompt": "x", "min_p": 2}, 400, ["'min_p'"], "min_p"),
    ("/v1/completions", {"prompt": "x", "logit_bias": [1]}, 400, ["'logit_bias'"], "logit_bias"),
    ("/v1/completions", {"prompt": "x", "min_tokens": -1}, 400, ["'min_tokens'"], "min_tokens"),
    ("/v1/completions", {"prompt": "x", "min_tokens": 100}, 400,
     ["'min_tokens' (100) must not exceed the 16 tokens", "no 'max_tokens' given"], "min_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "min_tokens": 1000}, 400,
     ["'min_tokens' (1000)", "room the prompt leaves"], "min_tokens"),
    ("/v1/completions", {"prompt": "x", "n": 2}, 400,
     ["n=2 choices need 2 places in the waiting queue, which holds 1", "--max-waiting"], "n"),
    ("/v1/completions", {"prompt": "x", "stream": True, "prompt_logprobs": 1}, 400,
     ["'prompt_logprobs'", "stream=true"], "prompt_logprobs"),
    ("/v1/completions", {"prompt": "x", "top_k": 2**40}, 400, ["top_k", "int32"], "top_k"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"\u00b2": 1}}, 400,
     ["logit_bias token id must be an integer"], "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": "a"}}, 400,
     ["logit_bias value"], "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"--5": 1}}, 400,
     ["logit_bias token id must be an integer, got '--5'"], "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"7" * 4400: 1}}, 400,
     ["logit_bias token ids must be in the vocabulary, got one of 4400 digits"], "logit_bias"),
    # Checked against the model's vocabulary by the engine, still named.
    ("/v1/completions", {"prompt": "x", "logit_bias": {"999999": 1}}, 400,
     ["logit_bias token ids must be in [0, "], "logit_bias"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, 400, ["'best_of'"], "best_of"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [-1]}, 400, ["'stop_token_ids'"],
     "stop_token_ids"),
    ("/v1/completions", {}, 400, ["'prompt' is required"], "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, ["'prompt' must not be empty"], "prompt"),
    ("/v1/completions", {"prompt": []}, 400, ["'prompt' must not be empty"], "prompt"),
    # A batch's choices are admitted together: more than --max-waiting never can be.
    ("/v1/completions", {"prompt": ["a", "b"]}, 400,
     ["2 prompts x n=1 choices need 2 places", "holds 1"], "prompt"),
    ("/v1/completions", {"prompt": [[1, 2], [3]]}, 400, ["2 prompts x n=1"], "prompt"),
    ("/v1/completions", {"prompt": ["a", ""]}, 400, ["'prompt' must not be empty"], "prompt"),
    ("/v1/completions", {"prompt": ["a", []]}, 400, ["'prompt' must not be empty"], "prompt"),
    ("/v1/completions", {"prompt": ["a"] * 257, "n": 4}, 400,
     ["257 prompts x n=4 are 1028 choices", "at most 1024"], "prompt"),
    ("/v1/completions", {"prompt": ["a", {"b": 1}]}, 400, ["or a list of those"], "prompt"),
    ("/v1/completions", {"prompt": {"text": "x"}}, 400, ["'prompt' must be a string"], "prompt"),
    ("/v1/completions", {"prompt": [1, "a"]}, 400, ["'prompt'"], "prompt"),
    ("/v1/completions", {"prompt": [1, 10**9]}, 400, ["token ids must be integers in [0,"],
     "prompt"),
    ("/v1/completions", {"prompt": [1000] * 300}, 400, ["300 tokens", "max_model_len is 256"],
     "prompt"),
    ("/v1/completions", {"prompt": [1000] * 100, "max_tokens": 200}, 400,
     ["maximum context length is 256", "300 tokens (100 in the prompt, 200 for the completion)"],
     "max_tokens"),
    ("/v1/chat/completions", {}, 400, ["'messages' is required"], "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, ["'messages' must not be empty"], "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, ["'messages' must be an array"],
     "messages"),
    ("/v1/chat/completions", {"messages": ["hi"]}, 400, ["'messages[0]' must be an object"],
     "messages[0]"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, ["'messages[0].role'"],
     "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400,
     ["'messages[0].content'"], "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}, 400,
     ["may be none), got null"], "messages[0].content"),  # was "got null null"
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     400, ["only text is supported"], "messages[0].content"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 21}, 400,
     ["'top_logprobs'", "at most 20"], "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, 400,
     ["'top_logprobs' needs 'logprobs'"], "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": [TOOL]}, 400,
     ["'tools' without 'tool_choice' (OpenAI's default: 'auto') needs a parser",
      "--enable-auto-tool-choice --tool-call-parser", "'none'"], "tool_choice"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function"}]}, 400,
     ["'tools[0]' must be"], "tools[0]"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function"}],
                              "tool_choice": "none"}, 400, ["'tools[0]' must be"], "tools[0]"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": {"f": 1}, "tool_choice": "none"}, 400,
     ["'tools' must be an array"], "tools"),
    ("/v1/chat/completions", {"messages": CHAT, "tool_choice": "auto", "tools": [TOOL]},
     400, ["'tool_choice' 'auto' needs a parser", "--enable-auto-tool-choice"], "tool_choice"),
    ("/v1/chat/completions", {"messages": CHAT, "tool_choice": "sometimes", "tools": [TOOL]},
     400, ["'tool_choice' must be \"none\", \"auto\"", 'string "sometimes"'], "tool_choice"),
    ("/v1/chat/completions", {"messages": CHAT, "tool_choice": {"type": "function"},
                              "tools": [TOOL]}, 400, ["'tool_choice' must be"], "tool_choice"),
    ("/v1/chat/completions", {"messages": CHAT, "tool_choice": {
        "type": "function", "function": {"name": "weather"}}}, 400,
     ["names 'weather', but 'tools' lists no function"], "tool_choice"),
    ("/v1/chat/completions", {"messages": CHAT, "tool_choice": {
        "type": "function", "function": {"name": "weather"}}, "tools": [TOOL],
        "guided_regex": "a"}, 400, ["give no other structured output"], "tool_choice"),
    # Structured output (test_structured_output.py runs it).
    ("/v1/completions", {"prompt": "x", "response_format": {"type": "xml"}}, 400,
     ["'response_format' must be"], "response_format"),
    ("/v1/completions", {"prompt": "x", "response_format": {"type": "json_schema"}}, 400,
     ["'response_format.json_schema.schema' must be a JSON schema object"], "response_format"),
    ("/v1/completions", {"prompt": "x", "guided_choice": []}, 400,
     ["'guided_choice': choice must be a non-empty list"], "guided_choice"),
    ("/v1/completions", {"prompt": "x", "guided_regex": 5}, 400,
     ["'guided_regex': regex must be a non-empty string"], "guided_regex"),
    ("/v1/completions", {"prompt": "x", "guided_regex": "a", "guided_choice": ["a"]}, 400,
     ["give one structured-output field, got guided_regex, guided_choice"], "guided_regex"),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {"regex": "a", "choice": ["a"]}},
     400, ["exactly one of"], "structured_outputs"),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {"structural_tag": "t"}}, 400,
     ["'structured_outputs': structural_tag is not JSON"], "structured_outputs"),
    ("/v1/chat/completions", {"messages": CHAT, "response_format": {
        "type": "structural_tag", "structures": [{"begin": "<a>", "schema": {}, "end": "</a>"}],
        "triggers": ["<b"]}}, 400, ["no trigger begins the structure '<a>'"], "response_format"),
    ("/v1/chat/completions", {"messages": CHAT, "chat_template_kwargs": [1]}, 400,
     ["'chat_template_kwargs' must be an object"], "chat_template_kwargs"),
    ("/v1/chat/completions", {"messages": CHAT, "chat_template_kwargs": {"messages": []}}, 400,
     ["may not set messages"], "chat_template_kwargs"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 0}, 400,
     ["'max_tokens'", "at least 1"], "max_tokens"),  # (0 is for a completion's echo only)
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": -1}, 400,
     ["'max_completion_tokens'"], "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 2, "max_tokens": "x"},
     400, ["'max_tokens'"], "max_tokens"),  # (it was not read, so not checked)
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 300}]}, 400,
     ["tokens but max_model_len is 256"], "messages"),
    ("/tokenize", {"prompt": 5}, 400, ["'prompt'"], "prompt"),
    ("/detokenize", {"tokens": [1, -1]}, 400, ["'tokens'"], "tokens"),
    ("/detokenize", {"tokens": "abc"}, 400, ["'tokens'"], "tokens"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, ["`gpt-4` does not exist",
                                                                "tiny"], "model"),
    ("/v1/chat/completions", {"messages": CHAT, "model": "nope"}, 404, ["`nope`"], "model"),
    ("/tokenize", {"prompt": "x", "model": "nope"}, 404, ["`nope`"], "model"),
    ("/v1/completions", {"prompt": "x", "allowed_token_ids": []}, 400,
     ["'allowed_token_ids' must be a non-empty array of token ids"], "allowed_token_ids"),
    ("/v1/completions", {"prompt": "x", "allowed_token_ids": [10 ** 9]}, 400,
     ["allowed_token_ids must be a non-empty list of ids in [0, "], "allowed_token_ids"),
    ("/v1/completions", {"prompt": "x", "allowed_token_ids": [7], "stop_token_ids": [7.0],
                         "min_tokens": 1}, 400, ["allows only stop tokens"], None),
    ("/v1/chat/completions", {"messages": CHAT, "bad_words": ["ok", " "]}, 400,
     ["'bad_words' must be an array of non-blank strings"], "bad_words"),
]


@pytest.mark.parametrize("path,body,status,fragments,param", BAD,
                         ids=[f"{p}:{json.dumps(b)[:40]}" for p, b, *_ in BAD])
def test_bad_request(server, path, body, status, fragments, param):
    assert_error(call(server, path, body=body), status, *fragments, param=param)


# vLLM's fields that change what is generated, which this server does not implement: refused,
# never ignored. (path, field, a value it would honour, its default, which is accepted)
UNSUPPORTED = [
    ("/v1/completions", "logits_processors", ["mod.Class"], []),
]


@pytest.mark.parametrize("path,name,value,default", UNSUPPORTED,
                         ids=[f"{p}:{n}" for p, n, *_ in UNSUPPORTED])
def test_vllm_fields_this_server_does_not_honour_are_refused(server, path, name, value,
                                                             default):
    base = {"prompt": "x"} if path == "/v1/completions" else {"messages": CHAT}
    assert_error(call(server, path, body={**base, name: value, "max_tokens": 1}), 400,
                 f"'{name}' is not supported", param=name)
    status, _, body = call(server, path, body={**base, name: default, "max_tokens": 1})
    assert status == 200, body


IGNORED_LOG = "fairswitch.server.protocol"


def test_unknown_fields_are_ignored_and_named_in_a_warning(server, caplog):
    caplog.set_level(logging.WARNING, logger=IGNORED_LOG)
    for path, base in (("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions",
                                                             {"messages": CHAT})):
        caplog.clear()
        status, _, body = call(server, path, body={**base, "max_tokens": 1, "max_token": 9,
                                                   "store": False})
        assert status == 200, body
        (record,) = [r for r in caplog.records if r.name == IGNORED_LOG]
        assert record.levelno == logging.WARNING
        assert record.getMessage().endswith("ignored: 'max_token', 'store'")
    caplog.clear()
    call(server, "/v1/completions", body={"prompt": "x", "max_tokens": 1,
                                          **{f"f{i:02}": 1 for i in range(25)}})
    (record,) = [r for r in caplog.records if r.name == IGNORED_LOG]
    assert record.getMessage().endswith("'f09' and 15 more")


def test_fields_the_server_reads_or_refuses_are_not_reported_ignored(caplog):
    common = {"model": "m", "stream": True, "stream_options": {"include_usage": True}, "n": 1,
              "temperature": 0, "top_p": 1, "top_k": 0, "max_tokens": 2,
              "max_completion_tokens": 2, "min_tokens": 0, "min_p": 0, "presence_penalty": 0,
              "frequency_penalty": 0, "repetition_penalty": 1, "logit_bias": {},
              "prompt_logprobs": None, "seed": 1, "stop": [], "stop_token_ids": [],
              "ignore_eos": False, "include_stop_str_in_output": False,
              "skip_special_tokens": True, "priority": 0, "user": "u", "best_of": 1,
              "use_beam_search": False, "response_format": {"type": "text"},
              "guided_json": None, "bad_words": [], "structured_outputs": None}
    caplog.set_level(logging.WARNING, logger=IGNORED_LOG)
    protocol.parse_completion({**common, "prompt": "x", "echo": False, "logprobs": 1,
                               "suffix": "", "add_special_tokens": True})
    protocol.parse_chat({**common, "messages": CHAT, "add_generation_prompt": True,
                         "logprobs": True, "top_logprobs": 1, "tools": [], "echo": False,
                         "tool_choice": "none", "chat_template_kwargs": {}})
    assert not [r for r in caplog.records if r.name == IGNORED_LOG]


def test_bad_json_and_body_shapes(server):
    for data in (b"{not json", b"", b"\xff\xfe\x00", b"[1, 2", b'{"prompt": NaN}',
                 b'{"prompt": "x", "temperature": Infinity}', b"[" * 60_000):
        assert_error(call(server, "/v1/completions", data=data), 400, "not valid JSON")
    # Numbers past float's range parse to inf: refused as not finite, not sampled with.
    for name in ("temperature", "top_p", "presence_penalty"):
        assert_error(call(server, "/v1/completions",
                          data=b'{"prompt": "x", "%s": 1e999}' % name.encode()), 400,
                     f"'{name}' must be a finite number", param=name)
    for body in ([], "text", 3, None):
        assert_error(call(server, "/v1/completions", data=json.dumps(body).encode()), 400,
                     "must be a JSON object")
    # Deep enough for json.loads, too deep for what checks it: RecursionError, a 500.
    for path, body in (("/v1/completions", '{"prompt": %s}'),
                       ("/v1/chat/completions", '{"messages": [{"role": "user", "content": %s}]}'),
                       ("/tokenize", '{"messages": [{"role": %s, "content": "x"}]}')):
        for depth in (129, 984):
            data = (body % ("[" * depth + "]" * depth)).encode()
            assert_error(call(server, path, data=data), 400, "nests arrays and objects more")


def test_lone_surrogates_are_refused(server):
    """JSON's \\ud800 escapes and the UTF-8 bytes of a surrogate parse to strings that no
    tokenizer takes: a 400 naming them, not a 500."""
    cases = [("/v1/completions", b'{"prompt": "\\ud800", "max_tokens": 2}'),
             ("/v1/completions", b'{"prompt": "a\xed\xa0\x80b", "max_tokens": 2}'),
             ("/v1/chat/completions", b'{"messages": [{"role": "\\udc80", "content": "x"}]}'),
             ("/v1/chat/completions",
              b'{"messages": [{"role": "user", "content": [{"type": "text", '
              b'"text": "\\ud83d"}]}]}'),
             ("/tokenize", b'{"prompt": "\\ud800"}')]
    for path, data in cases:
        assert_error(call(server, path, data=data), 400, "lone UTF-16 surrogate")
    status, _, body = call(server, "/v1/completions",  # a pair is one character: fine
                           data=b'{"prompt": "\\ud83d\\ude00", "max_tokens": 1}')
    assert status == 200, body


def test_model_names_and_default(server):
    for model in ("tiny", "tiny-alias", None):
        status, _, body = call(server, "/v1/completions", body={"prompt": "x", "max_tokens": 1,
                                                                "model": model})
        assert status == 200 and body["model"] == "tiny"  # the first name is reported


def test_api_key(server):
    assert_error(call(server, "/v1/completions", body={"prompt": "x"}, auth=False), 401,
                 "missing API key")
    result = call(server, "/v1/completions", body={"prompt": "x"}, auth=False,
                  headers={"Authorization": "Bearer wrong"})
    assert_error(result, 401, "incorrect API key")
    assert result[1]["WWW-Authenticate"] == "Bearer"
    assert_error(call(server, "/v1/models", method="GET", auth=False,
                      headers={"Authorization": f"Basic {KEY}"}), 401)
    assert_error(call(server, "/tokenize", body={"prompt": "x"}, auth=False), 401)
    for path in ("/health", "/version", "/metrics"):  # public
        assert call(server, path, method="GET", auth=False)[0] == 200
    # A key that is not UTF-8 is just a wrong key (aiohttp's client sends only text headers).
    head = asyncio.run(raw_request(server, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"
                                   b"Authorization: Bearer sk-\xff\xfe\r\n"
                                   b"Connection: close\r\n\r\n")).split(b"\r\n", 1)[0]
    assert head == b"HTTP/1.1 401 Unauthorized", head


async def raw_request(server, data: bytes) -> bytes:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    return answer


def test_malformed_http_is_a_400_and_one_info_line(server, caplog):
    """aiohttp's own 400s (before any handler): no ERROR with a traceback in the log."""
    caplog.set_level(logging.DEBUG, logger="aiohttp.server")
    for data in (b"GARBAGE\r\n\r\n",
                 b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
                 b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"):
        answer = asyncio.run(raw_request(server, data))
        assert re.match(rb"HTTP/1\.[01] 4\d\d ", answer), answer[:80]
    records = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert records and all(r.levelno <= logging.INFO and r.exc_info is None for r in records), \
        [(r.levelname, r.getMessage()) for r in records]
    assert any("malformed HTTP (400)" in r.getMessage() for r in records)
    assert all("\n" not in r.getMessage() for r in records)
    assert call(server, "/health", method="GET")[0] == 200


def test_oversized_body(server):
    big = {"prompt": "x" * MAX_BODY}
    assert_error(call(server, "/v1/completions", body=big), 413, "too large")

    async def chunked() -> tuple[int, dict, object]:  # no Content-Length: aiohttp counts
        async def gen():
            for _ in range(MAX_BODY // 1024 + 2):
                yield b" " * 1024
        async with aiohttp.ClientSession(headers=AUTH) as s:
            async with s.post(server.url + "/v1/completions", data=gen()) as r:
                return r.status, dict(r.headers), await r.json()
    assert_error(asyncio.run(chunked()), 413, "too large")


def test_a_body_its_content_encoding_does_not_decode_is_a_400(server):
    """A plain body sent as gzip (or deflate) was a 500; a real gzip body is read."""
    body = json.dumps({"prompt": "x", "max_tokens": 1}).encode()
    for encoding in ("gzip", "deflate"):
        assert_error(call(server, "/v1/completions", data=body, headers={
            "Content-Type": "application/json", "Content-Encoding": encoding}), 400,
            "the request body cannot be read", f"content-encoding: {encoding}")
    status, _, reply = call(server, "/v1/completions", data=gzip.compress(body), headers={
        "Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert status == 200 and reply["usage"]["completion_tokens"] == 1, reply


def test_unknown_route_and_method(server):
    assert_error(call(server, "/v1/nothing", body={}), 404, "no route POST /v1/nothing")
    assert_error(call(server, "/", method="GET"), 404)
    result = call(server, "/v1/completions", method="GET")
    assert_error(result, 405, "GET is not allowed")
    assert "POST" in result[1]["Allow"]
    assert_error(call(server, "/health", method="DELETE"), 405)


def test_queue_full_is_503_with_retry_after(server, engine):
    long = {"prompt": "busy", "max_tokens": 200, "ignore_eos": True}

    async def main():
        async with aiohttp.ClientSession(headers=AUTH) as s:
            running = await s.post(server.url + "/v1/completions", json={**long, "stream": True})
            await running.content.readline()  # it runs: the one seat is taken
            waiting = asyncio.create_task(s.post(server.url + "/v1/completions", json=long))
            for _ in range(500):
                await asyncio.sleep(0.01)
                if await engine.run_in_engine(lambda e: len(e.scheduler.waiting)) == 1:
                    break
            refused = await request(server.url + "/v1/completions", body=long)
            running.close()
            waiting.cancel()
            return refused
    aborted = num_aborted(server)
    err = assert_error(asyncio.run(main()), 503, "retry later")
    assert err["code"] == "queue_full"
    assert call(server, "/health", method="GET")[0] == 200

    async def idle() -> int:  # both clients left: both requests are aborted, promptly
        for _ in range(100):
            await engine.sync()
            if not await engine.run_in_engine(lambda e: len(e.requests)):
                return 0
            await asyncio.sleep(0.05)
        return await engine.run_in_engine(lambda e: len(e.requests))
    assert asyncio.run(idle()) == 0
    # The two that left count as aborted, the one refused does not; a 400 does not either.
    assert_error(call(server, "/v1/completions", body={"prompt": "x", "logit_bias": {"99999": 1}}),
                 400)
    assert num_aborted(server) == aborted + 2


def num_aborted(server) -> int:
    text = call(server, "/metrics", method="GET")[2]
    return int(float(re.search(r"^fairswitch:request_aborted_total\{.*\} (\S+)$", text,
                               re.MULTILINE)[1]))


def test_unexpected_exception_is_500_and_logged(server, caplog):
    chat = server.app[SERVER_KEY].chat_template

    def broken(*args, **kwargs):
        raise RuntimeError("template exploded")
    original, chat.render = chat.render, broken
    try:
        with caplog.at_level(logging.ERROR, logger="fairswitch.server.errors"):
            err = assert_error(call(server, "/v1/chat/completions", body={"messages": CHAT}), 500)
    finally:
        chat.render = original
    assert "template exploded" not in err["message"]  # details stay in the log
    assert any(r.exc_info and "template exploded" in str(r.exc_info[1]) for r in caplog.records)
    assert call(server, "/v1/chat/completions",
                body={"messages": CHAT, "max_tokens": 1})[0] == 200


def test_a_prompt_the_engine_finds_of_the_wrong_type_is_a_400(server, monkeypatch):
    """The engine raises TypeError for a prompt of the wrong type (as LLM.generate does): where
    the server meets it, checking the prompt or adding the request, it is a 400, not a 500.
    (The protocol lets no such prompt through: one is forced past it here.)"""
    body = {"prompt": "x", "max_tokens": 1}
    monkeypatch.setattr(protocol, "parse_prompts", lambda value, n, name="prompt": [[1, "x"]])
    assert_error(call(server, "/v1/completions", body=body), 400,
                 "prompt token ids must be ints, got 'x' at index 1", param="prompt")
    monkeypatch.setattr(server.app[SERVER_KEY].core, "validate_prompt", lambda text, ids:
                        (text, ids))  # unchecked: the engine's add_request finds it
    assert_error(call(server, "/v1/completions", body=body), 400,
                 "prompt token ids must be ints, got 'x' at index 1")
    monkeypatch.undo()
    assert call(server, "/v1/completions", body=body)[0] == 200


# ---- fuzz ----------------------------------------------------------------------------------------

_VALUES = [None, True, False, 0, 1, -1, 2, 7, 2**63, -(2**63) - 1, 0.5, -0.5, 1e308, "", "x",
           "stop", [], [1], [1, 2, 3], ["a"], ["a", "b"], [[1]], [None], {}, {"a": 1},
           {"include_usage": True}, {"include_usage": "yes"}, [{"role": "user"}],
           [{"role": "user", "content": "hi"}], [{"role": 1, "content": []}], "\u0000\ud7ff",
           [{"type": "function_call"}], [{"role": [], "content": [{"type": {}}]}],
           [{"type": "function_call_output", "call_id": "c", "output": [{"type": []}]}]]
_FIELDS = ["prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
           "top_k", "seed", "stop", "n", "stream", "stream_options", "logprobs", "user",
           "priority", "model", "ignore_eos", "echo", "tokens", "add_generation_prompt",
           "stop_token_ids", "response_format", "input", "instructions", "max_output_tokens",
           "tools", "tool_choice", "text", "include", "metadata"]
_PATHS = ["/v1/completions", "/v1/chat/completions", "/v1/responses", "/tokenize",
          "/detokenize"]


def _random_body(rng: random.Random) -> object:
    base: dict = rng.choice([{"prompt": "fuzz", "max_tokens": 2},
                             {"messages": [{"role": "user", "content": "f"}], "max_tokens": 2},
                             {"input": "f", "max_output_tokens": 2}, {"tokens": [1, 2]}, {}])
    for _ in range(rng.randint(0, 4)):
        base[rng.choice(_FIELDS)] = rng.choice(_VALUES)
    return rng.choice([base] * 8 + [rng.choice(_VALUES)])


def test_fuzz_random_shapes_and_garbage_keep_the_server_up(server, engine):
    rng = random.Random(1234)
    statuses: dict[int, int] = {}

    async def main():
        async with aiohttp.ClientSession(headers=AUTH) as s:
            for i in range(300):
                path = rng.choice(_PATHS)
                if i % 3 == 0:  # garbage bytes, sometimes with a misleading Content-Type
                    data = rng.randbytes(rng.randint(0, 300))
                    headers = {"Content-Type": rng.choice(["application/json", "text/plain",
                                                           "application/x-www-form-urlencoded"])}
                else:
                    data = json.dumps(_random_body(rng)).encode()
                    headers = {"Content-Type": "application/json"}
                async with s.post(server.url + path, data=data, headers=headers) as r:
                    body = await r.read()
                    statuses[r.status] = statuses.get(r.status, 0) + 1
                    assert r.status in (200, 400, 404), (path, data[:200], body[:300])
                    if r.status != 200:
                        assert set(json.loads(body)["error"]) == {"message", "type", "param",
                                                                   "code"}
    asyncio.run(main())
    assert statuses.get(400, 0) > 100 and statuses.get(200, 0) > 10, statuses
    status, _, body = call(server, "/v1/completions", body={"prompt": "still here",
                                                            "max_tokens": 3, "ignore_eos": True})
    assert status == 200 and body["usage"]["completion_tokens"] == 3
    assert call(server, "/health", method="GET")[0] == 200
    assert asyncio.run(engine.run_in_engine(lambda e: len(e.requests))) == 0


@pytest.mark.parametrize("parse, body", [
    (protocol.parse_completion, {"prompt": "x"}), (protocol.parse_chat, {"messages": CHAT})])
def test_an_integral_float_is_an_integer_as_in_vllm(parse, body):
    """pydantic (so vLLM) takes 5.0 where an integer is asked; 5.5 stays a 400."""
    assert parse({**body, "max_tokens": 5.0, "n": 2.0}).max_tokens == 5
    if parse is protocol.parse_completion:
        assert parse({**body, "prompt": [1.0, 2]}).prompts == [[1, 2]]
    got = parse({**body, "stop_token_ids": [5.0], "allowed_token_ids": [3.0, 4]})
    assert (got.stop_token_ids, got.allowed_token_ids) == ([5], [3, 4])
    assert all(type(t) is int for t in got.stop_token_ids + got.allowed_token_ids)
    with pytest.raises(APIError, match="'max_tokens' must be an integer, got number 5.5"):
        parse({**body, "max_tokens": 5.5})


@pytest.mark.parametrize("parse, body", [
    (protocol.parse_completion, {"prompt": "x"}), (protocol.parse_chat, {"messages": CHAT})])
def test_empty_stream_options_without_stream_are_no_options(parse, body):
    """vLLM refuses stream options without stream=true only where some are set: clients that
    always send {} (or null) are served."""
    for options in ({}, None):
        assert parse({**body, "stream_options": options}).include_usage is False


@pytest.mark.parametrize("path, body, want", [
    ("/v1/completions", {"prompt": "x"}, True),
    ("/v1/completions", {"prompt": "x", "add_special_tokens": False}, False),
    ("/v1/chat/completions", {"messages": CHAT}, False),
    ("/v1/chat/completions", {"messages": CHAT, "add_special_tokens": True}, True)])
def test_add_special_tokens_reaches_the_tokenizer(server, monkeypatch, path, body, want):
    """vLLM's add_special_tokens (completions: default true; chat: false, the template writes
    them) was refused when not the default."""
    prompts = server.app[SERVER_KEY].prompts
    seen = []
    encode = prompts.encode
    monkeypatch.setattr(prompts, "encode", lambda text, add_special_tokens: (
        seen.append(add_special_tokens), encode(text, add_special_tokens=add_special_tokens))[1])
    status, _, reply = call(server, path, body={**body, "max_tokens": 1})
    assert status == 200, reply
    assert seen == [want]


def test_top_logprobs_0_without_logprobs_is_taken(server):
    status, _, reply = call(server, "/v1/chat/completions",
                            body={"messages": CHAT, "top_logprobs": 0, "max_tokens": 1})
    assert status == 200 and reply["choices"][0]["logprobs"] is None, reply


def test_an_abort_outside_a_shutdown_is_not_called_one(server, monkeypatch):
    """A request the engine itself aborted (a structured reply no token could continue) was
    answered 503 'the server is shutting down'."""
    app_server = server.app[SERVER_KEY]
    assert app_server._aborted().status == 500
    monkeypatch.setattr(app_server.in_flight, "aborting", True)
    error = app_server._aborted()
    assert error.status == 503 and "shutting down" in error.message


def test_an_unexpected_error_mid_stream_ends_the_stream_in_band(server, monkeypatch, caplog):
    """A bug met after the stream's status line (here: the shaper raising on a chunk) is logged
    and sent as an error event then [DONE]; a 500 response written into the open body broke it
    (the client read half an HTTP response)."""
    from fairswitch.server.choices import ChoiceShaper

    real = ChoiceShaper.delta
    calls = []

    def failing(self, index, out):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("a bug")
        return real(self, index, out)

    monkeypatch.setattr(ChoiceShaper, "delta", failing)
    status, headers, text = asyncio.run(asyncio.wait_for(request(
        server.url + "/v1/completions", body={"prompt": "Hi", "max_tokens": 8,
                                              "ignore_eos": True, "stream": True}), 60))
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "logged on the server" in error["message"]
    assert any("unhandled error in the stream" in r.getMessage() for r in caplog.records)
