"""A LoRA adapter read from a PEFT folder: ``adapter_config.json`` (rank ``r``, ``lora_alpha``,
``use_rslora``) and ``adapter_model.safetensors`` (or ``adapter_model.bin``), as
``peft.PeftModel.save_pretrained`` writes them.

Each adapted projection W (``[out, in]``) gains ``scale * B @ A`` (A ``[r, in]``, B ``[out, r]``,
scale = alpha / r, or alpha / sqrt(r) with rsLoRA). The adapter is kept at TP=1 size on the host
in the model's dtype, B already scaled, keyed by the fused module it adds to and its part of
that module's output rows:

    q_proj k_proj v_proj  ->  self_attn.qkv_proj, parts 0 1 2
    o_proj                ->  self_attn.o_proj
    gate_proj up_proj     ->  mlp.gate_up_proj, parts 0 1
    down_proj             ->  mlp.down_proj
    qkv_proj, gate_up_proj (Phi-3's fused modules): every part, one A, B's rows split

What the engine cannot serve as the adapter means it is refused, naming it: adapted embeddings or
LM head, extra trained modules (``modules_to_save``), biases, DoRA, per-module ranks.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fairswitch.model.checkpoint_config import CheckpointConfig, read_json

# PEFT module name -> (our module, its part)
TARGETS = {
    "q_proj": ("self_attn.qkv_proj", 0), "k_proj": ("self_attn.qkv_proj", 1),
    "v_proj": ("self_attn.qkv_proj", 2), "o_proj": ("self_attn.o_proj", 0),
    "gate_proj": ("mlp.gate_up_proj", 0), "up_proj": ("mlp.gate_up_proj", 1),
    "down_proj": ("mlp.down_proj", 0),
    "qkv_proj": ("self_attn.qkv_proj", None), "gate_up_proj": ("mlp.gate_up_proj", None),
}
# our module -> how many parts its output rows are made of
NUM_PARTS = {"self_attn.qkv_proj": 3, "self_attn.o_proj": 1, "mlp.gate_up_proj": 2,
             "mlp.down_proj": 1}

_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])"
                  r"(?:\.[\w-]+)?\.weight$")
_UNSUPPORTED_CONFIG = {  # field -> why, when set to anything but its default
    "use_dora": "DoRA adapters are not supported",
    "modules_to_save": "adapters that train whole modules (modules_to_save) are not supported",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D-style weights) is not supported",
    "rank_pattern": "per-module ranks (rank_pattern) are not supported",
    "alpha_pattern": "per-module alphas (alpha_pattern) are not supported",
}

# Module key: (layer, our module, part)
ModuleKey = tuple[int, str, int]


@dataclass
class LoRAAdapter:
    name: str
    int_id: int
    path: str
    rank: int
    scale: float
    # (layer, our module, part) -> (A [r, in], scale * B [out part, r]) on the host
    weights: dict[ModuleKey, tuple[torch.Tensor, torch.Tensor]]


def part_shapes(config: CheckpointConfig) -> dict[str, tuple[int, list[int]]]:
    """Our adapted modules at TP=1: (input size, output rows of each part)."""
    hidden, inter = config.hidden_size, config.intermediate_size
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    return {"self_attn.qkv_proj": (hidden, [q, kv, kv]), "self_attn.o_proj": (q, [hidden]),
            "mlp.gate_up_proj": (hidden, [inter, inter]), "mlp.down_proj": (inter, [hidden])}


def read_adapter(name: str, int_id: int, path: str | Path, config: CheckpointConfig,
                 max_rank: int, dtype: torch.dtype = torch.float32) -> LoRAAdapter:
    """The adapter in folder ``path`` for a model of ``config``; ValueError naming what is wrong
    (a missing or unreadable file, a rank above ``max_rank``, a tensor of the wrong shape or for
    a module the engine does not adapt), FileNotFoundError for a missing folder."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"LoRA adapter {name!r}: {str(path)!r} is not a folder")
    cfg_file = folder / "adapter_config.json"
    if not cfg_file.is_file():
        raise ValueError(f"LoRA adapter {name!r}: {folder} has no adapter_config.json")
    cfg = read_json(cfg_file)
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_file} must hold a JSON object")
    rank, scale = _rank_and_scale(cfg, cfg_file)
    if rank > max_rank:
        raise ValueError(f"LoRA adapter {name!r} has rank {rank}, above max_lora_rank="
                         f"{max_rank} (--max-lora-rank)")
    tensors = _read_tensors(folder, name)
    weights = _module_weights(tensors, rank, scale, config, f"LoRA adapter {name!r}", dtype)
    return LoRAAdapter(name, int_id, str(path), rank, scale, weights)


def _rank_and_scale(cfg: dict[str, Any], where: Path) -> tuple[int, float]:
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{where}: peft_type {cfg['peft_type']!r} is not a LoRA adapter")
    for field, why in _UNSUPPORTED_CONFIG.items():
        if cfg.get(field):
            raise ValueError(f"{where}: {why}")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        raise ValueError(f"{where}: adapters with trained biases (bias "
                         f"{cfg.get('bias')!r}) are not supported")
    rank, alpha = cfg.get("r"), cfg.get("lora_alpha", cfg.get("r"))
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{where}: r must be an int >= 1, got {rank!r:.40}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"{where}: lora_alpha must be a number, got {alpha!r:.40}")
    rs = cfg.get("use_rslora", False)
    if not isinstance(rs, bool):
        raise ValueError(f"{where}: use_rslora must be true or false, got {rs!r:.40}")
    return rank, float(alpha) / (math.sqrt(rank) if rs else rank)


def _read_tensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    st, binary = folder / "adapter_model.safetensors", folder / "adapter_model.bin"
    if st.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(st))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"LoRA adapter {name!r}: {st} is not readable safetensors: "
                             f"{e}") from None
    if binary.is_file():
        try:  # (weights_only: a pickle that holds anything but tensors is refused)
            tensors = torch.load(str(binary), map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"LoRA adapter {name!r}: {binary} is not a readable tensor "
                             f"file: {e}") from None
        if isinstance(tensors, dict) and all(isinstance(v, torch.Tensor)
                                             for v in tensors.values()):
            return tensors
        raise ValueError(f"LoRA adapter {name!r}: {binary} does not hold a dict of tensors")
    raise ValueError(f"LoRA adapter {name!r}: {folder} has no adapter_model.safetensors "
                     "(or adapter_model.bin)")


def _module_weights(tensors: dict[str, torch.Tensor], rank: int, scale: float,
                    config: CheckpointConfig, who: str, dtype: torch.dtype
                    ) -> dict[ModuleKey, tuple[torch.Tensor, torch.Tensor]]:
    """The adapter's tensors as (A, scale * B) per (layer, our module, part), shapes checked."""
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in tensors.items():
        m = _KEY.search(key)
        if m is None or m.group(2) not in TARGETS or int(m.group(1)) >= \
                config.num_hidden_layers:
            unknown.append(key)
            continue
        found.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = tensor
    if unknown:
        raise ValueError(f"{who} has tensors for modules the engine does not adapt (only "
                         f"{', '.join(TARGETS)} of layers 0-{config.num_hidden_layers - 1}): "
                         f"{sorted(unknown)[:4]}")
    if not found:
        raise ValueError(f"{who} has no LoRA tensors (lora_A / lora_B weights)")
    shapes = part_shapes(config)
    weights = {}
    for (layer, peft_name), ab in sorted(found.items()):
        module, part = TARGETS[peft_name]
        where = f"{who}: layer {layer} {peft_name}"
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{where} has lora_{next(iter(ab))} without lora_"
                             f"{'B' if 'A' in ab else 'A'}")
        fan_in, outs = shapes[module]
        a, b = ab["A"], ab["B"]
        rows = sum(outs) if part is None else outs[part]
        if tuple(a.shape) != (rank, fan_in) or tuple(b.shape) != (rows, rank):
            raise ValueError(f"{where}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                             f"do not fit the model (expected {(rank, fan_in)} and "
                             f"{(rows, rank)} at rank {rank})")
        if not (a.is_floating_point() and b.is_floating_point()):
            raise ValueError(f"{where}: the weights are {a.dtype}, not floating point")
        a, b = a.to(dtype).contiguous(), (b.float() * scale).to(dtype).contiguous()
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            # (NaN or inf in a slot would reach every token of a step: 0 x inf is NaN)
            raise ValueError(f"{where}: the weights hold NaN or infinity (in {dtype}, "
                             f"scaled by {scale:g})")
        pieces = {part: b} if part is not None else dict(enumerate(b.split(outs)))
        for p, rows_b in pieces.items():
            if (layer, module, p) in weights:
                raise ValueError(f"{where}: the adapter adapts {module} part {p} twice (a "
                                 "fused module and one of its parts)")
            weights[(layer, module, p)] = (a, rows_b.contiguous())
    return weights
