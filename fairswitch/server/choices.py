"""The choices of one API request: ``n`` for each of its prompts (completions take a batch), as
one stream of ``(index, output)``, and their bodies. Prompt p's choice j has index p * n + j.

Each choice is its own engine request (``SamplingParams.copies``: copy j seeded ``seed + j``). A
prompt's choices 1.. are added once its choice 0's first output is out: its prompt is computed by
then and indexed in the prefix cache, so they share its KV instead of computing the prompt n
times. The choices are admitted together: the first takes a place in the waiting queue
(``max_waiting``) for each, held for the others until they join or the stream closes, so a full
queue refuses the request before its response begins, never a choice in the middle of a stream.
With one choice the engine's stream is passed through as is.

Closing the stream (the response is done, failed, or its client went away) closes every choice's
engine stream, which aborts whatever has not finished.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fairswitch.engine.async_engine import AsyncEngine
from fairswitch.outputs import RequestOutput
from fairswitch.sampling_params import SamplingParams
from fairswitch.server.reasoning import Reasoning
from fairswitch.server.tool_calls import ToolCalls
from fairswitch.server.tool_parsers import AutoToolCalls
from fairswitch.server.protocol import (ResponseFormat, chat_logprobs, completion_logprobs,
                                        prompt_logprobs)

_END = object()
T = TypeVar("T")


async def last_output(outputs: AsyncIterator[RequestOutput]) -> RequestOutput | None:
    """A request's last output; its stream is closed on the way out (a request that did not
    finish, because this was cancelled, is aborted)."""
    last = None
    async with contextlib.aclosing(outputs):
        async for last in outputs:
            pass
    return last


async def all_or_none(coroutines: Iterable[Awaitable[T]]) -> list[T]:
    """Their results, in order. If one fails, or this is cancelled, the others are cancelled
    (their requests aborted) before the error goes on."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def choice_request_ids(request_id: str, n: int) -> list[str]:
    """The engine request ids of a response's ``n`` choices: choice 0 takes the response's id."""
    return [request_id] + [f"{request_id}-{j}" for j in range(1, n)]


@dataclass(frozen=True)
class Prompt:
    """One prompt of a request, and its choices' parameters (``params.n`` choices)."""

    text: str | None
    ids: list[int]
    params: SamplingParams


async def choice_outputs(engine: AsyncEngine, prompts: list[Prompt], request_id: str,
                         **scheduling: Any) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Every choice's outputs as they come; each choice's last one has ``finished=True``.
    ``scheduling``: ``priority`` and ``client_id``, the same for every choice."""
    copies = [prompt.params.copies() for prompt in prompts]
    n = len(copies[0])
    request_ids = choice_request_ids(request_id, n * len(prompts))

    def start(k: int) -> AsyncIterator[RequestOutput]:
        p, j = divmod(k, n)
        places = {"queue_places": len(request_ids)} if k == 0 else {"held_by": request_id}
        return engine.generate(prompts[p].text, copies[p][j], request_id=request_ids[k],
                               prompt_token_ids=prompts[p].ids, **places, **scheduling)

    if len(request_ids) == 1:
        async with contextlib.aclosing(start(0)) as outputs:
            async for out in outputs:
                yield 0, out
        return
    merged: asyncio.Queue = asyncio.Queue()
    joined: set[int] = set()  # prompts whose choices 1.. are started

    async def pump(k: int) -> None:
        try:
            async with contextlib.aclosing(start(k)) as outputs:
                async for out in outputs:
                    merged.put_nowait((k, out))
                    if k % n == 0 and k not in joined:  # its prompt is computed: the rest join
                        joined.add(k)
                        tasks.extend(asyncio.create_task(pump(k + j)) for j in range(1, n))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
            merged.put_nowait((k, e))
        merged.put_nowait((k, _END))

    # Each prompt's choice 0 at once, in order: a task's first step submits its add, so the
    # engine adds choice 0 of prompt 0, which takes every place, before those holding one.
    tasks = [asyncio.create_task(pump(k)) for k in range(0, len(request_ids), n)]
    try:
        running = len(request_ids)
        while running:
            k, item = await merged.get()
            if item is _END:
                running -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            yield k, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        engine.release_places(request_id)


@dataclass
class ChoiceShaper:
    """One response's choices from the engine's outputs: the text (with ``echo``, the prompt's
    first), finish, and the logprobs asked for, whole or one chunk at a time.

    ``echo_only``: completions with ``echo`` and ``max_tokens`` 0 show the prompt alone (the
    engine samples one token for it, which is left out, as vLLM does)."""

    fmt: ResponseFormat
    logprobs: int | None  # top alternatives per token (None: no logprobs)
    echo_texts: list[str] | None  # completions with echo: each prompt's text
    echo_only: bool
    text_of: Callable[[int], str]  # a token's text
    n: int = 1  # choices per prompt (choice i is prompt i // n's)
    token_ids: bool = False  # return_token_ids: each choice's ids (completions: its prompt's)
    # Chat whose replies hold tool calls: tool_choice named or "required" (tool_calls.py), or
    # "auto" (tool_parsers.py).
    tools: ToolCalls | AutoToolCalls | None = None
    reasoning: Reasoning | None = None  # chat replies' thinking apart (reasoning.py)
    echoed: str = ""  # chat with echo: before each reply's content (streamed: the opening's)
    by_id: bool = False  # logprobs name tokens "token_id:<id>" (return_tokens_as_token_ids)
    _started: set[int] = field(default_factory=set)  # streamed choices with a chunk out
    _offsets: dict[int, int] = field(default_factory=dict)  # completions: chars sent per choice

    def whole(self, index: int, out: RequestOutput) -> dict[str, Any]:
        c = out.outputs[0]
        ids, entries = self._shown(c.token_ids, c.logprobs)
        text = "" if self.echo_only else c.text
        if self.echo_texts is not None:
            text = self.echo_texts[index // self.n] + text
            ids, entries = out.prompt_token_ids + ids, self._prompt_entries(out) + entries
        choice = self.fmt.choice(text, c.finish_reason, c.stop_reason, index,
                                 self._logprobs(ids, entries, 0))
        if not self.fmt.chat and out.prompt_logprobs is not None:  # (chat: the response's)
            choice["prompt_logprobs"] = self.prompt_logprobs(out)
        if self.token_ids:
            choice["token_ids"] = [] if self.echo_only else list(c.token_ids)
            if not self.fmt.chat:  # (chat: the response's)
                choice["prompt_token_ids"] = list(out.prompt_token_ids)
        thought = None
        if self.reasoning is not None:  # the thinking apart from the answer
            message = choice["message"]
            thought, message["content"] = self.reasoning.whole(message["content"])
            if thought and self.reasoning.include:  # (an empty thinking, as streamed: none)
                message["reasoning"] = message["reasoning_content"] = thought
        if self.tools is not None:  # the text holds calls (OpenAI's shape)
            message = choice["message"]
            content, calls = self.tools.whole(message["content"])
            if calls is not None:  # (else none, or cut short: the text as it is)
                message["tool_calls"], message["content"] = calls, content
                choice["finish_reason"] = self._finish(choice["finish_reason"], True)
        if self.echoed:  # (after the parsers, as vLLM: the echo is the message's own text)
            choice["message"]["content"] = self.echoed + (choice["message"]["content"] or "")
        if thought is not None and choice["message"]["content"] == "":
            choice["message"]["content"] = None  # all thinking: no answer (as vLLM's parsers)
        return choice

    def _finish(self, reason: str | None, called: bool) -> str | None:
        """Calls the model chose ("required", "auto") end as OpenAI's "tool_calls"; a forced
        one, or a reply cut short, keep their reason."""
        if reason == "stop" and called and self.tools.chooses:
            return "tool_calls"
        return reason

    def prompt_logprobs(self, out: RequestOutput) -> list[dict[str, Any] | None]:
        """vLLM's ``prompt_logprobs`` field, of an output that has them."""
        return prompt_logprobs(out.prompt_logprobs, self.text_of)

    def delta(self, index: int, out: RequestOutput) -> dict[str, Any] | None:
        """The chunk of this output (None: nothing to send)."""
        c = out.outputs[0]
        finish = c.finish_reason if out.finished else None
        ids, entries = self._shown(c.new_token_ids, c.new_logprobs)
        text = "" if self.echo_only else c.new_text
        first = index not in self._started
        self._started.add(index)
        if self.echo_texts is not None and first:
            text = self.echo_texts[index // self.n] + text
            ids, entries = out.prompt_token_ids + ids, self._prompt_entries(out) + entries
        if not ids and finish is None:
            return None
        logprobs = self._logprobs(ids, entries, self._offsets.get(index, 0))
        if logprobs is not None and logprobs.get("text_offset"):
            # Offsets count the tokens' own texts, as a whole response's do (and vLLM's): a
            # character split across tokens counts once per piece.
            self._offsets[index] = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
        choice = self.fmt.delta_choice(text, finish, c.stop_reason, index, logprobs, bool(ids))
        if self.token_ids:  # this chunk's new ids; a completion's first also its prompt's
            choice["token_ids"] = [] if self.echo_only else list(c.new_token_ids)
            if first and not self.fmt.chat:
                choice["prompt_token_ids"] = list(out.prompt_token_ids)
        delta = choice.get("delta")
        if self.reasoning is not None and delta is not None and (
                "content" in delta or finish is not None):
            thought, answer = self.reasoning.delta(index, delta.pop("content", ""),
                                                   finish is not None)
            if thought and self.reasoning.include:
                delta["reasoning"] = delta["reasoning_content"] = thought
            if answer or "reasoning" not in delta:
                delta["content"] = answer  # ("": a token's text held back, as without)
        if self.tools is not None and delta is not None:
            content, calls = self.tools.delta(index, delta.pop("content", ""), finish is not None)
            if content:
                delta["content"] = content
            if calls:
                delta["tool_calls"] = calls
            choice["finish_reason"] = self._finish(choice["finish_reason"],
                                                   self.tools.called(index))
            if (not delta and choice["finish_reason"] is None and choice["logprobs"] is None
                    and "token_ids" not in choice):
                return None  # (a piece of the JSON around the calls: nothing to say yet)
        return choice

    def num_shown_tokens(self, out: RequestOutput) -> int:
        return 0 if self.echo_only else len(out.outputs[0].token_ids)

    def num_reasoning_tokens(self, out: RequestOutput) -> int | None:
        """Of a finished choice's tokens, those of its thinking (None: no reasoning parser)."""
        if self.reasoning is None:
            return None
        return self.reasoning.count(map(self.text_of, out.outputs[0].token_ids))

    def _shown(self, ids: list[int], entries: list | None) -> tuple[list[int], list]:
        if self.echo_only:
            return [], []
        return list(ids), list(entries or [])

    def _prompt_entries(self, out: RequestOutput) -> list:
        if self.logprobs is None:
            return []
        if out.prompt_logprobs is None:
            raise RuntimeError("echo with logprobs but the output has no prompt logprobs")
        return list(out.prompt_logprobs)

    def _logprobs(self, ids: list[int], entries: list, offset: int) -> dict[str, Any] | None:
        if self.logprobs is None:
            return None
        if self.fmt.chat:
            return chat_logprobs(ids, entries, self.logprobs, self.text_of, self.by_id)
        return completion_logprobs(ids, entries, self.text_of, offset, self.by_id)
