"""Random paged-attention cases for the attention tests (the builders and float64
references themselves live in attention/reference.py): decode cases in the tests' argument
order, a one-sequence pool written through ``WritePlan`` for the prefill tests, never-zero
float32 data."""

from __future__ import annotations

import random

import mlx.core as mx
import numpy as np

from slabserve.attention.base import DecodeBatch
from slabserve.attention.reference import causal_reference, random_case
from slabserve.kvcache.pool import PoolGeometry, SlabPool, WritePlan

causal_reference64 = causal_reference  # the prefill tests' name for it


def nonzero_f32(rng, *shape) -> np.ndarray:
    """float32 values with magnitudes in [0.25, 1] and random signs (never zero)."""
    x = rng.uniform(0.25, 1.0, shape) * rng.choice([-1.0, 1.0], shape)
    return x.astype(np.float32)


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
    table a random draw (attention.reference.random_case)."""
    return random_case(lengths, q_heads, kv_heads, head_dim, block_size, dtype, slabs=slabs,
                       layers=layers, seed=seed)


def slabs_touched(pool: SlabPool, batch: DecodeBatch) -> int:
    """How many slabs the batch's tables reach into."""
    sb = pool.geom.slab_blocks
    return len({b // sb for t in batch.tables for b in t})
