"""Replies that are tool calls, as vLLM makes them without a model-specific parser: a chat whose
``tool_choice`` names a function, or is ``"required"`` (one call or more, to any of the tools).

The reply is held by structured output to JSON: a named function's arguments (its parameters'
schema), or for "required" a list ``[{"name": ..., "parameters": {...}}, ...]`` (``
required_schema``). This module turns that text back into OpenAI's ``message.tool_calls``, whole
or, in a stream, a delta at a time: a call's id, type and name first, then its arguments as they
come. The grammar writes JSON in one line (``", "`` and ``": "`` between items, fields in the
schema's order), which is what the stream reader expects.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

_ITEM = '{"name": "'
_PARAMETERS = ', "parameters": '


def required_schema(tools: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON schema of a "required" reply: one call or more, each to one of ``tools``."""
    return {"type": "array", "minItems": 1, "items": {"anyOf": [
        {"type": "object",
         "properties": {"name": {"type": "string", "enum": [fn["name"]]},
                        "parameters": fn.get("parameters") or {"type": "object"}},
         "required": ["name", "parameters"], "additionalProperties": False}
        for fn in (tool["function"] for tool in tools)]}}


def _call(name: str | None, arguments: str, index: int, call_id: str | None) -> dict[str, Any]:
    """A tool call, or a stream's delta of one (the name and id only in its first)."""
    if call_id is None:
        return {"index": index, "function": {"arguments": arguments}}
    return {"index": index, "id": call_id, "type": "function",
            "function": {"name": name, "arguments": arguments}}


def _new_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


class ToolCalls:
    """One response's tool calls; ``named``: the function tool_choice names (None: required)."""

    def __init__(self, named: str | None) -> None:
        self.named = named
        self._streams: dict[int, _CallStream] = {}

    def whole(self, text: str) -> list[dict[str, Any]] | None:
        """The calls of a whole reply; None if it is not one (cut short by max_tokens)."""
        if self.named is not None:
            return [_call(self.named, text, 0, _new_id())]
        try:
            items = json.loads(text)
        except ValueError:
            return None
        return [_call(item["name"], json.dumps(item["parameters"], ensure_ascii=False), i,
                      _new_id()) for i, item in enumerate(items)]

    def delta(self, choice: int, text: str) -> list[dict[str, Any]]:
        """The call deltas of a stream chunk's new text, for one choice."""
        stream = self._streams.setdefault(choice, _CallStream(self.named))
        return stream.feed(text)


class _CallStream:
    """Reads a reply's text as it streams. Named: all of it is the one call's arguments.
    Required: ``[{"name": "N", "parameters": V}, ...]`` where V is a JSON object, read a
    character at a time: literals as the grammar writes them, the name, then V streamed as the
    call's arguments up to the brace that closes it."""

    def __init__(self, named: str | None) -> None:
        self.named = named
        self.id: str | None = None
        self.calls = 0  # calls begun
        self.state = "open"  # open, item, name, parameters, arguments, close, done
        self.expect = "["  # the literal still to read in open / item / parameters
        self.name = ""
        self.depth = 0  # inside the arguments: open braces and brackets
        self.in_string = self.escaped = False

    def feed(self, text: str) -> list[dict[str, Any]]:
        if self.named is not None:
            first, self.id = self.id is None, self.id or _new_id()
            return [_call(self.named, text, 0, self.id if first else None)]
        out: list[dict[str, Any]] = []
        arguments = ""
        for ch in text:
            if self.state == "arguments":
                arguments += ch
                if self._ends_arguments(ch):
                    out.append(_call(None, arguments, self.calls - 1, None))
                    arguments, self.state = "", "close"
                continue
            self._step(ch, out)
        if arguments:
            out.append(_call(None, arguments, self.calls - 1, None))
        return out

    def _step(self, ch: str, out: list[dict[str, Any]]) -> None:
        if self.state in ("open", "item", "parameters"):
            if ch != self.expect[0]:  # not the grammar's JSON: nothing more is streamed
                self.state = "done"
                return
            self.expect = self.expect[1:]
            if self.expect:
                return
            self.state, self.expect = {"open": ("item", _ITEM), "item": ("name", ""),
                                       "parameters": ("arguments", "")}[self.state]
        elif self.state == "name":
            if ch == '"' and not self.name.endswith("\\"):
                out.append(_call(json.loads(f'"{self.name}"'), "", self.calls, _new_id()))
                self.calls += 1
                self.name, self.state, self.expect = "", "parameters", _PARAMETERS
            else:
                self.name += ch
        elif self.state == "close":  # the item's "}", then ", " and the next, or "]"
            if ch == "," or ch == "}":
                return
            if ch == " ":
                self.state, self.expect = "item", _ITEM
            elif ch == "]":
                self.state = "done"

    def _ends_arguments(self, ch: str) -> bool:
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif ch == "\\":
                self.escaped = True
            elif ch == '"':
                self.in_string = False
            return False
        if ch == '"':
            self.in_string = True
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            self.depth -= 1
            return self.depth == 0
        return False
