"""A request's choices by beam search (vLLM's ``use_beam_search``): prompt p's ``n`` best beams,
best first, are its choices p * n + j, each handed over once, finished, when its search ends
(engine/beam_search.py). Every step's one-token generations, all prompts' beams, run at once;
closing the stream (the response failed, or its client went away) aborts the step in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from typing import Any

from fairswitch.engine.async_engine import AsyncEngine
from fairswitch.engine.beam_search import BeamSearch, BeamSearchParams
from fairswitch.outputs import CompletionOutput, RequestOutput
from fairswitch.server.choices import Prompt


async def beam_outputs(engine: AsyncEngine, prompts: list[tuple[Prompt, BeamSearchParams]],
                       request_id: str, **scheduling: Any
                       ) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Each prompt's beams as finished outputs (``prompt.params``: how their text is
    decoded); ``scheduling``: ``priority`` and ``client_id`` of every step's requests."""
    core = engine.engine
    searches = [BeamSearch(prompt.ids, params, core.output_processor.eos_token_ids)
                for prompt, params in prompts]
    ids = itertools.count()

    async def step(tokens: list[int], params: BeamSearchParams) -> dict[int, float]:
        last = None
        async with contextlib.aclosing(engine.generate(
                None, params.step_params(), request_id=f"{request_id}-beam{next(ids)}",
                prompt_token_ids=tokens, **scheduling)) as outputs:
            async for last in outputs:
                pass
        if last is None or last.outputs[0].finish_reason == "abort":
            raise RuntimeError("a beam search step was aborted by the engine")
        return {token: lp.logprob for token, lp in last.outputs[0].logprobs[0].items()}

    while live := [s for s in searches if not s.finished]:
        tasks = [asyncio.ensure_future(step(beam.tokens, s.params))
                 for s in live for beam in s.live]
        try:
            found = iter(await asyncio.gather(*tasks))
        except BaseException:  # one failed, or this was cancelled: abort the step's others
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        for s in live:
            s.advance([next(found) for _ in s.live])
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
                    new_text=text, new_token_ids=out_ids, cumulative_logprob=beam.cum_logprob)],
                finished=True)
