"""Checkpoint loading: sharded safetensors, shipped configs at real shapes, dummy weights."""

from __future__ import annotations

import json
import logging
import re

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


def test_a_tensor_the_config_has_no_place_for_is_refused(tmp_path, write_checkpoint):
    """A bias that config.json does not declare is refused, not silently dropped."""
    from safetensors.torch import load_file, save_file

    ckpt = write_checkpoint(tmp_path / "ckpt")
    file = ckpt / "model.safetensors"
    tensors = load_file(str(file))
    rows = tensors["model.layers.0.mlp.down_proj.weight"].shape[0]
    tensors["model.layers.0.mlp.down_proj.bias"] = torch.zeros(rows)
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.layers.0.mlp.down_proj.bias"):
        LLM(model=str(ckpt), num_gpu_blocks=64)


def _edit_tensors(file, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


@pytest.mark.parametrize("name, shape", [
    ("model.foo.weight", (3,)),  # no such module
    ("model.layers.0.mlp.experts.0.w1.weight", (3,)),  # a MoE checkpoint under a Llama config
    ("model.layers.7.mlp.down_proj.weight", (64, 128)),  # a layer past num_hidden_layers (2)
])
def test_a_tensor_the_model_has_no_parameter_for_is_refused(tmp_path, write_checkpoint, name,
                                                            shape):
    """Such tensors were dropped silently (the last one with an IndexError traceback): the
    checkpoint is not the model config.json describes."""
    ckpt = write_checkpoint(tmp_path / "ckpt")
    _edit_tensors(ckpt / "model.safetensors", lambda t: t.update({name: torch.zeros(shape)}))
    with pytest.raises(ValueError, match=f"no parameter for: \\['{name}'\\]"):
        LLM(model=str(ckpt), num_gpu_blocks=64)


def test_what_is_no_weight_of_the_model_is_not_refused(tmp_path, write_checkpoint):
    """RoPE tables some Llama checkpoints carry, and the Mistral-format copy of the weights
    (consolidated.safetensors) that Mistral's repositories keep beside the HF files."""
    from safetensors.torch import save_file

    ckpt = write_checkpoint(tmp_path / "ckpt")
    _edit_tensors(ckpt / "model.safetensors", lambda t: t.update(
        {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    save_file({"layers.0.attention.wq.weight": torch.zeros(64, 64)},
              str(ckpt / "consolidated.safetensors"))
    LLM(model=str(ckpt), num_gpu_blocks=64)


def test_a_tensor_in_two_shards_is_refused(tmp_path, write_checkpoint):
    """The later file's copy won silently; a fused part (k_proj) twice read as 'lacks weights'."""
    ckpt = write_checkpoint(tmp_path / "ckpt")
    (ckpt / "model.safetensors").rename(ckpt / "model-1.safetensors")
    name = "model.layers.0.self_attn.k_proj.weight"
    from safetensors.torch import load_file, save_file

    save_file({name: load_file(str(ckpt / "model-1.safetensors"))[name]},
              str(ckpt / "model-2.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"{name} is in both model-1.safetensors and "
                                         "model-2.safetensors"):
        LLM(model=str(ckpt), num_gpu_blocks=64)


@pytest.mark.parametrize("damage, message", [
    (lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]), "not fully covered"),
    (lambda f: f.write_bytes(b""), "header too small"),
    (lambda f: f.write_bytes(b"version https://git-lfs.github.com/spec/v1\n"),
     "Git LFS pointer"),
])
def test_an_unreadable_weight_file_is_named_before_any_rank_starts(tmp_path, write_checkpoint,
                                                                   damage, message):
    """safetensors' own error (SafetensorError, a traceback) did not name the file, and under
    tensor parallelism came from every rank after the workers had started."""
    from fairswitch.config import EngineConfig
    from fairswitch.engine.builder import check_model

    ckpt = write_checkpoint(tmp_path / "ckpt")
    damage(ckpt / "model.safetensors")
    config = EngineConfig.from_kwargs(model=str(ckpt), tensor_parallel_size=2)
    with pytest.raises(ValueError, match=f"{ckpt / 'model.safetensors'} is not a readable "
                                         f"safetensors file.*{message}"):
        check_model(config)


@pytest.mark.parametrize("index", ["{oops", '{"metadata": {}}', "[1]"])
def test_a_bad_shard_index_is_named(tmp_path, write_checkpoint, index):
    ckpt = write_checkpoint(tmp_path / "ckpt")
    (ckpt / "model.safetensors.index.json").write_text(index)
    with pytest.raises(ValueError, match="model.safetensors.index.json (is not valid JSON|has no "
                                         "weight_map)"):
        loader._checkpoint_files(ckpt)


def test_a_pytorch_bin_checkpoint_is_named(tmp_path, write_checkpoint):
    ckpt = write_checkpoint(tmp_path / "ckpt")
    (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="only safetensors are read, not pytorch_model.bin"):
        loader._checkpoint_files(ckpt)


@pytest.mark.parametrize("name, params_b", [
    ("llama-3-8b", 8.03), ("llama-3.1-8b", 8.03), ("llama-3-70b", 70.55), ("qwen2.5-7b", 7.62),
    ("qwen2.5-32b", 32.76), ("qwen3-8b", 8.19),
])
def test_shipped_configs_build_real_shapes(name, params_b):
    source = loader.resolve_model(name)
    cfg = loader.load_checkpoint_config(source)
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
    cfg = loader.load_checkpoint_config(loader.resolve_model("llama-3-8b"))
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


def _transformers_view(raw: dict) -> dict:
    """What transformers' own config class makes of a config.json, in CheckpointConfig's terms."""
    from transformers import AutoConfig

    raw = dict(raw)
    hf = AutoConfig.for_model(raw.pop("model_type"), **raw)
    rope = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    theta = rope.pop("rope_theta", getattr(hf, "rope_theta", None))
    # As the models read it: Llama never slides, Mistral on sliding_window alone, Qwen2 only
    # with use_sliding_window.
    window = None if hf.model_type == "llama" else getattr(hf, "sliding_window", None)
    if hf.model_type == "qwen2" and not getattr(hf, "use_sliding_window", False):
        window = None
    types = getattr(hf, "layer_types", None)
    if types is not None and "sliding_attention" not in types:  # (mixed: refused by ours)
        window = None
    return {
        "hidden_size": hf.hidden_size, "intermediate_size": hf.intermediate_size,
        "num_hidden_layers": hf.num_hidden_layers,
        "num_attention_heads": hf.num_attention_heads,
        "num_key_value_heads": hf.num_key_value_heads,
        "head_dim": getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        "vocab_size": hf.vocab_size, "max_position_embeddings": hf.max_position_embeddings,
        "rms_norm_eps": hf.rms_norm_eps, "rope_theta": theta,
        "rope_type": rope.get("rope_type", rope.get("type", "default")),
        "tie_word_embeddings": hf.tie_word_embeddings, "sliding_window": window,
        "dtype": str(hf.dtype).removeprefix("torch.") if hf.dtype is not None else None,
    }


def _ours(cfg: loader.CheckpointConfig) -> dict:
    rope_type = (cfg.rope_scaling or {}).get("rope_type", "default")
    return {
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta, "rope_type": rope_type,
        "tie_word_embeddings": cfg.tie_word_embeddings, "sliding_window": cfg.sliding_window,
        "dtype": cfg.dtype,
    }


@pytest.mark.parametrize("name", loader.shipped_config_names())
def test_checkpoint_config_reads_shipped_configs_as_transformers_does(name):
    cfg = loader.load_checkpoint_config(loader.resolve_model(name))
    assert _ours(cfg) == _transformers_view(cfg.raw)


@pytest.mark.parametrize("model_type, arch", [
    ("llama", "LlamaForCausalLM"), ("mistral", "MistralForCausalLM"), ("qwen2", "Qwen2ForCausalLM"),
    ("qwen3", "Qwen3ForCausalLM"),  # (its head_dim, 128, is not hidden_size // heads)
    ("phi3", "Phi3ForCausalLM"),
])
def test_checkpoint_config_defaults_match_transformers(model_type, arch):
    """A config.json that leaves the optional fields out means what transformers' defaults say.
    (32 query heads: a multiple of every type's default KV heads, 8 for Mistral, 32 for Qwen2.)"""
    raw = {"architectures": [arch], "model_type": model_type, "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 32,
           "vocab_size": 1000}
    assert _ours(loader.CheckpointConfig.from_dict(raw)) == _transformers_view(raw)


def test_checkpoint_config_reads_a_checkpoint_transformers_wrote(llama_dir):
    cfg = loader.CheckpointConfig.from_file(llama_dir / "config.json")
    assert _ours(cfg) == _transformers_view(cfg.raw)
    assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.rope_theta == 500000.0


@pytest.mark.parametrize("attention_bias", [False, True])
@pytest.mark.parametrize("model_type, arch", [
    ("llama", "LlamaForCausalLM"), ("mistral", "MistralForCausalLM"), ("qwen2", "Qwen2ForCausalLM"),
    ("qwen3", "Qwen3ForCausalLM"),
])
def test_attention_biases_are_those_of_transformers_model(model_type, arch, attention_bias):
    """attention_bias is Llama's and Qwen3's: Mistral's attention has no biases and Qwen2's
    o_proj none, whatever it says (such a checkpoint was refused for lacking the tensors).
    Qwen3's alone normalizes its query and key heads."""
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = {"architectures": [arch], "model_type": model_type, "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": 100, "attention_bias": attention_bias}
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**raw))
    attn = hf.model.layers[0].self_attn
    cfg = loader.CheckpointConfig.from_dict(raw)
    assert (cfg.qkv_bias, cfg.o_proj_bias, cfg.qk_norm) == (
        attn.q_proj.bias is not None, attn.o_proj.bias is not None, hasattr(attn, "q_norm"))


@pytest.mark.parametrize("model_type, arch, change", [
    ("mistral", "MistralForCausalLM", {"sliding_window": None}),  # Mistral-7B v0.2+: no window
    ("mistral", "MistralForCausalLM", {"sliding_window": 32}),
    ("phi3", "Phi3ForCausalLM", {"sliding_window": 32}),  # (Phi-3-mini-4k: 2047)
    ("qwen2", "Qwen2ForCausalLM", {"use_sliding_window": True, "max_window_layers": 0}),
    ("qwen2", "Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 32,
                                   "max_window_layers": 2}),  # no layer past the 2 slides
    ("qwen2", "Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 32,
                                   "max_window_layers": 0}),
    # Mistral's model slides whatever use_sliding_window says (it was read as no window, and
    # every position past it attended too far); Llama's never does (it was capped to it).
    ("mistral", "MistralForCausalLM", {"sliding_window": 32, "use_sliding_window": False}),
    ("llama", "LlamaForCausalLM", {"sliding_window": 8, "use_sliding_window": True}),
    ("qwen2", "Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 32,
                                   "max_window_layers": 0, "layer_types": None}),  # derived
    ("qwen3", "Qwen3ForCausalLM", {"use_sliding_window": True, "sliding_window": 32,
                                   "max_window_layers": 0}),
    ("qwen3", "Qwen3ForCausalLM", {"sliding_window": 32}),  # (not used: no window)
])
def test_checkpoint_config_windows_and_nulls_match_transformers(model_type, arch, change):
    """An explicit null is not a missing key; Qwen2 slides only from max_window_layers on."""
    raw = {"architectures": [arch], "model_type": model_type, "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 32,
           "vocab_size": 1000, **change}
    assert _ours(loader.CheckpointConfig.from_dict(raw)) == _transformers_view(raw)


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["GPT2LMHeadModel"]}, "unsupported model architecture"),
    ({"model_type": "gpt2"}, "model_type"),
    ({"hidden_size": None}, "lacks hidden_size"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"mlp_bias": True}, "mlp_bias is not supported"),
    ({"quantization_config": {"quant_method": "awq", "bits": 4}},
     "quant_method 'awq' are not supported"),
    ({"quantization_config": {"quant_method": "fp8", "fmt": "e5m2"}}, "only e4m3"),
    ({"quantization_config": {"quant_method": "compressed-tensors", "config_groups": {
        "g": {"weights": {"num_bits": 4, "type": "int", "strategy": "group"}}}}},
     "only 8-bit float"),
    ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "num_hidden_layers": 4,
      "use_sliding_window": True, "max_window_layers": 2}, "2 of 4 layers"),
    # Values of the wrong type or range are named, not cast (int(64.5)) or left to fail later
    # as a shape error or a traceback in the model.
    ({"hidden_size": 64.5}, "hidden_size must be a positive integer, got 64.5"),
    ({"hidden_size": "64"}, "hidden_size must be a positive integer, got '64'"),
    ({"num_attention_heads": -4}, "num_attention_heads must be a positive integer"),
    ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer, got 0"),
    ({"num_key_value_heads": 0}, "num_key_value_heads must be a positive integer, got 0"),
    ({"max_position_embeddings": "x"}, "max_position_embeddings must be a positive integer"),
    ({"rms_norm_eps": "x"}, "rms_norm_eps must be a positive number"),
    ({"eos_token_id": "</s>"}, "eos_token_id must be a token id"),
    ({"architectures": "LlamaForCausalLM"}, "architectures must be a list"),
    ({"num_key_value_heads": 3},
     "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    ({"num_attention_heads": 2, "num_key_value_heads": 2, "hidden_size": 66},
     "head_dim=33 .* is not a positive even number"),
    ({"rope_scaling": "yarn"}, "rope_scaling must be an object"),
    ({"architectures": ["Phi3ForCausalLM"], "model_type": "phi3",
      "partial_rotary_factor": 0.75}, "partial_rotary_factor=0.75 .* is not supported"),
    ({"architectures": ["Phi3ForCausalLM"], "model_type": "phi3",
      "original_max_position_embeddings": 64,
      "rope_scaling": {"type": "su", "short_factor": [1.0], "long_factor": [1.0]}},
     "longrope's short_factor must be a list of 8 positive numbers"),
    ({"architectures": ["Phi3ForCausalLM"], "model_type": "phi3",
      "original_max_position_embeddings": "4k",
      "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8}},
     "original_max_position_embeddings must be a positive number, got '4k'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn' is not supported"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
     "llama3 rope scaling lacks low_freq_factor"),
    ({"rope_scaling": {"rope_type": "linear", "factor": "x"}},
     "the linear rope scaling's factor must be a positive number, got 'x'"),
    ({"rope_scaling": {"rope_type": "linear", "factor": -2.0}},
     "the linear rope scaling's factor must be a positive number, got -2.0"),
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": -5},
     "sliding_window must be a positive integer or null, got -5"),
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": "abc"},
     "sliding_window must be a positive integer or null, got 'abc'"),
    ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": True,
      "max_window_layers": "2"}, "max_window_layers must be an integer >= 0, got '2'"),
    ({"torch_dtype": "float8"}, "torch_dtype must be one of float32, float64, float16, bfloat16, got "
                                "'float8'"),
    ({"torch_dtype": 16}, "torch_dtype must be one of .*, got 16"),
    ({"dtype": ["bfloat16"], "torch_dtype": "bfloat16"}, "dtype must be one of .*, got \\['bf"),
])
def test_checkpoint_config_refuses_what_it_cannot_serve(change, message):
    raw = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "vocab_size": 1000}
    raw.update(change)
    with pytest.raises(ValueError, match=message):
        loader.CheckpointConfig.from_dict(raw)


@pytest.mark.parametrize("content, message", [
    (b"{not json", "is not valid JSON"), (b"", "is not valid JSON"),
    (b'\xff\xfe{"a": 1}', "is not UTF-8 text"), (b"[1, 2]", "expected a JSON object, got list"),
])
def test_a_config_json_that_is_not_a_json_object_is_named(tmp_path, content, message):
    """json's own messages ("Expecting value: line 1 column 1") and an AttributeError for a
    list did not say which file."""
    path = tmp_path / "config.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"{path}.*{message}"):
        loader.CheckpointConfig.from_file(path)


# --- the model's dtype: the checkpoint's, read by --dtype auto on CUDA -----------------------------

CUDA, CPU = torch.device("cuda", 1), torch.device("cpu")  # (a device object needs no GPU)


def _edit_config(ckpt, **fields) -> None:
    path = ckpt / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


@pytest.mark.parametrize("name, device, declared, expected", [
    ("auto", CUDA, "float16", torch.float16), ("auto", CUDA, "bfloat16", torch.bfloat16),
    # float32 runs in bfloat16 on a GPU, as in vLLM; so does a checkpoint that declares nothing
    ("auto", CUDA, "float32", torch.bfloat16), ("auto", CUDA, "float64", torch.bfloat16),
    ("auto", CUDA, None, torch.bfloat16),
    ("auto", CPU, "float16", torch.float32), ("auto", CPU, "bfloat16", torch.float32),
    ("auto", CPU, None, torch.float32),
    # an explicit --dtype is what runs, whatever the checkpoint declares
    ("float32", CUDA, "float16", torch.float32), ("bfloat16", CUDA, "float16", torch.bfloat16),
    ("float16", CPU, "bfloat16", torch.float16),
])
def test_dtype_auto_on_cuda_is_the_checkpoints(name, device, declared, expected):
    from fairswitch.engine.builder import resolve_dtype

    assert resolve_dtype(name, device, declared) == expected


@pytest.mark.parametrize("name", [*loader.shipped_config_names(), "fairswitch-tiny"])
def test_dtype_auto_on_cuda_is_bfloat16_for_the_shipped_models(name):
    """The dummy-weight presets (and the embedded default) declare bfloat16."""
    from fairswitch.engine.builder import resolve_dtype

    cfg = loader.load_checkpoint_config(loader.resolve_model(name))
    assert resolve_dtype("auto", CUDA, cfg.dtype) == torch.bfloat16


@pytest.mark.parametrize("fields, declared", [
    ({"dtype": "float16"}, "float16"),
    ({"dtype": None, "torch_dtype": "float16"}, "float16"),  # transformers 4.x's key
    ({"dtype": "bfloat16", "torch_dtype": "float16"}, "bfloat16"),  # dtype first, as transformers
    ({"dtype": None}, None),
])
def test_the_checkpoint_dtype_comes_from_its_config_json(tmp_path, write_checkpoint, fields,
                                                         declared):
    """What every rank reads (check_model), so that all resolve rank 0's dtype."""
    from fairswitch.config import EngineConfig
    from fairswitch.engine.builder import check_model

    ckpt = write_checkpoint(tmp_path / "ckpt")
    _edit_config(ckpt, **fields)
    _, cfg = check_model(EngineConfig.from_kwargs(model=str(ckpt), tensor_parallel_size=2))
    assert cfg.dtype == declared


@pytest.mark.parametrize("fields, message", [
    ({"dtype": None, "torch_dtype": "float8"}, "torch_dtype must be one of float32, float64, float16, "
                                               "bfloat16, got 'float8'"),
    ({"dtype": 16}, "dtype must be one of float32, float64, float16, bfloat16, got 16"),
])
def test_a_bad_checkpoint_dtype_is_named(tmp_path, write_checkpoint, fields, message):
    from fairswitch.config import EngineConfig
    from fairswitch.engine.builder import check_model

    ckpt = write_checkpoint(tmp_path / "ckpt")
    _edit_config(ckpt, **fields)
    with pytest.raises(ValueError, match=f"{re.escape(str(ckpt / 'config.json'))}: {message}"):
        check_model(EngineConfig.from_kwargs(model=str(ckpt)))


def test_a_sliding_window_caps_max_model_len_and_says_so(tmp_path, write_checkpoint, caplog):
    """Sliding-window attention is not implemented: the context stays within the window, where
    it equals full attention, and the cap is said (outputs stopped at 'length' early, unsaid)."""
    path = write_checkpoint(tmp_path / "q", "qwen2", use_sliding_window=True, sliding_window=48,
                            max_window_layers=0)
    with caplog.at_level(logging.WARNING, logger="fairswitch.engine.builder"):
        llm = LLM(model=str(path), num_gpu_blocks=16)
    assert llm.engine.max_model_len == 48
    assert "sliding window of 48 tokens" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fairswitch.engine.builder"):
        LLM(model=str(path), num_gpu_blocks=16, max_model_len=32)  # asked for: nothing to say
    assert "sliding window" not in caplog.text
    with pytest.raises(ValueError, match="sliding_window"):
        LLM(model=str(path), num_gpu_blocks=16, max_model_len=64)


def _hub_cache(cache, repo_id: str, checkpoint, commit: str = "a1" * 20):
    """A Hugging Face Hub cache holding ``repo_id`` at ``commit`` (its main branch), laid out as
    huggingface_hub writes it: what an earlier download left."""
    import shutil

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(checkpoint, repo / "snapshots" / commit)
    return repo / "snapshots" / commit


def test_a_hub_repository_name_loads_from_the_hub_cache(tmp_path, llama_dir, monkeypatch):
    """`LLM("owner/name")` / `fairswitch serve owner/name`, as vLLM: the repository's files
    come through huggingface_hub (here from its cache, offline: nothing can be downloaded in
    the tests), at --revision, from --download-dir; the weights are skipped for dummy ones."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "hub"
    _hub_cache(cache, "tester/tiny-llama", llama_dir)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    small = dict(num_gpu_blocks=16, max_model_len=128)
    want = LLM(model=str(llama_dir), **small).generate(["Hi"], params, use_tqdm=False)
    got = LLM(model="tester/tiny-llama", download_dir=str(cache), **small).generate(
        ["Hi"], params, use_tqdm=False)
    assert got[0].outputs[0].token_ids == want[0].outputs[0].token_ids
    asked = []
    real = loader.hub.snapshot

    def spy(*args, **kwargs):
        asked.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(loader.hub, "snapshot", spy)
    LLM(model="tester/tiny-llama", download_dir=str(cache), revision="main",
        load_format="dummy", **small)
    assert asked == [("tester/tiny-llama", "main", str(cache), False)]
    with pytest.raises(FileNotFoundError, match=r"'tester/tiny-llama' is no local directory .*"
                       r"at revision 'v2' could not be fetched: \w+Error"):
        LLM(model="tester/tiny-llama", download_dir=str(cache), revision="v2")
    with pytest.raises(FileNotFoundError, match=r"'nobody/nothing' .*could not be fetched"):
        LLM(model="nobody/nothing", download_dir=str(cache))


@pytest.mark.parametrize("name", ["no-such-model", "a/b/c", "../x", "/abs/missing"])
def test_a_name_that_is_no_repository_is_not_looked_up(name, monkeypatch):
    monkeypatch.setattr(loader.hub, "snapshot", lambda *a: pytest.fail("looked up"))
    with pytest.raises(FileNotFoundError, match="neither an existing directory nor a known"):
        loader.resolve_model(name)


def test_longrope_context_stays_within_its_original_length(phi3_dir):
    """Past original_max_position_embeddings LongRoPE switches every position to its long
    factors (transformers recomputes the whole sequence then): not implemented, so the context
    is capped there, and a longer max_model_len refused by name."""
    from fairswitch import LLM

    llm = LLM(model=str(phi3_dir), num_gpu_blocks=64)
    assert llm.engine.config.model.max_model_len is None
    assert llm.engine.max_model_len == 256
    llm.shutdown()
    with pytest.raises(ValueError, match="original_max_position_embeddings: longrope's long"):
        LLM(model=str(phi3_dir), num_gpu_blocks=64, max_model_len=512)


@pytest.mark.parametrize("top, inside, want", [(None, 256, 4096), (512, 256, 512),
                                               (None, None, 4096), (2048, None, 2048)])
def test_phi3_longrope_original_length_as_transformers_reads_it(top, inside, want):
    """Phi3Config's own original_max_position_embeddings (4096 by default) wins over one inside
    rope_scaling, and the attention factor follows from it, as transformers computes them."""
    from transformers import Phi3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from fairswitch.model.llama import rope_attention_factor, rope_inv_freq

    rope = {"rope_type": "longrope", "short_factor": [1.5] * 8, "long_factor": [2.0] * 8}
    if inside is not None:
        rope["original_max_position_embeddings"] = inside
    raw = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
           "vocab_size": 100, "max_position_embeddings": 8192, "rope_scaling": dict(rope)}
    if top is not None:
        raw["original_max_position_embeddings"] = top
    cfg = loader.CheckpointConfig.from_dict(raw)
    assert cfg.rope_scaling["original_max_position_embeddings"] == want
    hf = Phi3Config(**{k: v for k, v in raw.items() if k != "architectures"})
    inv_freq, factor = ROPE_INIT_FUNCTIONS["longrope"](hf)
    assert rope_attention_factor(cfg.rope_scaling, cfg.max_position_embeddings) == \
        pytest.approx(factor, rel=1e-6)
    torch.testing.assert_close(rope_inv_freq(cfg.rope_theta, cfg.rope_scaling, cfg.head_dim),
                               inv_freq.float(), rtol=1e-6, atol=0)
