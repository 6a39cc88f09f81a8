"""Whole multi-turn ShareGPT conversations as trace conversations (timing is applied later).

ShareGPT messages are messy: several role names, system prompts, consecutive messages of one role
(a user who pressed enter twice, a reply split by "continue"), conversations that open with the
assistant or end on an unanswered user message. ``normalize_messages`` turns one into strict
(user, assistant) exchanges; ``iter_sharegpt_conversations`` clips each message to a token budget,
keeps the earliest turns that fit a context window and measures every count with the tokenizer.

A turn's context is its whole history plus its own prompt and answer, so the window a
conversation needs is sum(input + output + TURN_OVERHEAD_TOKENS) over its turns; the assistant
text kept as history is clipped to the turn's ``output_tokens``, so the history a later turn
resends is the length the engine generated.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

from fairswitch.bench.trace import Conversation, Turn
from workloads import sharegpt
from workloads.tokens import Limits, clip_texts, turns_within

# None: dropped (a system prompt is not a turn of the dialogue).
_ROLES: dict[str, str | None] = {
    "human": "user", "user": "user",
    "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
    "assistant": "assistant",
    "system": None,
}


def normalize_messages(messages: list[dict[str, Any]]) -> list[tuple[str, str]] | None:
    """(user, assistant) exchanges of one ShareGPT conversation; None if a role is unknown.

    Empty messages and system prompts are dropped, consecutive messages of one role merged
    (blank line between), leading assistant messages and a trailing unanswered user dropped.
    """
    merged: list[tuple[str, str]] = []  # (role, text)
    for msg in messages:
        role = _ROLES.get(str(msg.get("from", "")).strip().lower(), "?")
        if role == "?":
            return None
        text = msg.get("value")
        if role is None or not isinstance(text, str) or not text.strip():
            continue
        if merged and merged[-1][0] == role:
            merged[-1] = (role, merged[-1][1] + "\n\n" + text)
        elif merged or role == "user":
            merged.append((role, text))
    return [(u, a) for (_, u), (_, a) in zip(merged[::2], merged[1::2])]


def fit_turns(exchanges: list[tuple[str, str]], tokenizer: Any, limits: Limits) -> list[Turn]:
    """Clipped, measured turns; the earliest ones that fit ``limits.max_context``.

    With ``trim`` off, a conversation that does not fit whole gives no turns. A message that
    clips to nothing (a cut inside its first character) ends the conversation there.
    """
    exchanges = exchanges[: limits.max_turns]
    users = clip_texts(tokenizer, [u for u, _ in exchanges], limits.max_input_tokens)
    replies = clip_texts(tokenizer, [a for _, a in exchanges], limits.max_output_tokens)
    lengths = [(n_in, n_out) for (_, n_in), (_, n_out) in zip(users, replies)]
    num = turns_within(lengths, limits.max_context)
    if num < len(exchanges) and not limits.trim:
        return []
    return [Turn(user=u, assistant=a, input_tokens=n_in, output_tokens=n_out)
            for (u, n_in), (a, n_out) in zip(users[:num], replies[:num])]


def iter_sharegpt_conversations(tokenizer: Any, limits: Limits,
                                stats: Counter[str] | None = None) -> Iterator[Conversation]:
    """Conversations in file order (arrival 0, no think time), skipping what does not qualify.

    ``stats`` counts what happened to each conversation read, for trace_meta: scanned,
    bad_role, bad_id (missing or repeated), too_few_turns, trimmed.
    """
    stats = stats if stats is not None else Counter()
    seen: set[str] = set()
    for raw in sharegpt.iter_conversations():
        stats["scanned"] += 1
        cid = str(raw.get("id", ""))
        exchanges = normalize_messages(raw.get("conversations") or [])
        if exchanges is None:
            stats["bad_role"] += 1
            continue
        if not cid or cid in seen:
            stats["bad_id"] += 1
            continue
        enough = len(exchanges) >= limits.min_turns
        turns = fit_turns(exchanges, tokenizer, limits) if enough else []
        if len(turns) < limits.min_turns:
            stats["too_few_turns"] += 1
            continue
        if len(turns) < len(exchanges):
            stats["trimmed"] += 1
        seen.add(cid)
        yield Conversation(id=f"sharegpt-{cid}", arrival_s=0.0, turns=turns)
