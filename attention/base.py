"""The decode-attention seam: one abstract path, one implementation per file.

A decode path computes, for each sequence ``b`` of a batch, attention of its single new
query ``q[b]`` over the first ``lengths[b]`` tokens of its pages in a layer's slab pool.
It knows block tables and lengths, never requests.

Invariants every path keeps:
  * the K/V of the new token is already in the pool when the path runs;
  * ``out`` has the shape and dtype of ``q``;
  * a path that cannot run a case says so through ``decline`` (a reason), never by
    raising, so the selector can fall back to gather-SDPA.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cached_property

import mlx.core as mx
import numpy as np

from slabserve.kvcache.arrays import host_array
from slabserve.kvcache.pool import GatherPlan, PoolGeometry, SlabPool, padded_table


@dataclass
class DecodeBatch:
    """Per-step metadata shared by every layer: host block tables and lengths
    (each length counts the token being decoded), plus lazily built device arrays (never
    in MLX's scalar pool: kvcache.arrays)."""

    geom: PoolGeometry
    tables: list[list[int]]
    lengths: list[int]
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def batch(self) -> int:
        return len(self.lengths)

    @property
    def max_len(self) -> int:
        return max(self.lengths)

    @property
    def total_len(self) -> int:
        return sum(self.lengths)

    @cached_property
    def gather_plan(self) -> GatherPlan:
        return GatherPlan(self.geom, self.tables)

    @cached_property
    def lengths_array(self) -> mx.array:
        return host_array(self.lengths, mx.int32)

    @cached_property
    def num_blocks(self) -> int:
        """The widest table's block count (the padded tables' width)."""
        return max((len(t) for t in self.tables), default=0)

    @cached_property
    def table_array(self) -> mx.array:
        """``[B, nblk]`` int32 block ids, padded with the sequence's first block.  Filled
        in numpy and handed over as one buffer: converting a nested list of B x nblk Python
        ints cost milliseconds per step at B=32, 16k tokens."""
        return host_array(padded_table(self.tables).astype(np.int32), mx.int32)


class DecodeAttention(ABC):
    """One decode path over the slab pool."""

    name: str = "abstract"

    @abstractmethod
    def decline(self, q: mx.array, pool: SlabPool, batch: DecodeBatch) -> str | None:
        """A reason this path cannot run this case, or ``None`` if it can."""

    @abstractmethod
    def __call__(
        self, q: mx.array, pool: SlabPool, layer: int, batch: DecodeBatch, scale: float
    ) -> mx.array:
        """``q``: ``[B, q_heads, 1, head_dim]``; returns the same shape and dtype."""
