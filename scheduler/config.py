"""Scheduler configuration: frozen, validated here, built at the edge (CLI, tests)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits and the per-step token budget.

    ``max_step_tokens``: tokens computed per step (one per decoding sequence, plus prefill
    chunks).  ``prefill_chunk``: most tokens of one sequence per step (a long prompt is
    spread over steps so running streams keep decoding).  ``max_context``: prompt +
    max_tokens limit; None = the model's own.  ``watermark_blocks``: blocks that must stay
    free after admitting a new request, so running decodes do not preempt at once."""

    max_running: int = 64
    max_queued: int = 256
    max_step_tokens: int = 512
    prefill_chunk: int = 256
    max_context: int | None = None
    watermark_blocks: int = 1

    def __post_init__(self) -> None:
        if self.max_running < 1 or self.max_queued < 0:
            raise ValueError("max_running >= 1 and max_queued >= 0 required")
        if self.max_step_tokens < 1 or self.prefill_chunk < 1:
            raise ValueError("max_step_tokens and prefill_chunk must be positive")
        if self.max_context is not None and self.max_context < 2:
            raise ValueError("max_context must be >= 2")
        if self.watermark_blocks < 0:
            raise ValueError("watermark_blocks must be >= 0")
