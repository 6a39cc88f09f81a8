"""OpenAI's Responses API (``POST /v1/responses``) over the chat path: a request is translated
into a chat completion request (``chat_body``: its input items into messages, ``instructions``
into a system message first, ``text.format`` into ``response_format``, function tools and
tool_choice into chat's), runs as one, and its reply is reshaped (``ResponseShape``): a whole
Response object, or the stream's semantic events (``response.created``, ...,
``response.output_text.delta``, ..., ``response.completed``).

Stateless, as vLLM without a store: nothing is kept after a response, so ``previous_response_id``
and ``conversation`` are refused (send the whole input each time); ``store`` is accepted and the
response says ``"store": false``. Only text goes in and out, and function tools (a reply's calls
are ``function_call`` items; ``function_call_output`` items carry results back in).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

from fairswitch.server.errors import APIError, bad_request
from fairswitch.server.protocol import _describe, _integral

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
              "prompt_logprobs": None, "return_token_ids": None}
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
            raise bad_request(f"the request body must be a JSON object, got {_describe(body)}")
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
        value = _integral(body["max_output_tokens"])
        if value is None or value < 1:
            raise bad_request(f"'max_output_tokens' must be an integer >= 1, got "
                              f"{_describe(body['max_output_tokens'])}", "max_output_tokens")
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
        raise bad_request(f"'metadata' must be an object of strings, got {_describe(metadata)}",
                          "metadata")
    for key in ("store", "parallel_tool_calls"):
        if body.get(key) is not None and not isinstance(body[key], bool):
            raise bad_request(f"'{key}' must be a boolean, got {_describe(body[key])}", key)
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict) and set(options) <= {
            "include_obfuscation"}):
        raise bad_request("'stream_options' may only say 'include_obfuscation' (this server "
                          f"pads no events), got {_describe(options)}", "stream_options")
    reasoning = body.get("reasoning")
    if reasoning is not None and not (isinstance(reasoning, dict) and set(reasoning) <= {
            "effort", "summary", "generate_summary"} and all(
            v is None or isinstance(v, str) for v in reasoning.values())):
        raise bad_request("'reasoning' may say 'effort' and 'summary' (strings), got "
                          f"{_describe(reasoning)}", "reasoning")


def _logprobs(body: dict) -> dict[str, Any]:
    """Chat's logprob fields for ``include: ["message.output_text.logprobs"]`` (with
    ``top_logprobs`` alternatives)."""
    include = body.get("include") or []
    if not isinstance(include, list) or any(item != _LOGPROBS for item in include):
        raise bad_request(f"'include' may only list \"{_LOGPROBS}\", got {_describe(include)}",
                          "include")
    top = body.get("top_logprobs")
    if top is not None and (_integral(top) is None or not 0 <= _integral(top) <= 20):
        raise bad_request(f"'top_logprobs' must be an integer in [0, 20], got {_describe(top)}",
                          "top_logprobs")
    top = _integral(top) if top is not None else None
    if not include:
        return {}
    return {"logprobs": True, "top_logprobs": top or 0}


def _messages(instructions: Any, items: Any, where: Translation) -> list[dict[str, Any]]:
    if instructions is not None and not isinstance(instructions, str):
        raise bad_request(f"'instructions' must be a string, got {_describe(instructions)}",
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
                          f"{_describe(items)}", "input")
    thought: str | None = None  # a reasoning item's, for the assistant turn that follows it
    for i, item in enumerate(items):
        at = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad_request(f"'{at}' must be an object, got {_describe(item)}", at)
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
                                  f"{_describe(arguments)}", f"{at}.arguments") from None
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
                raise bad_request(f"'{at}.output' must be a string, got {_describe(output)}",
                                  f"{at}.output")
            add({"role": "tool", "tool_call_id": _string(item, "call_id", at),
                 "content": output}, at)
        else:
            raise bad_request(f"'{at}.type' {_describe(kind)} is not supported: input items "
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
                              f"\"text\": ...}}, got {_describe(parts)}", f"{where}.{key}")
        return "".join(p["text"] for p in parts)
    return ""


def _message(item: dict, where: str) -> dict[str, Any]:
    role = item.get("role")
    if not isinstance(role, str) or role not in _ROLES:
        raise bad_request(f"'{where}.role' must be one of {', '.join(_ROLES)}, got "
                          f"{_describe(role)}", f"{where}.role")
    content = item.get("content")
    if isinstance(content, list):
        content = "".join(_part_text(p, f"{where}.content", j) for j, p in enumerate(content))
    if not isinstance(content, str):
        raise bad_request(f"'{where}.content' must be a string or an array of text parts, got "
                          f"{_describe(content)}", f"{where}.content")
    return {"role": _ROLES[role], "content": content}


def _part_text(part: Any, where: str, j: int) -> str:
    kind = part.get("type") if isinstance(part, dict) else None
    if isinstance(kind, str) and kind in _TEXT_PARTS and isinstance(part.get("text"), str):
        return part["text"]
    raise bad_request(f"'{where}[{j}]' must be a text part ({{\"type\": \"input_text\", "
                      f"\"text\": ...}}): only text is supported, got {_describe(kind or part)}",
                      f"{where}[{j}]")


def _string(item: dict, key: str, where: str, empty: bool = False) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not (value or empty):
        raise bad_request(f"'{where}.{key}' must be a {'' if empty else 'non-empty '}string, "
                          f"got {_describe(value)}", f"{where}.{key}")
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
                      f"{_describe(fmt if isinstance(text, dict) else text)}", "text.format")


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise bad_request(f"'tools' must be an array, got {_describe(tools)}", "tools")
    out = []
    for i, tool in enumerate(tools):
        if (not isinstance(tool, dict) or tool.get("type") != "function"
                or not isinstance(tool.get("name"), str) or not tool["name"]):
            raise bad_request(f"'tools[{i}]' must be a function tool ({{\"type\": \"function\", "
                              f"\"name\": ..., \"parameters\": {{...}}}}): only functions are "
                              f"supported, got {_describe(tool)}", f"tools[{i}]")
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
                      f"\"function\", \"name\": ...}}, got {_describe(choice)}", "tool_choice")


def _new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


class ResponseShape:
    """One response: the chat reply's body, whole or chunk by chunk, as the Responses API's.
    A reply's thinking (with a reasoning parser) is a ``reasoning`` item, its text a message
    item and each call a ``function_call`` item, in that order, each ended before the next
    begins. Text after a call (seldom written) is a message after it when streamed, unless it
    comes in the call's chunk; a whole reply has one message before its calls (the chat reply
    holds no order)."""

    def __init__(self, body: dict[str, Any], model: str) -> None:
        self.id = _new_id("resp_")
        self.created_at = int(time.time())
        # What the response object echoes of its request.
        self.echo = {
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"), "model": model,
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "temperature": body.get("temperature"), "top_p": body.get("top_p"),
            "top_logprobs": body.get("top_logprobs"),
            "tool_choice": body.get("tool_choice") or "auto", "tools": body.get("tools") or [],
            "text": body.get("text") or {"format": {"type": "text"}},
            "truncation": "disabled", "metadata": body.get("metadata") or {},
            "user": body.get("user"), "store": False, "previous_response_id": None,
            "reasoning": None}
        self.sequence = 0
        self.items: list[dict[str, Any]] = []  # the stream's output items, in order
        self.open: dict[str, Any] | None = None  # the item being streamed
        self.calls: dict[int, dict[str, Any]] = {}  # a chat tool call's index -> its item
        self.logprobs: list[dict[str, Any]] = []  # of tokens whose text has not come yet
        self.finish: str | None = None

    def response(self, status: str, output: list[dict[str, Any]],
                 usage: dict[str, Any] | None = None, error: dict | None = None
                 ) -> dict[str, Any]:
        body = {"id": self.id, "object": "response", "created_at": self.created_at,
                "status": status, "error": error, "incomplete_details": (
                    {"reason": "max_output_tokens"} if status == "incomplete" else None),
                "output": output, "usage": _usage(usage) if usage else None, **self.echo}
        if status in ("completed", "incomplete"):
            body["completed_at"] = int(time.time())
        return body

    def whole(self, chat: dict[str, Any]) -> dict[str, Any]:
        """The Response of a whole chat completion body."""
        choice = chat["choices"][0]
        message, status = choice["message"], _status(choice["finish_reason"])
        calls = message.get("tool_calls") or []
        output = []
        thought = message.get("reasoning")
        if thought:
            output.append(_reasoning_item(_new_id("rs_"), thought, status))
        if message.get("content") or not (calls or thought):
            logprobs = [] if calls else (choice.get("logprobs") or {}).get("content") or []
            output.append(_message_item(_new_id("msg_"), message.get("content") or "", status,
                                        _after_think(logprobs) if thought else logprobs))
        for call in calls:
            output.append(_call_item(call["id"], call["function"]["name"],
                                     call["function"]["arguments"], status))
        return self.response(status, output, chat.get("usage"))

    # ---- streamed -----------------------------------------------------------------------------

    def opening(self) -> list[dict[str, Any]]:
        return [self._event("response.created", response=self.response("in_progress", [])),
                self._event("response.in_progress", response=self.response("in_progress", []))]

    def chunk(self, chat: dict[str, Any]) -> list[dict[str, Any]]:
        """The events of one chat chunk (its last, the usage chunk, ends the response)."""
        if "error" in chat:
            return self.failed(chat["error"])
        events: list[dict[str, Any]] = []
        for choice in chat.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("reasoning"):  # (before the answer)
                events += self._piece("reasoning", delta["reasoning"])
                self.logprobs = []  # (the thinking's tokens: no text of the answer's)
            self.logprobs += (choice.get("logprobs") or {}).get("content") or []
            # A chunk's text before its calls: a whole reply's message comes first too.
            if delta.get("content"):
                events += self._piece("message", delta["content"])
            for call in delta.get("tool_calls") or []:
                events += self._call_delta(call)
            self.finish = choice.get("finish_reason") or self.finish
        if chat.get("usage") and not chat.get("choices"):
            status = _status(self.finish)
            events += self._end_open(status)
            if not self.items:  # nothing was said: an empty message, as a whole response's
                events += self._begin("message") + self._end_open(status)
            kind = "response.completed" if status == "completed" else "response.incomplete"
            events.append(self._event(kind, response=self.response(
                status, self._output(), chat["usage"])))
        return events

    def failed(self, error: dict[str, Any]) -> list[dict[str, Any]]:
        """A stream that fails after it began: the error, the item being streamed ended as
        incomplete, then the failed response with the items so far."""
        code = error.get("code") or error.get("type")
        message = error.get("message", "")
        return [self._event("error", code=code, message=message, param=error.get("param")),
                *self._end_open("incomplete"),
                self._event("response.failed", response=self.response(
                    "failed", self._output(), error={"code": code, "message": message}))]

    def _output(self) -> list[dict[str, Any]]:
        return [item["done"] for item in self.items]

    def _piece(self, kind: str, text: str) -> list[dict[str, Any]]:
        """A piece of the thinking ("reasoning") or of the text ("message")."""
        events = [] if self.open is not None and self.open["kind"] == kind else (
            self._end_open("completed") + self._begin(kind))
        item = self.open
        item["text"] += text
        at = {"item_id": item["id"], "output_index": item["index"], "content_index": 0}
        if kind == "reasoning":
            return events + [self._event("response.reasoning_text.delta", **at, delta=text)]
        logprobs, self.logprobs = self.logprobs, []
        if not item["logprobs"] and any(i["kind"] == "reasoning" for i in self.items):
            logprobs = _after_think(logprobs)  # (the answer's first: past the closing tag)
        item["logprobs"] += logprobs
        return events + [self._event("response.output_text.delta", **at, delta=text,
                                     logprobs=logprobs)]

    def _begin(self, kind: str) -> list[dict[str, Any]]:
        """A new reasoning or message item, open."""
        item = {"kind": kind, "id": _new_id("rs_" if kind == "reasoning" else "msg_"),
                "index": len(self.items), "text": "", "logprobs": []}
        self.items.append(item)
        self.open = item
        shown = (_reasoning_item(item["id"], None, "in_progress") if kind == "reasoning" else
                 _message_item(item["id"], None, "in_progress"))
        return [self._event("response.output_item.added", output_index=item["index"],
                            item=shown),
                self._event("response.content_part.added", item_id=item["id"],
                            output_index=item["index"], content_index=0,
                            part=_part(kind, "", []))]

    def _call_delta(self, call: dict[str, Any]) -> list[dict[str, Any]]:
        events = []
        fn = call.get("function") or {}
        if "id" in call:  # a new call: the item before it is done
            self.logprobs = []  # (the tokens of the calls: no text of theirs to go with)
            events += self._end_open("completed")
            item = {"kind": "call", "id": _new_id("fc_"), "index": len(self.items),
                    "call_id": call["id"], "name": fn.get("name", ""), "arguments": ""}
            self.items.append(item)
            self.calls[call["index"]] = self.open = item
            events.append(self._event("response.output_item.added", output_index=item["index"],
                                      item=_call_item(item["call_id"], item["name"], "",
                                                      "in_progress", item["id"])))
        item = self.calls[call["index"]]
        if fn.get("arguments"):
            item["arguments"] += fn["arguments"]
            events.append(self._event("response.function_call_arguments.delta",
                                      item_id=item["id"], output_index=item["index"],
                                      delta=fn["arguments"]))
        return events

    def _end_open(self, status: str) -> list[dict[str, Any]]:
        """The end of the item being streamed (none: nothing)."""
        item, self.open = self.open, None
        if item is None:
            return []
        at = {"output_index": item["index"]}
        if item["kind"] == "call":
            item["done"] = _call_item(item["call_id"], item["name"], item["arguments"], status,
                                      item["id"])
            return [self._event("response.function_call_arguments.done", item_id=item["id"],
                                **at, name=item["name"], arguments=item["arguments"]),
                    self._event("response.output_item.done", **at, item=item["done"])]
        part_at = {"item_id": item["id"], **at, "content_index": 0}
        if item["kind"] == "reasoning":
            item["done"] = _reasoning_item(item["id"], item["text"], status)
            text_done = self._event("response.reasoning_text.done", **part_at, text=item["text"])
        else:
            item["logprobs"] += self.logprobs
            self.logprobs = []
            item["done"] = _message_item(item["id"], item["text"], status, item["logprobs"])
            text_done = self._event("response.output_text.done", **part_at, text=item["text"],
                                    logprobs=item["logprobs"])
        return [text_done,
                self._event("response.content_part.done", **part_at,
                            part=_part(item["kind"], item["text"], item["logprobs"])),
                self._event("response.output_item.done", **at, item=item["done"])]

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event


def _after_think(logprobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The entries of the tokens after the one that completes ``</think>`` (all of them if
    none does): the answer's, of a reply that thought first."""
    text = ""
    for i, entry in enumerate(logprobs):
        text += entry["token"]
        if "</think>" in text:
            return logprobs[i + 1:]
    return logprobs


def _part(kind: str, text: str, logprobs: list[dict[str, Any]]) -> dict[str, Any]:
    if kind == "reasoning":
        return {"type": "reasoning_text", "text": text}
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}


def _reasoning_item(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    return {"type": "reasoning", "id": item_id, "summary": [], "status": status,
            "content": [] if text is None else [{"type": "reasoning_text", "text": text}]}


def _status(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def _message_item(item_id: str, text: str | None, status: str,
                  logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    content = [] if text is None else [
        {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}]
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": content}


def _call_item(call_id: str, name: str, arguments: str, status: str,
               item_id: str | None = None) -> dict[str, Any]:
    return {"type": "function_call", "id": item_id or _new_id("fc_"), "call_id": call_id,
            "name": name, "arguments": arguments, "status": status}


def _usage(chat: dict[str, Any]) -> dict[str, Any]:
    cached = (chat.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return {"input_tokens": chat["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": chat["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": chat["total_tokens"]}
