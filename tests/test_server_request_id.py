"""X-Request-Id, as vLLM's server takes it: a request's header names its reply (the id's
prefix and it), two requests may send the same one at once, and --enable-request-id-headers
puts the header on every response (streams and errors too); and vLLM's dev-mode route
POST /reset_prefix_cache."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from fairswitch.server import BackgroundServer, ServerSettings, build_app


def serve(engine, **settings):
    return BackgroundServer(build_app(engine, ServerSettings(**settings), shutdown_engine=False))


async def _post(session, url, path, headers, body):
    async with session.post(url + path, headers=headers, json=body) as r:
        return r.status, r.headers.copy(), await r.text()  # (case-insensitive)


def ask(url: str, calls: list[tuple[str, dict, dict]]):
    """The calls (path, headers, body) at once: [(status, headers, text)]."""
    async def go():
        async with aiohttp.ClientSession() as s:
            return await asyncio.gather(*(_post(s, url, *call) for call in calls))
    return asyncio.run(go())


CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def test_a_requests_id_names_its_reply_and_comes_back_with_the_flag(engine):
    with serve(engine, request_id_headers=True) as srv:
        mine = {"X-Request-Id": "trace-42"}
        (status, headers, text), (status2, headers2, text2) = ask(srv.url, [
            ("/v1/chat/completions", mine, {**CHAT, "n": 2}),
            ("/v1/chat/completions", mine, CHAT)])  # the same id, at once: both answered
        assert (status, status2) == (200, 200)
        assert json.loads(text)["id"] == json.loads(text2)["id"] == "chatcmpl-trace-42"
        assert len(json.loads(text)["choices"]) == 2
        assert headers["X-Request-Id"] == headers2["X-Request-Id"] == "trace-42"
        [(status, headers, text)] = ask(srv.url, [("/v1/completions", mine, {
            "prompt": "Hello", "max_tokens": 3, "stream": True})])
        assert status == 200 and headers["X-Request-Id"] == "trace-42"
        assert '"id": "cmpl-trace-42"' in text or '"id":"cmpl-trace-42"' in text
        [(status, headers, text)] = ask(srv.url, [("/v1/embeddings", mine, {"input": "hi"})])
        assert status == 200 and json.loads(text)["id"] == "embd-trace-42"
        # Without one: a new id each time, and on errors too.
        [(status, headers, text)] = ask(srv.url, [("/v1/chat/completions", {}, {"x": 1})])
        assert status == 400 and len(headers["X-Request-Id"]) == 32
        [(status, headers, text)] = ask(srv.url, [("/v1/chat/completions",
                                                   {"X-Request-Id": "x" * 257}, CHAT)])
        assert status == 400 and "at most 256" in text


def test_a_bodys_request_id_names_the_reply_where_no_header_does(engine):
    """vLLM's request_id field (completions, chat): the header wins over it."""
    with serve(engine) as srv:
        replies = ask(srv.url, [
            ("/v1/chat/completions", {}, {**CHAT, "request_id": "body-1"}),
            ("/v1/completions", {"X-Request-Id": "head"}, {"prompt": "Hi", "max_tokens": 2,
                                                          "request_id": "body-2"}),
            ("/v1/chat/completions", {}, {**CHAT, "request_id": ""})])
        assert json.loads(replies[0][2])["id"] == "chatcmpl-body-1"
        assert json.loads(replies[1][2])["id"] == "cmpl-head"
        assert replies[2][0] == 400 and "request_id" in replies[2][2]


def test_without_the_flag_no_header_but_the_id_still_names_the_reply(engine):
    with serve(engine) as srv:
        [(status, headers, text)] = ask(srv.url, [("/v1/chat/completions",
                                                   {"X-Request-Id": "abc"}, CHAT)])
        assert status == 200 and "X-Request-Id" not in headers
        assert json.loads(text)["id"] == "chatcmpl-abc"
        [(status, headers, text)] = ask(srv.url, [("/v1/chat/completions", {}, CHAT)])
        assert json.loads(text)["id"].startswith("chatcmpl-")


def test_reset_prefix_cache_route_in_dev_mode_only(engine):
    """vLLM's POST /reset_prefix_cache, served with VLLM_SERVER_DEV_MODE=1 (dev_mode)."""
    kv = engine.engine.kv
    with serve(engine) as srv:
        [(status, _, _)] = ask(srv.url, [("/reset_prefix_cache", {}, {})])
        assert status == 404
    with serve(engine, dev_mode=True) as srv:
        ask(srv.url, [("/v1/completions", {}, {"prompt": "a cached prompt " * 8,
                                              "max_tokens": 2})])
        assert kv.blocks.prefix_cache.num_blocks > 0
        [(status, _, text)] = ask(srv.url, [("/reset_prefix_cache", {}, {})])
        assert status == 200 and text == ""
        assert kv.blocks.prefix_cache.num_blocks == 0
