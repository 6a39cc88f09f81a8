"""Reading a model's reply as it streams, a character at a time: what of its tail may still be
the start of a marker (``held_back``), and where it stands in JSON text (``JsonString``). Shared
by the readers of tool calls (tool_calls.py, tool_parsers.py) and of thinking (reasoning.py)."""

from __future__ import annotations


def held_back(text: str, marker: str) -> int:
    """How many characters at the end of ``text`` may begin ``marker`` (kept until told)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


class JsonString:
    """Whether JSON text read a character at a time is inside a string (its escapes too)."""

    def __init__(self) -> None:
        self.inside = self.escaped = False

    def read(self, ch: str) -> bool:
        """Read ``ch``; True if it is outside every string (structure, or a scalar's)."""
        if self.inside:
            if self.escaped:
                self.escaped = False
            elif ch == "\\":
                self.escaped = True
            elif ch == '"':
                self.inside = False
            return False
        if ch == '"':
            self.inside = True
            return False
        return True


class PythonString:
    """As JsonString, for Python source: strings quoted by ' or " (their escapes too)."""

    def __init__(self) -> None:
        self.quote = ""  # the open string's quote character, if inside one
        self.escaped = False

    def read(self, ch: str) -> bool:
        """Read ``ch``; True if it is outside every string."""
        if self.quote:
            if self.escaped:
                self.escaped = False
            elif ch == "\\":
                self.escaped = True
            elif ch == self.quote:
                self.quote = ""
            return False
        if ch in "'\"":
            self.quote = ch
            return False
        return True
