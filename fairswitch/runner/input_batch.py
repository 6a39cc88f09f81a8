"""Host-side inputs of one step, built from the scheduled requests (no device work here).

Layout (decodes first, then prefill chunks; no padding):

    input_ids:    [ d0 d1 ... dN-1 | p0 p0 p0 p0 | p1 p1 ... ]
    positions:    each token's position in its request
    slot_mapping: each token's KV slot = block_table[pos // block_size] * block_size + pos % bs

An input token that the step in flight is still sampling (a request's last token, a placeholder:
engine.py) is listed in ``feed_rows`` / ``feed_requests``: the runner fills it in on the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fairswitch.request import Request
from fairswitch.scheduler.scheduler import SchedulerOutput


@dataclass(slots=True)
class InputBatch:
    input_ids: np.ndarray  # [num_tokens] int64
    positions: np.ndarray  # [num_tokens] int64
    slot_mapping: np.ndarray  # [num_tokens] int64
    num_decodes: int
    decode_block_tables: np.ndarray  # [num_decodes, width] int32
    decode_seq_lens: np.ndarray  # [num_decodes] int32
    prefill_block_tables: np.ndarray  # [num_prefills, width] int32
    prefill_query_start_loc: np.ndarray  # [num_prefills + 1] int32
    prefill_seq_lens: np.ndarray  # [num_prefills] int32
    sample_rows: list[int]  # rows of the hidden states to sample from
    sample_requests: list[Request]
    # Rows whose input token is the one the step in flight samples for that request.
    feed_rows: list[int] = field(default_factory=list)
    feed_requests: list[Request] = field(default_factory=list)
    # Prompt logprobs (SamplingParams.prompt_logprobs): rows whose logits predict a prompt
    # token, and (request, that token's position).
    prompt_logprob_rows: list[int] = field(default_factory=list)
    prompt_logprob_at: list[tuple[Request, int]] = field(default_factory=list)
    # Each token's LoRA slot (-1: none), int64; None when no token of the step has an adapter.
    lora_slots: np.ndarray | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def is_decode_only(self) -> bool:
        return self.num_decodes == len(self.input_ids)


def block_table_array(tables: list[list[int]], width: int | None = None) -> np.ndarray:
    return _stack([np.asarray(t, dtype=np.int32) for t in tables], width)


def _stack(rows: list[np.ndarray], width: int | None = None) -> np.ndarray:
    width = width or max((len(r) for r in rows), default=1)
    arr = np.zeros((len(rows), max(width, 1)), dtype=np.int32)
    for i, r in enumerate(rows):
        arr[i, : len(r)] = r
    return arr


def _table_row(req: Request) -> np.ndarray:
    """The request's block table as int32, converted incrementally: block tables only grow by
    ``extend`` or are replaced by a new list, so a mirror of the same list object with fewer
    entries is a valid prefix (list -> array for every row of every step cost ~3 us each)."""
    table, cached = req.block_table, req.block_table_array
    if cached is not None and cached[0] is table and len(cached[1]) == len(table):
        return cached[1]
    if cached is not None and cached[0] is table and len(cached[1]) < len(table):
        arr = np.concatenate([cached[1], np.asarray(table[len(cached[1]):], dtype=np.int32)])
    else:
        arr = np.asarray(table, dtype=np.int32)
    req.block_table_array = (table, arr)
    return arr


def _prompt_logprob_rows(req: Request, start: int, n: int, first_row: int,
                         rows: list[int], at: list[tuple[Request, int]]) -> None:
    """Rows of a chunk (positions ``start``..) whose logits predict the prompt's next token."""
    if req.prompt_logprobs is None:
        return
    for p in range(start, min(start + n, req.num_prompt_tokens - 1)):
        rows.append(first_row + p - start)
        at.append((req, p + 1))


def build_input_batch(out: SchedulerOutput, block_size: int,
                      placeholder: int | None = None) -> InputBatch:
    """The inputs of step ``out`` (each chunk from where it starts; the requests may have
    advanced past it since); tokens equal to ``placeholder`` (a request's last token only) are
    listed as rows to feed from the step in flight."""
    decodes = [(r, p, x) for r, p, n, x in out.chunks() if n == 1]
    prefills = [(r, p, n, x) for r, p, n, x in out.chunks() if n != 1]
    nd = len(decodes)
    ids: list[int] = []
    pos: list[int] = []
    slots: list[int] = []
    sample_rows: list[int] = []
    sample_reqs: list[Request] = []
    feed_rows: list[int] = []
    feed_reqs: list[Request] = []
    lp_rows: list[int] = []
    lp_at: list[tuple[Request, int]] = []
    # Decodes: one token each, plain Python is cheaper than numpy for single elements.
    for req, p, samples in decodes:
        token = req.token_ids[p]
        if token == placeholder:
            feed_rows.append(len(ids))
            feed_reqs.append(req)
        ids.append(token)
        pos.append(p)
        slots.append(req.block_table[p // block_size] * block_size + p % block_size)
        if samples:
            sample_rows.append(len(ids) - 1)
            sample_reqs.append(req)
        if req.prompt_logprobs is not None:  # (a one-token chunk of a prompt)
            _prompt_logprob_rows(req, p, 1, len(ids) - 1, lp_rows, lp_at)
    input_ids = np.array(ids, dtype=np.int64)
    positions = np.array(pos, dtype=np.int64)
    slot_mapping = np.array(slots, dtype=np.int64)
    decode_seq_lens = (positions + 1).astype(np.int32)
    if prefills:
        chunk_ids, chunk_pos, chunk_slots = [input_ids], [positions], [slot_mapping]
        offset = nd
        for req, start, n, samples in prefills:
            end = start + n
            p = np.arange(start, end, dtype=np.int64)
            table = np.asarray(req.block_table, dtype=np.int64)
            chunk_ids.append(np.asarray(req.token_ids[start:end], dtype=np.int64))
            chunk_pos.append(p)
            chunk_slots.append(table[p // block_size] * block_size + p % block_size)
            _prompt_logprob_rows(req, start, n, offset, lp_rows, lp_at)
            offset += n
            if placeholder is not None and req.token_ids[end - 1] == placeholder:
                feed_rows.append(offset - 1)
                feed_reqs.append(req)
            if samples:
                sample_rows.append(offset - 1)
                sample_reqs.append(req)
        input_ids = np.concatenate(chunk_ids)
        positions = np.concatenate(chunk_pos)
        slot_mapping = np.concatenate(chunk_slots)
    query_lens = [n for _, _, n, _ in prefills]
    lora_slots = None
    if any(r.lora_slot >= 0 for r, _ in out.scheduled):
        lora_slots = np.repeat(
            np.array([r.lora_slot for r, _, _ in decodes] + [r.lora_slot for r, *_ in prefills],
                     dtype=np.int64),
            [1] * nd + query_lens)
    return InputBatch(
        input_ids=input_ids,
        positions=positions,
        slot_mapping=slot_mapping,
        num_decodes=nd,
        decode_block_tables=_stack([_table_row(r) for r, _, _ in decodes]),
        decode_seq_lens=decode_seq_lens,
        prefill_block_tables=block_table_array([r.block_table for r, _, _, _ in prefills]),
        prefill_query_start_loc=np.concatenate([[0], np.cumsum(query_lens)]).astype(np.int32),
        prefill_seq_lens=np.array([p + n for _, p, n, _ in prefills], dtype=np.int32),
        sample_rows=sample_rows,
        sample_requests=sample_reqs,
        feed_rows=feed_rows,
        feed_requests=feed_reqs,
        prompt_logprob_rows=lp_rows,
        prompt_logprob_at=lp_at,
        lora_slots=lora_slots,
    )
