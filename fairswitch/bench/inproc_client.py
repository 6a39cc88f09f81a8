"""Replay client for an in-process ``AsyncEngine``: no HTTP, the same prompts as the server.

A turn's messages go through the server's own chat-template code, prompt checks and max_tokens
rule (``ChatTemplate``, ``Engine.validate_prompt``, ``protocol.resolve_max_tokens``) and take
the model's sampling defaults as the server does for fields the HTTP client leaves unset, so an
in-process run and an HTTP run of one trace send the engine identical requests, and a request
the server would refuse fails here too. Token times are exact: every engine output says how many
tokens it carries.
"""

from __future__ import annotations

from fairswitch.bench.records import RequestRecord
from fairswitch.bench.replay import Clock
from fairswitch.bench.trace import Conversation
from fairswitch.engine.async_engine import AsyncEngine
from fairswitch.sampling_params import SamplingParams
from fairswitch.server import protocol
from fairswitch.server.chat import ChatTemplate


class InProcClient:
    def __init__(self, engine: AsyncEngine, *, chat_template: str | None = None,
                 temperature: float = 0.0) -> None:
        self.engine = engine
        self.core = engine.engine  # read-only: tokenizer and limits, as the server uses them
        self.chat_template = ChatTemplate(self.core.tokenizer, chat_template)
        self.temperature = temperature

    def prompt(self, conv: Conversation, turn: int) -> tuple[str, list[int], int]:
        """(prompt text, token ids, max_tokens) of a turn; raises what the server answers 400."""
        text, ids = self.chat_template.encode(conv.messages(turn))
        text, ids = self.core.validate_prompt(text, ids)
        max_tokens = protocol.resolve_max_tokens(conv.turns[turn].output_tokens, len(ids),
                                                 self.core.max_model_len, None,
                                                 self.core.generation.max_new_tokens)
        return text, ids, max_tokens

    async def send(self, conv: Conversation, turn: int, record: RequestRecord,
                   clock: Clock) -> None:
        text, ids, max_tokens = self.prompt(conv, turn)
        record.prompt_tokens = len(ids)
        params = SamplingParams(**{**self.core.generation.sampling, "max_tokens": max_tokens,
                                   "temperature": self.temperature, "ignore_eos": True})
        async for out in self.engine.generate(text, params, request_id=record.request_id,
                                              prompt_token_ids=ids, priority=conv.priority,
                                              client_id=conv.client):
            now = clock()
            record.token_times_s.extend([now] * len(out.outputs[0].new_token_ids))
            record.cached_tokens = out.num_cached_tokens
            if out.finished:
                record.end_s = now
                if out.outputs[0].finish_reason == "abort":
                    raise RuntimeError("the engine aborted the request")
