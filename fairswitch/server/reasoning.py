"""Reasoning models' thinking apart from their answer (vLLM's ``--reasoning-parser NAME``): a chat
reply's text before ``</think>`` is its ``reasoning``, the rest its ``content``, whole and, in a
stream, delta by delta. Two parsers, as vLLM's:

- ``deepseek_r1`` (DeepSeek-R1 and its distillations, QwQ, Qwen3-2507's thinking models: their
  templates open the thinking in the prompt): the reply thinks from its start (a ``<think>`` it
  writes itself is dropped) up to ``</think>``; a reply that never closes it is all reasoning
  (cut short while thinking).
- ``qwen3`` (Qwen3's hybrid models): a reply that begins with ``<think>`` thinks up to
  ``</think>``; one that does not (thinking switched off, ``enable_thinking: false``) is all
  content. (vLLM's also reads a reply with only ``</think>`` as thinking up to it; models that
  write so take ``deepseek_r1`` here.)

One reader serves a whole reply and a stream, so the two agree however the text is cut; only
what may be the start of a tag is held back. The answer keeps its text as written (the blank
line after ``</think>`` included, as vLLM's). ``count`` tells how many of a reply's tokens are its
thinking (usage's ``reasoning_tokens``).
"""

from __future__ import annotations

from collections.abc import Iterable

from fairswitch.server.text_scan import held_back

PARSERS = ("deepseek_r1", "qwen3")

_OPEN, _CLOSE = "<think>", "</think>"


class _Reader:
    """One reply's text fed piece by piece: (reasoning, content) of what can be told so far."""

    def __init__(self, name: str, opened_only: bool = False) -> None:
        self.name = name
        self.opened_only = opened_only  # thinking only after <think>, whatever the parser
        self.state = "start"  # start (nothing told yet), thinking, answering
        self.thought = False  # has it thought (reasoning, if empty, is "" rather than none)
        self.buffer = ""

    def feed(self, text: str, final: bool) -> tuple[str, str]:
        self.buffer += text
        reasoning = ""
        if self.state == "start":
            head = self.buffer.lstrip()
            if not final and _OPEN.startswith(head):
                return "", ""  # (it may yet open with the tag)
            if head.startswith(_OPEN):
                self.buffer = head[len(_OPEN):]
            thinking = head.startswith(_OPEN) or (self.name == "deepseek_r1"
                                                  and not self.opened_only)
            self.state = "thinking" if thinking else "answering"
            self.thought = thinking
        if self.state == "thinking":
            end = self.buffer.find(_CLOSE)
            if end < 0:
                keep = 0 if final else held_back(self.buffer, _CLOSE)
                cut = len(self.buffer) - keep
                reasoning, self.buffer = self.buffer[:cut], self.buffer[cut:]
                return reasoning, ""
            reasoning = self.buffer[:end]
            self.state, self.buffer = "answering", self.buffer[end + len(_CLOSE):]
        content, self.buffer = self.buffer, ""
        return reasoning, content


class Reasoning:
    """One response's replies split by the parser ``name`` (one of ``PARSERS``); ``include``:
    the reply shows the reasoning (vLLM's ``include_reasoning``), else leaves it out;
    ``opened_only``: a reply thinks only if it opens with ``<think>`` (one held to a structure,
    which says whether it thinks: a JSON reply is all answer)."""

    def __init__(self, name: str, include: bool = True, opened_only: bool = False) -> None:
        if name not in PARSERS:
            raise ValueError(f"unknown reasoning parser {name!r} (known: {', '.join(PARSERS)})")
        self.name = name
        self.include = include
        self.opened_only = opened_only
        self._readers: dict[int, _Reader] = {}

    def whole(self, text: str) -> tuple[str | None, str]:
        """(reasoning, content) of a whole reply; reasoning None if it did not think."""
        reader = _Reader(self.name, self.opened_only)
        reasoning, content = reader.feed(text, final=True)
        return (reasoning if reader.thought else None), content

    def delta(self, choice: int, text: str, final: bool) -> tuple[str, str]:
        """(reasoning, content) of a stream chunk's new text, for one choice."""
        reader = self._readers.setdefault(choice, _Reader(self.name, self.opened_only))
        return reader.feed(text, final)

    def count(self, pieces: Iterable[str]) -> int:
        """How many of a reply's tokens (their texts ``pieces``, in order) are its thinking: up
        to the one that closes it, that one included (all of them if it never closes); 0 if the
        reply did not think."""
        pieces = list(pieces)
        reader = _Reader(self.name, self.opened_only)
        for n, piece in enumerate(pieces, 1):
            reader.feed(piece, final=n == len(pieces))
            if reader.state == "answering":
                return n if reader.thought else 0
        return len(pieces) if reader.thought else 0
