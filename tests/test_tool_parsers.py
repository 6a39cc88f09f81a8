"""tool_choice "auto": the model's own tool-call syntax read by a parser (tool_parsers.py), whole
and streamed, and through the server with the openai client (the reply's text held by
structured output to what a model trained on the syntax writes)."""

from __future__ import annotations

import json
import random

import pytest

from helpers import literal_regex, openai_servers

from fairswitch.server.tool_parsers import PARSERS, AutoToolCalls

WEATHER_CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'

DEEP = '{"name": "f", "parameters": ' + "[" * 3000 + "]" * 3000 + "}"


def _deep_call() -> list[tuple[str, str]]:
    try:
        return [("f", json.dumps(json.loads(DEEP)["parameters"]))]
    except RecursionError:
        return []


DEEP_CALL = _deep_call()

# (parser, reply, content, [(name, arguments)])
REPLIES = [
    ("hermes", f"I will check.\n<tool_call>\n{WEATHER_CALL}\n</tool_call>\n<tool_call>\n"
               '{"name": "t", "arguments": {}}\n</tool_call>',
     "I will check.\n", [("get_weather", '{"city": "Paris"}'), ("t", "{}")]),
    ("hermes", "Just text, < and <tool, no call", "Just text, < and <tool, no call", []),
    ("hermes", f"<tool_call>{WEATHER_CALL}</tool_call>\nAfter.", "\nAfter.",
     [("get_weather", '{"city": "Paris"}')]),
    ("hermes", f"<tool_call>{WEATHER_CALL}</tool_call>  \n ", None,
     [("get_weather", '{"city": "Paris"}')]),  # (whitespace after the calls is not content)
    ("hermes", '<tool_call>{"name": "x", "arguments": {"a": 1', '<tool_call>{"name": "x", '
     '"arguments": {"a": 1', []),  # cut short: the text
    ("hermes", "<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>", []),
    ("hermes", '<tool_call>{"name": "x", "arguments": "{\\"a\\": 1}"}</tool_call>', None,
     [("x", '{"a": 1}')]),  # arguments written as a JSON string
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "P}a\\"ris"}}; '
                    '{"name": "b", "parameters": {}}', None,
     [("get_weather", '{"city": "P}a\\"ris"}'), ("b", "{}")]),
    ("llama3_json", '<|python_tag|>{"name": "a", "parameters": {"x": [1, "é"]}}', None,
     [("a", '{"x": [1, "é"]}')]),
    ("llama3_json", 'Hello {"name": "a"}', 'Hello {"name": "a"}', []),
    ("llama3_json", '  {"name": "a", "parameters": {"x": ', '  {"name": "a", "parameters": '
     '{"x": ', []),
    ("llama3_json", ' <|python_tag|> {"nom": 1} rest', ' <|python_tag|> {"nom": 1} rest', []),
    ("llama3_json", '{"name": "a", "parameters": {}}; {"name": "b", "parameters": {',
     '{"name": "b", "parameters": {', [("a", "{}")]),
    ("llama3_json", "<|python", "<|python", []),
    # A JSON answer with a "name" field is the answer, not a call (no arguments).
    ("llama3_json", '{"name": "Alice", "age": 31}', '{"name": "Alice", "age": 31}', []),
    ("hermes", '<tool_call>{"name": "Alice"}</tool_call>', '<tool_call>{"name": "Alice"}'
     '</tool_call>', []),
    # Arguments as a string: kept if it is a JSON object, else written as a JSON string.
    ("hermes", '<tool_call>{"name": "f", "arguments": "city=Paris"}</tool_call>', None,
     [("f", '"city=Paris"')]),
    # Whitespace after a call is content once text has come after it (whole and streamed).
    ("hermes", f"Sure.\n<tool_call>{WEATHER_CALL}</tool_call>\nDone. \n", "Sure.\n\nDone. \n",
     [("get_weather", '{"city": "Paris"}')]),
    ("hermes", f"<tool_call>{WEATHER_CALL}</tool_call> a <tool_call>{WEATHER_CALL}</tool_call>",
     " a ", [("get_weather", '{"city": "Paris"}')] * 2),
    # Nested past the JSON decoder's recursion limit: text, not a crash.
    ("hermes", "<tool_call>" + "[" * 1200 + "</tool_call>", "<tool_call>" + "[" * 1200
     + "</tool_call>", []),
    # (Python 3.12's decoder reads it, 3.11's does not: a call, or text; never a crash)
    ("llama3_json", DEEP, None if DEEP_CALL else DEEP, DEEP_CALL),
    # Mistral's: a JSON list after [TOOL_CALLS] (before v11), or name[ARGS]{...} each.
    ("mistral", 'Sure. [TOOL_CALLS] [{"name": "w", "arguments": {"c": "P]a"}}, '
                '{"name": "t", "arguments": {}}]', "Sure. ",
     [("w", '{"c": "P]a"}'), ("t", "{}")]),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "[TOOL_CALLS]"}[TOOL_CALLS]now[ARGS]{}\n',
     None, [("get_weather", '{"city": "[TOOL_CALLS]"}'), ("now", "{}")]),
    ("mistral", '[TOOL_CALLS]f[ARGS]{"a": 1}\n\nThen text.', "\n\nThen text.",
     [("f", '{"a": 1}')]),
    ("mistral", "just text [TOOL", "just text [TOOL", []),
    ("mistral", "[TOOL_CALLS]not a call at all", "[TOOL_CALLS]not a call at all", []),
    ("mistral", '[TOOL_CALLS]f[ARGS]{"a": 1', '[TOOL_CALLS]f[ARGS]{"a": 1', []),  # cut short
    ("mistral", '[TOOL_CALLS] [{"name": "Alice"}]', '[TOOL_CALLS] [{"name": "Alice"}]', []),
    ("mistral", '[TOOL_CALLS]\n f[ARGS]{}', None, [("f", "{}")]),
    ("mistral", '[TOOL_CALLS][TOOL_CALLS]f[ARGS]{"x": [1]}', "[TOOL_CALLS]", [("f", '{"x": [1]}')]),
    # Llama 3.2/4's Python list of calls, keyword arguments of literal values.
    ("pythonic", '[get_weather(city="P]a\'ris", days=3), now()]', None,
     [("get_weather", '{"city": "P]a\'ris", "days": 3}'), ("now", "{}")]),
    ("pythonic", ' <|python_start|>[f(x=[1, (2, 3)], y={"a": None, "b": True})]<|python_end|>\n',
     None, [("f", '{"x": [1, [2, 3]], "y": {"a": null, "b": true}}')]),
    ("pythonic", "[f(x='é')] Then text.", " Then text.", [("f", '{"x": "é"}')]),
    ("pythonic", "[mod.f(x=1)]", "[mod.f(x=1)]", []),  # (a plain name only, as vLLM's)
    ("pythonic", "[a" + ".a" * 600 + "()]", "[a" + ".a" * 600 + "()]", []),  # (was a 500)
    ("pythonic", "[f(x=1e999)]", "[f(x=1e999)]", []),  # (Infinity: no JSON)
    ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {"a": NaN}}]',
     '[TOOL_CALLS][{"name": "f", "arguments": {"a": NaN}}]', []),
    ("pythonic", "Hello [f(x=1)]", "Hello [f(x=1)]", []),
    ("pythonic", "[1, 2]", "[1, 2]", []),  # (a list that is no calls: the answer)
    ("pythonic", "[f(1)]", "[f(1)]", []),  # (positional arguments: no call)
    ("pythonic", '[f(x=os.system("ls"))]', '[f(x=os.system("ls"))]', []),  # (not a literal)
    ("pythonic", "[f(x={1, 2})]", "[f(x={1, 2})]", []),  # (a set: no JSON)
    ("pythonic", "  [f(x=1), g(y='", "  [f(x=1), g(y='", []),  # (cut short: the text)
    ("pythonic", "<|python", "<|python", []),
]


def _streamed(parser: str, pieces: list[str], parallel: bool = True):
    calls, content, deltas = AutoToolCalls(parser, parallel), "", []
    for i, piece in enumerate(pieces):
        text, new = calls.delta(3, piece, final=i == len(pieces) - 1)
        content += text
        deltas += new
    return content, deltas, calls.called(3)


@pytest.mark.parametrize("parser, reply, content, want", REPLIES)
def test_a_reply_reads_the_same_whole_and_however_it_is_streamed(parser, reply, content, want):
    got_content, calls = AutoToolCalls(parser).whole(reply)
    assert got_content == (content if want else reply)
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls or []] == want
    assert all(c["type"] == "function" and c["id"].startswith("chatcmpl-tool-")
               for c in calls or [])
    rng = random.Random(0)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(reply)), rng.randint(0, min(8, len(reply) - 1))))
        pieces = [reply[a:b] for a, b in zip([0, *cuts], [*cuts, len(reply)])]
        text, deltas, called = _streamed(parser, pieces)
        assert (text or None) == (got_content or None), pieces
        # A call is one delta: its index, id, type, name and whole arguments.
        assert [(d["index"], d["function"]["name"], d["function"]["arguments"])
                for d in deltas] == [(i, *c) for i, c in enumerate(want)], pieces
        assert called == bool(want)


def test_a_lone_surrogate_escape_in_the_arguments_stays_escaped():
    """``\\ud83d`` alone decodes to a lone surrogate, which no UTF-8 response can carry."""
    reply = '<tool_call>{"name": "f", "arguments": {"city": "\\ud83d Paris"}}</tool_call>'
    (call,) = AutoToolCalls("hermes").whole(reply)[1]
    arguments = call["function"]["arguments"]
    arguments.encode()  # (UTF-8 text)
    assert json.loads(arguments) == {"city": "\ud83d Paris"}


def test_a_long_call_streamed_is_read_once():
    """Each piece of a llama3_json call is scanned once (the scan's place is kept between
    pieces), not the whole held text again for every piece."""
    from fairswitch.server.tool_parsers import _Llama3Json

    reply = '{"name": "write", "parameters": {"text": "' + "ab{}[]\\\"" * 3000 + '"}}'
    reader = _Llama3Json()
    pieces = [reply[i:i + 4] for i in range(0, len(reply), 4)]
    for piece in pieces[:-1]:
        assert reader.feed(piece, final=False) == ("", [])
        assert reader.scan.at == len(reader.buffer)
    _, calls = reader.feed(pieces[-1], final=True)
    assert [name for name, _ in calls] == ["write"]


def test_parallel_tool_calls_false_keeps_the_first_call():
    reply = REPLIES[0][1]
    assert [c["function"]["name"] for c in AutoToolCalls("hermes", False).whole(reply)[1]] == [
        "get_weather"]
    _, deltas, _ = _streamed("hermes", list(reply), parallel=False)
    assert [d["function"]["name"] for d in deltas] == ["get_weather"]


def test_an_unknown_parser_is_refused():
    from fairswitch.server import ServerSettings

    with pytest.raises(ValueError, match="unknown tool call parser 'nope'"):
        AutoToolCalls("nope")
    with pytest.raises(ValueError, match="tool_call_parser must be one of hermes, llama3_json, "
                                         "mistral, pythonic"):
        ServerSettings(tool_call_parser="nope")
    assert PARSERS == ("hermes", "llama3_json", "mistral", "pythonic")


def test_the_cli_takes_vllms_flags_and_needs_the_parser_with_auto(capsys):
    from fairswitch.cli.main import main

    with pytest.raises(SystemExit):
        main(["serve", "--tool-call-parser", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    assert main(["serve", "--enable-auto-tool-choice"]) == 2  # (before loading anything)
    assert "--enable-auto-tool-choice needs --tool-call-parser" in capsys.readouterr().err


# ---- through the server ------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def clients():
    """openai clients on servers over the default model with each parser."""
    pytest.importorskip("xgrammar")
    from fairswitch.server import ServerSettings

    with openai_servers({name: ServerSettings(tool_call_parser=name)
                         for name in ("hermes", "llama3_json", "mistral", "pythonic")}) as out:
        yield out


def _chat(client, reply_regex: str, stream: bool = False, **extra):
    """A chat with tools and no tool_choice (OpenAI's default: auto), the model's reply held to
    ``reply_regex``."""
    return client.chat.completions.create(
        model="fairswitch-tiny", messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER], max_tokens=80, temperature=0.0, stream=stream,
        extra_body={"structured_outputs": {"regex": reply_regex}, **extra})


@pytest.mark.parametrize("parser, reply", [
    ("hermes", f"Let me see.\n<tool_call>\n{WEATHER_CALL}\n</tool_call>"),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}}'),
    ("mistral", 'Let me see.\n[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}'),
    ("pythonic", '[get_weather(city="Paris")]'),
])
def test_auto_reads_the_models_calls_whole_and_streamed(clients, parser, reply):
    client = clients[parser]
    choice = _chat(client, literal_regex(reply)).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == ("Let me see.\n" if parser in ("hermes", "mistral")
                                      else None)
    (call,) = choice.message.tool_calls
    assert call.id and call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    content, calls, finish = "", [], None
    for chunk in _chat(client, literal_regex(reply), stream=True):
        if chunk.choices:
            delta = chunk.choices[0].delta
            content += delta.content or ""
            calls += delta.tool_calls or []
            finish = chunk.choices[0].finish_reason or finish
    assert (content or None, finish) == (choice.message.content, "tool_calls")
    assert [(c.index, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        (0, "get_weather", {"city": "Paris"})]


def test_auto_with_a_reply_that_calls_nothing_is_text(clients):
    for client in clients.values():
        choice = _chat(client, "Sunny, 21 degrees\\.").choices[0]
        assert (choice.message.content, choice.finish_reason) == ("Sunny, 21 degrees.", "stop")
        assert not choice.message.tool_calls
        chunks = [c.choices[0] for c in _chat(client, "Sunny\\.", stream=True) if c.choices]
        assert "".join(c.delta.content or "" for c in chunks) == "Sunny."
        assert not any(c.delta.tool_calls for c in chunks)
        assert chunks[-1].finish_reason == "stop"


def test_a_call_cut_short_by_max_tokens_is_given_as_text(clients):
    reply = f"<tool_call>\n{WEATHER_CALL}\n</tool_call>"
    out = clients["hermes"].chat.completions.create(
        model="fairswitch-tiny", messages=[{"role": "user", "content": "Weather?"}],
        tools=[WEATHER], tool_choice="auto", max_tokens=6, temperature=0.0,
        extra_body={"structured_outputs": {"regex": literal_regex(reply)}}).choices[0]
    assert out.finish_reason == "length" and not out.message.tool_calls
    assert reply.startswith(out.message.content) and out.message.content


def test_hermes_auto_keeps_special_tokens_in_the_text_unless_asked():
    """vLLM's hermes parser reads <tool_call> that some tokenizers mark special: such requests
    do not skip special tokens unless they say so."""
    from fairswitch.server.protocol import parse_chat

    body = {"messages": [{"role": "user", "content": "Hi"}], "tools": [WEATHER]}
    assert parse_chat(body, "hermes").skip_special_tokens is False
    assert parse_chat(body, "mistral").skip_special_tokens is False  # ([TOOL_CALLS] is special)
    assert parse_chat({**body, "skip_special_tokens": True}, "hermes").skip_special_tokens
    assert parse_chat(body, "llama3_json").skip_special_tokens
    assert parse_chat({**body, "tool_choice": "none"}, "hermes").skip_special_tokens


def test_tools_with_a_null_tool_choice_are_refused_as_openais_default():
    from fairswitch.server.errors import APIError
    from fairswitch.server.protocol import parse_chat

    with pytest.raises(APIError, match="'tools' without 'tool_choice'"):
        parse_chat({"messages": [{"role": "user", "content": "Hi"}], "tools": [WEATHER],
                    "tool_choice": None})
