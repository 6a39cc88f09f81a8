"""benchmarks/decode_step.py's roofline accounting (the timed run itself needs a GPU): what a
decode step must read and multiply, by kind, on real model modules, and the roofline of a step
with the matmuls bound by their weight reads below the ridge batch and by their FLOPs above it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fairswitch import LLM

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(autouse=True)
def bench_imports(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH_DIR))  # the script imports its siblings
    yield
    for name in ("decode_step", "profile_step"):
        sys.modules.pop(name, None)


@pytest.mark.parametrize("fixture, tied", [("llama_dir", False), ("qwen_dir", True)])
def test_step_traffic_counts_every_weight_once_and_the_lm_head_as_a_matmul(
        request, fixture, tied):
    from decode_step import step_traffic

    llm = LLM(model=str(request.getfixturevalue(fixture)), dtype="float32", num_gpu_blocks=64,
              max_model_len=1024)
    model = llm.engine.runner.model
    t = step_traffic(model, kv_token_bytes=1000)
    embed = model.embed_tokens
    table = embed.numel() * 4
    assert t["all_weight_bytes"] == sum(p.numel() * 4 for p in model.parameters())
    # every weight is in exactly one kind; an untied table is looked up row by row, not read
    assert t["matmul_bytes"] + t["other_bytes"] + (0 if tied else table) == t["all_weight_bytes"]
    assert t["matmul_bytes"] == 4 * t["matmul_params"]
    assert t["embedding_row_bytes"] == (0 if tied else embed.shape[1] * 4)
    layer = model.layers[0]
    per_layer = sum(m.weight.numel() for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                              layer.mlp.gate_up_proj, layer.mlp.down_proj))
    lm_head = embed if tied else model.lm_head.weight
    assert t["matmul_params"] == len(model.layers) * per_layer + lm_head.numel()
    assert t["kv_token_bytes"] == 1000


def test_roofline_takes_the_slower_of_reads_and_flops_for_the_matmuls():
    from decode_step import step_roofline

    # 1 GB of matmul weights (0.5 G params), 10 MB of norms, 8 KB embedding rows, 100 KB/token
    t = {"matmul_params": 500_000_000, "matmul_bytes": 1_000_000_000,
         "embedding_row_bytes": 8192, "other_bytes": 10_000_000,
         "all_weight_bytes": 1_500_000_000, "kv_token_bytes": 100_000}
    bw, peak = 4e12, 800e12  # ridge: peak / bw = 200 FLOP per byte, a batch of 200 in bf16
    small = step_roofline(t, batch=64, kv_tokens=64_000, copy_bw=bw, peak_flops=peak)
    reads = (1e9 + 10e6 + 64 * 8192 + 64_000 * 100_000) / bw
    assert not small["matmul_compute_bound"]
    assert small["roofline_ms"] == pytest.approx(reads * 1e3)
    assert small["memory_roofline_ms"] == pytest.approx((1.5e9 + 6.4e9) / bw * 1e3)
    big = step_roofline(t, batch=256, kv_tokens=256_000, copy_bw=bw, peak_flops=peak)
    flops = 2 * 256 * 500_000_000 / peak
    rest = (10e6 + 256 * 8192 + 256_000 * 100_000) / bw
    assert big["matmul_compute_bound"]
    assert big["roofline_ms"] == pytest.approx((flops + rest) * 1e3)
    assert big["roofline_ms"] > (1e9 / bw + rest) * 1e3  # more than the reads alone


def test_profile_step_sorts_kernels_by_kind():
    from profile_step import kind_of, per_kind_ms

    names = {
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1": "matmul",
        "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT": "matmul",
        "void gemv2T_kernel_val<int, int, __nv_bfloat16, float, 128, 16, 4, 4>": "matmul",
        "_decode_split_kernel": "attention", "_decode_reduce_kernel": "attention",
        "_write_kv_kernel": "kv write", "_add_rmsnorm_kernel": "norm/rope/act",
        "ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)": "collective",
        "Memcpy DtoD (Device -> Device)": "copy/gather",
        "void at::native::(anonymous namespace)::indexSelectLargeIndex<float>": "copy/gather",
        "void at::native::reduce_kernel<512, 1, ArgMaxOps<float>>": "sampling",
        "void at::native::vectorized_elementwise_kernel<4, FillFunctor<float>>": "other",
    }
    assert {n: kind_of(n) for n in names} == names
    assert per_kind_ms({"_rope_kernel": 3000.0, "nvjet_x": 9000.0, "_silu_mul_kernel": 3000.0},
                       steps=3) == {"matmul": 3.0, "norm/rope/act": 2.0}
    assert list(per_kind_ms({"_rope_kernel": 3000.0, "nvjet_x": 9000.0}, 3)) == [
        "matmul", "norm/rope/act"]


def test_profile_step_counts_steps_by_kv_writes():
    from profile_step import profiled_steps

    calls = {"_write_kv_kernel": 6 * 32, "nvjet_x": 4 * 6 * 32, "_rope_kernel": 6 * 32}
    assert profiled_steps(calls, num_layers=32, default=5) == 6
    assert profiled_steps({"nvjet_x": 10}, num_layers=32, default=5) == 5
