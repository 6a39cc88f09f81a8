"""tool_choice "auto": the model decides whether to call a tool, in its own syntax, and a parser
named at startup reads the calls out of its reply (vLLM's ``--enable-auto-tool-choice
--tool-call-parser NAME``). Two syntaxes, the most used:

- ``hermes`` (Qwen2.5/Qwen3, Hermes, and most models trained on its format): text, then calls
  each written ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.
- ``llama3_json`` (Llama 3.1-3.3): a reply that begins with a JSON object (after
  ``<|python_tag|>``, if the tokenizer keeps it) ``{"name": ..., "parameters": {...}}``, several
  separated by ``;``. A reply that begins otherwise is text.

One reader serves a whole reply and a stream, so the two agree however the text is cut: text
goes out as content as it comes, holding back only what may be the start of a call; a call goes
out whole (id, name and its arguments as JSON) once its end is read. What is not a well-formed
call, a call cut short by max_tokens included, is given as content: nothing the model wrote is
lost. Whitespace between calls is not content.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

PARSERS = ("hermes", "llama3_json")

_HERMES_OPEN, _HERMES_CLOSE = "<tool_call>", "</tool_call>"
_PYTHON_TAG = "<|python_tag|>"


def _new_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def _call(obj: Any, arguments_keys: tuple[str, ...]) -> tuple[str, str] | None:
    """(name, arguments as JSON) of a decoded call; None if it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    arguments = next((obj[key] for key in arguments_keys if key in obj), {})
    if isinstance(arguments, str):  # (some models write the arguments as a JSON string)
        return obj["name"], arguments
    return obj["name"], json.dumps(arguments, ensure_ascii=False)


def _object_end(text: str, start: int) -> int | None:
    """The index past the JSON object that opens at ``text[start]`` ("{"); None if it does not
    close within ``text`` (strings and escapes in them are skipped)."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _held_back(text: str, marker: str) -> int:
    """How many characters at the end of ``text`` may begin ``marker``."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


class _Reader:
    """One reply's text, fed piece by piece: ``feed`` returns (content, calls) for what can be
    told so far, each call (name, arguments); ``final`` says the reply has ended, and then all
    of the text is told."""

    def __init__(self) -> None:
        self.buffer = ""
        self.calls = 0  # calls read so far

    def feed(self, text: str, final: bool) -> tuple[str, list[tuple[str, str]]]:
        self.buffer += text
        content, calls = self._read(final)
        self.calls += len(calls)
        return content, calls

    def _read(self, final: bool) -> tuple[str, list[tuple[str, str]]]:
        raise NotImplementedError


class _Hermes(_Reader):
    def _read(self, final: bool) -> tuple[str, list[tuple[str, str]]]:
        content, calls = "", []

        def text(piece: str) -> str:  # after a call, whitespace alone is not content
            return piece if self.calls + len(calls) == 0 or piece.strip() else ""

        while self.buffer:
            start = self.buffer.find(_HERMES_OPEN)
            if start < 0:
                keep = 0 if final else _held_back(self.buffer, _HERMES_OPEN)
                piece = self.buffer[:len(self.buffer) - keep]
                if not final and not text(piece):
                    break  # (whitespace after a call: content only if text follows)
                content += text(piece)
                self.buffer = self.buffer[len(piece):]
                break
            content += text(self.buffer[:start])
            self.buffer = self.buffer[start:]
            end = self.buffer.find(_HERMES_CLOSE)
            if end < 0:
                if final:  # a call cut short
                    content, self.buffer = content + self.buffer, ""
                break
            block = self.buffer[:end + len(_HERMES_CLOSE)]
            self.buffer = self.buffer[len(block):]
            try:
                call = _call(json.loads(block[len(_HERMES_OPEN):-len(_HERMES_CLOSE)]),
                             ("arguments", "parameters"))
            except ValueError:
                call = None
            if call is None:
                content += block
            else:
                calls.append(call)
        return content, calls


class _Llama3Json(_Reader):
    def __init__(self) -> None:
        super().__init__()
        self.mode = "start"  # start (nothing but whitespace or the tag yet), calls, text
        self.prefix = ""  # the whitespace and tag before the first "{"

    def _read(self, final: bool) -> tuple[str, list[tuple[str, str]]]:
        if self.mode == "start":
            head = self.buffer.lstrip()
            tagged = head.startswith(_PYTHON_TAG)
            if tagged:
                head = head[len(_PYTHON_TAG):].lstrip()
            if not final and (not head or not tagged and _PYTHON_TAG.startswith(head)):
                return "", []  # (not told yet)
            if head.startswith("{"):  # (what came before is told if no call follows)
                self.prefix = self.buffer[:len(self.buffer) - len(head)]
                self.mode, self.buffer = "calls", head
            else:
                self.mode = "text"
        if self.mode == "text":
            content, self.buffer = self.buffer, ""
            return content, []
        calls: list[tuple[str, str]] = []
        while True:
            rest = self.buffer.lstrip().lstrip(";").lstrip()
            if not rest:
                if final:
                    self.buffer = ""
                return "", calls
            end = _object_end(rest, 0) if rest.startswith("{") else -1
            if end is None:
                if final:  # a call cut short
                    self.buffer = ""
                    return self._unread(rest, calls), calls
                self.buffer = rest
                return "", calls
            call = None
            if end > 0:
                try:
                    call = _call(json.loads(rest[:end]), ("parameters", "arguments"))
                except ValueError:
                    pass
            if call is None:  # not a call: the rest of the reply is text
                self.mode, self.buffer = "text", ""
                return self._unread(rest, calls), calls
            calls.append(call)
            self.buffer = rest[end:]


    def _unread(self, rest: str, calls: list) -> str:
        """The text that was not a call, as content: with what came before the first "{" if no
        call was read."""
        return rest if self.calls + len(calls) else self.prefix + rest


_READERS = {"hermes": _Hermes, "llama3_json": _Llama3Json}


class AutoToolCalls:
    """One response's replies under tool_choice "auto", read by the parser ``name`` (one of
    ``PARSERS``). ``parallel``: False keeps the first call only (``parallel_tool_calls``)."""

    chooses = True  # the model chose to call: a reply with calls finishes "tool_calls"

    def __init__(self, name: str, parallel: bool = True) -> None:
        if name not in _READERS:
            raise ValueError(f"unknown tool call parser {name!r} (known: {', '.join(PARSERS)})")
        self.name = name
        self.parallel = parallel
        self._readers: dict[int, _Reader] = {}

    def whole(self, text: str) -> tuple[str | None, list[dict[str, Any]] | None]:
        """(content, calls) of a whole reply: calls None if it makes none."""
        content, calls = _READERS[self.name]().feed(text, final=True)
        calls = calls[:None if self.parallel else 1]
        if not calls:
            return text, None
        return content or None, [{"id": _new_id(), "type": "function",
                                  "function": {"name": name, "arguments": arguments}}
                                 for name, arguments in calls]

    def delta(self, choice: int, text: str, final: bool) -> tuple[str, list[dict[str, Any]]]:
        """(content, call deltas) of a stream chunk's new text, for one choice; ``final``: the
        choice's last chunk."""
        reader = self._readers.setdefault(choice, _READERS[self.name]())
        first = reader.calls
        content, calls = reader.feed(text, final)
        deltas = [{"index": first + i, "id": _new_id(), "type": "function",
                   "function": {"name": name, "arguments": arguments}}
                  for i, (name, arguments) in enumerate(calls)]
        return content, [d for d in deltas if self.parallel or d["index"] == 0]

    def called(self, choice: int) -> bool:
        """Has this choice's stream made a call?"""
        reader = self._readers.get(choice)
        return reader is not None and reader.calls > 0
