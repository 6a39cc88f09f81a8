"""The sampling a checkpoint's generation_config.json recommends: the defaults of requests that
leave them unset, in LLM.generate and through the server, as vLLM's ``--generation-config auto``
(its default); ``vllm`` keeps the built-in ones."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest

from fairswitch import LLM, SamplingParams
from fairswitch.config import EngineConfig
from fairswitch.engine.async_engine import AsyncEngine
from fairswitch.model.generation_config import read_generation_config
from fairswitch.server import BackgroundServer, ServerSettings, build_app

PROMPT = "The quick brown fox"
RECOMMENDED = {"temperature": 0.0, "top_k": 20, "repetition_penalty": 1.3, "max_new_tokens": 5,
               "do_sample": True, "max_length": 4096}  # (the last two: ignored, as vLLM does)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, write_checkpoint) -> Path:
    path = write_checkpoint(tmp_path_factory.mktemp("gen") / "ckpt")
    (path / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": 100257, **RECOMMENDED}))
    return path


def _write(folder: Path, **fields) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "generation_config.json").write_text(json.dumps(fields))
    return folder


def test_the_file_gives_the_eos_ids_and_the_sampling(ckpt, tmp_path):
    gen = read_generation_config(ckpt)
    assert gen.eos_token_id == 100257
    assert gen.sampling == {"temperature": 0.0, "top_k": 20, "repetition_penalty": 1.3}
    assert gen.sampling_defaults() == {**gen.sampling, "max_tokens": 5}
    plain = read_generation_config(ckpt, "vllm")  # the EOS ids stay the checkpoint's
    assert (plain.eos_token_id, plain.sampling_defaults()) == (100257, {})
    other = read_generation_config(ckpt, str(_write(tmp_path / "other", top_p=0.5)))
    assert (other.eos_token_id, other.sampling_defaults()) == (100257, {"top_p": 0.5})
    assert read_generation_config(None).sampling_defaults() == {}  # a shipped config: none
    # transformers' own default is no recommendation (vLLM reads the file's diff from them)
    assert read_generation_config(_write(tmp_path / "tf", top_k=50, top_p=0.9)).sampling == {
        "top_p": 0.9}


@pytest.mark.parametrize("fields, match", [
    ({"temperature": -1}, "generation_config.json: temperature must be"),
    ({"top_p": "0.9"}, "generation_config.json: top_p must be a number"),
    ({"max_new_tokens": 0}, "generation_config.json: max_new_tokens must be at least 1"),
    ({"eos_token_id": "x"}, "generation_config.json: eos_token_id must be a token id"),
])
def test_a_bad_value_is_named_with_its_file(tmp_path, fields, match):
    ckpt = _write(tmp_path / "ckpt", **fields)
    with pytest.raises(ValueError, match=match):
        read_generation_config(ckpt)
    if "eos_token_id" not in fields:  # a sampling value not used is not read: vllm, a folder
        assert read_generation_config(ckpt, "vllm").sampling_defaults() == {}
        other = _write(tmp_path / "other", top_p=0.5)
        assert read_generation_config(ckpt, str(other)).sampling == {"top_p": 0.5}
        with pytest.raises(ValueError, match=match.replace("generation_config.json", "")):
            read_generation_config(None, str(_write(tmp_path / "bad", **fields)))
    with pytest.raises(ValueError, match="neither 'auto', 'vllm' nor a folder"):
        read_generation_config(None, str(tmp_path / "nowhere"))


def test_llm_generate_without_params_takes_the_recommended_sampling(ckpt):
    llm = LLM(model=str(ckpt), num_gpu_blocks=64, max_model_len=128)
    default = llm.get_default_sampling_params()
    assert (default.temperature, default.top_k, default.repetition_penalty,
            default.max_tokens) == (0.0, 20, 1.3, 5)
    out = llm.generate([PROMPT], use_tqdm=False)[0].outputs[0]
    want = llm.generate([PROMPT], SamplingParams(temperature=0.0, top_k=20, max_tokens=5,
                                                 repetition_penalty=1.3), use_tqdm=False)
    assert out.token_ids == want[0].outputs[0].token_ids and len(out.token_ids) == 5
    llm.shutdown()
    builtin = LLM(model=str(ckpt), num_gpu_blocks=64, max_model_len=128,
                  generation_config="vllm").get_default_sampling_params()
    assert builtin == SamplingParams()


def test_the_server_fills_unset_fields_from_the_model(ckpt):
    engine = AsyncEngine.from_config(EngineConfig.from_kwargs(
        model=str(ckpt), num_gpu_blocks=64, max_model_len=128))
    app = build_app(engine, ServerSettings(served_model_names=["m"]), shutdown_engine=False)
    try:
        with BackgroundServer(app) as srv, openai.OpenAI(
                base_url=f"{srv.url}/v1", api_key="x", max_retries=0, timeout=60) as client:
            def ids(**fields) -> list[str]:
                out = client.completions.create(model="m", prompt=PROMPT, logprobs=0,
                                                **fields)
                return out.choices[0].logprobs.tokens

            unset = ids()  # greedy, top-k 20, penalty 1.3: the model's; 5 tokens at most
            assert len(unset) == 5 and unset == ids(seed=1) == ids(seed=2)
            assert unset == ids(temperature=0.0, extra_body={"top_k": 20,
                                                             "repetition_penalty": 1.3})
            assert unset != ids(extra_body={"repetition_penalty": 1.0})  # a field it sets wins
            assert len(ids(max_tokens=50)) == 5  # max_new_tokens bounds max_tokens, as in vLLM
            chat = client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}])
            assert chat.usage.completion_tokens <= 5
    finally:
        engine.shutdown()
