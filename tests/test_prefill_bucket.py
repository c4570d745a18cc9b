"""Prefill attention with shape bucketing (SLABSERVE_PREFILL_KV_BUCKET) equals exact
shapes and a float64 reference; a bucketed runner is token-exact with mlx-lm."""

import random

import mlx.core as mx
import numpy as np
import pytest
from attention_cases import causal_reference64, filled_pool, nonzero_f32
from mlx_lm.generate import generate_step
from mlx_lm.utils import load
from models import make

from slabserve.attention import prefill as pf
from slabserve.attention.base import DecodeBatch
from slabserve.engine.config import CacheConfig, RunnerConfig
from slabserve.engine.generate import greedy_generate
from slabserve.engine.runner import ModelRunner

QH, KVH, D, BS, SB = 4, 2, 16, 4, 8  # GQA 4/2, block 4 tokens, 8 blocks per slab


@pytest.fixture(scope="module")
def filled():
    """A pool holding one sequence of 150 tokens on a shuffled table over many slabs,
    plus the numpy K/V written there."""
    rng = np.random.default_rng(7)
    geom, pool, table, k, v = filled_pool(rng, KVH, D, BS, SB, 150)
    return geom, pool, table, k, v, rng


# (start, L): chunk starts incl. 0, kv lengths n = start + L that are not multiples of
# the buckets, single-token and odd-length chunks.
CASES = [(0, 37), (0, 5), (13, 40), (48, 17), (61, 1), (100, 50), (129, 21)]


@pytest.mark.parametrize("bucket", [0, 16, 24, 64])
@pytest.mark.parametrize("start,length", CASES)
def test_matches_float64causal_reference64(filled, bucket, start, length):
    geom, pool, table, k, v, rng = filled
    n = start + length
    q = nonzero_f32(rng, QH, length, D)
    scale = D**-0.5
    ks, vs = k[:, start:n], v[:, start:n]
    prefix = None
    if start > 0:
        prefix = DecodeBatch(geom, [table[: -(-n // BS)]], [n])
    args = (mx.array(q)[None], mx.array(ks)[None], mx.array(vs)[None], pool, 0, prefix, scale)
    got = pf.prefill_attention(*args, bucket=bucket)
    assert got.shape == (1, QH, length, D) and got.dtype == mx.float32
    want = causal_reference64(q, k[:, :n], v[:, :n], start, scale)
    np.testing.assert_allclose(np.array(got[0]), want, rtol=2e-5, atol=2e-5)
    if bucket:
        exact = pf.prefill_attention(*args, bucket=0)
        np.testing.assert_allclose(np.array(got), np.array(exact), rtol=1e-5, atol=1e-6)


def test_shapes_are_bucketed(filled):
    """The padded plan has a bucket-multiple kv length, the mask hides the padding and
    the future, and it is built once per forward (shared by layers)."""
    geom, pool, table, *_ = filled
    n, length = 61, 9
    prefix = DecodeBatch(geom, [table[: -(-n // BS)]], [n])
    padded, mask = pf._bucket_plan(prefix, length, pf.q_bucket(length), 24, mx.float32)
    assert padded.num_blocks * BS == 72 and padded.lengths == [n]
    assert mask.shape == (1, 1, 16, 72)
    m = np.array(mask[0, 0])
    assert np.all(m[length - 1, : n] == 0) and np.all(np.isneginf(m[length - 1, n:]))
    assert np.all(np.isneginf(m[0, n - length + 1 :])) and m[0, n - length] == 0
    again = pf._bucket_plan(prefix, length, pf.q_bucket(length), 24, mx.float32)
    assert again[0] is padded
    assert [pf.q_bucket(x) for x in (1, 16, 17, 128, 129, 512, 600)] == [
        16, 16, 32, 128, 256, 512, 640]


def test_env_bucket_reaches_the_runner_config(monkeypatch):
    """SLABSERVE_PREFILL_KV_BUCKET is read by ``slabserve serve`` (the edge) into
    RunnerConfig; the flag wins; a negative value is refused."""
    from slabserve import env
    from slabserve.serve import configs, parser

    monkeypatch.setenv("SLABSERVE_PREFILL_KV_BUCKET", "1024")
    assert env.prefill_kv_bucket() == 1024
    assert configs(parser().parse_args([]))[1].runner.prefill_kv_bucket == 1024
    flag = parser().parse_args(["--prefill-kv-bucket", "32"])
    assert configs(flag)[1].runner.prefill_kv_bucket == 32
    monkeypatch.setenv("SLABSERVE_PREFILL_KV_BUCKET", "-1")
    with pytest.raises(ValueError):
        env.prefill_kv_bucket()
    monkeypatch.delenv("SLABSERVE_PREFILL_KV_BUCKET")
    assert configs(parser().parse_args([]))[1].runner.prefill_kv_bucket is None


def test_runner_bucketed_is_token_exact_with_mlx_lm(model_root):
    """Chunked prefill through the runner with bucketing on (odd chunk, small bucket:
    every prefix chunk is padded) gives mlx-lm's greedy tokens, and the runner's
    configured bucket is the one prefill attention gets."""
    model, _ = load(str(make(model_root, "llama-gqa")))
    rng = random.Random(5)
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (70, 23)]
    want = [[int(t) for t, _ in generate_step(mx.array(p), model, max_tokens=12)]
            for p in prompts]
    assert len(set(want[0])) > 3, "degenerate model output makes the comparison weak"
    calls: list = []
    real = pf.prefill_attention

    def spy(*a, **kw):
        calls.append(a[7])  # the bucket argument
        return real(*a, **kw)

    import slabserve.attention.runtime as rt

    rt_old, rt.prefill_attention = rt.prefill_attention, spy
    try:
        runner = ModelRunner(model, CacheConfig(block_size=4, slab_tokens=16,
                                                kv_budget_bytes=1 << 24),
                             RunnerConfig(prefill_kv_bucket=24))
        assert greedy_generate(runner, prompts, 12, chunk=9) == want
    finally:
        rt.prefill_attention = rt_old
    assert runner.allocator.num_used == 0 and runner.allocator.check_integrity()
    assert calls and set(calls) == {24}


@pytest.mark.parametrize("raw, cuda, want", [
    (None, False, 0), (None, True, pf.CUDA_DEFAULT_BUCKET), (0, True, 0), (512, False, 512),
])
def test_default_bucket_per_device(monkeypatch, model_root, raw, cuda, want):
    """Unset: the bucket is on (CUDA_DEFAULT_BUCKET) where MLX computes on CUDA, off on
    CPU; an explicit value, 0 included, wins everywhere."""
    monkeypatch.setattr(pf, "_on_cuda", lambda: cuda)
    model, _ = load(str(make(model_root, "llama-gqa")))
    runner = ModelRunner(model, CacheConfig(block_size=4, slab_tokens=16,
                                            kv_budget_bytes=1 << 24),
                         RunnerConfig(prefill_kv_bucket=raw))
    assert runner.attention.prefill_bucket == want
