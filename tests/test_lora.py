"""LoRA adapters (fairswitch/lora/): adapters written by PEFT itself, served beside the base model
and against PEFT's own outputs; several adapters in one batch, fewer slots than adapters, the
prefix cache kept apart per adapter, and the refusals."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from fairswitch import LLM, SamplingParams
from fairswitch.lora.request import LoRARequest

PROMPTS = [[9906, 1917, 11, 1268, 527, 499, 30], [791, 4062, 14198, 39935, 35308, 927, 279, 16053],
           [40, 1093, 311, 3137]]
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Reply(NamedTuple):
    status_code: int
    text: str


def write_adapter(base_dir: Path, out: Path, seed: int, rank: int = 8, alpha: int = 16,
                  modules: list[str] | None = None, **config) -> Path:
    """A LoRA adapter saved by PEFT over the checkpoint ``base_dir``, B drawn at random (PEFT
    starts it at zero, which would change nothing)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=modules or MODULES,
                     lora_dropout=0.0, init_lora_weights=False, **config)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.3)
    peft_model.save_pretrained(out)
    return out


def peft_greedy(base_dir: Path, adapter_dir: Path | None, prompt: list[int], n: int,
                device: str = "cpu") -> list[int]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(device)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    ids = torch.tensor([prompt], device=device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=n, do_sample=False,
                             attention_mask=torch.ones_like(ids), pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def adapters(llama_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "all": write_adapter(llama_dir, root / "all", seed=1),
        "qv": write_adapter(llama_dir, root / "qv", seed=2, rank=4, modules=["q_proj", "v_proj"]),
        "mlp": write_adapter(llama_dir, root / "mlp", seed=3, rank=16, alpha=8,
                             modules=["gate_proj", "down_proj"], use_rslora=True),
    }


def _llm(model_dir: Path, **kw) -> LLM:
    opts = dict(enable_lora=True, max_loras=2, max_lora_rank=16, num_gpu_blocks=64,
                max_model_len=128, swap_space=0.01)
    opts.update(kw)
    return LLM(str(model_dir), **opts)


def test_adapters_match_peft_in_one_batch(llama_dir, adapters):
    """Greedy tokens of requests with three adapters (two slots: one waits for a slot) and none,
    all queued together, equal PEFT's for the same adapter."""
    llm = _llm(llama_dir)
    params = SamplingParams(max_tokens=8, temperature=0.0)
    names = ["all", "qv", None, "mlp", "all"]
    lora = {name: LoRARequest(name, i + 1, str(path)) for i, (name, path)
            in enumerate(adapters.items())}
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(names))]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False,
                        lora_request=[lora[n] if n else None for n in names])
    for out, prompt, name in zip(outs, prompts, names):
        want = peft_greedy(llama_dir, adapters[name] if name else None, prompt, 8)
        assert list(out.outputs[0].token_ids) == want, name
        assert out.lora_request == (lora[name] if name else None)
    base = [list(o.outputs[0].token_ids) for o in outs]
    assert base[0] != peft_greedy(llama_dir, None, prompts[0], 8)  # the adapter matters
    llm.shutdown()


@pytest.fixture(scope="module")
def expected(llama_dir, adapters) -> dict:
    """PEFT's greedy tokens (10) for each prompt under each adapter and none."""
    return {(name, i): peft_greedy(llama_dir, adapters.get(name), p, 10)
            for name in ("all", "qv", "mlp", None) for i, p in enumerate(PROMPTS)}


def _requests(adapters: dict[str, Path]) -> dict[str, LoRARequest]:
    return {name: LoRARequest(name, i + 1, str(path))
            for i, (name, path) in enumerate(adapters.items())}


@pytest.mark.parametrize("tp,mode", [(1, "swap"), (1, "recompute"), (2, "swap")])
def test_adapters_through_preemption_and_tensor_parallelism(llama_dir, adapters, expected,
                                                           tp, mode):
    """A cache too small for the batch: requests with adapters are swapped out (or recomputed)
    and back, keeping their adapter; at TP=2 each rank holds its share of every slot."""
    lora = _requests(adapters)
    llm = _llm(llama_dir, num_gpu_blocks=10, block_size=4, max_model_len=32,
               tensor_parallel_size=tp, preemption_mode=mode, swap_space=0.05, enable_prefix_caching=False)
    names = ["all", "qv", "mlp", None, "all", "mlp"]
    idx = [i % len(PROMPTS) for i in range(len(names))]
    outs = llm.generate([{"prompt_token_ids": PROMPTS[i]} for i in idx],
                        SamplingParams(max_tokens=10, temperature=0.0), use_tqdm=False,
                        lora_request=[lora[n] if n else None for n in names])
    assert llm.engine.scheduler.num_preemptions > 0
    for out, name, i in zip(outs, names, idx):
        assert list(out.outputs[0].token_ids) == expected[(name, i)], (name, i)
    llm.shutdown()


def test_prefix_cache_is_kept_apart_per_adapter(llama_dir, adapters, expected):
    """Equal prompts share cached KV only under the same adapter (the KV differs)."""
    lora = _requests(adapters)
    llm = _llm(llama_dir, block_size=4)
    params = SamplingParams(max_tokens=10, temperature=0.0)
    prompt = {"prompt_token_ids": PROMPTS[1]}
    cached = []
    for name in ("all", "qv", None, "all", None):
        out = llm.generate(prompt, params, use_tqdm=False,
                           lora_request=lora[name] if name else None)[0]
        assert list(out.outputs[0].token_ids) == expected[(name, 1)]
        cached.append(out.num_cached_tokens)
    assert cached[:3] == [0, 0, 0] and cached[3] > 0 and cached[4] > 0
    llm.shutdown()


def _edited(src: Path, dst: Path, **config) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(config)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def test_bad_adapters_are_refused_before_anything_runs(llama_dir, adapters, tmp_path):
    lora = _requests(adapters)
    prompt = {"prompt_token_ids": PROMPTS[0]}
    plain = LLM(str(llama_dir), num_gpu_blocks=32, max_model_len=64)
    with pytest.raises(ValueError, match="enable_lora=True"):
        plain.generate(prompt, use_tqdm=False, lora_request=lora["all"])
    plain.shutdown()
    llm = _llm(llama_dir, max_lora_rank=8)
    head = write_adapter(llama_dir, tmp_path / "head", seed=4, modules=["q_proj", "lm_head"])
    cases = [
        (LoRARequest("mlp", 3, str(adapters["mlp"])), "rank 16, above max_lora_rank=8"),
        (LoRARequest("x", 9, str(tmp_path / "nowhere")), "is not a folder"),
        (LoRARequest("head", 10, str(head)), "does not adapt"),
        (LoRARequest("dora", 11, str(_edited(adapters["qv"], tmp_path / "dora",
                                             use_dora=True))), "DoRA"),
        (LoRARequest("bias", 12, str(_edited(adapters["qv"], tmp_path / "bias",
                                             bias="all"))), "biases"),
        (LoRARequest("save", 13, str(_edited(adapters["qv"], tmp_path / "save",
                                             modules_to_save=["lm_head"]))), "modules_to_save"),
    ]
    for request, message in cases:
        with pytest.raises(ValueError, match=message):
            llm.generate(prompt, use_tqdm=False, lora_request=request)
    llm.generate(prompt, SamplingParams(max_tokens=2), use_tqdm=False, lora_request=lora["qv"])
    with pytest.raises(ValueError, match="lora_int_id 2 is adapter 'qv'"):
        llm.generate(prompt, use_tqdm=False,
                     lora_request=LoRARequest("other", 2, str(adapters["all"])))
    with pytest.raises(ValueError, match="1 prompts but 2 values of lora_request"):
        llm.generate(prompt, use_tqdm=False, lora_request=[lora["qv"], None])
    with pytest.raises(ValueError, match="lora_request has invalid values"):
        llm.generate(prompt, use_tqdm=False, lora_request="qv")
    for bad in (dict(lora_name="", lora_int_id=1, lora_path="x"),
                dict(lora_name="a", lora_int_id=0, lora_path="x"),
                dict(lora_name="a", lora_int_id=1)):
        with pytest.raises(ValueError):
            LoRARequest(**bad)
    assert not llm.engine.has_unfinished_requests()
    llm.shutdown()


def test_server_serves_adapters_by_model_name(llama_dir, adapters, expected, tmp_path):
    """--lora-modules as vLLM's: /v1/models lists the adapters with the base as parent, a
    request names one by 'model' (chat, completions, streams, embeddings), and with runtime
    updating adapters are loaded and unloaded by name."""
    import openai

    from fairswitch.config import EngineConfig
    from fairswitch.engine.async_engine import AsyncEngine
    from fairswitch.server import BackgroundServer, ServerSettings, build_app

    engine = AsyncEngine.from_config(EngineConfig.from_kwargs(
        model=str(llama_dir), enable_lora=True, max_loras=2, num_gpu_blocks=64,
        max_model_len=128))
    settings = ServerSettings(served_model_names=["base"], lora_modules={
        "all": str(adapters["all"]), "qv": str(adapters["qv"])}, allow_runtime_lora_updating=True)
    try:
        with BackgroundServer(build_app(engine, settings, shutdown_engine=False)) as srv:
            client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0)
            models = {m.id: m for m in client.models.list().data}
            assert list(models) == ["base", "all", "qv"]
            assert models["qv"].parent == "base" and models["qv"].root == str(adapters["qv"])
            assert client.models.retrieve("all").parent == "base"

            def tokens(model: str, i: int, stream: bool = False) -> list[int]:
                if stream:
                    chunks = client.completions.create(
                        model=model, prompt=PROMPTS[i], max_tokens=10, temperature=0.0,
                        stream=True, extra_body={"return_token_ids": True})
                    return [t for c in chunks for t in (c.choices[0].token_ids or [])]
                out = client.completions.create(model=model, prompt=PROMPTS[i], max_tokens=10,
                                                temperature=0.0,
                                                extra_body={"return_token_ids": True})
                assert out.model == model if model != "base" else out.model == "base"
                return out.choices[0].token_ids

            assert tokens("all", 0) == expected[("all", 0)]
            assert tokens("qv", 2, stream=True) == expected[("qv", 2)]
            assert client.responses.create(model="qv", input="Hi", max_output_tokens=4
                                           ).model == "qv"
            assert tokens("base", 1) == expected[(None, 1)]
            with pytest.raises(openai.NotFoundError, match="base, all, qv"):
                tokens("mlp", 0)
            emb = [client.embeddings.create(model=m, input=PROMPTS[0]).data[0].embedding
                   for m in ("base", "all")]
            assert emb[0] != emb[1]
            with urllib.request.urlopen(f"{srv.url}/metrics", timeout=60) as r:
                metrics = r.read().decode()
            assert 'lora_requests_info{model_name="base",max_lora="2",' in metrics

            def post(path: str, body: dict) -> Reply:
                req = urllib.request.Request(f"{srv.url}{path}", json.dumps(body).encode(),
                                             {"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(req, timeout=60) as r:
                        return Reply(r.status, r.read().decode())
                except urllib.error.HTTPError as e:
                    return Reply(e.code, e.read().decode())

            r = post("/v1/load_lora_adapter", {"lora_name": "mlp",
                                               "lora_path": str(adapters["mlp"])})
            assert r.status_code == 200 and "added successfully" in r.text
            assert tokens("mlp", 1) == expected[("mlp", 1)]
            assert post("/v1/load_lora_adapter", {"lora_name": "mlp", "lora_path": "x"}
                        ).status_code == 400
            bad = post("/v1/load_lora_adapter", {"lora_name": "bad",
                                                 "lora_path": str(tmp_path / "none")})
            assert bad.status_code == 400 and "not a folder" in bad.text
            assert post("/v1/load_lora_adapter", {"lora_name": "base",
                                                  "lora_path": str(adapters["qv"])}
                        ).status_code == 400
            r = post("/v1/unload_lora_adapter", {"lora_name": "all"})
            assert r.status_code == 200 and "removed successfully" in r.text
            assert post("/v1/unload_lora_adapter", {"lora_name": "all"}).status_code == 404
            with pytest.raises(openai.NotFoundError):
                tokens("all", 0)
            # Loaded again under the same name: a fresh id, its KV cached apart.
            assert post("/v1/load_lora_adapter", {"lora_name": "all",
                                                  "lora_path": str(adapters["qv"])}
                        ).status_code == 200
            assert tokens("all", 2) == expected[("qv", 2)]
    finally:
        engine.shutdown()


def test_lora_modules_are_checked_at_start(llama_dir, adapters):
    from fairswitch.cli.serve import lora_modules
    from fairswitch.config import EngineConfig
    from fairswitch.engine.async_engine import AsyncEngine
    from fairswitch.server import ServerSettings, build_app

    assert lora_modules(["a=/x/y", '{"name": "b", "path": "/z", "base_model_name": "m"}']) \
        == {"a": "/x/y", "b": "/z"}
    for bad, message in ((["a"], "not name=path"), (["a=/x", "a=/y"], "given twice"),
                         (["{bad"], "not valid JSON"), (['{"name": "a"}'], "not name=path")):
        with pytest.raises(ValueError, match=message):
            lora_modules(bad)
    plain = AsyncEngine.from_config(EngineConfig.from_kwargs(
        model=str(llama_dir), num_gpu_blocks=64, max_model_len=64))
    try:
        with pytest.raises(ValueError, match="add --enable-lora"):
            build_app(plain, ServerSettings(lora_modules={"a": str(adapters["qv"])}),
                      shutdown_engine=False)
    finally:
        plain.shutdown()
    engine = AsyncEngine.from_config(EngineConfig.from_kwargs(
        model=str(llama_dir), enable_lora=True, max_lora_rank=8, num_gpu_blocks=64,
        max_model_len=64))
    try:
        with pytest.raises(ValueError, match="above max_lora_rank=8"):
            build_app(engine, ServerSettings(lora_modules={"m": str(adapters["mlp"])}),
                      shutdown_engine=False)
    finally:
        engine.shutdown()


def test_a_request_waiting_for_a_slot_lets_base_requests_pass(llama_dir, adapters):
    """One slot, held by a long request on one adapter: a request on another adapter waits for
    it, requests without an adapter run at once, and those on the busy slot's adapter wait
    behind the waiting one (so its slot frees: it cannot starve)."""
    lora = _requests(adapters)
    llm = _llm(llama_dir, max_loras=1)
    engine = llm.engine
    greedy = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    short = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    engine.add_request(prompt_token_ids=PROMPTS[0], params=greedy, request_id="long",
                       lora_request=lora["all"])
    engine.step()
    for rid, name in (("other", "qv"), ("base", None), ("same", "all")):
        engine.add_request(prompt_token_ids=PROMPTS[1], params=short, request_id=rid,
                           lora_request=lora[name] if name else None)
    first: dict[str, int] = {}
    finished: dict[str, int] = {}
    for step in range(1, 200):
        for out in engine.step():
            first.setdefault(out.request_id, step)
            if out.finished:
                finished[out.request_id] = step
        if not engine.has_unfinished_requests():
            break
    assert first["base"] <= 3  # passed the one waiting for a slot
    assert finished["long"] < first["other"] < first["same"]
    assert engine.scheduler.adapters.users == [0]
    llm.shutdown()


def test_non_finite_adapters_are_refused(llama_dir, adapters, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = shutil.copytree(adapters["qv"], tmp_path / "nan")
    tensors = load_file(bad / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, bad / "adapter_model.safetensors")
    llm = _llm(llama_dir)
    with pytest.raises(ValueError, match="NaN or infinity"):
        llm.generate({"prompt_token_ids": PROMPTS[0]}, use_tqdm=False,
                     lora_request=LoRARequest("nan", 7, str(bad)))
    llm.shutdown()


def test_ranks_take_the_drivers_adapter_not_its_folder(llama_dir, adapters, expected, tmp_path):
    """At TP=2 the workers copy into their slots the weights the driver read: folders removed
    after their requests were added change nothing (a worker reading them would fail)."""
    copies = {name: shutil.copytree(adapters[name], tmp_path / name) for name in ("all", "qv")}
    lora = {name: LoRARequest(name, i + 1, str(d)) for i, (name, d) in enumerate(copies.items())}
    llm = _llm(llama_dir, max_loras=1, max_cpu_loras=2, tensor_parallel_size=2,
               max_model_len=64)
    params = SamplingParams(max_tokens=10, temperature=0.0)
    for name in ("all", "qv"):
        llm.engine.check_lora(lora[name])  # (read while the folders exist)
    for d in copies.values():
        shutil.rmtree(d)
    names = ["all", "qv", "all", "qv"]  # one slot: reloaded for each
    for name in names:
        out = llm.generate({"prompt_token_ids": PROMPTS[0]}, params, use_tqdm=False,
                           lora_request=lora[name])[0]
        assert list(out.outputs[0].token_ids) == expected[(name, 0)]
    llm.shutdown()


def test_phi3_adapters_on_its_fused_modules_match_peft(phi3_dir, tmp_path):
    """Phi-3 adapters target its fused qkv_proj and gate_up_proj (one A, B's rows for every
    part): PEFT's greedy tokens, at TP=1 and with each rank holding its share at TP=2."""
    path = write_adapter(phi3_dir, tmp_path / "phi3", seed=5,
                         modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    want = [peft_greedy(phi3_dir, path, p, 8) for p in PROMPTS]
    assert want[0] != peft_greedy(phi3_dir, None, PROMPTS[0], 8)  # the adapter matters
    params = SamplingParams(max_tokens=8, temperature=0.0)
    for tp in (1, 2):
        llm = _llm(phi3_dir, tensor_parallel_size=tp)
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False,
                            lora_request=LoRARequest("phi3", 1, str(path)))
        assert [list(o.outputs[0].token_ids) for o in outs] == want, tp
        llm.shutdown()
