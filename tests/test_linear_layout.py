"""Linear layout (engine/linear_layout.py): the transposed modules against float64 numpy,
where ``apply`` replaces what (float32 Linear / Embedding on CPU; quantized and half
precision layers, other devices and the off switch leave the model alone), the switch's flow
from flags and environment, and greedy generation with the layout on token-exact with
mlx-lm's own output on the original model; multi-token products by numpy's BLAS where MLX
runs on its bundled reference BLAS (the decision, the modules, token-exact generation)."""

import random

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from attention_cases import nonzero_f32
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.utils import load
from models import CONFIGS, make

from slabserve.attention import host_math as hm
from slabserve.engine import linear_layout as ll
from slabserve.engine.config import CacheConfig, RunnerConfig
from slabserve.engine.generate import greedy_generate
from slabserve.engine.runner import ModelRunner


def _linear(rng, d_in, d_out, bias):
    lin = nn.Linear(d_in, d_out, bias=bias)
    lin.weight = mx.array(nonzero_f32(rng, d_out, d_in))
    if bias:
        lin.bias = mx.array(nonzero_f32(rng, d_out))
    return lin


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 96), (8, 96), (2, 5, 96)])
def test_transposed_linear_matches_float64(bias, shape):
    rng = np.random.default_rng(len(shape) * 10 + shape[0] + bias)
    lin = _linear(rng, 96, 40, bias)
    x = nonzero_f32(rng, *shape)
    w64 = np.array(lin.weight).astype(np.float64)
    want = x.astype(np.float64) @ w64.T
    if bias:
        want += np.array(lin.bias).astype(np.float64)
    t = ll.TransposedLinear.from_linear(lin)
    assert t.weight_t.shape == (96, 40) and ("bias" in t) == bias
    assert set(dict(tree_flatten(t.parameters()))) == ({"weight_t", "bias"} if bias
                                                       else {"weight_t"})
    got, base = t(mx.array(x)), lin(mx.array(x))
    assert got.shape == base.shape and got.dtype == mx.float32
    np.testing.assert_allclose(np.array(got), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(base), want, rtol=1e-5, atol=1e-5)


def test_transposed_embedding_lookup_and_as_linear():
    rng = np.random.default_rng(7)
    emb = nn.Embedding(50, 24)
    emb.weight = mx.array(nonzero_f32(rng, 50, 24))
    t = ll.TransposedEmbedding.from_embedding(emb)
    assert t.weight_t.shape == (24, 50)
    ids = mx.array([[3, 0, 49, 3], [7, 8, 9, 10]])
    assert np.array_equal(np.array(t(ids)), np.array(emb(ids)))  # a gather: exact
    x = nonzero_f32(rng, 2, 3, 24)
    want = x.astype(np.float64) @ np.array(emb.weight).astype(np.float64).T
    np.testing.assert_allclose(np.array(t.as_linear(mx.array(x))), want, rtol=1e-5, atol=1e-5)


class _Toy(nn.Module):
    def __init__(self, quantized: bool = False, dtype=mx.float32) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 64)
        self.layers = [nn.Linear(64, 64), nn.Linear(64, 128, bias=False)]
        self.head = nn.Linear(128, 64)
        if dtype != mx.float32:
            self.set_dtype(dtype)
        if quantized:  # the middle layer and the embedding quantized, the rest float32
            nn.quantize(self, group_size=32, bits=4,
                        class_predicate=lambda p, m: p in ("layers.1", "embed"))

    def __call__(self, ids):
        return self.head(self.layers[1](self.layers[0](self.embed(ids))))


def test_apply_replaces_float32_layers_and_keeps_the_function():
    toy = _Toy()
    ids = mx.array([[1, 2, 63]])
    before = toy(ids)
    d = ll.apply(toy, True, host_products=False)
    assert d == ll.Decision(ll.Reason.APPLIED, linears=3, embeddings=1,
                            bytes=4 * (64 * 64 + 64 * 64 + 64 * 128 + 128 * 64),
                            host_products=False, blas="set by the caller")
    assert all(isinstance(m, ll.TransposedLinear) for m in (*toy.layers, toy.head))
    assert isinstance(toy.embed, ll.TransposedEmbedding)
    assert not any(k.endswith(".weight") or k == "weight"
                   for k, _ in tree_flatten(toy.parameters()))
    np.testing.assert_allclose(np.array(toy(ids)), np.array(before), rtol=1e-5, atol=1e-5)


def test_weight_attribute_still_reads_and_writes():
    """Model code that uses ``.weight`` directly (mlx-lm's minicpm / seed_oss heads:
    ``h @ embed_tokens.weight.T``; gemma3n assigns ``proj.weight``) sees the original
    layout: a transposed view on read, stored transposed on assignment."""
    toy = _Toy()
    ids = mx.array([[1, 2, 63]])
    rng = np.random.default_rng(3)
    h = mx.array(nonzero_f32(rng, 1, 3, 64))
    e0, w0 = np.array(toy.embed.weight), np.array(toy.head.weight)
    head_before = h @ toy.embed.weight.T
    ll.apply(toy, True)
    assert toy.embed.weight.shape == e0.shape and toy.head.weight.shape == w0.shape
    np.testing.assert_array_equal(np.array(toy.embed.weight), e0)
    np.testing.assert_allclose(np.array(h @ toy.embed.weight.T), np.array(head_before),
                               rtol=1e-5, atol=1e-5)
    new_w = mx.array(nonzero_f32(rng, *w0.shape))
    toy.head.weight = new_w
    assert "weight" not in toy.head and toy.head["weight_t"].shape == w0.shape[::-1]
    x = mx.array(nonzero_f32(rng, 2, w0.shape[1]))
    want = np.array(x, np.float64) @ np.array(new_w, np.float64).T
    if "bias" in toy.head:
        want += np.array(toy.head["bias"], np.float64)
    np.testing.assert_allclose(np.array(toy.head(x)), want, rtol=1e-4, atol=1e-4)
    assert toy(ids).shape[-1] == w0.shape[0]


def test_quantized_layers_are_left_alone():
    toy = _Toy(quantized=True)
    d = ll.apply(toy, True)
    assert (d.linears, d.embeddings) == (2, 0)
    assert isinstance(toy.layers[1], nn.QuantizedLinear)
    assert isinstance(toy.embed, nn.QuantizedEmbedding)
    assert isinstance(toy.layers[0], ll.TransposedLinear)


def test_half_precision_is_left_alone():
    toy = _Toy(dtype=mx.bfloat16)
    assert ll.apply(toy, True) == ll.Decision(ll.Reason.NOTHING_FLOAT32)
    assert type(toy.layers[0]) is nn.Linear


def test_off_on_gpu_and_when_switched_off(monkeypatch):
    monkeypatch.setattr(ll, "on_cpu", lambda: False)
    toy = _Toy()
    assert ll.apply(toy, True) == ll.Decision(ll.Reason.NOT_CPU)
    assert type(toy.head) is nn.Linear and type(toy.embed) is nn.Embedding
    monkeypatch.setattr(ll, "on_cpu", lambda: True)
    assert ll.apply(toy, False) == ll.Decision(ll.Reason.SWITCHED_OFF)
    assert type(toy.head) is nn.Linear
    assert ll.apply(toy, True).reason is ll.Reason.APPLIED


REFERENCE = hm.MlxBlas(True, "MLX's bundled reference BLAS (test)")


@pytest.fixture
def host_calls(monkeypatch):
    """Counts ``host_math.host_product`` calls (still computing them)."""
    calls = []
    real = hm.host_product

    def counted(x, w, bias=None):
        calls.append(x.shape)
        return real(x, w, bias)

    monkeypatch.setattr(hm, "host_product", counted)
    return calls


@pytest.mark.parametrize("bias", [False, True])
def test_host_products_match_float64_for_multi_token_inputs_only(bias, host_calls):
    rng = np.random.default_rng(7)
    t = ll.TransposedLinear.from_linear(_linear(rng, 128, 256, bias), host_products=True)
    w = np.array(t.weight_t, dtype=np.float64)
    b = np.array(t.bias, dtype=np.float64) if bias else 0.0
    for shape, host in [((2, 32, 128), True), ((8, 1, 128), False), ((2, 4, 128), False),
                        ((64, 128), False)]:  # [B, 1] decode, too little work, 2-D
        x = nonzero_f32(rng, *shape)
        got = t(mx.array(x))
        assert got.shape == (*shape[:-1], 256) and got.dtype == mx.float32
        np.testing.assert_allclose(np.array(got), x.astype(np.float64) @ w + b,
                                   rtol=1e-5, atol=1e-5)
        assert bool(host_calls) == host, shape
        host_calls.clear()


def test_host_products_decided_by_mlx_blas(monkeypatch):
    monkeypatch.setattr(hm, "mlx_blas", lambda: REFERENCE)
    toy = _Toy()
    d = ll.apply(toy, True)
    assert (d.host_products, d.blas) == (True, REFERENCE.detail)
    assert all(m.host_products for m in (*toy.layers, toy.head))
    fast = hm.MlxBlas(False, "a global cblas_sgemm (a preloaded BLAS) serves MLX")
    monkeypatch.setattr(hm, "mlx_blas", lambda: fast)
    assert ll.apply(_Toy(), True).host_products is False
    monkeypatch.setattr(hm, "mlx_blas", lambda: REFERENCE)
    assert ll.apply(_Toy(), True, host_products=False).host_products is False


MAX_TOKENS = 20


@pytest.mark.parametrize("host", [False, True], ids=["mlx-products", "host-products"])
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_runner_with_layout_is_token_exact_with_mlx_lm(arch, host, model_root, monkeypatch,
                                                       host_calls):
    """mlx-lm's greedy tokens on the model as loaded, then the runner's on the same model
    with every float32 Linear (and the embedding: tied heads) stored transposed; with
    ``host``, as decided where MLX runs on its bundled reference BLAS (every multi-token
    product by numpy's BLAS: threshold 0)."""
    model, _ = load(str(make(model_root, arch)))
    rng = random.Random(11)
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (4, 37)]
    refs = [[int(t) for t, _ in generate_step(mx.array(p), model, max_tokens=MAX_TOKENS)]
            for p in prompts]
    assert all(len(set(r)) > 2 for r in refs), "degenerate output makes the test weak"
    if host:
        monkeypatch.setattr(hm, "mlx_blas", lambda: REFERENCE)
        monkeypatch.setattr(ll, "MIN_HOST_WORK", 0)
    runner = ModelRunner(model, CacheConfig(block_size=16, kv_budget_bytes=1 << 24),
                         RunnerConfig(linear_layout=True))
    assert runner.linear_layout.reason is ll.Reason.APPLIED
    assert runner.linear_layout.host_products is host
    assert runner.attention.host_math.products is host
    assert not any(type(m) in (nn.Linear, nn.Embedding) for _, m in model.named_modules())
    assert greedy_generate(runner, prompts, MAX_TOKENS, chunk=16) == refs
    # prefill chunks (4 | 16 + 16 + 5 tokens) went to numpy, decode steps did not
    assert bool(host_calls) == host and all(shape[1] > 1 for shape in host_calls)
