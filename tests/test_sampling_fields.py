"""The sampling fields vLLM and OpenAI clients send, each exact against a plain torch reference:
logit_bias, min_tokens, repetition / frequency / presence penalties, min_p, logprobs (sampled and
top-k, with ranks), prompt logprobs, and n copies (``LLM.generate``)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fairswitch import LLM, SamplingParams
from fairswitch.request import PLACEHOLDER_TOKEN, Request
from fairswitch.runner.sampler import Sampler
from helpers import hf_model

VOCAB = 50


def _request(params: SamplingParams, prompt: list[int], output: list[int]) -> Request:
    req = Request("r", prompt, params, 0.0)
    req.token_ids += output + [PLACEHOLDER_TOKEN]  # the token being sampled now
    return req


def _reference_logits(logits: torch.Tensor, req: Request, eos: set[int]) -> torch.Tensor:
    """vLLM's order, one row, plain loops: bias, min_tokens mask, penalties."""
    p, out = req.sampling_params, [t for t in req.output_token_ids if t >= 0]
    x = logits.clone()
    for t, b in (p.logit_bias or {}).items():
        x[t] += b
    if len(out) < p.min_tokens:
        for t in set(p.stop_token_ids) | (set() if p.ignore_eos else eos):
            x[t] = float("-inf")
    for t in range(len(x)):
        if t in out or t in req.prompt_token_ids:
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
        x[t] -= p.frequency_penalty * out.count(t) + p.presence_penalty * (t in out)
    return x


def test_shaped_logits_match_the_reference():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, VOCAB, generator=gen) * 3
    cases = [
        (SamplingParams(temperature=0.0, logit_bias={3: 5.0, 7: -100.0}), [1, 2], [4]),
        (SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[9]), [1], [5]),
        (SamplingParams(temperature=0.0, min_tokens=1, stop_token_ids=[9]), [1], [5]),
        (SamplingParams(temperature=0.0, repetition_penalty=1.7), [3, 4, 4], [8, 8, 11]),
        (SamplingParams(temperature=0.0, frequency_penalty=0.9, presence_penalty=-0.4,
                        repetition_penalty=0.8), [2], [8, 8, 8, 13, 2]),
    ]
    reqs = [_request(p, prompt, out) for p, prompt, out in cases]
    sampler = Sampler(torch.device("cpu"), seed=0)
    sampler.eos_token_ids = {0}
    shaped = sampler._shape(logits.clone(), reqs)
    for i, req in enumerate(reqs):
        assert torch.allclose(shaped[i], _reference_logits(logits[i], req, {0})), i
    tokens, _ = sampler.sample(logits, reqs)
    assert tokens.tolist() == [int(_reference_logits(logits[i], r, {0}).argmax())
                               for i, r in enumerate(reqs)]


def test_min_p_keeps_only_tokens_near_the_best():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    sampler = Sampler(torch.device("cpu"), seed=0)
    req = _request(SamplingParams(temperature=1.0, min_p=0.4), [1], [])
    seen = {int(sampler.sample(logits, [req])[0]) for _ in range(200)}
    assert seen == {0, 1}  # 0.15 and 0.05 are below 0.4 x 0.5


def test_extreme_temperatures_sample_sanely():
    """Below 1e-5 a temperature samples greedily (vLLM's rule; 1e-39 would underflow float32 to
    0 and every logit become inf); above float32's range it gives the uniform distribution over
    the tokens left, never a masked one (-inf / inf would be NaN)."""
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(4, VOCAB, generator=gen) * 3
    sampler = Sampler(torch.device("cpu"), seed=0)
    sampler.eos_token_ids = {0}
    cold = [_request(SamplingParams(temperature=t, seed=3), [1], []) for t in (1e-39, 1e-300)]
    assert sampler.sample(logits[:2], cold)[0].tolist() == logits[:2].argmax(-1).tolist()
    hot = _request(SamplingParams(temperature=1e39, min_tokens=5, stop_token_ids=[7],
                                  max_tokens=10), [1], [])
    seen = [int(sampler.sample(logits[2:3], [hot])[0]) for _ in range(300)]
    assert not {0, 7} & set(seen) and len(set(seen)) > VOCAB // 2
    for t in (float("inf"), float("nan"), -1e-9):
        with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
            SamplingParams(temperature=t)


def test_logprobs_are_the_raw_log_softmax_with_ranks_and_top_k():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, VOCAB, generator=gen)
    params = [SamplingParams(temperature=0.0, logprobs=3),
              SamplingParams(temperature=0.0, logprobs=0, repetition_penalty=2.0),
              SamplingParams(temperature=0.0)]
    reqs = [_request(p, [1, 2], [int(logits[i].argmax())]) for i, p in enumerate(params)]
    tokens, lp = Sampler(torch.device("cpu"), seed=0).sample(logits, reqs)
    ref = logits.log_softmax(dim=-1)
    for i, t in enumerate(tokens.tolist()):
        assert lp.token_logprobs[i].item() == pytest.approx(ref[i, t].item(), abs=1e-6)
        assert lp.token_ranks[i].item() == int((ref[i] > ref[i, t]).sum()) + 1
        assert lp.top_ids[i].tolist() == ref[i].topk(3).indices.tolist()
    assert lp.token_ranks[1].item() > 1  # the penalty moved the pick off the best raw token


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(model=str(llama_dir), num_gpu_blocks=128, max_model_len=96)


PROMPT = [5, 17, 42, 8, 99, 23, 7, 61, 12, 4, 88, 31, 19, 2, 40, 73, 11]


def test_engine_logprobs_match_transformers(llm, llama_dir):
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=2,
                            prompt_logprobs=1)
    out = llm.generate([PROMPT], params, use_tqdm=False)[0]
    ids = PROMPT + out.outputs[0].token_ids
    with torch.no_grad():
        ref = hf_model(llama_dir, torch.float32, "cpu")(torch.tensor([ids])).logits[0]
    ref = ref.float().log_softmax(dim=-1)
    comp = out.outputs[0]
    assert len(comp.logprobs) == 6
    for i, (token, entry) in enumerate(zip(comp.token_ids, comp.logprobs)):
        row = ref[len(PROMPT) - 1 + i]
        assert entry[token].logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert entry[token].rank == 1  # greedy
        assert set(entry) == set(row.topk(2).indices.tolist()) | {token}
    assert comp.cumulative_logprob == pytest.approx(
        sum(e[t].logprob for t, e in zip(comp.token_ids, comp.logprobs)))
    prompt_lp = out.prompt_logprobs
    assert prompt_lp[0] is None and len(prompt_lp) == len(PROMPT)
    for pos in range(1, len(PROMPT)):
        token = PROMPT[pos]
        assert prompt_lp[pos][token].logprob == pytest.approx(ref[pos - 1, token].item(),
                                                              abs=1e-4)
        assert prompt_lp[pos][token].rank == int((ref[pos - 1] > ref[pos - 1, token]).sum()) + 1
        assert len(prompt_lp[pos]) <= 2


def test_prompt_logprobs_survive_chunked_prefill_and_skip_the_prefix_cache(llama_dir):
    """The prompt in chunks of 5 tokens (a chunk's last row predicts the next chunk's first
    token), after the same prompt was cached: every position still gets its logprob."""
    llm = LLM(model=str(llama_dir), num_gpu_blocks=128, max_model_len=96, block_size=4,
              max_num_batched_tokens=5)
    whole = LLM(model=str(llama_dir), num_gpu_blocks=128, max_model_len=96)
    params = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=0)
    llm.generate([PROMPT], SamplingParams(max_tokens=1), use_tqdm=False)  # cache it
    got = llm.generate([PROMPT], params, use_tqdm=False)[0]
    want = whole.generate([PROMPT], params, use_tqdm=False)[0]
    assert got.num_cached_tokens == 0
    assert [e and {t: round(v.logprob, 4) for t, v in e.items()} for e in got.prompt_logprobs] \
        == [e and {t: round(v.logprob, 4) for t, v in e.items()} for e in want.prompt_logprobs]


def test_min_tokens_passes_over_eos_and_stop_ids(llm):
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    first = llm.generate([PROMPT], greedy, use_tqdm=False)[0].outputs[0].token_ids
    stop_now = SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[first[0]])
    assert llm.generate([PROMPT], stop_now, use_tqdm=False)[0].outputs[0].token_ids == [first[0]]
    held = SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[first[0]], min_tokens=4)
    out = llm.generate([PROMPT], held, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= 4 and first[0] not in out.token_ids[:4]


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_penalized_greedy_decoding_matches_a_reference_loop(llama_dir, async_scheduling):
    """Penalties read every token so far; with async scheduling the engine waits for a
    penalized request's token before the next step (no placeholder): same tokens either way,
    equal to transformers' logits shaped by the reference each step."""
    # A random model hardly repeats a token: a bias makes token 777 the favourite, so that
    # the penalties (applied after the bias, as vLLM does) have repeats to act on.
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True,
                            logit_bias={777: 4.0}, repetition_penalty=1.5,
                            frequency_penalty=0.7, presence_penalty=0.4)
    llm = LLM(model=str(llama_dir), num_gpu_blocks=128, max_model_len=96,
              async_scheduling=async_scheduling)
    plain = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    outs = llm.generate([PROMPT, PROMPT[:9]], [params, plain], use_tqdm=False)
    model = hf_model(llama_dir, torch.float32, "cpu")
    ids, want = list(PROMPT), []
    with torch.no_grad():
        for _ in range(10):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            req = _request(params, PROMPT, want)
            want.append(int(_reference_logits(logits, req, set()).argmax()))
            ids.append(want[-1])
    assert outs[0].outputs[0].token_ids == want
    unpenalized = LLM(model=str(llama_dir), num_gpu_blocks=128, max_model_len=96)
    assert outs[1].outputs[0].token_ids == unpenalized.generate(
        [PROMPT[:9]], plain, use_tqdm=False)[0].outputs[0].token_ids
    biased = dataclasses.replace(params, repetition_penalty=1.0, frequency_penalty=0.0,
                                 presence_penalty=0.0)
    favoured = unpenalized.generate([PROMPT], biased, use_tqdm=False)[0].outputs[0].token_ids
    assert 1 <= want.count(777) < favoured.count(777) - 3  # pushed away once repeated


def test_n_copies_are_sampled_independently_and_share_the_prompt(llama_dir):
    llm = LLM(model=str(llama_dir), num_gpu_blocks=128, max_model_len=96, block_size=4)
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=7, n=3, ignore_eos=True)
    cached = []
    step = llm.engine.step

    def watched():
        outs = step()
        cached.extend(o.num_cached_tokens for o in outs if o.finished)
        return outs

    llm.engine.step = watched
    out = llm.generate([PROMPT], params, use_tqdm=False)[0]
    assert sorted(cached) == [0, 16, 16]  # copies 1 and 2 reuse copy 0's full prompt blocks
    llm.engine.step = step
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    again = llm.generate([PROMPT], params, use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]
    one = SamplingParams(max_tokens=6, temperature=1.0, seed=8, ignore_eos=True)
    assert out.outputs[1].token_ids == llm.generate([PROMPT], one, use_tqdm=False)[0] \
        .outputs[0].token_ids  # copy i: seed + i


@pytest.mark.parametrize("bad, match", [
    (dict(min_tokens=20, max_tokens=10), "min_tokens"), (dict(presence_penalty=3), "presence"),
    (dict(repetition_penalty=0.0), "repetition"), (dict(min_p=1.5), "min_p"),
    (dict(logprobs=21), "logprobs"), (dict(logit_bias={3: 500}), "logit_bias"),
    (dict(logit_bias={"1" * 19: 1}), "^logit_bias token ids must be in the vocabulary"),
    (dict(n=0), "n must"), (dict(min_p=float("nan")), "min_p must be in"),
    (dict(top_p=float("nan")), "top_p must be in"), (dict(stop=[""]), "stop strings")])
def test_bad_values_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**bad)


@pytest.mark.parametrize("bad, match", [
    *[({name: value}, f"^{name} must be a bool, got {value!r}")
      for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens", "detokenize")
      for value in ("yes", 1, None)],
    (dict(logit_bias={"x": 1}), "^logit_bias token id must be an integer"),
    (dict(logit_bias={"--5": 1}), "^logit_bias token id must be an integer, got '--5'"),
    (dict(logit_bias={" 5x": 1}), "^logit_bias token id must be an integer"),
    (dict(logit_bias={3: "1"}), "^logit_bias value must be a number"),
    (dict(logit_bias=[1]), "^logit_bias must map"),
    (dict(stop=5), "^stop must be a list"), (dict(stop=[5]), "^stop strings must be strings"),
    (dict(stop_token_ids="7"), "^stop_token_ids must be a list"),
    (dict(stop_token_ids=[True]), "^stop_token_ids entry must be an integer"),
    (dict(max_tokens=2.5), "^max_tokens must be an integer"),
    (dict(max_tokens=True), "^max_tokens must be an integer"),
    (dict(top_k=1.0), "^top_k must be an integer"), (dict(seed="1"), "^seed must be an integer"),
    (dict(n=2.0), "^n must be an integer"), (dict(logprobs=True), "^logprobs must be an integer"),
    (dict(temperature="1"), "^temperature must be a number"),
    (dict(top_p=True), "^top_p must be a number"), (dict(top_p="1"), "^top_p must be a number"),
    (dict(min_p=True), "^min_p must be a number"),
    (dict(presence_penalty=None), "^presence_penalty must be a number")])
def test_fields_of_the_wrong_type_are_type_errors(bad, match):
    """A wrong type is a TypeError whose message starts with the field (the server's 400 names
    the field it starts with); "yes" for ignore_eos was taken, and top_p=True meant 1."""
    with pytest.raises(TypeError, match=match):
        SamplingParams(**bad)


def test_vllm_forms_of_stop_fields():
    """None for none, one string or one id for a list of one (vLLM's defaults are None)."""
    assert SamplingParams(stop=None, stop_token_ids=None).stop == []
    assert SamplingParams(stop=None, stop_token_ids=None).stop_token_ids == []
    assert SamplingParams(stop="x", stop_token_ids=5).stop_token_ids == [5]


def test_logit_bias_outside_the_vocabulary_is_refused(llm):
    with pytest.raises(ValueError, match="logit_bias token ids"):
        llm.engine.add_request(PROMPT, SamplingParams(logit_bias={10**6: 1.0}))


def test_a_field_set_after_construction_counts(llm):
    """vLLM's users set fields on params they made, or change a list in place: a logit_bias or
    min_tokens set so was ignored (flags derived at construction said there was none)."""
    later = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    later.logit_bias = {42: 100}
    later.stop_token_ids.append(42)
    made = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True,
                          logit_bias={42: 100}, stop_token_ids=[42])
    assert later == made and later.shapes_logits
    outs = llm.generate(["Hello there", "Hello there"], [later, made], use_tqdm=False)
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids == [42]
    assert outs[0].outputs[0].finish_reason == "stop"
    order = SamplingParams()
    order.min_tokens = 32  # above the default max_tokens until the next line: not refused
    order.max_tokens = 64
    assert order.shapes_logits


def test_allowed_token_ids_are_the_only_tokens_sampled(llm):
    """vLLM's allowed_token_ids, greedy and random, beside a request that has none."""
    allowed = [7, 42, 99]
    for temperature in (0.0, 1.0):
        held = SamplingParams(max_tokens=12, temperature=temperature, seed=1, ignore_eos=True,
                              allowed_token_ids=allowed)
        free = SamplingParams(max_tokens=12, temperature=temperature, seed=1, ignore_eos=True)
        outs = llm.generate([PROMPT, PROMPT], [held, free], use_tqdm=False)
        assert set(outs[0].outputs[0].token_ids) <= set(allowed)
        assert not set(outs[1].outputs[0].token_ids) <= set(allowed)
    with pytest.raises(ValueError, match=r"allowed_token_ids must be a non-empty list of ids"):
        llm.engine.add_request(PROMPT, SamplingParams(allowed_token_ids=[10 ** 6]))
    with pytest.raises(ValueError, match="allowed_token_ids must be a non-empty list"):
        SamplingParams(allowed_token_ids=[])
    assert SamplingParams(allowed_token_ids=[9, 3, 9]).allowed_token_ids == [3, 9]
    later = SamplingParams()
    later.allowed_token_ids = [-1]  # (set after construction: checked when added)
    with pytest.raises(ValueError, match="allowed_token_ids must be a non-empty list of ids"):
        llm.engine.add_request(PROMPT, later)


def test_allowed_token_ids_that_leave_nothing_to_sample_are_refused(llm):
    """Every allowed token a bad word, or (before min_tokens) a stop token: the row had no
    token left and sampled token 0, whatever it was."""
    word = llm.engine.tokenizer.decode([42]).strip()
    with pytest.raises(ValueError, match="allows only tokens that bad_words bans"):
        llm.engine.add_request(PROMPT, SamplingParams(
            allowed_token_ids=[42], bad_words=[word] if word else ["x"]))
    with pytest.raises(ValueError, match="allows only stop tokens"):
        llm.engine.add_request(PROMPT, SamplingParams(allowed_token_ids=[7], stop_token_ids=[7],
                                                      min_tokens=2))
    eos = sorted(llm.engine.output_processor.eos_token_ids)[0]
    with pytest.raises(ValueError, match="allows only stop tokens"):
        llm.engine.add_request(PROMPT, SamplingParams(allowed_token_ids=[eos], min_tokens=1))
    assert llm.engine.add_request(PROMPT, SamplingParams(  # (ignore_eos: EOS is no stop)
        allowed_token_ids=[eos], min_tokens=1, ignore_eos=True, max_tokens=2))


def test_bad_words_are_bounded():
    with pytest.raises(ValueError, match="at most 1024 are allowed"):
        SamplingParams(bad_words=["w"] * 1025)
    with pytest.raises(ValueError, match="at most 1024 characters each"):
        SamplingParams(bad_words=["w" * 1025])


def test_bad_words_are_never_written(llm):
    """vLLM's bad_words: the word's tokens (each way the tokenizer writes it) never all come in
    a row. The greedy reply's own words are banned, and the reply changes to avoid them."""
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    first = llm.generate([PROMPT], greedy, use_tqdm=False)[0].outputs[0]
    text, decode = first.text, llm.engine.tokenizer.decode
    # Words the reply wrote as one token after a space (" ventured"): banned as they came.
    words = [decode([t]).strip() for t in first.token_ids
             if decode([t]).startswith(" ") and decode([t]).strip().isalpha()][:3]
    assert words, text
    banned = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, bad_words=words)
    out = llm.generate([PROMPT], banned, use_tqdm=False)[0].outputs[0]
    sequences = llm.engine.inputs.bad_words_ids(banned)
    ids = out.token_ids
    for seq in sequences:
        assert not any(ids[i:i + len(seq)] == seq for i in range(len(ids))), (seq, out.text)
    assert out.text != text
    with pytest.raises(ValueError, match="bad_words must not be empty"):
        SamplingParams(bad_words=[" "])
