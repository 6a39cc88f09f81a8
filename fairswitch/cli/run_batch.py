"""``fairswitch run-batch``: a file of OpenAI batch requests run offline (vLLM's
``vllm run-batch``, OpenAI's Batch API file format).

Each input line is one request::

    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

(``url``: /v1/chat/completions, /v1/completions or /v1/responses). Each is answered by the code
that answers it in ``serve``, in this process, over a loopback port that nothing else is told
of, as many at a time as ``--max-concurrency`` lets the engine batch. The output has one line
per input line, in the input's order::

    {"id": "batch_req_...", "custom_id": "q1",
     "response": {"status_code": 200, "request_id": "...", "body": {...}}, "error": null}

A request the server refuses keeps its status and error body in ``response``; a line that is not
a request (not JSON, another method or URL, ``stream: true``) gets ``response: null`` and an
``error``. The command fails (status 1) only when the engine does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import uuid
from dataclasses import dataclass
from typing import Any

from fairswitch.cli import serve
from fairswitch.config import EngineConfig, add_engine_args

URLS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
MAX_LINE_BYTES = 1 << 30  # (the file is the caller's own: no body limit worth a refusal)


def add_parser(subs: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subs.add_parser("run-batch", help="run a file of OpenAI batch requests offline",
                        description="Answer each line of an OpenAI batch file (JSONL) as the "
                                    "server would, and write one result line per request.")
    p.add_argument("-i", "--input-file", required=True,
                   help="the batch: one JSON request a line ('-': standard input)")
    p.add_argument("-o", "--output-file", required=True,
                   help="the results, one JSON line per request ('-': standard output)")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="requests in flight at once (default: twice --max-num-seqs, within "
                        "what --max-waiting lets wait)")
    # SUPPRESS: `fairswitch --log-level X run-batch` (main.py) is not overwritten here.
    p.add_argument("--log-level", type=str.lower, choices=serve.LOG_LEVELS,
                   default=argparse.SUPPRESS, help="verbosity of fairswitch's loggers")
    serve.add_reply_options(p.add_argument_group("replies"))
    add_engine_args(p)
    p.set_defaults(run=run)
    return p


@dataclass
class _Line:
    custom_id: Any
    url: str | None = None
    body: Any = None
    error: str | None = None  # not a request: why


def parse_line(text: str, number: int) -> _Line:
    """One input line as a request, or why it is not one."""
    try:
        item = json.loads(text)
    except ValueError as e:
        return _Line(None, error=f"line {number} is not JSON: {e}")
    if not isinstance(item, dict):
        return _Line(None, error=f"line {number} must be a JSON object")
    line = _Line(item.get("custom_id"), item.get("url"), item.get("body"))
    method = item.get("method", "POST")
    if method != "POST":
        line.error = f"'method' must be \"POST\", got {method!r:.40}"
    elif line.url not in URLS:
        line.error = f"'url' must be one of {', '.join(URLS)}, got {line.url!r:.60}"
    elif not isinstance(line.body, dict):
        line.error = "'body' must be a JSON object (the request)"
    elif line.body.get("stream"):
        line.error = "'stream' is not available in a batch: each result is written whole"
    return line


def result_line(line: _Line, status: int | None = None, body: Any = None) -> dict[str, Any]:
    """The output line of a request: the server's answer, or why it was not asked."""
    out: dict[str, Any] = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": line.custom_id,
                           "response": None, "error": None}
    if line.error is not None:
        out["error"] = {"code": "invalid_request", "message": line.error}
    else:
        request_id = body.get("id") if isinstance(body, dict) else None  # (the reply's own)
        out["response"] = {"status_code": status,
                           "request_id": request_id or f"req_{uuid.uuid4().hex}", "body": body}
    return out


async def _answer_all(base_url: str, lines: list[_Line], concurrency: int,
                      engine_alive: Any) -> list[dict[str, Any]]:
    import aiohttp

    gate = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)

    async def answer(session: aiohttp.ClientSession, line: _Line) -> dict[str, Any]:
        if line.error is not None:
            return result_line(line)
        async with gate:
            wait = 0.05
            while True:  # a full waiting queue (503) is asked again while the engine runs
                async with session.post(base_url + line.url, json=line.body) as r:
                    status, raw = r.status, await r.read()
                if status != 503 or not _queue_full(raw) or not engine_alive():
                    break
                await asyncio.sleep(wait)
                wait = min(2 * wait, 1.0)
        try:
            body = json.loads(raw)
        except ValueError:
            body = {"error": {"message": raw.decode(errors="replace"), "type": "server_error",
                              "param": None, "code": None}}
        return result_line(line, status, body)

    async def answered(session: aiohttp.ClientSession, line: _Line) -> dict[str, Any]:
        try:
            return await answer(session, line)
        except aiohttp.ClientError as e:  # (the request's line says so; the others stand)
            line.error = f"the request failed: {e}"
            return result_line(line)

    # (no connector limit: the gate is the limit; aiohttp's default would cap it at 100)
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        return await asyncio.gather(*(answered(session, line) for line in lines))


def _queue_full(raw: bytes) -> bool:
    """Is this 503's body the full waiting queue's (which frees as requests finish)?"""
    try:
        return json.loads(raw)["error"]["code"] == "queue_full"
    except (ValueError, KeyError, TypeError):
        return False


def _read_lines(path: str) -> list[str]:
    """The file's lines, split at newlines only: a JSON string may hold U+2028 and the other
    characters ``str.splitlines`` also splits at."""
    if path == "-":
        text = sys.stdin.read()
    else:
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
    return text.split("\n")


def _dumps(result: dict[str, Any]) -> str:
    """One output line: UTF-8 JSON, or escaped where a value is not Unicode text (a lone
    surrogate in a custom_id, which no UTF-8 file can hold)."""
    text = json.dumps(result, ensure_ascii=False)
    try:
        text.encode()
    except UnicodeEncodeError:
        text = json.dumps(result)
    return text + "\n"


def run(args: argparse.Namespace) -> int:
    from fairswitch.engine.async_engine import AsyncEngine
    from fairswitch.server import BackgroundServer, ServerSettings, build_app

    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    if getattr(args, "log_level", None):
        logging.getLogger("fairswitch").setLevel(args.log_level.upper())
    lines = [parse_line(text, i + 1) for i, text in enumerate(_read_lines(args.input_file))
             if text.strip()]
    settings = ServerSettings(log_requests=False, max_body_bytes=MAX_LINE_BYTES,
                              **serve.reply_settings(args))
    config = EngineConfig.from_cli_args(args)
    concurrency = args.max_concurrency or 2 * config.scheduler.max_num_seqs
    if config.scheduler.max_waiting is not None:  # (more would wait for a place in the queue)
        concurrency = min(concurrency,
                          config.scheduler.max_num_seqs + config.scheduler.max_waiting)
    engine = AsyncEngine.from_config(config)
    try:
        with BackgroundServer(build_app(engine, settings, shutdown_engine=False)) as server:
            results = asyncio.run(_answer_all(server.url, lines, concurrency,
                                              lambda: engine.is_running))
    finally:
        engine.shutdown()
    text = "".join(_dumps(r) for r in results)
    if args.output_file == "-":
        sys.stdout.write(text)
    else:
        with open(args.output_file, "w", encoding="utf-8") as f:
            f.write(text)
    ok = sum(1 for r in results if r["response"] and r["response"]["status_code"] == 200)
    print(f"fairswitch run-batch: {len(results)} requests, {ok} answered, "
          f"{len(results) - ok} refused", file=sys.stderr)
    return 1 if engine.failed else 0
