import mlx.core as mx
import numpy as np
import pytest

from slabserve.kvcache import BlockAllocator, PoolGeometry, SlabPool
from slabserve.kvcache.pool import GatherPlan, WritePlan


@pytest.mark.parametrize("slab_blocks", [2, 64])
def test_write_then_gather_across_slabs(slab_blocks):
    geom = PoolGeometry(num_layers=2, kv_heads=3, head_dim=8, block_size=4, slab_blocks=slab_blocks)
    pool = SlabPool(geom)
    alloc = BlockAllocator(slab_blocks, 64, on_grow=pool.grow)
    rng = np.random.default_rng(0)
    blocks = alloc.allocate(10)
    rng.shuffle(blocks)
    n = 37  # tokens spanning 10 blocks
    slots = [(blocks[p // 4], p % 4) for p in range(n)]
    k = rng.standard_normal((n, 3, 8)).astype(np.float32)
    v = rng.standard_normal((n, 3, 8)).astype(np.float32)
    pool.write(1, WritePlan(geom, slots), mx.array(k), mx.array(v))
    mx.eval(pool.take_pending())
    plan = GatherPlan(geom, [blocks, blocks[:3]])
    for side, ref in ((0, k), (1, v)):
        got = np.array(pool.gather(1, side, plan))  # [2, 10, H, bs, D]
        seq0 = got[0].transpose(1, 0, 2, 3).reshape(3, 40, 8)[:, :n]
        np.testing.assert_array_equal(seq0, ref.transpose(1, 0, 2))
        seq1 = got[1, :3].transpose(1, 0, 2, 3).reshape(3, 12, 8)
        np.testing.assert_array_equal(seq1, ref[:12].transpose(1, 0, 2))
    assert (len(plan.groups) > 1) == (slab_blocks == 2)
    # layer 0 untouched
    assert float(mx.abs(pool.slab(0, 0, 0)).sum()) == 0.0


def test_growth_keeps_old_slabs_and_counts_bytes():
    geom = PoolGeometry(num_layers=1, kv_heads=2, head_dim=4, block_size=2, slab_blocks=3,
                        dtype=mx.float16)
    pool = SlabPool(geom, initial_slabs=1)
    first = pool.k[0][0]
    pool.grow(3)
    assert pool.num_slabs == 3 and pool.k[0][0] is first
    assert pool.nbytes == 3 * 3 * 2 * (2 * 2 * 4 * 2)
    assert geom.slabs_for_budget(pool.nbytes) == 3
