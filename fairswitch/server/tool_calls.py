"""Replies that are tool calls, as vLLM makes them without a model-specific parser: a chat whose
``tool_choice`` names a function, or is ``"required"`` (one call or more, to any of the tools).

The reply is held by structured output to JSON: a named function's arguments (its parameters'
schema, ``call_schema``), or for "required" a list ``[{"name": ..., "parameters": {...}}, ...]``
(``required_schema``). This module turns that text back into OpenAI's ``message.tool_calls``,
whole or, in a stream, a delta at a time: a call's id, type and name first, then its arguments as
they come. The grammar writes JSON in one line (``", "`` and ``": "`` between items, fields in
the schema's order), which is what the reader expects; a whole reply is read by the same reader,
so its arguments are the text the model wrote, as the stream's are.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from fairswitch.server.text_scan import JsonString

_ITEM = '{"name": "'
_PARAMETERS = ', "parameters": '
_NO_PARAMETERS = {"type": "object", "properties": {}}  # a function without any: {} only


def call_schema(function: dict[str, Any]) -> dict[str, Any]:
    """The schema of a function's arguments."""
    return function.get("parameters") or _NO_PARAMETERS


def required_schema(tools: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON schema of a "required" reply: one call or more, each to one of ``tools``. Each
    function's ``$defs`` (``definitions``) move to the top, where its ``$ref``s point (pydantic
    and the openai library write parameters so); ValueError if two define a name apart."""
    top: dict[str, dict[str, Any]] = {"$defs": {}, "definitions": {}}
    items = []
    for fn in (tool["function"] for tool in tools):
        parameters = dict(call_schema(fn))
        for key, defs in top.items():
            for name, schema in (parameters.pop(key, None) or {}).items():
                if defs.setdefault(name, schema) != schema:
                    raise ValueError(f"the tools define {key} {name!r} differently")
        items.append({"type": "object",
                      "properties": {"name": {"type": "string", "enum": [fn["name"]]},
                                     "parameters": parameters},
                      "required": ["name", "parameters"], "additionalProperties": False})
    return {"type": "array", "minItems": 1, "items": {"anyOf": items},
            **{key: defs for key, defs in top.items() if defs}}


def new_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


class ToolCalls:
    """One response's tool calls. ``named``: the function tool_choice names (None:
    "required"); ``parallel``: False keeps the first call only (``parallel_tool_calls``)."""

    def __init__(self, named: str | None, parallel: bool = True) -> None:
        self.named = named
        self.parallel = parallel
        self._streams: dict[int, _CallStream] = {}

    @property
    def chooses(self) -> bool:
        """Does the model choose the calls ("required": whole calls finish "tool_calls"; a
        forced call keeps "stop", as vLLM)?"""
        return self.named is None

    def whole(self, text: str) -> tuple[str | None, list[dict[str, Any]] | None]:
        """(content, calls) of a whole reply: no content; calls None if it is not one (cut short,
        by max_tokens or a stop string), and then the text is the content."""
        if self.named is not None:  # (no text: it never answered, e.g. cut while thinking)
            return (None, [{"id": new_call_id(), "type": "function",
                            "function": {"name": self.named, "arguments": text}}]) if text \
                else (text, None)
        reader = _CallStream(None)
        calls: dict[int, dict[str, Any]] = {}
        for d in reader.feed(text):
            if "id" in d:
                calls[d["index"]] = {"id": d["id"], "type": "function",
                                     "function": dict(d["function"])}
            else:
                calls[d["index"]]["function"]["arguments"] += d["function"]["arguments"]
        if not reader.complete or not calls:
            return text, None
        return None, list(calls.values())[:None if self.parallel else 1]

    def delta(self, choice: int, text: str, final: bool = False
              ) -> tuple[str, list[dict[str, Any]]]:
        """(content: none, call deltas) of a stream chunk's new text, for one choice."""
        stream = self._streams.setdefault(choice, _CallStream(self.named))
        return "", [d for d in stream.feed(text, final) if self.parallel or d["index"] == 0]

    def called(self, choice: int) -> bool:
        """Has this choice's stream read whole calls (a "required" list to its end)?"""
        stream = self._streams.get(choice)
        return stream is not None and stream.complete


class _CallStream:
    """Reads a reply's text as it streams. Named: all of it is the one call's arguments.
    Required: ``[{"name": "N", "parameters": V}, ...]``, a character at a time: the literals the
    grammar writes, the name (a JSON string), then V, streamed as the call's arguments: an
    object or array up to the bracket that closes it, or a scalar up to the item's "}". Text
    that is not this shape ends the reading (nothing more is streamed)."""

    def __init__(self, named: str | None) -> None:
        self.named = named
        self.id: str | None = None
        self.calls = 0  # calls begun
        self.state = "open"  # open, item, name, parameters, arguments, close, done, broken
        self.expect = "["  # the literal still to read in open / item / parameters
        self.name = ""
        self.depth = 0  # inside the arguments: open braces and brackets
        self.scalar = False  # the arguments are not an object or array
        self.string = JsonString()  # where the arguments' text stands
        self.escaped = False  # in the name: the last character was a backslash

    @property
    def complete(self) -> bool:
        return self.named is not None or self.state == "done"

    def feed(self, text: str, final: bool = False) -> list[dict[str, Any]]:
        if self.named is not None:
            if self.id is None:
                if not text and not final:  # (a chunk with no answer yet: a thinking's)
                    return []
                self.id = new_call_id()
                return [{"index": 0, "id": self.id, "type": "function",
                         "function": {"name": self.named, "arguments": text}}]
            return [{"index": 0, "function": {"arguments": text}}] if text else []
        out: list[dict[str, Any]] = []
        arguments = ""
        for ch in text:
            if self.state == "arguments":
                done, keep = self._argument(ch)
                arguments += ch if keep else ""
                if done:  # (a scalar's end, not kept, is the item's "}")
                    out.append(self._arguments(arguments))
                    arguments, self.state = "", "close"
                continue
            self._step(ch, out)
        if arguments:
            out.append(self._arguments(arguments))
        return out

    def _arguments(self, text: str) -> dict[str, Any]:
        return {"index": self.calls - 1, "function": {"arguments": text}}

    def _step(self, ch: str, out: list[dict[str, Any]]) -> None:
        if self.state in ("open", "item", "parameters"):
            if ch != self.expect[0]:
                self.state = "broken"
                return
            self.expect = self.expect[1:]
            if not self.expect:
                self.state = {"open": "item", "item": "name", "parameters": "arguments"}[
                    self.state]
                self.expect = _ITEM if self.state == "item" else ""
                self.depth, self.scalar, self.string = 0, False, JsonString()
        elif self.state == "name":
            if self.escaped:
                self.escaped = False
            elif ch == "\\":
                self.escaped = True
            elif ch == '"':
                try:
                    name = json.loads(f'"{self.name}"')
                except ValueError:
                    self.state = "broken"
                    return
                out.append({"index": self.calls, "id": new_call_id(), "type": "function",
                            "function": {"name": name, "arguments": ""}})
                self.calls += 1
                self.name, self.state, self.expect = "", "parameters", _PARAMETERS
                return
            self.name += ch
        elif self.state == "close":  # the item's "}" (read already after a scalar), ", " or "]"
            if ch in ",}":
                return
            if ch == " ":
                self.state, self.expect = "item", _ITEM
            elif ch == "]":
                self.state = "done"
            else:
                self.state = "broken"

    def _argument(self, ch: str) -> tuple[bool, bool]:
        """(do the arguments end with ``ch``, is ``ch`` theirs)."""
        first = self.depth == 0 and not self.scalar
        if first and ch not in "{[":
            self.scalar = True  # a string, number, true/false/null: up to the item's "}"
        if not self.string.read(ch):  # (in a string, or its quotes)
            return False, True
        if self.scalar:
            if ch == "}" and self.depth == 0:
                return True, False
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            self.depth -= 1
            return self.depth == 0, True
        return False, True
