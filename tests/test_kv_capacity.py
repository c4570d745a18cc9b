"""Capacity of an int8 pool (issue 24): the same ``kv_budget_bytes`` holds >= 1.9x the
blocks of a float16 pool, sized as the runner sizes it (``CacheConfig.slab_blocks`` from the
values' bytes per token, then whole slabs of ``PoolGeometry.slabs_for_budget``)."""

import mlx.core as mx
import pytest

from slabserve.engine.config import CacheConfig, auto_slab_tokens
from slabserve.kvcache.pool import PoolGeometry, SlabPool

GIB = 1 << 30
SHAPES = {  # (layers, kv heads, head_dim)
    "qwen2.5-0.5b": (24, 2, 64),
    "llama-3.2-1b": (16, 8, 64),
    "llama-3-8b": (32, 8, 128),
}
BUDGETS = [GIB // 2, GIB, 2 * GIB, 4 * GIB, 8 * GIB, 64 * GIB, 3 * GIB + 12345]


def capacity(shape, budget: int, dtype: str, **cfg) -> tuple[PoolGeometry, int]:
    """(geometry, blocks the pool may hold), as engine/runner.py builds them."""
    layers, kvh, d = shape
    c = CacheConfig(kv_budget_bytes=budget, dtype=dtype, **cfg)
    mdt = getattr(mx, dtype)
    geom = PoolGeometry(layers, kvh, d, c.block_size,
                        c.slab_blocks(2 * layers * kvh * d * mdt.size), mdt)
    return geom, geom.slabs_for_budget(budget) * geom.slab_blocks


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("name", SHAPES)
def test_int8_holds_at_least_1_9x_the_blocks_of_float16(name, budget):
    g16, b16 = capacity(SHAPES[name], budget, "float16")
    g8, b8 = capacity(SHAPES[name], budget, "int8")
    assert b8 / b16 >= 1.9, (name, budget, b8 / b16)
    assert g8.slab_bytes <= g16.slab_bytes  # an int8 slab: a 16-bit slab's bytes at most
    assert g8.slabs_for_budget(budget) * g8.slab_bytes <= budget
    assert g8.slabs_for_budget(budget) <= 32  # the automatic size's slab cap still holds


def test_float_pools_and_explicit_slab_sizes_are_unchanged():
    layers, kvh, d = SHAPES["llama-3.2-1b"]
    tb = 2 * layers * kvh * d * 2
    assert CacheConfig(kv_budget_bytes=GIB).slab_blocks(tb) * 16 == auto_slab_tokens(GIB, tb)
    for dtype in ("float16", "int8"):
        assert CacheConfig(slab_tokens=2048, dtype=dtype).slab_blocks(tb) == 128


def test_int8_slab_with_exact_scale_bytes_and_allocation():
    """``scale_bytes`` given (head_dim 128: 2 bytes per 128 values): the slab fills the
    16-bit slab's bytes more closely; what a slab allocates is what the geometry counts."""
    layers, kvh, d = SHAPES["llama-3-8b"]
    values = 2 * layers * kvh * d
    c = CacheConfig(kv_budget_bytes=4 * GIB, dtype="int8")
    exact, default = c.slab_blocks(values, 2 * layers * kvh * 2), c.slab_blocks(values)
    assert exact > default
    g = PoolGeometry(layers, kvh, d, 16, exact, mx.int8)
    assert g.slab_bytes <= auto_slab_tokens(4 * GIB, 2 * values) * 2 * values
    small = PoolGeometry(2, 2, 64, 16, 3, mx.int8)
    pool = SlabPool(small, initial_slabs=1)
    held = sum(a.nbytes for side in (pool.k, pool.v, pool.k_scale, pool.v_scale)
               for layer in side for a in layer)
    assert held == small.slab_bytes


def preallocated(shape, budget: int, dtype: str) -> tuple[PoolGeometry, int]:
    """(geometry, blocks) of a preallocated pool without ``slab_tokens``, as the runner
    sizes it (``CacheConfig.whole_pool_slab_blocks``)."""
    layers, kvh, d = shape
    c = CacheConfig(kv_budget_bytes=budget, dtype=dtype, preallocate=True)
    mdt = getattr(mx, dtype)
    one = PoolGeometry(layers, kvh, d, c.block_size, 1, mdt)
    sb = c.whole_pool_slab_blocks(one.block_bytes, kvh * c.block_size * d)
    geom = PoolGeometry(layers, kvh, d, c.block_size, sb, mdt)
    return geom, geom.slabs_for_budget(budget) * sb


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_preallocated_pool_is_the_fewest_slabs_of_the_budget(name, budget, dtype):
    """One slab unless a layer's array would pass MAX_SLAB_ELEMENTS; the budget's blocks
    all there (less than a block per slab lost to rounding); int8 still >= 1.9x."""
    from slabserve.engine.config import MAX_SLAB_ELEMENTS

    layers, kvh, d = SHAPES[name]
    g, blocks = preallocated(SHAPES[name], budget, dtype)
    slabs = g.slabs_for_budget(budget)
    whole = budget // g.block_bytes
    assert g.slab_blocks * kvh * g.block_size * d <= MAX_SLAB_ELEMENTS
    assert slabs == max(1, -(-whole * kvh * g.block_size * d // MAX_SLAB_ELEMENTS))
    assert whole - slabs < blocks <= whole and slabs * g.slab_bytes <= budget
    if budget <= GIB:
        assert slabs == 1
    if dtype == "int8":
        assert blocks / preallocated(SHAPES[name], budget, "float16")[1] >= 1.9
