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

import time
import uuid
from typing import Any

from fairswitch.server.errors import bad_request
from fairswitch.server.protocol import _describe

# Fields with a meaning here, and the Responses request's own that are refused unless unset.
_REFUSED = {
    "previous_response_id": "this server keeps no responses: send the whole input each time",
    "conversation": "this server keeps no conversations: send the whole input each time",
    "prompt": "stored prompts are not supported",
    "background": "background responses are not supported",
    "include": "no extra output data is supported",
    "max_tool_calls": "not supported",
    "reasoning": "reasoning options are not supported",
}
# Chat completion fields that a Responses request spells otherwise.
_CHAT_ONLY = {"messages": "input", "max_tokens": "max_output_tokens",
              "max_completion_tokens": "max_output_tokens", "response_format": "text.format",
              "n": None, "stream_options": None, "functions": "tools",
              "function_call": "tool_choice", "logprobs": None, "top_logprobs": None,
              "echo": None}
_ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}
_TEXT_PARTS = {"input_text", "output_text", "text"}


def chat_body(body: Any) -> dict[str, Any]:
    """The chat completion request that runs a Responses request; 400 for what it cannot say."""
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {_describe(body)}")
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
    chat = {k: v for k, v in body.items()
            if k not in ("input", "instructions", "max_output_tokens", "text", "tools",
                         "tool_choice", "store", "metadata", "truncation", *_REFUSED)}
    chat["messages"] = _messages(body.get("instructions"), body.get("input"))
    if "max_output_tokens" in body and body["max_output_tokens"] is not None:
        value = body["max_output_tokens"]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise bad_request(f"'max_output_tokens' must be an integer >= 1, got "
                              f"{_describe(value)}", "max_output_tokens")
        chat["max_tokens"] = value
    fmt = _text_format(body.get("text"))
    if fmt is not None:
        chat["response_format"] = fmt
    if body.get("tools") is not None:
        chat["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    if body.get("stream"):
        chat["stream_options"] = {"include_usage": True}  # (the last event's usage)
    return chat


def _messages(instructions: Any, items: Any) -> list[dict[str, Any]]:
    if instructions is not None and not isinstance(instructions, str):
        raise bad_request(f"'instructions' must be a string, got {_describe(instructions)}",
                          "instructions")
    messages = [{"role": "system", "content": instructions}] if instructions else []
    if isinstance(items, str):
        return messages + [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise bad_request(f"'input' must be a string or a non-empty array of items, got "
                          f"{_describe(items)}", "input")
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad_request(f"'{where}' must be an object, got {_describe(item)}", where)
        kind = item.get("type", "message")
        if kind == "message":
            messages.append(_message(item, where))
        elif kind == "function_call":
            call = {"id": _string(item, "call_id", where), "type": "function", "function": {
                "name": _string(item, "name", where),
                "arguments": _string(item, "arguments", where, empty=True)}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)  # (calls made together: one assistant turn)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            if isinstance(output, list):
                output = "".join(_part_text(p, f"{where}.output", j) for j, p in enumerate(output))
            if not isinstance(output, str):
                raise bad_request(f"'{where}.output' must be a string, got {_describe(output)}",
                                  f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": _string(item, "call_id", where),
                             "content": output})
        else:
            raise bad_request(f"'{where}.type' {_describe(kind)} is not supported: input items "
                              "are messages, function_call and function_call_output",
                              f"{where}.type")
    return messages


def _message(item: dict, where: str) -> dict[str, Any]:
    role = item.get("role")
    if role not in _ROLES:
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
    if (isinstance(part, dict) and part.get("type") in _TEXT_PARTS
            and isinstance(part.get("text"), str)):
        return part["text"]
    kind = part.get("type") if isinstance(part, dict) else None
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
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else tool
            raise bad_request(f"'tools[{i}]' must be a function tool ({{\"type\": \"function\", "
                              f"\"name\": ..., \"parameters\": {{...}}}}): only functions are "
                              f"supported, got {_describe(kind)}", f"tools[{i}]")
        out.append({"type": "function", "function": {
            k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}})
    return out


def _tool_choice(choice: Any) -> Any:
    if choice in ("none", "auto", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
        return {"type": "function", "function": {"name": choice["name"]}}
    raise bad_request("'tool_choice' must be \"none\", \"auto\", \"required\" or {\"type\": "
                      f"\"function\", \"name\": ...}}, got {_describe(choice)}", "tool_choice")


def _new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


class ResponseShape:
    """One response: the chat reply's body, whole or chunk by chunk, as the Responses API's."""

    def __init__(self, body: dict[str, Any], model: str) -> None:
        self.id = _new_id("resp_")
        self.created_at = int(time.time())
        # What the response object echoes of its request.
        self.echo = {
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"), "model": model,
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "temperature": body.get("temperature"), "top_p": body.get("top_p"),
            "tool_choice": body.get("tool_choice") or ("auto" if body.get("tools") else "none"),
            "tools": body.get("tools") or [],
            "text": body.get("text") or {"format": {"type": "text"}},
            "truncation": "disabled", "metadata": body.get("metadata") or {},
            "user": body.get("user"), "store": False, "previous_response_id": None,
            "reasoning": None}
        self.sequence = 0
        self.items: list[dict[str, Any]] = []  # the stream's output items, in order
        self.text_item: dict[str, Any] | None = None  # the message being streamed
        self.calls: dict[int, dict[str, Any]] = {}  # a chat tool call's index -> its item
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
        message, done = choice["message"], _item_status(choice["finish_reason"])
        output = []
        if message.get("content") or not message.get("tool_calls"):
            output.append(_message_item(_new_id("msg_"), message.get("content") or "", done))
        for call in message.get("tool_calls") or []:
            output.append(_call_item(call["id"], call["function"]["name"],
                                     call["function"]["arguments"], done))
        return self.response(_status(choice["finish_reason"]), output, chat.get("usage"))

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
            if delta.get("content"):
                if self.text_item is None:
                    events += self._open_text()
                item = self.text_item
                item["text"] += delta["content"]
                events.append(self._event("response.output_text.delta", item_id=item["id"],
                                          output_index=item["index"], content_index=0,
                                          delta=delta["content"], logprobs=[]))
            for call in delta.get("tool_calls") or []:
                events += self._call_delta(call)
            self.finish = choice.get("finish_reason") or self.finish
        if chat.get("usage") and not chat.get("choices"):
            events += self._close()
            status = _status(self.finish)
            kind = "response.completed" if status == "completed" else "response.incomplete"
            events.append(self._event(kind, response=self.response(
                status, [item["done"] for item in self.items], chat["usage"])))
        return events

    def failed(self, error: dict[str, Any]) -> list[dict[str, Any]]:
        """A stream that fails after it began: the error, then the failed response."""
        code = error.get("code") or error.get("type")
        return [self._event("error", code=code, message=error.get("message", ""),
                            param=error.get("param")),
                self._event("response.failed", response=self.response(
                    "failed", [], error={"code": code, "message": error.get("message", "")}))]

    def _open_text(self) -> list[dict[str, Any]]:
        item = {"id": _new_id("msg_"), "index": len(self.items), "text": "", "kind": "text"}
        self.items.append(item)
        self.text_item = item
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return [self._event("response.output_item.added", output_index=item["index"],
                            item=_message_item(item["id"], None, "in_progress")),
                self._event("response.content_part.added", item_id=item["id"],
                            output_index=item["index"], content_index=0, part=part)]

    def _call_delta(self, call: dict[str, Any]) -> list[dict[str, Any]]:
        events = []
        fn = call.get("function") or {}
        if "id" in call:  # a new call: the message before it is done
            events += self._close_text()
            item = {"id": _new_id("fc_"), "index": len(self.items), "call_id": call["id"],
                    "name": fn.get("name", ""), "arguments": "", "kind": "call"}
            self.items.append(item)
            self.calls[call["index"]] = item
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

    def _close_text(self) -> list[dict[str, Any]]:
        item, self.text_item = self.text_item, None
        if item is None:
            return []
        status = "completed"  # (a message followed by a call ended before it)
        return self._text_done(item, status)

    def _text_done(self, item: dict[str, Any], status: str) -> list[dict[str, Any]]:
        part = {"type": "output_text", "text": item["text"], "annotations": [], "logprobs": []}
        item["done"] = _message_item(item["id"], item["text"], status)
        at = {"item_id": item["id"], "output_index": item["index"], "content_index": 0}
        return [self._event("response.output_text.done", **at, text=item["text"], logprobs=[]),
                self._event("response.content_part.done", **at, part=part),
                self._event("response.output_item.done", output_index=item["index"],
                            item=item["done"])]

    def _close(self) -> list[dict[str, Any]]:
        """The end of every item still open, at the end of the reply."""
        status = _item_status(self.finish)
        events = []
        if self.text_item is not None:
            events += self._text_done(self.text_item, status)
            self.text_item = None
        for item in self.calls.values():
            if "done" in item:
                continue
            item["done"] = _call_item(item["call_id"], item["name"], item["arguments"], status,
                                      item["id"])
            events += [self._event("response.function_call_arguments.done", item_id=item["id"],
                                   output_index=item["index"], name=item["name"],
                                   arguments=item["arguments"]),
                       self._event("response.output_item.done", output_index=item["index"],
                                   item=item["done"])]
        if not self.items:  # nothing was said: an empty message, as a whole response has
            events += self._open_text()
            events += self._text_done(self.text_item, status)
            self.text_item = None
        return events

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event


def _status(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def _item_status(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def _message_item(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    content = [] if text is None else [
        {"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
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
