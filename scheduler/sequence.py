"""One request's state inside the scheduler."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from slabserve.scheduler.api import FinishReason, Request, SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """Tokens ``prompt + output``; the first ``num_computed`` of them have K/V in
    ``blocks`` (the leading ``registered`` of which may be shared with other sequences
    through the prefix cache).  A sequence whose ``num_computed == len(tokens) - 1`` is decoding;
    one further behind is prefilling (a new prompt, or a recompute after preemption)."""

    request_id: str
    prompt: tuple[int, ...]
    params: SamplingParams
    arrival: int
    seed: int = 0
    output: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: FinishReason | None = None
    preemptions: int = 0
    cache_salt: str | None = None
    keys: list = field(default_factory=list)  # prefix-cache keys of full blocks (lazy)
    registered: int = 0  # leading blocks known cached (matched or registered)
    cached_tokens: int | None = None  # prompt tokens found cached at first admission
    replay: bool = False  # preempted since it last sampled: send its output once

    @classmethod
    def from_request(cls, req: Request, arrival: int, seed: int) -> Sequence:
        return cls(req.request_id, tuple(req.prompt_tokens), req.params, arrival, seed,
                   cache_salt=req.cache_salt)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def num_pending(self) -> int:
        """Tokens known but not yet fed through the model."""
        return self.num_tokens - self.num_computed

    def token_slice(self, start: int, end: int) -> tuple[int, ...]:
        p = len(self.prompt)
        if end <= p:
            return self.prompt[start:end]
        if start >= p:
            return tuple(self.output[start - p : end - p])
        return self.prompt[start:] + tuple(self.output[: end - p])
