"""Server settings (no heavy imports: the CLI reads the defaults while building its parser)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from fairswitch.model.default_model import DEFAULT_MODEL_NAME
from fairswitch.server.cors import CorsPolicy
from fairswitch.server import reasoning, tool_parsers

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_METRICS_PREFIX = "fairswitch:"  # /metrics names: vLLM's under this ("vllm:" for its)
DEFAULT_LOG_STATS_S = 10.0  # vLLM's interval


@dataclass
class ServerSettings:
    served_model_names: list[str] = field(default_factory=lambda: [DEFAULT_MODEL_NAME])
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    chat_template: str | None = None  # default: the tokenizer's
    # A request's own chat_template is rendered (vLLM's --trust-request-chat-template), else
    # refused: a template is code the server runs (sandboxed Jinja in a child process, killed
    # past 2 s: template_sandbox.py).
    trust_request_chat_template: bool = False
    log_requests: bool = True  # one access line per request (INFO, fairswitch.server.access)
    # A stats line this often (stats_log.py; vLLM's, which --disable-log-stats turns off: None)
    log_stats_interval_s: float | None = DEFAULT_LOG_STATS_S
    metrics_prefix: str = DEFAULT_METRICS_PREFIX
    # Cross-origin requests from browsers (cors.py); None: no CORS headers at all.
    cors: CorsPolicy | None = field(default_factory=CorsPolicy)
    # tool_choice "auto" (the default with tools): the parser of the model's own tool calls
    # (tool_parsers.py; vLLM's --enable-auto-tool-choice --tool-call-parser); None refuses it.
    tool_call_parser: str | None = None
    # Chat replies' thinking apart from their answer (reasoning.py; vLLM's --reasoning-parser).
    reasoning_parser: str | None = None
    # Logprobs name tokens "token_id:<id>" unless a request says otherwise (vLLM's flag).
    return_tokens_as_token_ids: bool = False
    # LoRA adapters served as models of their own: name -> PEFT folder (vLLM's --lora-modules;
    # the engine needs enable_lora), and whether /v1/load_lora_adapter and
    # /v1/unload_lora_adapter change them while serving (vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING).
    lora_modules: dict[str, str] = field(default_factory=dict)
    allow_runtime_lora_updating: bool = False
    # Every response carries X-Request-Id: the request's own, else a new one (vLLM's
    # --enable-request-id-headers). A request's X-Request-Id names its reply either way.
    request_id_headers: bool = False
    # Development routes (vLLM's VLLM_SERVER_DEV_MODE=1): POST /reset_prefix_cache.
    dev_mode: bool = False

    def __post_init__(self) -> None:
        if not self.served_model_names:
            raise ValueError("served_model_names must name at least one model")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*:", self.metrics_prefix):
            raise ValueError(f"metrics_prefix must be a Prometheus name ending in ':' (e.g. "
                             f"'vllm:'), got {self.metrics_prefix!r}")
        for name, known in (("tool_call_parser", tool_parsers.PARSERS),
                            ("reasoning_parser", reasoning.PARSERS)):
            value = getattr(self, name)
            if value is not None and value not in known:
                raise ValueError(f"{name} must be one of {', '.join(known)}, got {value!r}")
        if self.log_stats_interval_s is not None and not self.log_stats_interval_s > 0:
            raise ValueError(f"log_stats_interval_s must be > 0 or None, got "
                             f"{self.log_stats_interval_s}")
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}")
