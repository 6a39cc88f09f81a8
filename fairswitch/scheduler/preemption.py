"""Per-victim choice of how to preempt: swap the KV to the CPU, or drop it and recompute later.

Cost model: swapping moves the blocks not yet saved out and every block back in over the host
link; recomputing prefills every computed token again. Pick the cheaper; recompute when there is
no swap space, the CPU pool cannot take the request, or the context is too short to be worth a
switch. ``mode`` can force either (a forced swap still recomputes while the CPU pool is full;
the config refuses it with no swap space at all).

Both rates are measured on the machine: the link by a probe copy when the swap space is set up
(``SwapManager.probe_link``, run by ``KVMemory``), prefill throughput from the engine's
prefill-heavy steps (a moving average, ``Scheduler.observe_step``). The configured values are only
where they start.
"""

from __future__ import annotations

from dataclasses import dataclass

from fairswitch.kv.no_swap import NoSwapSpace
from fairswitch.kv.swap_manager import SwapManager
from fairswitch.request import Request

SWAP, RECOMPUTE = "swap", "recompute"
MODES = ("auto", SWAP, RECOMPUTE)


@dataclass
class PreemptionPolicy:
    mode: str = "auto"
    link_bytes_per_s: float = 25e9  # host link, one direction
    prefill_tokens_per_s: float = 20_000.0
    min_swap_tokens: int = 1  # contexts shorter than this are always recomputed

    num_link_samples: int = 0
    num_prefill_samples: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"preemption_mode must be one of {MODES}, got {self.mode!r}")

    def observe_link(self, nbytes: int, seconds: float) -> None:
        if seconds > 0:  # a clock too coarse for the copy tells nothing
            self.link_bytes_per_s = _average(self.link_bytes_per_s, nbytes / seconds,
                                             self.num_link_samples)
            self.num_link_samples += 1

    def observe_prefill(self, num_tokens: int, seconds: float) -> None:
        if seconds > 0:
            self.prefill_tokens_per_s = _average(self.prefill_tokens_per_s,
                                                 num_tokens / seconds, self.num_prefill_samples)
            self.num_prefill_samples += 1

    def swap_seconds(self, req: Request, swap: SwapManager) -> float:
        blocks_out = swap.swap_out_blocks(req)
        blocks_in = swap.gpu.blocks_needed(req.num_computed_tokens)
        return (blocks_out + blocks_in) * swap.block_bytes / self.link_bytes_per_s

    def recompute_seconds(self, req: Request) -> float:
        return req.num_computed_tokens / self.prefill_tokens_per_s

    def choose(self, req: Request, swap: SwapManager | NoSwapSpace) -> str:
        if self.mode == RECOMPUTE or req.num_computed_tokens == 0:
            return RECOMPUTE
        if not swap.can_swap_out(req):
            return RECOMPUTE  # no swap space, or the CPU pool is full
        if self.mode == SWAP:
            return SWAP
        if req.num_computed_tokens < self.min_swap_tokens:
            return RECOMPUTE
        return SWAP if self.swap_seconds(req, swap) < self.recompute_seconds(req) else RECOMPUTE


def _average(current: float, sample: float, num_samples: int, weight: float = 0.2) -> float:
    """The first measurement replaces the configured prior; later ones move an average."""
    return sample if num_samples == 0 else (1 - weight) * current + weight * sample
