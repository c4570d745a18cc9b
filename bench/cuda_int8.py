"""int8 against float16 native decode attention on CUDA (``slabserve bench cuda-kernel
--int8``): per-layer time of the native kernel over a float16 pool and over the same pages
quantized (kvcache/quant.py), and each one's bandwidth floor.

The float16 floor is K+V bytes / copy bandwidth; the int8 floor counts the int8 values and
the float16 scales (``2 * B * ctx * kv_heads * (head_dim + 2)`` bytes).  Both pools hold the
same random pages on the same shuffled tables (the int8 one is the float16 one quantized),
timed in one process: chained (``layers`` distinct layers in one graph) and, with
``repeat`` > 1, marginal (bench.cuda_kernel.per_layer).  Other forms of the int8 kernel
(``extras``: ring depth, forced chunk count, forced merge form) are timed in the same
process beside the plan's.  Docs: docs/benchmarks/kv-int8.md.
"""

from __future__ import annotations

import json
import math
import re

import mlx.core as mx

from slabserve.attention.cuda_plan import plan_chunks
from slabserve.attention.native_cuda import NativeCUDA
from slabserve.attention.reference import quantized_copy
from slabserve.kvcache.quant import SCALE_DTYPE

DTYPES = ("float16", "int8")
EXTRA = re.compile(r"(?:st(\d+))?(?:c(\d+))?([fs]?)")


def parse_extra(name: str) -> tuple[int | None, int | None, bool | None]:
    """``st2`` / ``c16`` / ``s`` / ``f`` / ``c16s`` ... -> (ring depth, chunks, fused): the
    int8 kernel with a cp.async ring of that depth, that many chunks instead of the plan's,
    the chunk merge forced split (``s``) or fused (``f``); None: as shipped / planned."""
    m = EXTRA.fullmatch(name)
    if not name or m is None:
        raise ValueError(f"bad int8 form {name!r}: [st<depth>][c<chunks>][s|f]")
    st, c, f = m.groups()
    return (int(st) if st else None, int(c) if c else None,
            {"f": True, "s": False}.get(f))


def kv_bytes(b: int, ctx: int, hkv: int, d: int, dtype: str) -> int:
    """K and V bytes one layer reads: values, plus an int8 pool's scales."""
    per = 2 * d if dtype == "float16" else d + SCALE_DTYPE.size
    return 2 * b * ctx * hkv * per


def plan_label(nat: NativeCUDA, q: mx.array, pool, batch) -> str:
    """What ``nat`` plans for this step: chunks, then ``f`` (merge fused) or ``s`` (split)."""
    g = pool.geom
    params = nat._plan_params(q, g)
    chunks = plan_chunks(batch.batch, nat._head_blocks(q, g), params)
    return f"{chunks}{'f' if chunks > 1 and nat._fused(batch, g, params, chunks) else 's'}"


def _timed_native(res: dict, name: str, nat: NativeCUDA, q, pool, batch, layers: int,
                  repeat: int, chunks: int | None = None) -> None:
    from slabserve.bench.cuda_kernel import chain, per_layer

    reason = nat.decline(q, pool, batch)
    if reason:
        raise RuntimeError(f"{name}: native declined: {reason}")
    scale = 1.0 / math.sqrt(q.shape[-1])

    def attn(x, i):
        if chunks is None:
            return nat(x, pool, i, batch, scale)
        return nat._run(x, pool, i, batch, scale, chunks)

    res[f"{name}_us"], res[f"{name}_m_us"] = per_layer(
        lambda n: chain(attn, q, layers, n), layers, repeat)


def int8_cell(b: int, ctx: int, layers: int, bw: float, repeat: int, hq: int = 32,
              hkv: int = 8, d: int = 64, bs: int = 16, extras: tuple[str, ...] = ()) -> dict:
    """One (batch, context) cell: ``{dtype}_us`` (chained), ``{dtype}_m_us`` (marginal),
    ``{dtype}_floor_us`` for float16 and int8, the pool's slabs and the int8 plan
    (``int8_plan``, plan_label); ``extras`` (parse_extra names): also the int8 kernel in
    those forms (``int8_{name}_us``, ``int8_{name}_m_us``)."""
    from slabserve.attention.base import DecodeBatch
    from slabserve.bench.cuda_kernel import make_case

    fpool, fbatch, q = make_case([ctx] * b, hq, hkv, d, bs, mx.float16, 4096, layers=layers)
    res = dict(B=b, ctx=ctx, layers=layers, shape=f"{hq}/{hkv}/{d}", slabs=fpool.num_slabs)
    qpool = quantized_copy(fpool)
    pools = {"float16": (fpool, fbatch),
             "int8": (qpool, DecodeBatch(qpool.geom, fbatch.tables, fbatch.lengths))}
    for dtype in DTYPES:
        pool, batch = pools[dtype]
        nat = NativeCUDA()
        _timed_native(res, dtype, nat, q, pool, batch, layers, repeat)
        res[f"{dtype}_plan"] = plan_label(nat, q, pool, batch)
        res[f"{dtype}_floor_us"] = kv_bytes(b, ctx, hkv, d, dtype) / bw * 1e6
    pool, batch = pools["int8"]
    for name in extras:
        depth, chunks, fused = parse_extra(name)
        nat = NativeCUDA(fused_merge=fused)
        if depth:
            nat.stages = depth
        _timed_native(res, f"int8_{name}", nat, q, pool, batch, layers, repeat, chunks)
    return res


def int8_table(cells, layers: int, repeat: int, bw: float,
               extras: tuple[str, ...] = ()) -> list[dict]:
    """Rows of ``int8_cell`` for every (batch, context), printed as JSON lines."""
    for name in extras:
        parse_extra(name)  # fail before any timing
    rows = []
    for b, ctx in cells:
        r = int8_cell(b, ctx, layers, bw, repeat, extras=extras)
        r["bw_TBps"] = bw / 1e12
        rows.append(r)
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}),
              flush=True)
        mx.clear_cache()
    return rows
