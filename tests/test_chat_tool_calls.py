"""Tool calls in a conversation's history (an assistant's ``tool_calls``, a tool message's
``tool_call_id``) reach a chat template that renders them, in vLLM's shape (arguments parsed into
a dict), through ``LLM.chat`` and the server alike; a template that would drop them (the default
model's ChatML) gets the conversation refused, naming the first, instead of a reply to a
different conversation. They used to be dropped silently."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import openai
import pytest

from fairswitch import LLM, SamplingParams
from fairswitch.server import BackgroundServer, ServerSettings, build_app, chat

# ChatML, plus the tool calls and the id of the call a tool message answers.
TOOL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for call in m.tool_calls or [] %}"
    "<tool_call>{{ call.id }} {{ call.function.name }} {{ call.function.arguments | tojson }}"
    "</tool_call>"
    "{% endfor %}"
    "{% if m.tool_call_id %} (answers {{ m.tool_call_id }}){% endif %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
CONVERSATION = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}]
RENDERED = ("<|im_start|>user\nWeather in Paris?<|im_end|>\n"
            '<|im_start|>assistant\n<tool_call>call_1 get_weather {"city": "Paris"}</tool_call>'
            "<|im_end|>\n"
            "<|im_start|>tool\nsunny (answers call_1)<|im_end|>\n"
            "<|im_start|>assistant\n")
ONE = SamplingParams(max_tokens=1)


def with_call(**changes) -> list[dict]:
    """CONVERSATION with its tool call's fields changed (``function`` merged)."""
    call = {**CALL, **changes}
    if "function" in changes and isinstance(changes["function"], dict):
        call["function"] = {**CALL["function"], **changes["function"]}
    return [CONVERSATION[0], {**CONVERSATION[1], "tool_calls": [call]}]


@pytest.fixture(scope="module")
def llm():
    return LLM(num_gpu_blocks=64, max_model_len=128)


def test_a_template_that_renders_tool_calls_gets_them(llm):
    out = llm.chat(CONVERSATION, ONE, chat_template=TOOL_TEMPLATE, use_tqdm=False)[0]
    assert out.prompt == RENDERED  # arguments parsed: the template wrote them as a dict
    as_object = with_call(function={"arguments": {"city": "Paris"}}) + CONVERSATION[2:]
    assert llm.chat(as_object, ONE, chat_template=TOOL_TEMPLATE,
                    use_tqdm=False)[0].prompt == RENDERED
    # No arguments (an empty string, as vLLM reads it) is an empty object; an empty tool_calls
    # list is no tool calls.
    no_args = llm.chat(with_call(function={"arguments": ""}), ONE, chat_template=TOOL_TEMPLATE,
                       use_tqdm=False)[0].prompt
    assert "get_weather {}</tool_call>" in no_args
    plain = [CONVERSATION[0], {"role": "assistant", "content": "hi", "tool_calls": []}]
    assert llm.chat(plain, ONE, use_tqdm=False)[0].prompt == llm.chat(
        [CONVERSATION[0], {"role": "assistant", "content": "hi"}], ONE, use_tqdm=False)[0].prompt


@pytest.mark.parametrize("messages, field", [
    (CONVERSATION, r"messages\[1\].tool_calls"),
    ([CONVERSATION[0], CONVERSATION[2]], r"messages\[1\].tool_call_id"),  # a tool result alone
    ([[CONVERSATION[0]], CONVERSATION], r"messages\[1\]\[1\].tool_calls"),
])
def test_a_template_that_would_drop_tool_calls_refuses_them(llm, messages, field):
    """The default model's ChatML template never mentions tool_calls."""
    assert "tool_calls" not in llm.get_tokenizer().chat_template
    with pytest.raises(ValueError, match=f"^'{field}': .* this chat template does not render "
                       "tool calls"):
        llm.chat(messages, ONE, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("messages, error, match", [
    ([CONVERSATION[0], {**CONVERSATION[1], "tool_calls": CALL}], TypeError,
     r"'messages\[1\].tool_calls' must be a list"),
    ([CONVERSATION[0], {**CONVERSATION[1], "tool_calls": ["f"]}], TypeError,
     r"'messages\[1\].tool_calls\[0\]' must be an object"),
    (with_call(type="tool"), ValueError, r"'messages\[1\].tool_calls\[0\].type' must be "
     "'function'"),
    (with_call(id=1), TypeError, r"'messages\[1\].tool_calls\[0\].id' must be a string"),
    (with_call(function="get_weather"), TypeError,
     r"'messages\[1\].tool_calls\[0\].function' must be an object"),
    (with_call(function={"name": None}), TypeError,
     r"'messages\[1\].tool_calls\[0\].function.name' must be a non-empty string, got None"),
    (with_call(function={"name": ""}), ValueError,
     r"'messages\[1\].tool_calls\[0\].function.name' must be a non-empty string"),
    (with_call(function={"arguments": 3}), TypeError,
     r"'messages\[1\].tool_calls\[0\].function.arguments' must be a JSON string or an object"),
    (with_call(function={"arguments": "{city: Paris}"}), ValueError,
     r"'messages\[1\].tool_calls\[0\].function.arguments' must be the JSON text of an object"),
    (with_call(function={"arguments": "[1]"}), ValueError,
     r"'messages\[1\].tool_calls\[0\].function.arguments' must be the JSON text"),
    (with_call(function={"arguments": '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"}),
     ValueError, r"'messages\[1\].tool_calls\[0\].function.arguments' must be the JSON text"),
    (with_call(function={"arguments": '{"a": "\\ud800"}'}), ValueError,
     r"'messages\[1\].tool_calls\[0\].function.arguments' holds a lone UTF-16 surrogate"),
    ([{**CONVERSATION[0], "tool_calls": [CALL]}], ValueError,
     r"'messages\[0\].tool_calls': only an assistant message"),
    ([{**CONVERSATION[2], "tool_call_id": 7}], TypeError,
     r"'messages\[0\].tool_call_id' must be a string"),
    ([{**CONVERSATION[0], "tool_call_id": "call_1"}], ValueError,
     r"'messages\[0\].tool_call_id': only a tool message"),
])
def test_bad_tool_call_fields_are_named(llm, messages, error, match):
    with pytest.raises(error, match=f"^{match}"):
        llm.chat(messages, ONE, chat_template=TOOL_TEMPLATE, use_tqdm=False)


# ---- the server -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tool_server(engine):
    app = build_app(engine, ServerSettings(chat_template=TOOL_TEMPLATE), shutdown_engine=False)
    with BackgroundServer(app) as srv:
        yield srv


def post(url: str, body: dict) -> tuple[int, dict]:
    async def go():
        async with aiohttp.ClientSession() as s:
            async with s.post(url, json=body) as r:
                return r.status, await r.json()
    return asyncio.run(go())


def test_server_renders_tool_calls_with_a_template_that_does(tool_server, engine):
    status, body = post(f"{tool_server.url}/tokenize", {"messages": CONVERSATION})
    assert status == 200, body
    assert engine.engine.tokenizer.decode(body["tokens"]) == RENDERED
    status, body = post(f"{tool_server.url}/v1/chat/completions",
                        {"messages": CONVERSATION, "max_tokens": 1})
    assert status == 200, body
    assert body["usage"]["prompt_tokens"] == len(engine.engine.tokenizer.encode(
        RENDERED, add_special_tokens=False))


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/tokenize"])
def test_server_refuses_tool_calls_its_template_would_drop(server, path):
    for messages, param in ((CONVERSATION, "messages[1].tool_calls"),
                            ([CONVERSATION[0], CONVERSATION[2]], "messages[1].tool_call_id")):
        status, body = post(server.url + path, {"messages": messages, "max_tokens": 1})
        assert status == 400, body
        err = body["error"]
        assert err["type"] == "invalid_request_error" and err["param"] == param
        assert err["message"].startswith(f"'{param}': ")
        assert "does not render tool calls" in err["message"]


def test_tool_call_arguments_that_no_template_could_take_are_named(server, tool_server):
    """Nested past Python's recursion limit, or a lone surrogate once parsed (the body's own
    check sees an escaped string): each a 400 naming the arguments, as any bad JSON there."""
    param = "messages[1].tool_calls[0].function.arguments"
    for srv, arguments, message in (
            (server, '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", "must be the JSON text"),
            (tool_server, '{"a": "\\ud800"}', "holds a lone UTF-16 surrogate")):
        for path in ("/v1/chat/completions", "/tokenize"):
            status, body = post(srv.url + path, {"messages": with_call(
                function={"arguments": arguments}), "max_tokens": 1})
            assert status == 400, body
            assert body["error"]["param"] == param and message in body["error"]["message"]


def test_openai_client_sees_the_refusal_and_the_bad_field(server, tool_server):
    for srv, messages, param in (
            (server, CONVERSATION, "messages[1].tool_calls"),
            (tool_server, with_call(function={"name": 5}),
             "messages[1].tool_calls[0].function.name")):
        with openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0) as client:
            with pytest.raises(openai.BadRequestError) as info:
                client.chat.completions.create(model="fairswitch-tiny", messages=messages,
                                               max_tokens=1)
        assert info.value.body["param"] == param, json.dumps(info.value.body)


def test_a_tool_message_with_content_alone_renders_as_before(llm):
    """Nothing would be lost: ChatML renders its role and content, as it always has."""
    tool = {"role": "tool", "content": "sunny"}
    prompt = llm.chat([CONVERSATION[0], tool], ONE, use_tqdm=False)[0].prompt
    assert "<|im_start|>tool\nsunny<|im_end|>" in prompt


def test_named_templates_are_judged_by_the_default_one():
    """A tokenizer may hold named chat templates (a dict); the default renders, so it decides,
    for LLM.chat and the server alike (their keys never mention tool_calls)."""
    from fairswitch.chat_messages import check_template_renders_tools, parse_conversation

    conversation = parse_conversation(CONVERSATION)
    check_template_renders_tools(conversation, {"default": TOOL_TEMPLATE, "rag": "{{ x }}"})
    with pytest.raises(ValueError, match=r"^'messages\[1\]\.tool_calls': "):
        check_template_renders_tools(conversation, {"default": "{{ x }}", "tool_calls": "y"})


# Tool definitions and chat_template_kwargs, where a template uses them (Llama 3.1's lists the
# tools in its system turn; Qwen3's reads enable_thinking).
TOOLS_TEMPLATE = (
    "{% if tools %}tools: {% for t in tools %}{{ t.function.name }} {% endfor %}\n{% endif %}"
    "{% if enable_thinking is defined and not enable_thinking %}no thinking\n{% endif %}"
    "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/tokenize"])
def test_tools_with_tool_choice_none_and_template_kwargs_reach_the_template(engine, path):
    """vLLM shows tools to the model with tool_choice 'none' and passes chat_template_kwargs to
    the template; both were refused. No tool call is parsed from the reply (so 'auto' and the
    others stay refused: test_server_errors.py)."""
    app = build_app(engine, ServerSettings(chat_template=TOOLS_TEMPLATE), shutdown_engine=False)
    tokenizer = engine.engine.tokenizer
    body = {"messages": [CONVERSATION[0]], "max_tokens": 1, "tools": [WEATHER],
            "tool_choice": "none", "chat_template_kwargs": {"enable_thinking": False}}
    want = "tools: get_weather no thinking\nuser: Weather in Paris?\n"  # (trim_blocks)
    with BackgroundServer(app) as srv:
        status, reply = post(srv.url + path, body)
        assert status == 200, reply
        plain_status, plain = post(srv.url + path, {"messages": [CONVERSATION[0]],
                                                    "max_tokens": 1})
    num_prompt = reply["count"] if path == "/tokenize" else reply["usage"]["prompt_tokens"]
    assert num_prompt == len(tokenizer.encode(want, add_special_tokens=False))
    num_plain = plain["count"] if path == "/tokenize" else plain["usage"]["prompt_tokens"]
    assert num_plain == len(tokenizer.encode("user: Weather in Paris?\n",
                                             add_special_tokens=False))


def test_llm_chat_takes_tools_and_template_kwargs(llm):
    """vLLM's LLM.chat(tools=, chat_template_kwargs=)."""
    out = llm.chat([CONVERSATION[0]], ONE, chat_template=TOOLS_TEMPLATE, tools=[WEATHER],
                   chat_template_kwargs={"enable_thinking": False}, use_tqdm=False)[0]
    assert out.prompt == "tools: get_weather no thinking\nuser: Weather in Paris?\n"
    with pytest.raises(ValueError, match="chat_template_kwargs may not set tools"):
        llm.chat([CONVERSATION[0]], ONE, chat_template_kwargs={"tools": []}, use_tqdm=False)


def test_template_kwargs_cannot_shadow_what_templates_call(server):
    """Qwen's templates call namespace(...): a kwarg of that name made the render a 500."""
    status, body = post(server.url + "/v1/chat/completions", {
        "messages": [CONVERSATION[0]], "max_tokens": 1, "chat_template_kwargs": {"namespace": 1}})
    assert status == 400 and "may not set namespace" in body["error"]["message"], body


DOCS_TEMPLATE = ("{% for d in documents or [] %}[{{ d.title }}] {{ d.text }}\n{% endfor %}"
                 "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
DOCS = [{"title": "Paris", "text": "The capital of France."}, {"title": "Rome", "text": "Italy's."}]


def _rendered(url: str, engine, question: list[dict], **fields) -> str:
    """The prompt a chat request renders (/tokenize's tokens, decoded), checked against the
    prompt tokens its completion counts."""
    status, body = post(f"{url}/tokenize", {"messages": question, **fields})
    assert status == 200, body
    status, reply = post(f"{url}/v1/chat/completions", {"messages": question, **fields,
                                                         "max_tokens": 1})
    assert status == 200 and reply["usage"]["prompt_tokens"] == len(body["tokens"]), reply
    return engine.engine.tokenizer.decode(body["tokens"])


def test_a_requests_chat_template_renders_only_where_the_server_trusts_requests(
        engine, server, monkeypatch):
    """vLLM's --trust-request-chat-template: a request's chat_template replaces the server's;
    untrusted (the default), not Jinja, failing, or rendering for longer than its time bound
    (a loop of 10^10 ran for minutes; one huge power held the interpreter), it is a 400 naming
    it, and the server goes on."""
    monkeypatch.setattr(chat, "REQUEST_TEMPLATE_S", 0.3)
    forever = "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"
    question = [{"role": "user", "content": "Which is French?"}]
    mine = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<reply>"
    status, error = post(f"{server.url}/v1/chat/completions",
                         {"messages": question, "chat_template": mine, "max_tokens": 1})
    assert status == 400 and "--trust-request-chat-template" in error["error"]["message"]
    assert error["error"]["param"] == "chat_template"
    app = build_app(engine, ServerSettings(trust_request_chat_template=True),
                    shutdown_engine=False)
    with BackgroundServer(app) as trusting:
        assert _rendered(trusting.url, engine, question, chat_template=mine) == (
            "<user>Which is French?<reply>")
        plain = _rendered(trusting.url, engine, question)  # (the server's own, without one)
        assert plain != "<user>Which is French?<reply>"
        assert _rendered(trusting.url, engine, question, chat_template="") == plain  # (vLLM's)
        for bad, fragment in (("{% for m in messages %}", "is not a Jinja template"),
                              (7, "'chat_template' must be a string"),
                              ("{{ 1 / 0 }}", "failed while rendering: ZeroDivisionError"),
                              ("{{ 'abc'.index('z') }}", "failed while rendering: ValueError"),
                              ("{{ messages | nosuch }}", "rejected the messages"),
                              (forever, "did not render in time: it ran longer than 0.3 s"),
                              ("{{ (9 ** 300000000) % 7 }}", "did not render in time"),
                              ("{{ 'x' * 3000000000 }}", "failed while rendering: MemoryError")):
            status, error = post(f"{trusting.url}/v1/chat/completions",
                                 {"messages": question, "chat_template": bad, "max_tokens": 1})
            assert status == 400 and fragment in error["error"]["message"], error
            assert error["error"]["param"] == "chat_template"


def test_documents_reach_a_template_that_renders_them(engine, server):
    """vLLM's documents (RAG) go to the chat template; a template that never mentions them (the
    default model's) would drop them, so they are a 400 there; [] is none."""
    question = [{"role": "user", "content": "Which is French?"}]
    app = build_app(engine, ServerSettings(chat_template=DOCS_TEMPLATE), shutdown_engine=False)
    with BackgroundServer(app) as docs_server:
        assert _rendered(docs_server.url, engine, question, documents=DOCS) == (
            "[Paris] The capital of France.\n[Rome] Italy's.\nuser: Which is French?\nassistant:")
        for bad in ({"title": 1}, "Paris", [{}], {}):
            status, error = post(f"{docs_server.url}/v1/chat/completions",
                                 {"messages": question, "documents": [bad] if bad != {} else bad,
                                  "max_tokens": 1})
            assert status == 400 and error["error"]["param"] == "documents", error
    status, error = post(f"{server.url}/v1/chat/completions",
                         {"messages": question, "documents": DOCS, "max_tokens": 1})
    assert status == 400 and "does not render documents" in error["error"]["message"], error
    assert error["error"]["param"] == "documents"
    status, reply = post(f"{server.url}/v1/chat/completions",
                         {"messages": question, "documents": [], "max_tokens": 1})
    assert status == 200, reply
