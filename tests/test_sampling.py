"""Per-request sampling in one batch (engine/sampling.py) against numpy references."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from slabserve.engine.sampling import RowSpec, mix, sample
from slabserve.scheduler.api import SamplingParams

V = 64


def logits(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 2, size=(rows, V)).astype(np.float32)


def spec(prompt=(1, 2), output=(), seed=7, **kw) -> RowSpec:
    kw.setdefault("temperature", 1.0)
    return RowSpec(SamplingParams(**kw), seed, prompt, output)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - (np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))
                + x.max(-1, keepdims=True))


def test_greedy_and_top_k_1_are_argmax():
    x = logits(4)
    specs = [spec(temperature=0.0), spec(top_k=1), spec(temperature=0.0), spec(top_k=1, seed=3)]
    got = [t for t, _ in sample(mx.array(x), specs)]
    assert got == list(x.argmax(-1))


def test_seeded_row_is_the_same_alone_and_anywhere_in_a_batch():
    x = logits(5, seed=1)
    s = spec(seed=123, output=(5, 6, 7), top_p=0.9, min_p=0.02)
    alone = sample(mx.array(x[2:3]), [s])[0][0]
    others = [spec(seed=i) for i in range(4)]
    batched = sample(mx.array(x), others[:2] + [s] + others[2:])[2][0]
    assert batched == alone
    moved = sample(mx.array(np.roll(x, -2, axis=0)), [s] + others)[0][0]
    assert moved == alone


def test_draws_follow_the_distribution_and_depend_on_seed_and_index():
    x = np.full((1, V), -30.0, dtype=np.float32)
    x[0, :4] = np.log([0.1, 0.2, 0.3, 0.4])
    n = 1500
    draws = [t for t, _ in sample(mx.array(np.repeat(x, n, 0)), [spec(seed=s) for s in range(n)])]
    freq = np.bincount(draws, minlength=V)[:4] / len(draws)
    assert set(draws) <= {0, 1, 2, 3}
    assert np.abs(freq - [0.1, 0.2, 0.3, 0.4]).max() < 0.05
    assert len({mix(1, i) for i in range(100)} | {mix(2, i) for i in range(100)}) == 200


def test_top_p_min_p_top_k_restrict_the_support():
    x = np.full((1, V), -30.0, dtype=np.float32)
    x[0, :4] = np.log([0.1, 0.2, 0.3, 0.4])
    for kw, allowed in [(dict(top_p=0.5), {3, 2}), (dict(min_p=0.6), {3, 2}),
                        (dict(top_k=2), {3, 2}), (dict(top_p=0.35), {3})]:
        specs = [spec(seed=s, **kw) for s in range(200)]
        got = {t for t, _ in sample(mx.array(np.repeat(x, 200, 0)), specs)}
        assert got == allowed, kw


def test_logit_bias_and_penalties_match_numpy():
    x = logits(1, seed=2)
    prompt, output = (3, 4, 4), (4, 9, 9, 9)
    sp = spec(prompt=prompt, output=output, temperature=0.0, logit_bias=((11, 5.0),),
              repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25, logprobs=3)
    tok, lp = sample(mx.array(x), [sp])[0]
    ref = x[0].astype(np.float64).copy()
    ref[11] += 5.0
    for t in set(prompt + output):
        ref[t] = ref[t] * 1.3 if ref[t] < 0 else ref[t] / 1.3
    for t in set(output):
        ref[t] -= 0.5 + 0.25 * output.count(t)
    ref_lp = log_softmax(ref[None])[0]
    assert tok == int(ref.argmax())
    assert lp.token_id == tok and math.isclose(lp.logprob, ref_lp[tok], abs_tol=1e-4)
    top = [int(i) for i in np.argsort(-ref_lp)[:3]]
    assert [t for t, _ in lp.top] == top
    assert np.allclose([v for _, v in lp.top], ref_lp[top], atol=1e-4)


@pytest.mark.parametrize("k", [0, 2, 5])
def test_logprobs_per_row_only_where_asked(k):
    x = logits(3, seed=3)
    specs = [spec(temperature=0.0), spec(seed=1, logprobs=k), spec(temperature=0.0, logprobs=1)]
    out = sample(mx.array(x), specs)
    ref = log_softmax(x)
    assert out[0][1] is None
    for row in (1, 2):
        tok, lp = out[row]
        assert math.isclose(lp.logprob, ref[row, tok], abs_tol=1e-4)
        want = specs[row].params.logprobs
        assert [t for t, _ in lp.top] == [int(i) for i in np.argsort(-ref[row])[:want]]


@pytest.mark.parametrize("vocab,candidates", [(64, 1024), (3000, 1024), (3000, 10**9)])
def test_batched_filters_equal_mlx_lm_applied_row_by_row(vocab, candidates, monkeypatch):
    """Candidates path, its full-sort fallback (flat rows), and the full sort alone (GPU)."""
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

    from slabserve.engine import sampling
    from slabserve.engine.sampling import _filter

    monkeypatch.setattr(sampling, "CANDIDATES", candidates)

    rng = np.random.default_rng(vocab)
    scales = [0.05, 0.3, 3.0, 8.0, 0.1, 5.0]  # flat rows send top_p past the candidates
    x = np.stack([rng.normal(0, s, vocab) for s in scales]).astype(np.float32)
    lp = mx.array(x) - mx.logsumexp(mx.array(x), axis=-1, keepdims=True)
    params = [SamplingParams(top_p=0.9), SamplingParams(top_p=0.5, top_k=20),
              SamplingParams(min_p=0.1), SamplingParams(top_k=5, min_p=0.05),
              SamplingParams(top_p=0.95, min_p=0.01, top_k=2000), SamplingParams()]
    got = np.array(_filter(lp, params))
    for i, p in enumerate(params):
        row = lp[i : i + 1]
        if p.top_p < 1:
            row = apply_top_p(row, p.top_p)
        if p.min_p > 0:
            row = apply_min_p(row, p.min_p)
        if 0 < p.top_k < vocab:
            row = apply_top_k(row, p.top_k)
        want = np.array(row)[0]
        assert (np.isinf(got[i]) == np.isinf(want)).all(), (i, p)
        assert np.allclose(got[i][~np.isinf(want)], want[~np.isinf(want)])
