"""Structured output (structured_output.py): replies held to a JSON schema, any JSON object, a
regex, a choice or a grammar, through LLM.generate and the server's response_format, guided_*
and structured_outputs, as vLLM and the OpenAI API ask for them. The tiny model writes nonsense
without them; with them every reply parses, whatever the sampling."""

from __future__ import annotations

import json
import re

import openai
import pytest

from fairswitch import LLM, SamplingParams
from fairswitch.structured_output import StructuredOutputsParams

pytest.importorskip("xgrammar")

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 10},
    "age": {"type": "integer", "minimum": 0, "maximum": 150}},
    "required": ["name", "age"], "additionalProperties": False}
OPTS = dict(num_gpu_blocks=256, max_model_len=256)


@pytest.fixture(scope="module")
def llm():
    return LLM(**OPTS)


def _replies(llm, so, n=4, **sampling):
    params = SamplingParams(**{"max_tokens": 100, "temperature": 1.0, "seed": 5, **sampling},
                            n=n, structured_outputs=so)
    out = llm.generate(["Describe someone."], params, use_tqdm=False)[0]
    return out.outputs


def test_replies_follow_each_kind_of_structure(llm):
    for c in _replies(llm, StructuredOutputsParams(json=PERSON)):
        person = json.loads(c.text)
        assert set(person) == {"name", "age"} and isinstance(person["age"], int), c.text
        assert c.finish_reason == "stop"
    for c in _replies(llm, StructuredOutputsParams(json_object=True)):
        assert isinstance(json.loads(c.text), dict), c.text
    for c in _replies(llm, StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]{2}")):
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", c.text), c.text
    for c in _replies(llm, StructuredOutputsParams(choice=["Paris", "Lyon", "a \"quoted\" one"])):
        assert c.text in ("Paris", "Lyon", 'a "quoted" one'), c.text
    grammar = 'root ::= "yes" | "no" | ("maybe" [0-9])'
    for c in _replies(llm, StructuredOutputsParams(grammar=grammar)):
        assert re.fullmatch(r"yes|no|maybe[0-9]", c.text), c.text


AGE = {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 150}},
       "required": ["age"], "additionalProperties": False}
# A structure opened by "<" (pushed up by a logit bias, or the tiny model seldom writes it)
AGE_TAG = {"structures": [{"begin": "<w>", "schema": AGE, "end": "</w>"}], "triggers": ["<"]}


def _tagged(text: str) -> list[dict]:
    """The structures in ``text``, each checked: outside them, no trigger; one cut short by
    max_tokens may end it."""
    found = re.findall(r"<w>(.*?)</w>", text, re.S)
    rest = re.sub(r"<w>.*?</w>", "", text, flags=re.S)
    assert "<" not in rest or (rest.count("<") == 1 and "<w>".startswith(
        rest[rest.index("<"):][:3]) or rest[rest.index("<"):].startswith("<w>")), text
    return [json.loads(f) for f in found]


def test_a_structural_tag_holds_what_each_trigger_opens(llm):
    """vLLM's structural tags (xgrammar's): free text, but a trigger opens one of the
    structures, held to its begin, a JSON value of its schema and its end."""
    (lt,) = llm.get_tokenizer().encode("<", add_special_tokens=False)
    replies = _replies(llm, StructuredOutputsParams(structural_tag=AGE_TAG), max_tokens=60,
                       logit_bias={lt: 6.0})
    tagged = [_tagged(c.text) for c in replies]  # (a reply may hold none: free text)
    assert sum(map(len, tagged)) >= 2, [c.text for c in replies]
    assert all(set(t) == {"age"} and 0 <= t["age"] <= 150 for tags in tagged for t in tags)
    same = _replies(llm, StructuredOutputsParams(structural_tag=json.dumps(AGE_TAG)),
                    max_tokens=60, logit_bias={lt: 6.0})  # (its JSON text alike)
    assert [c.text for c in same] == [c.text for c in replies]
    newer = {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": ["<"],
             "tags": [{"begin": "<w>", "content": {"type": "json_schema", "json_schema": AGE},
                       "end": "</w>"}]}}
    for c in _replies(llm, StructuredOutputsParams(structural_tag=newer), max_tokens=60,
                      logit_bias={lt: 6.0}):
        _tagged(c.text)
    with pytest.raises(ValueError, match="structural tag does not compile"):
        _replies(llm, StructuredOutputsParams(structural_tag={
            "type": "structural_tag", "format": {"type": "nonsense"}}))


def test_structure_holds_beside_other_requests_and_through_preemption():
    """Grammar requests sample after their previous token is in (no step ahead of them), in a
    batch with free ones, in a cache small enough to preempt them (recompute and swap)."""
    for mode in ("recompute", "swap"):
        small = LLM(num_gpu_blocks=8, block_size=8, max_model_len=64, preemption_mode=mode,
                    swap_space=0.01, max_num_seqs=4)
        free = SamplingParams(max_tokens=45, ignore_eos=True, temperature=1.0, seed=1)
        held = SamplingParams(max_tokens=40, temperature=1.0, seed=2, structured_outputs=(
            StructuredOutputsParams(json=PERSON)))
        outs = small.generate(["a", "bb", "ccc", "dddd"], [free, held, free, held],
                              use_tqdm=False)
        for out in outs[1::2]:
            text = out.outputs[0].text
            if out.outputs[0].finish_reason == "stop":
                assert set(json.loads(text)) == {"name", "age"}, text
            else:  # cut at max_tokens: a prefix of a valid reply still
                assert text.startswith('{"name": "'), text
        assert small.engine.switch_metrics()[f"preemptions_{mode}"] > 0


def test_after_holds_the_reply_only_once_it_has_written_that_text(llm):
    """StructuredOutputsParams(after=...): free until the text is written (a reasoning model's
    thinking up to </think>), then held: here free up to the first space, then a choice."""
    params = SamplingParams(max_tokens=60, temperature=1.0, seed=3, ignore_eos=True,
                            structured_outputs=StructuredOutputsParams(choice=["yes", "no"],
                                                                       after=" "))
    # (ignore_eos: an EOS while free would end the reply before any structure; the complete
    # grammar ends it whatever ignore_eos says)
    for out in llm.generate(["Well?"] * 4, params, use_tqdm=False):
        c = out.outputs[0]
        assert c.finish_reason == "stop", c.text
        assert " " in c.text and c.text.endswith(("yes", "no")), c.text
        free = c.text[:len(c.text) - (3 if c.text.endswith("yes") else 2)]
        assert " " in free  # (the held part came after the space was written)
    with pytest.raises(TypeError, match="after must be a non-empty string"):
        StructuredOutputsParams(choice=["a"], after="")
    with pytest.raises(ValueError, match="opens needs after"):
        StructuredOutputsParams(choice=["a"], opens="<think>")
    # An opener that is not one token (here: 4) cannot open the reply: held throughout.
    opened = SamplingParams(max_tokens=20, temperature=1.0, seed=3, structured_outputs=(
        StructuredOutputsParams(choice=["yes", "no"], after="</think>", opens="<think>")))
    assert llm.generate(["Well?"], opened, use_tqdm=False)[0].outputs[0].text in ("yes", "no")


def test_a_schema_that_does_not_compile_is_the_requests_error(llm):
    with pytest.raises(ValueError, match="the regex does not compile"):
        _replies(llm, StructuredOutputsParams(regex="(("), n=1)
    with pytest.raises(ValueError, match="the JSON schema does not compile"):
        _replies(llm, StructuredOutputsParams(json={"type": "nonsense"}), n=1)
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutputsParams(regex="a", choice=["a"])
    assert _replies(llm, StructuredOutputsParams(choice=["ok"]), n=1)[0].text == "ok"  # alive


def test_min_tokens_past_the_grammars_end_does_not_break_the_step(llm):
    """min_tokens would mask the EOS the finished grammar leaves alone: the grammar decides."""
    out = _replies(llm, StructuredOutputsParams(choice=["ok"]), n=1, min_tokens=5)[0]
    assert (out.text, out.finish_reason) == ("ok", "stop")


def test_allowed_token_ids_that_cannot_begin_the_structure_are_refused(llm, client):
    """The reply could not start: refused when added (it was aborted at its first step, a 500
    through the server); ids that may begin it are taken, and hold the reply with it."""
    tok = llm.get_tokenizer()
    a, b = (tok.encode(ch, add_special_tokens=False) for ch in "ab")
    with pytest.raises(ValueError, match="none of them may begin the structured output"):
        _replies(llm, StructuredOutputsParams(regex="a+"), n=1, allowed_token_ids=b)
    out = _replies(llm, StructuredOutputsParams(regex="a+"), n=1, allowed_token_ids=a + b,
                   max_tokens=4)[0]
    assert out.text == "aaaa"
    free = StructuredOutputsParams(regex="a+", after="</think>")  # free at first: any id
    assert _replies(llm, free, n=1, allowed_token_ids=b, max_tokens=2)[0].text == "bb"
    with pytest.raises(openai.BadRequestError, match="allowed_token_ids"):
        client.completions.create(model="fairswitch-tiny", prompt="x", max_tokens=2,
                                  extra_body={"guided_regex": "a+", "allowed_token_ids": b})


def test_restrictions_that_leave_a_structure_no_way_on_are_the_requests_error(llm, client):
    """Past its first token (which is checked when it is added): the reply ends "abort" with
    the reason in the output, a 400 through the server, whole or streamed (it was a 500)."""
    (a,), (b,) = (llm.get_tokenizer().encode(ch, add_special_tokens=False) for ch in "ab")
    out = llm.generate(["x"], SamplingParams(max_tokens=5, allowed_token_ids=[a],
                                             structured_outputs=StructuredOutputsParams(
                                                 regex="ab")), use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "abort" and out.outputs[0].token_ids[:1] == [a]
    assert "no token the request allows can continue its structure" in out.outputs[0].error
    c, d = (llm.get_tokenizer().encode(ch, add_special_tokens=False)[0] for ch in "cd")
    choices = llm.generate(["x"], SamplingParams(
        n=8, seed=0, temperature=1.0, max_tokens=5, allowed_token_ids=[a, b, c],
        structured_outputs=StructuredOutputsParams(regex="ab|cd")), use_tqdm=False)[0].outputs
    assert {o.finish_reason for o in choices} == {"stop", "abort"}  # (each choice its own)
    assert all((o.error is None) == (o.finish_reason == "stop") for o in choices)
    for extra in ({"allowed_token_ids": [a]}, {"bad_words": ["b"]}):
        with pytest.raises(openai.BadRequestError, match="can continue its structure"):
            client.completions.create(model="fairswitch-tiny", prompt="x", max_tokens=5,
                                      extra_body={"guided_regex": "ab", **extra})
        stream = client.completions.create(model="fairswitch-tiny", prompt="x", max_tokens=5,
                                           stream=True,
                                           extra_body={"guided_regex": "ab", **extra})
        with pytest.raises(openai.APIError, match="can continue its structure"):
            list(stream)


@pytest.fixture(scope="module")
def client(openai_client):
    return openai_client


def test_the_server_takes_openais_and_vllms_fields(client):
    chat = dict(model="fairswitch-tiny", messages=[{"role": "user", "content": "Who?"}],
                max_tokens=100, temperature=1.0, seed=3)
    out = client.chat.completions.create(**chat, response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    assert set(json.loads(out.choices[0].message.content)) == {"name", "age"}
    out = client.chat.completions.create(**chat, response_format={"type": "json_object"})
    assert out.choices[0].message.content.startswith("{")  # (any object: may run to the end)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        **chat, stream=True, extra_body={"guided_choice": ["left", "right"]}) if c.choices)
    assert streamed in ("left", "right")
    out = client.completions.create(model="fairswitch-tiny", prompt="Code:", max_tokens=20,
                                    extra_body={"guided_regex": "[A-Z]{4}"})
    assert re.fullmatch("[A-Z]{4}", out.choices[0].text)
    out = client.completions.create(model="fairswitch-tiny", prompt="Pick", max_tokens=20,
                                    extra_body={"structured_outputs": {"choice": ["x", "y"]}})
    assert out.choices[0].text in ("x", "y")
    with pytest.raises(openai.BadRequestError, match="does not compile"):
        client.completions.create(model="fairswitch-tiny", prompt="x", max_tokens=5,
                                  extra_body={"guided_json": {"type": "nonsense"}})
    # structural tags: response_format (the whole object), structured_outputs and vLLM's
    # older top-level field (the tag's JSON text)
    bias = {"30": 100}  # ("<", the trigger: a reply of structures only)
    out = client.chat.completions.create(**{**chat, "max_tokens": 60}, logit_bias=bias,
                                         response_format={"type": "structural_tag", **AGE_TAG})
    assert _tagged(out.choices[0].message.content)
    for extra in ({"structured_outputs": {"structural_tag": json.dumps(AGE_TAG)}},
                  {"structural_tag": json.dumps(AGE_TAG)}):
        out = client.completions.create(model="fairswitch-tiny", prompt="Ages:", max_tokens=60,
                                        temperature=1.0, seed=3, logit_bias=bias,
                                        extra_body=extra)
        assert _tagged(out.choices[0].text)


def test_fields_come_in_the_schemas_order_and_every_token_has_its_logprob(llm):
    """A dict schema was serialized with sorted keys: 'answer' came before 'reasoning' (schemas
    that put reasoning first rely on the order). The token that ended a grammar had no logprob."""
    schema = {"type": "object", "properties": {"reasoning": {"type": "string", "maxLength": 8},
                                               "answer": {"type": "integer", "maximum": 99}},
              "required": ["reasoning", "answer"], "additionalProperties": False}
    for c in _replies(llm, StructuredOutputsParams(json=schema), n=2, logprobs=0):
        assert c.text.startswith('{"reasoning": '), c.text
        if c.finish_reason == "stop":
            assert len(c.logprobs) == len(c.token_ids)


def test_compiled_grammars_are_cached_within_a_bound(llm):
    from fairswitch.structured_output import CACHE_LIMIT_BYTES

    _replies(llm, StructuredOutputsParams(choice=["a"]), n=1)
    assert llm.engine._grammars()._compiler.cache_limit_bytes == CACHE_LIMIT_BYTES


def test_vllms_other_structured_output_options_at_their_defaults_are_taken(client):
    out = client.completions.create(model="fairswitch-tiny", prompt="Pick", max_tokens=20,
                                    extra_body={"structured_outputs": {
                                        "choice": ["x", "y"], "disable_fallback": False,
                                        "disable_any_whitespace": True,
                                        "whitespace_pattern": None}})
    assert out.choices[0].text in ("x", "y")


def test_the_async_engine_compiles_off_its_engine_thread():
    """A large schema, or the first one (the vocabulary is read then), paused every stream while
    it compiled on the engine thread."""
    import asyncio
    import threading

    from fairswitch.config import EngineConfig
    from fairswitch.engine.async_engine import AsyncEngine

    engine = AsyncEngine.from_config(EngineConfig.from_kwargs(**OPTS))
    threads = []
    compile_grammar = engine.engine.compile_grammar

    def spy(spec):
        threads.append(threading.current_thread())
        return compile_grammar(spec)

    engine.engine.compile_grammar = spy

    async def run():
        params = SamplingParams(max_tokens=10, structured_outputs=StructuredOutputsParams(
            choice=["yes", "no"]))
        return [out async for out in engine.generate("Well?", params)][-1]

    try:
        last = asyncio.run(run())
        with pytest.raises(ValueError, match="does not compile"):
            asyncio.run(anext(engine.generate("x", SamplingParams(
                structured_outputs=StructuredOutputsParams(regex="((")))))
    finally:
        engine.shutdown()
    assert last.outputs[0].text in ("yes", "no")
    assert threads and engine._thread not in threads and threading.main_thread() not in threads


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
    "required": ["city"], "additionalProperties": False}}}


def test_a_named_tool_choice_makes_the_reply_its_call(client):
    """vLLM's (and OpenAI's) forced function call: the reply is the function's arguments, held
    to its parameters' schema, given as message.tool_calls (streamed: the call's id, type and
    name first, then the arguments piece by piece). LangChain's with_structured_output(method=
    "function_calling") sends this."""
    chat = dict(model="fairswitch-tiny", messages=[{"role": "user", "content": "Weather?"}],
                max_tokens=60, temperature=0.0, tools=[WEATHER],
                tool_choice={"type": "function", "function": {"name": "get_weather"}})
    message = client.chat.completions.create(**chat).choices[0].message
    assert message.content is None and len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"city"}
    deltas = [tc for c in client.chat.completions.create(**chat, stream=True) if c.choices
              for tc in c.choices[0].delta.tool_calls or []]
    assert deltas[0].id and deltas[0].function.name == "get_weather"
    assert all(d.id is None and d.function.name is None for d in deltas[1:])
    assert json.loads("".join(d.function.arguments for d in deltas)) == arguments
    for choice, message in (({"type": "function", "function": {"name": "nope"}}, "not list"),
                            ("auto", "needs a parser of the model.s tool calls")):
        with pytest.raises(openai.BadRequestError, match=message):
            client.chat.completions.create(**{**chat, "tool_choice": choice})


def test_tool_choice_required_makes_the_reply_one_call_or_more(client):
    """'required': one call or more to any of the tools, finish_reason 'tool_calls', streamed
    call by call (each call's id and name, then its arguments)."""
    clock = {"type": "function", "function": {"name": "get_time", "parameters": None}}
    chat = dict(model="fairswitch-tiny", messages=[{"role": "user", "content": "Weather?"}],
                max_tokens=120, temperature=0.0, tools=[WEATHER, clock], tool_choice="required")
    choice = client.chat.completions.create(**chat).choices[0]
    if choice.finish_reason == "length":  # (a tiny model can run on; then the text is given)
        pytest.skip("the reply ran past max_tokens")
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]
    assert calls and all(name in ("get_weather", "get_time") for name, _ in calls)
    streamed: dict[int, list] = {}
    for chunk in client.chat.completions.create(**chat, stream=True):
        for d in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            if d.id is not None:
                streamed[d.index] = [d.function.name, d.function.arguments]
            else:
                streamed[d.index][1] += d.function.arguments
    assert [(name, json.loads(args)) for name, args in streamed.values()] == calls


def test_the_stream_reader_gives_the_whole_replys_calls_however_the_text_is_cut():
    import random

    from fairswitch.server.tool_calls import ToolCalls

    text = ('[{"name": "a", "parameters": {"x": "}{\\\\\\"]", "y": [1, {"z": []}]}}, '
            '{"name": "b_2", "parameters": {}}]')
    whole = [(c["function"]["name"], json.loads(c["function"]["arguments"]))
             for c in ToolCalls(None).whole(text)[1]]
    assert [name for name, _ in whole] == ["a", "b_2"]
    rng = random.Random(0)
    for _ in range(50):
        calls, cuts = ToolCalls(None), sorted(rng.sample(range(1, len(text)), 8))
        got: dict[int, list] = {}
        for a, b in zip([0, *cuts], [*cuts, len(text)]):
            for d in calls.delta(0, text[a:b])[1]:
                if "id" in d:
                    got[d["index"]] = [d["function"]["name"], d["function"]["arguments"]]
                else:
                    got[d["index"]][1] += d["function"]["arguments"]
        assert [(name, json.loads(args)) for name, args in got.values()] == whole


def test_the_stream_reader_on_odd_but_valid_replies():
    """A name ending in a backslash (its closing quote was taken as escaped: the stream broke),
    scalar parameters, a reply cut short (no calls whole; not "complete" streamed), and
    parallel_tool_calls false (the first call only)."""
    from fairswitch.server.tool_calls import ToolCalls

    text = '[{"name": "f\\\\", "parameters": null}, {"name": "g", "parameters": "a}b"}]'
    content, calls = ToolCalls(None).whole(text)
    assert content is None
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("f\\", "null"), ("g", '"a}b"')]
    assert "index" not in calls[0]  # (a delta's field only)
    streamed = ToolCalls(None)
    pieces = [d for ch in text for d in streamed.delta(0, ch)[1]]
    assert [d["function"]["name"] for d in pieces if "id" in d] == ["f\\", "g"]
    assert streamed.called(0)
    cut = ToolCalls(None)
    assert cut.whole(text[:30]) == (text[:30], None)  # (the text is the content)
    cut.delta(0, text[:30])
    assert not cut.called(0)
    first_only = ToolCalls(None, parallel=False)
    assert len(first_only.whole(text)[1]) == 1
    assert {d["index"] for d in first_only.delta(1, text)[1]} == {0}


def test_required_hoists_each_tools_defs_and_an_empty_function_takes_nothing(client):
    """pydantic and the openai library write parameters with $defs and $ref: nested in the
    'required' list schema they pointed at nothing (a 400). A function without parameters took
    any object; vLLM's empty schema takes {} only."""
    from fairswitch.server.tool_calls import required_schema

    unit = {"$defs": {"Unit": {"enum": ["C", "F"]}}, "type": "object",
            "properties": {"unit": {"$ref": "#/$defs/Unit"}}, "required": ["unit"],
            "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "temp", "parameters": unit}},
             {"type": "function", "function": {"name": "now"}}]
    schema = required_schema(tools)
    assert schema["$defs"] == unit["$defs"]
    chat = dict(model="fairswitch-tiny", messages=[{"role": "user", "content": "?"}],
                max_tokens=80, temperature=0.0, tools=tools, tool_choice="required",
                extra_body={"return_token_ids": True})
    choice = client.chat.completions.create(**chat).choices[0]
    for call in choice.message.tool_calls or []:
        args = json.loads(call.function.arguments)
        assert args == {} if call.function.name == "now" else args["unit"] in ("C", "F")
    # Every streamed token's id comes back, those of the JSON around the calls too.
    ids = [t for c in client.chat.completions.create(**chat, stream=True) if c.choices
           for t in (c.choices[0].model_dump().get("token_ids") or [])]
    assert len(ids) == len(choice.model_dump()["token_ids"])
    with pytest.raises(ValueError, match="define \\$defs 'Unit' differently"):
        other = {**unit, "$defs": {"Unit": {"enum": ["K"]}}}
        required_schema([*tools, {"type": "function", "function": {"name": "k",
                                                                   "parameters": other}}])
