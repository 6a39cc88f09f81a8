"""Chat messages, checked and normalized in one place for ``LLM.chat`` and /v1/chat/completions, so
that both accept the same conversations and render them alike.

A message is ``{"role": str, "content": ...}`` with an optional ``"name": str``. Its content is a
string, or OpenAI's content parts of which only text is supported (``[{"type": "text", "text":
...}]``, joined with newlines); an assistant turn may have none (None or absent: empty, as in
OpenAI's API, where a turn that called tools has no content). Other keys are dropped, so the chat
template sees string content only.

A wrong type is a ``MessageTypeError``, a bad value a ``MessageValueError`` (a TypeError and a
ValueError); each names the field, in its text and in ``field`` (``messages[2].content``), which
the server reports as the error's ``param``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


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
                       describe: Callable[[Any], str] = _short_repr) -> list[dict[str, str]]:
    """The messages of one conversation (``where`` names it in errors), checked and normalized;
    ``describe`` writes a bad value into an error (the server's says it in JSON's terms)."""
    if not messages:
        raise MessageValueError(f"'{where}' must not be empty", where)
    return [_parse_message(m, f"{where}[{i}]", describe) for i, m in enumerate(messages)]


def _parse_message(m: Any, where: str, describe: Callable[[Any], str]) -> dict[str, str]:
    if not isinstance(m, dict):
        raise MessageTypeError(f"'{where}' must be an object (a dict with 'role' and 'content'), "
                               f"got {describe(m)}", where)
    role, content = m.get("role"), m.get("content")
    if not isinstance(role, str) or not role:
        error = MessageValueError if isinstance(role, str) else MessageTypeError
        got = f"got {describe(role)}" if "role" in m else "but it is missing"
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
    message = {"role": role, "content": content}
    name = m.get("name")
    if name is not None:
        if not isinstance(name, str):
            raise MessageTypeError(f"'{where}.name' must be a string, got {describe(name)}",
                                   f"{where}.name")
        message["name"] = name
    return message


def _text(part: Any, where: str, j: int, describe: Callable[[Any], str]) -> str:
    """A text part's text; a part of any other kind is refused."""
    if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
        return part["text"]
    error = MessageValueError if isinstance(part, dict) else MessageTypeError
    raise error(f"'{where}[{j}]' must be a text part ({{\"type\": \"text\", \"text\": ...}}): "
                f"only text is supported, got {describe(part)}", where)
