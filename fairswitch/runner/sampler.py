"""Token sampling for a whole batch on the device, as vLLM defines each parameter.

    raw logits --> logprobs (asked-for rows: the sampled token's, its rank, the top k)
        |
        +--> logit_bias, min_tokens (EOS and stop ids masked), bad words, allowed token ids,
             penalties (repetition, frequency, presence: from the request's tokens), a
             grammar's mask (structured output: what may come next)
        +--> greedy rows: argmax
        +--> temperature, min_p, top-k, top-p --> random rows: exponential race

Random rows sample with the exponential-race trick (argmax of p / E, E ~ Exp(1)), which needs one
vector of noise per row: a request with a seed draws its noise from its own generator, so its
output does not depend on what else is in the batch. Every step is one set of batched tensor
operations whatever the mix of parameters; a stage runs only when some row needs it.

Penalties read the request's output tokens from the host, and a grammar has been fed them, so
they must all be known: the engine does not launch a step while one with such a request is in
flight (engine.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fairswitch.request import Request
from fairswitch.structured_output import holds


@dataclass
class SampledLogprobs:
    """Per sampled row (all rows of the step, when any asked): the sampled token's raw
    logprob and rank, and the ``k`` most likely tokens (k: the most any row asked for)."""
    token_logprobs: torch.Tensor  # [rows] float32
    token_ranks: torch.Tensor  # [rows] int64, 1 = most likely
    top_ids: torch.Tensor  # [rows, k]
    top_logprobs: torch.Tensor  # [rows, k]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> SampledLogprobs:
    """Logprobs of ``tokens`` (one per row) under raw ``logits``, with ranks and the top ``k``."""
    lp = logits.float().log_softmax(dim=-1)
    chosen = lp.gather(1, tokens[:, None]).squeeze(1)
    ranks = (lp > chosen[:, None]).sum(dim=-1) + 1
    top_lp, top_ids = lp.topk(k, dim=-1) if k else (lp[:, :0], tokens[:, None][:, :0])
    return SampledLogprobs(chosen, ranks, top_ids, top_lp)


class Sampler:
    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self._generator = torch.Generator(device=device).manual_seed(seed)
        self.eos_token_ids: set[int] = set()  # masked before min_tokens (set by the builder)
        self.grammars: Any = None  # structured output's GrammarCompiler (set by the engine)

    def sample(self, logits: torch.Tensor, requests: list[Request]
               ) -> tuple[torch.Tensor, SampledLogprobs | None]:
        """logits [num_requests, vocab] float32 -> one token id per request, on the logits'
        device (launched, not waited for), and the logprobs asked for (None if none were)."""
        raw, shaped, top = logits, False, -1
        for r in requests:  # (one pass: this runs every step)
            p = r.sampling_params
            shaped = shaped or p.shapes_logits
            if p.logprobs is not None and p.logprobs > top:
                top = p.logprobs
        if shaped:
            logits = self._shape(logits.clone(), requests)
        tokens = self._pick(logits, requests)
        if top < 0:
            return tokens, None
        return tokens, token_logprobs(raw, tokens, top)

    def _pick(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        params = [r.sampling_params for r in requests]
        if all(p.greedy for p in params):
            return logits.argmax(dim=-1)
        greedy_ids = logits.argmax(dim=-1)
        dev = logits.device
        # Above float32's largest value a temperature gives the uniform distribution that the
        # largest value gives: clamped so that it does not become inf (and -inf / inf NaN).
        top = torch.finfo(torch.float32).max
        temps = torch.tensor([min(p.temperature, top) if not p.greedy else 1.0 for p in params],
                             dtype=torch.float32, device=dev)
        logits = logits / temps[:, None]
        if any(p.min_p > 0.0 for p in params):
            probs = logits.softmax(dim=-1)
            min_ps = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=dev)
            floor = probs.amax(dim=-1, keepdim=True) * min_ps[:, None]
            logits = logits.masked_fill(probs < floor, float("-inf"))
        top_ks = [p.top_k if p.top_k > 0 else 0 for p in params]
        top_ps = [p.top_p for p in params]
        vocab = logits.shape[-1]
        if any(top_ks) or any(tp < 1.0 for tp in top_ps):
            ranked, order = logits.sort(dim=-1, descending=True)
            if any(top_ks):
                ks = torch.tensor([k or vocab for k in top_ks], device=dev)
                ranks = torch.arange(vocab, device=dev)
                ranked = ranked.masked_fill(ranks[None, :] >= ks[:, None], float("-inf"))
            if any(tp < 1.0 for tp in top_ps):
                probs = ranked.softmax(dim=-1)
                before = probs.cumsum(dim=-1) - probs  # mass of strictly better tokens
                # (a row without top_p masks nothing, not even where rounding reaches 1.0)
                ps = torch.tensor([tp if tp < 1.0 else 2.0 for tp in top_ps],
                                  dtype=torch.float32, device=dev)
                cut = before >= ps[:, None]
                cut[:, 0] = False  # the best token stays (a top_p below float32's least is 0)
                ranked = ranked.masked_fill(cut, float("-inf"))
            # Back in token order: each request's noise below is drawn over token ids, so a
            # seeded request's draws do not depend on whether a batch-mate asked for top-k/p.
            logits = torch.empty_like(ranked).scatter_(1, order, ranked)
        probs = logits.softmax(dim=-1)
        noise = torch.empty_like(probs)
        for i, req in enumerate(requests):
            noise[i].exponential_(generator=self._generator_of(req))
        picked = (probs / noise).argmax(dim=-1)
        is_greedy = torch.tensor([p.greedy for p in params], device=dev)
        return torch.where(is_greedy, greedy_ids, picked)

    def _shape(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """Logit bias, min_tokens, penalties and grammars, in place on a copy of the logits."""
        vocab = logits.shape[-1]
        rows: list[int] = []  # (row, token, value) to add, then to mask
        ids: list[int] = []
        values: list[float] = []
        masked_rows: list[int] = []
        masked_ids: list[int] = []
        for i, req in enumerate(requests):
            p = req.sampling_params
            for t, b in (p.logit_bias or {}).items():
                rows.append(i)
                ids.append(t)
                values.append(b)
            out: list[int] = []
            if req.bad_words_ids:  # the output's tail a word's lead may end (no placeholder)
                start = max(len(req.prompt_token_ids),
                            len(req.token_ids) - max(map(len, req.bad_words_ids)))
                out = [t for t in req.token_ids[start:] if t >= 0]
            for word in req.bad_words_ids:  # its last token, where the output leads to it
                *lead, last = word  # (the output: no placeholder, bad words need history)
                if last < vocab and (not lead or out[-len(lead):] == lead):
                    masked_rows.append(i)
                    masked_ids.append(last)
            # The placeholder of the token sampled now counts: tokens before it = count - 1.
            # (A grammar holding the reply decides when it may end: masking EOS too could leave
            # nothing. One not holding yet, a reasoning model's thinking, does not.)
            if req.num_output_tokens - 1 < p.min_tokens and not holds(req.grammar):
                stops = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids)
                for t in stops:
                    if t < vocab:
                        masked_rows.append(i)
                        masked_ids.append(t)
        dev = logits.device
        if rows:
            logits.index_put_((torch.tensor(rows, device=dev), torch.tensor(ids, device=dev)),
                              torch.tensor(values, dtype=logits.dtype, device=dev),
                              accumulate=True)
        if masked_rows:
            logits[torch.tensor(masked_rows, device=dev),
                   torch.tensor(masked_ids, device=dev)] = float("-inf")
        allowed = [i for i, r in enumerate(requests)
                   if r.sampling_params.allowed_token_ids is not None]
        if allowed:
            keep = torch.zeros((len(allowed), vocab), dtype=torch.bool, device=dev)
            for j, i in enumerate(allowed):
                req = requests[i]
                if req.allowed_ids is None:  # (made once: the list may be the vocabulary)
                    req.allowed_ids = torch.tensor(req.sampling_params.allowed_token_ids,
                                                   dtype=torch.long, device=dev)
                keep[j].index_fill_(0, req.allowed_ids, True)
            logits[allowed] = logits[allowed].masked_fill(~keep, float("-inf"))
        penalized = [i for i, r in enumerate(requests) if r.sampling_params.has_penalties]
        if penalized:
            logits[penalized] = self._penalize(logits[penalized],
                                               [requests[i] for i in penalized])
        held = [i for i, r in enumerate(requests) if r.grammar is not None]
        if held:  # last: only what the grammar allows is left, whatever the bias said
            self.grammars.apply(logits, held, [requests[i].grammar for i in held])
        return logits

    def _penalize(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """Repetition (prompt and output), frequency and presence (output) penalties."""
        vocab, dev = logits.shape[-1], logits.device
        outputs = [[t for t in r.output_token_ids if t >= 0] for r in requests]  # no placeholder
        counts = _token_counts([*outputs], vocab, dev)
        seen = counts > 0
        rep = torch.tensor([r.sampling_params.repetition_penalty for r in requests],
                           dtype=logits.dtype, device=dev)
        if bool((rep != 1.0).any()):
            in_prompt = _token_counts([r.prompt_token_ids for r in requests], vocab, dev) > 0
            hit = seen | in_prompt
            scaled = torch.where(logits > 0, logits / rep[:, None], logits * rep[:, None])
            logits = torch.where(hit, scaled, logits)
        freq = torch.tensor([r.sampling_params.frequency_penalty for r in requests],
                            dtype=logits.dtype, device=dev)
        pres = torch.tensor([r.sampling_params.presence_penalty for r in requests],
                            dtype=logits.dtype, device=dev)
        return logits - freq[:, None] * counts.to(logits.dtype) - pres[:, None] * seen

    def _generator_of(self, req: Request) -> torch.Generator:
        """The shared generator, or a seeded request's own, seeded for the output position
        being sampled (the last token, a placeholder now): a draw depends on (seed, position)
        only, so a step lost to an error (``Scheduler.revert``) draws the same again."""
        seed = req.sampling_params.seed
        if seed is None:
            return self._generator
        if req.generator is None:
            req.generator = torch.Generator(device=self.device)
        return req.generator.manual_seed(position_seed(seed, req.num_output_tokens - 1))


_M64 = 2**64 - 1


def position_seed(seed: int, position: int) -> int:
    """A 64-bit seed for a request's draw at an output position: distinct for the positions of
    one seed, and for the copies of an ``n`` request (seeds seed, seed + 1, ...).

    Mixed (splitmix64's finalizer) so that every bit of the seed reaches the low 32: the CPU
    generator (mt19937) keeps only those, and seeds such as -1 and 2**63 - 1, equal below bit 63
    once multiplied, drew the same tokens there."""
    z = (seed * 0x9E3779B97F4A7C15 + position) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _token_counts(token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[rows, vocab] occurrences of each token id in each row's list (one scatter)."""
    width = max(1, max(map(len, token_lists), default=1))
    padded = torch.full((len(token_lists), width), vocab, dtype=torch.long)
    for i, ids in enumerate(token_lists):
        if ids:
            padded[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    padded = padded.to(device, non_blocking=True)
    counts = torch.zeros(len(token_lists), vocab + 1, dtype=torch.int32, device=device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.int32))
    return counts[:, :vocab]
