"""FP8 checkpoints: weights stored in float8_e4m3fn with their scales, as the Hub's FP8 models
are (what vLLM serves from their ``quantization_config``):

- ``quant_method: "fp8"``: transformers' FP8 (Qwen3-*-FP8, DeepSeek-style: a scale per
  128 x 128 block, ``weight_scale_inv``) and AutoFP8's (one scale per tensor, ``weight_scale``);
- ``"fbgemm_fp8"``: a scale per output channel (``weight_scale`` [out, 1]);
- ``"compressed-tensors"`` with float 8-bit weights (llm-compressor's FP8 / FP8_DYNAMIC /
  FP8_BLOCK schemes: per tensor, channel or block).

Each quantized tensor is read with its scale and dequantized on load (``dequantize``); the
engine then serves it through its own fp8 path (model/quantization.py: one scale per
projection, a scale per token for the activations) where the device has fp8 matmuls, or in the
model's dtype where it has not. So a per-tensor checkpoint whose fused parts (q|k|v, gate|up)
share a scale loads to the same codes (at TP=1: each rank scales its own share); other scales
are folded into the projection's one scale (the largest part's values keep their codes).
Projections the checkpoint keeps unquantized (compressed-tensors' ``ignore``) stay so. The checkpoints' static activation scales
(``input_scale``) and KV-cache scales are not used: activations are scaled per token, and an fp8
KV cache calibrates its own (kv/kv_cache.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fairswitch.config import QUANTIZATIONS as METHODS
# Checkpoint tensors that are scales, not weights (``<module>.<suffix>``).
WEIGHT_SCALES = ("weight_scale_inv", "weight_scale")
UNUSED_SCALES = ("input_scale", "k_scale", "v_scale", "kv_scale", "output_scale")
DEFAULT_BLOCK = (128, 128)  # transformers' FineGrainedFP8Config's weight_block_size


@dataclass(frozen=True)
class Fp8Checkpoint:
    """What a checkpoint's ``quantization_config`` says about its fp8 tensors."""
    method: str
    block: tuple[int, int] | None  # a block-scaled checkpoint's (rows, columns) per scale


def read_quantization_config(quant: Any, where: str) -> Fp8Checkpoint:
    """The fp8 format ``quant`` (config.json's ``quantization_config``) declares; ValueError,
    naming it, for any other quantization (int8/int4 weights, e5m2, ...)."""
    if not isinstance(quant, dict):
        raise ValueError(f"{where}: quantization_config must be an object, got {quant!r}")
    method = quant.get("quant_method")
    if method not in METHODS:
        raise ValueError(f"{where}: quantized checkpoints of quant_method {method!r} are not "
                         f"supported (supported: {', '.join(METHODS)} with float8_e4m3fn "
                         "weights; or bfloat16, float16, float32 weights)")
    if method == "compressed-tensors":
        return _compressed_tensors(quant, where)
    fmt = quant.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ValueError(f"{where}: fp8 weights in {fmt!r} are not supported (only e4m3)")
    return Fp8Checkpoint(method, _block(quant.get("weight_block_size"), where))


def _block(value: Any, where: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if (not isinstance(value, list) or len(value) != 2
            or not all(type(v) is int and v > 0 for v in value)):
        raise ValueError(f"{where}: a block size must be [rows, columns] of positive integers, "
                         f"got {value!r}")
    return value[0], value[1]


def _compressed_tensors(quant: dict[str, Any], where: str) -> Fp8Checkpoint:
    groups = quant.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ValueError(f"{where}: a compressed-tensors quantization_config needs "
                         "config_groups")
    blocks = set()
    for name, group in groups.items():
        weights = group.get("weights") if isinstance(group, dict) else None
        if not isinstance(weights, dict) or weights.get("num_bits") != 8 or weights.get(
                "type") != "float":
            raise ValueError(f"{where}: compressed-tensors group {name!r} has weights "
                             f"{weights!r}: only 8-bit float (fp8) weights are supported")
        strategy = weights.get("strategy")
        if strategy not in ("tensor", "channel", "block"):
            raise ValueError(f"{where}: compressed-tensors group {name!r}: weight strategy "
                             f"{strategy!r} is not supported (tensor, channel or block)")
        if strategy == "block":
            blocks.add(_block(weights.get("block_structure"), where))
    if len(blocks) > 1:
        raise ValueError(f"{where}: compressed-tensors groups of different block sizes: "
                         f"{sorted(blocks)}")
    return Fp8Checkpoint("compressed-tensors", blocks.pop() if blocks else None)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, fmt: Fp8Checkpoint,
               name: str) -> torch.Tensor:
    """``codes`` (float8_e4m3fn [out, in]) times ``scale`` in float32: one scale, one per
    output row ([out] or [out, 1]) or one per block ([ceil(out / rows), ceil(in / columns)],
    the block size declared or, where not, transformers' default 128 x 128). ValueError, naming
    the tensor, for a scale of any other shape or a non-finite one."""
    if codes.dim() != 2:
        raise ValueError(f"{name}: fp8 weights must be matrices, got shape {tuple(codes.shape)}")
    out, cols = codes.shape
    s = scale.float()
    if not torch.isfinite(s).all():
        raise ValueError(f"{name}'s scale holds NaN or inf")
    if s.numel() == 1:
        return codes.float() * s.reshape(())
    if tuple(s.shape) in ((out,), (out, 1)):
        return codes.float() * s.reshape(out, 1)
    if s.dim() == 2:
        rows, width = fmt.block or DEFAULT_BLOCK
        if s.shape == (-(-out // rows), -(-cols // width)):
            full = s.repeat_interleave(rows, 0).repeat_interleave(width, 1)[:out, :cols]
            return codes.float() * full
    raise ValueError(f"{name}: a scale of shape {tuple(s.shape)} does not fit a weight of "
                     f"shape {tuple(codes.shape)} (one scale, one per row, or one per "
                     f"{fmt.block or DEFAULT_BLOCK} block)")
