"""GPU parity (run on the device): greedy outputs in bf16 agree with transformers' model."""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

import pytest
import torch

from fairswitch import LLM, SamplingParams
from fairswitch.config import EngineConfig
from helpers import hf_greedy

pytestmark = pytest.mark.gpu

PROMPTS = ["The quick brown fox", "def main():\n    ", "Paged attention is", "Hello there, how"]


def top1_agreement(a: list[int], b: list[int]) -> float:
    return sum(x == y for x, y in zip(a, b)) / max(len(a), 1)


@pytest.mark.parametrize("arch, declared", [("llama", None), ("qwen2", None), ("qwen3", None),
                                             ("llama", "float16")])
def test_bf16_and_fp16_greedy_agree_with_transformers(arch, declared, llama_dir, qwen_dir,
                                                      qwen3_dir, tmp_path):
    """bf16, or (declared float16) --dtype auto on a checkpoint whose config.json says float16,
    which runs in float16 and is compared with transformers in float16."""
    model_dir = {"llama": llama_dir, "qwen2": qwen_dir, "qwen3": qwen3_dir}[arch]
    dtype = torch.bfloat16
    if declared is not None:
        model_dir = Path(shutil.copytree(model_dir, tmp_path / "declared"))
        config = json.loads((model_dir / "config.json").read_text())
        config.update(dtype=declared, torch_dtype=declared)
        (model_dir / "config.json").write_text(json.dumps(config))
        dtype = getattr(torch, declared)
    llm = LLM(model=str(model_dir), device="cuda", dtype="auto" if declared else "bfloat16",
              num_gpu_blocks=512)
    assert llm.engine.dtype == dtype
    tok = llm.get_tokenizer()
    ids = [tok.encode(p) for p in PROMPTS]
    n = 32
    outs = llm.generate(ids, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True),
                        use_tqdm=False)
    agree, total, far = 0, 0, []
    for p, o in zip(ids, outs):
        ours = o.outputs[0].token_ids
        # Teacher-forced reference: HF's logits after our own prefix, so one early flip of a
        # near-tie does not count as every later token disagreeing.
        logits = _hf_next_logits(model_dir, p, ours, dtype)
        ref = logits.argmax(-1)
        agree += sum(x == y for x, y in zip(ours, ref.tolist()))
        total += n
        # A disagreement must be a near-tie in HF's own logits: within 4 bf16 ulps of its best
        # (bf16 keeps 8 significant bits, so rounding alone makes such ties at logit ~10).
        best = logits.max(-1).values
        gap = best - logits.gather(1, torch.tensor(ours, device=logits.device)[:, None])[:, 0]
        ulp = torch.exp2(torch.floor(torch.log2(best.abs().clamp_min(1e-6))) - 7)
        far += [(i, float(g), float(u)) for i, (g, u) in enumerate(zip(gap, ulp)) if g > 4 * u]
    assert not far, f"disagreements that are not near-ties (pos, gap, ulp): {far}"
    assert agree / total >= 0.95, (agree, total)


def test_fp32_cuda_exact(llama_dir):
    llm = LLM(model=str(llama_dir), device="cuda", dtype="float32", num_gpu_blocks=512)
    tok = llm.get_tokenizer()
    for p in PROMPTS:
        ids = tok.encode(p)
        ours = llm.generate([ids], SamplingParams(max_tokens=16, temperature=0.0,
                                                  ignore_eos=True), use_tqdm=False)
        assert ours[0].outputs[0].token_ids == hf_greedy(llama_dir, ids, 16, torch.float32,
                                                         "cuda")


def _hf_next_logits(model_dir, prompt: list[int], ours: list[int], dtype) -> torch.Tensor:
    """HF's logits [len(ours), vocab] (float32) at each position where we produced a token."""
    from helpers import hf_model

    model = hf_model(model_dir, dtype, "cuda")
    ids = torch.tensor([prompt + ours], device="cuda")
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1: len(prompt) - 1 + len(ours)]
    return logits.float()


def test_kv_cache_sized_from_gpu_memory(llama_dir):
    llm = LLM(model=str(llama_dir), device="cuda", gpu_memory_utilization=0.3)
    free, total = torch.cuda.mem_get_info()
    runner = llm.engine.runner
    kv_bytes = runner.num_blocks * llm.engine.kv.layout.block_bytes
    assert kv_bytes > 0.1 * total  # most of the 30% goes to the KV cache of a tiny model
    assert torch.cuda.memory_allocated() < 0.31 * total
    out = llm.generate("sized", SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mixtral", "qwen3_moe"])
def test_triton_and_graphs_match_torch_reference(arch, request):
    """fp32: Triton kernels + CUDA graphs give the same greedy tokens as the torch path, with
    chunked prefill, mixed steps and several graph buckets exercised (the experts' grouped
    GEMMs captured with their routing)."""
    model_dir = request.getfixturevalue("qwen_dir" if arch == "qwen2" else f"{arch}_dir")
    prompts = [p * (i + 1) for i, p in enumerate(PROMPTS)] * 3
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    runs = {}
    for name, opts in {"torch": dict(attention_backend="torch", enforce_eager=True),
                       "triton": dict(attention_backend="triton", enforce_eager=True),
                       "triton+graphs": dict(attention_backend="triton")}.items():
        llm = LLM(model=str(model_dir), device="cuda", dtype="float32", num_gpu_blocks=512,
                  max_num_batched_tokens=32, max_num_seqs=16, **opts)
        if name == "triton+graphs":
            assert llm.engine.runner.graphs is not None
        outs = llm.generate(prompts, params, use_tqdm=False)
        runs[name] = [o.outputs[0].token_ids for o in outs]
        llm.engine.check_accounting()
    assert runs["triton"] == runs["torch"]
    assert runs["triton+graphs"] == runs["torch"]


def test_llama3_8b_shapes_generate_with_graphs():
    llm = LLM(model="llama-3-8b", load_format="dummy", max_model_len=2048, max_num_seqs=64)
    assert llm.engine.runner.graphs is not None
    outs = llm.generate(["Hello"] * 40, SamplingParams(max_tokens=16, ignore_eos=True),
                        use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 16 for o in outs)


def test_qwen3_moe_shapes_generate_with_graphs():
    """Qwen3-30B-A3B's shapes (128 experts, 8 a token; dummy bf16 weights, 61 GB): decode steps
    in CUDA graphs, and the eager path's tokens for the same requests."""
    llm = LLM(model="qwen3-30b-a3b", load_format="dummy", max_model_len=1024, max_num_seqs=32,
              gpu_memory_utilization=0.95)
    assert llm.engine.runner.graphs is not None
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    outs = llm.generate([f"Hello {i}" for i in range(24)], params, use_tqdm=False)
    graphed = [o.outputs[0].token_ids for o in outs]
    assert all(len(t) == 12 for t in graphed)
    llm.engine.runner.graphs = llm.engine.runner.mixed_graphs = None  # (the same engine, eager)
    eager = [o.outputs[0].token_ids
             for o in llm.generate([f"Hello {i}" for i in range(24)], params, use_tqdm=False)]
    assert sum(a == b for a, b in zip(graphed, eager)) >= 20, (graphed, eager)


def test_building_llama3_8b_takes_only_its_bf16_weights():
    from fairswitch.model import loader
    from fairswitch.runner.attention import TorchAttentionBackend

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    cfg = loader.load_checkpoint_config(loader.resolve_model("llama-3-8b"))
    model = loader.build_model(cfg, TorchAttentionBackend(), 4096, torch.bfloat16,
                               torch.device("cuda"))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = torch.cuda.max_memory_allocated() - base
    print(f"weights {weights / 2**30:.2f} GiB, build peak {peak / 2**30:.2f} GiB")
    assert weights > 14 * 2**30 and peak <= weights + 64 * 2**20  # + the rotary caches


def test_gpu_memory_utilization_covers_the_cuda_graphs():
    """Sized from gpu_memory_utilization, the device memory in use after serving (weights, KV
    cache, the CUDA graphs' pools, cached activations) stays within that fraction: the graphs
    are weighed (a trial capture over the profiling cache) before the KV cache takes the rest."""
    gc.collect()
    torch.cuda.empty_cache()
    util, gib = 0.5, 1 << 30
    llm = LLM(model="llama-3-8b", load_format="dummy", max_model_len=4096, max_num_seqs=64,
              gpu_memory_utilization=util)
    runner = llm.engine.runner
    assert runner.graphs is not None and runner.mixed_graphs is not None
    # The largest steps: full-budget prompt chunks, then a full batch of decodes.
    prompts = [[1000 + i] * 3000 for i in range(2)] + [[7 + i] * 20 for i in range(62)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 8 for o in outs)
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    over = (total - free) - util * total
    kv = runner.num_blocks * llm.engine.kv.layout.block_bytes
    print(f"graphs {runner.graph_bytes / gib:.2f} GiB, KV {kv / gib:.1f} GiB, in use "
          f"{(total - free) / gib:.1f} of {total / gib:.1f} GiB, {over / gib:.2f} GiB over")
    assert runner.graph_bytes > 0
    assert -1.0 * gib <= over <= 0.25 * gib  # within the fraction, and not far below it


@pytest.mark.parametrize("copy_backend", ["torch", "cupy"])
@pytest.mark.parametrize("mode, early", [("swap", False), ("recompute", False), ("swap", True)])
def test_preemption_on_gpu_keeps_outputs(copy_backend, mode, early, llama_dir):
    """Forced preemption with async swap copies (CUDA streams / CuPy) leaves greedy outputs and
    the pools unchanged; with ``early``, resumed requests run in the step their swap-in is
    issued, the compute stream waiting on the copy's event. The reference runs its steps in
    turn; the engine under test launches each step behind the one in flight (async scheduling,
    graphed decode steps reading their inputs from it on the device)."""
    if copy_backend == "cupy":
        pytest.importorskip("cupy")
    prompts = [p * (i + 1) for i, p in enumerate(PROMPTS)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    ref = LLM(model=str(llama_dir), device="cuda", dtype="float32", num_gpu_blocks=512,
              async_scheduling=False)
    want = [o.outputs[0].token_ids for o in ref.generate(prompts, params, use_tqdm=False)]
    llm = LLM(model=str(llama_dir), device="cuda", dtype="float32", num_gpu_blocks=12,
              block_size=8, max_model_len=96, preemption_mode=mode, swap_space=0.01,
              swap_copy_backend=copy_backend, early_swap_in=early)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == want
    m = llm.engine.switch_metrics()
    assert m[f"preemptions_{mode}"] > 0
    llm.engine.check_accounting()
    assert llm.engine.kv.blocks.num_free_blocks == 12


@pytest.mark.parametrize("copy_backend", ["torch", "cupy"])
@pytest.mark.parametrize("early", [False, True])
def test_cpu_tier_fetch_on_gpu_keeps_outputs(copy_backend, early, llama_dir):
    """Multi-turn reuse through the CPU tier with async write-backs (their own stream) and
    fetches: each turn's greedy output equals a run without any reuse; with ``early``, the
    fetching request runs in the step its copy is issued."""
    from tests.test_prefix_reuse import evict_gpu_cache

    if copy_backend == "cupy":
        pytest.importorskip("cupy")
    opts = dict(device="cuda", dtype="float32", num_gpu_blocks=20, block_size=8,
                max_model_len=160)  # Triton kernels: blocks of 8 tokens at least
    plain = LLM(model=str(llama_dir), enable_prefix_caching=False, swap_space=0, **opts)
    tiered = LLM(model=str(llama_dir), swap_space=0.01, swap_copy_backend=copy_backend,
                 early_swap_in=early, **opts)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    tok = plain.get_tokenizer()
    history = tok.encode("User: explain how a CPU tier keeps KV for the next turn, briefly.")
    for msg in ["\nUser: and after an eviction?", "\nUser: thanks", ""]:
        want = plain.generate([history], params, use_tqdm=False)[0].outputs[0].token_ids
        got = tiered.generate([history], params, use_tqdm=False)[0].outputs[0].token_ids
        assert got == want
        evict_gpu_cache(tiered)
        history = history + want + tok.encode(msg)
    assert tiered.engine.switch_metrics()["reused_tokens_cpu"] > 0
    tiered.engine.check_accounting()


def _async_copy_round_trip(host: torch.Tensor) -> torch.Tensor:
    """Copy random data into ``host`` asynchronously and check it landed; returns the source."""
    src = torch.randn(host.shape, device="cuda", dtype=host.dtype)
    host.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(host.cuda(), src)
    return src


def test_pinned_swap_space_is_page_locked_and_released():
    """The swap space is registered (page-locked) at its exact size; async copies through it
    are right; dropping it unregisters the memory."""
    from fairswitch.kv.host_memory import pinned_empty

    host = pinned_empty((3, 5, 7), torch.float16)
    assert host.shape == (3, 5, 7) and host.is_pinned() and not host.any()
    src = _async_copy_round_trip(host)
    view = host[1]
    del host
    gc.collect()
    assert not view.is_pinned() and view.shape == (5, 7)  # unregistered, still readable
    assert torch.equal(view.cuda(), src[1])


def test_keep_pinned_serves_the_next_swap_space_without_pinning_again():
    from fairswitch.kv.host_memory import keep_pinned, pinned_empty

    with keep_pinned():
        first = pinned_empty((64, 1024), torch.float16)
        ptr = first.data_ptr()
        del first
        gc.collect()
        second = pinned_empty((32, 1024), torch.bfloat16)
        assert second.data_ptr() == ptr and second.is_pinned()
        _async_copy_round_trip(second)
        view = second[0]
        del second
        gc.collect()
        assert view.is_pinned()  # kept registered for the next engine
    assert not view.is_pinned()  # the scope is over: unused kept memory is unregistered


def test_no_triton_compile_while_serving_after_start_up(llama_dir):
    """The start-up warm-up compiles every eager variant a step can reach: steps above the mixed
    graphs' 512 tokens, prompts over a cached prefix, decodes beside them, graphed steps."""
    from fairswitch.runner.jit_watch import JIT_CLOCK

    llm = LLM(model=str(llama_dir), dtype="bfloat16", max_model_len=1024, max_num_seqs=16,
              enable_prefix_caching=True)
    assert JIT_CLOCK.install()  # this Triton has the hooks
    compiled = JIT_CLOCK.count
    history = "a longer history of the conversation " * 100  # ~600 tokens: an eager step
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    llm.generate([history + "first", "short one", "another short one"], params, use_tqdm=False)
    # a follow-up over the cached history, next to fresh decodes; then a mix at odd sizes
    llm.generate([history + "first and then more words " * 30, "x " * 7] + ["y"] * 9, params,
                 use_tqdm=False)
    assert JIT_CLOCK.count == compiled, "a kernel compiled after start-up"


def test_sampling_fields_on_gpu_match_the_cpu(llama_dir):
    """Logprobs, prompt logprobs of a prompt longer than max_num_seqs rows (they bypass the
    sample-rows buffer), penalties (their steps wait for the one in flight) and min_tokens on
    the CUDA path (graphs, async scheduling) give the CPU engine's tokens and values."""
    prompt = list(range(1000, 1090))
    params = [SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=3,
                             prompt_logprobs=2),
              SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True,
                             logit_bias={777: 4.0}, repetition_penalty=1.5,
                             frequency_penalty=0.7, presence_penalty=0.4, min_tokens=4)]
    opts = dict(model=str(llama_dir), dtype="float32", num_gpu_blocks=256, max_num_seqs=8)
    gpu = LLM(device="cuda", **opts).generate([prompt, prompt[:30]], params, use_tqdm=False)
    cpu = LLM(device="cpu", **opts).generate([prompt, prompt[:30]], params, use_tqdm=False)
    for g, c in zip(gpu, cpu):
        assert g.outputs[0].token_ids == c.outputs[0].token_ids
    for g, c in zip(gpu[0].outputs[0].logprobs, cpu[0].outputs[0].logprobs):
        assert set(g) == set(c)
        assert all(abs(g[t].logprob - c[t].logprob) < 1e-3 for t in g)
    for g, c in zip(gpu[0].prompt_logprobs[1:], cpu[0].prompt_logprobs[1:]):
        assert all(abs(g[t].logprob - c[t].logprob) < 1e-3 for t in set(g) & set(c))


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_fp8_kv_on_gpu_with_graphs_and_preemption(mode, monkeypatch):
    """The trained default model in bf16 with an fp8 KV cache (Triton kernels, CUDA graphs, async
    scheduling): its replies stay close to the bf16 KV's (teacher-forced top-1 agreement and KL,
    benchmarks/fp8_kv_accuracy.py's measure), and forced preemption moves fp8 blocks without
    changing a token."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import fp8_kv_accuracy

    base = EngineConfig.from_kwargs(device="cuda", max_model_len=512, num_gpu_blocks=256)
    fp8 = LLM.from_config(base.with_options(kv_cache_dtype="fp8"))
    figures = fp8_kv_accuracy.compare(LLM.from_config(base), fp8,
                                      fp8_kv_accuracy.PROMPTS[:8], max_tokens=32)
    assert figures["top1_agreement"] >= 0.95 and figures["kl_mean"] < 0.01, figures
    chats = [[{"role": "user", "content": p}] for p in fp8_kv_accuracy.PROMPTS[:6]]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in fp8.chat(chats, params, use_tqdm=False)]
    tight = LLM(device="cuda", kv_cache_dtype="fp8", num_gpu_blocks=10, block_size=16,
                max_model_len=160, preemption_mode=mode, swap_space=0.05)
    got = [o.outputs[0].token_ids for o in tight.chat(chats, params, use_tqdm=False)]
    assert got == want
    assert tight.engine.switch_metrics()[f"preemptions_{mode}"] > 0
    tight.engine.check_accounting()


def test_embeddings_on_gpu_match_the_cpu(llama_dir):
    """Embedding requests through the Triton kernels and the CUDA graphs (decode and mixed
    steps, whose output buffer the next replay overwrites) give the CPU's vectors."""
    texts = ["Hello world", "The quick brown fox " * 8, "Hi"]
    opts = dict(model=str(llama_dir), dtype="float32", num_gpu_blocks=256, max_model_len=256)
    cpu = LLM(device="cpu", **opts).embed(texts, use_tqdm=False)
    gpu = LLM(device="cuda", **opts).embed(texts * 2, use_tqdm=False)
    for i, out in enumerate(gpu):
        torch.testing.assert_close(torch.tensor(out.outputs.embedding),
                                   torch.tensor(cpu[i % 3].outputs.embedding),
                                   atol=1e-4, rtol=1e-3)


def test_lora_adapters_on_gpu_with_graphs_match_peft(llama_dir, tmp_path):
    """fp32: adapters mixed in decode and mixed-step CUDA graphs (the slots' matmuls captured,
    a slot reloaded between replays) give PEFT's greedy tokens on the GPU."""
    from test_lora import PROMPTS, peft_greedy, write_adapter

    from fairswitch.lora.request import LoRARequest

    dirs = {"all": write_adapter(llama_dir, tmp_path / "all", seed=1),
            "qv": write_adapter(llama_dir, tmp_path / "qv", seed=2, rank=4,
                                modules=["q_proj", "v_proj"]),
            "mlp": write_adapter(llama_dir, tmp_path / "mlp", seed=3, rank=16,
                                 modules=["gate_proj", "down_proj"])}
    lora = {name: LoRARequest(name, i + 1, str(d)) for i, (name, d) in enumerate(dirs.items())}
    llm = LLM(model=str(llama_dir), device="cuda", dtype="float32", num_gpu_blocks=512,
              max_num_batched_tokens=32, max_num_seqs=16, enable_lora=True, max_loras=2)
    assert llm.engine.runner.graphs is not None and llm.engine.runner.mixed_graphs is not None
    names = ["all", "qv", None, "mlp", "all", "qv", "mlp", None]
    prompts = [PROMPTS[i % len(PROMPTS)] * (1 + i % 3) for i in range(len(names))]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=12, temperature=0.0), use_tqdm=False,
                        lora_request=[lora[n] if n else None for n in names])
    for out, prompt, name in zip(outs, prompts, names):
        want = peft_greedy(llama_dir, dirs[name] if name else None, prompt, 12, "cuda")
        assert list(out.outputs[0].token_ids) == want, name
    llm.engine.check_accounting()


def test_fp8_weights_on_gpu_with_graphs(monkeypatch):
    """--quantization fp8 on the GPU (torch._scaled_mm, rowwise scales; the per-token
    quantization kernel in the CUDA graphs): the trained model's replies stay close to bf16's,
    as benchmarks/fp8_kv_accuracy.py --quantize weights measures, and an engine with LoRA slots
    runs over the quantized projections."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import fp8_kv_accuracy
    from workloads.chat_prompts import CHAT_PROMPTS

    base = EngineConfig.from_kwargs(device="cuda", max_model_len=512, kv_cache_memory_gib=1.0)
    fp8 = LLM.from_config(base.with_options(quantization="fp8"))
    assert fp8.engine.runner.graphs is not None
    layer = fp8.engine.runner.model.layers[0]
    assert layer.self_attn.qkv_proj.weight.dtype == torch.float8_e4m3fn
    # (as the benchmark measures it: a scale per step instead of per token gave 0.34 here)
    figures = fp8_kv_accuracy.compare(LLM.from_config(base), fp8, CHAT_PROMPTS, max_tokens=64)
    assert figures["top1_agreement"] >= 0.95, figures
    assert figures["kl_mean"] < 0.02, figures
    del fp8
    gc.collect()
    lora = LLM.from_config(base.with_options(quantization="fp8", enable_lora=True))
    out = lora.generate("Hello", SamplingParams(max_tokens=8, temperature=0.0), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 8


def test_fp8_weights_fused_kernels_compute_the_unfused_numbers(monkeypatch):
    """On the GPU, in CUDA graphs, the norms and the SiLU quantizing for the fp8 projections
    and scaling their rows (model/quantization.py's fusions) give the tokens and logprobs of
    quantizing and scaling around each matmul (the same rounding steps; the norm's sum may run
    in another order in the fused kernel, moving a rare fp8 code by one step)."""
    from fairswitch.model.llama import Linear

    base = EngineConfig.from_kwargs(device="cuda", max_model_len=256, kv_cache_memory_gib=0.5,
                                    quantization="fp8")
    params = SamplingParams(max_tokens=16, temperature=0.0, logprobs=3, ignore_eos=True)
    prompts = ["The quick brown fox", "Paged attention", "Once upon a time"]
    replies = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(Linear, "takes_fp8", property(lambda self: False))
        llm = LLM.from_config(base)
        assert llm.engine.runner.graphs is not None
        out = llm.generate(prompts, params, use_tqdm=False)
        replies.append([(o.outputs[0].token_ids, [{k: v.logprob for k, v in lp.items()}
                                                  for lp in o.outputs[0].logprobs])
                        for o in out])
        del llm
        gc.collect()
    for (ids_a, lps_a), (ids_b, lps_b) in zip(*replies):
        assert ids_a == ids_b
        for a, b in zip(lps_a, lps_b):
            assert a.keys() == b.keys()
            torch.testing.assert_close(list(a.values()), list(b.values()), rtol=0, atol=1e-3)
