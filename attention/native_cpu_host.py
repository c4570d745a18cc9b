"""The native CPU decode path's numpy variant: a float32 pool's pages read in place
through numpy views of the slabs, both products by numpy's BLAS.

On MLX's CPU backend a decode step of a small model is bound by MLX's cost per op, not by
its arithmetic: the MLX native path (attention/native_cpu.py) spends ~25 ops a layer on
gathering pages, masking, the online softmax and the merge.  Here a layer is one
evaluation (the queries and the layer's pending K/V writes), one gather of the pages in
``[B, kv_heads, T, D]`` order (one numpy take per slab touched), two batched matmuls
(numpy's OpenBLAS, whichever BLAS MLX runs on) and an in-place softmax.

Applies (``host_decode_applies``): float32 queries over a float32 pool on the CPU, outside
``mx.compile`` (the runner hands a step's ``DecodeBatch`` a ``HostMath`` only for eager
forwards).  Invariants as the MLX path's: any slab count and table order, ragged lengths
(each sequence attends to exactly its first ``lengths[b]`` tokens), output of ``q``'s shape
and dtype.
"""

from __future__ import annotations

import threading

import mlx.core as mx
import numpy as np

from slabserve.attention.base import DecodeBatch
from slabserve.kvcache.pool import SlabPool, padded_table

# K and V pages of one layer gathered at once (the MLX path goes chunk by chunk instead)
HOST_MAX_BYTES = 256 << 20


def host_decode_applies(q: mx.array, pool: SlabPool) -> bool:
    return (q.dtype == mx.float32 and pool.geom.dtype == mx.float32
            and mx.default_device() == mx.cpu)


class HostDecoder:
    """``host_decode`` with reused scratch buffers, one set per thread: fresh multi-MB
    numpy arrays every layer cost their page faults (a 2 MB page gather took 2 ms fresh
    against 0.25 ms into a reused buffer on the 2-core test machine)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def _buffer(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        bufs = getattr(self._local, "bufs", None)
        if bufs is None:
            bufs = self._local.bufs = {}
        n = int(np.prod(shape))
        buf = bufs.get(name)
        if buf is None or buf.size < n:
            buf = bufs[name] = np.empty(max(n, 2 * (0 if buf is None else buf.size)),
                                        dtype=np.float32)
        return buf[:n].reshape(shape)

    def _pages(self, name: str, slabs: list[mx.array], geom, page: np.ndarray,
               slab_of: np.ndarray, touched: list[int]) -> np.ndarray:
        """Rows ``page`` (``[B, H, nblk]`` page ids within their slab ``slab_of``) of one
        layer's value slabs as ``[B, H, nblk * block_size, D]``."""
        bs, d = geom.block_size, geom.head_dim
        b, h, n = page.shape
        out = self._buffer(name, (b * h * n, bs, d))
        views = [np.asarray(slabs[s]).reshape(-1, bs, d) for s in touched]
        if len(views) == 1:
            np.take(views[0], page.reshape(-1), axis=0, out=out)
        else:
            flat_slab, flat_page = slab_of.reshape(-1), page.reshape(-1)
            for s, view in zip(touched, views, strict=True):
                sel = np.flatnonzero(flat_slab == s)
                out[sel] = view[flat_page[sel]]
        return out.reshape(b, h, n * bs, d)

    def __call__(self, q: mx.array, pool: SlabPool, layer: int, batch: DecodeBatch,
                 scale: float) -> mx.array:
        """Decode attention of ``q`` (``[B, q_heads, 1, D]`` float32) over ``batch``'s
        pages of ``layer`` (module docstring)."""
        g = pool.geom
        b, hq, _, d = q.shape
        h, sb = g.kv_heads, g.slab_blocks
        rows = padded_table(batch.tables)
        slab_of = np.broadcast_to((rows // sb)[:, None, :], (b, h, rows.shape[1]))
        page = (rows % sb)[:, None, :] * h + np.arange(h)[None, :, None]
        touched = np.unique(rows // sb).tolist()
        mx.eval(q, [pool.k[layer][s] for s in touched], [pool.v[layer][s] for s in touched])
        k = self._pages("k", pool.k[layer], g, page, slab_of, touched)
        v = self._pages("v", pool.v[layer], g, page, slab_of, touched)
        qn = np.asarray(q).reshape(b, h, hq // h, d) * np.float32(scale)
        s = np.matmul(qn, k.swapaxes(-1, -2), out=self._buffer("s", (b, h, hq // h, k.shape[2])))
        for i, n in enumerate(batch.lengths):
            s[i, :, :, n:] = -np.inf  # padding and the table's tail: never attended
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)
        out = np.matmul(s, v)  # [B, H, G, D]
        return mx.array(out.reshape(b, hq, 1, d))
