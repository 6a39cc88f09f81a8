"""The sampling fields through the HTTP API with the real `openai` client: n choices (whole and
streamed), logprobs in both endpoints' shapes, echo (with max_tokens 0: the prompt's logprobs,
what evaluation harnesses score), min_tokens and penalties; values equal the engine's own."""

from __future__ import annotations

import openai
import pytest

from fairswitch import LLM, SamplingParams

MODEL = "fairswitch-tiny"
PROMPT = "The capital of France is"
OPTS = dict(num_gpu_blocks=256, max_model_len=256)


@pytest.fixture(scope="module")
def client(openai_client):
    return openai_client


@pytest.fixture(scope="module")
def llm():
    return LLM(**OPTS)


def test_n_choices_whole_and_streamed(client):
    out = client.completions.create(model=MODEL, prompt=PROMPT, n=3, max_tokens=5,
                                    temperature=1.0, seed=3, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert len({c.text for c in out.choices}) > 1
    assert out.usage.completion_tokens == 15
    again = client.completions.create(model=MODEL, prompt=PROMPT, n=3, max_tokens=5,
                                      temperature=1.0, seed=3, extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in out.choices]
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2, max_tokens=4,
        stream=True, seed=5, extra_body={"ignore_eos": True}))
    for i in (0, 1):
        mine = [ch for c in chunks for ch in c.choices if ch.index == i]
        assert mine[0].delta.role == "assistant"
        assert sum(1 for c in mine[1:] if c.delta.content is not None) == 4  # a chunk per token
        assert mine[-1].finish_reason == "length"


def test_a_batch_of_prompts_is_answered_as_vllm_numbers_it(client, llm):
    """prompt: [a, b] (text or ids) with n choices: prompt i's choices are i * n + j, each as the
    prompt alone gives it; usage counts each prompt once (lm-eval's local-completions batches
    so, and was refused)."""
    prompts = [PROMPT, "Once upon a time", [1000, 2000, 3000]]
    greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    want = [o.outputs[0].text for o in llm.generate(
        [PROMPT, "Once upon a time", {"prompt_token_ids": [1000, 2000, 3000]}], greedy,
        use_tqdm=False)]
    out = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=4,
                                    temperature=0.0, extra_body={"ignore_eos": True})
    assert [c.index for c in sorted(out.choices, key=lambda c: c.index)] == list(range(6))
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == [
        w for w in want for _ in range(2)]
    num_prompt = sum(len(llm.get_tokenizer().encode(p)) if isinstance(p, str) else len(p)
                     for p in prompts)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (num_prompt, 24)
    streamed: dict[int, str] = {}
    for chunk in client.completions.create(model=MODEL, prompt=prompts[:2], max_tokens=4,
                                           temperature=0.0, stream=True, echo=True,
                                           extra_body={"ignore_eos": True}):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert streamed == {0: PROMPT + want[0], 1: "Once upon a time" + want[1]}


def test_completion_logprobs_equal_the_engines(client, llm):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0.0,
                                    logprobs=2, extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    want = llm.generate([PROMPT], SamplingParams(max_tokens=4, temperature=0.0, logprobs=2,
                                                 ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert lp.token_logprobs == pytest.approx(
        [e[t].logprob for t, e in zip(want.token_ids, want.logprobs)], abs=1e-4)
    assert all(2 <= len(top) <= 3 for top in lp.top_logprobs)
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(4)]


def test_streamed_text_offsets_equal_the_whole_responses(client):
    """Characters split across tokens (accents, emoji): offsets count each token's text, streamed
    or not."""
    body = dict(model=MODEL, prompt="Über naïve café 🙂 ok", echo=True, logprobs=1, max_tokens=12,
                temperature=0.0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**body).choices[0].logprobs
    chunks = [c.choices[0].logprobs for c in client.completions.create(**body, stream=True)]
    streamed = [o for lp in chunks if lp is not None for o in lp.text_offset]
    assert streamed == whole.text_offset
    assert whole.text_offset == [sum(map(len, whole.tokens[:i]))
                                 for i in range(len(whole.tokens))]


def test_echo_with_max_tokens_0_scores_the_prompt(client, llm):
    """lm-evaluation-harness's loglikelihood request: the prompt back with its logprobs."""
    ids = llm.get_tokenizer().encode(PROMPT)
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True,
                                    logprobs=1, temperature=0.0)
    choice = out.choices[0]
    assert choice.text == PROMPT and out.usage.completion_tokens == 0
    want = llm.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=1),
                        use_tqdm=False)[0].prompt_logprobs
    assert choice.logprobs.token_logprobs[0] is None
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(
        [want[i][ids[i]].logprob for i in range(1, len(ids))], abs=1e-4)
    echoed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, echo=True,
                                       temperature=0.0, extra_body={"ignore_eos": True})
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0.0,
                                      extra_body={"ignore_eos": True})
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text


def test_prompt_logprobs_come_back_as_vllm_returns_them(client, llm):
    """Completions: each choice's ``prompt_logprobs``; chat: the response's. Token id -> logprob,
    rank, text; the first position None."""
    ids = llm.get_tokenizer().encode(PROMPT)
    want = llm.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=1),
                        use_tqdm=False)[0].prompt_logprobs
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=2, n=2,
                                    extra_body={"prompt_logprobs": 1})
    for choice in out.choices:
        got = choice.model_extra["prompt_logprobs"]
        assert len(got) == len(ids) and got[0] is None
        for i in range(1, len(ids)):
            entry = got[i][str(ids[i])]
            assert entry["logprob"] == pytest.approx(want[i][ids[i]].logprob, abs=1e-4)
            assert entry["rank"] == want[i][ids[i]].rank and entry["decoded_token"]
            assert 1 <= len(got[i]) <= 2  # the prompt's token, and the most likely if not it
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=1, extra_body={"prompt_logprobs": 0})
    got = chat.model_extra["prompt_logprobs"]
    assert got[0] is None and all(len(e) == 1 for e in got[1:])
    assert chat.usage.prompt_tokens == len(got)
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1)
    assert "prompt_logprobs" not in (plain.choices[0].model_extra or {})


def test_chat_logprobs(client):
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
        temperature=0.0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = out.choices[0].logprobs.content
    assert len(content) == 3
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy
        assert entry.bytes == list(entry.token.encode())
    assert "".join(e.token for e in content) == out.choices[0].message.content


def test_min_tokens_and_penalties_are_honoured(client, llm):
    first = llm.generate([PROMPT], SamplingParams(max_tokens=1, temperature=0.0),
                         use_tqdm=False)[0].outputs[0].token_ids[0]
    stops = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0.0,
                                      extra_body={"stop_token_ids": [first]})
    assert stops.usage.completion_tokens == 1 and stops.choices[0].finish_reason == "stop"
    held = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0.0, presence_penalty=1.0,
        frequency_penalty=0.5, extra_body={"min_tokens": 3, "repetition_penalty": 1.2,
                                           "stop_token_ids": [first]})
    assert held.usage.completion_tokens >= 3


def test_allowed_token_ids_and_bad_words_are_honoured(client, llm):
    """vLLM's vocabulary restrictions reach the sampler (test_sampling_fields.py tests them)."""
    allowed = [11, 12, 13]
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0,
                                    extra_body={"allowed_token_ids": allowed,
                                                "return_token_ids": True})
    assert set(out.choices[0].model_extra["token_ids"]) <= set(allowed)
    first = llm.generate([PROMPT], SamplingParams(max_tokens=1, temperature=0.0),
                         use_tqdm=False)[0].outputs[0].text.strip()
    if first.isalpha():  # (a word to ban: the greedy reply's first)
        out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1,
                                        temperature=0.0, extra_body={"bad_words": [first]})
        assert out.choices[0].text.strip() != first


def test_return_token_ids_whole_and_streamed(client, llm):
    """vLLM's return_token_ids: each choice's generated ids beside its text, and the prompt's
    ids (a completion choice's own; a chat response's, or its first chunk's)."""
    ids = llm.get_tokenizer().encode(PROMPT)
    body = dict(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0.0,
                extra_body={"ignore_eos": True, "return_token_ids": True})
    want = llm.generate([PROMPT], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].token_ids
    choice = client.completions.create(**body).choices[0].model_dump()
    assert (choice["token_ids"], choice["prompt_token_ids"]) == (list(want), ids)
    chunks = [c.choices[0].model_dump() for c in client.completions.create(**body, stream=True)]
    assert [t for c in chunks for t in c["token_ids"]] == list(want)
    assert chunks[0]["prompt_token_ids"] == ids and "prompt_token_ids" not in chunks[1]
    chat = dict(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                extra_body={"ignore_eos": True, "return_token_ids": True})
    whole = client.chat.completions.create(**chat).model_dump()
    assert len(whole["choices"][0]["token_ids"]) == 3 and whole["prompt_token_ids"]
    stream = [c.model_dump() for c in client.chat.completions.create(**chat, stream=True)]
    assert stream[0]["prompt_token_ids"] == whole["prompt_token_ids"]
    assert sum(len(c["choices"][0].get("token_ids") or []) for c in stream if c["choices"]) == 3
    plain = client.completions.create(**{**body, "extra_body": {"ignore_eos": True}})
    assert "token_ids" not in plain.choices[0].model_dump()  # only when asked for


def test_truncate_prompt_tokens_keeps_the_prompts_end(client, llm):
    """vLLM's truncate_prompt_tokens: the prompt's last k tokens run (-1: all that leave room
    for an output token; max_model_len was refused as too long); it was refused."""
    ids = list(range(1000, 1300))  # longer than the context (256)
    greedy = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    want = llm.generate({"prompt_token_ids": ids[-50:]}, greedy,
                        use_tqdm=False)[0].outputs[0].text
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=3, temperature=0.0,
                                    echo=True, extra_body={"ignore_eos": True,
                                                           "truncate_prompt_tokens": 50})
    assert out.usage.prompt_tokens == 50
    assert out.choices[0].text.endswith(want)
    assert out.choices[0].text == llm.get_tokenizer().decode(ids[-50:]) + want
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi " * 400}], max_tokens=2,
        extra_body={"truncate_prompt_tokens": 100})
    assert chat.usage.prompt_tokens == 100
    fit = client.completions.create(model=MODEL, prompt=ids, max_tokens=1,
                                    extra_body={"truncate_prompt_tokens": -1})
    assert fit.usage.prompt_tokens == 255 and fit.usage.completion_tokens == 1
    for k, message in ((0, r"-1 \(all that fit\) or at least 1"), (256, "must be less than")):
        with pytest.raises(openai.BadRequestError, match=message):
            client.completions.create(model=MODEL, prompt="x", max_tokens=1,
                                      extra_body={"truncate_prompt_tokens": k})


def _as_ids(ids) -> list[str]:
    return [f"token_id:{t}" for t in ids]


def test_return_tokens_as_token_ids_names_logprobs_tokens_by_id(client):
    """vLLM's return_tokens_as_token_ids: every token in logprobs (chosen and alternatives,
    completions and chat, whole and streamed) is "token_id:<id>"; the text is unchanged."""
    body = dict(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0.0, logprobs=2,
                extra_body={"ignore_eos": True, "return_token_ids": True,
                            "return_tokens_as_token_ids": True})
    plain = client.completions.create(**{**body, "extra_body": {"ignore_eos": True}})
    choice = client.completions.create(**body).choices[0]
    ids = choice.model_extra["token_ids"]
    assert choice.text == plain.choices[0].text
    assert choice.logprobs.tokens == _as_ids(ids) != plain.choices[0].logprobs.tokens
    assert choice.logprobs.token_logprobs == plain.choices[0].logprobs.token_logprobs
    for top, want in zip(choice.logprobs.top_logprobs, plain.choices[0].logprobs.top_logprobs):
        assert len(top) == len(want) and all(k.startswith("token_id:") for k in top)
        assert sorted(top.values()) == sorted(want.values())
    streamed = [t for c in client.completions.create(**body, stream=True)
                for t in c.choices[0].logprobs.tokens]
    assert streamed == _as_ids(ids)
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, logprobs=True,
        top_logprobs=2, temperature=0.0,
        extra_body={"ignore_eos": True, "return_token_ids": True,
                    "return_tokens_as_token_ids": True}).choices[0]
    content = chat.logprobs.content
    assert [c.token for c in content] == _as_ids(chat.model_extra["token_ids"])
    texts = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, logprobs=True,
        top_logprobs=2, temperature=0.0,  # (the same tokens as the one above)
        extra_body={"ignore_eos": True}).choices[0].logprobs.content
    assert [c.bytes for c in content] == [c.bytes for c in texts]  # the text's, as vLLM's
    assert all(t.token.startswith("token_id:") for c in content for t in c.top_logprobs)
    prompt = client.completions.create(**{**body, "extra_body": {
        "return_tokens_as_token_ids": True, "prompt_logprobs": 0}}).choices[0].model_extra
    assert not any(lp["decoded_token"].startswith("token_id:") for entry in
                   prompt["prompt_logprobs"][1:] for lp in entry.values())
    with pytest.raises(openai.BadRequestError, match="return_tokens_as_token_ids"):
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1,
                                  extra_body={"return_tokens_as_token_ids": "yes"})


def test_the_server_flag_names_tokens_by_id_unless_a_request_says_not():
    from helpers import openai_servers

    from fairswitch.server import ServerSettings

    with openai_servers({"ids": ServerSettings(return_tokens_as_token_ids=True)}) as clients:
        ask = dict(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0.0, logprobs=0)
        by_id = clients["ids"].completions.create(**ask, extra_body={"return_token_ids": True})
        assert by_id.choices[0].logprobs.tokens == _as_ids(by_id.choices[0].model_extra[
            "token_ids"])
        text = clients["ids"].completions.create(
            **ask, extra_body={"return_tokens_as_token_ids": False}).choices[0].logprobs.tokens
        assert "".join(text) == by_id.choices[0].text
        # The Responses API finds the answer's logprobs by the tokens' text: named by text
        reply = clients["ids"].responses.create(model=MODEL, input="Hi", max_output_tokens=2,
                                                temperature=0.0,
                                                include=["message.output_text.logprobs"])
        tokens = [lp.token for lp in reply.output[0].content[0].logprobs]
        assert tokens and not any(t.startswith("token_id:") for t in tokens)
        assert "".join(tokens) == reply.output_text


def test_chat_echo_repeats_the_assistant_message_it_continues(client):
    """vLLM's chat echo: a reply to a conversation that ends with an assistant message starts
    with that message (whole, and in a stream's opening chunk); after a user's, no echo."""
    started = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Well, I"}]
    ask = dict(model=MODEL, messages=started, max_tokens=3, temperature=0.0)
    cont = {"continue_final_message": True, "add_generation_prompt": False, "ignore_eos": True}
    plain = client.chat.completions.create(**ask, extra_body=cont).choices[0].message.content
    echoed = client.chat.completions.create(**ask, extra_body={**cont, "echo": True})
    assert echoed.choices[0].message.content == "Well, I" + plain
    assert echoed.usage.completion_tokens == 3
    chunks = list(client.chat.completions.create(**ask, stream=True,
                                                 extra_body={**cont, "echo": True}))
    assert chunks[0].choices[0].delta.content == "Well, I"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Well, I" + plain
    user_last = dict(model=MODEL, messages=started[:1], max_tokens=3, temperature=0.0,
                     extra_body={"ignore_eos": True})
    assert client.chat.completions.create(**user_last).choices[0].message.content == \
        client.chat.completions.create(**{**user_last, "extra_body": {
            "ignore_eos": True, "echo": True}}).choices[0].message.content
