"""FP8 weights (vLLM's ``--quantization fp8`` on a bf16 checkpoint, as vLLM does it): each
projection of the decoder layers (q|k|v, o, gate|up, down) is quantized once, after loading, to
float8_e4m3fn at one scale (max |W| / 448); each step quantizes the projection's input at one
dynamic scale the same way (kernels: ``quantize_fp8_tensor``) and multiplies in fp8, both scales
applied in the matmul's epilogue (``torch._scaled_mm``, tensorwise). The embeddings, the LM head
and the norms stay in the model's dtype.

Why per tensor, not a scale per weight row and per token (finer): on an H100, cuBLAS's fp8
matmuls with row scales took 1.2-1.7x the time of the tensorwise ones at M = 1-64 for Llama-3-8B's
shapes (down_proj at M=16: 44 against 26 us; bf16: 45 us), which left fp8 weights 1.06-1.10x
faster than bf16 per decode step instead of the bytes' 2x (docs/benchmarks.md).
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
            amax = w.abs().amax().float()
            scale = torch.where(amax > 0, amax / _MAX, torch.ones_like(amax))
            q = (w.float() / scale).clamp(-_MAX, _MAX).to(FP8)
            linear.weight = torch.nn.Parameter(q, requires_grad=False)
            linear.weight_scale = scale  # float32, 0-dim
            linear.quant_ops = ops
            del w


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, ops: Any
               ) -> torch.Tensor:
    """``x @ dequantized(weight).T``, in fp8: ``x`` quantized at one scale, both scales applied
    in the matmul (bias, if any, is the caller's)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    xq, x_scale = ops.quantize_fp8_tensor(x2)
    if x.is_cuda:
        y = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=scale, out_dtype=x.dtype)
    else:  # the same product in float32 (torch's CPU fp8 matmul is ~15x slower than this)
        y = ((xq.float() @ weight.float().t()) * (x_scale * scale)).to(x.dtype)
    return y.view(*lead, weight.shape[0])
