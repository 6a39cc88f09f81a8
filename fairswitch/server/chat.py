"""Chat messages -> prompt text and token ids, through the tokenizer's chat template.

A tokenizer without a template gets a plain-text one (chat_messages.py's ``PLAIN_CHAT_TEMPLATE``),
as ``LLM.chat`` does. The rendered text is tokenized without adding special tokens: templates
write their own BOS where the model wants one. A request's own ``chat_template`` replaces the
server's only where the server trusts requests' templates (vLLM's
``--trust-request-chat-template``), rendered in a child process that is killed past
``REQUEST_TEMPLATE_S`` (template_sandbox.py).
"""

from __future__ import annotations

from typing import Any

import jinja2

from fairswitch.chat_messages import (PLAIN_CHAT_TEMPLATE, MessageError,
                                      check_template_renders_tools)
from fairswitch.model.tokenizer import (cut_after_final_message, template_syntax_error,
                                        template_variables)
from fairswitch.server.errors import bad_request
from fairswitch.server.protocol import TemplateInputs
from fairswitch.server.template_sandbox import RenderError, TemplateSandbox, TemplateTimeout

# How long a request's own chat template may render (template_sandbox.py: in a child process,
# killed past it).
REQUEST_TEMPLATE_S = 2.0


class ChatTemplate:
    def __init__(self, tokenizer: Any, template: str | None = None,
                 trust_requests: bool = False) -> None:
        self.tokenizer = tokenizer
        self.template = template or getattr(tokenizer, "chat_template", None) \
            or PLAIN_CHAT_TEMPLATE
        self.trust_requests = trust_requests
        self.sandbox = TemplateSandbox(REQUEST_TEMPLATE_S) if trust_requests else None

    def close(self) -> None:
        if self.sandbox is not None:
            self.sandbox.close()

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
        if inputs.source is not None:
            return self._render_requests(messages, inputs, documents)
        try:
            return self.tokenizer.apply_chat_template(
                messages, chat_template=source, tokenize=False,
                add_generation_prompt=inputs.add_generation_prompt,
                continue_final_message=inputs.continue_final_message, tools=inputs.tools,
                **documents, **inputs.kwargs)
        except jinja2.TemplateError as e:  # e.g. a template that insists roles alternate
            raise bad_request(f"the chat template rejected the messages: {e}", "messages") from e
        except ValueError as e:  # (else the server's own template failed: the server's error)
            if inputs.continue_final_message and str(e).startswith("continue_final_message"):
                raise bad_request(str(e), "continue_final_message") from e  # nothing to continue
            raise

    def _render_requests(self, messages: list[dict[str, Any]], inputs: TemplateInputs,
                         documents: dict[str, Any]) -> str:
        """A request's own template, rendered in the sandbox (as apply_chat_template would;
        continue_final_message with add_generation_prompt is refused when it is parsed)."""
        variables = template_variables(
            self.tokenizer, messages, inputs.add_generation_prompt, tools=inputs.tools,
            **documents, **inputs.kwargs)
        try:
            text = self.sandbox.render(inputs.source, variables)  # type: ignore[union-attr]
        except TemplateTimeout as e:
            raise bad_request(f"'chat_template' did not render in time: {e}",
                              "chat_template") from e
        except RenderError as e:
            if e.jinja:  # e.g. a template that insists roles alternate
                raise bad_request(f"the chat template rejected the messages: {e}",
                                  "chat_template") from e
            raise bad_request(f"'chat_template' failed while rendering: {e.type_name}: {e}",
                              "chat_template") from e
        if not inputs.continue_final_message:
            return text
        try:
            return cut_after_final_message(text, messages)
        except ValueError as e:  # no final message to continue
            raise bad_request(str(e), "continue_final_message") from e

    def encode(self, messages: list[dict[str, Any]],
               inputs: TemplateInputs = TemplateInputs()) -> tuple[str, list[int]]:
        """(prompt text, prompt token ids) of a conversation."""
        text = self.render(messages, inputs)
        return text, self.tokenizer.encode(text, add_special_tokens=False)
