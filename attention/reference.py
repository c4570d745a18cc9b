"""Float64 references for paged attention, and the random paged cases they are checked on
(numpy and MLX on any device; no GPU needed): the one home of both for the tests, the
calibration (attention/calibrate.py) and the benchmarks (bench/attention.py,
bench/cuda_kernel.py).

``reference_decode`` reads the pool block by block through the block tables, independently
of every MLX path, so a bug shared by gather and native (e.g. in ``GatherPlan``) still
shows; an int8 pool's pages are dequantized in float64 (values times scales), so the paths'
own arithmetic is checked at float tolerance, and ``quantized_copy`` gives the int8 pool of
a float pool, to check the quantization error against the float data. ``random_case`` never
touches MLX's global random state (its draws take keys from ``seed``).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from slabserve.attention.base import DecodeBatch
from slabserve.kvcache.pool import PoolGeometry, SlabPool
from slabserve.kvcache.quant import QUANT_DTYPE, quantize


def _page(pool: SlabPool, layer: int, side: int, block: int) -> np.ndarray:
    """Block ``block`` of ``layer``/``side`` as float64 ``[kv_heads, block_size, D]``."""
    sb = pool.geom.slab_blocks
    slab = pool.slab(layer, side, block // sb)[block % sb]
    page = np.array(slab.astype(mx.float32), dtype=np.float64)
    if pool.geom.quantized:
        scale = pool.scale_slab(layer, side, block // sb)[block % sb]
        page = page * np.array(scale.astype(mx.float32), dtype=np.float64)
    return page


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


def causal_reference(q, k, v, start: int, scale: float) -> np.ndarray:
    """float64 causal attention (prefill): q ``[H, L, D]`` at positions ``start..``, k/v
    ``[Hkv, n, D]`` (GQA: H a multiple of Hkv); query i sees keys ``j <= start + i``."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    rep = q.shape[0] // k.shape[0]
    k, v = np.repeat(k, rep, axis=0), np.repeat(v, rep, axis=0)
    s = np.einsum("hld,hnd->hln", q, k) * scale
    pos = start + np.arange(q.shape[1])[:, None]
    s = np.where(np.arange(k.shape[1])[None, :] <= pos, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("hln,hnd->hld", p / p.sum(-1, keepdims=True), v)


def quantized_copy(pool: SlabPool) -> SlabPool:
    """An int8 pool of ``pool``'s geometry holding its float pages quantized (every
    layer, side and slab; same block ids), everything evaluated."""
    geom = PoolGeometry(*(getattr(pool.geom, f) for f in (
        "num_layers", "kv_heads", "head_dim", "block_size", "slab_blocks")), QUANT_DTYPE)
    out = SlabPool(geom, max_slabs=pool.max_slabs)
    for layer in range(geom.num_layers):
        for src, dst, scales in ((pool.k, out.k, out.k_scale), (pool.v, out.v, out.v_scale)):
            pairs = [quantize(x) for x in src[layer]]
            dst[layer] = [p[0] for p in pairs]
            scales[layer] = [p[1] for p in pairs]
            mx.eval(dst[layer], scales[layer])
    return out


def random_case(lengths, q_heads: int, kv_heads: int, head_dim: int, block_size: int = 16,
                dtype=mx.float32, *, slabs: int | None = None, slab_blocks: int | None = None,
                layers: int = 1, seed: int = 0, contiguous: bool = False,
                max_slabs: int | None = None) -> tuple[mx.array, SlabPool, DecodeBatch]:
    """(q ``[B, q_heads, 1, head_dim]``, pool, batch) for sequences of ``lengths`` tokens,
    everything evaluated.  The pool has ``slabs`` slabs sized so the batch's blocks fill
    them, or slabs of ``slab_blocks`` blocks, as many as the batch needs (give one of the
    two); every layer's K and V and q are standard normal draws in ``dtype``.  Tables are
    consecutive runs of a random permutation of every block of the pool, so a sequence's
    pages are out of order and spread over the slabs; ``contiguous``: consecutive block ids
    instead (what the server's lowest-id-first allocator hands a prompt prefilled alone).
    ``max_slabs``: the pool's declared capacity (sets the CUDA kernel's slab inputs).
    ``dtype`` int8: the float16 case's pages quantized (``quantized_copy``), q float16."""
    if dtype == QUANT_DTYPE:
        q, pool, batch = random_case(
            lengths, q_heads, kv_heads, head_dim, block_size, mx.float16, slabs=slabs,
            slab_blocks=slab_blocks, layers=layers, seed=seed, contiguous=contiguous,
            max_slabs=max_slabs)
        qpool = quantized_copy(pool)
        return q, qpool, DecodeBatch(qpool.geom, batch.tables, batch.lengths)
    need = sum(-(-n // block_size) for n in lengths)
    if (slabs is None) == (slab_blocks is None):
        raise ValueError("give exactly one of slabs and slab_blocks")
    if slabs is None:
        slabs = max(1, -(-need // slab_blocks))
    else:
        slab_blocks = max(1, -(-need // slabs))
    geom = PoolGeometry(layers, kv_heads, head_dim, block_size, slab_blocks, dtype)
    pool = SlabPool(geom, max_slabs=max_slabs)
    keys = iter(mx.random.split(mx.random.key(seed), 2 * layers * slabs + 1))
    rows = slab_blocks * kv_heads * block_size
    for layer in range(layers):
        for side in (pool.k, pool.v):
            side[layer] = [mx.random.normal((rows, head_dim), key=next(keys)).astype(dtype)
                           for _ in range(slabs)]
            mx.eval(side[layer])
    ids = np.arange(slabs * slab_blocks)
    if not contiguous:
        ids = np.random.default_rng(seed).permutation(ids)
    tables, i = [], 0
    for n in lengths:
        k = -(-n // block_size)
        tables.append(ids[i:i + k].tolist())
        i += k
    batch = DecodeBatch(geom, tables, list(lengths))
    q = mx.random.normal((len(lengths), q_heads, 1, head_dim), key=next(keys)).astype(dtype)
    mx.eval(q, batch.table_array, batch.lengths_array)
    return q, pool, batch


def random_pool(geom: PoolGeometry, ns: int, key: mx.array) -> SlabPool:
    """A one-layer pool of ``ns`` slabs of standard normal pages in ``geom``'s dtype, or
    quantized (with their scales) for an int8 geometry."""
    pool = SlabPool(geom)
    rows = geom.slab_blocks * geom.kv_heads * geom.block_size
    kv = mx.random.normal((2, ns, rows, geom.head_dim), key=key)
    for side, scales, x in ((pool.k, pool.k_scale, kv[0]), (pool.v, pool.v_scale, kv[1])):
        if geom.quantized:
            vals, scale = quantize(x)
            side[0] = [vals[i] for i in range(ns)]
            scales[0] = [scale[i] for i in range(ns)]
        else:
            side[0] = [x[i].astype(geom.dtype) for i in range(ns)]
    return pool
