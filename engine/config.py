"""Frozen configuration of the engine, built at the edge (CLI, tests), validated here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CacheConfig:
    """KV cache shape and budget.

    ``kv_budget_bytes`` caps the pool (K and V, all layers); it grows a slab of
    ``slab_tokens`` tokens at a time, starting at ``initial_slabs``.  ``dtype`` of None
    uses the model's K/V dtype."""

    block_size: int = 16
    slab_tokens: int = 4096
    kv_budget_bytes: int = 1 << 30
    initial_slabs: int = 1
    dtype: str | None = None

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError("block_size must be a positive power of two")
        if self.slab_tokens < self.block_size or self.slab_tokens % self.block_size:
            raise ValueError("slab_tokens must be a positive multiple of block_size")
        if self.kv_budget_bytes <= 0 or self.initial_slabs < 1:
            raise ValueError("kv_budget_bytes and initial_slabs must be positive")

    @property
    def slab_blocks(self) -> int:
        return self.slab_tokens // self.block_size


@dataclass(frozen=True)
class RunnerConfig:
    """Model runner: prefill chunk size (tokens per forward of one sequence), and the
    prefill attention shape bucket in tokens (0 = exact shapes; None =
    ``SLABSERVE_PREFILL_KV_BUCKET``; see attention/prefill.py)."""

    prefill_chunk: int = 512
    prefill_kv_bucket: int | None = None

    def __post_init__(self) -> None:
        if self.prefill_chunk <= 0:
            raise ValueError("prefill_chunk must be positive")
        if self.prefill_kv_bucket is not None and self.prefill_kv_bucket < 0:
            raise ValueError("prefill_kv_bucket must be >= 0")
