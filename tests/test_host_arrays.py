"""slabserve.kvcache.arrays.host_array: the values, shape and dtype of ``mx.array``, with arrays of
at most 8 bytes given a 16-byte backing buffer (out of MLX's CUDA scalar pool)."""

import mlx.core as mx
import numpy as np
import pytest

from slabserve.attention.base import DecodeBatch
from slabserve.kvcache.arrays import host_array
from slabserve.kvcache.pool import PoolGeometry, WritePlan


@pytest.mark.parametrize("values, dtype", [
    ([5], mx.int32), ([[7]], mx.int32), ([1, 2], mx.int32), ([1, 2, 3], mx.int32),
    (np.array([[3], [4]], dtype=np.int32), mx.int32), ([0.5], mx.float32), (3, mx.int32),
    ([], mx.int32), (list(range(100)), mx.int32), ([-2**31, 2**31 - 1], mx.int32),
])
def test_same_array_as_mx_array(values, dtype):
    want = mx.array(values, dtype=dtype)
    got = host_array(values, dtype)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert mx.array_equal(got, want).item()
    # usable in arithmetic and indexing like the plain array
    assert mx.array_equal(got * 2, want * 2).item()


def test_step_arrays_use_it():
    geom = PoolGeometry(1, 2, 64, 16, 8, mx.float16)
    batch = DecodeBatch(geom, [[3]], [5])
    assert batch.lengths_array.tolist() == [5] and batch.table_array.tolist() == [[3]]
    plan = WritePlan(geom, [(3, 4), (5, 0)])
    (slab, lo, hi, rows), = plan.groups
    assert (slab, lo, hi) == (0, 0, 4) and plan.perm is None
    assert rows.tolist() == [3 * 2 * 16 + 4, 3 * 2 * 16 + 20, 5 * 2 * 16, 5 * 2 * 16 + 16]
    # one token: a strided slice of the slab's rows, no host array at all
    (slab, lo, hi, rows), = WritePlan(geom, [(3, 4)]).groups
    assert (slab, lo, hi) == (0, 0, 2)
    assert list(range(rows.start, rows.stop, rows.step)) == [3 * 2 * 16 + 4, 3 * 2 * 16 + 20]
