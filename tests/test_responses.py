"""The Responses API (/v1/responses): its request as a chat request, its reply whole and as
semantic events, and through the real openai client (``client.responses``)."""

from __future__ import annotations

import json

import pytest

from fairswitch.server.errors import APIError
from fairswitch.server.responses import ResponseShape
from fairswitch.server.responses_request import chat_body

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]}}


def test_a_request_becomes_the_chat_request_that_runs_it():
    chat = chat_body({
        "model": "m", "instructions": "Be brief.", "max_output_tokens": 30, "temperature": 0.5,
        "seed": 3, "store": True, "metadata": {"k": "v"}, "stream": True,
        "input": [
            {"role": "developer", "content": "Use tools."},
            {"type": "message", "role": "user",
             "content": [{"type": "input_text", "text": "Weather in "},
                         {"type": "input_text", "text": "Paris?"}]},
            {"type": "function_call", "call_id": "c1", "name": "get_weather",
             "arguments": '{"city": "Paris"}'},
            {"type": "function_call", "call_id": "c2", "name": "get_weather",
             "arguments": '{"city": "Lyon"}'},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            {"role": "assistant", "content": [{"type": "output_text", "text": "Sunny."}]}],
        "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"},
                            "strict": True}},
        "tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_weather"},
        "parallel_tool_calls": False})
    assert chat == {
        "model": "m", "temperature": 0.5, "seed": 3, "stream": True,
        "parallel_tool_calls": False, "max_tokens": 30,
        "stream_options": {"include_usage": True},
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "system", "content": "Use tools."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [  # (calls made together)
                {"id": "c1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"id": "c2", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Lyon"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            {"role": "assistant", "content": "Sunny."}],
        "response_format": {"type": "json_schema", "json_schema": {
            "name": "w", "schema": {"type": "object"}, "strict": True}},
        "tools": [{"type": "function", "function": {
            "name": "get_weather", "description": "Weather of a city",
            "parameters": WEATHER["parameters"]}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    assert chat_body({"input": "Hi"})["messages"] == [{"role": "user", "content": "Hi"}]
    lax = chat_body({"input": "Hi", "max_output_tokens": 5.0, "top_logprobs": 2.0,
                     "include": ["message.output_text.logprobs"]})  # (pydantic's, vLLM's)
    assert (lax["max_tokens"], lax["top_logprobs"]) == (5, 2)
    assert "response_format" not in chat_body({"input": "Hi", "text": {"format": {
        "type": "text"}}})


@pytest.mark.parametrize("body, fragment, param", [
    ({"input": "x", "previous_response_id": "resp_1"}, "keeps no responses",
     "previous_response_id"),
    ({"input": "x", "conversation": "conv_1"}, "keeps no conversations", "conversation"),
    ({"input": "x", "background": True}, "background responses are not supported",
     "background"),
    ({"input": "x", "truncation": "auto"}, "'truncation' must be \"disabled\"", "truncation"),
    ({"input": "x", "max_tokens": 5}, "chat completions field", "max_tokens"),
    ({"messages": []}, "(use 'input')", "messages"),
    ({"input": []}, "'input' must be a string or a non-empty array", "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]},
     "only text is supported", "input[0].content[0]"),
    ({"input": [{"role": "tool", "content": "x"}]}, "'input[0].role' must be one of",
     "input[0].role"),
    ({"input": [{"type": "item_reference", "id": "x"}]},
     "'input[0].type' string \"item_reference\"", "input[0].type"),
    ({"input": [{"type": "reasoning", "encrypted_content": "gAAA"}]},
     "'input[0].encrypted_content' is not supported", "input[0].encrypted_content"),
    ({"input": [{"type": "reasoning", "content": [{"type": "summary_text", "text": "x"}]}]},
     "'input[0].content' must be an array of", "input[0].content"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
     "'input[0].call_id' must be a non-empty string", "input[0].call_id"),
    ({"input": "x", "max_output_tokens": 0}, "'max_output_tokens' must be an integer >= 1",
     "max_output_tokens"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "only functions are supported",
     "tools[0]"),
    ({"input": "x", "tool_choice": {"type": "web_search"}}, "'tool_choice' must be",
     "tool_choice"),
    ({"input": "x", "text": {"format": {"type": "json_schema"}}}, "'text.format' must be",
     "text.format"),
    # Values of any JSON type where a string is looked up: 400s, not a 500.
    ({"input": [{"role": [], "content": "x"}]}, "'input[0].role' must be one of",
     "input[0].role"),
    ({"input": [{"role": "user", "content": [{"type": {}, "text": "a"}]}]},
     "only text is supported", "input[0].content[0]"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": [{"type": []}]}]},
     "only text is supported", "input[0].output[0]"),
    ({"input": "x", "tool_choice": {"type": "function", "name": 3}}, "'tool_choice' must be",
     "tool_choice"),
    ({"input": "x", "tools": [{"type": "function", "function": {"name": "f"}}]},
     "\"name\": ..., \"parameters\"", "tools[0]"),  # (chat's shape: Responses' is flat)
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{no"}]},
     "'input[0].arguments' must be JSON text", "input[0].arguments"),
    ({"input": "x", "metadata": [1]}, "'metadata' must be an object of strings", "metadata"),
    ({"input": "x", "parallel_tool_calls": "yes"}, "must be a boolean", "parallel_tool_calls"),
    ({"input": "x", "reasoning": {"effort": 3}}, "'reasoning' may say 'effort' and 'summary'",
     "reasoning"),
    ({"input": "x", "include": ["file_search_call.results"]}, "'include' may only list",
     "include"),
    ({"input": "x", "top_logprobs": 21}, "'top_logprobs' must be an integer in [0, 20]",
     "top_logprobs"),
    ({"input": "x", "return_token_ids": True}, "chat completions field", "return_token_ids"),
    ({"input": "x", "return_tokens_as_token_ids": True}, "chat completions field",
     "return_tokens_as_token_ids"),
    ({"input": "x", "documents": [{"text": "d"}]}, "chat completions field", "documents"),
])
def test_what_a_request_cannot_say_is_a_400_naming_its_field(body, fragment, param):
    with pytest.raises(APIError) as e:
        chat_body(body)
    assert e.value.status == 400 and fragment in e.value.message and e.value.param == param


def test_calls_after_an_assistants_text_are_that_turns_and_options_that_say_nothing_pass():
    """A response's output fed back as input (a message, then its function_call) is one
    assistant turn; reasoning without options and stream_options' obfuscation are taken."""
    chat = chat_body({"input": [
        {"role": "user", "content": "Weather?"},
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "Let me check."}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"}],
        "reasoning": {"effort": None}, "stream_options": {"include_obfuscation": False},
        "include": ["message.output_text.logprobs"], "top_logprobs": 2})
    assert chat["messages"][1] == {"role": "assistant", "content": "Let me check.", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]}
    assert len(chat["messages"]) == 3
    assert (chat["logprobs"], chat["top_logprobs"]) == (True, 2)
    assert "reasoning" not in chat and "stream_options" not in chat


def test_a_reasoning_item_is_the_thinking_of_the_assistant_turn_after_it():
    messages = chat_body({"input": [
        {"role": "user", "content": "2+2?"},
        {"type": "reasoning", "id": "rs_1", "summary": [],
         "content": [{"type": "reasoning_text", "text": "Two and two."}]},
        {"role": "assistant", "content": "Four."},
        {"role": "user", "content": "Weather?"},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "Call it."}]},
        {"type": "function_call", "call_id": "c", "name": "w", "arguments": "{}"}]})["messages"]
    assert messages[1] == {"role": "assistant", "content": "Four.", "reasoning": "Two and two."}
    assert messages[3]["reasoning"] == "Call it." and messages[3]["tool_calls"][0]["id"] == "c"


def test_reasoning_effort_reaches_the_template_and_thinking_items_join():
    """reasoning.effort is the template's reasoning_effort (gpt-oss's read it, as vLLM passes
    it); reasoning items in a row are one thinking, and one between a message and its call is
    that turn's."""
    chat = chat_body({"input": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Let me see."},
        {"type": "reasoning", "content": [{"type": "reasoning_text", "text": "A"}]},
        {"type": "reasoning", "content": [{"type": "reasoning_text", "text": "B"}]},
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}],
        "reasoning": {"effort": "low", "summary": "auto"}})
    assert chat["chat_template_kwargs"] == {"reasoning_effort": "low"}
    assert chat["messages"][1]["reasoning"] == "AB" and len(chat["messages"]) == 2


def test_the_answers_logprobs_leave_out_the_thinkings():
    entries = [{"token": t, "logprob": -1.0, "bytes": [], "top_logprobs": []}
               for t in ("<think>", "ab", "</", "think", ">", "Four", ".")]
    whole = ResponseShape({"input": "x"}, "m", thinks=True).whole({"choices": [{
        "message": {"role": "assistant", "content": "Four.", "reasoning": "ab"},
        "finish_reason": "stop", "logprobs": {"content": entries}}], "usage": USAGE})
    assert [lp["token"] for lp in whole["output"][1]["content"][0]["logprobs"]] == ["Four", "."]
    # An empty thinking (no reasoning item) still leaves its tokens out.
    empty = [e for e in entries if e["token"] != "ab"]
    whole = ResponseShape({"input": "x"}, "m", thinks=True).whole({"choices": [{
        "message": {"role": "assistant", "content": "Four."}, "finish_reason": "stop",
        "logprobs": {"content": empty}}], "usage": USAGE})
    assert [lp["token"] for lp in whole["output"][0]["content"][0]["logprobs"]] == ["Four", "."]
    shape = ResponseShape({"input": "x"}, "m", thinks=True)
    events = []
    for delta, lps in (({"reasoning": "ab"}, entries[:2]), ({}, entries[2:4]),
                       ({"content": "Four."}, entries[4:])):
        chunk = _chunk(delta)
        chunk["choices"][0]["logprobs"] = {"content": lps}
        events += shape.chunk(chunk)
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert [lp["token"] for e in deltas for lp in e["logprobs"]] == ["Four", "."]


def _chunk(delta=None, finish=None, usage=None):
    choices = [] if delta is None and finish is None else [
        {"index": 0, "delta": delta or {}, "finish_reason": finish}]
    return {"choices": choices, "usage": usage}


USAGE = {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}


def test_a_streamed_reply_is_the_responses_events_in_order():
    shape = ResponseShape({"input": "x", "tools": [WEATHER]}, "m")
    events = shape.opening()
    for chunk in [_chunk({"role": "assistant", "content": ""}), _chunk({"content": "Let "}),
                  _chunk({"content": "me see."}),
                  _chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                                          "function": {"name": "get_weather",
                                                       "arguments": '{"city": '}}]}),
                  _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
                  _chunk(finish="tool_calls"), _chunk(usage=USAGE)]:
        events += shape.chunk(chunk)
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["id"] == events[0]["response"]["id"]
    message, call = final["output"]
    assert message["content"][0]["text"] == "Let me see." and message["status"] == "completed"
    assert (call["call_id"], call["name"], call["arguments"]) == (
        "call_a", "get_weather", '{"city": "Paris"}')
    assert final["usage"] == {"input_tokens": 7, "input_tokens_details": {"cached_tokens": 0},
                              "output_tokens": 5, "output_tokens_details": {
                                  "reasoning_tokens": 0}, "total_tokens": 12}
    assert final["tools"] == [WEATHER] and final["tool_choice"] == "auto"


def test_calls_end_one_before_the_next_begins_and_a_failure_keeps_the_items_so_far():
    shape = ResponseShape({"input": "x"}, "m")
    events = []
    for call in ("a", "b"):
        events += shape.chunk(_chunk({"tool_calls": [{"index": ord(call) - 97, "id": call,
                                                      "function": {"name": call,
                                                                   "arguments": "{}"}}]}))
    events += shape.chunk(_chunk(finish="tool_calls")) + shape.chunk(_chunk(usage=USAGE))
    assert [(e["type"], e.get("output_index")) for e in events if "output_item" in e["type"]] == [
        ("response.output_item.added", 0), ("response.output_item.done", 0),
        ("response.output_item.added", 1), ("response.output_item.done", 1)]
    shape = ResponseShape({"input": "x"}, "m")
    events = shape.chunk(_chunk({"content": "half"})) + shape.chunk({"error": {
        "message": "boom", "type": "server_error", "param": None, "code": "internal_error"}})
    assert [e["type"] for e in events][-5:] == [
        "error", "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.failed"]
    (item,) = events[-1]["response"]["output"]
    assert item["status"] == "incomplete" and item["content"][0]["text"] == "half"


def test_thinking_streams_as_a_reasoning_item_before_the_message():
    shape = ResponseShape({"input": "x"}, "m")
    events = []
    for chunk in [_chunk({"reasoning": "Two and "}), _chunk({"reasoning": "two."}),
                  _chunk({"content": "Four."}, finish="stop"), _chunk(usage=USAGE)]:
        events += shape.chunk(chunk)
    assert [e["type"] for e in events] == [
        "response.output_item.added", "response.content_part.added",
        "response.reasoning_text.delta", "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed"]
    thought, message = events[-1]["response"]["output"]
    assert thought["type"] == "reasoning" and thought["content"] == [
        {"type": "reasoning_text", "text": "Two and two."}]
    assert message["content"][0]["text"] == "Four."
    whole = ResponseShape({"input": "x"}, "m").whole({"choices": [{
        "message": {"role": "assistant", "content": "Four.", "reasoning": "Two and two."},
        "finish_reason": "stop", "logprobs": None}], "usage": USAGE})
    assert [item["type"] for item in whole["output"]] == ["reasoning", "message"]
    assert whole["output"][0]["content"] == thought["content"]


def test_a_whole_reply_ends_only_its_last_item_incomplete_and_its_text_keeps_its_logprobs():
    """As streamed: a reply cut short leaves the items before the last completed; a message
    before calls has its own tokens' logprobs."""
    entries = [{"token": t, "logprob": -1.0, "bytes": [], "top_logprobs": []}
               for t in ("Let", " me", ".", "<tool_call>", "{...}")]
    whole = ResponseShape({"input": "x"}, "m").whole({"choices": [{
        "message": {"role": "assistant", "content": "Let me.", "reasoning": "hm",
                    "tool_calls": [{"id": "c", "type": "function",
                                    "function": {"name": "f", "arguments": "{}"}}]},
        "finish_reason": "length", "logprobs": {"content": entries}}], "usage": USAGE})
    assert [item["status"] for item in whole["output"]] == ["completed", "completed",
                                                            "incomplete"]
    assert [lp["token"] for lp in whole["output"][1]["content"][0]["logprobs"]] == [
        "Let", " me", "."]


def test_a_reply_cut_short_is_incomplete_and_an_empty_one_a_message():
    shape = ResponseShape({"input": "x"}, "m")
    events = shape.chunk(_chunk({"content": "abc"}, finish="length")) + shape.chunk(
        _chunk(usage=USAGE))
    final = events[-1]
    assert final["type"] == "response.incomplete"
    assert final["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["response"]["output"][0]["status"] == "incomplete"
    empty = ResponseShape({"input": "x"}, "m")
    events = empty.chunk(_chunk(finish="stop")) + empty.chunk(_chunk(usage=USAGE))
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == ""
    failed = ResponseShape({"input": "x"}, "m").chunk({"error": {
        "message": "boom", "type": "server_error", "param": None, "code": None}})
    assert [e["type"] for e in failed] == ["error", "response.failed"]
    assert failed[1]["response"]["error"] == {"code": "server_error", "message": "boom"}
    assert failed[1]["response"]["output"] == []


# ---- through the server, with the openai client ---------------------------------------------


@pytest.fixture(scope="module")
def client(openai_client):
    return openai_client


def test_the_openai_client_creates_and_streams_responses(client):
    ask = dict(model="fairswitch-tiny", input="Hello there", instructions="Be brief.",
               max_output_tokens=100, temperature=0.0)
    whole = client.responses.create(**ask)
    assert whole.object == "response" and whole.status == "completed" and whole.output_text
    assert whole.usage.output_tokens > 0 and whole.usage.total_tokens == (
        whole.usage.input_tokens + whole.usage.output_tokens)
    with client.responses.stream(**ask) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == whole.output_text
    short = client.responses.create(**{**ask, "max_output_tokens": 2})
    assert short.status == "incomplete" and short.incomplete_details.reason == "max_output_tokens"


def test_responses_take_function_tools_and_json_schemas(client):
    pytest.importorskip("xgrammar")
    out = client.responses.create(
        model="fairswitch-tiny", input="Weather in Paris?", tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=60,
        temperature=0.0)
    (call,) = [item for item in out.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id
    if out.status == "completed":
        assert set(json.loads(call.arguments)) == {"city"}
    person = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}},
              "required": ["name"], "additionalProperties": False}
    out = client.responses.create(model="fairswitch-tiny", input="Who?", max_output_tokens=40,
                                  text={"format": {"type": "json_schema", "name": "person",
                                                   "schema": person}})
    assert set(json.loads(out.output_text)) == {"name"}


def test_logprobs_come_with_the_text_whole_and_streamed(client):
    ask = dict(model="fairswitch-tiny", input="Hi", max_output_tokens=8, temperature=0.0,
               include=["message.output_text.logprobs"], top_logprobs=2)
    whole = client.responses.create(**ask).output[0].content[0]
    assert len(whole.logprobs) == 8 and all(len(lp.top_logprobs) == 2 for lp in whole.logprobs)
    assert "".join(lp.token for lp in whole.logprobs) == whole.text
    streamed = [lp for e in client.responses.create(**ask, stream=True)
                if e.type == "response.output_text.delta" for lp in e.logprobs]
    assert [lp.token for lp in streamed] == [lp.token for lp in whole.logprobs]


def test_the_chat_paths_errors_name_the_responses_fields(client):
    """The default model's template does not render tool calls: the 400 names the input item
    (instructions make the chat's messages one more than the items)."""
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="fairswitch-tiny", instructions="Be brief.", input=[
            {"role": "user", "content": "Weather?"},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"}])
    assert e.value.body["param"] == "input[1]" and "'input[1]'" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="fairswitch-tiny", input="x", max_output_tokens=10 ** 6)
    assert e.value.body["param"] == "max_output_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="fairswitch-tiny", input="x",
                                extra_body={"min_tokens": 500})
    assert "max_output_tokens" in e.value.message and "'max_tokens'" not in e.value.message


def test_a_refused_request_is_the_clients_bad_request(client):
    import openai

    with pytest.raises(openai.BadRequestError, match="keeps no responses"):
        client.responses.create(model="fairswitch-tiny", input="x",
                                previous_response_id="resp_1")
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="nope", input="x")
