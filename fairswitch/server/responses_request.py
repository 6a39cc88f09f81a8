"""The Responses API's request (``POST /v1/responses``) as the chat completion request that runs
it (responses.py shapes the reply): its input items become messages (``function_call`` items an
assistant turn's tool calls, ``function_call_output`` items tool messages, ``reasoning`` items
the thinking of the turn after them), ``instructions`` a system message first, ``text.format``
``response_format``, function tools and tool_choice chat's. What it cannot say is a 400 that
names the Responses request's own field, the chat path's errors too (``Translation.renamed``).
"""

from __future__ import annotations

import json
import re
from typing import Any

from fairswitch.server.errors import APIError, bad_request
from fairswitch.server.protocol import describe, integral

# Fields of the Responses request refused unless unset (null, false or empty).
_REFUSED = {
    "previous_response_id": "this server keeps no responses: send the whole input each time",
    "conversation": "this server keeps no conversations: send the whole input each time",
    "prompt": "stored prompts are not supported",
    "background": "background responses are not supported",
    "max_tool_calls": "not supported",
}
_LOGPROBS = "message.output_text.logprobs"  # the one `include` this server gives
# Chat completion fields that a Responses request spells otherwise, or cannot be answered in.
_CHAT_ONLY = {"messages": "input", "max_tokens": "max_output_tokens",
              "max_completion_tokens": "max_output_tokens", "response_format": "text.format",
              "functions": "tools", "function_call": "tool_choice",
              "logprobs": f"include: [\"{_LOGPROBS}\"]", "n": None, "echo": None,
              "prompt_logprobs": None, "return_token_ids": None,
              "return_tokens_as_token_ids": None, "documents": None}
_OWN = {"input", "instructions", "max_output_tokens", "text", "tools", "tool_choice", "store",
        "metadata", "truncation", "include", "top_logprobs", "stream_options", "reasoning",
        *_REFUSED}
_ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}
_TEXT_PARTS = ("input_text", "output_text", "text")


class Translation:
    """A Responses request as a chat request: ``chat``, its body, and where each of its
    messages came from, so that the chat path's errors name the request's own fields."""

    def __init__(self, body: Any) -> None:
        if not isinstance(body, dict):
            raise bad_request(f"the request body must be a JSON object, got {describe(body)}")
        self.origins: list[str] = []  # message j's: "instructions" or "input[i]"
        self.call_origins: dict[int, list[str]] = {}  # message j's tool calls': "input[i]"
        self.chat = _chat_body(body, self)

    def renamed(self, e: APIError) -> APIError:
        """``e`` with the chat request's field names as the Responses request's."""
        def rename(text: str) -> str:
            text = re.sub(r"messages\[(\d+)\]\.tool_calls(?:\[(\d+)\])?(?:\.function)?",
                          lambda m: self._call_origin(int(m[1]), int(m[2] or 0)), text)
            text = re.sub(r"(messages\[\d+\])\.tool_call_id", r"\1.call_id", text)
            text = re.sub(r"messages\[(\d+)\]", lambda m: self._origin(int(m[1])), text)
            text = re.sub(r"tools\[(\d+)\]\.function", r"tools[\1]", text)
            for chat, own in (("max_tokens", "max_output_tokens"), ("response_format",
                                                                    "text.format")):
                text = re.sub(rf"\b{chat}\b", own, text)
            return re.sub(r"'messages'|^messages$", lambda m: m[0].replace("messages", "input"),
                          text)
        return APIError(e.status, rename(e.message), param=e.param and rename(e.param),
                        code=e.code, headers=e.headers)

    def _origin(self, j: int) -> str:
        return self.origins[j] if j < len(self.origins) else f"messages[{j}]"

    def _call_origin(self, j: int, k: int) -> str:
        calls = self.call_origins.get(j, [])
        return calls[k] if k < len(calls) else f"{self._origin(j)}.tool_calls[{k}]"


def chat_body(body: Any) -> dict[str, Any]:
    """The chat completion request that runs a Responses request; 400 for what it cannot say."""
    return Translation(body).chat


def _chat_body(body: dict, where: Translation) -> dict[str, Any]:
    for key, why in _REFUSED.items():
        if body.get(key) not in (None, [], False):
            raise bad_request(f"'{key}' is not supported: {why}", key)
    if body.get("truncation", "disabled") not in ("disabled", None):
        raise bad_request("'truncation' must be \"disabled\": an input longer than the context "
                          "is refused, not cut", "truncation")
    for key, instead in _CHAT_ONLY.items():
        if key in body:
            use = f" (use '{instead}')" if instead else ""
            raise bad_request(f"'{key}' is a chat completions field, not one of the Responses "
                              f"API{use}", key)
    _check_echoed(body)
    chat = {k: v for k, v in body.items() if k not in _OWN}
    chat["messages"] = _messages(body.get("instructions"), body.get("input"), where)
    if body.get("max_output_tokens") is not None:
        value = integral(body["max_output_tokens"])
        if value is None or value < 1:
            raise bad_request(f"'max_output_tokens' must be an integer >= 1, got "
                              f"{describe(body['max_output_tokens'])}", "max_output_tokens")
        chat["max_tokens"] = value
    fmt = _text_format(body.get("text"))
    if fmt is not None:
        chat["response_format"] = fmt
    if body.get("tools") is not None:
        chat["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    chat.update(_logprobs(body))
    effort = (body.get("reasoning") or {}).get("effort")
    if effort is not None:  # (templates that take it read it: gpt-oss's, as vLLM passes it)
        chat["chat_template_kwargs"] = {**(body.get("chat_template_kwargs") or {}),
                                        "reasoning_effort": effort}
    if body.get("stream"):
        chat["stream_options"] = {"include_usage": True}  # (the last event's usage)
    return chat


def _check_echoed(body: dict) -> None:
    """The fields a response echoes, or that change nothing here, checked for their types."""
    metadata = body.get("metadata")
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise bad_request(f"'metadata' must be an object of strings, got {describe(metadata)}",
                          "metadata")
    for key in ("store", "parallel_tool_calls"):
        if body.get(key) is not None and not isinstance(body[key], bool):
            raise bad_request(f"'{key}' must be a boolean, got {describe(body[key])}", key)
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict) and set(options) <= {
            "include_obfuscation"}):
        raise bad_request("'stream_options' may only say 'include_obfuscation' (this server "
                          f"pads no events), got {describe(options)}", "stream_options")
    reasoning = body.get("reasoning")
    if reasoning is not None and not (isinstance(reasoning, dict) and set(reasoning) <= {
            "effort", "summary", "generate_summary"} and all(
            v is None or isinstance(v, str) for v in reasoning.values())):
        raise bad_request("'reasoning' may say 'effort' and 'summary' (strings), got "
                          f"{describe(reasoning)}", "reasoning")


def _logprobs(body: dict) -> dict[str, Any]:
    """Chat's logprob fields for ``include: ["message.output_text.logprobs"]`` (with
    ``top_logprobs`` alternatives)."""
    include = body.get("include") or []
    if not isinstance(include, list) or any(item != _LOGPROBS for item in include):
        raise bad_request(f"'include' may only list \"{_LOGPROBS}\", got {describe(include)}",
                          "include")
    given = body.get("top_logprobs")
    top = integral(given) if given is not None else None
    if given is not None and (top is None or not 0 <= top <= 20):
        raise bad_request(f"'top_logprobs' must be an integer in [0, 20], got {describe(given)}",
                          "top_logprobs")
    if not include:
        return {}
    return {"logprobs": True, "top_logprobs": top or 0}


def _messages(instructions: Any, items: Any, where: Translation) -> list[dict[str, Any]]:
    if instructions is not None and not isinstance(instructions, str):
        raise bad_request(f"'instructions' must be a string, got {describe(instructions)}",
                          "instructions")
    messages = []

    def add(message: dict[str, Any], origin: str) -> None:
        messages.append(message)
        where.origins.append(origin)

    if instructions:
        add({"role": "system", "content": instructions}, "instructions")
    if isinstance(items, str):
        add({"role": "user", "content": items}, "input")
        return messages
    if not isinstance(items, list) or not items:
        raise bad_request(f"'input' must be a string or a non-empty array of items, got "
                          f"{describe(items)}", "input")
    thought: str | None = None  # a reasoning item's, for the assistant turn that follows it
    for i, item in enumerate(items):
        at = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad_request(f"'{at}' must be an object, got {describe(item)}", at)
        kind = item.get("type", "message")
        if kind == "reasoning":  # (several in a row: one thinking)
            thought = (thought or "") + _reasoning_text(item, at)
            continue
        if kind == "message":
            message = _message(item, at)
            if message["role"] == "assistant" and thought is not None:
                message["reasoning"] = thought
            add(message, at)
        elif kind == "function_call":
            arguments = _string(item, "arguments", at, empty=True)
            try:
                json.loads(arguments or "{}")
            except (ValueError, RecursionError):
                raise bad_request(f"'{at}.arguments' must be JSON text, got "
                                  f"{describe(arguments)}", f"{at}.arguments") from None
            call = {"id": _string(item, "call_id", at), "type": "function", "function": {
                "name": _string(item, "name", at), "arguments": arguments}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":  # (one turn: text, calls)
                last.setdefault("tool_calls", []).append(call)
                if thought:  # (its thinking between the text and the call: the turn's too)
                    last["reasoning"] = last.get("reasoning", "") + thought
                where.call_origins.setdefault(len(messages) - 1, []).append(at)
            else:
                add({"role": "assistant", "content": None, "tool_calls": [call],
                     **({"reasoning": thought} if thought is not None else {})}, at)
                where.call_origins[len(messages) - 1] = [at]
        elif kind == "function_call_output":
            output = item.get("output")
            if isinstance(output, list):
                output = "".join(_part_text(p, f"{at}.output", j) for j, p in enumerate(output))
            if not isinstance(output, str):
                raise bad_request(f"'{at}.output' must be a string, got {describe(output)}",
                                  f"{at}.output")
            add({"role": "tool", "tool_call_id": _string(item, "call_id", at),
                 "content": output}, at)
        else:
            raise bad_request(f"'{at}.type' {describe(kind)} is not supported: input items "
                              "are messages, reasoning, function_call and "
                              "function_call_output", f"{at}.type")
        thought = None
    return messages


def _reasoning_text(item: dict, where: str) -> str:
    """A reasoning item's text (its content, else its summary), for the chat template."""
    if item.get("encrypted_content") is not None:
        raise bad_request(f"'{where}.encrypted_content' is not supported: this server makes no "
                          "encrypted reasoning and reads none", f"{where}.encrypted_content")
    for key, kind in (("content", "reasoning_text"), ("summary", "summary_text")):
        parts = item.get(key)
        if parts is None or parts == []:
            continue
        if not isinstance(parts, list) or not all(
                isinstance(p, dict) and p.get("type") == kind and isinstance(p.get("text"), str)
                for p in parts):
            raise bad_request(f"'{where}.{key}' must be an array of {{\"type\": \"{kind}\", "
                              f"\"text\": ...}}, got {describe(parts)}", f"{where}.{key}")
        return "".join(p["text"] for p in parts)
    return ""


def _message(item: dict, where: str) -> dict[str, Any]:
    role = item.get("role")
    if not isinstance(role, str) or role not in _ROLES:
        raise bad_request(f"'{where}.role' must be one of {', '.join(_ROLES)}, got "
                          f"{describe(role)}", f"{where}.role")
    content = item.get("content")
    if isinstance(content, list):
        content = "".join(_part_text(p, f"{where}.content", j) for j, p in enumerate(content))
    if not isinstance(content, str):
        raise bad_request(f"'{where}.content' must be a string or an array of text parts, got "
                          f"{describe(content)}", f"{where}.content")
    return {"role": _ROLES[role], "content": content}


def _part_text(part: Any, where: str, j: int) -> str:
    kind = part.get("type") if isinstance(part, dict) else None
    if isinstance(kind, str) and kind in _TEXT_PARTS and isinstance(part.get("text"), str):
        return part["text"]
    raise bad_request(f"'{where}[{j}]' must be a text part ({{\"type\": \"input_text\", "
                      f"\"text\": ...}}): only text is supported, got {describe(kind or part)}",
                      f"{where}[{j}]")


def _string(item: dict, key: str, where: str, empty: bool = False) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not (value or empty):
        raise bad_request(f"'{where}.{key}' must be a {'' if empty else 'non-empty '}string, "
                          f"got {describe(value)}", f"{where}.{key}")
    return value


def _text_format(text: Any) -> dict[str, Any] | None:
    if text is None:
        return None
    fmt = text.get("format") if isinstance(text, dict) else None
    if fmt is None and isinstance(text, dict):
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema" and isinstance(fmt.get("schema"), dict):
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": schema}
    raise bad_request("'text.format' must be {\"type\": \"text\"}, {\"type\": \"json_object\"} "
                      "or {\"type\": \"json_schema\", \"name\": ..., \"schema\": {...}}, got "
                      f"{describe(fmt if isinstance(text, dict) else text)}", "text.format")


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise bad_request(f"'tools' must be an array, got {describe(tools)}", "tools")
    out = []
    for i, tool in enumerate(tools):
        if (not isinstance(tool, dict) or tool.get("type") != "function"
                or not isinstance(tool.get("name"), str) or not tool["name"]):
            raise bad_request(f"'tools[{i}]' must be a function tool ({{\"type\": \"function\", "
                              f"\"name\": ..., \"parameters\": {{...}}}}): only functions are "
                              f"supported, got {describe(tool)}", f"tools[{i}]")
        out.append({"type": "function", "function": {
            k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}})
    return out


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, str) and choice in ("none", "auto", "required"):
        return choice
    if (isinstance(choice, dict) and choice.get("type") == "function"
            and isinstance(choice.get("name"), str)):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise bad_request("'tool_choice' must be \"none\", \"auto\", \"required\" or {\"type\": "
                      f"\"function\", \"name\": ...}}, got {describe(choice)}", "tool_choice")
