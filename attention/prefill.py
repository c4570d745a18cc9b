"""Prefill attention for one sequence: a chunk of new queries over the cached prefix and
the chunk itself, causal.  The chunk's K/V are already written to the pool.  An int8 pool's
prefix is dequantized to the query's dtype as it is gathered (a chunk without prefix
attends to its own unquantized K/V).

Shape bucketing (``RunnerConfig.prefill_kv_bucket`` tokens, 0 = off; by default
``default_bucket()``: ``CUDA_DEFAULT_BUCKET`` tokens where MLX computes on a CUDA GPU, off
elsewhere).  MLX's CUDA
backend builds (and caches, keyed by the exact q/k/v/mask shapes and strides) one cuDNN
SDPA graph per shape, and building one is slow.  Exact shapes make every chunk whose
prefix length was not seen before pay that build: a request resuming after a cached
prefix, or every last chunk of a new prompt length.  With a bucket ``G`` the kernel sees

  * K/V of ``roundup(n, G)`` tokens (the table padded with the sequence's first block,
    so the gather shape is fixed too), and
  * ``q_bucket(L)`` queries (zero rows appended; their outputs are dropped),

so the set of shapes is bounded (``max_context / G`` kv lengths times a few q lengths)
and can be warmed once.  Padding at the end breaks MLX's ``mask="causal"`` (aligned
bottom-right: the last query with the last key), so the prefix path uses an explicit
additive mask: query ``i`` (absolute position ``start + i``) sees key ``j`` iff
``j <= start + i``; padded keys sit at ``j >= n > start + i`` and are never seen.
A chunk without prefix pads q, k and v to the same length and keeps ``"causal"``
(equal lengths: top-left = bottom-right; real rows never reach padded keys).
A multiple of ``G`` (not the next power of two) bounds the waste to ``G`` tokens per
chunk; powers of two would waste up to half of the attention work of a long prefix.
"""

from __future__ import annotations

import mlx.core as mx

from slabserve.attention.base import DecodeBatch
from slabserve.attention.gather import gather_kv
from slabserve.attention.host_math import HostMath
from slabserve.kvcache.pool import SlabPool

_Q_STEP = 128  # q lengths above this round up to a multiple of it
# H100, Qwen2.5-0.5B shape, prompts spread over 50-100% of the context, concurrency 8:
# 1.25x / 1.15x output tok/s at 4k / 16k over exact shapes (docs/adr/0006-gpu-step-shapes.md)
CUDA_DEFAULT_BUCKET = 2048


def _on_cuda() -> bool:
    return mx.default_device().type == mx.gpu and mx.cuda.is_available()


def default_bucket() -> int:
    """The bucket where none is configured: CUDA_DEFAULT_BUCKET where MLX computes on a
    CUDA GPU, 0 (exact shapes) elsewhere."""
    return CUDA_DEFAULT_BUCKET if _on_cuda() else 0


def _roundup(n: int, g: int) -> int:
    return -(-n // g) * g


def q_bucket(length: int) -> int:
    """Padded query count: the next power of two (at least 16) up to ``_Q_STEP``, then
    a multiple of ``_Q_STEP``.  Always ``>= length``."""
    if length > _Q_STEP:
        return _roundup(length, _Q_STEP)
    return max(16, 1 << (length - 1).bit_length())


def kv_bucket_len(n: int, bucket: int, block_size: int) -> int:
    """Padded kv length: ``n`` rounded up to the bucket, then to whole blocks."""
    return _roundup(_roundup(n, bucket), block_size)


def prefill_attention(
    q: mx.array,
    k_new: mx.array,
    v_new: mx.array,
    pool: SlabPool,
    layer: int,
    prefix: DecodeBatch | None,
    scale: float,
    bucket: int = 0,
    host: HostMath | None = None,
) -> mx.array:
    """``q``, ``k_new``, ``v_new``: ``[1, heads, L, head_dim]`` for positions
    ``[start, start + L)``.  ``prefix`` describes the sequence's table with length
    ``start + L`` (None when ``start == 0``: the chunk attends to itself only).
    ``bucket``: tokens to round shapes to (0 = exact).
    Returns ``[1, q_heads, L, head_dim]`` in ``q``'s dtype; the result does not depend
    on the bucket beyond floating-point rounding.  Exact shapes take ``host``'s numpy
    softmax when it applies (float32 on CPU, large enough)."""
    if bucket > 0:
        return _bucketed(q, k_new, v_new, pool, layer, prefix, scale, bucket)
    if prefix is None:
        k, v = k_new, v_new
    else:
        k, v = gather_kv(pool, layer, prefix, q.dtype)  # an int8 pool: dequantized to q's
        n = prefix.lengths[0]
        k, v = k[:, :, :n], v[:, :, :n]
    if host is not None and host.attention_applies(q, k, v):
        return host.causal_attention(q, k, v, scale)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")


def _pad_rows(x: mx.array, rows: int) -> mx.array:
    """``x`` (``[1, H, L, D]``) with ``rows - L`` zero rows appended on axis 2."""
    extra = rows - x.shape[2]
    if extra == 0:
        return x
    return mx.concatenate([x, mx.zeros((*x.shape[:2], extra, x.shape[3]), x.dtype)], axis=2)


def _bucketed(q, k_new, v_new, pool, layer, prefix, scale, bucket) -> mx.array:
    length = q.shape[2]
    lq = q_bucket(length)
    if prefix is None:
        out = mx.fast.scaled_dot_product_attention(
            _pad_rows(q, lq), _pad_rows(k_new, lq), _pad_rows(v_new, lq),
            scale=scale, mask="causal")
        return out[:, :, :length]
    # an int8 pool is dequantized to q's dtype; else a dtype mismatch takes a boolean mask
    same = q.dtype == prefix.geom.dtype or prefix.geom.quantized
    padded, mask = _bucket_plan(prefix, length, lq, bucket, q.dtype if same else None)
    k, v = gather_kv(pool, layer, padded, q.dtype)
    out = mx.fast.scaled_dot_product_attention(_pad_rows(q, lq), k, v, scale=scale, mask=mask)
    return out[:, :, :length]


def _bucket_plan(
    prefix: DecodeBatch, length: int, lq: int, bucket: int, dtype: mx.Dtype | None
) -> tuple[DecodeBatch, mx.array]:
    """(the prefix with its table padded to the bucket, ``[1, 1, lq, nb]`` mask: additive
    in ``dtype``, boolean if None), built once per forward and shared by every layer
    through ``prefix._cache``."""
    key = ("prefill_bucket", length, lq, bucket, dtype)
    hit = prefix._cache.get(key)
    if hit is not None:
        return hit
    if prefix.batch != 1:
        raise ValueError("prefill attention takes one sequence")
    geom = prefix.geom
    n = prefix.lengths[0]
    nb = kv_bucket_len(n, bucket, geom.block_size)
    table = prefix.tables[0]
    table = table + [table[0]] * (nb // geom.block_size - len(table))
    padded = DecodeBatch(geom, [table], [n])
    start = n - length
    rows = start + mx.arange(lq, dtype=mx.int32)[:, None]
    visible = mx.arange(nb, dtype=mx.int32)[None, :] <= rows
    mask = visible if dtype is None else mx.where(
        visible, mx.array(0.0, dtype), mx.array(-mx.inf, dtype))
    mask = mask[None, None]
    prefix._cache[key] = (padded, mask)
    return padded, mask
