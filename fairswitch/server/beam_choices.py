"""A request's choices by beam search (vLLM's ``use_beam_search``): prompt p's ``n`` best beams,
best first, are its choices p * n + j, each handed over once, finished, when its search ends
(engine/beam_search.py). Every step's one-token generations, all prompts' beams, run at once;
closing the stream (the response failed, or its client went away) aborts the step in flight.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from typing import Any

from fairswitch.engine.async_engine import AsyncEngine
from fairswitch.engine.beam_search import BeamSearch, BeamSearchParams, advance_all
from fairswitch.outputs import CompletionOutput, RequestOutput
from fairswitch.server.choices import Prompt, all_or_none, last_output


async def beam_outputs(engine: AsyncEngine, prompts: list[tuple[Prompt, BeamSearchParams]],
                       request_id: str, *, stopping: Callable[[], bool] = lambda: False,
                       on_step: Callable[[list[str]], None] = lambda ids: None,
                       **scheduling: Any) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Each prompt's beams as finished outputs (``prompt.params``: how their text is
    decoded); ``scheduling``: ``priority`` and ``client_id`` of every step's requests.
    ``on_step``: the engine request ids of each step, as it starts (the server's shutdown
    aborts them); ``stopping()``: no further step starts. A step the engine aborts, or a search
    stopped, ends the stream with an aborted output (finish_reason "abort")."""
    core = engine.engine
    searches = [BeamSearch(prompt.ids, params, core.output_processor.eos_token_ids)
                for prompt, params in prompts]

    async def step(tokens: list[int], params: BeamSearchParams, rid: str) -> RequestOutput:
        return await last_output(engine.generate(
            None, params.step_params(), request_id=rid, prompt_token_ids=tokens,
            held_by=request_id, **scheduling))

    # A place in the waiting queue for every beam for the whole search (QueueFullError now, if
    # there is no room): no step meets a full queue partway.
    try:  # (cancelled while reserving, the reservation may have been made: released too)
        await engine.reserve_places(request_id, sum(params.beam_width for _, params in prompts))
        counter = itertools.count()
        while live := [s for s in searches if not s.finished]:
            beams = [(s, beam) for s in live for beam in s.live]
            rids = [f"{request_id}-beam{next(counter)}" for _ in beams]
            if stopping():
                yield 0, _aborted(request_id, prompts[0][0])
                return
            on_step(rids)
            outs = await all_or_none(step(beam.tokens, s.params, rid)
                                     for (s, beam), rid in zip(beams, rids))
            if aborted := [out for out in outs if out.outputs[0].finish_reason == "abort"]:
                yield 0, aborted[0]
                return
            advance_all(live, outs)
    finally:
        engine.release_places(request_id)
    for p, ((prompt, params), s) in enumerate(zip(prompts, searches)):
        best = s.best()
        if len(best) < params.beam_width:
            raise RuntimeError(f"beam search found {len(best)} beams for {params.beam_width}")
        for j, beam in enumerate(best):
            out_ids = s.generated(beam)
            text = core.tokenizer.decode(
                out_ids, skip_special_tokens=prompt.params.skip_special_tokens)
            yield p * params.beam_width + j, RequestOutput(
                request_id=request_id, prompt=prompt.text, prompt_token_ids=prompt.ids,
                outputs=[CompletionOutput(
                    index=0, text=text, token_ids=out_ids, finish_reason=beam.finish_reason,
                    stop_reason=beam.stop_reason, new_text=text, new_token_ids=out_ids,
                    cumulative_logprob=beam.cum_logprob)],
                finished=True)


def _aborted(request_id: str, prompt: Prompt) -> RequestOutput:
    return RequestOutput(request_id=request_id, prompt=prompt.text, prompt_token_ids=prompt.ids,
                         outputs=[CompletionOutput(index=0, text="", token_ids=[],
                                                   finish_reason="abort")],
                         finished=True)
