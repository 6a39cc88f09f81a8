"""Sampled tokens -> request state and user-facing outputs: detokenize, check stop conditions.

Stop conditions, checked after each appended token in this order: a stop token id, EOS (unless
``ignore_eos``), a stop string in the text (the text is cut there), ``max_tokens``, the model's
``max_model_len``. While a request runs, the last ``len(longest stop string) - 1`` characters are
held back from streaming so a stop string is never half-sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fairswitch.engine.detokenizer import IncrementalDetokenizer
from fairswitch.outputs import CompletionOutput, RequestOutput
from fairswitch.request import PLACEHOLDER_TOKEN, Request, RequestStatus


@dataclass(slots=True)
class _TextState:
    detokenizer: IncrementalDetokenizer | None
    text: str = ""  # cumulative output text, cut at a stop string
    cut: bool = False  # a stop string matched: text is final
    num_emitted_chars: int = 0
    num_emitted_tokens: int = 0
    hold_back: int = 0


class OutputProcessor:
    def __init__(self, tokenizer: Any, eos_token_ids: set[int], max_model_len: int) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = len(tokenizer) if tokenizer is not None else 0
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len

    def init_request(self, request: Request) -> None:
        params = request.sampling_params
        detok = None
        if params.detokenize and self._tokenizer is not None:
            detok = IncrementalDetokenizer(self._tokenizer, self._vocab_size,
                                           request.prompt_token_ids, params.skip_special_tokens)
        hold = max((len(s) for s in params.stop), default=1) - 1
        request.detokenizer = _TextState(detok, hold_back=hold)

    def append_token(self, request: Request, token_id: int) -> None:
        """Record one sampled token; set the request's finished status if it must stop."""
        request.token_ids.append(token_id)
        params = request.sampling_params
        state: _TextState = request.detokenizer
        if token_id in params.stop_token_ids:
            request.status, request.stop_reason = RequestStatus.FINISHED_STOPPED, token_id
            return
        if not params.ignore_eos and token_id in self.eos_token_ids:
            request.status = RequestStatus.FINISHED_STOPPED
            return
        if state.detokenizer is not None:
            delta = state.detokenizer.add(token_id)
            if delta and self._check_stop_strings(request, state, delta):
                return
        if self.at_length_limit(request):
            request.status = RequestStatus.FINISHED_LENGTH

    def at_length_limit(self, request: Request) -> bool:
        """Has the request as many tokens as it may have (``max_tokens``, ``max_model_len``)?"""
        return (request.num_output_tokens >= request.sampling_params.max_tokens
                or request.num_tokens >= self.max_model_len)

    @staticmethod
    def _check_stop_strings(request: Request, state: _TextState, delta: str) -> bool:
        params = request.sampling_params
        start = len(state.text)
        state.text += delta
        if not params.stop:
            return False
        # A stop string may straddle the previous text and this delta.
        window_start = max(0, start - state.hold_back)
        best: tuple[int, str] | None = None
        for stop in params.stop:
            pos = state.text.find(stop, window_start)
            if pos >= 0 and (best is None or pos < best[0]):
                best = (pos, stop)
        if best is None:
            return False
        pos, stop = best
        state.text = state.text[: pos + len(stop) if params.include_stop_str_in_output else pos]
        state.cut = True
        request.status, request.stop_reason = RequestStatus.FINISHED_STOPPED, stop
        return True

    def make_output(self, request: Request) -> RequestOutput:
        """Output with everything new since the last call for this request."""
        state: _TextState = request.detokenizer
        finished = request.is_finished
        if finished and not state.cut and state.detokenizer is not None:
            state.text += state.detokenizer.flush()
        visible = len(state.text) if finished else max(
            state.num_emitted_chars, len(state.text) - state.hold_back)
        text = state.text[:visible]
        new_text = text[state.num_emitted_chars:]
        state.num_emitted_chars = visible
        out_ids = request.output_token_ids
        while out_ids and out_ids[-1] == PLACEHOLDER_TOKEN:  # a step in flight computes them
            out_ids.pop()
        completion = CompletionOutput(
            index=0,
            text=text,
            token_ids=out_ids,
            finish_reason=request.status.finish_reason,
            stop_reason=request.stop_reason,
            new_text=new_text,
            new_token_ids=out_ids[state.num_emitted_tokens:],
        )
        state.num_emitted_tokens = len(out_ids)
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=[completion],
            finished=finished,
            metrics=request.metrics,
            num_cached_tokens=request.num_cached_tokens,
        )
