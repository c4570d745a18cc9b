"""Plain data passed between the scheduler and the executor: no MLX here.

One step: ``Scheduler.schedule() -> StepPlan``; ``Executor.execute(plan) -> StepOutput``;
``Scheduler.update(plan, output) -> list[SeqUpdate]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from slabserve.scheduler.api import FinishReason, SamplingParams, TokenLogprob


@dataclass(frozen=True)
class ScheduledChunk:
    """Feed ``tokens`` at positions ``[start, start + len(tokens))`` of sequence
    ``request_id``, whose block table ``blocks`` covers all of them.  ``sample`` is True
    when the chunk ends at the sequence's last known token: the step then samples the
    sequence's next token, its ``output_index``-th generated one (0-based).

    ``params`` are the request's sampling parameters; ``seed`` its sampling seed
    (``params.seed``, or one drawn once when the request was added); ``output_index``
    the number of tokens generated so far.  ``prompt``/``output`` (the token history)
    are filled only when a penalty needs them, and only on chunks that sample.
    """

    request_id: str
    tokens: tuple[int, ...]
    start: int
    blocks: tuple[int, ...]
    sample: bool
    params: SamplingParams
    prompt: tuple[int, ...] = ()
    output: tuple[int, ...] = ()
    seed: int = 0
    output_index: int = 0


@dataclass(frozen=True)
class StepPlan:
    """``prefills``: chunks of more than one token, one forward each; ``decodes``: one
    token per sequence, one batched forward.  ``preempted`` lists sequences whose blocks
    were taken back while planning (they will be recomputed)."""

    step: int
    prefills: tuple[ScheduledChunk, ...] = ()
    decodes: tuple[ScheduledChunk, ...] = ()
    preempted: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.prefills and not self.decodes

    @property
    def num_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.prefills) + len(self.decodes)

    def chunks(self) -> tuple[ScheduledChunk, ...]:
        return self.prefills + self.decodes


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: TokenLogprob | None = None


@dataclass(frozen=True)
class StepOutput:
    """The executor's answer: one sampled token per chunk of the plan with ``sample``."""

    sampled: dict[str, SampledToken] = field(default_factory=dict)


@dataclass(frozen=True)
class SeqUpdate:
    """What ``update`` reports per sequence: a new token (or none) and whether it finished."""

    request_id: str
    token: SampledToken | None
    finish_reason: FinishReason | None = None
    error: str | None = None
