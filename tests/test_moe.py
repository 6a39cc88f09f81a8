"""Mixture-of-experts models (Mixtral, Qwen3-MoE; model/moe.py): the grouped-GEMM kernel
(kernels/fused_moe.py, in Triton's interpreter without CUDA) against the torch reference, the
routing, the config fields as transformers reads them, the loader's expert tensors in both
layouts, tensor parallelism and the refusals. Greedy parity with transformers' models is in
test_parity.py."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from fairswitch import LLM, SamplingParams
from fairswitch.kernels import fused_moe as moe_kernel
from fairswitch.kernels import reference as ref
from fairswitch.model.checkpoint_config import CheckpointConfig
from fairswitch.model.moe import route

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
PROMPTS = ["The experts of a sparse layer", "def route(x):", "Hi", "one two three four five"]


def _experts(tokens, experts, top_k, hidden, inter, dtype, seed):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, device=DEVICE)  # noqa: E731
    x = rand(tokens, hidden).to(dtype)
    w13 = (rand(experts, 2 * inter, hidden) / hidden ** 0.5).to(dtype)
    w2 = (rand(experts, hidden, inter) / inter ** 0.5).to(dtype)
    weights, ids = route(rand(tokens, experts), top_k, renormalize=True)
    return x, w13, w2, weights, ids


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, experts, top_k, hidden, inter", [
    (1, 4, 2, 64, 32),  # a decode step of one: two experts, the others' blocks unused
    (5, 8, 3, 48, 24),  # sizes that are no multiple of the tiles (masked rows and columns)
    (40, 4, 2, 64, 64),  # 20 rows an expert: blocks of 32, padded
    (150, 2, 1, 32, 16),  # blocks of 64, several an expert
])
def test_fused_moe_is_the_reference(dtype, tokens, experts, top_k, hidden, inter):
    args = _experts(tokens, experts, top_k, hidden, inter, dtype, seed=tokens)
    got = moe_kernel.fused_moe(*args)
    want = ref.fused_moe(*args)
    assert got.dtype == dtype and got.shape == (tokens, hidden)
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])


def test_fused_moe_of_no_tokens():
    args = _experts(0, 4, 2, 32, 16, torch.float32, seed=0)
    assert moe_kernel.fused_moe(*args).shape == (0, 32)


@pytest.mark.parametrize("tokens, experts, top_k, block_m", [(1, 8, 2, 16), (37, 5, 3, 16),
                                                              (200, 3, 2, 64)])
def test_align_groups_every_row_once_by_expert(tokens, experts, top_k, block_m):
    g = torch.Generator().manual_seed(tokens)
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
    rows, block_expert = moe_kernel.moe_align(ids.to(DEVICE), experts, block_m)
    rows, block_expert = rows.cpu(), block_expert.cpu()
    n = tokens * top_k
    assert len(rows) == len(block_expert) * block_m
    assert len(block_expert) == -(-n // block_m) + min(experts, n)  # (the bound: any routing)
    flat = ids.reshape(-1)
    seen = []
    for b, e in enumerate(block_expert.tolist()):
        block = rows[b * block_m:(b + 1) * block_m]
        if e == experts:  # past the used blocks: padding only
            assert (block == n).all()
            continue
        real = block[block < n]
        assert (flat[real] == e).all() and len(real) > 0
        assert (block[len(real):] == n).all()  # padding at the end of an expert's run
        seen += real.tolist()
    assert sorted(seen) == list(range(n))
    assert block_expert.tolist() == sorted(block_expert.tolist())


def test_route_renormalizes_as_the_model_says():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.5, 0.0, 3.0, 0.0]])
    w, ids = route(logits, 2, renormalize=False)
    probs = torch.softmax(logits, -1)
    assert ids.tolist() == [[0, 1], [2, 0]]
    torch.testing.assert_close(w, probs.gather(1, ids))
    w, _ = route(logits, 2, renormalize=True)
    torch.testing.assert_close(w.sum(-1), torch.ones(2))


def _moe_fields(model_type: str, **fields) -> dict:
    return {"architectures": ["MixtralForCausalLM" if model_type == "mixtral"
                              else "Qwen3MoeForCausalLM"], "model_type": model_type,
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
            "num_attention_heads": 8, "vocab_size": 1000, **fields}


@pytest.mark.parametrize("model_type, fields", [
    ("mixtral", {}),
    ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 1,
                 "norm_topk_prob": False, "mlp_only_layers": [0]}),  # (Mixtral has neither)
    ("qwen3_moe", {}),
    ("qwen3_moe", {"num_experts": 16, "num_experts_per_tok": 4, "moe_intermediate_size": 32,
                   "norm_topk_prob": True, "decoder_sparse_step": 2, "mlp_only_layers": [3]}),
    ("qwen3_moe", {"num_local_experts": 12, "mlp_only_layers": None}),
])
def test_expert_fields_are_those_transformers_model_builds(model_type, fields):
    """Which layers have experts, how many, how many a token, their size and whether the top
    k renormalize: as transformers' model (built on the meta device) has them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = _moe_fields(model_type, num_key_value_heads=4, **fields)
    hf_raw = dict(raw)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(hf_raw.pop("model_type"),
                                                                   **hf_raw))
    moe = CheckpointConfig.from_dict(raw).moe
    sparse = [layer.mlp for layer in hf.model.layers if hasattr(layer.mlp, "experts")]
    assert moe.sparse_layers == {i for i, layer in enumerate(hf.model.layers)
                                 if hasattr(layer.mlp, "experts")}
    gate, experts = sparse[0].gate, sparse[0].experts
    assert (moe.num_experts, moe.top_k) == (gate.num_experts, gate.top_k)
    assert moe.norm_topk_prob == getattr(gate, "norm_topk_prob", True)  # (Mixtral's always)
    assert moe.intermediate_size == experts.down_proj.shape[-1]


@pytest.mark.parametrize("fields, match", [
    ({"num_experts_per_tok": 9, "num_experts": 8}, "more than the 8 experts"),
    ({"num_experts": 0}, "num_experts must be a positive integer"),
    ({"moe_intermediate_size": 12.5}, "moe_intermediate_size must be a positive integer"),
    ({"mlp_only_layers": [4]}, "mlp_only_layers must be a list of layer indices"),
    ({"norm_topk_prob": "yes"}, "norm_topk_prob must be true or false"),
])
def test_bad_expert_fields_are_refused_by_name(fields, match):
    with pytest.raises(ValueError, match=match):
        CheckpointConfig.from_dict(_moe_fields("qwen3_moe", **fields))


def _tokens(llm: LLM, params: SamplingParams = GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def mixtral_tokens(mixtral_dir):
    return _tokens(LLM(model=str(mixtral_dir), num_gpu_blocks=128))


def test_stacked_expert_tensors_load_as_per_expert_ones(mixtral_dir, mixtral_tokens, tmp_path):
    """transformers 5's in-memory layout (mlp.experts.gate_up_proj [E, 2I, H], down_proj
    [E, H, I]) as a checkpoint: the same model as Mixtral's w1/w3/w2 per expert."""
    tensors = load_file(mixtral_dir / "model.safetensors")
    stacked = {name: t for name, t in tensors.items() if ".experts." not in name}
    layers = {n.split(".")[2] for n in tensors if ".experts." in n}
    experts = json.loads((mixtral_dir / "config.json").read_text())["num_local_experts"]
    for i in layers:
        pre = f"model.layers.{i}.block_sparse_moe.experts"
        w = lambda e, k: tensors[f"{pre}.{e}.{k}.weight"]  # noqa: E731
        stacked[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([w(e, "w1"), w(e, "w3")]) for e in range(experts)])
        stacked[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack(
            [w(e, "w2") for e in range(experts)])
    ckpt = shutil.copytree(mixtral_dir, tmp_path / "stacked",
                           ignore=shutil.ignore_patterns("*.safetensors"))
    save_file(stacked, ckpt / "model.safetensors")
    assert _tokens(LLM(model=str(ckpt), num_gpu_blocks=128)) == mixtral_tokens


@pytest.mark.parametrize("change, match", [
    ("drop", "lacks weights for: .*w2"),  # an expert's down projection missing
    ("extra", "no parameter for: .*experts.4.w1"),  # an expert past num_local_experts
])
def test_bad_expert_tensors_are_refused_by_name(mixtral_dir, tmp_path, change, match):
    tensors = load_file(mixtral_dir / "model.safetensors")
    pre = "model.layers.1.block_sparse_moe.experts"
    if change == "drop":
        del tensors[f"{pre}.3.w2.weight"]
    else:
        tensors[f"{pre}.4.w1.weight"] = tensors[f"{pre}.0.w1.weight"].clone()
    ckpt = shutil.copytree(mixtral_dir, tmp_path / change,
                           ignore=shutil.ignore_patterns("*.safetensors"))
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(ValueError, match=match):
        LLM(model=str(ckpt), num_gpu_blocks=64)


def test_experts_for_a_dense_layer_are_refused(qwen3_moe_dir, tmp_path):
    """Qwen3-MoE's layer 1 is dense here (mlp_only_layers): experts there are no model's."""
    tensors = load_file(qwen3_moe_dir / "model.safetensors")
    tensors["model.layers.1.mlp.experts.0.gate_proj.weight"] = tensors[
        "model.layers.0.mlp.experts.0.gate_proj.weight"].clone()
    ckpt = shutil.copytree(qwen3_moe_dir, tmp_path / "dense",
                           ignore=shutil.ignore_patterns("*.safetensors"))
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(ValueError, match="no parameter for: .*layers.1.mlp.experts.0.gate_proj"):
        LLM(model=str(ckpt), num_gpu_blocks=64)


def test_two_ranks_give_one_ranks_tokens(qwen3_moe_dir):
    """Each rank holds its slice of every expert; the router is whole on both, the partial
    outputs sum: the tokens of one rank, and preemption by swap changes nothing."""
    longer = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    want = _tokens(LLM(model=str(qwen3_moe_dir), num_gpu_blocks=128), longer)
    llm = LLM(model=str(qwen3_moe_dir), tensor_parallel_size=2, num_gpu_blocks=12,
              block_size=4, max_model_len=48, swap_space=0.01, preemption_mode="swap")
    try:
        assert _tokens(llm, longer) == want
        assert llm.engine.scheduler.num_preemptions > 0
        llm.engine.check_accounting()
    finally:
        llm.shutdown()


def test_dummy_experts_are_the_same_at_two_ranks(qwen3_moe_dir):
    """Dummy weights: every rank draws each stacked expert parameter whole (the TP=1 sequence)
    and keeps its slice, so two ranks give one rank's tokens."""
    want = _tokens(LLM(model=str(qwen3_moe_dir), load_format="dummy", seed=5,
                       num_gpu_blocks=64))
    llm = LLM(model=str(qwen3_moe_dir), load_format="dummy", seed=5, num_gpu_blocks=64,
              tensor_parallel_size=2)
    try:
        assert _tokens(llm) == want
    finally:
        llm.shutdown()


def test_fp8_weights_leave_the_experts_in_the_models_dtype(qwen3_moe_dir):
    llm = LLM(model=str(qwen3_moe_dir), num_gpu_blocks=64, quantization="fp8")
    model = llm.engine.runner.model
    assert model.layers[0].self_attn.qkv_proj.weight.dtype == torch.float8_e4m3fn
    assert model.layers[0].mlp.w13.dtype == torch.float32  # (layer 0: experts)
    assert model.layers[1].mlp.gate_up_proj.weight.dtype == torch.float8_e4m3fn  # (dense)
    assert all(len(t) == 8 for t in _tokens(llm))


def test_lora_with_experts_is_refused(mixtral_dir):
    with pytest.raises(ValueError, match="LoRA adapters .* mixture-of-experts"):
        LLM(model=str(mixtral_dir), enable_lora=True)


_COMPILE = """
import sys
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import triton
from fairswitch.kernels.fused_moe import _moe_gemm_kernel as fn

constexprs = dict(A_ROW_DIV=2, MUL_WEIGHT=True, DOT_PRECISION="tf32", BLOCK_M=16, BLOCK_N=64,
                  BLOCK_K=64)
types = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "weight_ptr": "*fp32",
         "rows_ptr": "*i32", "block_expert_ptr": "*i64"}
signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in fn.arg_names}
src = ASTSource(fn=fn, signature=signature,
                constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
print(triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"])
"""


def test_the_grouped_gemm_compiles_for_sm90_to_tensor_core_matmuls():
    """The interpreter runs the kernel above but compiles nothing: compiled here for the
    H100/H200 in bf16 (a child process without the interpreter), its products on the tensor
    cores."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("no ptxas for the CUDA backend")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    child = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, env=env,
                           cwd=root, timeout=300)
    assert child.returncode == 0, child.stderr.decode()[-3000:]
    assert "mma.sync" in child.stdout.decode() or "wgmma" in child.stdout.decode()
