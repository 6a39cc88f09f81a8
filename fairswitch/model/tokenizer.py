"""A checkpoint's tokenizer, read from its ``tokenizer.json`` by the Rust ``tokenizers`` library.

Loading it through ``transformers.AutoTokenizer`` imports most of transformers first (seconds of
start-up on a small CPU, more than the rest of a short ``generate``). What the engine and the server
use of a tokenizer is small: encode, decode, the special tokens, and the chat template. This class
gives those with transformers' semantics (``tests/test_tokenizer.py`` compares both):

- ``encode(text, add_special_tokens=True)``: the tokenizer.json post-processor adds BOS/EOS, as
  transformers' fast tokenizers do;
- ``decode``: transformers' clean-up of spaces before punctuation only where the config asks for
  it and the model is not BPE (transformers skips it for BPE, which it would corrupt);
- ``apply_chat_template``: the Jinja environment transformers renders templates in (sandboxed,
  ``trim_blocks``/``lstrip_blocks``, ``loopcontrols``, ``tojson``, ``raise_exception``,
  ``strftime_now``, the ``{% generation %}`` tag), with the special tokens as variables, and
  ``continue_final_message`` (the text cut after the final message, for the model to continue).

A checkpoint without ``tokenizer.json`` (a SentencePiece model only) is loaded by transformers.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext

from fairswitch.model.checkpoint_config import read_json

_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
            "mask_token")
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
            (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


# What a tokenizer's vocabulary comes in: tokenizers', SentencePiece's, BPE's, WordPiece's.
_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


def load_tokenizer(path: str | Path) -> Any:
    path = Path(path)
    if (path / "tokenizer.json").is_file():
        return Tokenizer(path)
    if path.is_file():
        raise NotADirectoryError(f"tokenizer {path} is a file: pass the directory that holds it")
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory {path} does not exist")
    if not any((path / name).is_file() for name in _VOCAB_FILES):
        raise FileNotFoundError(f"{path} has no tokenizer (none of {', '.join(_VOCAB_FILES)}): "
                                "pass a tokenizer directory with --tokenizer / tokenizer=")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load the tokenizer in {path}: {e}") from e


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    value = read_json(path)
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json writes a special token as a string or as an AddedToken dict.
    return value.get("content") if isinstance(value, dict) else value


def _chat_template(path: Path, config: dict[str, Any]) -> str | None:
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    template = config.get("chat_template") or _read_json(path / "chat_template.json").get(
        "chat_template")
    if isinstance(template, list):  # named templates: the default one
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default")
    return template


_MAX_COMPILED_TEMPLATES = 16


class Tokenizer:
    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        try:
            self._tok = RustTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # (the Rust library raises a bare Exception)
            raise ValueError(f"{path / 'tokenizer.json'} is not a readable tokenizer: "
                             f"{e}") from None
        config = _read_json(path / "tokenizer_config.json")
        special_map = _read_json(path / "special_tokens_map.json")
        self.special_tokens = {name: _token_text(config.get(name, special_map.get(name)))
                               for name in _SPECIAL}
        self.chat_template = _chat_template(path, config)
        self._cleanup = bool(config.get("clean_up_tokenization_spaces", False)) and \
            type(self._tok.model).__name__ != "BPE"
        # Compiled templates by source, most recently used last (requests may bring their own).
        self._templates: OrderedDict[str, Any] = OrderedDict()
        self._templates_lock = threading.Lock()

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _token_id(self, name: str) -> int | None:
        text = self.special_tokens[name]
        return None if text is None else self._tok.token_to_id(text)

    @property
    def eos_token_id(self) -> int | None:
        return self._token_id("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._token_id("bos_token")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text: str | list[str], add_special_tokens: bool = True,
                 **_: Any) -> dict[str, Any]:
        """transformers' batch call, ids only: ``{"input_ids": ids or [ids, ...]}``."""
        if isinstance(text, str):
            return {"input_ids": self.encode(text, add_special_tokens)}
        batch = self._tok.encode_batch(text, add_special_tokens=add_special_tokens)
        return {"input_ids": [e.ids for e in batch]}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        text = self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        if self._cleanup:
            for old, new in _CLEANUP:
                text = text.replace(old, new)
        return text

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str | None]:
        return [self._tok.id_to_token(i) for i in ids]

    def apply_chat_template(self, messages: list[dict[str, Any]], chat_template: str | None = None,
                            tokenize: bool = True, add_generation_prompt: bool = False,
                            continue_final_message: bool = False,
                            **kwargs: Any) -> str | list[int]:
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be "
                             "set: one continues the final message, the other starts a new one")
        source = chat_template or self.chat_template
        if source is None:
            raise ValueError("this tokenizer has no chat template; pass chat_template")
        with self._templates_lock:  # (prompt worker threads render at once)
            template = self._templates.get(source)
            if template is not None:
                self._templates.move_to_end(source)
        if template is None:  # (compiled outside the lock: a long one holds up no other)
            template = _compile(source)
            with self._templates_lock:
                self._templates[source] = template
                while len(self._templates) > _MAX_COMPILED_TEMPLATES:
                    self._templates.popitem(last=False)
        text = template.render(**template_variables(self, messages, add_generation_prompt,
                                                    **kwargs))
        if continue_final_message:
            text = cut_after_final_message(text, messages)
        return self.encode(text, add_special_tokens=False) if tokenize else text


def template_variables(tokenizer: Any, messages: list[dict[str, Any]],
                       add_generation_prompt: bool, **kwargs: Any) -> dict[str, Any]:
    """What a chat template renders with: the messages, the tokenizer's special tokens
    (``bos_token``...; of this class's tokenizer or of a transformers one), ``tools`` and
    ``documents`` (None, not undefined, when absent: templates test "is not none"), and the
    caller's other variables."""
    own = getattr(tokenizer, "special_tokens", None)
    if isinstance(own, dict):
        special = {name: text for name, text in own.items() if text is not None}
    else:
        special = {name: text for name in _SPECIAL
                   if isinstance(text := getattr(tokenizer, name, None), str)}
    return {**special, "tools": None, "documents": None, **kwargs, "messages": messages,
            "add_generation_prompt": add_generation_prompt}


def cut_after_final_message(text: str, messages: list[dict[str, Any]]) -> str:
    """A rendered chat cut right after the final message's content, as transformers'
    ``continue_final_message`` cuts it: whatever the template writes after it (the end of the
    turn) goes, so that the model continues that message. The content is found by its last
    occurrence, stripped of the spaces a template may trim; ValueError if it is not there."""
    content = messages[-1].get("content") if messages else None
    if isinstance(content, (list, tuple)):  # content parts: the last one with text
        content = next((part["text"] for part in reversed(content)
                        if isinstance(part, dict) and "text" in part), None)
    if not isinstance(content, str) or not content.strip():
        raise ValueError("continue_final_message needs a final message with text to continue")
    at = text.rfind(content.strip())
    if at < 0:
        raise ValueError("continue_final_message: the chat template does not render the final "
                         "message's content as it is, so there is no place to continue it from")
    kept = content.lstrip()  # its trailing spaces too, where the template kept them
    end = at + (len(kept) if text.startswith(kept, at) else len(content.strip()))
    return text[:end]


class GenerationTag(jinja2.ext.Extension):
    """transformers' ``{% generation %}...{% endgeneration %}``: it marks assistant text (for
    training masks); rendering for inference keeps its body as it is."""
    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


# The statements transformers' chat templates may use beyond plain Jinja.
TEMPLATE_EXTENSIONS = (GenerationTag, jinja2.ext.loopcontrols)


def template_syntax_error(source: str) -> str | None:
    """Why ``source`` is not a chat template (Jinja with those statements) that parses; None
    if it is one."""
    try:
        jinja2.Environment(extensions=list(TEMPLATE_EXTENSIONS)).parse(source)
    except jinja2.TemplateSyntaxError as e:
        return f"{e.message} (line {e.lineno})"
    return None


def _compile(source: str) -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=list(TEMPLATE_EXTENSIONS))
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)
