"""Cross-origin requests, as vLLM's server allows them: a browser's preflight is answered
without the API key, and every response to an allowed origin (errors and streams too) carries
Access-Control-Allow-Origin. A preflight was a 405 (or a 401 with --api-key) before."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from fairswitch.server import BackgroundServer, ServerSettings, build_app
from fairswitch.server.cors import CorsPolicy

PAGE = "https://app.example"
PREFLIGHT = {"Origin": PAGE, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type"}


def serve(engine, **settings):
    return BackgroundServer(build_app(engine, ServerSettings(api_key="k", **settings),
                                      shutdown_engine=False))


def ask(url: str, method: str, path: str, headers: dict, body: dict | None = None):
    async def go():
        async with aiohttp.ClientSession() as s:
            async with s.request(method, url + path, headers=headers, json=body) as r:
                return r.status, dict(r.headers), await r.text()
    return asyncio.run(go())


def test_a_preflight_is_answered_without_the_key_and_responses_name_the_origin(engine):
    with serve(engine) as srv:
        status, headers, _ = ask(srv.url, "OPTIONS", "/v1/chat/completions", PREFLIGHT)
        assert status == 200
        assert headers["Access-Control-Allow-Origin"] == "*"
        assert "POST" in headers["Access-Control-Allow-Methods"]
        assert headers["Access-Control-Allow-Headers"] == "authorization, content-type"
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        auth = {"Origin": PAGE, "Authorization": "Bearer k"}
        for body in (chat, {**chat, "stream": True}):
            status, headers, _ = ask(srv.url, "POST", "/v1/chat/completions", auth, body)
            assert status == 200 and headers["Access-Control-Allow-Origin"] == "*"
        # The page must see an error too (a wrong key, a bad request), or it sees nothing.
        status, headers, _ = ask(srv.url, "POST", "/v1/chat/completions", {"Origin": PAGE}, chat)
        assert status == 401 and headers["Access-Control-Allow-Origin"] == "*"
        # Without an Origin (not a browser): no CORS headers.
        status, headers, _ = ask(srv.url, "GET", "/health", {})
        assert status == 200 and "Access-Control-Allow-Origin" not in headers


def test_a_policy_limits_origins_methods_and_headers(engine):
    policy = CorsPolicy(origins=(PAGE,), methods=("POST",), headers=("authorization",),
                        credentials=True)
    with serve(engine, cors=policy) as srv:
        status, headers, _ = ask(srv.url, "OPTIONS", "/v1/completions", PREFLIGHT)
        assert status == 200
        assert (headers["Access-Control-Allow-Origin"], headers["Vary"],
                headers["Access-Control-Allow-Credentials"]) == (PAGE, "Origin", "true")
        status, _, text = ask(srv.url, "OPTIONS", "/v1/completions",
                              {**PREFLIGHT, "Access-Control-Request-Method": "DELETE"})
        assert status == 400 and "DELETE" in text
        status, _, text = ask(srv.url, "OPTIONS", "/v1/completions",
                              {**PREFLIGHT, "Access-Control-Request-Headers": "x-secret"})
        assert status == 400 and "x-secret" in text
        # Another origin: no preflight answer (the route's own: 405 or 401), no headers.
        status, headers, _ = ask(srv.url, "OPTIONS", "/v1/completions",
                                 {**PREFLIGHT, "Origin": "https://evil.example"})
        assert status in (401, 405) and "Access-Control-Allow-Origin" not in headers
    with serve(engine, cors=None) as srv:  # off
        status, headers, _ = ask(srv.url, "OPTIONS", "/v1/completions", PREFLIGHT)
        assert status in (401, 405) and "Access-Control-Allow-Origin" not in headers


def test_serve_reads_vllms_cors_flags(capsys):
    from fairswitch.cli.main import build_parser

    args = build_parser().parse_args(["serve", "--allowed-origins", '["https://a.example"]',
                                      "--allow-credentials"])
    assert args.allowed_origins == ["https://a.example"] and args.allow_credentials
    assert build_parser().parse_args(["serve"]).allowed_origins == ["*"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--allowed-origins", "*"])
    assert "expected a JSON list of strings" in capsys.readouterr().err
