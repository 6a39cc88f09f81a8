"""Chat messages -> prompt text and token ids, through the tokenizer's chat template.

A tokenizer without a template gets a plain-text one (chat_messages.py's ``PLAIN_CHAT_TEMPLATE``),
as ``LLM.chat`` does. The rendered text is tokenized without adding special tokens: templates
write their own BOS where the model wants one. A request's own ``chat_template`` replaces the
server's only where the server trusts requests' templates (vLLM's
``--trust-request-chat-template``); its rendering is bounded in time (``REQUEST_TEMPLATE_S``).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any

import jinja2

from fairswitch.chat_messages import (PLAIN_CHAT_TEMPLATE, MessageError,
                                      check_template_renders_tools)
from fairswitch.model.tokenizer import template_syntax_error
from fairswitch.server.errors import bad_request
from fairswitch.server.protocol import TemplateInputs

# How long a request's own chat template may render: a template's loops are Python loops, which
# would otherwise hold a prompt worker and the CPU for as long as they run.
REQUEST_TEMPLATE_S = 2.0


class TemplateTimeout(Exception):
    pass


@contextlib.contextmanager
def _time_bound(seconds: float) -> Iterator[None]:
    """Raise TemplateTimeout in this thread's Python code once it has run ``seconds`` (checked
    every 256 lines it runs, through a trace function: renders run some times slower), and at
    the end if the time ran out (code that caught the error, which also ends the watch).
    Best effort: one long C-level operation is not interrupted."""
    deadline = time.monotonic() + seconds
    lines = 0
    message = f"it ran longer than {seconds:g} s"

    def trace(frame: Any, event: str, arg: Any) -> Any:
        nonlocal lines
        lines += 1
        if not lines % 256 and time.monotonic() > deadline:
            raise TemplateTimeout(message)
        return trace

    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        yield
    finally:
        sys.settrace(previous)
    if time.monotonic() > deadline:
        raise TemplateTimeout(message)


class ChatTemplate:
    def __init__(self, tokenizer: Any, template: str | None = None,
                 trust_requests: bool = False) -> None:
        self.tokenizer = tokenizer
        self.template = template or getattr(tokenizer, "chat_template", None) \
            or PLAIN_CHAT_TEMPLATE
        self.trust_requests = trust_requests

    def _source(self, inputs: TemplateInputs) -> str:
        """The template this request renders with: its own, where requests' are trusted."""
        if inputs.source is None:
            return self.template
        if not self.trust_requests:
            raise bad_request("'chat_template': this server renders only its own chat template "
                              "(start it with --trust-request-chat-template to render "
                              "requests' templates)", "chat_template")
        if (error := template_syntax_error(inputs.source)) is not None:
            raise bad_request(f"'chat_template' is not a Jinja template: {error}",
                              "chat_template")
        return inputs.source

    def render(self, messages: list[dict[str, Any]],
               inputs: TemplateInputs = TemplateInputs()) -> str:
        source = self._source(inputs)
        try:
            check_template_renders_tools(messages, source)
        except MessageError as e:
            raise bad_request(str(e), e.field) from e
        documents = {}
        if inputs.documents is not None:
            if "documents" not in source:  # (vLLM drops them unseen)
                raise bad_request("'documents': this chat template does not render documents "
                                  "(its source never mentions 'documents'), so the model would "
                                  "not see them; use a chat template that does", "documents")
            documents = {"documents": inputs.documents}
        bound = contextlib.nullcontext() if inputs.source is None else \
            _time_bound(REQUEST_TEMPLATE_S)
        try:
            with bound:
                return self.tokenizer.apply_chat_template(
                    messages, chat_template=source, tokenize=False,
                    add_generation_prompt=inputs.add_generation_prompt,
                    continue_final_message=inputs.continue_final_message, tools=inputs.tools,
                    **documents, **inputs.kwargs)
        except TemplateTimeout as e:
            raise bad_request(f"'chat_template' did not render in time: {e}",
                              "chat_template") from e
        except jinja2.TemplateError as e:  # e.g. a template that insists roles alternate
            raise bad_request(f"the chat template rejected the messages: {e}",
                              "messages" if inputs.source is None else "chat_template") from e
        except Exception as e:
            if isinstance(e, ValueError) and inputs.continue_final_message and str(
                    e).startswith("continue_final_message"):  # no final message to continue
                raise bad_request(str(e), "continue_final_message") from e
            if inputs.source is None:  # (the server's own template: the server's failure)
                raise
            raise bad_request(f"'chat_template' failed while rendering: {type(e).__name__}: "
                              f"{e}", "chat_template") from e

    def encode(self, messages: list[dict[str, Any]],
               inputs: TemplateInputs = TemplateInputs()) -> tuple[str, list[int]]:
        """(prompt text, prompt token ids) of a conversation."""
        text = self.render(messages, inputs)
        return text, self.tokenizer.encode(text, add_special_tokens=False)
