"""The int8 KV cache (issue 24), CPU side: quantize-on-write bound, the pool's scale slabs and
byte accounting, every decode path and prefill against float64 references on random data
(the dequantized pool at float tolerance; the float data within the int8 bound), and the
selector rules (the CUDA int8 kernel: tests/test_cuda_int8.py; the unverified Metal one:
tests/test_metal_int8.py)."""

import itertools
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from attention_cases import causal_reference64

from slabserve.attention.base import DecodeBatch
from slabserve.attention.calibrate import measure
from slabserve.attention.gather import GatherSDPA
from slabserve.attention.native_cpu import NativeCPU
from slabserve.attention.native_cuda import NativeCUDA
from slabserve.attention.native_metal import NativeMetal
from slabserve.attention.prefill import prefill_attention
from slabserve.attention.profile import Profile
from slabserve.attention.reference import quantized_copy, random_case, reference_decode
from slabserve.attention.selector import Selector
from slabserve.attention.selector_rules import RULES, Path, Reason, current_backend, make_key
from slabserve.engine.config import CacheConfig
from slabserve.kvcache.pool import GatherPlan, PoolGeometry, SlabPool, WritePlan
from slabserve.kvcache.quant import dequantize, quantize

# int8 bound on outputs, relative to max |reference on the float data|: the per-element
# quantization error is at most absmax / 254 = 3.9e-3 of its row's largest value (a
# one-token sequence's output is its V row); measured at most 4.2e-3 over these cases
INT8_TOL = 8e-3
# the paths' own arithmetic on the dequantized pool (float16 output rounding)
DEQ_TOL = {mx.float16: 4e-3, mx.float32: 2e-5}

PATHS = {
    "gather": GatherSDPA(),
    "native": NativeCPU(),
    "native-small-chunks": NativeCPU(streams=2, chunk_blocks=2, min_stream_tokens=0),
    "native-1-stream": NativeCPU(streams=1, chunk_blocks=3),
    "native-f16-compute": NativeCPU(int8_compute=None),
}
HEADS = [(4, 4), (8, 2), (14, 2)]
LENGTHS = [37, 1, 96, 150]


def rel(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def test_quantize_bound_zero_rows_and_dequantize():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 4, 64)) * rng.uniform(1e-3, 50, (64, 4, 1))
    x[3, 1] = 0.0
    q, s = quantize(mx.array(x.astype(np.float32)))
    assert q.dtype == mx.int8 and s.dtype == mx.float16 and s.shape == (64, 4, 1)
    qn = np.array(q)
    assert np.abs(qn).max() == 127 and not np.any(qn == -128)
    back = np.array(dequantize(q, s, mx.float32), dtype=np.float64)
    amax = np.abs(x).max(-1, keepdims=True)
    assert np.all(np.abs(back - x) <= amax / 254 * (1 + 2e-3) + 1e-12)
    assert np.all(back[3, 1] == 0) and float(s[3, 1, 0]) == 0.0


def test_write_scatters_values_and_scales_in_place_of_the_plan_rows():
    geom = PoolGeometry(2, 2, 64, 16, 4, mx.int8)
    pool = SlabPool(geom, initial_slabs=2)
    assert len(pool.k_scale[1]) == len(pool.v_scale[0]) == 2
    slots = [(b, r) for b in (6, 1, 5) for r in range(16)][:40]  # across both slabs
    rng = np.random.default_rng(1)
    k, v = (rng.standard_normal((40, 2, 64)).astype(np.float32) for _ in "kv")
    pool.write(1, WritePlan(geom, slots), mx.array(k), mx.array(v))
    pending = pool.take_pending()
    assert len(pending) == 8  # 2 sides x 2 slabs, values and scales
    mx.eval(pending)
    plan = GatherPlan(geom, [[6, 1, 5]])
    for side, x in ((0, k), (1, v)):
        raw = pool.gather(1, side, plan)
        assert raw.dtype == mx.int8
        got = np.array(pool.gather(1, side, plan, mx.float32))  # [1, 3, H, bs, D]
        got = got[0].transpose(0, 2, 1, 3).reshape(48, 2, 64)[:40]
        want = np.array(dequantize(*quantize(mx.array(x)), mx.float32))
        np.testing.assert_array_equal(got, want)
    assert float(mx.abs(pool.gather(0, 0, plan, mx.float32)).max()) == 0.0  # layer 0 untouched


@pytest.mark.parametrize("head_dim", [64, 128])
def test_the_same_budget_holds_at_least_1_9x_the_blocks_of_float16(head_dim):
    f16, i8 = (PoolGeometry(16, 8, head_dim, 16, 256, d) for d in (mx.float16, mx.int8))
    assert f16.block_bytes / i8.block_bytes >= 1.9  # 1.939 (64), 1.969 (128)
    # whole slabs: a budget of 32 float16 slabs holds 62-63 int8 ones (with 16 float16
    # slabs, 15 int8 ones: 1.875x; docs/benchmarks/kv-int8.md, "Capacity")
    budget = 32 * f16.slab_bytes
    blocks = [g.slabs_for_budget(budget) * g.slab_blocks for g in (f16, i8)]
    assert blocks[1] / blocks[0] >= 1.9
    pool = SlabPool(i8, initial_slabs=1)
    held = sum(a.nbytes for side in (pool.k, pool.v, pool.k_scale, pool.v_scale)
               for layer in side for a in layer)
    assert held == pool.nbytes == i8.slab_bytes  # the accounting is what is allocated


@pytest.mark.parametrize("heads,head_dim,block_size,slabs", list(itertools.product(
    HEADS, (64, 128), (16, 32), (1, 3))))
def test_decode_paths_match_references(heads, head_dim, block_size, slabs):
    seed = hash((heads, head_dim, block_size, slabs)) % 1000
    args = (LENGTHS, *heads, head_dim, block_size)
    q, fpool, fbatch = random_case(*args, mx.float16, slabs=slabs, seed=seed)
    _, pool, batch = random_case(*args, mx.int8, slabs=slabs, seed=seed)
    scale = head_dim ** -0.5
    exact = reference_decode(q, fpool, 0, fbatch, scale)  # the float16 data
    deq = reference_decode(q, pool, 0, batch, scale)  # what the int8 pool holds
    assert 1e-4 < rel(deq, exact) < INT8_TOL  # quantized, not garbage
    for name, path in PATHS.items():
        assert path.decline(q, pool, batch) is None
        out = path(q, pool, 0, batch, scale)
        assert out.shape == q.shape and out.dtype == q.dtype, name
        got = np.array(out.astype(mx.float32))
        assert rel(got, deq) < DEQ_TOL[mx.float16], name
        assert rel(got, exact) < INT8_TOL, name


@pytest.mark.parametrize("path", ["gather", "native", "native-f16-compute"])
def test_float32_queries_over_an_int8_pool(path):
    q, pool, batch = random_case(LENGTHS, 8, 2, 64, 16, mx.int8, slabs=2, seed=7)
    q = q.astype(mx.float32)
    out = PATHS[path](q, pool, 0, batch, 0.125)
    assert out.dtype == mx.float32
    tol = DEQ_TOL[mx.float16 if path == "native-f16-compute" else mx.float32]
    assert rel(np.array(out), reference_decode(q, pool, 0, batch, 0.125)) < tol


def test_quantized_copy_keeps_tables_and_is_read_in_place():
    q, fpool, batch = random_case([40, 70], 4, 2, 64, 16, mx.float16, slabs=2, seed=3)
    pool = quantized_copy(fpool)
    ids = [id(a) for a in pool.k[0] + pool.v[0] + pool.k_scale[0] + pool.v_scale[0]]
    PATHS["native"](q, pool, 0, DecodeBatch(pool.geom, batch.tables, batch.lengths), 0.125)
    assert [id(a) for a in pool.k[0] + pool.v[0] + pool.k_scale[0] + pool.v_scale[0]] == ids


def _prefill_case(n: int, length: int, kv_heads=2, q_heads=4, head_dim=64, seed=0):
    """An int8 one-layer pool holding ``n`` tokens on a shuffled table, the chunk's q, the
    float K/V and the dequantized K/V (``[kv_heads, n, D]``)."""
    rng = np.random.default_rng(seed)
    geom = PoolGeometry(1, kv_heads, head_dim, 16, 8, mx.int8)
    pool = SlabPool(geom, initial_slabs=3)
    table = rng.permutation(24)[: -(-n // 16)].tolist()
    k, v = (rng.standard_normal((n, kv_heads, head_dim)).astype(np.float32) for _ in "kv")
    pool.write(0, WritePlan(geom, [(table[p // 16], p % 16) for p in range(n)]),
               mx.array(k), mx.array(v))
    mx.eval(pool.take_pending())
    deq = [np.array(dequantize(*quantize(mx.array(x)), mx.float32)) for x in (k, v)]
    q = rng.standard_normal((1, q_heads, length, head_dim)).astype(np.float32)
    prefix = DecodeBatch(geom, [table], [n])
    to_heads = lambda x: x.transpose(1, 0, 2)  # noqa: E731
    return (q, pool, prefix, [to_heads(x) for x in (k, v)], [to_heads(x) for x in deq])


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
@pytest.mark.parametrize("bucket", [0, 64])
def test_prefill_reads_the_quantized_prefix(dtype, bucket):
    n, length = 150, 37
    q, pool, prefix, (k, v), (dk, dv) = _prefill_case(n, length)
    qm = mx.array(q).astype(dtype)
    new = [mx.array(x[None, :, n - length:]).astype(dtype) for x in (dk, dv)]
    out = prefill_attention(qm, *new, pool, 0, prefix, 0.125, bucket)
    assert out.dtype == dtype and out.shape == qm.shape
    got = np.array(out.astype(mx.float32))[0]
    qd = np.array(qm.astype(mx.float32))[0]
    deq = causal_reference64(qd, dk, dv, n - length, 0.125)
    exact = causal_reference64(qd, k, v, n - length, 0.125)
    assert rel(got, deq) < (2e-5 if dtype == mx.float32 else 4e-3)
    assert rel(got, exact) < INT8_TOL


def test_selector_learns_int8():
    q, pool, batch = random_case([300, 40], 8, 2, 64, 16, mx.int8, slabs=1, seed=2)
    sel = Selector(natives={"cpu": NativeCPU(), "cuda": NativeCUDA()})
    key = make_key(q, pool, batch, "cpu")
    assert key.dtype == "int8"
    assert sel.fresh(q, pool, batch, key).path is Path.NATIVE
    cuda_key = make_key(q, pool, batch, "cuda")
    assert RULES["cuda"](cuda_key) == (Path.NATIVE, "cuda_int8_native")
    rule = Selector(natives={"cuda": NativeCUDA()}).fresh(q, pool, batch, cuda_key)
    if mx.cuda.is_available():
        assert (rule.path, rule.detail) == (Path.NATIVE, "cuda_int8_native")
    else:  # the rule asks for native, which declines without a CUDA device
        assert (rule.path, rule.reason) == (Path.GATHER, Reason.DECLINED)
    metal_key = make_key(q, pool, batch, "metal")
    forced = Selector(override=True, natives={"metal": NativeMetal()})
    d = forced.fresh(q, pool, batch, metal_key)
    if not mx.metal.is_available():  # forced native Metal over int8 declines here: gather
        assert (d.path, d.reason) == (Path.GATHER, Reason.DECLINED)
        assert d.detail.startswith("no Metal device")
    out = sel.run(q, pool, 0, batch, 0.125)  # on this process's backend
    rule_name = "cuda_int8_native" if current_backend() == "cuda" else "cpu_native_all"
    assert sel.path_counts() == {("native", f"rule:{rule_name}"): 1}
    assert rel(np.array(out.astype(mx.float32)), reference_decode(q, pool, 0, batch, 0.125)) < 4e-3


def test_calibration_measures_int8_and_its_profile_decides_int8_keys_only():
    e = measure(4, 2, 64, "int8", 1, 256, "one", layers=1, reps=1)
    assert e.dtype == "int8" and e.native_ms is not None and e.gather_ms > 0
    slow_native = Profile("dev", mx.__version__, [replace(e, native_ms=10 * e.gather_ms + 1)])
    q, pool, batch = random_case([200], 4, 2, 64, 16, mx.int8, slabs=1)
    key = make_key(q, pool, batch, "cpu")
    d = Selector(profile=slow_native, natives={"cpu": NativeCPU()}).fresh(q, pool, batch, key)
    assert (d.path, d.reason) == (Path.GATHER, Reason.PROFILE)
    assert slow_native.choose(key._replace(dtype="float16")) is None


def test_cache_config_validates_the_dtype():
    assert CacheConfig(dtype="int8").dtype == "int8"
    for bad in ("int4", "float8", "fp16"):
        with pytest.raises(ValueError, match="dtype must be one of"):
            CacheConfig(dtype=bad)
