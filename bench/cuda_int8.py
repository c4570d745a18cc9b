"""int8 against float16 native decode attention on CUDA (``slabserve bench cuda-kernel
--int8``): per-layer time of the native kernel over a float16 pool and over the same pages
quantized (kvcache/quant.py), and each one's bandwidth floor.

The float16 floor is K+V bytes / copy bandwidth; the int8 floor counts the int8 values and
the float16 scales (``2 * B * ctx * kv_heads * (head_dim + 2)`` bytes).  Both pools hold the
same random pages on the same shuffled tables (the int8 one is the float16 one quantized),
timed in one process: chained (``layers`` distinct layers in one graph) and, with
``repeat`` > 1, marginal (bench.cuda_kernel.per_layer).  Docs: docs/benchmarks/kv-int8.md.
"""

from __future__ import annotations

import json
import math

import mlx.core as mx

from slabserve.attention.native_cuda import NativeCUDA
from slabserve.attention.reference import quantized_copy
from slabserve.kvcache.quant import SCALE_DTYPE

DTYPES = ("float16", "int8")


def kv_bytes(b: int, ctx: int, hkv: int, d: int, dtype: str) -> int:
    """K and V bytes one layer reads: values, plus an int8 pool's scales."""
    per = 2 * d if dtype == "float16" else d + SCALE_DTYPE.size
    return 2 * b * ctx * hkv * per


def int8_cell(b: int, ctx: int, layers: int, bw: float, repeat: int, hq: int = 32,
              hkv: int = 8, d: int = 64, bs: int = 16, stages: tuple[int, ...] = ()) -> dict:
    """One (batch, context) cell: ``{dtype}_us`` (chained), ``{dtype}_m_us`` (marginal),
    ``{dtype}_floor_us`` for float16 and int8, and the pool's slabs; ``stages``: also the
    int8 kernel with these cp.async ring depths (``int8_st{n}_us``, ``int8_st{n}_m_us``)."""
    from slabserve.attention.base import DecodeBatch
    from slabserve.bench.cuda_kernel import chain, make_case, per_layer

    fpool, fbatch, q = make_case([ctx] * b, hq, hkv, d, bs, mx.float16, 4096, layers=layers)
    res = dict(B=b, ctx=ctx, layers=layers, shape=f"{hq}/{hkv}/{d}", slabs=fpool.num_slabs)
    scale = 1.0 / math.sqrt(d)
    pools = {"float16": (fpool, fbatch)}
    qpool = quantized_copy(fpool)
    pools["int8"] = (qpool, DecodeBatch(qpool.geom, fbatch.tables, fbatch.lengths))
    runs = [(dtype, dtype, None) for dtype in DTYPES]
    runs += [(f"int8_st{n}", "int8", n) for n in stages]
    for name, dtype, depth in runs:
        pool, batch = pools[dtype]
        nat = NativeCUDA()
        if depth:
            nat.stages = depth
        reason = nat.decline(q, pool, batch)
        if reason:
            raise RuntimeError(f"{name}: native declined: {reason}")
        res[f"{name}_us"], res[f"{name}_m_us"] = per_layer(
            lambda n, nat=nat, pool=pool, batch=batch: chain(
                lambda x, i: nat(x, pool, i, batch, scale), q, layers, n), layers, repeat)
        res[f"{dtype}_floor_us"] = kv_bytes(b, ctx, hkv, d, dtype) / bw * 1e6
    return res


def int8_table(cells, layers: int, repeat: int, bw: float,
               stages: tuple[int, ...] = ()) -> list[dict]:
    """Rows of ``int8_cell`` for every (batch, context), printed as JSON lines."""
    rows = []
    for b, ctx in cells:
        r = int8_cell(b, ctx, layers, bw, repeat, stages=stages)
        r["bw_TBps"] = bw / 1e12
        rows.append(r)
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}),
              flush=True)
        mx.clear_cache()
    return rows
