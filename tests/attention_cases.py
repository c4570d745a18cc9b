"""Random paged-decode cases for the attention tests: pools of one or several slabs
filled with random (never zero) data, shuffled block tables, ragged lengths."""

from __future__ import annotations

import random

import mlx.core as mx

from attention.base import DecodeBatch
from kvcache.block_table import blocks_needed
from kvcache.pool import PoolGeometry, SlabPool


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
