"""Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2/2.5/3, Phi-3; Mixtral and Qwen3-MoE with
their experts, model/moe.py) over a flat token batch and paged KV.

The batch is the concatenation of every scheduled request's new tokens (``[num_tokens, hidden]``),
no padding; attention is the only place that needs per-request structure, and it gets it from the
attention backend's metadata. Projections are fused (q|k|v, gate|up) and split column-wise, so they
shard along the output dimension for tensor parallelism.

Tensor parallelism (``tp``, Megatron-style; distributed/shard_plan.py says which slice each rank
holds): a rank holds its query heads, its KV heads, its slice of the intermediate dim and of the
vocabulary. Column-parallel projections need no communication; the row-parallel ones (o_proj,
down_proj) and the embedding lookup sum their partial outputs over the ranks, the LM head gathers
its vocabulary slices. The attention backend runs unchanged on the local heads. With one rank the
layers are the plain ones: no collective and no masking run.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
import torch.nn.functional as F

from fairswitch.distributed.parallel_state import SINGLE, TPGroup
from fairswitch.distributed.shard_plan import Shard, ShardPlan, split_intermediate
from fairswitch.kv.kv_cache import KVLayer
from fairswitch.model.checkpoint_config import CheckpointConfig
from fairswitch.model.moe import SparseMoE
from fairswitch.model.quantization import Scaled, fp8_linear, unscaled


class Linear(nn.Module):
    """nn.Linear without the initializer: weights always come from a checkpoint or dummy fill.

    ``shard``: which slice of the TP=1 weight this rank's is (None: all of it), for the loader;
    a bias splits with the weight's output rows, and is whole when the input columns split."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype | None = None, shard: Shard | None = None) -> None:
        super().__init__()
        self.shard = shard
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype),
                                 requires_grad=False) if bias else None
        self.lora: Any = None  # LoRA adapters' slots (lora/weights.py), when served
        # FP8 weights (model/quantization.py): the weight in float8_e4m3fn, its scale
        self.weight_scale: torch.Tensor | None = None
        self.one: torch.Tensor | None = None
        self.out_dtype: torch.dtype | None = None
        self.quant_ops: Any = None

    @property
    def takes_fp8(self) -> bool:
        """Whether a ``Scaled`` fp8 input saves this projection its quantization: fp8 weights
        without LoRA (whose adapters read the input in the model's dtype)."""
        return self.weight_scale is not None and self.lora is None

    def matmul(self, x: torch.Tensor | Scaled, defer: bool = False) -> torch.Tensor | Scaled:
        """``x @ weight.T`` (no bias), in fp8 for quantized weights (``fp8_linear``)."""
        if self.weight_scale is not None:
            return fp8_linear(x, self.weight, self.weight_scale, self.one, self.quant_ops,
                              self.out_dtype, defer)
        return F.linear(x, self.weight)

    def forward(self, x: torch.Tensor | Scaled, defer: bool = False) -> torch.Tensor | Scaled:
        """``defer``: the caller's next op can scale the rows (``Scaled``), so an fp8
        projection without bias or LoRA leaves them to it."""
        if self.weight_scale is None:
            y = F.linear(x, self.weight, self.bias)
        else:
            y = self.matmul(x, defer and self.takes_fp8 and self.bias is None)
            if self.bias is not None:
                y.add_(self.bias)
        if self.lora is not None:
            self.lora.add_to(x, y)
        return y


class RowParallelLinear(Linear):
    """The input columns split over the ranks: each computes a partial product, the sum of the
    partials over the ranks is the output. The bias, whole on every rank, is added once, after
    the sum."""

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 dtype: torch.dtype | None, shard: Shard, tp: TPGroup) -> None:
        super().__init__(in_features, out_features, bias, dtype, shard)
        self.tp = tp

    def forward(self, x: torch.Tensor | Scaled, defer: bool = False) -> torch.Tensor:
        """(``defer`` does not apply: each rank's partial has its own row scales.)"""
        partial = self.matmul(x)
        if self.lora is not None:  # (this rank's input columns: a partial sum as well)
            self.lora.add_to(x, partial)
        out = self.tp.all_reduce(partial)
        return out if self.bias is None else out.add_(self.bias)


def row_parallel(in_features: int, out_features: int, bias: bool, dtype: torch.dtype | None,
                 shard: Shard, tp: TPGroup) -> Linear:
    """A row-parallel layer, or a plain ``Linear`` with one rank (nothing to sum)."""
    if tp.size == 1:
        return Linear(in_features, out_features, bias, dtype, shard)
    return RowParallelLinear(in_features, out_features, bias, dtype, shard, tp)


class RMSNorm(nn.Module):
    """Holds the weight; ``ops.add_rmsnorm`` does the (fused residual-add +) normalization."""

    def __init__(self, dim: int, eps: float, ops: Any, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype), requires_grad=False)
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor | Scaled, residual: torch.Tensor | None = None,
                fp8: bool = False) -> torch.Tensor | Scaled:
        """rmsnorm(residual + x); residual, if given, becomes residual + x in place. ``x`` may
        be a ``Scaled`` matmul output; ``fp8``: return the result quantized (``Scaled``)."""
        x, x_scale = unscaled(x)
        if fp8:
            return Scaled(*self.ops.add_rmsnorm_fp8(x, residual, self.weight, self.eps, x_scale))
        return self.ops.add_rmsnorm(x, residual, self.weight, self.eps, x_scale)


def rope_inv_freq(theta: float, scaling: dict[str, Any] | None, head_dim: int) -> torch.Tensor:
    params = scaling or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / params["factor"]
    if rope_type == "llama3":
        factor = params["factor"]
        low, high = params["low_freq_factor"], params["high_freq_factor"]
        old_len = params["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled)
    if rope_type == "longrope":  # (the short factors: contexts within the original length)
        return inv_freq / torch.tensor(params["short_factor"], dtype=torch.float32)
    raise ValueError(f"rope scaling type {rope_type!r} is not supported "
                     "(supported: default, linear, llama3, longrope)")


def rope_attention_factor(scaling: dict[str, Any] | None, max_positions: int) -> float:
    """What cos and sin are multiplied by: LongRoPE's attention factor (as transformers
    computes it: from the context's extension, max_position_embeddings over the original
    length, unless the config gives it), 1 for the other RoPE types."""
    params = scaling or {}
    if params.get("rope_type") != "longrope":
        return 1.0
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])
    original = params["original_max_position_embeddings"]
    factor = params.get("factor") or max_positions / original
    return math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0


class RotaryEmbedding(nn.Module):
    def __init__(self, config: CheckpointConfig, max_positions: int) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(config.rope_theta, config.rope_scaling, config.head_dim)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = rope_attention_factor(config.rope_scaling, config.max_position_embeddings)
        # float32 caches [max_positions, head_dim], created on the model's device. Plain
        # attributes, not buffers: a cast of the model (.to(dtype)) leaves them in fp32.
        self.cos = emb.cos() * scale
        self.sin = emb.sin() * scale


class Attention(nn.Module):
    """This rank's heads: ``num_heads`` / ``num_kv_heads`` are the local counts, so the backend
    and this rank's KV cache see only them."""

    def __init__(self, config: CheckpointConfig, layer_idx: int, backend: Any, ops: Any,
                 dtype: torch.dtype | None = None, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        plan = ShardPlan.of(config, tp.size, tp.rank)
        self.layer_idx = layer_idx
        self.ops = ops
        self.num_heads = plan.num_heads
        self.num_kv_heads = plan.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size,
                               bias=config.qkv_bias, dtype=dtype, shard=plan.qkv())
        self.o_proj = row_parallel(self.q_size, config.hidden_size, config.o_proj_bias, dtype,
                                   plan.attn_out(), tp)
        if config.qk_norm:  # (Qwen3; one weight for every head, whole on every rank)
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, ops, dtype)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, ops, dtype)
        self.qk_norm = config.qk_norm
        self.backend = backend

    def forward(self, x: torch.Tensor | Scaled, positions: torch.Tensor, rope: RotaryEmbedding,
                kv_layer: KVLayer, meta: Any) -> torch.Tensor | Scaled:
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:  # each head normalized on its own (new tensors: rope_ rotates those)
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(q.shape)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(k.shape)
        self.ops.rope_(q, k, rope.cos, rope.sin, positions)  # rotates inside qkv
        out = self.backend.forward(q, k, v, kv_layer, meta)
        return self.o_proj(out.reshape(-1, self.q_size), defer=True)  # (the norm scales)


class MLP(nn.Module):
    """``intermediate``: the model's (TP=1) size; this rank holds its slice of it."""

    def __init__(self, hidden: int, intermediate: int, ops: Any,
                 dtype: torch.dtype | None = None, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        gate_up, down = split_intermediate(intermediate, tp.rank, tp.size)
        local = intermediate // tp.size
        self.gate_up_proj = Linear(hidden, 2 * local, dtype=dtype, shard=gate_up)
        self.down_proj = row_parallel(local, hidden, False, dtype, down, tp)
        self.ops = ops

    @property
    def takes_fp8(self) -> bool:
        """Whether the norm before it should hand it fp8 rows (``Linear.takes_fp8``)."""
        return self.gate_up_proj.takes_fp8

    def forward(self, x: torch.Tensor | Scaled) -> torch.Tensor | Scaled:
        """(``Scaled`` in and out with fp8 weights: the SiLU scales gate|up's rows and
        quantizes down_proj's input, the next layer's norm scales down_proj's rows.)"""
        gate_up, scale = unscaled(self.gate_up_proj(x, defer=True))
        if self.down_proj.takes_fp8:
            act = Scaled(*self.ops.silu_mul_fp8(gate_up, scale))
        else:
            act = self.ops.silu_mul(gate_up, scale)
        return self.down_proj(act, defer=True)


class DecoderLayer(nn.Module):
    """Pre-norm block. The residual stream is carried separately so each norm fuses the add:

        residual += h_prev; x = norm(residual); a = attn(x)
        residual += a;      x = norm(residual); h = mlp(x)      -> (h, residual)
    """

    def __init__(self, config: CheckpointConfig, layer_idx: int, backend: Any, ops: Any,
                 dtype: torch.dtype | None = None, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps, ops, dtype)
        self.self_attn = Attention(config, layer_idx, backend, ops, dtype, tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, ops, dtype)
        if config.moe is not None and config.moe.is_sparse(layer_idx):
            self.mlp: MLP | SparseMoE = SparseMoE(config.hidden_size, config.moe, ops, dtype, tp)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size, ops, dtype, tp)

    def forward(self, h: torch.Tensor | Scaled, residual: torch.Tensor | None,
                positions: torch.Tensor, rope: RotaryEmbedding, kv_layer: KVLayer, meta: Any
                ) -> tuple[torch.Tensor | Scaled, torch.Tensor]:
        """(``h`` and the returned output may be ``Scaled``: fp8 weights, model/quantization.py.)"""
        fp8 = self.self_attn.qkv_proj.takes_fp8
        if residual is None:  # first layer: the embeddings are the residual stream
            residual = h
            x = self.input_layernorm(h, fp8=fp8)
        else:
            x = self.input_layernorm(h, residual, fp8=fp8)
        a = self.self_attn(x, positions, rope, kv_layer, meta)
        x = self.post_attention_layernorm(a, residual, fp8=self.mlp.takes_fp8)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: CheckpointConfig, backend: Any, max_positions: int, ops: Any,
                 dtype: torch.dtype | None = None, tp: TPGroup = SINGLE) -> None:
        """``ops``: fairswitch.kernels.reference (torch) or .fused_ops (Triton), same functions.
        ``dtype``: of the weights, allocated so (default: torch's default dtype); building in
        float32 and casting peaked at 2x the bf16 weights' memory (measured).
        ``tp``: this rank's tensor-parallel group; raises ValueError if the heads, KV heads or
        intermediate size do not split over it (before allocating anything)."""
        super().__init__()
        self.config = config
        self.tp = tp
        # The embedding and LM head rows: this rank's vocabulary slice, zero-padded.
        self.vocab_shard = ShardPlan.of(config, tp.size, tp.rank).vocab()
        rows = self.vocab_shard.size
        self.embed_tokens = nn.Parameter(
            torch.empty(rows, config.hidden_size, dtype=dtype), requires_grad=False)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, backend, ops, dtype, tp)
            for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops, dtype)
        self.tie_word_embeddings = config.tie_word_embeddings
        self.lm_head = None if self.tie_word_embeddings else Linear(
            config.hidden_size, rows, dtype=dtype, shard=self.vocab_shard)
        self.rope = RotaryEmbedding(config, max_positions)
        self.lora: Any = None  # LoRA adapters' slots (lora/weights.attach_lora), when served

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embeddings of ``input_ids``: with several ranks, each looks up the ids in its slice
        (zeros for the others' ids) and the sum over the ranks has every row exactly once."""
        if self.tp.size == 1:
            return F.embedding(input_ids, self.embed_tokens)
        local = input_ids - self.vocab_shard.pieces[0][0]
        outside = (local < 0) | (local >= self.vocab_shard.size)
        h = F.embedding(local.masked_fill(outside, 0), self.embed_tokens)
        return self.tp.all_reduce(h.masked_fill_(outside.unsqueeze(-1), 0))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_layers: list[KVLayer], meta: Any,
                lora_slots: torch.Tensor | None = None) -> torch.Tensor:
        """``lora_slots``: each token's LoRA slot (-1: none); None: no token has one."""
        if self.lora is not None:
            self.lora.begin(lora_slots)
        h = self.embed(input_ids)
        residual = None
        for layer, kv_layer in zip(self.layers, kv_layers):
            h, residual = layer(h, residual, positions, self.rope, kv_layer, meta)
        return self.norm(h, residual)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits ``[tokens, vocab_size]``: with several ranks, the ranks' vocabulary
        slices gathered in rank order, the padding rows cut off."""
        weight = self.embed_tokens if self.lm_head is None else self.lm_head.weight
        if self.tp.size == 1:
            return F.linear(hidden, weight).float()
        logits = self.tp.all_gather(F.linear(hidden, weight), dim=-1)
        return logits[..., :self.config.vocab_size].float().contiguous()
