"""Native pooled decode on MLX's CPU backend: block-wise online softmax over the pages,
split across context between two MLX CPU streams (split-K, as flash-decoding does).

Why this shape (docs/benchmarks/attention-cpu.md, /work/shared/measurements):
  * MLX runs every op of a stream on one worker thread, so two streams working on the
    two halves of the context use both cores; the halves are merged at the end.  A step
    with under ``min_stream_tokens`` padded tokens per stream runs on fewer streams (the
    merge and the cross-stream wait cost more than they give).
  * each chunk of ``chunk_blocks`` pages is taken straight from its slab (one ``take``
    per slab the chunk touches, never the whole table at once, never a slab copy) and
    consumed by its two matmuls: the gathered K/V of a sequence never exist as a whole;
  * one matmul per (sequence, kv head) with its group of query heads as rows beats
    MLX's CPU SDPA fallback (one single-row matmul per query head) for f16/bf16;
  * an int8 pool (kvcache/quant.py) is read in place like any other: each chunk's int8 pages
    are cast to the compute dtype (float32 by default) for the matmuls and the per-token
    scales are applied to the ``[G, C * block_size]`` scores and probabilities (K's scale on
    a score column, V's on a probability column), never to the ``[C * block_size, D]``
    pages: ``q.(s k) = s (q.k)`` and ``sum p (s v) = sum (p s) v``.

Invariants: any slab count, any block table order, ragged lengths (each sequence
attends to exactly its first ``lengths[b]`` tokens); output has ``q``'s shape and dtype;
softmax statistics are kept in float32.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from enum import Enum

import mlx.core as mx
import numpy as np

from slabserve.attention.base import DecodeAttention, DecodeBatch
from slabserve.kvcache.pool import SlabPool

# Masked positions get this (finite, so a chunk that is all padding for a sequence
# gives weight exp(-1e30 - m) = 0 at the merge instead of NaN).
_MASKED = -1e30
_FLOATS = (mx.float32, mx.float16, mx.bfloat16)
_POOL_DTYPES = (*_FLOATS, mx.int8)


class Decline(str, Enum):
    """Why NativeCPU cannot take a case (the selector then runs gather)."""

    NOT_SINGLE_QUERY = "not_single_query"
    DTYPE_UNSUPPORTED = "dtype_unsupported"
    HEAD_GEOMETRY_MISMATCH = "head_geometry_mismatch"
    EMPTY_SEQUENCE = "empty_sequence"


@dataclass(frozen=True)
class _Chunk:
    """Columns ``[c0, c1)`` of the padded ``[B, nblk]`` table, as page rows of the
    slabs viewed ``[slab_blocks * kv_heads, block_size, D]``, in ``(b, h, c)`` order:
    one ``(slab, rows)`` group per slab touched, and the permutation back to
    ``(b, h, c)`` order when there are several."""

    shape: tuple[int, int, int]  # (B, kv_heads, c1 - c0)
    groups: tuple[tuple[int, mx.array], ...]
    inverse: mx.array | None
    bias: mx.array | None  # [B, 1, 1, (c1 - c0) * block_size] float32, or None


@dataclass(frozen=True)
class CpuPlan:
    """Per step, shared by every layer: chunks split between the streams."""

    parts: tuple[tuple[_Chunk, ...], ...]


def _groups(geom, rows: np.ndarray):
    """Page rows of a ``[B, C]`` block-id table in ``(b, h, c)`` order, grouped by slab,
    and the permutation back from slab order (None when one slab holds them all)."""
    h, sb = geom.kv_heads, geom.slab_blocks
    page = (rows % sb)[:, None, :] * h + np.arange(h)[None, :, None]  # [B, H, C]
    slab = np.broadcast_to((rows // sb)[:, None, :], page.shape).reshape(-1)
    page = page.reshape(-1).astype(np.int32)
    slabs = np.unique(slab)
    if len(slabs) == 1:
        return ((int(slabs[0]), mx.array(page)),), None
    order = np.argsort(slab, kind="stable")
    cuts = np.searchsorted(slab[order], slabs, side="right")
    groups, start = [], 0
    for s, end in zip(slabs.tolist(), cuts.tolist(), strict=True):
        groups.append((s, mx.array(page[order[start:end]])))
        start = end
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return tuple(groups), mx.array(inverse.astype(np.int32))


def _chunk(batch: DecodeBatch, rows: np.ndarray, c0: int, c1: int) -> _Chunk:
    bs = batch.geom.block_size
    groups, inverse = _groups(batch.geom, rows[:, c0:c1])
    shape = (rows.shape[0], batch.geom.kv_heads, c1 - c0)
    lo, hi = c0 * bs, c1 * bs
    if all(n >= hi for n in batch.lengths):
        return _Chunk(shape, groups, inverse, None)
    pos = mx.arange(lo, hi, dtype=mx.int32)
    valid = pos[None, :] < batch.lengths_array[:, None]
    bias = mx.where(valid, 0.0, _MASKED).astype(mx.float32)[:, None, None, :]
    return _Chunk(shape, groups, inverse, bias)


def _pages(src: list[mx.array], block_size: int, chunk: _Chunk) -> mx.array:
    """The chunk's rows of one layer's value (or scale) slabs ``src`` as
    ``[B, kv_heads, C * block_size, width]``."""
    width = src[0].shape[-1]
    parts = [src[s].reshape(-1, block_size, width)[rows] for s, rows in chunk.groups]
    x = parts[0] if chunk.inverse is None else mx.concatenate(parts)[chunk.inverse]
    b, h, c = chunk.shape
    return x.reshape(b, h, c * block_size, width)


def _columns(src: list[mx.array], block_size: int, chunk: _Chunk) -> mx.array:
    """The chunk's per-token scales as float32 ``[B, kv_heads, 1, C * block_size]``."""
    return _pages(src, block_size, chunk).swapaxes(-1, -2).astype(mx.float32)


def build_plan(batch: DecodeBatch, streams: int, chunk_blocks: int,
               min_stream_tokens: int = 0) -> CpuPlan:
    """Split the padded table's columns into at most ``streams`` contiguous parts (fewer
    when a part would cover under ``min_stream_tokens`` padded tokens of the batch: a
    second stream costs a merge and a cross-stream wait), each cut in chunks of at most
    ``chunk_blocks`` columns."""
    nblk = max(len(t) for t in batch.tables)
    rows = np.array([t + [t[0]] * (nblk - len(t)) for t in batch.tables], dtype=np.int64)
    work = len(batch.tables) * nblk * batch.geom.block_size
    streams = max(1, min(streams, nblk, work // max(min_stream_tokens, 1)))
    bounds = [round(i * nblk / streams) for i in range(streams + 1)]
    parts = []
    for s in range(streams):
        a, b = bounds[s], bounds[s + 1]
        parts.append(tuple(_chunk(batch, rows, c, min(c + chunk_blocks, b))
                           for c in range(a, b, chunk_blocks)))
    return CpuPlan(tuple(p for p in parts if p))


def _partial(qg, pool: SlabPool, layer: int, chunk: _Chunk):
    """(max, sum, unnormalised out) of one chunk: ``[B,H,G,1]``, ``[B,H,G,1]``,
    ``[B,H,G,D]``, all float32.  ``qg`` is in the compute dtype (an int8 pool's pages are
    cast to it, their scales applied to score and probability columns)."""
    bs, quantized = pool.geom.block_size, pool.geom.quantized
    k, v = _pages(pool.k[layer], bs, chunk), _pages(pool.v[layer], bs, chunk)
    if quantized:
        k, v = k.astype(qg.dtype), v.astype(qg.dtype)
    s = (qg @ k.swapaxes(-1, -2)).astype(mx.float32)
    if quantized:
        s = s * _columns(pool.k_scale[layer], bs, chunk)
    if chunk.bias is not None:
        s = s + chunk.bias
    m = s.max(axis=-1, keepdims=True)
    p = mx.exp(s - m)
    den = p.sum(axis=-1, keepdims=True)
    pv = p * _columns(pool.v_scale[layer], bs, chunk) if quantized else p
    out = (pv.astype(qg.dtype) @ v).astype(mx.float32)
    return m, den, out


def _merge(partials):
    if len(partials) == 1:
        m, den, out = partials[0]
        return out / den
    ms = mx.stack([p[0] for p in partials])
    top = ms.max(axis=0)
    w = mx.exp(ms - top)
    den = (w * mx.stack([p[1] for p in partials])).sum(axis=0)
    out = (w * mx.stack([p[2] for p in partials])).sum(axis=0)
    return out / den


class NativeCPU(DecodeAttention):
    """Pooled decode for MLX's CPU backend (see the module docstring)."""

    name = "native"

    def __init__(self, streams: int = 2, chunk_blocks: int = 64,
                 min_stream_tokens: int = 1024,
                 int8_compute: mx.Dtype | None = mx.float32) -> None:
        self.num_streams = streams
        self.int8_compute = int8_compute
        self.chunk_blocks = chunk_blocks
        self.min_stream_tokens = min_stream_tokens
        # MLX streams belong to the thread that made them: one set per thread
        self._local = threading.local()

    def streams(self) -> list:
        streams = getattr(self._local, "streams", None)
        if streams is None:
            streams = self._local.streams = [
                mx.new_stream(mx.cpu) for _ in range(self.num_streams)]
        return streams

    def decline(self, q, pool, batch) -> Decline | None:
        g = pool.geom
        if q.ndim != 4 or q.shape[2] != 1:
            return Decline.NOT_SINGLE_QUERY
        if q.dtype not in _FLOATS or g.dtype not in _POOL_DTYPES:
            return Decline.DTYPE_UNSUPPORTED
        if q.shape[1] % g.kv_heads or q.shape[-1] != g.head_dim:
            return Decline.HEAD_GEOMETRY_MISMATCH
        if batch.batch == 0 or min(batch.lengths) < 1:
            return Decline.EMPTY_SEQUENCE
        return None

    def compute_dtype(self, q: mx.array, pool: SlabPool) -> mx.Dtype:
        """The matmuls' dtype: the pool's, or for an int8 pool ``int8_compute`` (None:
        q's dtype).  float32 by default: MLX's CPU float32 matmuls (BLAS) beat its float16
        ones by more than the wider cast costs (docs/benchmarks/kv-int8.md)."""
        if not pool.geom.quantized:
            return pool.geom.dtype
        return self.int8_compute or q.dtype

    def plan(self, batch: DecodeBatch) -> CpuPlan:
        key = ("native_cpu", self.num_streams, self.chunk_blocks, self.min_stream_tokens)
        plan = batch._cache.get(key)
        if plan is None:
            plan = batch._cache[key] = build_plan(batch, self.num_streams, self.chunk_blocks,
                                                  self.min_stream_tokens)
        return plan

    def __call__(self, q, pool, layer, batch, scale):
        b, hq, _, d = q.shape
        h = pool.geom.kv_heads
        qg = (q * scale).astype(self.compute_dtype(q, pool)).reshape(b, h, hq // h, d)
        partials = []
        for part, stream in zip(self.plan(batch).parts, self.streams(), strict=False):
            with mx.stream(stream):
                partials.extend(_partial(qg, pool, layer, c) for c in part)
        return _merge(partials).astype(q.dtype).reshape(b, hq, 1, d)
