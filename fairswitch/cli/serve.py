"""``fairswitch serve``: the OpenAI-compatible HTTP server (see README, "HTTP API")."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os

from fairswitch.cli.files import read_chat_template
from fairswitch.config import EngineConfig, ModelConfig, add_engine_args
from fairswitch.server.cors import CorsPolicy
from fairswitch.server.reasoning import PARSERS as REASONING_PARSERS
from fairswitch.server.tool_parsers import PARSERS as TOOL_PARSERS

LOG_LEVELS = ("debug", "info", "warning", "error")


def add_parser(subs: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from fairswitch.server.settings import (DEFAULT_LOG_STATS_S, DEFAULT_MAX_BODY_BYTES,
                                            DEFAULT_METRICS_PREFIX)

    p = subs.add_parser("serve", help="serve the OpenAI-compatible HTTP API",
                        description="Serve /v1/completions, /v1/chat/completions and friends "
                                    "over HTTP (Server-Sent Events for streams).")
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 for every interface (default: 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port; 0 picks a free one "
                   "(default: 8000)")
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health, "
                        "/version and /metrics (default: no key)")
    s.add_argument("--ssl-certfile", default=None,
                   help="serve HTTPS with this certificate (PEM; it may hold the key too)")
    s.add_argument("--ssl-keyfile", default=None,
                   help="the certificate's private key (PEM), if not in --ssl-certfile")
    s.add_argument("--ssl-ca-certs", default=None,
                   help="CA certificates (PEM) that sign clients' certificates")
    s.add_argument("--ssl-cert-reqs", type=int, default=0,
                   help="client certificates, as vLLM: 0 not asked for, 1 checked if shown, "
                        "2 required (both need --ssl-ca-certs) (default: 0)")
    s.add_argument("--uds", default=None, metavar="PATH",
                   help="listen on this Unix domain socket instead of --host/--port")
    s.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help=f"largest request body accepted; larger ones get 413 "
                        f"(default: {DEFAULT_MAX_BODY_BYTES})")
    s.add_argument("--metrics-prefix", default=DEFAULT_METRICS_PREFIX,
                   help="prefix of the /metrics names, which are vLLM's: 'vllm:' serves "
                        f"dashboards and autoscalers built for vLLM (default: "
                        f"{DEFAULT_METRICS_PREFIX})")
    add_reply_options(s)
    s.add_argument("--allowed-origins", type=_json_list, default=["*"], metavar="JSON",
                   help="origins a browser may call the API from, as vLLM: a JSON list "
                        "(default: [\"*\"], any; [] for none)")
    s.add_argument("--allowed-methods", type=_json_list, default=["*"], metavar="JSON",
                   help="methods a cross-origin request may use, a JSON list (default: [\"*\"])")
    s.add_argument("--allowed-headers", type=_json_list, default=["*"], metavar="JSON",
                   help="headers a cross-origin request may send, a JSON list (default: "
                        "[\"*\"])")
    s.add_argument("--allow-credentials", action="store_true",
                   help="let cross-origin requests carry credentials (cookies, auth headers)")
    s.add_argument("--shutdown-timeout", type=float, default=5.0,
                   help="seconds in total in-flight requests may keep running after "
                        "SIGTERM/SIGINT before they are aborted (streams end with an error "
                        "event, the others get a 503) (default: 5)")
    # SUPPRESS: `fairswitch --log-level X serve` (main.py) is not overwritten by a default here.
    s.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS, default=argparse.SUPPRESS,
                   help="verbosity of fairswitch's loggers (default: info: one access line "
                        "per request, refusals with their cause)")
    s.add_argument("--allow-runtime-lora-updating", action="store_true",
                   help="serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter, which "
                        "add and remove LoRA adapters by name while serving (vLLM's "
                        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True does the same; any client may "
                        "then have a folder of the server's read)")
    s.add_argument("--enable-request-id-headers", action="store_true",
                   help="every response carries an X-Request-Id header: the request's own, "
                        "else a new one, as vLLM's flag")
    s.add_argument("--disable-log-requests", action="store_true",
                   help="no access line per request (refusals are still logged)")
    s.add_argument("--disable-log-stats", action="store_true",
                   help=f"no stats line every {DEFAULT_LOG_STATS_S:g} s (throughput, queues, KV usage, prefix cache "
                        "hit rate, preemptions), as vLLM's flag")
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="the model to serve, as in `vllm serve MODEL`: the same as --model")
    # None: --model not given (the positional may give it; else the config's default)
    add_engine_args(p)["model"].default = None
    p.set_defaults(run=run)
    return p


def add_reply_options(g: argparse._ActionsContainer) -> None:
    """How replies are made and read, for ``serve`` and ``run-batch`` alike."""
    g.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="model name(s) clients send in 'model'; the first is reported in "
                        "responses (default: the --model value)")
    g.add_argument("--chat-template", default=None,
                   help="Jinja chat template (a file, or the template itself) replacing the "
                        "tokenizer's (default: the tokenizer's, else a plain-text one)")
    g.add_argument("--trust-request-chat-template", action="store_true",
                   help="render a request's own 'chat_template' (refused otherwise, as vLLM: "
                        "the client's Jinja runs sandboxed in a child process, killed after 2 s; "
                        "for trusted clients only)")
    g.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="tool_choice 'auto' (OpenAI's default with tools): the model may call "
                        "the tools in its own syntax, read by --tool-call-parser, as vLLM")
    g.add_argument("--tool-call-parser", choices=TOOL_PARSERS, default=None,
                   help="the model's tool-call syntax: hermes (<tool_call>{...}</tool_call>: "
                        "Qwen2.5/3, Hermes), llama3_json (a JSON object: Llama 3.1-3.3), "
                        "mistral ([TOOL_CALLS]...: Mistral), pythonic ([f(x=1), g()]: Llama "
                        "3.2/4)")
    g.add_argument("--reasoning-parser", choices=REASONING_PARSERS, default=None,
                   help="chat replies' thinking as 'reasoning', apart from their content, as "
                        "vLLM: deepseek_r1 (thinks from the start up to </think>), qwen3 "
                        "(a reply that opens with <think>)")
    g.add_argument("--return-tokens-as-token-ids", action="store_true",
                   help="logprobs name each token 'token_id:<id>' instead of by its text (a "
                        "request's return_tokens_as_token_ids overrides it), as vLLM")
    g.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
                   help="LoRA adapters (PEFT folders) served as models of their own, as vLLM: "
                        "name=path, or JSON {\"name\": ..., \"path\": ...}; a request whose "
                        "'model' is the name runs with the adapter (needs --enable-lora)")


def reply_settings(args: argparse.Namespace) -> dict:
    """``ServerSettings`` fields of ``add_reply_options``' flags; ValueError if they clash."""
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (one of "
                         f"{', '.join(TOOL_PARSERS)}): the syntax of the model's tool calls")
    if args.tool_call_parser is not None and not args.enable_auto_tool_choice:
        logging.getLogger("fairswitch").warning(
            "--tool-call-parser without --enable-auto-tool-choice: tool_choice 'auto' stays "
            "refused (as vLLM)")
    return dict(served_model_names=args.served_model_name or [args.model],
                chat_template=read_chat_template(args.chat_template),
                trust_request_chat_template=args.trust_request_chat_template,
                tool_call_parser=args.tool_call_parser if args.enable_auto_tool_choice else None,
                reasoning_parser=args.reasoning_parser,
                return_tokens_as_token_ids=args.return_tokens_as_token_ids,
                lora_modules=lora_modules(args.lora_modules))


def lora_modules(values: list[str]) -> dict[str, str]:
    """``--lora-modules`` entries (``name=path`` or a JSON object with ``name`` and ``path``)
    -> {name: path}; ValueError for a malformed entry or a name given twice."""
    modules: dict[str, str] = {}
    for value in values:
        if value.lstrip().startswith("{"):
            try:
                spec = json.loads(value)
            except ValueError as e:
                raise ValueError(f"--lora-modules: {value!r} is not valid JSON ({e})") from None
            name, path = (spec.get("name"), spec.get("path")) if isinstance(spec, dict) \
                else (None, None)
        else:
            name, _, path = value.partition("=")
        if not (isinstance(name, str) and name and isinstance(path, str) and path):
            raise ValueError(f"--lora-modules: {value!r} is not name=path or "
                             "{\"name\": ..., \"path\": ...}")
        if name in modules:
            raise ValueError(f"--lora-modules: {name!r} is given twice")
        modules[name] = path
    return modules


def _json_list(text: str) -> list[str]:
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise argparse.ArgumentTypeError(f"expected a JSON list of strings, e.g. '[\"*\"]', "
                                         f"got {text!r}")
    return value


def _model(args: argparse.Namespace) -> str:
    if args.model_tag is None:
        return args.model or ModelConfig.model
    if args.model is not None and args.model != args.model_tag:
        raise ValueError(f"the model is given twice: {args.model_tag!r} and --model "
                         f"{args.model!r}")
    return args.model_tag


def run(args: argparse.Namespace) -> int:
    from fairswitch.engine.async_engine import AsyncEngine
    from fairswitch.server import ServerSettings, build_app, serve_forever
    from fairswitch.server.serving import server_ssl_context
    from fairswitch.server.settings import DEFAULT_LOG_STATS_S

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if not (math.isfinite(args.shutdown_timeout) and args.shutdown_timeout >= 0):
        raise ValueError(f"--shutdown-timeout must be a finite number of seconds >= 0, got "
                         f"{args.shutdown_timeout}")
    if args.ssl_certfile is None and (args.ssl_keyfile or args.ssl_ca_certs
                                      or args.ssl_cert_reqs):
        raise ValueError("--ssl-keyfile, --ssl-ca-certs and --ssl-cert-reqs need --ssl-certfile")
    tls = server_ssl_context(args.ssl_certfile, args.ssl_keyfile, args.ssl_ca_certs,
                             args.ssl_cert_reqs) if args.ssl_certfile is not None else None
    args.model = _model(args)
    logging.getLogger("fairswitch").setLevel((args.log_level or "info").upper())
    settings = ServerSettings(
        api_key=args.api_key, max_body_bytes=args.max_body_bytes,
        log_requests=not args.disable_log_requests, metrics_prefix=args.metrics_prefix,
        log_stats_interval_s=None if args.disable_log_stats else DEFAULT_LOG_STATS_S,
        cors=CorsPolicy(tuple(args.allowed_origins), tuple(args.allowed_methods),
                        tuple(args.allowed_headers), args.allow_credentials),
        allow_runtime_lora_updating=args.allow_runtime_lora_updating or os.environ.get(
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").lower() in ("1", "true"),
        request_id_headers=args.enable_request_id_headers,
        dev_mode=os.environ.get("VLLM_SERVER_DEV_MODE", "").lower() in ("1", "true"),
        **reply_settings(args))
    engine = AsyncEngine.from_config(EngineConfig.from_cli_args(args))
    try:  # (a bad --lora-modules adapter is found here)
        app = build_app(engine, settings)
    except BaseException:
        engine.shutdown()
        raise

    def started(url: str) -> None:
        # Printed (not logged) so that scripts can wait for it; port 0 shows the chosen port.
        print(f"fairswitch serve: {settings.served_model_names[0]} on {url}", flush=True)

    try:
        healthy = asyncio.run(serve_forever(
            app, args.host, args.port, shutdown_timeout=args.shutdown_timeout,
            on_started=started, engine_alive=lambda: engine.is_running, ssl_context=tls,
            uds=args.uds))
    finally:
        engine.shutdown()  # no-op when the app's cleanup already stopped it
    healthy = healthy and not engine.failed  # (also a step that broke off during the drain)
    print("fairswitch serve: stopped" if healthy else "fairswitch serve: the engine failed",
          flush=True)
    return 0 if healthy else 1
