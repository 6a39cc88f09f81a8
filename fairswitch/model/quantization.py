"""FP8 weights (vLLM's ``--quantization fp8`` on a bf16 checkpoint): each projection of the
decoder layers (q|k|v, o, gate|up, down) is quantized once, after loading, to float8_e4m3fn with
one scale per output row (max |row| / 448); each step quantizes the projection's input per token
the same way (kernels: ``quantize_fp8_rows``) and multiplies in fp8 with both scales applied in
the matmul's epilogue (``torch._scaled_mm``, rowwise). The embeddings, the LM head and the norms
stay in the model's dtype.

Decode steps read the weights, so half the bytes is close to half the time where they dominate
(small batches); each projection gains one launch (its input's quantization).
"""

from __future__ import annotations

from typing import Any

import torch

FP8 = torch.float8_e4m3fn
_MAX = 448.0
PROJECTIONS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
METHODS = ("fp8",)


def quantize_weights_fp8_(model: Any, ops: Any) -> None:
    """Quantize ``model``'s projections in place (its share under tensor parallelism: a
    row-parallel rank's scales cover its input columns, and the partial outputs sum after each
    is scaled). ValueError for a dtype or shape the fp8 matmul does not take."""
    dtype = model.embed_tokens.dtype
    if dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"quantization='fp8' runs bfloat16 models (float32 on the CPU), not "
                         f"{dtype}: use --dtype bfloat16")
    for layer in model.layers:
        for name in PROJECTIONS:
            linear = layer.get_submodule(name)
            out_features, in_features = linear.weight.shape
            if out_features % 16 or in_features % 16:
                raise ValueError(f"quantization='fp8' needs projections whose sizes are "
                                 f"multiples of 16; {name} is {out_features} x {in_features} "
                                 "on this rank")
            w = linear.weight.data
            amax = w.abs().amax(dim=1).float()
            scale = torch.where(amax > 0, amax / _MAX, torch.ones_like(amax))
            q = (w.float() / scale[:, None]).clamp(-_MAX, _MAX).to(FP8)
            linear.weight = torch.nn.Parameter(q, requires_grad=False)
            linear.weight_scale = scale[None, :].contiguous()  # [1, out] float32
            linear.quant_ops = ops
            del w


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, ops: Any
               ) -> torch.Tensor:
    """``x @ dequantized(weight).T``, in fp8: ``x`` quantized per row, both scales applied in
    the matmul (bias, if any, is the caller's)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    xq, x_scale = ops.quantize_fp8_rows(x2)
    if x.is_cuda:
        y = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=scale, out_dtype=x.dtype)
    else:  # the same product in float32 (torch's CPU fp8 matmul is ~15x slower than this)
        y = ((xq.float() * x_scale) @ (weight.float() * scale.t()).t()).to(x.dtype)
    return y.view(*lead, weight.shape[0])
