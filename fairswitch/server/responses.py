"""OpenAI's Responses API (``POST /v1/responses``) over the chat path: a request is translated
into a chat completion request (responses_request.py), runs as one, and its reply is reshaped
here (``ResponseShape``): a whole Response object, or the stream's semantic events
(``response.created``, ..., ``response.output_text.delta``, ..., ``response.completed``).

Stateless, as vLLM without a store: nothing is kept after a response, so ``previous_response_id``
and ``conversation`` are refused (send the whole input each time); ``store`` is accepted and the
response says ``"store": false``. Only text goes in and out, and function tools (a reply's calls
are ``function_call`` items; ``function_call_output`` items carry results back in).
"""

from __future__ import annotations

import time
import uuid
from typing import Any


def _new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


class ResponseShape:
    """One response: the chat reply's body, whole or chunk by chunk, as the Responses API's.
    A reply's thinking (with a reasoning parser) is a ``reasoning`` item, its text a message
    item and each call a ``function_call`` item, in that order, each ended before the next
    begins. Text after a call (seldom written) is a message after it when streamed, unless it
    comes in the call's chunk; a whole reply has one message before its calls (the chat reply
    holds no order)."""

    def __init__(self, body: dict[str, Any], model: str, thinks: bool = False) -> None:
        """``thinks``: the reply may open with a thinking (a reasoning parser reads it), whose
        tokens are left out of the answer's logprobs, empty or not."""
        self.thinks = thinks
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
            "reasoning": body.get("reasoning")}
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
        """The Response of a whole chat completion body. A reply cut short leaves its last item
        incomplete, the ones before it completed (as streamed)."""
        choice = chat["choices"][0]
        message, status = choice["message"], _status(choice["finish_reason"])
        calls = message.get("tool_calls") or []
        items: list[tuple[str, Any]] = []
        thought = message.get("reasoning")
        if thought:
            items.append(("reasoning", thought))
        text = message.get("content") or ""
        if text or not (calls or thought):
            logprobs = (choice.get("logprobs") or {}).get("content") or []
            if self.thinks:
                logprobs = _after_think(logprobs)
            items.append(("message", (text, _covering(logprobs, text) if calls else logprobs)))
        items += [("call", call) for call in calls]
        output = []
        for i, (kind, value) in enumerate(items):
            done = status if i == len(items) - 1 else "completed"
            if kind == "reasoning":
                output.append(_reasoning_item(_new_id("rs_"), value, done))
            elif kind == "message":
                output.append(_message_item(_new_id("msg_"), value[0], done, value[1]))
            else:
                output.append(_call_item(value["id"], value["function"]["name"],
                                         value["function"]["arguments"], done))
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
        if self.thinks and not item["logprobs"]:
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


def _covering(logprobs: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """The first entries whose tokens write ``text`` (a message's, before the calls that the
    rest of the tokens write)."""
    written = 0
    for i, entry in enumerate(logprobs):
        if written >= len(text):
            return logprobs[:i]
        written += len(entry["token"])
    return logprobs


def _part(kind: str, text: str, logprobs: list[dict[str, Any]]) -> dict[str, Any]:
    if kind == "reasoning":
        return {"type": "reasoning_text", "text": text}
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}


def _reasoning_item(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    return {"type": "reasoning", "id": item_id, "summary": [], "status": status,
            "content": [] if text is None else [_part("reasoning", text, [])]}


def _status(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def _message_item(item_id: str, text: str | None, status: str,
                  logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    content = [] if text is None else [_part("message", text, logprobs or [])]
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": content}


def _call_item(call_id: str, name: str, arguments: str, status: str,
               item_id: str | None = None) -> dict[str, Any]:
    return {"type": "function_call", "id": item_id or _new_id("fc_"), "call_id": call_id,
            "name": name, "arguments": arguments, "status": status}


def _usage(chat: dict[str, Any]) -> dict[str, Any]:
    cached = (chat.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    thinking = (chat.get("completion_tokens_details") or {}).get("reasoning_tokens", 0)
    return {"input_tokens": chat["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": chat["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": thinking},
            "total_tokens": chat["total_tokens"]}
