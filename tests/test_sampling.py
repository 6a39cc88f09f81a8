"""Sampling and stopping semantics on the embedded model."""

from __future__ import annotations

import pytest

from fairswitch import LLM, SamplingParams

PROMPTS = ["Once upon a time", "The capital of France is", "1, 2, 3,"]


@pytest.fixture(scope="module")
def llm():
    return LLM(num_gpu_blocks=512)


def texts(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_same_seed_same_output(llm):
    p = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    others = [SamplingParams(max_tokens=5, temperature=1.5), SamplingParams(max_tokens=9)]
    first = llm.generate(PROMPTS, [p, *others], use_tqdm=False)
    second = llm.generate(PROMPTS, [p, *others], use_tqdm=False)
    assert texts(first)[0] == texts(second)[0]
    # Two requests with one seed in one batch: the seed, not the batch position, decides.
    twins = llm.generate([PROMPTS[0], PROMPTS[0]], p, use_tqdm=False)
    assert texts(twins)[0] == texts(twins)[1]


@pytest.mark.parametrize("mate", [dict(top_p=0.9), dict(top_k=50), dict(min_p=0.1),
                                  dict(temperature=0.0, top_k=5)])
@pytest.mark.parametrize("own", [{}, dict(top_p=0.8), dict(top_k=40)])
def test_a_seeded_request_draws_alike_whatever_its_batch_mates_filter(llm, own, mate):
    """A batch-mate's top-k or top-p sorted every row, and the seeded noise then fell on sorted
    positions instead of token ids: the same request drew other tokens beside it."""
    p = SamplingParams(max_tokens=12, temperature=1.0, seed=644, ignore_eos=True, **own)
    alone = texts(llm.generate([PROMPTS[0]], p, use_tqdm=False))[0]
    other = SamplingParams(max_tokens=12, seed=1, ignore_eos=True, **{"temperature": 1.0, **mate})
    beside = texts(llm.generate(PROMPTS[:2], [p, other], use_tqdm=False))[0]
    assert beside == alone


@pytest.mark.parametrize("seeds", [(1, 2), (-1, 2**63 - 1), (5, 5 + 2**32)])
def test_different_seeds_differ(llm, seeds):
    """Every bit of a seed counts (the CPU generator keeps 32: -1 and 2**63 - 1 drew alike)."""
    outs = llm.generate([PROMPTS[0]] * 2, [
        SamplingParams(max_tokens=16, temperature=1.0, seed=s, ignore_eos=True) for s in seeds],
        use_tqdm=False)
    a, b = texts(outs)
    assert a != b


def test_top_k_1_equals_greedy(llm):
    greedy = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
                          use_tqdm=False)
    topk = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=1.3, top_k=1,
                                                ignore_eos=True), use_tqdm=False)
    assert texts(greedy) == texts(topk)


@pytest.mark.parametrize("top_p", [1e-6, 1e-46])  # the second is 0.0 in float32
def test_tiny_top_p_equals_greedy(llm, top_p):
    """A top_p below float32's least value masked every token: the softmax gave NaN and token 0
    (end of text) came out every time."""
    greedy = llm.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
                          use_tqdm=False)
    nucleus = llm.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=1.0, top_p=top_p,
                                                   ignore_eos=True), use_tqdm=False)
    assert texts(greedy) == texts(nucleus)


def test_sampling_is_random_without_seed(llm):
    p = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)
    a, b = texts(llm.generate([PROMPTS[1]] * 2, p, use_tqdm=False))
    assert a != b


def test_max_tokens_and_length_finish(llm):
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=5, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_stop_strings_cut_exactly(llm):
    base = llm.generate(PROMPTS[0], SamplingParams(max_tokens=24, temperature=0.0,
                                                   ignore_eos=True), use_tqdm=False)[0]
    full = base.outputs[0].text
    assert len(full) > 12
    stop = full[5:9]
    cut_at = full.find(stop)
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=24, temperature=0.0, stop=[stop],
                                                  ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert out.text == full[:cut_at]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    out = llm.generate(PROMPTS[0], SamplingParams(
        max_tokens=24, temperature=0.0, stop=[stop], include_stop_str_in_output=True,
        ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert out.text == full[:cut_at + len(stop)]


# cl100k token 2275 is 'о' (Cyrillic o) and the first byte of the next character; 198 is '\n'.
_O_AND_A_BYTE, _NEWLINE = 2275, 198


@pytest.fixture(scope="module")
def cl100k_llm(llama_dir):
    return LLM(model=str(llama_dir), num_gpu_blocks=64, max_model_len=96)


def test_text_before_an_unfinished_character_is_emitted_and_checked(cl100k_llm, tokenizer_dir):
    """Every window of 2275s ends in an incomplete character: nothing was emitted until the
    request ended, when the text was flushed unchecked (a stop string 'о' in it, finish
    'length'). The whole characters before the incomplete one come out at once now."""
    from fairswitch.engine.detokenizer import IncrementalDetokenizer
    from fairswitch.model.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    detok = IncrementalDetokenizer(tok, len(tok), tok.encode("Hello"))
    deltas = [detok.add(_O_AND_A_BYTE) for _ in range(3)]
    assert deltas[0] == "о" and all(deltas)
    assert "".join(deltas) + detok.flush() == tok.decode([_O_AND_A_BYTE] * 3) == detok.text
    forced = {"max_tokens": 3, "temperature": 0.0, "ignore_eos": True,
              "logit_bias": {_O_AND_A_BYTE: 100.0}}
    out = cl100k_llm.generate("Hello", SamplingParams(**forced, stop=["о"]),
                              use_tqdm=False)[0].outputs[0]
    assert (out.text, out.finish_reason, out.stop_reason) == ("", "stop", "о")


def test_a_stop_string_in_the_min_tokens_text_is_passed_over(cl100k_llm):
    """The first check after min_tokens searched from the longest stop string's reach back,
    so a shorter one inside the min_tokens text matched: an unrelated 'abc' moved the cut."""
    for stop in (["\n"], ["\n", "abc"]):
        out = cl100k_llm.generate("Hello", SamplingParams(
            max_tokens=8, min_tokens=3, temperature=0.0, stop=stop,
            logit_bias={_NEWLINE: 100.0}), use_tqdm=False)[0].outputs[0]
        assert (out.text, out.finish_reason) == ("\n\n", "stop")


def test_a_stop_token_s_text_is_in_the_output_when_asked_for(cl100k_llm):
    """vLLM's include_stop_str_in_output also keeps the text of a stop token id (was dropped)."""
    for include, text in ((False, ""), (True, "\n")):
        out = cl100k_llm.generate("Hello", SamplingParams(
            max_tokens=4, temperature=0.0, stop_token_ids=[_NEWLINE], logit_bias={_NEWLINE: 100.0},
            include_stop_str_in_output=include), use_tqdm=False)[0].outputs[0]
        assert (out.text, out.token_ids, out.stop_reason) == (text, [_NEWLINE], _NEWLINE)


def test_stop_token_ids(llm):
    base = llm.generate(PROMPTS[2], SamplingParams(max_tokens=10, temperature=0.0,
                                                   ignore_eos=True), use_tqdm=False)[0]
    ids = base.outputs[0].token_ids
    target = ids[4]
    first = ids.index(target)
    out = llm.generate(PROMPTS[2], SamplingParams(max_tokens=10, temperature=0.0,
                                                  stop_token_ids=[target], ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == target


def test_eos_stops_unless_ignored(llm):
    eos = llm.engine.output_processor.eos_token_ids
    tok_ids = llm.generate(PROMPTS[0], SamplingParams(max_tokens=6, temperature=0.0,
                                                      ignore_eos=True), use_tqdm=False)
    first = tok_ids[0].outputs[0].token_ids[0]
    # Pretend the first greedy token is EOS: the request must stop right there.
    llm.engine.output_processor.eos_token_ids = {first}
    try:
        out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=6, temperature=0.0),
                           use_tqdm=False)[0].outputs[0]
        assert out.token_ids == [first] and out.finish_reason == "stop"
        out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=6, temperature=0.0,
                                                      ignore_eos=True), use_tqdm=False)[0]
        assert len(out.outputs[0].token_ids) == 6
    finally:
        llm.engine.output_processor.eos_token_ids = eos  # every one (it kept one of two)


def test_streamed_text_concatenates_to_final_text(llm):
    engine = llm.engine
    rid = engine.add_request("Tell me a story", SamplingParams(max_tokens=20, temperature=0.0,
                                                               stop=["zzzz"], ignore_eos=True))
    pieces, final = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == rid:
                pieces.append(out.outputs[0].new_text)
                final = out
    assert final is not None and final.finished
    assert "".join(pieces) == final.outputs[0].text


def test_an_eos_other_than_the_tokenizers_reports_itself_as_stop_reason(llm):
    """As vLLM: the tokenizer's EOS ends a reply with stop_reason None; the model's other EOS
    ids (generation_config.json's: the tiny model's <|im_end|>, Llama 3's <|eot_id|>) are stop
    token ids, whose id is the stop_reason."""
    tokenizer = llm.get_tokenizer()
    others = llm.engine.output_processor.eos_token_ids - {tokenizer.eos_token_id}
    assert others  # (the tiny model has one: its chat turns end on it)
    for token, reason in ((tokenizer.eos_token_id, None), (min(others), min(others))):
        out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=4, temperature=0.0,
                                                      logit_bias={token: 100.0}),
                           use_tqdm=False)[0].outputs[0]
        assert out.token_ids == [token]
        assert (out.finish_reason, out.stop_reason) == ("stop", reason)


def test_max_tokens_none_runs_to_the_context_end(llm):
    """vLLM's max_tokens=None: as many tokens as max_model_len leaves (it was a TypeError)."""
    small = LLM(num_gpu_blocks=64, max_model_len=40)
    prompt = [1000, 2000, 3000, 4000, 5000]
    params = SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True)
    out = small.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 35 and out.finish_reason == "length"
    assert params.max_tokens is None  # the caller's parameters are left as they were
    with pytest.raises(ValueError, match="min_tokens must be in"):
        small.generate({"prompt_token_ids": prompt}, SamplingParams(
            max_tokens=None, min_tokens=36), use_tqdm=False)
