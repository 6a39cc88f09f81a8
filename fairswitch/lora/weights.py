"""LoRA adapters on the device: ``max_loras`` slots in every adapted projection, and each token
of a step picks the slot of its request's adapter (or none).

An adapted projection holds its slots' A and B stacked, for all its parts (q|k|v, gate|up) and
slots at the largest rank R, zero-padded:

    a  [parts * slots * R, in]      rows (part p, slot k) at (p * slots + k) * R
    b  [out, parts * slots * R]     the same columns; a part's columns are zero outside its rows

and a step adds ``(mask ? x @ a.T : 0) @ b.T`` to the projection's output, where ``mask`` keeps,
for each token, the columns of its own slot: two small matmuls whose shapes never depend on
which adapters a step mixes (so CUDA graphs capture them), exact for every token (a token
without an adapter has a zero mask row). Under tensor parallelism a rank's slots hold its share:
column-parallel layers (qkv, gate_up) split b's rows as their weight's, row-parallel ones
(o_proj, down_proj) split a's columns, and their partial outputs are summed with the
projection's own.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from fairswitch.distributed.shard_plan import Shard
from fairswitch.lora.adapter import NUM_PARTS, LoRAAdapter, part_shapes


class LoRALayer:
    """One adapted projection's slots (plain tensors, not parameters: the loader and the dummy
    fill see only the base model's)."""

    def __init__(self, state: LoRAState, layer_idx: int, module: str, weight: torch.Tensor,
                 shard: Shard | None, parts: list[int]) -> None:
        self.state = state
        self.layer_idx = layer_idx
        self.module = module
        self.parts = parts  # TP=1 output rows of each part
        self.shard = shard
        out_local, in_local = weight.shape
        width = len(parts) * state.max_loras * state.max_rank
        # (the model's dtype: a quantized projection's weight is fp8)
        self.a = torch.zeros(width, in_local, dtype=state.dtype, device=weight.device)
        self.b = torch.zeros(out_local, width, dtype=state.dtype, device=weight.device)

    def _cols(self, part: int, slot: int) -> slice:
        start = (part * self.state.max_loras + slot) * self.state.max_rank
        return slice(start, start + self.state.max_rank)

    def set_slot(self, slot: int, adapter: LoRAAdapter | None) -> None:
        """Slot ``slot`` holds ``adapter``'s weights for this projection (zeros where it does
        not adapt it; all zeros for None)."""
        shard = self.shard
        for part, rows in enumerate(self.parts):
            cols = self._cols(part, slot)
            self.a[cols].zero_()
            self.b[:, cols].zero_()
            ab = adapter.weights.get((self.layer_idx, self.module, part)) if adapter else None
            if ab is None:
                continue
            a, b = ab
            r = a.shape[0]
            a_rows, b_cols = self.a[cols][:r], self.b[:, cols][:, :r]
            if shard is not None and shard.dim == 1:  # row-parallel: this rank's input columns
                for local, offset, n in shard.overlaps(0, shard.full_size):
                    a_rows[:, local:local + n].copy_(a[:, offset:offset + n])
                b_cols.copy_(b)
                continue
            a_rows.copy_(a)
            start = sum(self.parts[:part])
            if shard is None:
                b_cols[start:start + rows].copy_(b)
                continue
            for local, offset, n in shard.overlaps(start, rows):  # this rank's output rows
                b_cols[local:local + n].copy_(b[offset:offset + n])

    def add_to(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """``y += `` each token's adapter's product (a no-op when no token of the step has one:
        the mask is then None)."""
        mask = self.state.mask
        if mask is None:
            return
        xa = (x @ self.a.t()).view(len(x), len(self.parts), -1)
        # (where, not a product: another slot's inf times 0 would be NaN in this token's row)
        xa = torch.where(mask.unsqueeze(1), xa, 0.0).view(len(x), -1)
        y.addmm_(xa, self.b.t())


class LoRAState:
    """The model's slots and the step's token -> slot mask; ``begin`` sets the mask at the top
    of each forward (from a device tensor of slot ids, -1 for a token without an adapter)."""

    def __init__(self, max_loras: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.dtype = dtype
        # The slot of each of a part's columns.
        self.col_slot = torch.arange(max_loras * max_rank, device=device) // max_rank
        self.layers: list[LoRALayer] = []
        self.mask: torch.Tensor | None = None  # [tokens, slots * R] bool

    def begin(self, token_slots: torch.Tensor | None) -> None:
        self.mask = None if token_slots is None else token_slots.unsqueeze(1) == self.col_slot

    def set_slot(self, slot: int, adapter: LoRAAdapter | None) -> None:
        """Copy ``adapter`` into slot ``slot`` of every projection, in stream order: on CUDA its
        weights go over once from pinned memory without the host waiting, then are placed by
        device copies (a pageable copy per piece would wait for the steps in flight)."""
        if adapter is not None and self.col_slot.is_cuda:
            adapter = dataclasses.replace(adapter, weights={
                key: tuple(t.pin_memory().to(self.col_slot.device, non_blocking=True)
                           for t in ab) for key, ab in adapter.weights.items()})
        for layer in self.layers:
            layer.set_slot(slot, adapter)


def attach_lora(model: Any, max_loras: int, max_rank: int) -> LoRAState:
    """Give every adapted projection of ``model`` its slots (all empty); returns the state the
    model's forward sets each step (``model.lora``)."""
    weight = model.embed_tokens
    state = LoRAState(max_loras, max_rank, weight.dtype, weight.device)
    shapes = part_shapes(model.config)
    for idx, layer in enumerate(model.layers):
        for name, (_, parts) in shapes.items():
            linear = layer.get_submodule(name)
            assert len(parts) == NUM_PARTS[name]
            linear.lora = LoRALayer(state, idx, name, linear.weight, linear.shard, parts)
            state.layers.append(linear.lora)
    model.lora = state
    return state
