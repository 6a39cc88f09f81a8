"""Per-request parameters of an embedding (vLLM's ``PoolingParams``): the hidden state of the
prompt's last token after the model's final norm (last-token pooling, what decoder embedding
models such as Qwen3-Embedding are trained for), cut to its first ``dimensions`` values
(Matryoshka models) and scaled to unit length unless ``normalize`` is False."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PoolingParams:
    normalize: bool = True
    dimensions: int | None = None  # None: all of the hidden size

    def __post_init__(self) -> None:
        if not isinstance(self.normalize, bool):
            raise TypeError(f"normalize must be a bool, got {self.normalize!r}")
        if self.dimensions is not None and (
                isinstance(self.dimensions, bool) or not isinstance(self.dimensions, int)
                or self.dimensions < 1):
            raise ValueError(f"dimensions must be a positive integer or None, got "
                             f"{self.dimensions!r}")


def pair_scores(first: list[list[float]], second: list[list[float]]) -> list[float]:
    """The cosine similarity of each pair of embeddings (at unit length): the one ``first``
    against each ``second``, or pairwise (``LLM.score``, the server's /score and /rerank)."""
    pairs = zip(first * len(second) if len(first) == 1 else first, second)
    return [sum(x * y for x, y in zip(a, b)) for a, b in pairs]
