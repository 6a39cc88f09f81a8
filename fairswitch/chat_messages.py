"""Chat messages, checked and normalized in one place for ``LLM.chat`` and /v1/chat/completions, so
that both accept the same conversations and render them alike.

A message is ``{"role": str, "content": ...}`` with an optional ``"name": str``. Its content is a
string, or OpenAI's content parts of which only text is supported (``[{"type": "text", "text":
...}]``, joined with newlines); an assistant turn may have none (None or absent: empty, as in
OpenAI's API, where a turn that called tools has no content). Other keys are dropped (the chat
template sees string content only), except OpenAI's tool-call fields, kept as vLLM gives them to
templates: an assistant's ``tool_calls`` (``[{"id", "type": "function", "function": {"name",
"arguments"}}]``, the arguments' JSON string parsed into a dict, which templates such as Llama
3.1's index) and a tool message's ``tool_call_id``.

Only a template that renders tool calls gets them: ``check_template_renders_tools`` refuses a
conversation with tool calls or tool results for a template whose source never mentions
``tool_calls``, which would render it without them.

A wrong type is a ``MessageTypeError``, a bad value a ``MessageValueError`` (a TypeError and a
ValueError); each names the field, in its text and in ``field`` (``messages[2].content``), which
the server reports as the error's ``param``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from fairswitch.unicode_text import lone_surrogate, not_text_message

# For a tokenizer without a chat template (the server, LLM.chat, generate --chat): ``Role:
# content`` lines, then ``Assistant:``; it needs no special tokens, so it works with any vocabulary.
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class MessageError(Exception):
    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


class MessageTypeError(MessageError, TypeError):
    pass


class MessageValueError(MessageError, ValueError):
    pass


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_conversation(messages: Sequence[Any], where: str = "messages",
                       describe: Callable[[Any], str] = _short_repr) -> list[dict[str, Any]]:
    """The messages of one conversation (``where`` names it in errors), checked and normalized;
    ``describe`` writes a bad value into an error (the server's says it in JSON's terms)."""
    if not messages:
        raise MessageValueError(f"'{where}' must not be empty", where)
    return [_parse_message(m, f"{where}[{i}]", describe) for i, m in enumerate(messages)]


def _parse_message(m: Any, where: str, describe: Callable[[Any], str]) -> dict[str, Any]:
    if not isinstance(m, dict):
        raise MessageTypeError(f"'{where}' must be an object (a dict with 'role' and 'content'), "
                               f"got {describe(m)}", where)
    role, content = m.get("role"), m.get("content")
    if not isinstance(role, str) or not role:
        error = MessageValueError if isinstance(role, str) else MessageTypeError
        got = _got(m, "role", describe)
        raise error(f"'{where}.role' must be a non-empty string, {got}", f"{where}.role")
    if isinstance(content, list):
        content = "\n".join(_text(part, f"{where}.content", j, describe)
                            for j, part in enumerate(content))
    elif content is None and role == "assistant":
        content = ""
    elif not isinstance(content, str):
        only = " (only an assistant's may be none)" if content is None else ""
        raise MessageTypeError(f"'{where}.content' must be a string or a list of text parts{only}, "
                               f"got {describe(content)}", f"{where}.content")
    message: dict[str, Any] = {"role": role, "content": content}
    for key in ("name", "tool_call_id"):
        value = m.get(key)
        if value is not None:
            if not isinstance(value, str):
                raise MessageTypeError(f"'{where}.{key}' must be a string, got {describe(value)}",
                                       f"{where}.{key}")
            message[key] = value
    # An assistant's thinking (vLLM's "reasoning", DeepSeek's "reasoning_content"), given to
    # the template under both names: templates that render past thinking read one of them.
    for key in ("reasoning", "reasoning_content"):
        thought = m.get(key)
        if thought is None:
            continue
        if not isinstance(thought, str):
            raise MessageTypeError(f"'{where}.{key}' must be a string, got {describe(thought)}",
                                   f"{where}.{key}")
        char = lone_surrogate(thought)
        if char is not None:
            raise MessageValueError(f"'{where}.{key}' holds {not_text_message(char)}",
                                    f"{where}.{key}")
        if thought or "reasoning" not in message:  # (the first that says something)
            message["reasoning"] = message["reasoning_content"] = thought
    if "tool_call_id" in message and role != "tool":
        raise MessageValueError(f"'{where}.tool_call_id': only a tool message (role 'tool') may "
                                f"have one, this is a {role!r} message", f"{where}.tool_call_id")
    tool_calls = m.get("tool_calls")
    if tool_calls is not None:
        if not isinstance(tool_calls, list):
            raise MessageTypeError(f"'{where}.tool_calls' must be a list, got "
                                   f"{describe(tool_calls)}", f"{where}.tool_calls")
        if tool_calls and role != "assistant":
            raise MessageValueError(f"'{where}.tool_calls': only an assistant message may have "
                                    f"them, this is a {role!r} message", f"{where}.tool_calls")
        if tool_calls:  # (an empty list, as some clients send, is no tool calls)
            message["tool_calls"] = [_tool_call(call, f"{where}.tool_calls[{j}]", describe)
                                     for j, call in enumerate(tool_calls)]
    for key, value in message.items():  # (no tokenizer takes them, nor says which field)
        char = lone_surrogate(value)
        if char is not None:
            raise MessageValueError(f"'{where}.{key}' holds {not_text_message(char)}",
                                    f"{where}.{key}")
    return message


def _tool_call(call: Any, where: str, describe: Callable[[Any], str]) -> dict[str, Any]:
    """``{"id"?, "type": "function", "function": {"name", "arguments": dict}}``."""
    if not isinstance(call, dict):
        raise MessageTypeError(f"'{where}' must be an object (a dict with 'function'), got "
                               f"{describe(call)}", where)
    kind = call.get("type")
    if kind is not None and kind != "function":
        error = MessageValueError if isinstance(kind, str) else MessageTypeError
        raise error(f"'{where}.type' must be 'function', got {describe(kind)}", f"{where}.type")
    function = call.get("function")
    if not isinstance(function, dict):
        got = _got(call, "function", describe)
        raise MessageTypeError(f"'{where}.function' must be an object (a dict with 'name' and "
                               f"'arguments'), {got}", f"{where}.function")
    name, arguments = function.get("name"), function.get("arguments")
    if not isinstance(name, str) or not name:
        error = MessageValueError if isinstance(name, str) else MessageTypeError
        got = _got(function, "name", describe)
        raise error(f"'{where}.function.name' must be a non-empty string, {got}",
                    f"{where}.function.name")
    if isinstance(arguments, str):
        arguments = _json_object(arguments, f"{where}.function.arguments", describe)
    elif not isinstance(arguments, dict):
        got = _got(function, "arguments", describe)
        raise MessageTypeError(f"'{where}.function.arguments' must be a JSON string or an object, "
                               f"{got}", f"{where}.function.arguments")
    parsed: dict[str, Any] = {"type": "function",
                              "function": {"name": name, "arguments": arguments}}
    call_id = call.get("id")
    if call_id is not None:
        if not isinstance(call_id, str):
            raise MessageTypeError(f"'{where}.id' must be a string, got {describe(call_id)}",
                                   f"{where}.id")
        parsed = {"id": call_id, **parsed}
    return parsed


def _json_object(text: str, where: str, describe: Callable[[Any], str]) -> dict[str, Any]:
    if not text.strip():  # no arguments, as vLLM reads them
        return {}
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # (nested deeper than Python's recursion limit)
        value = None
    if not isinstance(value, dict):
        raise MessageValueError(f"'{where}' must be the JSON text of an object, got "
                                f"{describe(text)}", where)
    char = lone_surrogate(value)  # its \\ud800 escapes were not seen as one until parsed
    if char is not None:
        raise MessageValueError(f"'{where}' holds {not_text_message(char)}", where)
    return value


def check_template_renders_tools(conversation: list[dict[str, Any]],
                                 template: str | dict[str, str] | None,
                                 where: str = "messages") -> None:
    """Refuse a conversation with tool calls, or tool results that answer one (``tool_call_id``),
    its first named, when ``template`` (the chat template's source, or a tokenizer's named
    templates, of which the default renders; None: none) never mentions ``tool_calls``: it would
    render the conversation without them, and the model would reply to a different one. A tool
    message with content alone renders whole, as any other role."""
    if isinstance(template, dict):
        template = template.get("default")
    for i, m in enumerate(conversation):
        if "tool_calls" in m:
            field, what = f"{where}[{i}].tool_calls", "has tool calls"
        elif "tool_call_id" in m:
            field, what = f"{where}[{i}].tool_call_id", "answers a tool call"
        else:
            continue
        if template is not None and "tool_calls" in template:
            return
        raise MessageValueError(
            f"'{field}': the message {what}, but this chat template does not render tool calls "
            "(its source never mentions 'tool_calls'), so the model would not see them; use a "
            "chat template that does", field)


def _got(obj: dict[str, Any], key: str, describe: Callable[[Any], str]) -> str:
    """How an error says what ``obj[key]`` held: its value, or that it is missing."""
    return f"got {describe(obj[key])}" if key in obj else "but it is missing"


def _text(part: Any, where: str, j: int, describe: Callable[[Any], str]) -> str:
    """A text part's text; a part of any other kind is refused."""
    if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
        return part["text"]
    error = MessageValueError if isinstance(part, dict) else MessageTypeError
    raise error(f"'{where}[{j}]' must be a text part ({{\"type\": \"text\", \"text\": ...}}): "
                f"only text is supported, got {describe(part)}", where)


# apply_chat_template's own arguments and the names templates get from it: not for a caller to
# set through chat_template_kwargs.
_TEMPLATE_RESERVED = frozenset({
    "messages", "conversation", "tools", "documents", "add_generation_prompt",
    "continue_final_message", "chat_template", "tokenize", "padding", "truncation",
    "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask",
    "tokenizer_kwargs", "raise_exception", "strftime_now",
    # Jinja's own globals, which templates call (Qwen's namespace(...), range(...))
    "range", "dict", "lipsum", "cycler", "joiner", "namespace"})


def check_template_kwargs(kwargs: dict[str, Any]) -> None:
    """chat_template_kwargs: variables for the template; ValueError for names the call itself
    sets (message after the field's name)."""
    if not all(isinstance(k, str) for k in kwargs):
        raise ValueError("must have string keys")
    if reserved := sorted(kwargs.keys() & _TEMPLATE_RESERVED):
        raise ValueError(f"may not set {', '.join(reserved)}: they are the call's own "
                         "arguments or the template's functions")
