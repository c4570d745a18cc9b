"""Native pooled decode on CUDA: plan logic and decline reasons everywhere; the kernel
against a float64 reference where a CUDA device is present (the lent GPU machine)."""

from __future__ import annotations

import math

import mlx.core as mx
import pytest
from cuda_fakes import FakeKernel

from slabserve.attention import cuda_plan
from slabserve.attention.cuda_plan import PlanParams, plan_chunks
from slabserve.attention.cuda_source import (
    group_block,
    kernel_body,
    shape_decline,
    slab_bucket,
    unit_tokens,
)
from slabserve.attention.native_cuda import NativeCUDA
from slabserve.kvcache.pool import PoolGeometry

HAS_CUDA = mx.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (MLX CUDA build)")


# ---- plan (CPU) ------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 3, 8, 16, 64])
@pytest.mark.parametrize("head_blocks", [1, 2, 8, 32])
def test_plan_bounds(batch, head_blocks):
    p = cuda_plan.DEFAULT_PARAMS
    c = plan_chunks(batch, head_blocks)
    assert 1 <= c <= p.max_chunks
    # split only within one wave of resident blocks
    if c > 1:
        assert c * batch * head_blocks <= p.sm_count * p.blocks_per_sm


def test_plan_fills_gpu_at_any_context():
    # one sequence, 8 kv heads: 8 blocks per chunk, so split into many chunks
    c = plan_chunks(1, 8)
    assert c * 8 >= 132 * cuda_plan.DEFAULT_PARAMS.blocks_per_sm / 2
    # a large batch already fills the GPU: a single chunk
    assert plan_chunks(128, 8) == 1
    assert plan_chunks(8, 8) * 64 == 512  # B=8: one full wave


@pytest.mark.parametrize("length", [1, 15, 16, 17, 255, 256, 300, 1024, 4097, 16384, 131072])
@pytest.mark.parametrize("chunks", [1, 3, 8, 64])
@pytest.mark.parametrize("pages", [1, 16, 64])
def test_chunk_spans_cover_each_token_once(length, chunks, pages):
    """A sequence's own pages over at most ``chunks`` chunks of >= ``pages`` pages each,
    block-aligned, every token in exactly one chunk (the kernels' chunk_span)."""
    spans = cuda_plan.chunk_spans(length, chunks, pages, 16)
    assert len(spans) == chunks
    assert [t for r in spans for t in r] == list(range(length))
    used = [r for r in spans if len(r)]
    assert used and all(r.start % 16 == 0 for r in used)
    assert len(used) <= max(1, -(-length // 16) // pages)
    if len(used) > 1:
        assert min(len(r) for r in used[:-1]) >= pages * 16


def test_plan_rejects_bad_input():
    with pytest.raises(ValueError):
        plan_chunks(0, 8)
    with pytest.raises(ValueError):
        PlanParams(min_chunk_tokens=0)


# ---- shapes, buckets, declines (CPU) ---------------------------------------------------
def test_buckets_and_groups():
    assert [slab_bucket(n) for n in (1, 2, 3, 5, 64, 65)] == [1, 2, 4, 8, 64, 128]
    assert [group_block(g) for g in (1, 4, 7, 8, 12, 16, 9)] == [1, 4, 7, 8, 6, 8, 3]
    assert [group_block(g, 16) for g in (4, 7, 12, 16, 32, 9)] == [4, 7, 12, 16, 16, 9]
    assert unit_tokens(4) == 8 and unit_tokens(8) == 4


def _geom(**kw):
    base = dict(num_layers=1, kv_heads=8, head_dim=128, block_size=16, slab_blocks=64,
                dtype=mx.float16)
    base.update(kw)
    return PoolGeometry(**base)


@pytest.mark.parametrize(
    "geom_kw, q_shape, q_dtype, slabs, word",
    [
        ({"head_dim": 96}, (2, 32, 1, 96), mx.float16, 1, "head_dim 96"),
        ({"block_size": 8}, (2, 32, 1, 128), mx.float16, 1, "block_size 8"),
        ({"dtype": mx.int32}, (2, 32, 1, 128), mx.float16, 1, "pool dtype"),
        ({}, (2, 32, 1, 128), mx.int32, 1, "q dtype"),
        ({}, (2, 12, 1, 128), mx.float16, 1, "multiple of kv_heads"),
        ({}, (2, 32, 2, 128), mx.float16, 1, "q must be"),
        ({}, (2, 32, 1, 64), mx.float16, 1, "!= pool head_dim"),
        ({}, (2, 32, 1, 128), mx.float16, 10_000, "slab"),
    ],
)
def test_shape_decline_reasons(geom_kw, q_shape, q_dtype, slabs, word):
    reason = shape_decline(q_shape, q_dtype, _geom(**geom_kw), slabs)
    assert reason is not None and word in reason


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("bs", [16, 32, 64])
@pytest.mark.parametrize("dt", [mx.float16, mx.bfloat16, mx.float32])
def test_supported_shapes_pass_shape_checks(d, bs, dt):
    g = _geom(kv_heads=4, head_dim=d, block_size=bs, dtype=dt)
    assert shape_decline((3, 28, 1, d), dt, g, 5) is None


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-CUDA decline")
def test_declines_without_cuda():
    from slabserve.bench.cuda_kernel import make_case

    pool, batch, q = make_case((3, 40), 8, 2, 64, 16, mx.float32, 8)
    reason = NativeCUDA().decline(q, pool, batch)
    assert reason is not None and "CUDA" in reason


def test_kernel_body_fills_every_slab():
    body = kernel_body(3, "split")
    for i in range(3):
        assert f"ktab[{i}] = k{i}; vtab[{i}] = v{i};" in body
    assert "ktab[3]" not in body and "opart, lse" in body
    assert "out, nullptr, nullptr, nullptr" in kernel_body(1, "direct")
    assert "out, opart, lse, const_cast<int*>(counters)" in kernel_body(2, "fused", "mma")
    for variant in ("mma", "async", "lean"):
        assert "extern __shared__ uint4 slabserve_smem[];" in kernel_body(2, "split", variant)
    # the register-load split has no CUDA source (NativeMetal runs its own kernel)
    with pytest.raises(ValueError, match="no CUDA source"):
        kernel_body(2, "split", "sync")


def test_scale_is_a_literal_of_the_source(monkeypatch):
    """The softmax scale is compiled in (a 4-byte input would live in MLX's slow-to-read
    scalar pool, kvcache/arrays.py): no scale input, one kernel per scale, and the
    per-step plan is keyed by the scale too."""
    from slabserve.attention.cuda_source import LOG2E
    from slabserve.bench.cuda_kernel import make_case

    body = kernel_body(1, "split", "lean", 0.125)
    assert "qscale" not in body and f"{0.125 * LOG2E!r}f" in body
    log: list = []
    monkeypatch.setattr(mx.fast, "cuda_kernel", lambda **kw: FakeKernel(log, **kw))
    pool, batch, q = make_case((600, 3000), 32, 8, 64, 16, mx.float16, 64)
    nat = NativeCUDA(fused_merge=False)
    nat(q, pool, 0, batch, 0.125)
    nat(q, pool, 0, batch, 0.1)
    mains = [c for c in log if "qscale" not in c["spec"]["input_names"]
             and c["spec"]["input_names"][0] == "q"]
    assert len(mains) == 2
    assert all(len(c["inputs"]) == len(c["spec"]["input_names"]) for c in mains)
    assert f"{0.125 * LOG2E!r}f" in mains[0]["spec"]["source"]
    assert f"{0.1 * LOG2E!r}f" in mains[1]["spec"]["source"]
    assert mains[0]["spec"]["name"] != mains[1]["spec"]["name"]
    assert len([k for k in batch._cache if isinstance(k, tuple) and k[0] is nat]) == 2


# ---- kernel vs float64 (CUDA only) ----------------------------------------------------
def _matrix():
    from slabserve.bench.cuda_kernel import CHECK_MATRIX

    return CHECK_MATRIX


GPU_MATRIX_CASES = 41  # len(bench.cuda_kernel.CHECK_MATRIX); checked on CPU below


def test_gpu_matrix_covers_the_check_matrix():
    """The CUDA-only cases below run every case of the matrix that bench.cuda_kernel
    --check runs (a case added there must not go untested here)."""
    assert len(_matrix()) == GPU_MATRIX_CASES


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("variant", ["auto", "lean", "mma", "async"])
@pytest.mark.parametrize("case", range(GPU_MATRIX_CASES))
def test_native_matches_float64(case, variant):
    from slabserve.attention.reference import reference_decode
    from slabserve.bench.cuda_kernel import DT, make_case, rel_err, tol_for

    dt, qdt, d, bs, hq, hkv, sb, lens = _matrix()[case]
    pool, batch, q = make_case(lens, hq, hkv, d, bs, DT[dt], sb, seed=100 + case)
    q = q.astype(DT[qdt])
    scale = 1.0 / math.sqrt(d)
    nat = NativeCUDA(variant=variant)
    assert nat.decline(q, pool, batch) is None
    want = reference_decode(q, pool, 0, batch, scale)
    for chunks in (None, 1, 2, 5, 64):
        got = nat(q, pool, 0, batch, scale) if chunks is None else nat._run(
            q, pool, 0, batch, scale, chunks)
        assert got.shape == q.shape and got.dtype == q.dtype
        err = rel_err(got, want)
        print(f"{variant} {dt} q{qdt} d{d} bs{bs} {hq}/{hkv} slabs={pool.num_slabs} lens={lens} "
              f"chunks={chunks}: rel err {err:.2e}")
        assert err < tol_for(dt, qdt)


@pytest.mark.parametrize("chunks, fused", [(1, True), (4, False), (4, True)])
def test_launch_plumbing(monkeypatch, chunks, fused):
    from slabserve.bench.cuda_kernel import make_case

    log: list = []
    monkeypatch.setattr(mx.fast, "cuda_kernel", lambda **kw: FakeKernel(log, **kw))
    pool, batch, q = make_case((5, 300, 1029), 14, 2, 64, 16, mx.float16, 24, layers=2)
    nat = NativeCUDA(fused_merge=fused)
    out = nat._run(q, pool, 0, batch, 0.125, chunks)
    assert out.shape == q.shape and out.dtype == q.dtype
    main = log[0]
    ns = slab_bucket(pool.num_slabs)
    # the last input orders the launch after this layer's in-place K/V write, if any
    assert main["spec"]["input_names"][-1] == "dep" and main["inputs"][-1] is nat._no_dep
    if fused and chunks > 1:  # one launch: partials, then the last chunk's block merges
        assert len(log) == 1 and main["spec"]["input_names"][-2] == "counters"
        counters = main["inputs"][-2]
        assert counters.dtype == mx.int32 and counters.size >= 3 * 2
        assert not mx.any(counters).item()
        assert main["shapes"] == [(3 * 14 * chunks, 64), (3 * 14, chunks), (3, 14, 1, 64)]
        assert "const_cast<int*>(counters)" in main["spec"]["source"]
        pool.deps[1] = token = mx.zeros((4,), dtype=mx.int32)
        nat._run(q, pool, 1, batch, 0.125, chunks)  # another layer: its own counters
        assert log[1]["inputs"][-2] is not counters and log[1]["inputs"][-1] is token
        return
    assert pool.num_slabs == 4 and len(main["inputs"]) == 3 + 2 * ns + 1
    assert main["spec"]["input_names"][:3] == ["q", "table", "lengths"]
    assert main["spec"]["input_names"][3:-1] == [f"k{i}" for i in range(ns)] + [
        f"v{i}" for i in range(ns)]
    assert main["grid"] == (2 * 1 * 128, chunks, 3) and main["tg"] == (128, 1, 1)
    assert main["template"]["G"] == 7 and main["template"]["GB"] == 7
    assert main["spec"]["shared_memory"] > 0
    assert len(log) == (1 if chunks == 1 else 2)
    if chunks > 1:
        assert main["shapes"] == [(3 * 14 * chunks, 64), (3 * 14, chunks)]
        assert log[1]["grid"] == (3 * 14 * 64, 1, 1) and log[1]["tg"] == (64, 1, 1)
    nat._run(q, pool, 1, batch, 0.125, chunks)  # same shape: launch spec reused
    assert len(nat._launches) == 1


@pytest.mark.parametrize(
    "dt, qdt, hq, hkv, want_variant, want_gb",
    [
        (mx.float16, mx.float16, 64, 4, "mma", 16),
        (mx.bfloat16, mx.bfloat16, 14, 2, "mma", 7),
        (mx.float16, mx.float32, 64, 4, "async", 8),  # mixed dtypes: the FMA kernel
        (mx.float32, mx.float32, 32, 8, "async", 4),
    ],
)
def test_mma_launch_plumbing(monkeypatch, dt, qdt, hq, hkv, want_variant, want_gb):
    from slabserve.bench.cuda_kernel import make_case

    log: list = []
    monkeypatch.setattr(mx.fast, "cuda_kernel", lambda **kw: FakeKernel(log, **kw))
    pool, batch, q = make_case((5, 300), hq, hkv, 64, 16, dt, 24)
    q = q.astype(qdt)
    nat = NativeCUDA(variant="mma")
    nat._run(q, pool, 0, batch, 0.125, 2)
    main = log[0]
    assert main["template"]["GB"] == want_gb
    assert main["grid"] == (hkv * (hq // hkv // want_gb) * 128, 2, 2)
    header = main["spec"]["header"]
    assert ("struct MmaTile" in header) == (want_variant == "mma")
    assert f"pooled_decode_{'mma' if want_variant == 'mma' else 'async'}<" in main["spec"][
        "source"]
    # the plan's residency follows the variant's shared memory (48 KiB: 4 blocks per SM)
    assert nat._plan_params(q, pool.geom).blocks_per_sm == 4.0


def test_plan_shared_by_layers_of_a_step(monkeypatch):
    from slabserve.bench.cuda_kernel import make_case

    log: list = []
    monkeypatch.setattr(mx.fast, "cuda_kernel", lambda **kw: FakeKernel(log, **kw))
    pool, batch, q = make_case((600, 3000), 32, 8, 64, 16, mx.float16, 64, layers=3)
    nat = NativeCUDA(fused_merge=False)
    for layer in range(3):
        assert nat(q, pool, layer, batch, 0.125).shape == q.shape
    mine = [k for k in batch._cache if isinstance(k, tuple) and k[0] is nat]
    assert len(mine) == 1
    want = plan_chunks(2, 8)
    assert want > 1 and all(c["grid"][1] == want for c in log if c["grid"][1] != 1)
    assert len(log) == 3 * 2  # split + merge per layer
    assert {id(c["inputs"][3]) for c in log[::2]} == {id(pool.k[i][0]) for i in range(3)}


@pytest.mark.parametrize("lens, fused", [((600, 3000) * 4, True), ((16384,) * 8, False),
                                         ((600, 3000), False)])
def test_default_fuses_the_merge_for_small_layers_only(monkeypatch, lens, fused):
    """Default ``fused_merge=None``: one launch per layer while a layer reads at most
    ``fused_max_bytes`` of K/V (here 2 x 8 x 4096 x 8 x 64 x 2 B = 64 MiB) in at most
    ``fused_max_chunks`` chunks (B=8: 8), split + merge above it (8 x 16384 tokens:
    256 MiB) or with more chunks (B=2: 33); the decision is part of the step's shared
    plan."""
    from slabserve.attention.cuda_plan import plan_chunks, plan_fused
    from slabserve.bench.cuda_kernel import make_case

    log: list = []
    monkeypatch.setattr(mx.fast, "cuda_kernel", lambda **kw: FakeKernel(log, **kw))
    pool, batch, q = make_case(lens, 32, 8, 64, 16, mx.float16, 1024, layers=2)
    chunks = plan_chunks(len(lens), 8)
    assert chunks == (8 if len(lens) == 8 else 33)
    assert plan_fused(len(lens), max(lens), 8, 64, 2, chunks=chunks) is fused
    nat = NativeCUDA()
    for layer in range(2):
        nat(q, pool, layer, batch, 0.125)
    kinds = [c["spec"]["name"].split("_")[2] for c in log]
    assert kinds == (["fused"] * 2 if fused else ["split", "merge"] * 2)
    assert all(c["grid"][1] > 1 for c in log if c["spec"]["name"].split("_")[2] != "merge")
    # the same batch with forced chunks follows the same rule for its chunk count (4);
    # explicit choices win
    fused4 = plan_fused(len(lens), max(lens), 8, 64, 2, chunks=4)
    assert fused4 is (max(lens) < 16384)
    log.clear()
    nat._run(q, pool, 0, batch, 0.125, 4)
    assert len(log) == (1 if fused4 else 2)
    log.clear()
    nat._run(q, pool, 0, batch, 0.125, 4, not fused4)
    assert len(log) == (2 if fused4 else 1)


def test_plan_fused_threshold():
    from slabserve.attention.cuda_plan import PlanParams, plan_fused

    # 32/8/64 float16: 16 x 4096 tokens read 128 MiB, the default limit; the bucket counts
    assert plan_fused(16, 4096, 8, 64, 2) and not plan_fused(16, 4097, 8, 64, 2)
    assert not plan_fused(8, 16384, 8, 64, 2) and plan_fused(1, 32768, 8, 64, 2)
    assert not plan_fused(1, 1, 1, 64, 2, PlanParams(fused_max_bytes=0))
    # and the grid's chunks: at most fused_max_chunks (8)
    assert plan_fused(1, 1024, 8, 64, 2, chunks=8) and not plan_fused(1, 1024, 8, 64, 2, chunks=9)
    with pytest.raises(ValueError):
        PlanParams(fused_max_bytes=-1)
    with pytest.raises(ValueError):
        PlanParams(fused_max_chunks=-1)


@pytest.mark.parametrize("slabs_needed", [1, 3])
def test_probe_accepts_right_and_rejects_wrong_kernels(monkeypatch, slabs_needed):
    """The probe's reference and tolerance, with the kernel replaced by gather-SDPA
    (right) or by zeros (wrong): the probe must pass the first and reject the second."""
    from slabserve.attention.gather import GatherSDPA
    from slabserve.bench.cuda_kernel import make_case

    lens = (40,) if slabs_needed == 1 else (40, 30, 50)
    pool, batch, q = make_case(lens, 12, 4, 64, 16, mx.bfloat16, 3)
    assert pool.num_slabs == slabs_needed
    nat, seen = NativeCUDA(), []

    def right(q1, ppool, layer, b, scale, chunks, fused, pages):
        seen.append((ppool.num_slabs, b.tables, b.lengths, chunks, fused, pages))
        return GatherSDPA()(q1, ppool, layer, b, scale)

    monkeypatch.setattr(nat, "_run", right)
    mx.random.seed(3)
    first = mx.random.normal((4,))
    mx.random.seed(3)
    assert nat._probe(q, pool) is None
    assert mx.array_equal(first, mx.random.normal((4,)))  # global random state untouched
    ns = slab_bucket(slabs_needed)
    # every kernel __call__ may launch: direct, split + merge, and fused (the default
    # decides per step between the last two), with and without chunks past the sequence
    # (the live kernel's MP: 128 tokens of 16-token pages; the sequence fills 2 chunks)
    mp = cuda_plan.min_pages(nat._plan_params(q, pool.geom), 16)
    assert mp == 8
    assert seen == [(ns, [[2 * ns - 1, 0] * mp], [(2 * mp - 1) * 16 + 3], c, f, mp)
                    for c, f in ((1, False), (2, False), (2, True), (4, False), (4, True))]
    monkeypatch.setattr(nat, "_run", lambda q1, *a: mx.zeros(q1.shape, dtype=q1.dtype))
    reason = nat._probe(q, pool)
    assert reason is not None and "wrong" in reason


def test_slab_inputs_fixed_for_a_growing_pool():
    from slabserve.attention.cuda_source import FIXED_SLAB_INPUTS, pool_slab_inputs
    from slabserve.kvcache.pool import SlabPool

    g = _geom(head_dim=64, slab_blocks=2)
    pool = SlabPool(g, initial_slabs=1, max_slabs=21)
    seen = set()
    for n in range(1, 22):
        pool.grow(n)
        seen.add(pool_slab_inputs(pool))
    assert seen == {32}  # one kernel build for the pool's whole life
    big = SlabPool(g, initial_slabs=1, max_slabs=1000)
    assert pool_slab_inputs(big) == FIXED_SLAB_INPUTS
    big.grow(40)
    assert pool_slab_inputs(big) == 64  # past the cap: buckets as before
    assert pool_slab_inputs(SlabPool(g, initial_slabs=3)) == 4  # size unknown
