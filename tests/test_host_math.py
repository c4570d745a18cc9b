"""Host math (attention/host_math.py): numpy causal attention and SiLU against float64
references, when the host path applies, the ``swiglu`` dispatcher, the switch's flow
from flags to the process, greedy generation with the host path forced on, and the matrix
products in numpy where MLX runs on its bundled reference BLAS (decided from the process)."""

import json
import os
import random
import subprocess
import sys
import textwrap

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from attention_cases import causal_reference64, filled_pool, nonzero_f32
from mlx_lm.generate import generate_step
from mlx_lm.utils import load

from slabserve import blas, env
from slabserve.attention import host_math as hm
from slabserve.attention import prefill as pf
from slabserve.attention.base import DecodeBatch
from slabserve.engine import patch
from slabserve.engine.config import CacheConfig, RunnerConfig
from slabserve.engine.embedded import ensure_model
from slabserve.engine.generate import greedy_generate
from slabserve.engine.runner import ModelRunner

D = 64


@pytest.fixture
def forced():
    """A host-math switch on for every float32 CPU call (threshold 0)."""
    host = hm.HostMath(enabled=True, min_elements=0)
    yield host
    host.close()


@pytest.mark.parametrize("rep", [1, 7])
@pytest.mark.parametrize("length", [1, 5, 64])
@pytest.mark.parametrize("extra", [0, 1, 2])  # n = L + extra * L + 3 * extra: up to ~3L
@pytest.mark.parametrize("products", [False, True], ids=["mlx-products", "numpy-products"])
def test_causal_attention_matches_float64(rep, length, extra, products):
    rng = np.random.default_rng(rep * 100 + length * 10 + extra)
    n = length + extra * (length + 3)
    hkv = 2
    q = nonzero_f32(rng, hkv * rep, length, D)
    k, v = nonzero_f32(rng, hkv, n, D), nonzero_f32(rng, hkv, n, D)
    scale = D**-0.5
    got = hm.causal_attention(mx.array(q)[None], mx.array(k)[None], mx.array(v)[None], scale,
                              hm._serial, products)
    assert got.shape == (1, hkv * rep, length, D) and got.dtype == mx.float32
    want = causal_reference64(q, k, v, n - length, scale)
    np.testing.assert_allclose(np.array(got[0]), want, rtol=2e-5, atol=2e-5)


def test_causal_attention_copies_a_read_only_score_buffer(monkeypatch):
    """Where numpy's view of MLX's scores is not writable, the softmax runs on a copy:
    the same result, the MLX array untouched."""
    real = np.asarray
    seen = []

    def read_only(x, *a, **kw):
        out = real(x, *a, **kw)
        if isinstance(x, mx.array):
            out = out.view()
            out.flags.writeable = False
            seen.append(out)
        return out

    monkeypatch.setattr(hm.np, "asarray", read_only)
    rng = np.random.default_rng(3)
    q, k, v = nonzero_f32(rng, 4, 6, D), nonzero_f32(rng, 2, 20, D), nonzero_f32(rng, 2, 20, D)
    got = hm.causal_attention(mx.array(q)[None], mx.array(k)[None], mx.array(v)[None], 0.125)
    assert seen, "the score buffer was not read through np.asarray"
    want = causal_reference64(q, k, v, 20 - 6, 0.125)
    np.testing.assert_allclose(np.array(got[0]), want, rtol=2e-5, atol=2e-5)


def test_causal_mask_is_mlx_bottom_right():
    """MLX's ``mask="causal"`` with fewer queries than keys: the same semantics."""
    rng = np.random.default_rng(0)
    q = mx.array(nonzero_f32(rng, 1, 4, 9, D))
    k, v = mx.array(nonzero_f32(rng, 1, 2, 30, D)), mx.array(nonzero_f32(rng, 1, 2, 30, D))
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask="causal")
    got = hm.causal_attention(q, k, v, 0.125)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-6)


def test_causal_attention_rejects_more_queries_than_keys():
    q, k = mx.zeros((1, 2, 5, D)), mx.zeros((1, 2, 4, D))
    with pytest.raises(ValueError):
        hm.causal_attention(q, k, k, 1.0)


@pytest.mark.parametrize("start,length", [(0, 37), (13, 40), (61, 1), (100, 50)])
def test_prefill_attention_host_path_over_the_pool(forced, start, length, monkeypatch):
    """``prefill_attention`` (bucket 0) takes the host path with and without a prefix."""
    rng = np.random.default_rng(start + length)
    hkv, n = 2, start + length
    geom, pool, table, k, v = filled_pool(rng, hkv, D, 4, 8, n)
    calls = []
    real = hm.causal_attention
    monkeypatch.setattr(hm, "causal_attention", lambda *a: calls.append(1) or real(*a))
    q = nonzero_f32(rng, 2 * hkv, length, D)
    prefix = DecodeBatch(geom, [table], [n]) if start else None
    got = pf.prefill_attention(mx.array(q)[None], mx.array(k[:, start:])[None],
                               mx.array(v[:, start:])[None], pool, 0, prefix, D**-0.5,
                               bucket=0, host=forced)
    assert calls == [1]
    want = causal_reference64(q, k, v, start, D**-0.5)
    np.testing.assert_allclose(np.array(got[0]), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("shape", [(3, 7), (2, 33, 130), (1, 1)])
def test_silu_mul_matches_float64(shape):
    rng = np.random.default_rng(len(shape))
    g = (rng.standard_normal(shape) * 8).astype(np.float32)
    g.flat[0] = -120.0  # exp(-g) overflows: silu -> -0
    x = rng.standard_normal(shape).astype(np.float32)
    got = hm.silu_mul(mx.array(g), mx.array(x))
    g64 = g.astype(np.float64)
    want = g64 / (1 + np.exp(-g64)) * x
    assert got.shape == shape and got.dtype == mx.float32
    np.testing.assert_allclose(np.array(got), want, rtol=1e-5, atol=1e-6)


def test_silu_mul_of_a_transposed_view():
    g = mx.random.normal((40, 24), key=mx.random.key(1)).T
    x = mx.random.normal((24, 40), key=mx.random.key(2))
    np.testing.assert_allclose(np.array(hm.silu_mul(g, x)), np.array(nn.silu(g) * x),
                               rtol=1e-5, atol=1e-6)


def test_predicates(forced):
    a32 = mx.zeros((1, 2, 8, D))
    assert forced.attention_applies(a32, a32, a32) and forced.silu_applies(a32, a32)
    for dt in (mx.float16, mx.bfloat16):
        a = a32.astype(dt)
        assert not forced.attention_applies(a, a, a) and not forced.silu_applies(a, a)
    assert not forced.silu_applies(a32, mx.zeros((1, 2, 1, D)))  # broadcasting: mlx-lm's own
    forced.min_elements = 2 * 8 * 8 + 1  # scores H*L*n = 128 elements
    assert not forced.attention_applies(a32, a32, a32)
    forced.min_elements = 2 * 8 * 8
    assert forced.attention_applies(a32, a32, a32)
    forced.enabled = False
    assert not forced.attention_applies(a32, a32, a32) and not forced.silu_applies(a32, a32)
    with pytest.raises(ValueError):
        hm.HostMath(min_elements=-1)


BUNDLED = "7f00-7f10 r-xp 0 08:01 5 /v/site-packages/mlx_cpu.libs/libblas-bd8a282c.so.3.10.0"
OPENBLAS = "7f00-7f10 r-xp 0 08:01 6 /usr/lib/x86_64-linux-gnu/libopenblas.so.0"


def test_read_blas():
    assert hm.read_blas(False, f"{OPENBLAS}\n{BUNDLED}\n").reference
    assert "mlx_cpu.libs/libblas-bd8a282c.so" in hm.read_blas(False, BUNDLED).detail
    assert not hm.read_blas(True, BUNDLED).reference  # a global cblas_sgemm wins (ADR 0003)
    assert not hm.read_blas(False, OPENBLAS).reference  # MLX linked to another BLAS
    assert not hm.read_blas(False, None).reference


def test_mlx_blas_agrees_with_the_launchers_status():
    """Two readings of the same process: ours (attention layer, no env) and blas.status()."""
    assert hm.mlx_blas().reference == (blas.status()["blas"] == "reference")


def test_products_follow_mlx_blas_unless_set(monkeypatch):
    monkeypatch.setattr(hm, "mlx_blas", lambda: hm.MlxBlas(True, "bundled"))
    assert hm.HostMath().products and not hm.HostMath(enabled=False).products
    assert not hm.HostMath(products=False).products
    monkeypatch.setattr(hm, "mlx_blas", lambda: hm.MlxBlas(False, "preloaded"))
    assert not hm.HostMath().products and hm.HostMath(products=True).products


def test_swiglu_dispatcher_routes(forced, monkeypatch):
    """The patched swiglu takes the host path only inside ``host_math_scope`` (a runner's
    forward, on its thread) and only where the scope's ``HostMath`` applies."""
    seen = []
    fake = patch.swiglu_dispatcher(lambda g, x: seen.append("mlx") or g * x)
    module = type(sys)("fake_mlx_lm_model")
    module.swiglu = fake
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(hm, "silu_mul", lambda g, x, run: seen.append("host") or g)
    a = mx.ones((4, 8))
    fake(a, a)  # outside a runner forward
    with patch.host_math_scope([module.__name__], forced):
        fake(a, a)
        fake(a.astype(mx.float16), a.astype(mx.float16))
        forced.enabled = False
        fake(a, a)
    forced.enabled = True
    fake(a, a)  # the scope ended
    assert seen == ["mlx", "host", "mlx", "mlx", "mlx"]


MAX_TOKENS = 8


@pytest.mark.parametrize("products", [False, True], ids=["mlx-products", "numpy-products"])
def test_forced_host_path_is_token_exact_with_mlx_lm(forced, monkeypatch, products):
    model, _ = load(str(ensure_model("tiny", cache_dir=env.cache_dir())))
    rng = random.Random(5)
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (5, 70)]
    # mlx-lm's own numbers (its swiglu may be patched already: outside a runner's forward
    # the patched one runs mlx-lm's)
    refs = [[int(t) for t, _ in generate_step(mx.array(p), model, max_tokens=MAX_TOKENS)]
            for p in prompts]
    assert all(len(set(r)) > 3 for r in refs), "degenerate output makes the test weak"
    counts = {"attn": 0, "silu": 0}
    real_attn, real_silu = hm.causal_attention, hm.silu_mul

    def attn(*a):
        counts["attn"] += 1
        return real_attn(*a)

    def silu(*a):
        counts["silu"] += 1
        return real_silu(*a)

    monkeypatch.setattr(hm, "causal_attention", attn)
    monkeypatch.setattr(hm, "silu_mul", silu)
    runner = ModelRunner(model, CacheConfig(block_size=16, kv_budget_bytes=1 << 24),
                         RunnerConfig(host_math=True))
    runner.attention.host_math.min_elements = 0
    runner.attention.host_math.products = products
    assert hasattr(sys.modules[type(model).__module__].swiglu, "__slabserve_original__")
    got = greedy_generate(runner, prompts, MAX_TOKENS, chunk=32)
    assert got == refs
    layers = len(model.layers)
    assert counts["attn"] == layers * (1 + 3)  # prefill chunks: 5 | 32 + 32 + 6
    assert counts["silu"] >= counts["attn"]  # and every decode step's MLP


DECISION = """
    import json, random
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load
    from slabserve import env
    from slabserve.attention import host_math as hm
    from slabserve.engine.config import CacheConfig, RunnerConfig
    from slabserve.engine.embedded import ensure_model
    from slabserve.engine.generate import greedy_generate
    from slabserve.engine.runner import ModelRunner
    model, _ = load(str(ensure_model("tiny", cache_dir=env.cache_dir())))
    rng = random.Random(3)
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (70, 300)]
    refs = [[int(t) for t, _ in generate_step(mx.array(p), model, max_tokens=8)]
            for p in prompts]
    runner = ModelRunner(model, CacheConfig(block_size=16, kv_budget_bytes=1 << 24),
                         RunnerConfig())
    got = greedy_generate(runner, prompts, 8, chunk=256)
    print(json.dumps(dict(reference=hm.mlx_blas().reference, same=got == refs,
                          layout=runner.linear_layout.host_products,
                          attention=runner.attention.host_math.products)))
"""


def test_bundled_blas_process_decides_numpy_products_and_stays_token_exact(tmp_path):
    """A process where MLX runs on its bundled reference BLAS (nothing preloaded): the
    runner decides numpy products for attention and multi-token Linear layers, and its
    greedy tokens equal mlx-lm's in that process."""
    environ = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    environ.setdefault("SLABSERVE_CACHE_DIR", str(tmp_path))
    environ["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(DECISION)], env=environ,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    if not out["reference"]:
        pytest.skip("MLX here does not run on a bundled reference BLAS")
    assert out == dict(reference=True, same=True, layout=True, attention=True)
