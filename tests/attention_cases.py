"""Random paged-attention cases for the attention tests: pools of one or several slabs
filled with random (never zero) data, shuffled block tables, ragged lengths; and the
float64 causal reference that prefill tests compare against."""

from __future__ import annotations

import random

import mlx.core as mx
import numpy as np
from slabserve.attention.base import DecodeBatch
from slabserve.kvcache.block_table import blocks_needed
from slabserve.kvcache.pool import PoolGeometry, SlabPool, WritePlan


def nonzero_f32(rng, *shape) -> np.ndarray:
    """float32 values with magnitudes in [0.25, 1] and random signs (never zero)."""
    x = rng.uniform(0.25, 1.0, shape) * rng.choice([-1.0, 1.0], shape)
    return x.astype(np.float32)


def causal_reference64(q, k, v, start, scale) -> np.ndarray:
    """float64 causal attention: q ``[H, L, D]`` at positions ``start..``, k/v
    ``[Hkv, n, D]`` (GQA: H a multiple of Hkv); query i sees keys ``j <= start + i``."""
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    rep = q.shape[0] // k.shape[0]
    k, v = np.repeat(k, rep, axis=0), np.repeat(v, rep, axis=0)
    s = np.einsum("hld,hnd->hln", q, k) * scale
    pos = start + np.arange(q.shape[1])[:, None]
    s = np.where(np.arange(k.shape[1])[None, :] <= pos, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("hln,hnd->hld", p / p.sum(-1, keepdims=True), v)


def filled_pool(rng, kv_heads: int, head_dim: int, block_size: int, slab_blocks: int,
                n: int):
    """(geom, pool, table, k, v): a float32 one-layer pool holding one sequence of ``n``
    tokens on a table shuffled over about twice the slabs it needs, and the numpy K/V
    (``[kv_heads, n, head_dim]``) written there."""
    geom = PoolGeometry(1, kv_heads, head_dim, block_size, slab_blocks, mx.float32)
    nblk = -(-n // block_size)
    pool = SlabPool(geom, initial_slabs=-(-2 * nblk // slab_blocks))
    table = random.Random(3).sample(range(pool.num_slabs * slab_blocks), nblk)
    k, v = (nonzero_f32(rng, kv_heads, n, head_dim) for _ in "kv")
    plan = WritePlan(geom, [(table[p // block_size], p % block_size) for p in range(n)])
    pool.write(0, plan, mx.array(k.transpose(1, 0, 2)), mx.array(v.transpose(1, 0, 2)))
    mx.eval(pool.take_pending())
    return geom, pool, table, k, v


def make_case(q_heads: int, kv_heads: int, head_dim: int, block_size: int,
              lengths: list[int], slabs: int, dtype=mx.float32, layers: int = 1,
              seed: int = 0):
    """(q, pool, batch): ``slabs`` slabs sized so the batch's blocks fill them, every
    table a random draw (so a sequence's pages are out of order and spread over slabs)."""
    rng = random.Random(seed)
    need = sum(blocks_needed(n, block_size) for n in lengths)
    slab_blocks = -(-need // slabs)
    geom = PoolGeometry(layers, kv_heads, head_dim, block_size, slab_blocks, dtype)
    pool = SlabPool(geom, 0)
    mx.random.seed(seed)
    rows = slab_blocks * kv_heads * block_size
    for layer in range(layers):
        for side in (pool.k[layer], pool.v[layer]):
            for _ in range(slabs):
                side.append((mx.random.normal((rows, head_dim)) + 0.1).astype(dtype))
    mx.eval(pool.k, pool.v)
    ids = list(range(slabs * slab_blocks))
    rng.shuffle(ids)
    tables = []
    for n in lengths:
        k = blocks_needed(n, block_size)
        tables.append(ids[:k])
        ids = ids[k:]
    batch = DecodeBatch(geom, tables, list(lengths))
    q = (mx.random.normal((len(lengths), q_heads, 1, head_dim)) + 0.1).astype(dtype)
    return q, pool, batch


def slabs_touched(pool: SlabPool, batch: DecodeBatch) -> int:
    sb = pool.geom.slab_blocks
    return len({b // sb for t in batch.tables for b in t})
