"""Checkpoint loading: sharded safetensors, shipped configs at real shapes, dummy weights."""

from __future__ import annotations

import json

import pytest
import torch

from fairswitch import LLM, SamplingParams
from fairswitch.model import loader
from fairswitch.runner.attention import TorchAttentionBackend


def test_sharded_checkpoint_matches_single_file(tmp_path, write_checkpoint):
    single = write_checkpoint(tmp_path / "single")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(single)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="4MB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "sharded" / name).write_bytes((single / name).read_bytes())
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    p = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    a = LLM(model=str(single), num_gpu_blocks=64).generate("shard me", p, use_tqdm=False)
    b = LLM(model=str(tmp_path / "sharded"), num_gpu_blocks=64).generate("shard me", p,
                                                                        use_tqdm=False)
    assert a[0].outputs[0].token_ids == b[0].outputs[0].token_ids


def test_missing_shard_is_named(tmp_path, write_checkpoint):
    from transformers import AutoModelForCausalLM

    single = write_checkpoint(tmp_path / "single")
    AutoModelForCausalLM.from_pretrained(single).save_pretrained(tmp_path / "s",
                                                                 max_shard_size="4MB")
    victim = sorted((tmp_path / "s").glob("*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        loader._checkpoint_files(tmp_path / "s")


@pytest.mark.parametrize("name, params_b", [
    ("llama-3-8b", 8.03), ("llama-3.1-8b", 8.03), ("qwen2.5-7b", 7.62), ("qwen2.5-32b", 32.76),
])
def test_shipped_configs_build_real_shapes(name, params_b):
    source = loader.resolve_model(name)
    cfg = loader.load_hf_config(source)
    model = loader.build_model(cfg, TorchAttentionBackend(), 128, torch.bfloat16,
                               torch.device("meta"))
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / 1e9 - params_b) < 0.02, n


def test_weights_are_allocated_in_the_model_dtype(monkeypatch):
    """Every weight is allocated in bf16 from the start: building in float32 and casting made
    the 8B model peak at 2x its bf16 weights on the device (32 GB: more than a 24 GB card)."""
    asked, real_empty = [], torch.empty

    def empty(*args, **kwargs):
        asked.append(kwargs.get("dtype"))  # None: torch's default, float32
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", empty)
    cfg = loader.load_hf_config(loader.resolve_model("llama-3-8b"))
    model = loader.build_model(cfg, TorchAttentionBackend(), 128, torch.bfloat16,
                               torch.device("meta"))
    assert None not in asked
    assert asked.count(torch.bfloat16) == len(list(model.parameters()))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.rope.cos.dtype == torch.float32  # the rotary caches stay float32


def test_dummy_weights_are_seeded(tokenizer_dir):
    p = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    runs = [LLM(model="fairswitch-tiny", load_format="dummy", seed=s, num_gpu_blocks=256)
            .generate("dummy", p, use_tqdm=False)[0].outputs[0].token_ids for s in (3, 3, 4)]
    assert runs[0] == runs[1] != runs[2]
