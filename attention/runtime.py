"""The attention state one model runner owns: decode-path selector, prefill shape bucket,
host math.  Built from frozen settings at the edge; nothing here reads the environment.

Invariant: every attention call of a runner's forward goes through its runtime, so two
runners in one process (tests, benchmarks) never share a selector's cache, counts or
override, a bucket or a host-math switch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx

from slabserve.attention.base import DecodeBatch
from slabserve.attention.host_math import HostMath
from slabserve.attention.prefill import prefill_attention
from slabserve.attention.selector import Selector
from slabserve.kvcache.pool import SlabPool


@dataclass
class AttentionRuntime:
    """``selector`` picks each decode layer-step's path (its override, per-layer cache,
    profile, trace and counts live there); ``prefill_bucket`` rounds prefill attention
    shapes (tokens, 0 = exact; attention/prefill.py); ``host_math`` runs float32 CPU
    prefill math in numpy where it applies."""

    selector: Selector = field(default_factory=Selector)
    prefill_bucket: int = 0
    host_math: HostMath = field(default_factory=HostMath)

    def __post_init__(self) -> None:
        if self.prefill_bucket < 0:
            raise ValueError("prefill_bucket must be >= 0")

    def decode(self, q: mx.array, pool: SlabPool, layer: int, batch: DecodeBatch,
               scale: float) -> mx.array:
        """Attention of ``q`` (``[B, q_heads, 1, D]``) over ``batch``'s pages in
        ``layer``; the selector picks the path."""
        return self.selector.run(q, pool, layer, batch, scale)

    def prefill(self, q: mx.array, k_new: mx.array, v_new: mx.array, pool: SlabPool,
                layer: int, prefix: DecodeBatch | None, scale: float) -> mx.array:
        """``attention.prefill.prefill_attention`` with this runtime's bucket and host
        math."""
        return prefill_attention(q, k_new, v_new, pool, layer, prefix, scale,
                                 self.prefill_bucket, self.host_math)

    def close(self) -> None:
        self.selector.close()
        self.host_math.close()
