"""Structured output: a reply held to a JSON schema, to any JSON object, to a regular expression,
to one of several strings, to an EBNF grammar, or to a structural tag (free text whose triggers
open structures), as vLLM's ``StructuredOutputsParams`` (and the OpenAI API's
``response_format``) ask for.

Each such request carries a grammar matcher (xgrammar, the library vLLM and SGLang use; the
optional dependency ``fairswitch[structured]``): before each of its tokens is sampled, the
matcher's bitmask leaves only the tokens that keep the text a prefix of the language (the
sampler, ``runner/sampler.py``); each token sampled is fed back to it (``output_processor.py``),
and once the grammar is complete only an end-of-sequence token is left. So the next token needs
the previous one: the engine does not launch a step for such a request before the step before
it has been collected (as for penalties).

Grammars compile when a request is added (a bad schema or regex is the request's ValueError),
once per distinct specification (cached, up to ``CACHE_LIMIT_BYTES``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

KINDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")
CACHE_LIMIT_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Exactly one of: ``json`` (a JSON schema, as a dict or its JSON text), ``json_object``
    (any JSON object), ``regex``, ``choice`` (the reply is one of these strings), ``grammar``
    (EBNF, in xgrammar's GBNF dialect) or ``structural_tag`` (xgrammar's, as vLLM takes it: an
    object or its JSON text, ``{"structures": [{"begin", "schema", "end"}, ...], "triggers":
    [...]}``, where the reply is free text until it writes a trigger, the start of some
    structure's ``begin``, then held to that begin, a JSON value of its schema and its end;
    or xgrammar's newer ``{"type": "structural_tag", "format": {...}}``). ``after``: the reply
    is held only after it has written this text (a reasoning model's ``"</think>"``: its thinking is free, its answer held, as
    vLLM holds a reasoning model's); the token that completes it is free too. ``opens``: with
    ``after``, the reply is held from its first token unless that token is this text (a hybrid
    model's ``"<think>"``, which it may or may not write): then it is free up to ``after``. A
    text that is not one token of the vocabulary cannot open it: the reply is held throughout."""

    json: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | tuple[str, ...] | None = None
    grammar: str | None = None
    structural_tag: dict[str, Any] | str | None = None
    after: str | None = None
    opens: str | None = None

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"structured outputs take exactly one of {', '.join(KINDS)}, got "
                             f"{', '.join(given) or 'none'}")
        if not isinstance(self.json_object, bool):
            raise TypeError(f"json_object must be a bool, got {self.json_object!r:.40}")
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise TypeError(f"json must be a JSON schema (an object or its text), got "
                            f"{type(self.json).__name__}")
        for name in ("regex", "grammar", "after", "opens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise TypeError(f"{name} must be a non-empty string, got {value!r:.40}")
        if self.structural_tag is not None:
            _check_structural_tag(self.structural_tag)
        if self.opens is not None and self.after is None:
            raise ValueError("opens needs after: the text that ends what it opens")
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or not all(isinstance(c, str) and c for c in self.choice)):
                raise TypeError(f"choice must be a non-empty list of non-empty strings, got "
                                f"{self.choice!r:.60}")
            object.__setattr__(self, "choice", tuple(self.choice))

    def spec(self) -> tuple[str, str]:
        """(kind, text): what compiles, hashable."""
        if self.json is not None:
            # (in the schema's order: fields come out in the order its properties list them)
            text = self.json if isinstance(self.json, str) else json.dumps(self.json)
            return "json", text
        if self.json_object:
            return "json_object", ""
        if self.regex is not None:
            return "regex", self.regex
        if self.choice is not None:
            # A choice is a grammar of literal alternatives (JSON escapes are GBNF's too).
            return "grammar", "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False)
                                                       for c in self.choice)
        if self.structural_tag is not None:
            tag = self.structural_tag
            return "structural_tag", tag if isinstance(tag, str) else json.dumps(tag)
        return "grammar", self.grammar  # type: ignore[return-value]


def _newer_structural_tag(tag: dict[str, Any]) -> str:
    """xgrammar's newer form of a structural tag (the JSON text it compiles). The first form's
    JSON values take at most one whitespace character in a row (its own rule is any, which
    lets a model pad a value with blank lines up to max_tokens, as plain JSON output would)."""
    if "structures" not in tag:
        return json.dumps(tag)
    return json.dumps({"type": "structural_tag", "format": {
        "type": "triggered_tags", "triggers": tag["triggers"],
        "tags": [{"begin": s["begin"], "end": s["end"], "content": {
            "type": "json_schema", "json_schema": s["schema"], "max_whitespace_cnt": 1}}
            for s in tag["structures"]]}})


def _check_structural_tag(tag: Any) -> None:
    """TypeError/ValueError unless ``tag`` is an object (or its JSON text) of one of the two
    forms; the newer form's inside is xgrammar's to check when it compiles."""
    if isinstance(tag, str):
        try:
            tag = json.loads(tag)
        except ValueError as e:
            raise ValueError(f"structural_tag is not JSON: {e}") from None
    if not isinstance(tag, dict):
        raise TypeError(f"structural_tag must be an object (or its JSON text), got "
                        f"{type(tag).__name__}")
    if "structures" not in tag:
        if tag.get("type") != "structural_tag" or "format" not in tag:
            raise ValueError('structural_tag must have "structures" and "triggers", or be '
                             '{"type": "structural_tag", "format": {...}}')
        return
    structures, triggers = tag["structures"], tag.get("triggers")
    if not isinstance(structures, list) or not structures or not all(
            isinstance(s, dict) and isinstance(s.get("begin"), str) and s["begin"]
            and isinstance(s.get("end"), str) and isinstance(s.get("schema"), (dict, bool))
            for s in structures):
        raise TypeError('structural_tag.structures must be a non-empty list of {"begin": '
                        'text, "schema": a JSON schema, "end": text}')
    if not isinstance(triggers, list) or not triggers or not all(
            isinstance(t, str) and t for t in triggers):
        raise TypeError("structural_tag.triggers must be a non-empty list of non-empty strings")
    if untriggered := [s["begin"] for s in structures
                       if not any(s["begin"].startswith(t) for t in triggers)]:
        raise ValueError(f"structural_tag: no trigger begins the structure {untriggered[0]!r} "
                         "(each structure's begin starts with one of the triggers)")


def _xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError as e:
        raise ValueError("structured output needs xgrammar: pip install "
                         "'fairswitch[structured]'") from e
    return xgrammar


class GrammarCompiler:
    """Grammar matchers for one engine's tokenizer and vocabulary (the logits' width)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: set[int]) -> None:
        self._xgr = _xgrammar()
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        info = _tokenizer_info(self._xgr, tokenizer, vocab_size, sorted(eos_token_ids))
        # Compiled grammars are cached by the library, within a bound: each client's distinct
        # schema would otherwise be kept for good (vLLM bounds it alike).
        self._compiler = self._xgr.GrammarCompiler(info, cache_limit_bytes=CACHE_LIMIT_BYTES)

    def _compile(self, kind: str, text: str) -> Any:
        c = self._compiler
        # JSON in one line, ", " and ": " between items: any whitespace lets a model pad the
        # reply with blank lines up to max_tokens (and small models do).
        if kind == "json":
            return c.compile_json_schema(text, any_whitespace=False)
        if kind == "json_object":  # an object, as OpenAI's json_object mode (vLLM likewise)
            return c.compile_json_schema('{"type": "object"}', any_whitespace=False)
        if kind == "regex":
            return c.compile_regex(text)
        if kind == "structural_tag":
            return c.compile_structural_tag(_newer_structural_tag(json.loads(text)))
        return c.compile_grammar(text)

    def matcher(self, params: StructuredOutputsParams) -> Any:
        """A fresh matcher for one request; ValueError if its specification does not compile."""
        kind, text = params.spec()
        try:
            compiled = self._compile(kind, text)
        except (RuntimeError, ValueError, TypeError) as e:  # xgrammar's errors are these
            what = {"json": "JSON schema", "regex": "regex", "grammar": "grammar",
                    "structural_tag": "structural tag"}.get(kind, kind)
            # (the library's message starts with its time and source line)
            why = re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", str(e).strip().splitlines()[-1])
            raise ValueError(f"structured outputs: the {what} does not compile: "
                             f"{why[:300]}") from None
        matcher = self._xgr.GrammarMatcher(compiled)
        if params.after is not None:
            opener = None
            if params.opens is not None:
                ids = self._tokenizer.encode(params.opens, add_special_tokens=False)
                opener = ids[0] if len(ids) == 1 else -1  # (-1: no token opens it)
            return HeldAfter(matcher, params.after, self._tokenizer.decode, opener)
        return matcher

    def allows_any(self, matcher: Any, token_ids: list[int]) -> bool:
        """Whether a fresh ``matcher`` lets one of ``token_ids`` begin the reply (it is not
        advanced: filling a bitmask reads its state)."""
        import torch

        bitmask = self._xgr.allocate_token_bitmask(1, self._vocab_size)
        matcher.fill_next_token_bitmask(bitmask, 0)
        ids = torch.tensor([t for t in token_ids if t < self._vocab_size], dtype=torch.long)
        return bool(((bitmask[0, ids // 32] >> (ids % 32).to(torch.int32)) & 1).any())

    def apply(self, logits: Any, rows: list[int], matchers: list[Any]) -> None:
        """Mask ``logits`` (in place) at ``rows`` to what each matcher allows next."""
        xgr = self._xgr
        bitmask = xgr.allocate_token_bitmask(logits.shape[0], logits.shape[-1])
        for row, matcher in zip(rows, matchers):
            matcher.fill_next_token_bitmask(bitmask, row)
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=rows)


def _tokenizer_info(xgr: Any, tokenizer: Any, vocab_size: int, stop_ids: list[int]) -> Any:
    """xgrammar's view of a tokenizer: transformers' tokenizers it reads itself; this package's
    (model/tokenizer.py: the Rust tokenizer.json) as transformers' fast tokenizers are read."""
    backend = getattr(tokenizer, "_tok", None)
    if backend is None:
        return xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=stop_ids or None)
    vocab = backend.get_vocab(with_added_tokens=True)
    encoded = [""] * vocab_size
    for token, idx in vocab.items():
        if idx < vocab_size:
            encoded[idx] = token
    metadata = xgr.TokenizerInfo._detect_metadata_from_hf(backend.to_str())
    return xgr.TokenizerInfo(encoded, vocab_type=metadata["vocab_type"], vocab_size=vocab_size,
                             stop_token_ids=stop_ids or None,
                             add_prefix_space=metadata["add_prefix_space"])


class HeldAfter:
    """A matcher that holds the reply only once it has written ``after``: until then every token
    is allowed and none is fed to the grammar (a reasoning model thinks freely, then answers in
    the structure). Tokens are read as text one at a time (``decode``), so ``after`` is found
    whatever tokens write it. ``opener``: the reply is free only if its first token is this one
    (the rest held from the start); -1: never free; None: free from the start."""

    def __init__(self, matcher: Any, after: str, decode: Any, opener: int | None = None) -> None:
        self.matcher = matcher
        self.after = after
        self.decode = decode
        self.opener = opener
        self.text = ""  # written so far, while free (the tail that may begin ``after``)
        # free, opening (its first token decides), held
        self.state = "free" if opener is None else "held" if opener < 0 else "opening"

    @property
    def free(self) -> bool:
        return self.state == "free"

    def fill_next_token_bitmask(self, bitmask: Any, row: int) -> None:
        if self.free:
            bitmask[row].fill_(-1)  # (every bit set: every token allowed)
            return
        self.matcher.fill_next_token_bitmask(bitmask, row)
        if self.state == "opening":  # the structure's first tokens, or the opener
            word, bit = divmod(self.opener, 32)
            bitmask[row, word] |= (1 << bit) if bit < 31 else -(1 << 31)  # (int32 words)

    def accept_token(self, token_id: int) -> bool:
        if self.state == "opening":
            self.state = "free" if token_id == self.opener else "held"
            if self.free:
                return True
        if not self.free:
            return self.matcher.accept_token(token_id)
        self.text += self.decode([token_id])
        if self.after in self.text:
            self.state = "held"
        else:
            self.text = self.text[-len(self.after):]  # (only what may still complete it)
        return True

    def is_terminated(self) -> bool:
        return self.state == "held" and self.matcher.is_terminated()


def holds(matcher: Any) -> bool:
    """Does ``matcher`` hold the next token (a ``HeldAfter`` still free does not)?"""
    return matcher is not None and not getattr(matcher, "free", False)
