"""tool_choice "auto": the model decides whether to call a tool, in its own syntax, and a parser
named at startup reads the calls out of its reply (vLLM's ``--enable-auto-tool-choice
--tool-call-parser NAME``). Four syntaxes, the most used:

- ``hermes`` (Qwen2.5/Qwen3, Hermes, and most models trained on its format): text, then calls
  each written ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.
- ``llama3_json`` (Llama 3.1-3.3): a reply that begins with a JSON object (after
  ``<|python_tag|>``, if the tokenizer keeps it) ``{"name": ..., "parameters": {...}}``, several
  separated by ``;``. A reply that begins otherwise is text.
- ``mistral`` (Mistral, Mixtral, Mistral Small, Magistral, Devstral): text, then ``[TOOL_CALLS]``
  and either a JSON list ``[{"name": ..., "arguments": {...}}, ...]`` (tokenizers before v11)
  or ``name[ARGS]{...}``, each call after its own ``[TOOL_CALLS]`` (v11 and later). The marker
  is a special token: such requests keep special tokens in the text, as vLLM's.
- ``pythonic`` (Llama 3.2 and 4, ToolACE...): a reply that begins with a Python list of calls
  with keyword arguments of literal values, ``[get_weather(city="Paris"), now()]`` (inside
  ``<|python_start|>`` ... ``<|python_end|>``, if the tokenizer keeps them). A reply that begins
  otherwise, or a list that is not all such calls, is text.

One reader serves a whole reply and a stream, so the two agree however the text is cut: text
goes out as content as it comes, holding back only what may be the start of a call; a call goes
out whole (id, name and its arguments as JSON) once its end is read. What is not a well-formed
call, a call cut short by max_tokens included, is given as content: nothing the model wrote is
lost. Whitespace between calls is not content.
"""

from __future__ import annotations

import ast
import json
from typing import Any

from fairswitch.server.text_scan import JsonString, PythonString, held_back
from fairswitch.server.tool_calls import new_call_id
from fairswitch.unicode_text import lone_surrogate

PARSERS = ("hermes", "llama3_json", "mistral", "pythonic")

_HERMES_OPEN, _HERMES_CLOSE = "<tool_call>", "</tool_call>"
_PYTHON_TAG = "<|python_tag|>"


def _call(obj: Any, arguments_keys: tuple[str, ...]) -> tuple[str, str] | None:
    """(name, arguments as JSON text) of a decoded call; None if it is not one: a name and
    the arguments (under one of ``arguments_keys``) both, so that a JSON answer with a "name"
    field stays the answer (vLLM's parsers likewise)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    key = next((key for key in arguments_keys if key in obj), None)
    if key is None:
        return None
    arguments = obj[key]
    if isinstance(arguments, str):  # (some models write the arguments as a JSON string)
        try:
            if isinstance(json.loads(arguments), dict):
                return obj["name"], arguments
        except (ValueError, RecursionError):
            pass
    text = _json_text(arguments)
    return None if text is None else (obj["name"], text)


def _json_text(value: Any) -> str | None:
    """``value`` as strict JSON text (None if it holds NaN or an infinity, which no strict
    parser reads); a lone \ud800 escape stays escaped (not UTF-8)."""
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (ValueError, TypeError, RecursionError):
        return None
    return json.dumps(value, allow_nan=False) if lone_surrogate(text) is not None else text


def _decoded(text: str) -> Any:
    """``text`` as strict JSON; None if it is not (NaN, Infinity), or nests too deeply for
    the decoder."""
    try:
        return json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        return None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class _ObjectEnd:
    """Finds where the bracketed value at the start of a growing text closes (a JSON object
    or list; with ``python``, a Python list, its parentheses counted too), reading each
    character once however the text is fed (strings and their escapes are skipped)."""

    def __init__(self, python: bool = False) -> None:
        self.at = 0  # characters read
        self.depth = 0
        self.string = PythonString() if python else JsonString()
        self.opening, self.closing = ("([{", ")]}") if python else ("{[", "}]")

    def end(self, text: str) -> int | None:
        """The index past the value that opens at ``text[0]``; None if it has not closed."""
        for i in range(self.at, len(text)):
            ch = text[i]
            if not self.string.read(ch):
                continue
            if ch in self.opening:
                self.depth += 1
            elif ch in self.closing:
                self.depth -= 1
                if self.depth == 0:
                    self.at = i + 1
                    return i + 1
        self.at = len(text)
        return None


def _after_tag(reply: str, tag: str, final: bool) -> str | None:
    """What follows the whitespace and ``tag`` (if there) a reply begins with; None while that
    cannot be told yet (nothing but whitespace, or the start of the tag, so far)."""
    head = reply.lstrip()
    tagged = head.startswith(tag)
    if tagged:
        head = head[len(tag):].lstrip()
    if not final and (not head or not tagged and tag.startswith(head)):
        return None
    return head


class _Reader:
    """One reply's text, fed piece by piece: ``feed`` returns (content, calls) for what can be
    told so far, each call (name, arguments); ``final`` says the reply has ended, and then all
    of the text is told."""

    def __init__(self) -> None:
        self.buffer = ""  # text not told yet
        self.calls = 0  # calls read so far

    def feed(self, text: str, final: bool) -> tuple[str, list[tuple[str, str]]]:
        raise NotImplementedError


class _TextAndCalls(_Reader):
    """A reader of text with calls among it (hermes, mistral)."""

    def __init__(self) -> None:
        super().__init__()
        self.talking = False  # text (not whitespace alone) has come since the last call

    def _text(self, piece: str) -> str:
        """What of ``piece`` is content: after a call, whitespace alone is not, until text
        comes."""
        if self.calls == 0 or self.talking or piece.strip():
            self.talking = self.calls > 0
            return piece
        return ""


class _Hermes(_TextAndCalls):

    def feed(self, text: str, final: bool) -> tuple[str, list[tuple[str, str]]]:
        self.buffer += text
        content = ""
        calls: list[tuple[str, str]] = []
        while self.buffer:
            start = self.buffer.find(_HERMES_OPEN)
            if start < 0:
                keep = 0 if final else held_back(self.buffer, _HERMES_OPEN)
                piece = self.buffer[:len(self.buffer) - keep]
                said = self._text(piece)
                if said or final:
                    content += said
                    self.buffer = self.buffer[len(piece):]
                break  # (else whitespace after a call: content only if text follows)
            content += self._text(self.buffer[:start])
            self.buffer = self.buffer[start:]
            end = self.buffer.find(_HERMES_CLOSE)
            if end < 0:
                if final:  # a call cut short
                    content, self.buffer = content + self.buffer, ""
                break
            block = self.buffer[:end + len(_HERMES_CLOSE)]
            self.buffer = self.buffer[len(block):]
            call = _call(_decoded(block[len(_HERMES_OPEN):-len(_HERMES_CLOSE)]),
                         ("arguments", "parameters"))
            if call is None:
                content += block
            else:
                calls.append(call)
                self.calls += 1
                self.talking = False
        return content, calls


class _Llama3Json(_Reader):
    def __init__(self) -> None:
        super().__init__()
        self.mode = "start"  # start (nothing but whitespace or the tag yet), calls, text
        self.prefix = ""  # the whitespace and tag before the first "{"
        self.scan = _ObjectEnd()  # of the object at the start of the buffer

    def feed(self, text: str, final: bool) -> tuple[str, list[tuple[str, str]]]:
        self.buffer += text
        if self.mode == "start":
            head = _after_tag(self.buffer, _PYTHON_TAG, final)
            if head is None:
                return "", []
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
            if len(rest) != len(self.buffer):
                self.buffer, self.scan = rest, _ObjectEnd()  # (only between objects)
            if not rest:
                return "", calls
            end = self.scan.end(rest) if rest.startswith("{") else -1
            if end is None:
                if final:  # a call cut short
                    self.buffer = ""
                    return self._unread(rest), calls
                return "", calls
            call = _call(_decoded(rest[:end]), ("parameters", "arguments")) if end > 0 else None
            if call is None:  # not a call: the rest of the reply is text
                self.mode, self.buffer = "text", ""
                return self._unread(rest), calls
            calls.append(call)
            self.calls += 1
            self.buffer, self.scan = rest[end:], _ObjectEnd()

    def _unread(self, rest: str) -> str:
        """The text that was not a call, as content: with what came before the first "{" if no
        call was read."""
        return rest if self.calls else self.prefix + rest


def _python_calls(text: str) -> list[tuple[str, str]] | None:
    """The calls of a Python list ``[f(a=1), g()]``, arguments as JSON text; None if ``text``
    is not such a list (positional arguments, values that are not literals...)."""
    try:
        tree = ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    if not isinstance(tree, ast.List) or not tree.elts:
        return None
    calls = []
    for node in tree.elts:  # (a plain name called, as vLLM's parser takes them)
        if not (isinstance(node, ast.Call) and not node.args and isinstance(node.func, ast.Name)
                and all(k.arg is not None for k in node.keywords)):
            return None
        try:
            arguments = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
            return None  # (not literals)
        text_args = _json_text(arguments)
        if text_args is None:  # (not JSON: sets, bytes, complex numbers, NaN...)
            return None
        calls.append((node.func.id, text_args))
    return calls


class _Pythonic(_Reader):
    START, END = "<|python_start|>", "<|python_end|>"

    def __init__(self) -> None:
        super().__init__()
        self.mode = "start"  # start (whitespace or the tag so far), list, text, done
        self.prefix = ""  # what came before the "["
        self.scan = _ObjectEnd(python=True)
        self.closed = False  # the closing tag after the calls has been read

    def feed(self, text: str, final: bool) -> tuple[str, list[tuple[str, str]]]:
        self.buffer += text
        if self.mode == "start":
            head = _after_tag(self.buffer, self.START, final)
            if head is None:
                return "", []
            if head.startswith("["):
                self.prefix = self.buffer[:len(self.buffer) - len(head)]
                self.mode, self.buffer = "list", head
            else:
                self.mode = "text"
        if self.mode == "list":
            end = self.scan.end(self.buffer)
            if end is None:
                if not final:
                    return "", []
                self.mode = "text"  # a list cut short: all of it is text
                self.buffer = self.prefix + self.buffer
            else:
                calls = _python_calls(self.buffer[:end])
                if calls is None:
                    self.mode, self.buffer = "text", self.prefix + self.buffer
                else:
                    self.mode, self.buffer = "done", self.buffer[end:]
                    self.calls = len(calls)
                    return self._after(final), calls
        if self.mode == "done":
            return self._after(final), []
        content, self.buffer = self.buffer, ""
        return content, []

    def _after(self, final: bool) -> str:
        """Text after the calls (and their closing tag, which is not content): content once
        it is more than whitespace."""
        head = self.buffer.lstrip()
        if not self.closed and head.startswith(self.END):
            self.closed, self.buffer = True, head[len(self.END):]
            head = self.buffer.lstrip()
        elif not self.closed and not final and head and self.END.startswith(head):
            return ""  # (maybe the closing tag: not told yet)
        if head:
            self.mode = "text"
            content, self.buffer = self.buffer, ""
            return content
        if final:
            self.buffer = ""
        return ""


class _Mistral(_TextAndCalls):
    """Text, then calls: after ``[TOOL_CALLS]``, a JSON list of calls, or ``name[ARGS]{...}``
    (a ``[TOOL_CALLS]`` before each). What is not a well-formed call is text, from the marker
    on; whitespace after the calls is not content until text follows."""

    MARK, ARGS = "[TOOL_CALLS]", "[ARGS]"

    def __init__(self) -> None:
        super().__init__()
        self.scan = _ObjectEnd()  # of the JSON that starts the buffer, once in a call
        self.in_call = False  # the buffer starts at a call's JSON list or name

    def feed(self, text: str, final: bool) -> tuple[str, list[tuple[str, str]]]:
        self.buffer += text
        content, calls = "", []
        while self.buffer:
            if not self.in_call:
                start = self.buffer.find(self.MARK)
                if start < 0:
                    keep = 0 if final else held_back(self.buffer, self.MARK)
                    piece = self.buffer[:len(self.buffer) - keep]
                    said = self._text(piece)
                    if said or final:
                        content += said
                        self.buffer = self.buffer[len(piece):]
                    break
                content += self._text(self.buffer[:start])
                self.buffer = self.buffer[start:]
                self.in_call, self.scan = True, _ObjectEnd()
            read = self._read_call(final)
            if read is None:  # (the rest has not come)
                break
            if not read:  # not a call: the marker is text, and what follows is read on
                self.in_call = False
                content += self._text(self.MARK)
                self.buffer = self.buffer[len(self.MARK):]
                continue
            calls += read
            self.calls += len(read)
            self.talking = False
        return content, calls

    def _read_call(self, final: bool) -> list[tuple[str, str]] | None:
        """The calls after the marker at the start of the buffer, consumed; [] if they are not
        well formed; None if more text is needed."""
        body = self.buffer[len(self.MARK):]
        head = body.lstrip()
        if not head:
            return [] if final else None
        if head.startswith("["):  # (a JSON list of calls)
            lead = len(self.MARK) + len(body) - len(head)
            end = self.scan.end(head)
            if end is None:
                return [] if final else None
            items = _decoded(head[:end])
            calls = [_call(item, ("arguments", "parameters")) for item in items] \
                if isinstance(items, list) and items else [None]
            if any(c is None for c in calls):
                return []
            self.buffer, self.in_call = self.buffer[lead + end:], False
            return calls  # type: ignore[return-value]
        at = body.find(self.ARGS)
        # (the name, or what there is of it: not the start of [ARGS] that may end it)
        region = body[:len(body) - held_back(body, self.ARGS)] if at < 0 else body[:at]
        name = region.strip()
        if len(name) > 256 or any(ch.isspace() or ch in "[]{}" for ch in name):
            return []  # (no name is like that: this is text)
        if at < 0:
            return [] if final else None
        args = body[at + len(self.ARGS):]
        if not name or not args.lstrip().startswith("{"):
            return [] if args.lstrip() or final else None
        lead = len(self.MARK) + at + len(self.ARGS) + len(args) - len(args.lstrip())
        args = args.lstrip()
        end = self.scan.end(args)
        if end is None:
            return [] if final else None
        call = _call({"name": name, "arguments": _decoded(args[:end])}, ("arguments",))
        if call is None or not isinstance(_decoded(args[:end]), dict):
            return []
        self.buffer, self.in_call = self.buffer[lead + end:], False
        return [call]


_READERS = {"hermes": _Hermes, "llama3_json": _Llama3Json, "mistral": _Mistral,
            "pythonic": _Pythonic}


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
        return content or None, [{"id": new_call_id(), "type": "function",
                                  "function": {"name": name, "arguments": arguments}}
                                 for name, arguments in calls]

    def delta(self, choice: int, text: str, final: bool) -> tuple[str, list[dict[str, Any]]]:
        """(content, call deltas) of a stream chunk's new text, for one choice; ``final``: the
        choice's last chunk."""
        reader = self._readers.setdefault(choice, _READERS[self.name]())
        first = reader.calls
        content, calls = reader.feed(text, final)
        deltas = [{"index": first + i, "id": new_call_id(), "type": "function",
                   "function": {"name": name, "arguments": arguments}}
                  for i, (name, arguments) in enumerate(calls)]
        return content, [d for d in deltas if self.parallel or d["index"] == 0]

    def called(self, choice: int) -> bool:
        """Has this choice's stream made a call?"""
        reader = self._readers.get(choice)
        return reader is not None and reader.calls > 0
