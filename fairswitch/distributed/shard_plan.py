"""Which slice of every weight a tensor-parallel rank holds (Megatron-style), as plain arithmetic.

Column-parallel layers split their output rows, row-parallel layers their input columns; the
vocabulary splits by rows, padded up to a multiple of the group size:

    qkv_proj   rows [ q heads | k heads | v heads ]  rank r: its q heads | k heads | v heads
    o_proj     cols [ q heads ]                       rank r: its q heads' columns, then reduce
    gate_up    rows [ gate | up ]                     rank r: its gate rows | its up rows
    down_proj  cols [ intermediate ]                  rank r: the same columns, then reduce
    embedding  rows [ vocab | pad ]                   rank r: rows [r * per_rank, (r+1) * per_rank)
    lm_head    rows [ vocab | pad ]                   rank r: as the embedding, then gather

A ``Shard`` describes one local parameter as pieces of the TP=1 tensor along one dim. The model
sizes its layers from it; the loader copies the pieces out of the checkpoint tensors or out of the
TP=1 dummy tensors, so every rank holds exactly a slice of what a single device would hold.

With more ranks than KV heads (a multiple of them), each rank holds one KV head, replicated:
rank r holds KV head r * num_kv_heads // N, the one its query heads attend with under GQA.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Shard:
    dim: int  # 0: output rows (column-parallel, vocabulary), 1: input columns (row-parallel)
    full_size: int  # the TP=1 parameter's size along dim
    pieces: tuple[tuple[int, int], ...]  # (start in the TP=1 tensor, length), laid end to end
    size: int  # the local size along dim; rows past the pieces are zero padding

    @classmethod
    def whole(cls, size: int) -> Shard:
        """All of a dim of ``size``: what every rank holds of a replicated tensor."""
        return cls(0, size, ((0, size),), size)

    @property
    def is_whole(self) -> bool:
        return self.size == self.full_size and self.pieces == ((0, self.full_size),)

    def full_shape(self, local_shape: tuple[int, ...]) -> tuple[int, ...]:
        shape = list(local_shape)
        shape[self.dim] = self.full_size
        return tuple(shape)

    def overlaps(self, start: int, length: int) -> Iterator[tuple[int, int, int]]:
        """``(local offset, offset into the range, length)`` of every piece's overlap with the
        range ``[start, start + length)`` of the TP=1 dim (one of a fused tensor's parts)."""
        local = 0
        for p_start, p_len in self.pieces:
            lo, hi = max(p_start, start), min(p_start + p_len, start + length)
            if lo < hi:
                yield local + lo - p_start, lo - start, hi - lo
            local += p_len

    @property
    def padding(self) -> tuple[int, int]:
        """``(local offset, length)`` of the zero rows after the pieces."""
        used = sum(length for _, length in self.pieces)
        return used, self.size - used


def _split(dim: int, full_size: int, *pieces: tuple[int, int]) -> Shard:
    return Shard(dim, full_size, tuple(pieces), sum(length for _, length in pieces))


@dataclass(frozen=True)
class ShardPlan:
    """Rank ``rank`` of ``size``: its local head counts and the shards of attention and vocabulary
    (the MLP's come from ``split_intermediate``, which needs only the intermediate size)."""
    rank: int
    size: int
    head_dim: int
    total_heads: int
    total_kv_heads: int
    num_heads: int  # local query heads
    num_kv_heads: int  # local KV heads (1, replicated, with more ranks than KV heads)
    vocab_size: int  # the real vocabulary (logits are cut back to it)
    vocab_per_rank: int  # ceil(vocab_size / size): the local embedding / lm_head rows

    @classmethod
    def of(cls, config: Any, tp_size: int, rank: int = 0) -> ShardPlan:
        """Validates that ``config`` (a CheckpointConfig) splits over ``tp_size`` ranks."""
        n = tp_size
        if n < 1 or not 0 <= rank < n:
            raise ValueError(f"tensor-parallel rank {rank} of {n} does not exist")
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        if heads % n:
            raise ValueError(f"num_attention_heads={heads} is not divisible by "
                             f"tensor_parallel_size={n}")
        if n <= kv_heads and kv_heads % n:
            raise ValueError(f"num_key_value_heads={kv_heads} is not divisible by "
                             f"tensor_parallel_size={n}")
        if n > kv_heads and n % kv_heads:
            raise ValueError(f"tensor_parallel_size={n} is larger than num_key_value_heads="
                             f"{kv_heads} but not a multiple of it (KV heads are replicated)")
        split_intermediate(config.intermediate_size, rank, n)  # raises if it does not divide
        if getattr(config, "moe", None) is not None:  # (each expert splits as the MLP)
            split_intermediate(config.moe.intermediate_size, rank, n, "the experts' intermediate")
        return cls(rank=rank, size=n, head_dim=config.head_dim, total_heads=heads,
                   total_kv_heads=kv_heads, num_heads=heads // n,
                   num_kv_heads=max(1, kv_heads // n), vocab_size=config.vocab_size,
                   vocab_per_rank=-(-config.vocab_size // n))

    @property
    def q_head_start(self) -> int:
        return self.rank * self.num_heads

    @property
    def kv_head_start(self) -> int:
        # Divided or replicated alike: the KV head of the rank's first query head.
        return self.rank * self.total_kv_heads // self.size

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab_per_rank

    def qkv(self) -> Shard:
        d, q_full, kv_full = self.head_dim, self.total_heads, self.total_kv_heads
        q = (self.q_head_start * d, self.num_heads * d)
        k = ((q_full + self.kv_head_start) * d, self.num_kv_heads * d)
        v = ((q_full + kv_full + self.kv_head_start) * d, self.num_kv_heads * d)
        return _split(0, (q_full + 2 * kv_full) * d, q, k, v)

    def attn_out(self) -> Shard:
        d = self.head_dim
        return _split(1, self.total_heads * d, (self.q_head_start * d, self.num_heads * d))

    def vocab(self) -> Shard:
        real = min(self.vocab_per_rank, max(0, self.vocab_size - self.vocab_start))
        return Shard(0, self.vocab_size, ((self.vocab_start, real),), self.vocab_per_rank)


def split_intermediate(intermediate: int, rank: int, size: int,
                       name: str = "intermediate_size") -> tuple[Shard, Shard]:
    """The MLP's ``(gate_up_proj, down_proj)`` shards: the rank's slice of the intermediate dim,
    taken from the gate half and from the up half of the fused projection alike."""
    if intermediate % size:
        raise ValueError(f"{name}={intermediate} is not divisible by "
                         f"tensor_parallel_size={size}")
    local = intermediate // size
    start = rank * local
    return (_split(0, 2 * intermediate, (start, local), (intermediate + start, local)),
            _split(1, intermediate, (start, local)))


def local_kv_heads(config: Any, tp_size: int) -> int:
    """KV heads each rank's cache holds (the KV layout's ``num_kv_heads`` under TP)."""
    return ShardPlan.of(config, tp_size).num_kv_heads
