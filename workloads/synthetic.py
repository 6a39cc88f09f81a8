"""Synthetic multi-turn conversations with chosen length distributions, text measured exactly.

Text is random common words, each of which is one token alone and after a space, so a text of
n words is n tokens under byte-level BPE tokenizers (cl100k, Llama 3) whose pre-tokenizer splits
" word" pieces apart; it is measured anyway and the measured count is what the trace records
(other tokenizers may differ by a few tokens). Random words keep conversations from sharing
prefixes by accident, which would flatter prefix caching.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fairswitch.bench.trace import Conversation, Turn
from workloads.dists import Dist, stream_rng
from workloads.tokens import TURN_OVERHEAD_TOKENS, Limits, clip_texts, count_tokens, turns_within

_WORDS = """
time year people way day man thing woman life child world school state family student group
country problem hand part place case week company system program question work government
number night point home water room mother area money story fact month lot right study book eye
job word business issue side kind head house service friend father power hour game line end
member law car city community name president team minute idea kid body information back parent
face others level office door health person art war history party result change morning reason
research girl guy moment air teacher force education foot boy age policy music market sense
nation plan college interest death experience effect use class control care field development
role effort rate heart drug show leader light voice wife police mind price report decision son
view relationship town road arm difference value building action model season society tax
director position player record paper space ground form event official matter center couple site
project activity star table need court oil situation cost industry figure street image phone
data picture practice piece land product doctor wall patient worker news test movie north love
support technology step baby computer type attention film tree source organization hair window
evidence population truth song economy
""".split()

_STREAM = 10  # stream_rng key of the synthetic builder (streams.py uses 1..3)


@dataclass(frozen=True, slots=True)
class Shape:
    """Distributions of one conversation's shape; samples are clipped to the Limits."""

    turns: Dist = field(default_factory=lambda: Dist("fixed", (2.0,)))
    input_tokens: Dist = field(default_factory=lambda: Dist("lognormal", (128.0, 0.8)))
    output_tokens: Dist = field(default_factory=lambda: Dist("lognormal", (128.0, 0.8)))


def word_pool(tokenizer: Any) -> list[str]:
    """The words that are exactly one token both alone and after a space."""
    alone = count_tokens(tokenizer, _WORDS)
    spaced = count_tokens(tokenizer, [" " + w for w in _WORDS])
    pool = [w for w, a, s in zip(_WORDS, alone, spaced) if a == 1 and s == 1]
    if len(pool) < 16:
        raise ValueError(f"the tokenizer splits almost every common word ({len(pool)} of "
                         f"{len(_WORDS)} are one token): synthetic text would not be exact")
    return pool


def make_texts(tokenizer: Any, rng: np.random.Generator, pool: list[str],
               lengths: list[int]) -> list[tuple[str, int]]:
    """(text, measured tokens) per wanted length; never more tokens than wanted."""
    words = rng.choice(pool, size=sum(lengths))
    starts = np.cumsum([0, *lengths])
    texts = [" ".join(words[a:b]) for a, b in zip(starts, starts[1:])]
    out = []
    for text, n, want in zip(texts, count_tokens(tokenizer, texts), lengths):
        if n > want:  # a tokenizer that merges across words: cut back to the wanted length
            text, n = clip_texts(tokenizer, [text], want)[0]
        out.append((text, n))
    return out


def synthetic_conversations(num: int, shape: Shape, limits: Limits, tokenizer: Any,
                            seed: int) -> list[Conversation]:
    """``num`` conversations ``syn-00000``.. (arrival 0, no think time: see streams.py)."""
    one_turn = limits.max_input_tokens + limits.max_output_tokens + TURN_OVERHEAD_TOKENS
    if one_turn > limits.max_context:
        raise ValueError(f"max_context ({limits.max_context}) must hold one whole turn: "
                         f"max_input_tokens + max_output_tokens + {TURN_OVERHEAD_TOKENS}")
    rng = stream_rng(seed, _STREAM)
    pool = word_pool(tokenizer)
    num_turns = shape.turns.sample_int(rng, num, 1, limits.max_turns)
    total = int(num_turns.sum())
    ins = shape.input_tokens.sample_int(rng, total, 1, limits.max_input_tokens).tolist()
    outs = shape.output_tokens.sample_int(rng, total, 1, limits.max_output_tokens).tolist()
    users = make_texts(tokenizer, rng, pool, ins)
    replies = make_texts(tokenizer, rng, pool, outs)
    convs, start = [], 0
    for i, k in enumerate(num_turns.tolist()):
        us, rs = users[start:start + k], replies[start:start + k]
        start += k
        keep = turns_within([(a, b) for (_, a), (_, b) in zip(us, rs)], limits.max_context)
        turns = [Turn(user=u, assistant=r, input_tokens=n_in, output_tokens=n_out)
                 for (u, n_in), (r, n_out) in zip(us[:keep], rs[:keep])]
        convs.append(Conversation(id=f"syn-{i:05d}", arrival_s=0.0, turns=turns))
    return convs
