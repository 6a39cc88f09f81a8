"""Offline batch API: ``LLM(model=...).generate(prompts, params)`` -> outputs in prompt order."""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Sequence
from typing import Any

from fairswitch.chat_messages import (PLAIN_CHAT_TEMPLATE, check_template_kwargs,
                                      check_template_renders_tools, parse_conversation)
from fairswitch.config import EngineConfig
from fairswitch.engine.beam_search import (BeamSearch, BeamSearchOutput, BeamSearchParams,
                                           advance_all)
from fairswitch.engine.engine import Engine, is_priority
from fairswitch.lora.request import LoRARequest
from fairswitch.outputs import (EmbeddingOutput, EmbeddingRequestOutput, RequestOutput,
                                ScoringOutput, ScoringRequestOutput)
from fairswitch.pooling_params import PoolingParams, pair_scores
from fairswitch.sampling_params import SamplingParams
from fairswitch.scheduler.scheduler import QueueFullError


class LLM:
    def __init__(self, model: str = "fairswitch-tiny", **engine_options: Any) -> None:
        self.engine = Engine(EngineConfig.from_kwargs(model=model, **engine_options))

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLM:
        llm = cls.__new__(cls)
        llm.engine = Engine(config)
        return llm

    def shutdown(self) -> None:
        """Stop the engine's other tensor-parallel ranks, if any (they also end with this
        process)."""
        self.engine.shutdown()

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (GPU and CPU tiers), as vLLM's ``LLM.reset_prefix_cache``:
        e.g. between benchmark runs, so none reuses the last one's KV."""
        return self.engine.reset_prefix_cache()

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams() with the model's recommended sampling (its generation_config.json's
        temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens as max_tokens;
        ``generation_config="vllm"``: none), as vLLM's."""
        return self.engine.default_sampling_params()

    def generate(
        self,
        prompts: str | list[int] | dict | Sequence[str | list[int] | dict],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: int | Sequence[int] = 0,
        client_id: str | None | Sequence[str | None] = None,
        lora_request: LoRARequest | None | Sequence[LoRARequest | None] = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text, a list of token ids, or as vLLM ``{"prompt": text}``
        / ``{"prompt_token_ids": ids}``, which may hold a ``"cache_salt"``: only prompts with the
        same salt share cached KV); block until all finish. ``prompts`` is one prompt or a list
        of them.

        ``priority`` (lower runs first, with ``policy="priority"``) and ``client_id`` (whose
        service VTC evens out, with ``policy="vtc"``) go to the scheduler as the server's
        ``priority`` field and ``X-Client-Id`` header do: one value for every prompt, or one per
        prompt. ``lora_request``: the LoRA adapter (``enable_lora=True``) each prompt runs with,
        one for all or one per prompt (None: the base model). Invalid input raises TypeError (a
        wrong type) or ValueError before anything runs. No ``sampling_params``:
        ``get_default_sampling_params()``.
        """
        return self._generate(prompts, sampling_params, use_tqdm, priority, client_id,
                              lora_request=lora_request)

    def embed(
        self,
        prompts: str | list[int] | dict | Sequence[str | list[int] | dict],
        pooling_params: PoolingParams | None = None,
        use_tqdm: bool = True,
        truncate_prompt_tokens: int | None = None,
        priority: int | Sequence[int] = 0,
        client_id: str | None | Sequence[str | None] = None,
        lora_request: LoRARequest | None | Sequence[LoRARequest | None] = None,
    ) -> list[EmbeddingRequestOutput]:
        """vLLM's: an embedding of every prompt (``outputs.embedding``): the state of its last
        token after the model's final norm, unit length unless ``pooling_params`` says
        otherwise (PoolingParams: ``normalize``, ``dimensions``). The prompts are scheduled as
        any request is (``priority``, ``client_id``); ``truncate_prompt_tokens``: only the
        prompt's last k tokens."""
        if pooling_params is not None and not isinstance(pooling_params, PoolingParams):
            raise TypeError(f"pooling_params must be a PoolingParams, got "
                            f"{type(pooling_params).__name__}")
        params = SamplingParams(max_tokens=1, truncate_prompt_tokens=truncate_prompt_tokens)
        outs = self._generate(prompts, params, use_tqdm, priority, client_id,
                              pooling_params or PoolingParams(), lora_request)
        return [EmbeddingRequestOutput(o.request_id, o.prompt, o.prompt_token_ids,
                                       EmbeddingOutput(o.embedding)) for o in outs]

    def score(
        self,
        data_1: str | list[int] | dict | Sequence[str | list[int] | dict],
        data_2: str | list[int] | dict | Sequence[str | list[int] | dict],
        use_tqdm: bool = True,
        truncate_prompt_tokens: int | None = None,
        lora_request: LoRARequest | None = None,
    ) -> list[ScoringRequestOutput]:
        """vLLM's, for embedding models: the cosine similarity of each pair's embeddings, one
        ``data_1`` against each ``data_2``, or pairwise (as many of each); ``lora_request``: the
        adapter every embedding is computed with."""
        first, second = _prompt_list(data_1), _prompt_list(data_2)
        if not second or (len(first) != 1 and len(first) != len(second)):
            raise ValueError(f"data_1 holds {len(first)} prompts and data_2 {len(second)}: give "
                             "one data_1, or as many as data_2 (pairwise)")
        salts = _cache_salts(data_1) + _cache_salts(data_2)
        outs = self.embed([_prompt_dict(p, salt) for p, salt in zip(first + second, salts)],
                          use_tqdm=use_tqdm,
                          truncate_prompt_tokens=truncate_prompt_tokens, lora_request=lora_request)
        a, b = outs[:len(first)], outs[len(first):]
        scores = pair_scores([x.outputs.embedding for x in a], [y.outputs.embedding for y in b])
        a = a * len(b) if len(a) == 1 else a
        return [ScoringRequestOutput(f"{x.request_id}-{y.request_id}",
                                     x.prompt_token_ids + y.prompt_token_ids, ScoringOutput(score))
                for x, y, score in zip(a, b, scores)]

    def _generate(self, prompts: Any, sampling_params: Any, use_tqdm: bool, priority: Any,
                  client_id: Any, pooling: PoolingParams | None = None,
                  lora_request: Any = None) -> list[RequestOutput]:
        """``generate``, or with ``pooling`` ``embed``: each prompt's request(s) to the end."""
        salts = _cache_salts(prompts)
        prompts = _prompt_list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params = ([sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams)
                  else list(sampling_params))
        if not all(isinstance(p, SamplingParams) for p in params):
            raise TypeError("sampling_params must be a SamplingParams or a list of them, got "
                            f"{type(sampling_params).__name__}")
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        priorities = _per_prompt(priority, len(prompts), "priority", is_priority)
        clients = _per_prompt(client_id, len(prompts), "client_id",
                              lambda c: c is None or isinstance(c, str))
        loras = _per_prompt(lora_request, len(prompts), "lora_request",
                            lambda r: r is None or isinstance(r, LoRARequest))
        engine = self.engine
        for r in loras:  # (read now: a bad adapter queues nothing)
            if r is not None:
                engine.check_lora(r)
        # Tokenize and validate everything first so a bad prompt queues nothing.
        checked = [engine.validate_prompt(*((None, p) if isinstance(p, list) else (p, None)),
                                          sp.truncate_prompt_tokens)
                   for p, sp in zip(prompts, params)]
        copies = [p.copies() for p in params]
        for c in copies:
            engine.validate_params(c[0])  # (the copies differ in their seeds alone)
        ids: list[str] = []
        index: dict[str, tuple[int, int]] = {}  # request id -> (prompt, copy)
        # n > 1: one request per copy; copies 1.. join once copy 0's prompt is computed, so
        # that they share its KV (prefix caching) instead of computing it n times.
        later: dict[str, Any] = {}
        # What is not yet queued: with max_waiting set, requests join as the queue frees.
        pending = deque((i, 0, c) for i, c in enumerate(copies))

        def feed() -> None:
            while pending:
                i, j, seqs = pending[0]
                (text, toks), prio, client = checked[i], priorities[i], clients[i]
                try:
                    rid = engine.add_request(text, seqs[j], prompt_token_ids=toks,
                                             priority=prio, client_id=client, pooling=pooling,
                                             lora_request=loras[i], cache_salt=salts[i])
                except QueueFullError:  # joins as the queue frees (max_waiting >= 1: it will)
                    return
                pending.popleft()
                ids.append(rid)
                index[rid] = (i, j)
                if j == 0 and len(seqs) > 1:
                    later[rid] = (i, seqs)

        done: list[list[RequestOutput | None]] = [[None] * p.n for p in params]
        bar = _progress(sum(p.n for p in params), use_tqdm)
        try:
            feed()
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.request_id in later:  # its first output: the prompt is computed
                        i, seqs = later.pop(out.request_id)
                        pending.extendleft((i, j, seqs) for j in range(len(seqs) - 1, 0, -1))
                    if out.finished and out.request_id in index:
                        i, j = index[out.request_id]
                        done[i][j] = out
                        if bar is not None:
                            bar.update(1)
                feed()
        except BaseException:  # an error, or Ctrl-C: take back what was queued
            for rid in ids:
                engine.abort_request(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [_merged(outs) for outs in done]  # type: ignore[arg-type]

    def beam_search(self, prompts: str | list[int] | dict | Sequence[str | list[int] | dict],
                    params: BeamSearchParams, use_tqdm: bool = False,
                    lora_request: LoRARequest | None = None) -> list[BeamSearchOutput]:
        """vLLM's: each prompt's ``params.beam_width`` best continuations by beam search
        (beam_search.py), best first; a step of every prompt's beams runs as one batch. A
        prompt whose beams could outgrow ``max_model_len`` is a ValueError before anything
        runs. ``lora_request``: the LoRA adapter every beam runs with."""
        if not isinstance(params, BeamSearchParams):
            raise TypeError(f"params must be a BeamSearchParams, got {type(params).__name__}")
        if lora_request is not None and not isinstance(lora_request, LoRARequest):
            raise TypeError(f"lora_request must be a LoRARequest or None, got "
                            f"{type(lora_request).__name__}")
        engine = self.engine
        salts = _cache_salts(prompts)
        checked = [engine.validate_prompt(*((None, p) if isinstance(p, list) else (p, None)))
                   for p in _prompt_list(prompts)]
        for i, (_, ids) in enumerate(checked):
            if len(ids) + params.max_tokens > engine.max_model_len:
                raise ValueError(f"prompt {i}: {len(ids)} tokens + max_tokens "
                                 f"{params.max_tokens} exceed max_model_len "
                                 f"{engine.max_model_len}")
        eos = engine.output_processor.eos_token_ids
        searches = [BeamSearch(ids, params, eos) for _, ids in checked]
        step = params.step_params()
        salt_of = {id(s): salt for s, salt in zip(searches, salts)}
        while live := [s for s in searches if not s.finished]:
            beams = [_prompt_dict(beam.tokens, salt_of[id(s)]) for s in live for beam in s.live]
            advance_all(live, self.generate(beams, step, use_tqdm, lora_request=lora_request))
        results = []
        for s in searches:
            best = s.best()
            for beam in best:
                beam.text = engine.tokenizer.decode(s.generated(beam), skip_special_tokens=True)
            results.append(BeamSearchOutput(best))
        return results

    def chat(
        self,
        messages: Sequence[dict[str, Any]] | Sequence[Sequence[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        **generate_options: Any,
    ) -> list[RequestOutput]:
        """Reply to one conversation (a list of ``{"role", "content"}`` messages) or to several
        (a list of such lists): each is rendered with the tokenizer's chat template (or
        ``chat_template``; neither: a plain-text one, as the server's) and generated from;
        ``priority``, ``client_id``, ``lora_request`` as in ``generate``.
        ``continue_final_message`` (with ``add_generation_prompt=False``) continues the final
        message instead of starting a new one, as transformers renders it. ``tools`` (OpenAI's
        function definitions) and ``chat_template_kwargs`` (e.g. ``{"enable_thinking": False}``)
        go to the template, as in vLLM.
        Messages are checked as the server checks them (chat_messages.py): TypeError or
        ValueError naming the message and field, before anything runs; so is a conversation with
        tool calls for a chat template that would render it without them."""
        tokenizer = self.engine.tokenizer
        try:
            check_template_kwargs(chat_template_kwargs or {})
        except ValueError as e:
            raise ValueError(f"chat_template_kwargs {e}") from None
        # (as the server renders it: a tokenizer without a template gets a plain-text one)
        template = chat_template or getattr(tokenizer, "chat_template", None) \
            or PLAIN_CHAT_TEMPLATE
        prompts, texts = [], []
        for where, conversation in _conversations(messages):
            check_template_renders_tools(conversation, template, where)
            text = tokenizer.apply_chat_template(
                conversation, chat_template=template, tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, tools=tools,
                **(chat_template_kwargs or {}))
            # The template writes the special tokens itself.
            prompts.append(tokenizer.encode(text, add_special_tokens=False))
            texts.append(text)
        outs = self.generate(prompts, sampling_params, use_tqdm=use_tqdm, **generate_options)
        return [dataclasses.replace(out, prompt=text) for out, text in zip(outs, texts)]


def _merged(copies: list[RequestOutput]) -> RequestOutput:
    """One prompt's output: its copies' completions, numbered."""
    first = copies[0]
    if len(copies) > 1:
        first.outputs = [dataclasses.replace(c.outputs[0], index=j)
                         for j, c in enumerate(copies)]
    return first


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _prompt_list(prompts: Any) -> list[str | list[int]]:
    """``generate``'s prompts as a list: one prompt or a list of them, each a text, a list of
    token ids, or vLLM's dict forms ``{"prompt": text}`` / ``{"prompt_token_ids": ids}``."""
    if isinstance(prompts, (str, dict)):
        return [_one_prompt(prompts, "prompts")]
    if not isinstance(prompts, (list, tuple)):
        raise TypeError("prompts must be a str, a list of token ids, a {'prompt': ...} / "
                        "{'prompt_token_ids': ...} dict, or a list of those, got "
                        f"{type(prompts).__name__}")
    if prompts and _is_int(prompts[0]):  # one prompt's token ids
        return [_token_ids(prompts, "prompts")]
    return [_one_prompt(prompt, f"prompts[{i}]") for i, prompt in enumerate(prompts)]


def _cache_salts(prompts: Any) -> list[str | None]:
    """Each prompt's ``cache_salt`` (vLLM's prompt dicts may hold one; None elsewhere), in
    ``_prompt_list``'s order: TypeError for one that is not a str, ValueError for an empty one
    (before anything is queued)."""
    if isinstance(prompts, dict):
        salts = [prompts.get("cache_salt")]
    elif isinstance(prompts, (list, tuple)) and not (prompts and _is_int(prompts[0])):
        salts = [p.get("cache_salt") if isinstance(p, dict) else None for p in prompts]
    else:
        salts = [None]
    for i, salt in enumerate(salts):
        if salt is not None and not isinstance(salt, str):
            raise TypeError(f"prompts[{i}]['cache_salt'] must be a str, got "
                            f"{type(salt).__name__}")
        if salt == "":
            raise ValueError(f"prompts[{i}]['cache_salt'] must be a non-empty string")
    return salts


def _prompt_dict(prompt: str | list[int], salt: str | None) -> dict[str, Any]:
    """vLLM's prompt dict of a text or token ids, with its cache_salt if any."""
    d: dict[str, Any] = {"prompt": prompt} if isinstance(prompt, str) else {
        "prompt_token_ids": prompt}
    return d | ({"cache_salt": salt} if salt is not None else {})


def _one_prompt(prompt: Any, name: str) -> str | list[int]:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, (list, tuple)):
        return _token_ids(prompt, name)
    if not isinstance(prompt, dict):
        raise TypeError(f"{name} must be a str, a list of token ids or a prompt dict, got "
                        f"{type(prompt).__name__}")
    keys = set(prompt) - {"cache_salt"}  # (read by _cache_salts)
    if len(keys) != 1 or not keys <= {"prompt", "prompt_token_ids"}:
        raise ValueError(f"{name} must hold exactly one of 'prompt' (a text) or "
                         f"'prompt_token_ids' (a list of ids), and may hold 'cache_salt'; got "
                         f"the keys {sorted(prompt)}")
    if "prompt" in prompt:
        if not isinstance(prompt["prompt"], str):
            raise TypeError(f"{name}['prompt'] must be a str, got "
                            f"{type(prompt['prompt']).__name__}")
        return prompt["prompt"]
    ids = prompt["prompt_token_ids"]
    if not isinstance(ids, (list, tuple)):
        raise TypeError(f"{name}['prompt_token_ids'] must be a list of token ids, got "
                        f"{type(ids).__name__}")
    return _token_ids(ids, f"{name}['prompt_token_ids']")


def _token_ids(prompt: list | tuple, name: str) -> list[int]:
    """(Their range is the engine's to check, against the vocabulary.)"""
    bad = next((j for j, t in enumerate(prompt) if not _is_int(t)), None)
    if bad is not None:
        raise TypeError(f"{name}[{bad}] must be an int token id, got {prompt[bad]!r:.40}")
    return list(prompt)


def _conversations(messages: Any) -> list[tuple[str, list[dict[str, Any]]]]:
    """``chat``'s messages as a list of checked conversations, each with the name errors give it:
    one (a list of message dicts) or several (a list of such lists)."""
    if not isinstance(messages, (list, tuple)):
        hint = ": put a single message in a list" if isinstance(messages, dict) else ""
        raise TypeError("messages must be a list of message dicts (one conversation) or a list of "
                        f"such lists, got {type(messages).__name__}{hint}")
    if not messages or not isinstance(messages[0], (list, tuple)):
        return [("messages", parse_conversation(messages))] if messages else []
    conversations = []
    for k, conversation in enumerate(messages):
        if not isinstance(conversation, (list, tuple)):
            raise TypeError(f"messages[{k}] must be a conversation (a list of message dicts) "
                            f"like messages[0], got {type(conversation).__name__}")
        conversations.append((f"messages[{k}]",
                              parse_conversation(conversation, f"messages[{k}]")))
    return conversations


def _per_prompt(value: Any, n: int, name: str, valid: Any) -> list[Any]:
    """One value per prompt from a scalar or a sequence of ``n``; ValueError naming ``name``."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{n} prompts but {len(values)} values of {name}")
    bad = [v for v in values if not valid(v)]
    if bad:
        raise ValueError(f"{name} has invalid values: {bad[:5]!r}")
    return values


def _progress(total: int, enabled: bool) -> Any:
    if not enabled or total < 2:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="generating", unit="req", dynamic_ncols=True)
