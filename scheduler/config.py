"""Scheduler configuration: frozen, validated here, built at the edge (CLI, tests)."""

from __future__ import annotations

from dataclasses import dataclass, replace

# Whole prefill chunks a GPU step has room for beside its decodes.  Equally long chunks run
# as the rows of one forward (docs/adr/0007), whose cost on a GPU grows far slower than its
# rows (H200, Qwen2.5-0.5B shape: 1 / 2 / 4 / 8 rows of 2048 tokens in 8 / 15 / 26 / 44 ms),
# so a burst of prompts is prefilled in few steps and few steps mix prefill with decodes:
# 2 -> 8 chunks took concurrency-8 tok/s from 234 to 509 at 4k (docs/adr/0006).
GPU_STEP_CHUNKS = 8

# A CPU prefill chunk costs about its tokens x the model's parameters: the CPU default
# (256-token chunks in 512-token steps) was set for a 0.5B model's stalls (docs/adr/0005).
# A model of at most half that size takes twice the chunk for no longer a stall, in fewer
# steps: the tiny model's concurrency-8 tok/s went from 1.82-1.98x to 2.13-2.32x
# mlx_lm.server's (docs/benchmarks/loadtest-cpu.md); 1024-token chunks were no better.
CPU_SMALL_MODEL_PARAMS = 250_000_000
CPU_SMALL_MODEL_STEP = dict(max_step_tokens=1024, prefill_chunk=512)


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits and the per-step token budget.

    ``max_step_tokens``: tokens computed per step (one per decoding sequence, plus prefill
    chunks).  ``prefill_chunk``: most tokens of one sequence per step (a long prompt is
    spread over steps so running streams keep decoding).  ``max_context``: prompt +
    max_tokens limit; None = the model's own.  ``watermark_blocks``: blocks that must stay
    free after admitting a new request, so running decodes do not preempt at once.
    ``prefill_align``: a prefill chunk that is not a prompt's last is cut down to a multiple
    of this many tokens (when that leaves any), so chunk shapes repeat: on CUDA every new
    attention shape costs a cuDNN graph build (~60 ms on an H200, docs/adr/0006).

    ``async_scheduling``: plan and submit a pure-decode step while the one before it
    still runs (``Scheduler.schedule_next``), so the host's work of a step overlaps the
    device's work of the previous one (vLLM's ``--async-scheduling``).  ``for_device``
    turns it off on CPU, where MLX evaluates a step inside ``mx.async_eval`` (nothing is
    left to overlap: docs/adr/0013-async-scheduling.md).

    ``for_device`` gives the defaults measured per device: small chunks on CPU (a chunk
    there costs in proportion to its size, so small ones keep running streams decoding),
    large aligned ones on a GPU (a chunk's cost there is mostly per step and per shape).
    ``steps_follow_model``: the CPU defaults were taken (no step size given), so
    ``for_model`` may size them to the loaded model."""

    max_running: int = 64
    max_queued: int = 256
    max_step_tokens: int = 512
    prefill_chunk: int = 256
    max_context: int | None = None
    watermark_blocks: int = 1
    prefill_align: int = 1
    async_scheduling: bool = True
    steps_follow_model: bool = False

    @classmethod
    def for_device(cls, gpu: bool, **overrides) -> SchedulerConfig:
        """Defaults for a CPU or a GPU; keyword arguments that are not None override.  On a
        GPU an unset ``prefill_align`` is the effective chunk (a prompt's chunks start at
        multiples of it, so prefill shapes repeat across prompts) and an unset
        ``max_step_tokens`` is derived from the chunk and ``max_running``: room for
        ``GPU_STEP_CHUNKS`` whole chunks beside every decode, so decodes never shave a
        chunk."""
        given = {k: v for k, v in overrides.items() if v is not None}
        base = (dict(prefill_chunk=2048) if gpu
                else dict(max_step_tokens=512, prefill_chunk=256, prefill_align=1,
                          async_scheduling=False, steps_follow_model=not (
                              {"max_step_tokens", "prefill_chunk"} & set(given))))
        base.update(given)
        if gpu and "prefill_align" not in given:  # chunk starts at multiples of the chunk
            base["prefill_align"] = base["prefill_chunk"]
        if gpu and "max_step_tokens" not in given:
            running = base.get("max_running", cls.max_running)
            base["max_step_tokens"] = GPU_STEP_CHUNKS * base["prefill_chunk"] + running
        return cls(**base)

    def for_model(self, params: int) -> SchedulerConfig:
        """These settings for a loaded model of ``params`` parameters: with
        ``steps_follow_model``, a model of at most ``CPU_SMALL_MODEL_PARAMS`` gets
        ``CPU_SMALL_MODEL_STEP``; otherwise unchanged."""
        if not self.steps_follow_model or params > CPU_SMALL_MODEL_PARAMS:
            return self
        return replace(self, steps_follow_model=False, **CPU_SMALL_MODEL_STEP)

    def __post_init__(self) -> None:
        if self.max_running < 1 or self.max_queued < 0:
            raise ValueError("max_running >= 1 and max_queued >= 0 required")
        if self.max_step_tokens < 1 or self.prefill_chunk < 1:
            raise ValueError("max_step_tokens and prefill_chunk must be positive")
        if self.max_context is not None and self.max_context < 2:
            raise ValueError("max_context must be >= 2")
        if self.watermark_blocks < 0:
            raise ValueError("watermark_blocks must be >= 0")
        if self.prefill_align < 1:
            raise ValueError("prefill_align must be >= 1")
