"""Prefill attention for one sequence: a chunk of new queries over the cached prefix and
the chunk itself, causal.  The chunk's K/V are already written to the pool."""

from __future__ import annotations

import mlx.core as mx

from attention.base import DecodeBatch
from attention.gather import gather_kv
from kvcache.pool import SlabPool


def prefill_attention(
    q: mx.array,
    k_new: mx.array,
    v_new: mx.array,
    pool: SlabPool,
    layer: int,
    prefix: DecodeBatch | None,
    scale: float,
) -> mx.array:
    """``q``, ``k_new``, ``v_new``: ``[1, heads, L, head_dim]`` for positions
    ``[start, start + L)``.  ``prefix`` describes the sequence's table with length
    ``start + L`` (None when ``start == 0``: the chunk attends to itself only)."""
    if prefix is None:
        return mx.fast.scaled_dot_product_attention(q, k_new, v_new, scale=scale, mask="causal")
    k, v = gather_kv(pool, layer, prefix)
    n = prefix.lengths[0]
    k, v = k[:, :, :n], v[:, :, :n]
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")
