"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds.

Random rows sample with the exponential-race trick (argmax of p / E, E ~ Exp(1)), which needs one
vector of noise per row: a request with a seed draws its noise from its own generator, so its
output does not depend on what else is in the batch.
"""

from __future__ import annotations

import torch

from fairswitch.request import Request


class Sampler:
    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self._generator = torch.Generator(device=device).manual_seed(seed)

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """logits [num_requests, vocab] float32 -> one token id per request, on the logits'
        device: launched, not waited for."""
        params = [r.sampling_params for r in requests]
        if all(p.greedy for p in params):
            return logits.argmax(dim=-1)
        greedy_ids = logits.argmax(dim=-1)
        temps = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params],
                             dtype=torch.float32, device=logits.device)
        logits = logits / temps[:, None]
        top_ks = [p.top_k if p.top_k > 0 else 0 for p in params]
        top_ps = [p.top_p for p in params]
        vocab = logits.shape[-1]
        if any(top_ks) or any(tp < 1.0 for tp in top_ps):
            logits, order = logits.sort(dim=-1, descending=True)
            if any(top_ks):
                ks = torch.tensor([k or vocab for k in top_ks], device=logits.device)
                ranks = torch.arange(vocab, device=logits.device)
                logits = logits.masked_fill(ranks[None, :] >= ks[:, None], float("-inf"))
            if any(tp < 1.0 for tp in top_ps):
                probs = logits.softmax(dim=-1)
                before = probs.cumsum(dim=-1) - probs  # mass of strictly better tokens
                ps = torch.tensor(top_ps, dtype=torch.float32, device=logits.device)
                logits = logits.masked_fill(before >= ps[:, None], float("-inf"))
        else:
            order = None
        probs = logits.softmax(dim=-1)
        noise = torch.empty_like(probs)
        for i, req in enumerate(requests):
            noise[i].exponential_(generator=self._generator_of(req))
        picked = (probs / noise).argmax(dim=-1)
        if order is not None:
            picked = order.gather(1, picked[:, None]).squeeze(1)
        is_greedy = torch.tensor([p.greedy for p in params], device=logits.device)
        return torch.where(is_greedy, greedy_ids, picked)

    def _generator_of(self, req: Request) -> torch.Generator:
        seed = req.sampling_params.seed
        if seed is None:
            return self._generator
        if req.generator is None:
            req.generator = torch.Generator(device=self.device).manual_seed(seed)
        return req.generator
