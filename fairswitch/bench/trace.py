"""Replayable workload traces: one JSON object per line, one conversation per object.

A single-turn request is a conversation with one turn. Each turn's prompt is the whole history
(earlier user turns and the reference assistant replies) plus its own user message, so every
engine configuration sees the same prompts; ``output_tokens`` is how many tokens the turn asks
for (sent as max_tokens with ignore_eos, as benchmark harnesses do)::

    {"id": "c12", "client": "client-3", "arrival_s": 4.71, "priority": 1,
     "turns": [{"user": "...", "assistant": "...", "input_tokens": 53, "output_tokens": 120,
                "think_s": 0.0},
               {"user": "...", "assistant": "...", "input_tokens": 17, "output_tokens": 88,
                "think_s": 6.2}]}

``arrival_s`` is when the first turn arrives (seconds from the start of the replay); ``think_s``
is the pause between the end of the previous turn's answer and this turn (0 for the first).
``input_tokens`` counts the user message alone, measured with the tokenizer named in the header.
An optional first line ``{"trace_meta": {...}}`` records how the trace was made (command, seed,
tokenizer); readers pass it through. A path ending in ``.gz`` is gzip-compressed JSONL.
"""

from __future__ import annotations

import gzip
import json
import math
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(slots=True)
class Turn:
    user: str
    output_tokens: int
    assistant: str = ""
    input_tokens: int = 0
    think_s: float = 0.0


@dataclass(slots=True)
class Conversation:
    id: str
    arrival_s: float
    turns: list[Turn]
    client: str = "default"
    priority: int = 0

    def messages(self, upto: int) -> list[dict[str, str]]:
        """Chat messages for turn ``upto`` (0-based): the history, then its user message."""
        msgs: list[dict[str, str]] = []
        for turn in self.turns[:upto]:
            msgs.append({"role": "user", "content": turn.user})
            msgs.append({"role": "assistant", "content": turn.assistant})
        msgs.append({"role": "user", "content": self.turns[upto].user})
        return msgs


@dataclass(slots=True)
class Trace:
    conversations: list[Conversation]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_requests(self) -> int:
        return sum(len(c.turns) for c in self.conversations)


class TraceError(ValueError):
    """A trace line that is not a valid conversation; the message names the file and line."""


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise ValueError(what)


def _finite_nonneg(value: Any, name: str) -> float:
    _check(isinstance(value, (int, float)) and not isinstance(value, bool), f"{name} must be a number")
    try:
        number = float(value)
    except OverflowError:  # an integer past a float's range
        raise ValueError(f"{name} must be finite and >= 0, got an integer too large for a "
                         "float") from None
    _check(math.isfinite(number) and number >= 0, f"{name} must be finite and >= 0, got {value}")
    return number


def _int(value: Any, name: str, minimum: int) -> int:
    _check(isinstance(value, int) and not isinstance(value, bool), f"{name} must be an integer")
    _check(value >= minimum, f"{name} must be >= {minimum}, got {value}")
    return value


def _turn(obj: Any, i: int) -> Turn:
    _check(isinstance(obj, dict), f"turns[{i}] must be an object")
    user = obj.get("user")
    _check(isinstance(user, str), f"turns[{i}].user must be a string")
    assistant = obj.get("assistant", "")
    _check(isinstance(assistant, str), f"turns[{i}].assistant must be a string")
    return Turn(user=user, assistant=assistant,
                output_tokens=_int(obj.get("output_tokens"), f"turns[{i}].output_tokens", 1),
                input_tokens=_int(obj.get("input_tokens", 0), f"turns[{i}].input_tokens", 0),
                think_s=_finite_nonneg(obj.get("think_s", 0.0), f"turns[{i}].think_s"))


def parse_conversation(obj: Any) -> Conversation:
    _check(isinstance(obj, dict), "a line must be a JSON object")
    cid = obj.get("id")
    _check(isinstance(cid, str) and cid != "", "id must be a non-empty string")
    turns = obj.get("turns")
    _check(isinstance(turns, list) and len(turns) > 0, "turns must be a non-empty list")
    client = obj.get("client", "default")
    _check(isinstance(client, str) and client != "", "client must be a non-empty string")
    return Conversation(id=cid, client=client,
                        arrival_s=_finite_nonneg(obj.get("arrival_s"), "arrival_s"),
                        priority=_int(obj.get("priority", 0), "priority", -(2**31)),
                        turns=[_turn(t, i) for i, t in enumerate(turns)])


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 is valid JSON, and inf once read
        raise ValueError(f"{text} is out of a float's range")
    return value


def read_trace(path: str | Path) -> Trace:
    """Parse a trace; a bad line raises TraceError naming ``path:line`` and what is wrong."""
    path = Path(path)
    convs: list[Conversation] = []
    meta: dict[str, Any] = {}
    seen: set[str] = set()
    opener = gzip.open if path.suffix == ".gz" else open
    # Bytes, decoded line by line: a line that is not UTF-8 is named like any other bad line.
    with opener(path, "rb") as f:
        for n, line in enumerate(_lines(f, path), 1):
            if not line.strip():
                continue
            try:
                # NaN and Infinity are Python's extensions of JSON: a report repeating the
                # trace's meta could not be written (after the whole run).
                obj = json.loads(line.decode("utf-8"), parse_constant=_not_json,
                                 parse_float=_finite_float)
                if n == 1 and isinstance(obj, dict) and "trace_meta" in obj:
                    meta = dict(obj["trace_meta"])
                    continue
                conv = parse_conversation(obj)
                _check(conv.id not in seen, f"duplicate conversation id {conv.id!r}")
            except (json.JSONDecodeError, ValueError, TypeError) as e:
                raise TraceError(f"{path}:{n}: bad trace line: {e}") from e
            seen.add(conv.id)
            convs.append(conv)
    if not convs:
        raise TraceError(f"{path}: the trace holds no conversations")
    convs.sort(key=lambda c: (c.arrival_s, c.id))
    return Trace(convs, meta)


def _lines(f: Any, path: Path) -> Iterator[bytes]:
    try:
        yield from f
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise TraceError(f"{path}: not a valid gzip file ({e})") from e


def write_trace(path: str | Path, conversations: list[Conversation],
                meta: dict[str, Any] | None = None) -> None:
    """Write atomically (a half-written trace never replaces a good one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    lines = [json.dumps({"trace_meta": meta}, ensure_ascii=False) + "\n"] if meta else []
    lines += [json.dumps(asdict(conv), ensure_ascii=False) + "\n" for conv in conversations]
    data = "".join(lines).encode("utf-8")
    # Multi-turn text compresses ~4x, which keeps committed traces of whole ShareGPT conversations
    # small; mtime=0 so that the same trace gives the same bytes.
    tmp.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)
    tmp.replace(path)
