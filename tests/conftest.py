"""Shared fixtures: small real checkpoints written by the tests themselves, and engine factories."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads this when it is first imported (transformers can import it): without a GPU the
    # kernels run in Triton's interpreter, so their tests run in CI too.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fairswitch.engine.builder import resolve_device as _RESOLVE_DEVICE
from fairswitch.model.cl100k import ensure_cl100k_tokenizer

VOCAB = 100352  # cl100k_base's ids, padded to a multiple of 128 (model/cl100k.py)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """On a CUDA machine the unmarked tests stay the CPU's (4-token blocks, fp32 parity with
    transformers): an engine they build (their module's fixtures included) with device "auto"
    runs on the CPU. gpu-marked tests get CUDA."""
    if not torch.cuda.is_available():
        return
    from fairswitch.engine import builder

    builder.resolve_device = _RESOLVE_DEVICE if "gpu" in item.keywords else _cpu_for_auto


def _cpu_for_auto(name: str) -> torch.device:
    return torch.device("cpu") if name == "auto" else _RESOLVE_DEVICE(name)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def engine():
    """An AsyncEngine over the default model (64 blocks, 128 tokens of context), one per module;
    a module that needs another engine defines its own ``engine`` fixture, which wins."""
    from fairswitch.config import EngineConfig
    from fairswitch.engine.async_engine import AsyncEngine

    eng = AsyncEngine.from_config(EngineConfig.from_kwargs(num_gpu_blocks=64, max_model_len=128))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    """The OpenAI server in a background thread over the module's ``engine`` fixture (the engine
    outlives it: modules share one engine across their tests)."""
    from fairswitch.server import BackgroundServer, ServerSettings, build_app

    with BackgroundServer(build_app(engine, ServerSettings(), shutdown_engine=False)) as srv:
        yield srv


@pytest.fixture(scope="module")
def openai_client():
    """The real ``openai`` client on a server over the default model (256 blocks, 256 tokens of
    context), for the module."""
    from helpers import openai_servers

    from fairswitch.server import ServerSettings

    with openai_servers({"default": ServerSettings()}) as clients:
        yield clients["default"]


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    return ensure_cl100k_tokenizer()


def _write_checkpoint(path: Path, arch: str, tokenizer_dir: Path, **overrides) -> Path:
    """A random small HF model saved as a real checkpoint dir (config + safetensors + tokenizer)."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM,
                              Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                              Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig,
                              Qwen3MoeForCausalLM)

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                  max_position_embeddings=1024, eos_token_id=100257, bos_token_id=None,
                  initializer_range=0.08)
    common.update(overrides)
    torch.manual_seed(1234)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**common))
    elif arch == "phi3":
        model = Phi3ForCausalLM(Phi3Config(**common))
    elif arch == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(**common))
    elif arch == "qwen3_moe":
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    model.save_pretrained(path, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, path / name)
    return path


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer_dir) -> Path:
    # Llama 3.1 rope scaling, separate lm_head.
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 256,
            "rope_theta": 500000.0}
    return _write_checkpoint(tmp_path_factory.mktemp("llama"), "llama", tokenizer_dir,
                             rope_scaling=rope, tie_word_embeddings=False)


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory, tokenizer_dir) -> Path:
    # q/k/v biases, tied embeddings.
    return _write_checkpoint(tmp_path_factory.mktemp("qwen2"), "qwen2", tokenizer_dir,
                             tie_word_embeddings=True)


@pytest.fixture(scope="session")
def phi3_dir(tmp_path_factory, tokenizer_dir) -> Path:
    # q|k|v and gate|up stored fused; LongRoPE (short factors within the original 256 tokens,
    # cos and sin scaled by its attention factor: a context extended 4x).
    g = torch.Generator().manual_seed(3)
    factors = [(1.0 + torch.rand(8, generator=g) * 3).tolist() for _ in range(2)]
    rope = {"rope_type": "longrope", "short_factor": factors[0], "long_factor": factors[1],
            "rope_theta": 10000.0}
    return _write_checkpoint(tmp_path_factory.mktemp("phi3"), "phi3", tokenizer_dir,
                             rope_scaling=rope, original_max_position_embeddings=256,
                             tie_word_embeddings=False, pad_token_id=None)


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory, tokenizer_dir) -> Path:
    # q/k norms, heads of 32 (not hidden_size // heads, 16), tied embeddings.
    return _write_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3", tokenizer_dir,
                             head_dim=32, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def mixtral_dir(tmp_path_factory, tokenizer_dir) -> Path:
    # 4 experts, 2 a token (renormalized), in every layer; stored as Mixtral's w1/w2/w3.
    return _write_checkpoint(tmp_path_factory.mktemp("mixtral"), "mixtral", tokenizer_dir,
                             num_local_experts=4, num_experts_per_tok=2,
                             tie_word_embeddings=False)


@pytest.fixture(scope="session")
def qwen3_moe_dir(tmp_path_factory, tokenizer_dir) -> Path:
    # 8 experts of 32, 3 a token (not renormalized); layer 1 a dense MLP (mlp_only_layers).
    return _write_checkpoint(tmp_path_factory.mktemp("qwen3_moe"), "qwen3_moe", tokenizer_dir,
                             num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
                             mlp_only_layers=[1], head_dim=16, tie_word_embeddings=False)


@pytest.fixture(scope="session")
def write_checkpoint(tokenizer_dir):
    def write(path: Path, arch: str = "llama", **overrides) -> Path:
        return _write_checkpoint(path, arch, tokenizer_dir, **overrides)
    return write
