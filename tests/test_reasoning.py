"""Reasoning models' thinking apart from their answer (reasoning.py, ``--reasoning-parser``):
whole and however streamed, and through the server with the openai client (the reply's text
held by structured output to what a reasoning model writes)."""

from __future__ import annotations

import json
import random

import pytest

from helpers import literal_regex, openai_servers

from fairswitch.server.reasoning import Reasoning

# (parser, reply, reasoning, content)
REPLIES = [
    ("deepseek_r1", "Let me think.\n</think>\n\nThe answer is 4.", "Let me think.\n",
     "\n\nThe answer is 4."),
    ("deepseek_r1", "<think>\nhmm</think>ok", "\nhmm", "ok"),  # (its own opening tag dropped)
    ("deepseek_r1", "still thinking <", "still thinking <", ""),  # cut short while thinking
    ("qwen3", "<think>\nPlan.\n</think>\n\nHi!", "\nPlan.\n", "\n\nHi!"),
    ("qwen3", "  <think>a</think>b", "a", "b"),
    ("qwen3", "Hi there </think> x", None, "Hi there </think> x"),  # (no thinking opened)
    ("qwen3", "  <thi", None, "  <thi"),
    ("qwen3", "<think>cut short </thi", "cut short </thi", ""),
    ("qwen3", "<think></think>", "", ""),
    ("qwen3", "", None, ""),
]


@pytest.mark.parametrize("parser, reply, thought, answer", REPLIES)
def test_a_reply_splits_the_same_whole_and_however_it_is_streamed(parser, reply, thought,
                                                                   answer):
    assert Reasoning(parser).whole(reply) == (thought, answer)
    rng = random.Random(0)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(reply)), rng.randint(0, min(6, len(reply) - 1)))
                      ) if len(reply) > 1 else []
        pieces = [reply[a:b] for a, b in zip([0, *cuts], [*cuts, len(reply)])] or [""]
        split = Reasoning(parser)
        told = [split.delta(2, piece, final=i == len(pieces) - 1)
                for i, piece in enumerate(pieces)]
        assert ("".join(r for r, _ in told), "".join(c for _, c in told)) == (
            thought or "", answer), pieces


@pytest.mark.parametrize("parser, pieces, thinking", [
    ("qwen3", ["<think>", "\nTwo", " and two.\n", "</think>", "\n\nFour."], 4),
    ("qwen3", ["<th", "ink>", "a", "</th", "ink>\n", "b"], 5),  # (tags across tokens)
    ("qwen3", ["Four", "."], 0),
    ("qwen3", ["<", "b>"], 0),  # (held back as a possible <think>, then not one)
    ("qwen3", ["<think>", "cut"], 2),  # cut short while thinking
    ("qwen3", [], 0),
    ("deepseek_r1", ["Two", " and two", "</think>", "Four"], 3),
    ("deepseek_r1", ["</think>", "Four"], 1),
    ("deepseek_r1", ["Two", " and two"], 2),
])
def test_the_tokens_of_the_thinking_are_counted_up_to_the_one_closing_it(parser, pieces,
                                                                         thinking):
    assert Reasoning(parser).count(pieces) == thinking


def test_a_held_reply_thinks_first_under_deepseek_r1_and_where_it_opens_so_under_qwen3():
    """deepseek_r1's models always think: a structure holds the answer after </think> (vLLM's
    way). Under qwen3 a reply need not think: it is free only if its first token is <think>."""
    from fairswitch.server.protocol import parse_chat

    body = {"messages": [{"role": "user", "content": "a?"}],
            "response_format": {"type": "json_object"}}
    r1 = parse_chat(body, None, "deepseek_r1")
    assert r1.structured_outputs.after == "</think>" and r1.structured_outputs.opens is None
    assert not r1.reasoning.opened_only
    qwen = parse_chat(body, None, "qwen3")
    assert (qwen.structured_outputs.after, qwen.structured_outputs.opens) == ("</think>",
                                                                              "<think>")
    assert qwen.reasoning.opened_only
    assert parse_chat(body).structured_outputs.after is None


class _Matcher:
    """A grammar that allows token 0 only, and ends after two tokens."""

    def __init__(self) -> None:
        self.fed: list[int] = []

    def fill_next_token_bitmask(self, bitmask, row: int) -> None:
        bitmask[row].fill_(0)
        bitmask[row, 0] = 1

    def accept_token(self, token_id: int) -> bool:
        self.fed.append(token_id)
        return token_id == 0

    def is_terminated(self) -> bool:
        return len(self.fed) >= 2


def _allowed(held, vocab: int = 64) -> set[int]:
    import torch

    bitmask = torch.zeros((1, vocab // 32), dtype=torch.int32)
    held.fill_next_token_bitmask(bitmask, 0)
    return {t for t in range(vocab) if int(bitmask[0, t // 32]) >> (t % 32) & 1}


def test_a_reply_opens_free_only_with_its_opener_token():
    """HeldAfter with an opener (a hybrid model's <think>): its first token is the structure's
    or the opener; the opener frees it up to ``after``, anything else holds it from there."""
    from fairswitch.structured_output import HeldAfter, holds

    text = {40: "<think>", 7: "hm", 8: "</think>", 0: "{}"}
    thinking = HeldAfter(_Matcher(), "</think>", lambda ids: text[ids[0]], opener=40)
    assert _allowed(thinking) == {0, 40} and holds(thinking)
    for token in (40, 7, 7):
        assert thinking.accept_token(token) and not holds(thinking)
        assert _allowed(thinking) == set(range(64))
    assert thinking.accept_token(8) and holds(thinking) and _allowed(thinking) == {0}
    assert thinking.accept_token(0) and thinking.accept_token(0) and thinking.is_terminated()
    assert thinking.matcher.fed == [0, 0]  # (the grammar saw the answer only)
    answering = HeldAfter(_Matcher(), "</think>", lambda ids: text[ids[0]], opener=40)
    assert answering.accept_token(0) and holds(answering) and answering.matcher.fed == [0]
    assert not answering.accept_token(7)  # (held: the grammar's refusal is the token's)
    never = HeldAfter(_Matcher(), "</think>", lambda ids: text[ids[0]], opener=-1)
    assert _allowed(never) == {0} and holds(never)
    top = HeldAfter(_Matcher(), "</think>", lambda ids: text[ids[0]], opener=63)
    assert _allowed(top) == {0, 63}  # (bit 31 of an int32 word: its sign)


def test_unknown_parsers_are_refused():
    from fairswitch.server import ServerSettings

    with pytest.raises(ValueError, match="unknown reasoning parser 'o1'"):
        Reasoning("o1")
    with pytest.raises(ValueError, match="reasoning_parser must be one of deepseek_r1, qwen3"):
        ServerSettings(reasoning_parser="granite")


def test_an_assistants_past_thinking_reaches_the_template_under_both_names():
    from fairswitch.chat_messages import MessageTypeError, parse_conversation

    (m,) = parse_conversation([{"role": "assistant", "content": "4", "reasoning_content": "2+2"}])
    assert m["reasoning"] == m["reasoning_content"] == "2+2"
    with pytest.raises(MessageTypeError, match="'messages\\[0\\].reasoning' must be a string"):
        parse_conversation([{"role": "assistant", "content": "4", "reasoning": 1}])
    (m,) = parse_conversation([{"role": "assistant", "content": "4", "reasoning": "",
                                "reasoning_content": "2+2"}])  # (the one that says something)
    assert m["reasoning"] == "2+2"
    with pytest.raises(ValueError, match="'messages\\[0\\].reasoning_content' holds a lone"):
        parse_conversation([{"role": "assistant", "content": "4",
                             "reasoning_content": "\ud800"}])


# ---- through the server ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clients():
    """openai clients on servers over the default model: one per reasoning parser, one with
    qwen3 and the hermes tool parser."""
    pytest.importorskip("xgrammar")
    from fairswitch.server import ServerSettings

    with openai_servers({
            "qwen3": ServerSettings(reasoning_parser="qwen3"),
            "deepseek_r1": ServerSettings(reasoning_parser="deepseek_r1"),
            "tools": ServerSettings(reasoning_parser="qwen3", tool_call_parser="hermes")}) as out:
        yield out


def _tokenizer():
    """The default model's, which the servers run."""
    from fairswitch.model.default_model import default_model_dir
    from fairswitch.model.tokenizer import load_tokenizer

    return load_tokenizer(default_model_dir())


def _chat(client, reply: str, stream: bool = False, **extra):
    return client.chat.completions.create(
        model="fairswitch-tiny", messages=[{"role": "user", "content": "2+2?"}], max_tokens=160,
        temperature=0.0, stream=stream, **extra.pop("top", {}),
        extra_body={"structured_outputs": {"regex": literal_regex(reply)}, **extra})


def _streamed(chunks) -> tuple[str, str, list]:
    reasoning = content = ""
    calls = []
    for chunk in chunks:
        if chunk.choices:
            delta = chunk.choices[0].delta
            reasoning += (delta.model_extra or {}).get("reasoning") or ""
            content += delta.content or ""
            calls += delta.tool_calls or []
    return reasoning, content, calls


@pytest.mark.parametrize("parser, reply, thought, answer", [
    ("qwen3", "<think>\nTwo and two.\n</think>\n\nFour.", "\nTwo and two.\n", "\n\nFour."),
    ("qwen3", "Four.", None, "Four."),
])
def test_the_reply_gives_its_thinking_as_reasoning(clients, parser, reply, thought, answer):
    message = _chat(clients[parser], reply).choices[0].message
    extra = message.model_extra or {}
    assert message.content == answer
    assert extra.get("reasoning") == extra.get("reasoning_content") == thought
    reasoning, content, _ = _streamed(_chat(clients[parser], reply, stream=True))
    assert (reasoning, content) == (thought or "", answer)
    # usage counts the thinking's tokens: those up to the one whose text closes it
    whole = _chat(clients[parser], reply, return_token_ids=True)
    ids, decode = whole.choices[0].model_extra["token_ids"], _tokenizer().decode
    closed = [k for k in range(1, len(ids) + 1) if "</think>" in decode(ids[:k])]
    thinking = closed[0] if thought is not None else 0
    assert whole.usage.completion_tokens_details.reasoning_tokens == thinking
    assert (thinking > 0) == (thought is not None) and whole.usage.completion_tokens == len(ids)
    *_, last = _chat(clients[parser], reply, stream=True,
                     top={"stream_options": {"include_usage": True}})
    assert last.usage.completion_tokens_details.reasoning_tokens == thinking
    hidden = _chat(clients[parser], reply, include_reasoning=False).choices[0].message
    assert hidden.content == answer and "reasoning" not in (hidden.model_extra or {})


def test_calls_are_read_from_the_answer_not_the_thinking(clients):
    call = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    reply = f"<think>I could <tool_call> here.</think><tool_call>{call}</tool_call>"
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}
    choice = _chat(clients["tools"], reply, top={"tools": [weather]}).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.model_extra["reasoning"] == "I could <tool_call> here."
    (got,) = choice.message.tool_calls
    assert json.loads(got.function.arguments) == {"city": "Paris"}
    reasoning, content, calls = _streamed(_chat(clients["tools"], reply, stream=True,
                                                top={"tools": [weather]}))
    assert reasoning == "I could <tool_call> here." and content == ""
    assert [c.function.name for c in calls] == ["get_weather"]


def test_responses_give_the_thinking_as_a_reasoning_item(clients):
    reply = "<think>\nTwo and two.\n</think>\n\nFour."
    ask = dict(model="fairswitch-tiny", input="2+2?", max_output_tokens=160, temperature=0.0,
               extra_body={"structured_outputs": {"regex": literal_regex(reply)}})
    whole = clients["qwen3"].responses.create(**ask)
    thought, message = whole.output
    assert thought.type == "reasoning" and thought.content[0].text == "\nTwo and two.\n"
    assert message.type == "message" and whole.output_text == "\n\nFour."
    with clients["qwen3"].responses.stream(**ask) as stream:
        deltas = [e.delta for e in stream if e.type == "response.reasoning_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == "\nTwo and two.\n"
    assert [item.type for item in final.output] == ["reasoning", "message"]
    assert final.output_text == whole.output_text
    thinking = whole.usage.output_tokens_details.reasoning_tokens
    assert 0 < thinking < whole.usage.output_tokens
    assert final.usage.output_tokens_details.reasoning_tokens == thinking


def test_a_json_reply_under_qwen3_is_all_answer(clients):
    """Held to a structure from its first token (qwen3: a reply need not think), a reply thinks
    only where the structure opens it with <think>: a JSON reply is all answer."""
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0,
                                                     "maximum": 9}}, "required": ["a"],
              "additionalProperties": False}
    out = clients["qwen3"].chat.completions.create(
        model="fairswitch-tiny", messages=[{"role": "user", "content": "a?"}], max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    message = out.choices[0].message
    assert set(json.loads(message.content)) == {"a"}
    assert "reasoning" not in (message.model_extra or {})


def test_under_deepseek_r1_a_held_reply_thinks_freely_first(clients):
    """deepseek_r1: the structure holds only the answer, after </think>. The tiny model's free
    thinking seldom closes within max_tokens: then all of it is reasoning, cut at the length;
    if it does close, the answer is the structure's."""
    out = clients["deepseek_r1"].chat.completions.create(
        model="fairswitch-tiny", messages=[{"role": "user", "content": "2+2?"}], max_tokens=30,
        temperature=1.0, seed=4, extra_body={"structured_outputs": {"regex": "Four\\."}})
    choice = out.choices[0]
    thought = (choice.message.model_extra or {}).get("reasoning")
    assert thought and thought != "Four."
    # (all thinking: no answer, null as vLLM's parsers give it)
    assert ((choice.finish_reason, choice.message.content) == ("length", None)
            or choice.message.content.endswith("Four."))  # (after the token closing it)


def test_a_named_call_opens_with_the_answer_not_during_the_thinking():
    """A named call's first delta (id, name) came with the first chunk, thinking included;
    cut while thinking, a whole reply gave a call with no arguments."""
    from fairswitch.server.tool_calls import ToolCalls

    calls = ToolCalls("f")
    assert calls.delta(0, "", final=False) == ("", [])  # (a chunk of thinking)
    _, first = calls.delta(0, '{"a"', final=False)
    assert first[0]["id"] and first[0]["function"] == {"name": "f", "arguments": '{"a"'}
    assert calls.whole("") == ("", None)
    assert ToolCalls("f").delta(0, "", final=True)[1][0]["function"]["name"] == "f"


def test_min_tokens_holds_while_a_structured_reply_thinks(clients):
    """deepseek_r1 with a structure: while free, the reply's EOS is masked before min_tokens
    (it was not: a grammar was taken to decide the end even before it held anything)."""
    eos = 2  # (the default model's EOS)
    out = clients["deepseek_r1"].chat.completions.create(
        model="fairswitch-tiny", messages=[{"role": "user", "content": "a?"}], max_tokens=8,
        logit_bias={str(eos): 100}, response_format={"type": "json_object"},
        extra_body={"min_tokens": 6, "return_token_ids": True})
    ids = out.choices[0].model_extra["token_ids"]
    assert len(ids) >= 6 and eos not in ids[:6]
