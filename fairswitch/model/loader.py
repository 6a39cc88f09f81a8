"""Find a model, read its config and tokenizer, build it on the device and fill its weights.

``model`` may be: a local HF checkpoint directory; the embedded default ``fairswitch-tiny``
(created and cached on first use); or a shipped config name (``llama-3-8b`` ...) for dummy weights.
Weights come from ``*.safetensors`` (single file or sharded with an index), or are random
(``load_format="dummy"``) with realistic scales, for benchmarks at real model shapes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fairswitch.model.checkpoint_config import CheckpointConfig
from fairswitch.model.llama import LlamaForCausalLM
from fairswitch.model.tokenizer import load_tokenizer  # noqa: F401  (the loader's API)

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class ModelSource:
    name: str
    checkpoint_dir: Path | None  # None: a shipped config without weights
    config_path: Path


def shipped_config_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def resolve_model(model: str) -> ModelSource:
    from fairswitch.model.default_model import ensure_default_model, is_default_model_name

    if is_default_model_name(model):
        path = ensure_default_model()
        return ModelSource(model, path, path / "config.json")
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model directory {path} has no config.json")
        return ModelSource(model, path, path / "config.json")
    if (CONFIG_DIR / f"{model}.json").is_file():
        return ModelSource(model, None, CONFIG_DIR / f"{model}.json")
    raise FileNotFoundError(
        f"model {model!r} is neither an existing directory nor a known name "
        f"(known: {', '.join(shipped_config_names())})"
    )


def load_checkpoint_config(source: ModelSource) -> CheckpointConfig:
    return CheckpointConfig.from_file(source.config_path)


def build_model(config: CheckpointConfig, backend: Any, max_positions: int, dtype: torch.dtype,
                device: torch.device) -> LlamaForCausalLM:
    """Build on ``device`` in ``dtype`` (no copy, no cast), running ``backend``'s kernels."""
    with torch.device(device):
        model = LlamaForCausalLM(config, backend, max_positions, backend.ops, dtype)
    return model.eval()


# HF parameter name (suffix) -> (our parameter, slice index within a fused projection)
def _target(name: str, model: LlamaForCausalLM) -> tuple[torch.Tensor, int | None] | None:
    if name == "model.embed_tokens.weight":
        return model.embed_tokens, None
    if name == "model.norm.weight":
        return model.norm.weight, None
    if name == "lm_head.weight":
        return (model.lm_head.weight, None) if model.lm_head is not None else None
    if not name.startswith("model.layers."):
        return None
    parts = name.split(".")
    layer = model.layers[int(parts[2])]
    sub, kind = ".".join(parts[3:-1]), parts[-1]
    attn = layer.self_attn
    fused = {
        "self_attn.q_proj": (attn.qkv_proj, 0), "self_attn.k_proj": (attn.qkv_proj, 1),
        "self_attn.v_proj": (attn.qkv_proj, 2), "mlp.gate_proj": (layer.mlp.gate_up_proj, 0),
        "mlp.up_proj": (layer.mlp.gate_up_proj, 1),
    }
    plain = {"self_attn.o_proj": attn.o_proj, "mlp.down_proj": layer.mlp.down_proj,
             "input_layernorm": layer.input_layernorm,
             "post_attention_layernorm": layer.post_attention_layernorm}
    if sub in fused:
        module, shard = fused[sub]
        param = getattr(module, kind, None)
        return None if param is None else (param, shard)
    if sub in plain:
        param = getattr(plain[sub], kind, None)
        return None if param is None else (param, None)
    return None


def _shard_slice(model: LlamaForCausalLM, param: torch.Tensor, shard: int) -> torch.Tensor:
    attn = model.layers[0].self_attn
    if param.shape[0] == attn.q_size + 2 * attn.kv_size:
        sizes = [attn.q_size, attn.kv_size, attn.kv_size]
    else:
        sizes = [param.shape[0] // 2] * 2
    start = sum(sizes[:shard])
    return param[start:start + sizes[shard]]


def _checkpoint_files(ckpt: Path) -> list[Path]:
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        missing = [n for n in names if not (ckpt / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{ckpt}: shards listed in the index are missing: {missing}")
        return [ckpt / n for n in names]
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors weights in {ckpt} (use load_format='dummy' for random weights)")
    return files


def load_weights(model: LlamaForCausalLM, ckpt: Path) -> None:
    from safetensors import safe_open

    expected = {id(p): n for n, p in model.named_parameters()}
    filled: set[int] = set()
    partial: dict[int, int] = {}  # fused params filled shard by shard
    for file in _checkpoint_files(ckpt):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                target = _target(name, model)
                if target is None:
                    continue
                param, shard = target
                dst = param if shard is None else _shard_slice(model, param, shard)
                src = f.get_tensor(name)
                if tuple(src.shape) != tuple(dst.shape):
                    raise ValueError(f"{file.name}: {name} has shape {tuple(src.shape)}, "
                                     f"the model expects {tuple(dst.shape)}")
                dst.copy_(src)
                if shard is None:
                    filled.add(id(param))
                else:
                    partial[id(param)] = partial.get(id(param), 0) + 1
    qkv_ids = {id(p) for layer in model.layers for p in layer.self_attn.qkv_proj.parameters()}
    for pid, count in partial.items():
        if count == (3 if pid in qkv_ids else 2):  # q|k|v or gate|up all present
            filled.add(pid)
    missing = [n for pid, n in expected.items() if pid not in filled]
    if missing:
        raise ValueError(f"checkpoint {ckpt} lacks weights for: {missing[:8]}"
                         + (" ..." if len(missing) > 8 else ""))


def fill_dummy_weights(model: LlamaForCausalLM, seed: int) -> None:
    gen = torch.Generator(device=model.embed_tokens.device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("layernorm.weight") or name == "norm.weight":
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            param.normal_(0.0, 0.02, generator=gen)
