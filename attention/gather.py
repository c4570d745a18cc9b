"""Gather-SDPA: gather each sequence's pages into contiguous K/V, then MLX's fused SDPA
with a mask for ragged lengths.  Portable: runs on every backend, declines nothing.
An int8 pool's pages are dequantized as they are gathered, to the query's dtype."""

from __future__ import annotations

import mlx.core as mx

from slabserve.attention.base import DecodeAttention, DecodeBatch
from slabserve.kvcache.pool import SlabPool


def gather_kv(pool: SlabPool, layer: int, batch: DecodeBatch,
              dtype: mx.Dtype | None = None) -> tuple[mx.array, mx.array]:
    """K and V of the batch's tables as ``[B, kv_heads, nblk * block_size, head_dim]``:
    the pool's dtype, or ``dtype`` for a quantized pool (dequantized; its raw int8 values
    when None)."""
    plan = batch.gather_plan
    out = []
    for side in (0, 1):
        x = pool.gather(layer, side, plan, dtype)  # [B, nblk, H, bs, D]
        b, n, h, bs, d = x.shape
        out.append(x.transpose(0, 2, 1, 3, 4).reshape(b, h, n * bs, d))
    return out[0], out[1]


def length_mask(batch: DecodeBatch, kv_len: int) -> mx.array | None:
    """``[B, 1, 1, kv_len]`` bool mask of valid positions, or None when all are valid."""
    if all(n == kv_len for n in batch.lengths):
        return None
    pos = mx.arange(kv_len, dtype=mx.int32)
    return (pos[None, :] < batch.lengths_array[:, None])[:, None, None, :]


class GatherSDPA(DecodeAttention):
    name = "gather"

    def decline(self, q, pool, batch) -> str | None:
        return None

    def __call__(self, q, pool, layer, batch, scale):
        k, v = gather_kv(pool, layer, batch, q.dtype)
        mask = length_mask(batch, k.shape[2])
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
