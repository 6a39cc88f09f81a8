"""Fused elementwise kernels (kernels/fused_ops.py) against the torch reference.

Without CUDA they run in Triton's interpreter (conftest sets TRITON_INTERPRET=1) at small shapes.
"""

from __future__ import annotations

import pytest
import torch

from fairswitch.kernels import fused_ops as fused
from fairswitch.kernels import reference as ref
from fairswitch.model.llama import rope_inv_freq

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32] + ([torch.bfloat16, torch.float16] if DEVICE.type == "cuda" else [])
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _close(a, b, dtype):
    torch.testing.assert_close(a.float(), b.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [64, 96, 4096 if DEVICE.type == "cuda" else 256])
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rmsnorm(dtype, n, with_residual):
    g = torch.Generator(device=DEVICE).manual_seed(n)
    x = torch.randn((7, n), dtype=dtype, device=DEVICE, generator=g)
    w = torch.rand((n,), dtype=dtype, device=DEVICE, generator=g) + 0.5
    res = torch.randn((7, n), dtype=dtype, device=DEVICE, generator=g) if with_residual else None
    res_ref = res.clone() if res is not None else None
    out = fused.add_rmsnorm(x, res, w, 1e-5)
    want = ref.add_rmsnorm(x, res_ref, w, 1e-5)
    _close(out, want, dtype)
    if with_residual:
        _close(res, res_ref, dtype)  # the residual stream was updated in place, identically


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq, hk, d", [(4, 2, 32), (8, 1, 64), (7, 1, 128)])
def test_rope_in_place_on_fused_qkv_views(dtype, hq, hk, d):
    inv = rope_inv_freq(10000.0, None, d)
    freqs = torch.outer(torch.arange(512, dtype=torch.float32), inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(DEVICE), emb.sin().to(DEVICE)
    g = torch.Generator(device=DEVICE).manual_seed(d)
    t = 9
    qkv = torch.randn((t, (hq + 2 * hk) * d), dtype=dtype, device=DEVICE, generator=g)
    positions = torch.tensor([0, 1, 5, 17, 100, 200, 300, 400, 511], device=DEVICE)
    qkv_ref = qkv.clone()

    def views(buf):
        q, k, _ = buf.split([hq * d, hk * d, hk * d], dim=-1)
        return q.view(t, hq, d), k.view(t, hk, d)

    fused.rope_(*views(qkv), cos, sin, positions)
    ref.rope_(*views(qkv_ref), cos, sin, positions)
    _close(qkv, qkv_ref, dtype)  # q, k rotated; v untouched in both


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [32, 688, 1500])
def test_silu_mul(dtype, inter):
    g = torch.Generator(device=DEVICE).manual_seed(inter)
    gate_up = torch.randn((5, 2 * inter), dtype=dtype, device=DEVICE, generator=g)
    _close(fused.silu_mul(gate_up), ref.silu_mul(gate_up), dtype)


def _close_fp8(got, want):
    """Two per-row fp8 quantizations of nearly equal rows: the same scales, and codes equal
    but where a rounding boundary lies between the rows' values (then one e4m3 step apart)."""
    (q, scale), (q_ref, scale_ref) = got, want
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (q.shape[0], 1)
    torch.testing.assert_close(scale, scale_ref, rtol=1e-2, atol=0)
    x, x_ref = q.float() * scale, q_ref.float() * scale_ref
    assert (x - x_ref).abs().le(x_ref.abs() / 8 + scale_ref * 2.0 ** -9).all()
    assert (q.view(torch.uint8) == q_ref.view(torch.uint8)).float().mean() > 0.97


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rmsnorm_of_scaled_rows_and_to_fp8(dtype, with_residual):
    """FP8 weights' fusions (model/quantization.py): the rows times their pending scales first,
    the output in fp8 at a scale per row; the residual stream updated as the reference does;
    and, on the same kernels, the codes of the unfused path (scale, add+norm, quantize)."""
    g = torch.Generator(device=DEVICE).manual_seed(3)
    n = 4096 if DEVICE.type == "cuda" else 160
    x = torch.randn((6, n), dtype=dtype, device=DEVICE, generator=g) * 50
    x_scale = torch.rand((6, 1), device=DEVICE, generator=g) / 10
    w = torch.rand((n,), dtype=dtype, device=DEVICE, generator=g) + 0.5
    res = torch.randn((6, n), dtype=dtype, device=DEVICE, generator=g) if with_residual else None
    copies = [None if res is None else res.clone() for _ in range(5)]
    _close(fused.add_rmsnorm(x, copies[0], w, 1e-5, x_scale),
           ref.add_rmsnorm(x, copies[1], w, 1e-5, x_scale), dtype)
    got = fused.add_rmsnorm_fp8(x, copies[2], w, 1e-5, x_scale)
    _close_fp8(got, ref.add_rmsnorm_fp8(x, copies[3], w, 1e-5, x_scale))
    want = fused.quantize_fp8_rows(fused.add_rmsnorm(ref.scale_rows(x, x_scale), copies[4], w,
                                                     1e-5))
    assert torch.equal(got[1], want[1])
    assert torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8))
    if with_residual:
        for c in copies[:4]:
            _close(c, copies[4], dtype)
        assert torch.equal(copies[2], copies[4])
    _close_fp8(fused.add_rmsnorm_fp8(x, None, w, 1e-5), ref.add_rmsnorm_fp8(x, None, w, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [32, 1500, 5000])
def test_silu_mul_of_scaled_rows_and_to_fp8(dtype, inter):
    g = torch.Generator(device=DEVICE).manual_seed(inter)
    gate_up = torch.randn((4, 2 * inter), dtype=dtype, device=DEVICE, generator=g) * 8
    scale = torch.tensor([[0.1], [1e-3], [0.0], [1.5]], device=DEVICE)
    _close(fused.silu_mul(gate_up, scale), ref.silu_mul(gate_up, scale), dtype)
    gate_up[3, 5] = float("nan")  # (counts as 0 for the scale, stored as 0)
    got = fused.silu_mul_fp8(gate_up, scale)
    _close_fp8(got, ref.silu_mul_fp8(gate_up, scale))
    assert got[1][2].item() == 1.0 and not got[0][2].float().any()  # a zero row: scale 1
    # The unfused path on the same kernels, to the bit.
    want = fused.quantize_fp8_rows(fused.silu_mul(ref.scale_rows(gate_up, scale)))
    assert torch.equal(got[1], want[1])
    assert torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8))
    _close_fp8(fused.silu_mul_fp8(gate_up), ref.silu_mul_fp8(gate_up))


def test_empty_batches():
    x = torch.zeros((0, 64), device=DEVICE)
    assert fused.add_rmsnorm(x, None, torch.ones(64, device=DEVICE), 1e-5).shape == (0, 64)
    assert fused.silu_mul(torch.zeros((0, 64), device=DEVICE)).shape == (0, 32)
    q, scale = fused.silu_mul_fp8(torch.zeros((0, 64), device=DEVICE))
    assert q.shape == (0, 32) and scale.shape == (0, 1)
    q, scale = fused.add_rmsnorm_fp8(x, None, torch.ones(64, device=DEVICE), 1e-5)
    assert q.shape == (0, 64) and q.dtype == torch.float8_e4m3fn


def test_engine_with_fused_ops_matches_transformers_fp32(monkeypatch, llama_dir):
    """The whole model on the fused kernels (interpreted on CPU) keeps greedy parity in fp32."""
    from fairswitch import LLM, SamplingParams
    from fairswitch.runner.attention import TorchAttentionBackend
    from helpers import hf_greedy

    monkeypatch.setattr(TorchAttentionBackend, "ops", fused)
    llm = LLM(model=str(llama_dir), num_gpu_blocks=64, device=str(DEVICE), dtype="float32",
              attention_backend="torch", enforce_eager=True)
    assert llm.engine.runner.model.layers[0].mlp.ops is fused
    ids = llm.get_tokenizer().encode("The quick brown fox")
    out = llm.generate([ids], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
                       use_tqdm=False)
    assert out[0].outputs[0].token_ids == hf_greedy(llama_dir, ids, 8, device=str(DEVICE))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [64, 200, 4096 + 32 if DEVICE.type == "cuda" else 4128])
def test_quantize_fp8_rows(dtype, k):
    """Per-row fp8 quantization (FP8 weights' activations), a zero row included: the
    reference's scales and codes, bit for bit."""
    g = torch.Generator(device=DEVICE).manual_seed(k)
    x = torch.randn((5, k), dtype=dtype, device=DEVICE, generator=g) * torch.tensor(
        [1.0, 1e-3, 300.0, 0.0, 5.0], dtype=dtype, device=DEVICE)[:, None]
    q, scale = fused.quantize_fp8_rows(x)
    q_ref, scale_ref = ref.quantize_fp8_rows(x)
    torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)
    assert scale[3].item() == 1.0 and not q[3].float().any()
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    x[4, 7] = float("nan")  # a NaN counts as 0 for the scale and is stored as 0, in both
    q, scale = fused.quantize_fp8_rows(x)
    q_ref, scale_ref = ref.quantize_fp8_rows(x)
    assert torch.equal(scale, scale_ref) and q[4, 7].float().item() == 0.0
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    x[4, 7] = 0.0
    # Within half a step of e4m3 (3 mantissa bits), or of its subnormals' spacing 2^-9.
    err = (q.float() * scale - x.float()).abs()
    assert (err <= x.float().abs() / 16 + scale * 2.0 ** -10 * 1.001).all()
