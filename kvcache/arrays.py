"""Small host-built arrays (block tables, lengths, positions, write rows) that GPU kernels
read, kept out of MLX's scalar pool.

MLX's CUDA allocator serves every buffer of at most 8 bytes from one managed
(``cudaMallocManaged``) pool marked read-mostly.  A kernel whose first reads are such a
buffer (a 4-byte scale, the lengths of a one-sequence batch, its one position) waited
~9 us for them on an H200, at every launch (experiments/block_stamps.py;
docs/benchmarks/cuda-attention.md, "Eighth session").  ``host_array`` gives arrays of at
most 8 bytes a 16-byte backing buffer and returns a view of its first elements: the same
values, shape and dtype, allocated like any other buffer.  Elsewhere (CPU, Metal) the
view costs nothing.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

POOL_MAX_BYTES = 8  # MLX's CUDA allocator: buffers up to this size come from the pool
BACKING_BYTES = 16


def host_array(values, dtype: mx.Dtype = mx.int32) -> mx.array:
    """``mx.array(values, dtype=dtype)``, backed by at least BACKING_BYTES bytes.  The
    size is read on the host (numpy), so a small array never takes a scalar-pool buffer,
    not even a throwaway one."""
    host = np.asarray(values)
    n = host.size
    if n * dtype.size > POOL_MAX_BYTES or n == 0:
        return mx.array(host, dtype=dtype)
    pad = [0] * (BACKING_BYTES // dtype.size - n)
    return mx.array(host.reshape(-1).tolist() + pad, dtype=dtype)[:n].reshape(host.shape)
