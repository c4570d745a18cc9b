"""Symmetric int8 K/V quantization with one float16 scale per (token, kv head).

A quantized pool (``PoolGeometry.dtype`` is ``mx.int8``) keeps, beside each value slab of
``[rows, head_dim]`` int8, a scale slab of ``[rows, 1]`` float16 with the same row
addressing (row = (local block * kv_heads + head) * block_size + position), so the
``WritePlan`` rows that scatter the values scatter their scales too, and a page gathered
by block id comes with its scales by the same ids.

Why per token (docs/benchmarks/kv-int8.md): quantize-on-write touches only the new
tokens' rows (a per-block scale would have to re-scale a block's earlier tokens whenever a
larger value arrives); the scale costs 2 bytes per ``head_dim`` bytes (head_dim 64:
float16 / int8 = 128 / 66 = 1.94x the tokens per byte).

Invariants:
  * ``q = clip(round(x / s), -127, 127)`` with ``s = float16(absmax(x) / 127)`` over the
    head_dim axis; a row of zeros gets ``s = 0`` and ``q = 0``;
  * ``|x - q * s| <= s / 2 (+ rounding of s)``: per element at most ~``absmax / 254``;
  * ``dequantize(q, s, dtype)`` is ``q * s`` computed in ``dtype``.
"""

from __future__ import annotations

import mlx.core as mx

QUANT_DTYPE = mx.int8
SCALE_DTYPE = mx.float16
QMAX = 127


def is_quantized(dtype: mx.Dtype) -> bool:
    """Whether a pool of this dtype stores int8 values with scales."""
    return dtype == QUANT_DTYPE


def quantize(x: mx.array) -> tuple[mx.array, mx.array]:
    """(int8 values of ``x``'s shape, float16 scales of shape ``[..., 1]``): one scale per
    row of the last axis."""
    xf = x.astype(mx.float32)
    scale = (mx.abs(xf).max(axis=-1, keepdims=True) / QMAX).astype(SCALE_DTYPE)
    s = scale.astype(mx.float32)
    q = mx.clip(mx.round(xf / mx.where(s > 0, s, 1.0)), -QMAX, QMAX).astype(QUANT_DTYPE)
    return q, scale


def dequantize(q: mx.array, scale: mx.array, dtype: mx.Dtype) -> mx.array:
    """``q * scale`` in ``dtype`` (``scale`` broadcasts over the last axis)."""
    return q.astype(dtype) * scale.astype(dtype)
