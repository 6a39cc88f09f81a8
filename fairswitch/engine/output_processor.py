"""Sampled tokens -> request state and user-facing outputs: detokenize, check stop conditions.

Stop conditions, checked after each appended token in this order: a stop token id, EOS (unless
``ignore_eos``), a stop string in the text (the text is cut there), ``max_tokens``, the model's
``max_model_len``; the first three only once ``min_tokens`` tokens are out (the sampler masks
EOS and stop ids before that, so only a stop string can be passed over). A stop token's text is
in the output only with ``include_stop_str_in_output``, as a stop string is. While a request
runs, the last ``len(longest stop string) - 1`` characters are held back from streaming so a
stop string is never half-sent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from fairswitch.engine.detokenizer import IncrementalDetokenizer
from fairswitch.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from fairswitch.request import PLACEHOLDER_TOKEN, Request, RequestStatus

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _TextState:
    detokenizer: IncrementalDetokenizer | None
    text: str = ""  # cumulative output text, cut at a stop string
    cut: bool = False  # a stop string matched: text is final
    num_emitted_chars: int = 0
    num_emitted_tokens: int = 0
    hold_back: int = 0
    logprobs: list[PositionLogprobs] | None = None  # user-facing, one per output token
    cumulative_logprob: float = 0.0
    prompt_logprobs_sent: bool = False


class OutputProcessor:
    def __init__(self, tokenizer: Any, eos_token_ids: set[int], max_model_len: int) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = len(tokenizer) if tokenizer is not None else 0
        self.eos_token_ids = eos_token_ids
        # The tokenizer's EOS ends a reply with no stop_reason; the others (the model's and
        # generation_config.json's, e.g. Llama 3's <|eot_id|>) report theirs, as vLLM's stop
        # token ids do.
        self.primary_eos = getattr(tokenizer, "eos_token_id", None)
        self.max_model_len = max_model_len

    def init_request(self, request: Request) -> None:
        params = request.sampling_params
        detok = None
        if params.detokenize and self._tokenizer is not None:
            detok = IncrementalDetokenizer(self._tokenizer, self._vocab_size,
                                           request.prompt_token_ids, params.skip_special_tokens)
        hold = max((len(s) for s in params.stop), default=1) - 1
        request.detokenizer = _TextState(detok, hold_back=hold,
                                         logprobs=[] if params.logprobs is not None else None)

    def append_token(self, request: Request, token_id: int,
                     logprobs: dict[int, tuple[float, int]] | None = None) -> None:
        """Record one sampled token (and its logprobs, if the request asked for them); set the
        request's finished status if it must stop."""
        request.token_ids.append(token_id)
        params = request.sampling_params
        state: _TextState = request.detokenizer
        if state.logprobs is not None:
            if logprobs is None:
                raise RuntimeError(f"request {request.request_id!r} asked for logprobs but the "
                                   "step returned none")
            state.logprobs.append(self._position(logprobs, params.logprobs))
            state.cumulative_logprob += logprobs[token_id][0]
        if request.grammar is not None:
            # (after its logprobs: a token ending the reply has them too)
            if not request.grammar.accept_token(token_id):
                # Its mask allowed only what it accepts: only a mask with nothing left gets
                # here, where the request's own restrictions (allowed_token_ids, bad_words)
                # leave none of the tokens its grammar accepts next.
                # This request ends, not the step.
                request.abort_error = (
                    f"structured outputs: after {request.num_output_tokens - 1} tokens no token "
                    "the request allows can continue its structure (allowed_token_ids or "
                    "bad_words exclude every token the structure accepts next)")
                logger.info("request %r: %s; aborted", request.request_id, request.abort_error)
                request.status = RequestStatus.FINISHED_ABORTED
                return
            if request.grammar.is_terminated():
                # It took an end-of-sequence token, the only one left once the reply is
                # complete: the end, whatever min_tokens or ignore_eos say.
                self._stopped_by(request, token_id)
                return
        if params.min_tokens and request.num_output_tokens < params.min_tokens:
            if state.detokenizer is not None:
                state.text += state.detokenizer.add(token_id)
            if self.at_length_limit(request):
                request.status = RequestStatus.FINISHED_LENGTH
            return
        if token_id in params.stop_token_ids or (not params.ignore_eos
                                                 and token_id in self.eos_token_ids):
            # The stop token's text (a special token's is none where skipped) only when asked
            # for, as vLLM gives it.
            if params.include_stop_str_in_output and state.detokenizer is not None:
                state.text += state.detokenizer.add(token_id)
            self._stopped_by(request, token_id)
            return
        if state.detokenizer is not None:
            delta = state.detokenizer.add(token_id)
            if delta and self._check_stop_strings(request, state, delta):
                return
        if self.at_length_limit(request):
            request.status = RequestStatus.FINISHED_LENGTH

    def _stopped_by(self, request: Request, token_id: int) -> None:
        """Finished by a stop token id or an EOS: its id is the stop reason, but for the
        tokenizer's own EOS's (as vLLM reports them)."""
        request.status = RequestStatus.FINISHED_STOPPED
        if token_id in request.sampling_params.stop_token_ids or token_id != self.primary_eos:
            request.stop_reason = token_id

    def _position(self, entry: dict[int, tuple[float, int]], k: int) -> PositionLogprobs:
        """The user-facing logprobs of one position: its token (the first key) and the k most
        likely tokens, each with its text."""
        first = next(iter(entry))
        return {t: Logprob(lp, rank, self._token_text(t)) for t, (lp, rank) in entry.items()
                if t == first or rank <= k}

    def _token_text(self, token_id: int) -> str | None:
        if self._tokenizer is None or not 0 <= token_id < self._vocab_size:
            return None
        return self._tokenizer.decode([token_id])

    def at_length_limit(self, request: Request) -> bool:
        """Has the request as many tokens as it may have (``max_tokens``, ``max_model_len``)?"""
        # Per request and step, twice: lengths read directly rather than through properties.
        num_tokens = len(request.token_ids)
        return (num_tokens - len(request.prompt_token_ids) >= request.sampling_params.max_tokens
                or num_tokens >= self.max_model_len)

    @staticmethod
    def _check_stop_strings(request: Request, state: _TextState, delta: str) -> bool:
        params = request.sampling_params
        start = len(state.text)
        state.text += delta
        if not params.stop:
            return False
        # A stop string may straddle the previous text and this delta, but must end in the
        # delta: the text before was checked already, or came while min_tokens held stops off.
        best: tuple[int, str] | None = None
        for stop in params.stop:
            pos = state.text.find(stop, max(0, start - len(stop) + 1))
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
        logprobs = state.logprobs[:len(out_ids)] if state.logprobs is not None else None
        completion = CompletionOutput(
            index=0,
            text=text,
            token_ids=out_ids,
            finish_reason=request.status.finish_reason,
            stop_reason=request.stop_reason,
            new_text=new_text,
            new_token_ids=out_ids[state.num_emitted_tokens:],
            logprobs=logprobs,
            cumulative_logprob=state.cumulative_logprob if logprobs is not None else None,
            new_logprobs=logprobs[state.num_emitted_tokens:] if logprobs is not None else [],
            error=request.abort_error,
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
            prompt_logprobs=self._prompt_logprobs(request, state),
            embedding=request.embedding if finished else None,
            lora_request=request.lora_request,
        )

    def _prompt_logprobs(self, request: Request, state: _TextState
                         ) -> list[PositionLogprobs | None] | None:
        """The prompt's logprobs, in the request's first output (its prompt is computed by
        then), and again in the last."""
        if request.prompt_logprobs is None or (state.prompt_logprobs_sent
                                               and not request.is_finished):
            return None
        state.prompt_logprobs_sent = True
        k = request.sampling_params.prompt_logprobs
        return [None if e is None else self._position(e, k) for e in request.prompt_logprobs]
