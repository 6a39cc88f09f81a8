"""fairswitch's tokenizer (tokenizers + Jinja, no transformers import) against transformers'
AutoTokenizer on the same files: ids, text, special tokens and chat templates must agree."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fairswitch.model.tokenizer import Tokenizer, load_tokenizer

TEXTS = [
    "Hello, my name is", " leading space", "trailing space ", "don't we've I'm they're",
    "digits 1234567 and 3.14159", "tabs\tand\nnewlines\n\n  indented", "unicode: naïve café 東京 🙂",
    "code: def f(x):\n    return x ** 2  # comment", "   ", "<|im_start|>user\nhi<|im_end|>",
    "a" * 300, "punctuation ; : ! ? . , ' \" ( ) [ ] { }",
]
MESSAGES = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Again"}],
    [{"role": "user", "content": [{"type": "text", "text": "part one "},
                                  {"type": "text", "text": "part two"}]}],
]
# Conversations to continue (continue_final_message): the spaces around a final message, which
# a template may keep or trim.
CONTINUED = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure, the answer is "}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  Well,\n"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hi"}],
]
# A template using what transformers' environment offers: the special tokens as variables,
# tools (None when absent), loop controls, tojson, raise_exception and the generation tag.
RICH_TEMPLATE = (
    "{{ bos_token }}{% if tools is not none %}TOOLS{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}"
    "{% endif %}{% if loop.index > 9 %}{% break %}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}"
    "{% else %}{{ m['content'] | tojson }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _hf(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _agree(ours: Tokenizer, hf, messages=MESSAGES) -> None:
    assert len(ours) == len(hf)
    assert ours.eos_token_id == hf.eos_token_id
    for text in TEXTS:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == hf.encode(text, add_special_tokens=special), (text, special)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(
                    ids, skip_special_tokens=skip), (text, skip)
        assert ours.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
    for special in (True, False):
        assert ours(TEXTS, add_special_tokens=special)["input_ids"] == \
            hf(TEXTS, add_special_tokens=special)["input_ids"]
        assert ours(TEXTS[0])["input_ids"] == hf(TEXTS[0])["input_ids"]
    for conversation in messages:
        for gen in (True, False):
            assert ours.apply_chat_template(conversation, tokenize=False,
                                            add_generation_prompt=gen) == \
                hf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=gen)
    for conversation in [*messages, *CONTINUED]:
        try:
            want = hf.apply_chat_template(conversation, tokenize=False,
                                          continue_final_message=True)
        except ValueError:
            with pytest.raises(ValueError, match="continue_final_message"):
                ours.apply_chat_template(conversation, tokenize=False,
                                         continue_final_message=True)
            continue
        assert ours.apply_chat_template(conversation, tokenize=False,
                                        continue_final_message=True) == want, conversation


def test_embedded_tokenizer_agrees_with_transformers(tokenizer_dir):
    ours = load_tokenizer(tokenizer_dir)
    assert isinstance(ours, Tokenizer)
    _agree(ours, _hf(tokenizer_dir))


@pytest.mark.parametrize("template_in", ["config", "named", "jinja_file"])
def test_bos_post_processor_and_templates_agree_with_transformers(tmp_path, tokenizer_dir,
                                                                  template_in):
    """A Llama-style tokenizer: a post-processor that adds BOS, BOS given as an AddedToken
    dict, the chat template in each place transformers reads it from."""
    tok = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    bos = "<|fim_prefix|>"
    bos_id = next(t["id"] for t in tok["added_tokens"] if t["content"] == bos)
    tok["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                   {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": bos, "type_id": 0}},
                 {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    config["bos_token"] = {"__type": "AddedToken", "content": bos, "lstrip": False, "normalized": False,
                           "rstrip": False, "single_word": False, "special": True}
    config.pop("chat_template")
    if template_in == "config":
        config["chat_template"] = RICH_TEMPLATE
    elif template_in == "named":
        config["chat_template"] = [{"name": "tool_use", "template": "TOOL"},
                                   {"name": "default", "template": RICH_TEMPLATE}]
    else:
        (tmp_path / "chat_template.jinja").write_text(RICH_TEMPLATE)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = load_tokenizer(tmp_path)
    assert ours.encode("x")[0] == bos_id and ours.bos_token_id == bos_id
    _agree(ours, _hf(tmp_path))
    assert ours.apply_chat_template(MESSAGES[0], tokenize=False).startswith(bos)


def test_template_errors_and_overrides(tokenizer_dir):
    import jinja2

    ours = load_tokenizer(tokenizer_dir)
    with pytest.raises(jinja2.TemplateError, match="no tools"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}], chat_template=RICH_TEMPLATE,
                                 tokenize=False)
    ids = ours.apply_chat_template(MESSAGES[0], chat_template="{{ messages[0]['content'] }}")
    assert ids == ours.encode("Hi", add_special_tokens=False)
    with pytest.raises(ValueError, match="cannot both be set"):
        ours.apply_chat_template(CONTINUED[0], add_generation_prompt=True,
                                 continue_final_message=True)
    with pytest.raises(ValueError, match="does not render the final message"):
        ours.apply_chat_template(CONTINUED[0], chat_template="{{ messages[0]['content'] }}",
                                 continue_final_message=True)


def test_missing_tokenizer_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")


def test_a_tokenizer_file_in_place_of_its_directory_is_named(tokenizer_dir):
    """It was reported as a directory that does not exist."""
    with pytest.raises(NotADirectoryError, match="tokenizer.json is a file: pass the directory"):
        load_tokenizer(tokenizer_dir / "tokenizer.json")


def test_a_directory_without_tokenizer_files_is_named(tmp_path):
    """transformers' message ("Couldn't instantiate the backend tokenizer from one of: ...")
    named neither the directory nor the way out."""
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} has no tokenizer .*--tokenizer"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("name, content, message", [
    ("tokenizer.json", "{bad", "tokenizer.json is not a readable tokenizer"),
    ("tokenizer_config.json", "{bad", "tokenizer_config.json is not valid JSON"),
    ("tokenizer_config.json", "[1]", "tokenizer_config.json: expected a JSON object"),
])
def test_a_corrupt_tokenizer_file_is_named(tmp_path, tokenizer_dir, name, content, message):
    """A corrupt tokenizer.json raised the Rust library's bare Exception (a traceback), a
    corrupt tokenizer_config.json json's message without the file."""
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / f, tmp_path / f)
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=message):
        load_tokenizer(tmp_path)


def test_without_a_template_the_tokenizer_says_so(tmp_path, tokenizer_dir):
    shutil.copy(tokenizer_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    ours = load_tokenizer(tmp_path)
    assert ours.chat_template is None and ours.eos_token_id is None
    with pytest.raises(ValueError, match="no chat template"):
        ours.apply_chat_template(MESSAGES[0], tokenize=False)
