"""The int8 CUDA decode kernel (issue 24; attention/kernels/pooled_decode_int8.cu): launch
plumbing, sources and the probe's quantized pool everywhere; the kernel against float64
references where a CUDA device is present (the lent GPU machine): the dequantized pool at
the kernel's float16 arithmetic, the float16 data within the int8 bound
(docs/benchmarks/kv-int8.md)."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from cuda_fakes import FakeKernel

from slabserve.attention.cuda_plan import plan_chunks
from slabserve.attention.cuda_source import (
    INT8_VARIANT,
    case_variant,
    group_block,
    kernel_body,
    shape_decline,
    slab_bucket,
    smem_bytes,
)
from slabserve.attention.native_cuda import NativeCUDA
from slabserve.attention.reference import random_case, reference_decode
from slabserve.kvcache.pool import PoolGeometry

needs_cuda = pytest.mark.skipif(not mx.cuda.is_available(),
                                reason="needs a CUDA device (MLX CUDA build)")

# bounds (max |error| / max |reference|) by q's dtype, against the dequantized pool: q and
# the probabilities go through float16 in the kernel (bfloat16: output rounding too).
# Against the float16 data the kernel may add only that to the quantization's own error
# (the float64 reference on the dequantized pool against it: up to absmax / 254 of a row
# an element, 8.2e-3 of max |reference| measured on case 1, head_dim 128, 5-token rows)
DEQ_TOL = {"f16": 4e-3, "f32": 4e-3, "bf16": 8e-3}
QUANT_MAX = 1.2e-2  # sanity: the quantization error of these cases stays below this
QDT = {"f16": mx.float16, "bf16": mx.bfloat16, "f32": mx.float32}
INT8_MATRIX = [  # (q dtype, head_dim, block, q heads, kv heads, slab blocks, lengths)
    ("f16", 64, 16, 32, 8, 160, (1, 37, 700, 1500)),
    ("f16", 128, 16, 32, 8, 24, (5, 300, 1029)),
    ("bf16", 64, 32, 14, 2, 24, (5, 300, 1029)),
    ("f32", 128, 32, 8, 8, 160, (1, 37, 700, 1500)),
    ("f16", 64, 64, 64, 4, 16, (2000, 17)),
    ("f16", 64, 16, 16, 1, 40, (1, 2, 3)),
    ("bf16", 128, 64, 16, 8, 64, (3, 999, 4097)),
    ("f16", 64, 16, 12, 4, 24, (5, 300, 1029)),
]


def rel(got: mx.array, want: np.ndarray) -> float:
    g = np.array(got.astype(mx.float32), dtype=np.float64).reshape(want.shape)
    return float(np.abs(g - want).max() / np.abs(want).max())


# ---- sources and plumbing (CPU) ---------------------------------------------------------
def test_int8_pools_get_the_int8_kernel_whatever_variant_is_asked():
    for variant in ("auto", "mma", "lean", "async"):
        for qdt in (mx.float16, mx.bfloat16, mx.float32):
            assert case_variant(variant, qdt, mx.int8, 4, 64) == INT8_VARIANT
    for d in (64, 128):
        for bs in (16, 32, 64):
            g = PoolGeometry(1, 4, d, bs, 8, mx.int8)
            assert shape_decline((2, 28, 1, d), mx.bfloat16, g, 3) is None
    # the ring holds K, V and scales of a 16-token tile per lane: 5 / 9 16-byte slots
    assert smem_bytes(INT8_VARIANT, 1, 64, 4, 4, 3) == 3 * 5 * 128 * 16
    assert smem_bytes(INT8_VARIANT, 1, 128, 4, 4, 3) == 3 * 9 * 128 * 16


def test_int8_body_passes_the_scale_slabs():
    body = kernel_body(2, "fused", INT8_VARIANT, 0.125, 4096)
    assert "kstab[1] = ks1; vstab[1] = vs1;" in body and "ktab[1] = k1" in body
    assert "pooled_decode_int8<TQ, T," in body and ", 4096, " in body
    assert "kstab, vstab, out, opart, lse, const_cast<int*>(counters)" in body


@pytest.mark.parametrize("fused, chunks", [(False, 1), (False, 3), (True, 3)])
def test_int8_launch_passes_values_then_scales(monkeypatch, fused, chunks):
    log: list = []
    monkeypatch.setattr(mx.fast, "cuda_kernel", lambda **kw: FakeKernel(log, **kw))
    q, pool, batch = random_case((5, 300, 1029), 12, 4, 64, 16, mx.int8, slab_blocks=24)
    q = q.astype(mx.bfloat16)
    nat = NativeCUDA(fused_merge=fused)
    out = nat._run(q, pool, 0, batch, 0.125, chunks)
    assert out.shape == q.shape and out.dtype == mx.bfloat16
    main, ns = log[0], slab_bucket(pool.num_slabs)
    names = main["spec"]["input_names"]
    slabs = [f"{s}{i}" for s in ("k", "v", "ks", "vs") for i in range(ns)]
    assert names == ["q", "table", "lengths", *slabs, *(["counters"] if fused else []), "dep"]
    assert len(main["inputs"]) == len(names)
    scales = main["inputs"][3 + 2 * ns: 3 + 4 * ns]
    pad = ns - pool.num_slabs
    want = [*pool.k_scale[0], *[pool.k_scale[0][0]] * pad,
            *pool.v_scale[0], *[pool.v_scale[0][0]] * pad]
    assert [id(a) for a in scales] == [id(a) for a in want]
    assert main["template"]["T"] == mx.int8 and main["template"]["TQ"] == mx.bfloat16
    assert main["template"]["GB"] == group_block(3, 16) == 3
    assert "struct I8Tile" in main["spec"]["header"]
    assert main["spec"]["shared_memory"] == smem_bytes(INT8_VARIANT, 1, 64, 3, 8, 3)
    assert len(log) == (2 if chunks > 1 and not fused else 1)


def test_probe_builds_a_quantized_pool(monkeypatch):
    """The probe's private pool of an int8 geometry is quantized (scales set), and its
    reference dequantizes: gather-SDPA in the kernel's place passes, zeros do not."""
    from slabserve.attention.gather import GatherSDPA

    q, pool, batch = random_case((40, 30, 50), 12, 4, 64, 16, mx.int8, slab_blocks=3)
    nat, seen = NativeCUDA(), []

    def right(q1, ppool, layer, b, scale, chunks, fused, pages):
        seen.append(ppool)
        return GatherSDPA()(q1, ppool, layer, b, scale)

    monkeypatch.setattr(nat, "_run", right)
    assert nat._probe(q, pool) is None
    probe = seen[0]
    assert probe.geom.quantized and len(probe.k_scale[0]) == len(probe.k[0]) >= 2
    assert float(mx.abs(probe.v_scale[0][0]).max()) > 0
    monkeypatch.setattr(nat, "_run", lambda q1, *a: mx.zeros(q1.shape, dtype=q1.dtype))
    assert "wrong" in nat._probe(q, pool)


def test_int8_merge_form_follows_the_value_bytes():
    """An int8 layer fuses its chunk merge up to 128 MiB of values (its scales not counted)
    in grids of at most 8 chunks: at 32/8/64, B=8 / 16k (128 MiB + 4 MiB of scales, 8
    chunks) stays fused, measured on an H100 at 62.5 us marginal / 76.7 chained per layer
    against 60.2-61.7 / 81.5-84.7 split (docs/benchmarks/kv-int8.md); B=8 / 32k and
    B=16 / 16k split, and B=4 / 16k (16 chunks)."""
    from slabserve.attention.base import DecodeBatch

    nat = NativeCUDA()
    for b, ctx, want in ((4, 16384, False), (8, 16384, True), (8, 32768, False),
                         (16, 16384, False)):
        geom = PoolGeometry(1, 8, 64, 16, 4096, mx.int8)
        batch = DecodeBatch(geom, [[0] * (ctx // 16)] * b, [ctx] * b)
        q = mx.zeros((b, 32, 1, 64), dtype=mx.float16)
        params = nat._plan_params(q, geom)
        chunks = plan_chunks(b, nat._head_blocks(q, geom), params)
        assert chunks == (16 if b == 4 else 8 if b == 8 else 4)
        assert nat._fused(batch, geom, params, chunks) is want


def test_int8_bench_forms_parse_and_print(capsys):
    from slabserve.bench.cuda_int8 import parse_extra
    from slabserve.bench.cuda_tables import print_int8_table

    assert parse_extra("st2") == (2, None, None) and parse_extra("s") == (None, None, False)
    assert parse_extra("c16f") == (None, 16, True) and parse_extra("st4c8s") == (4, 8, False)
    for bad in ("", "x", "c", "16", "sf"):
        with pytest.raises(ValueError, match="bad int8 form"):
            parse_extra(bad)
    row = dict(B=8, ctx=16384, shape="32/8/64", layers=16, int8_plan="8s",
               float16_us=140.0, int8_us=84.0, float16_m_us=100.0, int8_m_us=55.0,
               float16_floor_us=90.0, int8_floor_us=46.0, int8_c10_us=83.0, int8_c10_m_us=54.0)
    print_int8_table([row], ("c10",))
    out = capsys.readouterr().out
    assert "| 8 | 16384 | 100.0 | 55.0 | 0.55 |" in out and "| 1.20 |" in out
    assert "| 8 | 16384 | 8s: 55.0 (84.0) | 54.0 (83.0) |" in out


# ---- the kernel against float64 (CUDA only) ----------------------------------------------
@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("case", range(len(INT8_MATRIX)))
def test_int8_kernel_matches_float64(case):
    qdt, d, bs, hq, hkv, sb, lens = INT8_MATRIX[case]
    args = (lens, hq, hkv, d, bs)
    qf, fpool, fbatch = random_case(*args, mx.float16, slab_blocks=sb, seed=200 + case)
    _, pool, batch = random_case(*args, mx.int8, slab_blocks=sb, seed=200 + case)
    q = qf.astype(QDT[qdt])
    scale = 1.0 / math.sqrt(d)
    exact = reference_decode(q, fpool, 0, fbatch, scale)  # the float16 data
    deq = reference_decode(q, pool, 0, batch, scale)  # what the int8 pool holds
    quant = float(np.abs(deq - exact).max() / np.abs(exact).max())
    assert 1e-4 < quant < QUANT_MAX
    for fused in (None, False, True):
        nat = NativeCUDA(fused_merge=fused)
        assert nat.decline(q, pool, batch) is None
        for chunks in (None, 1, 2, 5, 64) if fused is None else (3,):
            got = nat(q, pool, 0, batch, scale) if chunks is None else nat._run(
                q, pool, 0, batch, scale, chunks)
            assert got.shape == q.shape and got.dtype == q.dtype
            e_deq, e_exact = rel(got, deq), rel(got, exact)
            print(f"int8 q{qdt} d{d} bs{bs} {hq}/{hkv} slabs={pool.num_slabs} lens={lens} "
                  f"chunks={chunks} fused={fused}: vs dequantized {e_deq:.2e}, "
                  f"vs float16 data {e_exact:.2e}")
            assert e_deq < DEQ_TOL[qdt] and e_exact < quant + DEQ_TOL[qdt]


@needs_cuda
@pytest.mark.cuda
def test_int8_kernel_with_wide_scales_and_stale_rows():
    """Rows of very different magnitudes (scales 1e-4 .. 1e2 of the unit) and a pool whose
    unused rows hold garbage (NaN scales): masked rows never reach the output."""
    lens = (5, 300, 1029)
    qf, fpool, fbatch = random_case(lens, 32, 8, 64, 16, mx.float16, slab_blocks=24, seed=9)
    rng = np.random.default_rng(9)
    for side in (fpool.k, fpool.v):
        rows = side[0][0].shape[0]
        mag = mx.array(10.0 ** rng.uniform(-4, 2, (rows, 1)), dtype=mx.float16)
        side[0] = [x * mag for x in side[0]]
    from slabserve.attention.base import DecodeBatch
    from slabserve.attention.reference import quantized_copy

    pool = quantized_copy(fpool)
    batch = DecodeBatch(pool.geom, fbatch.tables, fbatch.lengths)
    deq = reference_decode(qf, pool, 0, batch, 0.125)
    # row 3 of the last block of sequence 0 (length 5) is past its end: poison its scales
    blk, sb = batch.tables[0][0], pool.geom.slab_blocks
    s, local = blk // sb, blk % sb
    for scales in (pool.k_scale[0], pool.v_scale[0]):
        x = np.array(scales[s])
        x[(local * 8) * 16 + 10: (local * 8 + 8) * 16: 16] = np.nan
        scales[s] = mx.array(x)
    got = NativeCUDA()(qf, pool, 0, batch, 0.125)
    assert rel(got, deq) < DEQ_TOL["f16"]
