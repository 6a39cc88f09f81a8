"""FP8 weights (``quantization="fp8"``, model/quantization.py): the projections in e4m3 at one
scale each, their inputs quantized per token every step; on the CPU the same product runs in
float32, so the engine's logic is tested here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fairswitch import LLM, SamplingParams
from fairswitch.config import EngineConfig
from fairswitch.kernels import reference as ref
from fairswitch.model.quantization import fp8_linear
from workloads.chat_prompts import CHAT_PROMPTS

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def test_fp8_linear_is_the_dequantized_product():
    """What the fp8 matmul computes is exactly the product of the dequantized operands."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=g)
    w = torch.randn(32, 64, generator=g)
    scale = w.abs().amax() / 448
    wq = (w / scale).to(torch.float8_e4m3fn)
    y = fp8_linear(x, wq, scale, torch.ones(()), ref, torch.float32)
    xq, xs = ref.quantize_fp8_rows(x)
    want = (xq.float() * xs) @ (wq.float() * scale).t()
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    exact = x @ w.t()  # and close to the unquantized: e4m3 keeps 3 mantissa bits
    assert (y - exact).norm() / exact.norm() < 0.05


def test_fused_quantization_computes_what_the_unfused_does(monkeypatch):
    """The norms and the SiLU quantizing for the projection after them, and o_proj, gate|up and
    down_proj leaving their row scales to the op after them (``Scaled``), give the logits of
    quantizing and scaling around each matmul, bit for bit (each op rounds where it did)."""
    from fairswitch.model.llama import Linear
    from fairswitch.model.quantization import Scaled

    llm = LLM(quantization="fp8", dtype="float32", num_gpu_blocks=64, max_model_len=128)
    model = llm.engine.runner.model
    seen = []
    real = ref.add_rmsnorm_fp8
    monkeypatch.setattr(ref, "add_rmsnorm_fp8", lambda *a: seen.append(a[-1]) or real(*a))
    params = SamplingParams(max_tokens=6, temperature=0.0, logprobs=5, ignore_eos=True)

    def reply():
        out = llm.generate(["The quick brown fox", "Paged attention"], params, use_tqdm=False)
        return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in out]

    fused = reply()
    steps = 1 + 5  # a prefill and five decode steps (the two prompts batched together)
    assert len(seen) == steps * 2 * len(model.layers)  # two norms a layer quantized ...
    assert sum(s is None for s in seen) == steps  # ... and all but the first scaled rows
    x = Scaled(*ref.quantize_fp8_rows(torch.randn(3, model.config.hidden_size)))
    assert isinstance(model.layers[0].mlp(x), Scaled)
    monkeypatch.setattr(Linear, "takes_fp8", property(lambda self: False))
    seen.clear()
    unfused = reply()
    assert not seen and not isinstance(model.layers[0].mlp(x.rows.float() * x.scale), Scaled)
    assert fused == unfused
    llm.shutdown()


def test_fp8_weights_on_the_fused_kernels(monkeypatch):
    """The Triton kernels (interpreted on the CPU) that quantize and scale around the fp8
    matmuls give the torch reference's greedy tokens."""
    from fairswitch.kernels import fused_ops
    from fairswitch.runner.attention import TorchAttentionBackend

    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    replies = []
    for ops in (ref, fused_ops):
        monkeypatch.setattr(TorchAttentionBackend, "ops", ops)
        llm = LLM(quantization="fp8", dtype="float32", num_gpu_blocks=64, max_model_len=128,
                  enforce_eager=True)
        assert llm.engine.runner.model.layers[0].mlp.down_proj.quant_ops is ops
        out = llm.generate(["The quick brown fox", "Paged attention"], params, use_tqdm=False)
        replies.append([o.outputs[0].token_ids for o in out])
        llm.shutdown()
    assert replies[0] == replies[1]


def test_the_trained_model_replies_nearly_as_unquantized(monkeypatch):
    """The measure benchmarks/fp8_kv_accuracy.py --quantize weights records: top-1 agreement
    and next-token KL against the fp32 weights, greedy replies to chat prompts."""
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    import fp8_kv_accuracy

    base = EngineConfig.from_kwargs(dtype="float32", max_model_len=512, num_gpu_blocks=256)
    fp8 = LLM.from_config(base.with_options(quantization="fp8"))
    layer = fp8.engine.runner.model.layers[0]
    assert layer.mlp.down_proj.weight.dtype == torch.float8_e4m3fn
    assert fp8.engine.runner.model.embed_tokens.dtype == torch.float32
    figures = fp8_kv_accuracy.compare(LLM.from_config(base), fp8, CHAT_PROMPTS[:6],
                                      max_tokens=32)
    assert figures["positions"] >= 100
    assert figures["top1_agreement"] >= 0.9, figures
    assert figures["kl_mean"] < 0.05, figures


def test_fp8_weights_under_preemption_and_with_two_ranks():
    """Quantized weights under swap preemption give the replies of a run without it (each
    token's activations have their own scale: a reply does not depend on its batch, but where
    the matmul's sums, run in another order, make a near tie go the other way); at TP=2, where
    each rank scales its own share of a row-parallel projection's input, near TP=1's."""
    prompts = [[{"role": "user", "content": p}] for p in CHAT_PROMPTS[:6]]
    params = SamplingParams(max_tokens=32, temperature=0.0)
    one = LLM(quantization="fp8", dtype="float32", num_gpu_blocks=256, max_model_len=256)
    want = [o.outputs[0].token_ids for o in one.chat(prompts, params, use_tqdm=False)]
    one.shutdown()
    tight = LLM(quantization="fp8", dtype="float32", num_gpu_blocks=10, block_size=16,
                max_model_len=160, swap_space=0.05, preemption_mode="swap")
    swapped = [o.outputs[0].token_ids for o in tight.chat(prompts, params, use_tqdm=False)]
    assert tight.engine.scheduler.num_preemptions > 0
    tight.engine.check_accounting()
    tight.shutdown()
    assert sum(a == b for a, b in zip(swapped, want)) >= 5, (swapped, want)
    two = LLM(quantization="fp8", dtype="float32", num_gpu_blocks=256, max_model_len=256,
              tensor_parallel_size=2)
    got = [o.outputs[0].token_ids
           for o in two.chat(prompts[:4], SamplingParams(max_tokens=8, temperature=0.0),
                             use_tqdm=False)]
    two.shutdown()
    assert sum(a == b[:8] for a, b in zip(got, want)) >= 3, (got, want)


def test_bad_quantization_is_refused():
    with pytest.raises(ValueError, match="quantization must be one of fp8, fbgemm_fp8, "):
        LLM(quantization="int4")
    # vLLM's names of FP8 checkpoints' methods: only for a checkpoint quantized so
    with pytest.raises(ValueError, match="declares no quantization"):
        LLM(quantization="fbgemm_fp8", num_gpu_blocks=32)
    with pytest.raises(ValueError, match="runs bfloat16 models"):
        LLM(quantization="fp8", dtype="float16", num_gpu_blocks=32)
