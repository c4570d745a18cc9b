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


@pytest.mark.parametrize("slab_blocks,tokens", [(2, 37), (64, 5), (2, 1), (3, 8)])
@pytest.mark.parametrize("dtype", [mx.float32, mx.int8])
def test_spread_plan_writes_what_the_grouped_plan_writes(slab_blocks, tokens, dtype):
    """SpreadWritePlan (one write of every row per slab touched; compiled step graphs)
    leaves the pool exactly as WritePlan does, for shuffled tokens over several slabs and
    for a quantized pool (values and scales); its shape depends on the slabs touched only,
    and a rebound plan writes the same."""
    from slabserve.kvcache.spread import SpreadWritePlan

    geom = PoolGeometry(num_layers=2, kv_heads=3, head_dim=8, block_size=4,
                        slab_blocks=slab_blocks, dtype=dtype)
    rng = np.random.default_rng(slab_blocks + tokens)
    blocks = [int(b) for b in rng.permutation(12)]
    slots = [(blocks[p % 12], int(rng.integers(4))) for p in range(tokens)]
    slots = list(dict.fromkeys(slots))  # one token per position
    rng.shuffle(slots)
    k = mx.array(rng.standard_normal((len(slots), 3, 8)).astype(np.float32))
    v = mx.array(rng.standard_normal((len(slots), 3, 8)).astype(np.float32))
    spread = SpreadWritePlan(geom, slots)
    pools = []
    for plan in (WritePlan(geom, slots), spread, spread.rebind(mx.array(spread.packed))):
        pool = SlabPool(geom, initial_slabs=-(-12 // slab_blocks))
        pool.write(1, plan, k, v)
        mx.eval(pool.take_pending())
        pools.append(pool.arrays())
    for other in pools[1:]:
        assert all(mx.array_equal(a, b) for a, b in zip(pools[0], other, strict=True))
    assert spread.layout == tuple(sorted({b // slab_blocks for b, _ in slots}))
    rows = len(slots) * 3
    assert spread.packed.size == (rows if len(spread.layout) == 1
                                  else len(spread.layout) * rows * 2)
    # a padded batch: two extra copies of token 0 with other values write nothing new
    pad = 2
    padded = SpreadWritePlan(geom, slots + [slots[0]] * pad, pad)
    noise = mx.array(rng.standard_normal((pad, 3, 8)).astype(np.float32))
    pool = SlabPool(geom, initial_slabs=-(-12 // slab_blocks))
    pool.write(1, padded, mx.concatenate([k, noise]), mx.concatenate([v, -noise]))
    mx.eval(pool.take_pending())
    assert all(mx.array_equal(a, b) for a, b in zip(pools[0], pool.arrays(), strict=True))
    assert padded.key == (spread.layout, True)
