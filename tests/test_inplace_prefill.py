"""Prefill chunks written in place on CUDA (kvcache/inplace.py; ADR 0014).

On CPU, where the kernel does not run:
- A chunk's rows under the kernel's contract (``reference_write``) leave the pool as the
  scatter plan's writes do. The chunk spans blocks of several slabs in any order.
- ``SlabPool.gather`` reads a layer only after that layer's in-place write. Its block ids
  take the write's token as an input.
- A runner whose prefill chunks go through a writer (a stand-in that scatters by the plan's
  rows) gives the same logits and pool as one that scatters. The second chunk gathers its
  own rows back through its prefix.

The CUDA side runs in the step-graph and async-scheduling generation tests, whose prompts
are prefilled through the runner's writer.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import load
from models import make_cuda
from test_inplace_write import _host, needs_cuda

from slabserve.attention.reference import random_pool
from slabserve.engine.config import CacheConfig, RunnerConfig
from slabserve.engine.runner import ModelRunner, SeqInput
from slabserve.kvcache import PoolGeometry
from slabserve.kvcache.inplace import InPlaceWritePlan, reference_write
from slabserve.kvcache.pool import GatherPlan, WritePlan
from slabserve.kvcache.quant import quantize


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.int8])
def test_chunk_rows_put_each_token_where_the_scatter_does(dtype):
    g = PoolGeometry(1, 2, 8, 4, 5, dtype)  # 3 slabs of five 4-token blocks
    pool = random_pool(g, 3, mx.random.key(1))
    blocks = [7, 2, 13, 9, 0]  # slabs 1, 0, 2, 1, 0: not in slab order
    slots = [(blocks[p // 4], p % 4) for p in range(3, 19)]  # 16 tokens from position 3
    k, v = (mx.random.normal((len(slots), 2, 8), key=mx.random.key(i)) for i in (2, 3))
    flat_k, flat_v = k.reshape(-1, 8), v.reshape(-1, 8)
    if g.quantized:
        (kq, ks), (vq, vs) = quantize(flat_k), quantize(flat_v)
        new = [kq, vq, ks, vs]
    else:
        new = [flat_k.astype(dtype), flat_v.astype(dtype), None, None]
    plan = InPlaceWritePlan(g, slots, writer=None)
    want = reference_write([_host(a) for a in pool.arrays()], np.array(plan.packed), new,
                           g.slab_blocks * g.kv_heads * g.block_size)
    pool.write(0, WritePlan(g, slots), k, v)
    for got, w in zip((_host(a) for a in pool.arrays()), want, strict=True):
        np.testing.assert_array_equal(got, w)


def test_gather_waits_for_the_layers_in_place_write(tmp_path):
    """The gather's graph holds the layer's write token (a ``Sort`` node here) once the
    token is in ``deps``; not another layer's token, and none after ``take_pending``."""
    g = PoolGeometry(1, 2, 8, 4, 5, mx.float16)
    pool = random_pool(g, 2, mx.random.key(4))
    plan = GatherPlan(g, [[1, 6, 3]])

    def depends_on_token(tmp) -> bool:
        mx.export_to_dot(str(tmp), pool.gather(0, 0, plan))
        return "Sort" in tmp.read_text()

    token = mx.sort(mx.arange(4, dtype=mx.int32))
    pool.deps[1] = token
    assert not depends_on_token(tmp_path / "other.dot")
    pool.deps[0] = token
    assert depends_on_token(tmp_path / "own.dot")
    pool.take_pending()
    assert not depends_on_token(tmp_path / "after.dot")
    # and the values are the gather's own (the token adds zero to the ids)
    pool.deps[0] = mx.full((4,), 12345, dtype=mx.int32)
    with_dep = pool.gather(0, 1, plan)
    pool.deps.clear()
    assert mx.array_equal(with_dep, pool.gather(0, 1, plan)).item()


class ScatterWriter:
    """The kernel's contract on CPU: the plan's global rows written into the layer's
    slabs (MLX's own scatters), a token back."""

    def __init__(self) -> None:
        self.calls = 0

    def write(self, pool, layer, rows, k, v, k_scale=None, v_scale=None):
        self.calls += 1
        g = pool.geom
        r = np.array(rows).astype(np.int64)
        keep = np.flatnonzero(r >= 0)
        slab, local = np.divmod(r[keep], g.slab_blocks * g.kv_heads * g.block_size)
        sides = [(pool.k[layer], k), (pool.v[layer], v)]
        if k_scale is not None:
            sides += [(pool.k_scale[layer], k_scale), (pool.v_scale[layer], v_scale)]
        for slabs, new in sides:
            for s in np.unique(slab):
                sel = keep[slab == s]
                slabs[s][mx.array(local[slab == s].astype(np.int32))] = \
                    new[mx.array(sel.astype(np.int32))]
        return mx.zeros((4,), dtype=mx.int32)


@pytest.mark.parametrize("kv_dtype", [None, "int8"])
def test_prefill_through_a_writer_matches_scatters(model_root, kv_dtype):
    model = load(str(make_cuda(model_root)))[0]
    cache = CacheConfig(block_size=16, slab_tokens=64, kv_budget_bytes=1 << 22,
                        dtype=kv_dtype)
    runners = [ModelRunner(model, cache, RunnerConfig()) for _ in range(2)]
    writer = ScatterWriter()
    runners[1].inplace_writer = writer
    prompt = [int(t) for t in np.random.default_rng(5).integers(1, 250, 70)]
    logits = []
    for runner in runners:
        table = runner.allocator.allocate(6)
        table = table[3:] + table[:3]  # blocks of more than one slab, out of order
        runner.forward([SeqInput(prompt[:40], 0, table, want_logits=False)], [])
        pre, _ = runner.forward([SeqInput(prompt[40:], 40, table)], [])
        _, dec = runner.forward([], [SeqInput([int(mx.argmax(pre[0]).item())], 70, table)])
        logits.append((pre[0], dec))
        mx.eval(logits[-1], runner.pool.arrays())
    layers = len(runners[0].caches)
    assert writer.calls == 3 * layers  # both chunks and the decode step: the writer
    assert runners[1].pool.num_slabs > 1
    for a, b in zip(logits[0], logits[1], strict=True):
        np.testing.assert_array_equal(np.array(a), np.array(b))
    for a, b in zip(runners[0].pool.arrays(), runners[1].pool.arrays(), strict=True):
        np.testing.assert_array_equal(_host(a), _host(b))



@needs_cuda
@pytest.mark.parametrize("kv_dtype", [None, "int8"])
def test_cuda_prefill_in_place_matches_scatters(model_root, kv_dtype):
    """On CUDA the runner's own writer takes prefill chunks and staged decode steps: the
    same logits and pool as scatters (``--no-inplace-kv-writes``), the second chunk
    gathering its rows back, then one forward holding another prompt's chunk and a staged
    decode step (step graphs off) of the first."""
    model = load(str(make_cuda(model_root)))[0]
    cache = CacheConfig(block_size=16, slab_tokens=64, kv_budget_bytes=1 << 22,
                        dtype=kv_dtype)
    runners = [ModelRunner(model, cache, RunnerConfig(compile_decode=True,
                                                      inplace_kv_writes=inplace))
               for inplace in (False, True)]
    assert runners[0].inplace_writer is None and runners[1].inplace_writer is not None
    prompt = [int(t) for t in np.random.default_rng(6).integers(1, 250, 70)]
    logits = []
    for runner in runners:
        table = runner.allocator.allocate(6)
        table = table[3:] + table[:3]
        runner.forward([SeqInput(prompt[:40], 0, table, want_logits=False)], [])
        pre, _ = runner.forward([SeqInput(prompt[40:], 40, table)], [])
        mx.eval(pre)
        runner.step_graph = False  # the decode runs staged, beside a prefill chunk
        other = runner.allocator.allocate(2)
        pre2, dec = runner.forward([SeqInput(prompt[:30], 0, other)],
                                   [SeqInput([int(mx.argmax(pre[0]).item())], 70, table)])
        logits.append(mx.concatenate([pre[0], pre2[0], dec[0]]))
        mx.eval(logits[-1], runner.pool.arrays())
    np.testing.assert_array_equal(np.array(logits[0]), np.array(logits[1]))
    for a, b in zip(runners[0].pool.arrays(), runners[1].pool.arrays(), strict=True):
        np.testing.assert_array_equal(_host(a), _host(b))
