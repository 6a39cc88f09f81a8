"""Lone UTF-16 surrogates: Python strings may hold them (JSON's ``\\ud800`` escapes decode to one),
but they are not Unicode text, so no tokenizer or encoder takes them. Found here, before a
request is queued, so that the error names them rather than a tokenizer's internals."""

from __future__ import annotations

from typing import Any


def lone_surrogate(value: Any) -> str | None:
    """The first lone surrogate in ``value`` (a string, or dicts and lists of them, keys
    included), or None if every string in it is Unicode text."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode()
            except UnicodeEncodeError as e:
                return item[e.start]
    return None


def not_text_message(char: str) -> str:
    return f"a lone UTF-16 surrogate ({char!a}), which is not Unicode text"
