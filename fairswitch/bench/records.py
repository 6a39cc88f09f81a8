"""What a replay client records per request; metrics are computed from these alone.

Times are seconds on one monotonic clock, relative to the start of the replay. ``token_times_s``
holds the arrival time of every streamed output token (a chunk carrying k tokens contributes k
entries at the same time, so TBT gaps are per token, as DESIGN.md defines them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    conversation_id: str
    turn: int
    client: str
    priority: int
    arrival_s: float          # when the request was sent
    prompt_tokens: int = 0
    token_times_s: list[float] = field(default_factory=list)
    end_s: float | None = None  # when the response completed (or failed)
    error: str | None = None    # None = success
    cached_tokens: int = 0      # prompt tokens served from reused KV, when the engine reports it

    @property
    def ok(self) -> bool:
        return self.error is None and self.end_s is not None and len(self.token_times_s) > 0

    @property
    def output_tokens(self) -> int:
        return len(self.token_times_s)

    @property
    def ttft_s(self) -> float | None:
        return self.token_times_s[0] - self.arrival_s if self.token_times_s else None

    @property
    def e2e_s(self) -> float | None:
        return None if self.end_s is None else self.end_s - self.arrival_s

    @property
    def tbt_gaps_s(self) -> list[float]:
        t = self.token_times_s
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def tpot_s(self) -> float | None:
        """(E2E - TTFT) / (n_out - 1); None for fewer than two output tokens."""
        if not self.ok or self.output_tokens < 2:
            return None
        return (self.token_times_s[-1] - self.token_times_s[0]) / (self.output_tokens - 1)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> RequestRecord:
        return cls(**obj)
