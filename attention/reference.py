"""Float64 reference for paged decode attention (numpy; for tests and benchmarks).

It reads the pool block by block through the block tables, independently of every
MLX path, so a bug shared by gather and native (e.g. in ``GatherPlan``) still shows.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from attention.base import DecodeBatch
from kvcache.pool import SlabPool


def _page(pool: SlabPool, layer: int, side: int, block: int) -> np.ndarray:
    """Block ``block`` of ``layer``/``side`` as float64 ``[kv_heads, block_size, D]``."""
    sb = pool.geom.slab_blocks
    slab = pool.slab(layer, side, block // sb)[block % sb]
    return np.array(slab.astype(mx.float32), dtype=np.float64)


def reference_decode(
    q: mx.array, pool: SlabPool, layer: int, batch: DecodeBatch, scale: float
) -> np.ndarray:
    """``[B, q_heads, 1, D]`` float64: softmax(q k^T * scale) v over each sequence's
    first ``lengths[b]`` tokens, query head ``i`` reading kv head ``i // group``."""
    qn = np.array(q.astype(mx.float32), dtype=np.float64)
    b, hq, _, d = qn.shape
    h = pool.geom.kv_heads
    group = hq // h
    out = np.zeros_like(qn)
    for i, (table, n) in enumerate(zip(batch.tables, batch.lengths, strict=True)):
        k = np.concatenate([_page(pool, layer, 0, blk) for blk in table], axis=1)[:, :n]
        v = np.concatenate([_page(pool, layer, 1, blk) for blk in table], axis=1)[:, :n]
        for head in range(hq):
            s = k[head // group] @ qn[i, head, 0] * scale
            p = np.exp(s - s.max())
            out[i, head, 0] = (p / p.sum()) @ v[head // group]
    return out
