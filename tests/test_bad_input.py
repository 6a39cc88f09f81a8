"""Bad input raises a clear error naming the problem, and the engine keeps serving."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from fairswitch import LLM, SamplingParams
from fairswitch.config import EngineConfig
from fairswitch.engine.engine import Engine


@pytest.fixture(scope="module")
def llm():
    return LLM(num_gpu_blocks=128, max_model_len=64)


@pytest.mark.parametrize("kwargs, match", [
    ({"max_tokens": 0}, "max_tokens must be at least 1"),
    ({"max_tokens": -3}, "max_tokens must be at least 1"),
    ({"temperature": -0.5}, "temperature must be a finite number >= 0"),
    ({"top_p": 0.0}, "top_p must be in"),
    ({"top_p": 1.5}, "top_p must be in"),
    ({"top_k": -2}, "top_k"),
    ({"stop": [""]}, "stop strings"),
    ({"seed": 2**70}, "seed must fit in 64 bits"),
    ({"seed": 2**64 - 1, "n": 2}, r"seed must fit in 64 bits for each of the n=2 copies"),
    ({"top_k": 2**40}, "top_k must be"),
])
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_empty_prompt(llm):
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate("", use_tqdm=False)
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate([[]], use_tqdm=False)


def test_prompt_longer_than_max_model_len(llm):
    with pytest.raises(ValueError, match=r"prompt has \d+ tokens but max_model_len is 64"):
        llm.generate("word " * 200, use_tqdm=False)


def test_lone_surrogates_are_named(llm):
    """Python strings may hold them; no tokenizer takes them (it raised its own TypeError)."""
    with pytest.raises(ValueError, match=r"^prompt holds a lone UTF-16 surrogate \('\\ud800'\)"):
        llm.generate("a\ud800b", use_tqdm=False)
    with pytest.raises(ValueError, match=r"^'messages\[1\].content' holds a lone UTF-16 "):
        llm.chat([{"role": "system", "content": "s"}, {"role": "user", "content": "x\udc00"}],
                 use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert llm.generate("a\U0001F600b", SamplingParams(max_tokens=1), use_tqdm=False)  # a pair


def test_bad_token_ids(llm):
    with pytest.raises(ValueError, match="token ids must be integers"):
        llm.generate([[1, 2, 10**9]], use_tqdm=False)


def test_bad_prompt_in_batch_queues_nothing(llm):
    with pytest.raises(ValueError):
        llm.generate(["fine", ""], use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_params_the_model_refuses_are_refused_before_anything_runs():
    """A logit_bias id past the vocabulary is the engine's check; with a waiting queue of one,
    the last prompt used to be checked only when it joined, after the others had run."""
    llm = LLM(num_gpu_blocks=64, max_model_len=64, max_waiting=1, max_num_seqs=1)
    steps = []
    step = llm.engine.step
    llm.engine.step = lambda: steps.append(1) or step()
    good = SamplingParams(max_tokens=8, ignore_eos=True)
    with pytest.raises(ValueError, match=r"^logit_bias token ids must be in \[0, "):
        llm.generate(["a", "b", "c"], [good, good, SamplingParams(logit_bias={10**6: 1.0})],
                     use_tqdm=False)
    assert not steps and not llm.engine.has_unfinished_requests()


def _still_serves(llm):
    """Nothing of a refused call is left, and the next good call runs."""
    assert not llm.engine.has_unfinished_requests() and not llm.engine.requests
    out = llm.generate(["still", "serving"], SamplingParams(max_tokens=2, ignore_eos=True),
                       use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in out] == [2, 2]


@pytest.mark.parametrize("prompts, match", [
    (None, "^prompts must be a str, a list of token ids, .* or a list of those, got NoneType"),
    (5, "^prompts must be .* got int"),
    (b"hi", "^prompts must be .* got bytes"),
    (["fine", None], r"^prompts\[1\] must be a str, a list of token ids or a prompt dict, got "
                     "NoneType"),
    (["fine", 5], r"^prompts\[1\] must be a str, .* got int"),
    ({"prompt": 5}, r"^prompts\['prompt'\] must be a str, got int"),
    ([{"prompt_token_ids": "12"}], r"^prompts\[0\]\['prompt_token_ids'\] must be a list"),
    ([{"prompt_token_ids": [1, 2.0]}], r"^prompts\[0\]\['prompt_token_ids'\]\[1\] must be an "
                                        "int token id"),
    ([[1, 2], [3, "x"]], r"^prompts\[1\]\[1\] must be an int token id, got 'x'"),
    ([1, 2, True], r"^prompts\[2\] must be an int token id, got True"),
])
def test_prompts_of_the_wrong_type_are_named(llm, prompts, match):
    with pytest.raises(TypeError, match=match):
        llm.generate(prompts, use_tqdm=False)
    _still_serves(llm)


def test_every_prompt_form_is_accepted(llm):
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    ids = llm.get_tokenizer().encode("hello")
    for prompts, count in (("hello", 1), (["hello", "again"], 2), (("hello",), 1), (ids, 1),
                           ([ids, ids], 2), (tuple(ids), 1), ([], 0), ({"prompt": "hello"}, 1),
                           ([{"prompt_token_ids": ids}, "again", ids], 3)):
        assert len(llm.generate(prompts, params, use_tqdm=False)) == count


def test_vllm_prompt_dicts_are_the_same_prompts(llm):
    greedy = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    ids = llm.get_tokenizer().encode("The capital of France is")
    plain = llm.generate(["The capital of France is", ids], greedy, use_tqdm=False)
    dicts = llm.generate([{"prompt": "The capital of France is"}, {"prompt_token_ids": ids}],
                         greedy, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in dicts] == [o.outputs[0].token_ids for o in plain]
    assert [o.prompt_token_ids for o in dicts] == [o.prompt_token_ids for o in plain]


@pytest.mark.parametrize("prompt", [{}, {"prompt": "a", "prompt_token_ids": [1]},
                                    {"prompt": "a", "multi_modal_data": {}}])
def test_a_prompt_dict_holds_one_known_key(llm, prompt):
    with pytest.raises(ValueError, match=r"^prompts\[0\] must hold exactly one of 'prompt'"):
        llm.generate([prompt], use_tqdm=False)
    _still_serves(llm)


USER = {"role": "user", "content": "hi"}


@pytest.mark.parametrize("messages, error, match", [
    (USER, TypeError, "^messages must be a list of message dicts .* got dict: put a single "
                      "message in a list"),
    (None, TypeError, "^messages must be a list .* got NoneType"),
    ("hi", TypeError, "^messages must be a list .* got str"),
    ([USER, "hi"], TypeError, r"^'messages\[1\]' must be an object \(a dict"),
    ([{"role": "user", "content": None}], TypeError,
     r"^'messages\[0\].content' must be a string or a list of text parts \(only an "
     r"assistant's may be none\), got None"),
    ([{"role": "user"}], TypeError, r"^'messages\[0\].content' .* got None"),
    ([{"role": "user", "content": 5}], TypeError, r"^'messages\[0\].content' .* got 5"),
    ([USER, {"role": None, "content": "x"}], TypeError,
     r"^'messages\[1\].role' must be a non-empty string, got None"),
    ([{"role": 3, "content": "x"}], TypeError, r"^'messages\[0\].role' .* got 3"),
    ([{"content": "x"}], TypeError, r"^'messages\[0\].role' .* but it is missing"),
    ([{"role": "", "content": "x"}], ValueError, r"^'messages\[0\].role' must be a non-empty"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], ValueError,
     r"^'messages\[0\].content\[0\]' must be a text part .* only text is supported"),
    ([{"role": "user", "content": [5]}], TypeError,
     r"^'messages\[0\].content\[0\]' must be a text part"),
    ([{"role": "user", "content": "x", "name": 5}], TypeError, r"^'messages\[0\].name'"),
    ([[USER], [USER, {"role": "user", "content": None}]], TypeError,
     r"^'messages\[1\]\[1\].content'"),
    ([[USER], []], ValueError, r"^'messages\[1\]' must not be empty"),
    ([[USER], USER], TypeError, r"^messages\[1\] must be a conversation"),
])
def test_bad_chat_messages_are_named(llm, messages, error, match):
    """A bare message, or a message whose role or content is missing, None or not a string, was
    a raw TypeError/KeyError from inside, or a prompt with "None" in it."""
    with pytest.raises(error, match=match):
        llm.chat(messages, SamplingParams(max_tokens=2), use_tqdm=False)
    _still_serves(llm)


def test_chat_renders_messages_as_the_server_does(llm):
    """Both check and normalize messages in chat_messages.py: text parts joined by newlines (the
    template joined them with nothing here), an assistant turn with no content empty."""
    from fairswitch.server.chat import ChatTemplate
    from fairswitch.server.protocol import parse_messages

    conversation = [{"role": "user", "content": [{"type": "text", "text": "one"},
                                                 {"type": "text", "text": "two"}]},
                    {"role": "assistant", "content": None},
                    {"role": "user", "content": "three", "name": "bob"}]
    out = llm.chat(conversation, SamplingParams(max_tokens=1), use_tqdm=False)[0]
    assert out.prompt == ChatTemplate(llm.get_tokenizer()).render(parse_messages(conversation))
    assert "one\ntwo" in out.prompt and "assistant\n<|im_end|>" in out.prompt
    several = llm.chat([conversation, [USER]], SamplingParams(max_tokens=1), use_tqdm=False)
    assert several[0].prompt == out.prompt


def test_chat_continues_the_final_message(llm):
    """LLM.chat took continue_final_message to generate() (a TypeError); it is transformers'
    rendering now, and refused beside add_generation_prompt before anything runs."""
    conversation = [USER, {"role": "assistant", "content": "The answer is"}]
    out = llm.chat(conversation, SamplingParams(max_tokens=1), add_generation_prompt=False,
                   continue_final_message=True, use_tqdm=False)[0]
    closed = llm.chat(conversation, SamplingParams(max_tokens=1), add_generation_prompt=False,
                      use_tqdm=False)[0]
    assert out.prompt.endswith("The answer is") and closed.prompt.startswith(out.prompt)
    with pytest.raises(ValueError, match="cannot both be set"):
        llm.chat(conversation, continue_final_message=True, use_tqdm=False)


@pytest.mark.parametrize("policy", ["fcfs", "priority", "vtc"])
@pytest.mark.parametrize("kwargs, match", [
    ({"priority": "high"}, "priority must be an int of 64 bits, got 'high'"),
    ({"priority": 1.5}, "priority must be an int"),
    ({"priority": None}, "priority must be an int"),
    ({"priority": True}, "priority must be an int"),
    ({"priority": 10**400}, "priority must be an int of 64 bits"),  # (was an OverflowError)
    ({"client_id": 5}, "client_id must be a str or None, got 5"),
    ({"client_id": ["a"]}, "client_id must be a str or None"),
    ({"arrival_time": "now"}, "arrival_time must be a finite number or None, got 'now'"),
    ({"arrival_time": float("nan")}, "arrival_time must be a finite number"),  # (broke FCFS)
    ({"arrival_time": True}, "arrival_time must be a finite number"),
])
def test_scheduling_arguments_of_the_wrong_type_are_named(policy, kwargs, match):
    """Engine.add_request checks them itself: the policies would fail on them mid-queue (a
    priority policy comparing "high" with a number, VTC keying an unhashable client) or take
    them silently (fcfs)."""
    engine = LLM(num_gpu_blocks=16, max_model_len=64, policy=policy).engine
    with pytest.raises(ValueError, match=match):
        engine.add_request("hi", SamplingParams(max_tokens=2), **kwargs)
    assert not engine.requests and not engine.has_unfinished_requests()


def test_engine_keeps_serving_while_bad_requests_arrive(llm):
    engine = llm.engine
    good = engine.add_request("a good request", SamplingParams(max_tokens=10, ignore_eos=True))
    engine.step()
    for bad in ("", "x " * 500):
        with pytest.raises(ValueError):
            engine.add_request(bad, SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("dup", SamplingParams(), request_id=good)
    # A caller's id that is a number the engine would pick next: the engine picks another.
    mine = engine.add_request("mine", SamplingParams(max_tokens=2),
                              request_id=str(int(good) + 1))
    auto = engine.add_request("auto", SamplingParams(max_tokens=2))
    assert auto not in (good, mine)
    done = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished and out.request_id == good:
                done = out
    assert done is not None and done.request_id == good
    assert len(done.outputs[0].token_ids) == 10
    engine.check_accounting()


def test_unknown_architecture(tmp_path, llama_dir):
    shutil.copytree(llama_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported model architecture 'GPT2LMHeadModel'"):
        LLM(model=str(tmp_path / "m"))


def test_missing_weights(tmp_path, llama_dir):
    shutil.copytree(llama_dir, tmp_path / "m")
    for f in (tmp_path / "m").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors weights"):
        LLM(model=str(tmp_path / "m"))


def test_missing_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        LLM(model=str(tmp_path / "empty"))


def test_path_does_not_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an existing directory nor a known name"):
        LLM(model=str(tmp_path / "nope"))


def test_truncated_weights_name_the_missing_tensors(tmp_path, write_checkpoint):
    from safetensors.torch import load_file, save_file

    path = write_checkpoint(tmp_path / "m")
    f = next(path.glob("*.safetensors"))
    tensors = load_file(f)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="layers.1.mlp.down_proj.weight"):
        LLM(model=str(path))


def test_a_tied_models_lm_head_must_be_its_embedding(tmp_path, qwen_dir):
    """A tied config with an lm_head.weight in the file: the same tensor is served (tied), a
    different one was silently dropped (transformers 5 serves it, untied): refused."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(qwen_dir, tmp_path / "m")
    f = next((tmp_path / "m").glob("*.safetensors"))
    tensors = load_file(f)
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, f, metadata={"format": "pt"})
    LLM(model=str(tmp_path / "m"), num_gpu_blocks=16, max_model_len=64)
    tensors["lm_head.weight"][7] += 1.0
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="ties the output layer to the embeddings .* its "
                       "lm_head.weight differs .* set tie_word_embeddings to false"):
        LLM(model=str(tmp_path / "m"), num_gpu_blocks=16, max_model_len=64)


def test_a_bad_tokenizer_fails_before_the_weights_load(tmp_path, llama_dir, monkeypatch):
    """The tokenizer was loaded after every rank had built its model (the weights read, the
    workers started): a checkpoint without one failed only then."""
    from fairswitch.model import loader

    shutil.copytree(llama_dir, tmp_path / "m")
    for f in (tmp_path / "m").glob("tokenizer*"):
        f.unlink()
    monkeypatch.setattr(loader, "build_model", lambda *a, **k: pytest.fail("model built"))
    with pytest.raises(FileNotFoundError, match="has no tokenizer"):
        LLM(model=str(tmp_path / "m"), tensor_parallel_size=2)


@pytest.mark.parametrize("text, message", [
    ("{bad", "generation_config.json is not valid JSON"),
    # A negative id masked the logits' last entry, a string failed the first request.
    ('{"eos_token_id": -1}', "generation_config.json: eos_token_id must be a token id or a list "
                             "of them, got -1"),
    ('{"eos_token_id": [2, "x"]}', r"eos_token_id must be a token id .*, got \[2, 'x'\]"),
    ('{"eos_token_id": 1.5}', "eos_token_id must be a token id"),
])
def test_a_corrupt_generation_config_is_named(tmp_path, llama_dir, monkeypatch, text, message):
    """... before the weights load (it was read once the model and KV cache were built)."""
    from fairswitch.model import loader

    shutil.copytree(llama_dir, tmp_path / "m")
    (tmp_path / "m" / "generation_config.json").write_text(text)
    monkeypatch.setattr(loader, "build_model", lambda *a, **k: pytest.fail("model built"))
    with pytest.raises(ValueError, match=message):
        LLM(model=str(tmp_path / "m"), num_gpu_blocks=64)


def test_max_model_len_past_the_models_limit_names_the_field(llama_dir):
    with pytest.raises(ValueError, match="max_model_len=4096 exceeds the model's limit of 1024 "
                                         "tokens \\(max_position_embeddings in its config.json"):
        LLM(model=str(llama_dir), max_model_len=4096)


def test_shipped_config_needs_dummy():
    with pytest.raises(ValueError, match="load_format='dummy'"):
        Engine(EngineConfig.from_kwargs(model="llama-3-8b"))


@pytest.mark.parametrize("kwargs, match", [
    ({"block_size": 12}, "power of two"),
    ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
    ({"max_num_seqs": 0}, "max_num_seqs"),
    ({"dtype": "int8"}, "dtype must be one of"),
    ({"bogus_option": 1}, "unknown engine option"),
    ({"max_waiting": 0}, "max_waiting must be >= 1"),
    ({"swap_space": 0, "preemption_mode": "swap"}, "'swap' needs swap space, and swap_space is 0"),
    ({"enable_prefix_caching": False, "cpu_kv_reuse": True}, "cpu_kv_reuse .* needs"),
    ({"swap_space": 0, "cpu_kv_reuse": True}, "cpu_kv_reuse .* needs"),
    ({"model": " "}, "model must be a checkpoint directory or a model name, got ' '"),
])
def test_bad_engine_config(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        EngineConfig.from_kwargs(**kwargs)


def test_the_cpu_tier_is_on_where_it_can_be():
    """cpu_kv_reuse asked for without prefix caching or swap space was silently ignored; left
    to its default, it follows them (so --no-enable-prefix-caching alone still works)."""
    from fairswitch.cli.main import build_parser

    assert EngineConfig().cache.cpu_kv_reuse_on
    for off in ({"enable_prefix_caching": False}, {"cpu_kv_reuse": False}, {"baseline": True}):
        assert not EngineConfig.from_kwargs(**off).cache.cpu_kv_reuse_on, off
    assert not EngineConfig().with_options(enable_prefix_caching=False).cache.cpu_kv_reuse_on
    assert EngineConfig.from_kwargs(swap_space=0, preemption_mode="recompute")  # (no tier)
    for flags, value in (([], None), (["--cpu-kv-reuse"], True), (["--no-cpu-kv-reuse"], False)):
        args = build_parser().parse_args(["generate", "hi", *flags])
        assert EngineConfig.from_cli_args(args).cache.cpu_kv_reuse is value


@pytest.mark.parametrize("kwargs, error, match", [
    ({"max_num_seqs": "8"}, TypeError, "max_num_seqs must be int, got '8'"),
    ({"max_num_seqs": True}, TypeError, "max_num_seqs must be int"),
    ({"enforce_eager": "no"}, TypeError, "enforce_eager must be bool"),
    ({"seed": "a"}, TypeError, "seed must be int"),
    ({"device": None}, TypeError, "device must be str"),
    ({"max_model_len": 1.5}, TypeError, "max_model_len must be int or None"),
    ({"swap_space": float("nan")}, ValueError, "swap_space must be a finite number"),
    ({"max_starvation_s": float("inf")}, ValueError, "max_starvation_s must be a finite"),
])
def test_engine_options_are_type_checked(kwargs, error, match):
    """A wrong type failed late or meant something else ("no" is true, NaN passes every
    comparison): each option is checked against its annotation."""
    with pytest.raises(error, match=match):
        EngineConfig.from_kwargs(**kwargs)


def test_engine_options_take_numeric_kin():
    config = EngineConfig.from_kwargs(swap_space=4, max_num_seqs=np.int64(8), max_model_len=None)
    assert config.cache.swap_space == 4 and config.scheduler.max_num_seqs == 8


def test_kv_cache_smaller_than_max_model_len():
    with pytest.raises(ValueError, match="less than max_model_len"):
        LLM(num_gpu_blocks=2, block_size=4, max_model_len=64)


@pytest.mark.parametrize("device, message", [("cuda:x", "is not a device"),
                                             ("nonsense", "is not a device")])
def test_a_bad_device_is_a_value_error(device, message):
    from fairswitch.engine.builder import resolve_device

    with pytest.raises(ValueError, match=message):
        resolve_device(device)
