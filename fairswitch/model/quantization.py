"""FP8 weights (vLLM's ``--quantization fp8`` on a bf16 checkpoint): each projection of the
decoder layers (q|k|v, o, gate|up, down) is quantized once, after loading, to float8_e4m3fn at one
scale (max |W| / 448); each step quantizes the projection's input with a scale per token (one
Triton launch: kernels' ``quantize_fp8_rows``), multiplies in fp8 with the weight's scale in the
matmul's epilogue (``torch._scaled_mm``, tensorwise), and scales each output row by its token's
scale. The embeddings, the LM head and the norms stay in the model's dtype.

Why this split (H100 measurements, docs/benchmarks.md):
- a scale per token, not one per step (vLLM's dynamic per-tensor scale): one step's scale is set
  by its largest activation, and the first positions' (attention sinks: a prompt's first token,
  the padding rows of a CUDA graph) are orders of magnitude above the rest, so every other token
  lost its precision (top-1 agreement with bf16 0.34 on the trained model); a token's own scale
  also keeps its output independent of the batch it runs in.
- the row scales applied after the matmul, not inside it: cuBLAS's fp8 matmuls with row scales
  took 1.2-1.7x the time of tensorwise ones at M = 1-64 (down_proj at M=16: 44 against 26 us;
  bf16 45 us).

Fused (one rank, no LoRA): the norms and the SiLU quantize their own output for the projection
after them (``ops.add_rmsnorm_fp8``, ``ops.silu_mul_fp8``), and o_proj, gate|up and down_proj
leave their rows' scales to the op after them (``Scaled``: the add+RMSNorm, the SiLU), which
applies them where it reads the rows: six launches a layer fewer than quantizing and scaling
around each matmul, with the same rounding steps (each kernel rounds where the unfused path
does; on the GPU the norm's sum may run in another order in the fused kernel, which moves a few
fp8 codes in a million by one step).
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import torch

from fairswitch.kernels import reference

logger = logging.getLogger(__name__)

PROJECTIONS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def check_fp8_weights(device: torch.device, dtype: torch.dtype) -> None:
    """ValueError, before the weights load, where fp8 weights cannot run: a dtype other than
    bfloat16 (float32 on the CPU), a GPU without fp8 (compute capability below 8.9: Ada,
    Hopper and newer have it)."""
    if dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"quantization='fp8' runs bfloat16 models (float32 on the CPU), not "
                         f"{dtype}: use --dtype bfloat16")
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise ValueError(f"quantization='fp8' needs a GPU with fp8 matmuls (compute "
                         f"capability 8.9 or newer: Ada, Hopper); {name} has "
                         f"{torch.cuda.get_device_capability(device)}")


def fp8_checkpoint_in_fp8(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether an FP8 checkpoint's weights (model/fp8_checkpoint.py, dequantized on load) are
    served in fp8 (where ``check_fp8_weights`` allows), else in ``dtype`` (logged, not refused:
    the checkpoint's values serve on any device)."""
    try:
        check_fp8_weights(device, dtype)
    except ValueError as e:
        logger.warning("serving the FP8 checkpoint's weights in %s: %s", dtype, e)
        return False
    return True


def quantize_weights_fp8_(model: Any, ops: Any, keep: set[int] = frozenset()) -> None:
    """Quantize ``model``'s projections in place (its share under tensor parallelism: a
    row-parallel rank's scales cover its input columns, and the partial outputs sum after each
    is scaled), but those whose weight's id is in ``keep`` (an FP8 checkpoint's unquantized
    layers). ValueError for a dtype or shape the fp8 matmul does not take."""
    check_fp8_weights(model.embed_tokens.device, model.embed_tokens.dtype)
    for layer in model.layers:
        for name in PROJECTIONS:
            linear = _submodule(layer, name)
            if linear is None or id(linear.weight) in keep:  # (None: a layer's experts)
                continue
            out_features, in_features = linear.weight.shape
            if out_features % 16 or in_features % 16:
                raise ValueError(f"quantization='fp8' needs projections whose sizes are "
                                 f"multiples of 16; {name} is {out_features} x {in_features} "
                                 "on this rank")
            w = linear.weight.data
            scale = reference.fp8_scale(w.abs().amax().float())  # float32, 0-dim
            q = torch.empty(w.shape, dtype=reference.FP8_DTYPE, device=w.device)
            for i in range(0, out_features, 4096):  # (a float32 copy of 4096 rows at a time)
                q[i:i + 4096] = reference.quantize_fp8(w[i:i + 4096], scale)
            linear.weight = torch.nn.Parameter(q, requires_grad=False)
            linear.out_dtype = w.dtype
            linear.weight_scale = scale
            linear.one = torch.ones((), device=scale.device)  # (the matmul's other scale)
            linear.quant_ops = ops


def _submodule(layer: torch.nn.Module, name: str) -> torch.nn.Module | None:
    try:
        return layer.get_submodule(name)
    except AttributeError:
        return None


class Scaled(NamedTuple):
    """The rows ``rows * scale`` not yet multiplied out: an fp8 matmul's input (``rows`` in
    float8_e4m3fn) or its output left for the next op to scale (``rows`` in the model's dtype).
    ``rows``: [T, N]; ``scale``: float32 [T, 1]."""

    rows: torch.Tensor
    scale: torch.Tensor


def unscaled(x: torch.Tensor | Scaled) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(rows, their pending scale or None)."""
    return (x.rows, x.scale) if isinstance(x, Scaled) else (x, None)


def fp8_linear(x: torch.Tensor | Scaled, weight: torch.Tensor, scale: torch.Tensor,
               one: torch.Tensor, ops: Any, dtype: torch.dtype,
               defer: bool = False) -> torch.Tensor | Scaled:
    """``x @ dequantized(weight).T`` in ``dtype``, in fp8: ``x`` quantized per row (or already:
    a ``Scaled`` fp8 input), the weight's scale applied in the matmul and the rows' after it
    (in ``dtype``, as ``reference.scale_rows``) or, with ``defer``, left to the op after it (a
    ``Scaled`` output, its rows 2-D whatever ``x``'s leading dims). Bias, if any, is the
    caller's."""
    if isinstance(x, Scaled):
        assert x.rows.dtype == reference.FP8_DTYPE and x.rows.dim() == 2, x.rows.shape
        (xq, x_scale), lead = x, x.rows.shape[:-1]
    else:
        lead = x.shape[:-1]
        xq, x_scale = ops.quantize_fp8_rows(x.reshape(-1, x.shape[-1]).contiguous())
    if not len(xq):
        y = torch.empty(len(xq), weight.shape[0], dtype=dtype, device=xq.device)
    elif xq.is_cuda:
        y = torch._scaled_mm(xq, weight.t(), scale_a=scale, scale_b=one, out_dtype=dtype)
    else:  # the same product in float32 (torch's CPU fp8 matmul is ~15x slower than this)
        y = ((xq.float() @ weight.float().t()) * scale).to(dtype)
    if defer:
        return Scaled(y, x_scale)
    return y.mul_(x_scale).view(*lead, weight.shape[0])
