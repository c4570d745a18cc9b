"""Which CUDA kernel variant takes a case ("auto"'s choice, and the mma / lean / async
forms forced), what each changes in the source and the plan, and the names
bench.cuda_kernel's --natives takes (CPU only)."""

from __future__ import annotations

import mlx.core as mx
import pytest
from cuda_fakes import FakeKernel

from slabserve.attention.cuda_plan import chunk_spans, min_pages, plan_chunks
from slabserve.attention.cuda_source import unit_tokens
from slabserve.attention.native_cuda import NativeCUDA
from slabserve.kvcache.pool import PoolGeometry


@pytest.mark.parametrize(
    "dt, qdt, hq, hkv, want",
    [
        (mx.float16, mx.float16, 32, 8, "lean"),  # 4 q heads per kv head: FMA measured faster
        (mx.bfloat16, mx.bfloat16, 16, 8, "lean"),
        (mx.float32, mx.float32, 32, 8, "async"),  # float32 pool: no lean
        (mx.bfloat16, mx.bfloat16, 14, 2, "mma"),  # 7: tensor cores measured faster
        (mx.float16, mx.float16, 64, 4, "mma"),
        (mx.float32, mx.float32, 14, 2, "async"),  # no f32 tensor-core path
        (mx.float16, mx.float32, 14, 2, "async"),  # mixed dtypes
        (mx.float16, mx.float32, 32, 8, "lean"),  # mixed dtypes: lean reads q as TQ
    ],
)
def test_auto_variant_choice_and_mma_plan(dt, qdt, hq, hkv, want):
    from slabserve.bench.cuda_kernel import make_case

    pool, batch, q = make_case((300, 2000), hq, hkv, 64, 16, dt, 64)
    q = q.astype(qdt)
    nat = NativeCUDA()
    assert nat.variant == "auto" and nat._case(q, pool.geom)[0] == want
    params = nat._plan_params(q, pool.geom)
    assert params.min_chunk_tokens == 128
    if want == "mma" and hq == 14:
        # B=8 with 14/2 heads: one wave of 33 chunks; 16k tokens fill 32 (1024 pages in
        # chunks of 32), 1k 8 (chunks of 128 tokens, the fewest)
        grid = plan_chunks(8, nat._head_blocks(q, pool.geom), params)
        assert grid == 33
        for ctx, used in ((16384, 32), (1024, 8)):
            spans = chunk_spans(ctx, grid, min_pages(params, 16), 16)
            assert sum(1 for r in spans if len(r)) == used
        # the tensor-core variant never fuses its merge (slower at every chunk count)
        assert not nat._fused(batch, pool.geom, params, grid)
        assert not nat._fused(batch, pool.geom, params, 2)


def test_lean_variant_takes_only_its_shapes():
    """"lean" (the async ring with the row-group reduction in shared memory) runs a 16-bit
    pool with head_dim 64 and 2 or 4 q heads per kv head, or head_dim 128 and 4; anything
    else runs "async", with the same ring, unit and plan."""
    from slabserve.attention.cuda_source import case_variant, smem_bytes

    assert case_variant("lean", mx.float16, mx.float16, 4, 64) == "lean"
    assert case_variant("lean", mx.bfloat16, mx.bfloat16, 2, 64) == "lean"
    assert case_variant("lean", mx.bfloat16, mx.bfloat16, 4, 128) == "lean"  # 16 lanes a row
    for args in [(mx.float32, mx.float32, 4, 64), (mx.float16, mx.float16, 8, 64),
                 (mx.float16, mx.float16, 2, 128), (mx.float16, mx.float16, 7, 64),
                 (mx.float16, mx.float16, 4, None), (mx.float16, mx.float16, 4, 256)]:
        assert case_variant("lean", *args) == "async", args
    assert smem_bytes("lean", 2, 64, 4, 4, 3) == smem_bytes("async", 2, 64, 4, 4, 3)
    assert unit_tokens(4, "lean") == unit_tokens(4, "async") == 4
    q = mx.zeros((8, 32, 1, 64), dtype=mx.float16)
    geom = PoolGeometry(1, 8, 64, 16, 256, mx.float16)
    nat = NativeCUDA(variant="lean")
    assert nat._case(q, geom) == ("lean", 4)
    assert nat._plan_params(q, geom) == NativeCUDA(variant="async")._plan_params(q, geom)


def test_only_shipped_variants():
    """NativeCUDA takes the shipped variants (and "sync", the register-load split that
    NativeMetal's own kernel runs); the measured-and-dropped ones are gone."""
    for gone in ("xred", "bulk", "sync3", ""):
        with pytest.raises(ValueError):
            NativeCUDA(variant=gone)
    assert NativeCUDA(variant="sync").variant == "sync"


def test_natives_names():
    """bench.cuda_kernel --natives: a shipped variant, optionally the ring depth 3 (the
    names earlier tables used: auto3, mma3), optionally f / s (merge fused / split)."""
    from slabserve.bench.cuda_kernel import make_natives

    nats = make_natives("auto,auto3,auto3f,mma3,lean3s,async")
    assert [n.variant for n in nats.values()] == ["auto", "auto", "auto", "mma", "lean",
                                                  "async"]
    assert [n.fused_merge for n in nats.values()] == [None, None, True, None, False, None]
    for bad in ("xred3", "bulk3", "sync", "auto4", "auto3w2", "async3u8"):
        with pytest.raises(ValueError, match="bad native name"):
            make_natives(bad)


def test_lean_variant_compiles_the_slab_size_in(monkeypatch):
    """"lean" (auto's choice where it applies) instantiates the async kernel with the lean
    flag and has the pool's slab size as a literal, so pools of two slab sizes get two
    kernels; the other variants read the slab size from the first slab's shape."""
    from slabserve.attention.cuda_source import case_variant, kernel_body
    from slabserve.bench.cuda_kernel import make_case

    assert case_variant("lean", mx.float16, mx.float16, 4, 64) == "lean"
    assert case_variant("lean", mx.float16, mx.float16, 7, 64) == "async"
    body = kernel_body(2, "split", "lean", 0.125, 4096)
    assert "pooled_decode_async<" in body and "false, true>" in body
    assert "table_shape[1], MP, 4096," in body
    plain = kernel_body(2, "split", "async", 0.125)
    assert "k0_shape[0] / (HKV * BS)" in plain and "false>" in plain and ", true>" not in plain
    log: list = []
    monkeypatch.setattr(mx.fast, "cuda_kernel", lambda **kw: FakeKernel(log, **kw))
    nat = NativeCUDA(variant="lean", fused_merge=False)
    for sb in (64, 128):
        pool, batch, q = make_case((600, 3000), 32, 8, 64, 16, mx.float16, sb)
        nat._run(q, pool, 0, batch, 0.125, 4)
        assert f"table_shape[1], MP, {sb}," in log[-2]["spec"]["source"]
    splits = {e["spec"]["name"] for e in log if "_split_" in e["spec"]["name"]}
    assert len(splits) == 2  # one build per slab size
