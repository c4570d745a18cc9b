"""The sampler's arithmetic as compiled graphs: ``engine.sampling.draw``'s normalisation,
filters (top_k, top_p, min_p), Gumbel-max draw and greedy argmax for a whole batch in one
``mx.compile``d function, with each row's parameters as data.

The eager sampler builds its per-row parameters as several small host arrays and issues
some thirty nodes a step (more with filters); here a step hands the device two host arrays
(``[B, 6]`` float32 parameters, ``[B, 2]`` uint32 keys) and replays a graph traced once
per *feature set* (which of greedy rows, random rows, top_k, top_p, min_p and
normalisation the batch uses) and batch bucket (rows padded to ``batch_bucket``, as step
graphs pad theirs).

Invariant: the tokens (and the normalised logprobs handed back for reported logprobs) are
bitwise those of the eager sampler on the same logits: the same operations in the same
order, row by row.  Rows that do not use a filter the batch uses get a neutral parameter
(top_k 0, top_p 2, min_p floor -inf), which the eager formulas leave unfiltered.  The
thresholds of top_p and top_k come from a full sort of each row (the eager sampler's GPU
form; on the CPU it reads them from the best ``CANDIDATES`` tokens, the same values
whenever those hold the nucleus, and falls back to the full sort otherwise).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import mlx.core as mx
import numpy as np

from slabserve.engine.sampling import (
    RowSpec,
    gumbel_rows,
    key_words,
    min_p_floor,
    top_p_bound,
)
from slabserve.engine.step_graph import batch_bucket

# parameter columns
_INV_T, _K_IDX, _K_ON, _TOP_P, _MIN_P, _RAND = range(6)
Features = tuple[bool, bool, bool, bool, bool, bool]  # greedy, rand, top_k, top_p, min_p, norm


def features(specs: Sequence[RowSpec], vocab: int, normalise: bool) -> Features:
    """What the batch needs of the sampler (the compiled function's key)."""
    rand = [s.params for s in specs if not s.params.greedy]
    return (len(rand) < len(specs), bool(rand),
            any(0 < p.top_k < vocab for p in rand), any(0 < p.top_p < 1 for p in rand),
            any(p.min_p > 0 for p in rand), normalise)


def _params(specs: Sequence[RowSpec], vocab: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row parameters ``[rows, 6]`` and keys ``[rows, 2]``; pad rows are greedy."""
    par = np.zeros((rows, 6), dtype=np.float32)
    par[:, _INV_T], par[:, _TOP_P], par[:, _MIN_P] = 1.0, 2.0, -math.inf
    keys = np.zeros((rows, 2), dtype=np.uint32)
    for i, s in enumerate(specs):
        p = s.params
        if p.greedy:
            continue
        k = p.top_k if 0 < p.top_k < vocab else 0
        par[i] = (1.0 / p.temperature, max(k, 1) - 1, k > 0, top_p_bound(p), min_p_floor(p),
                  1.0)
        keys[i] = key_words(s.seed, s.index)
    return par, keys


def _sampler(feat: Features) -> Callable:
    greedy, rand, use_k, use_p, use_min_p, normalise = feat

    def run(logits: mx.array, par: mx.array, keys: mx.array):
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True) if normalise else logits
        tokens = mx.argmax(lp, axis=-1) if greedy else None
        if rand:
            neg = mx.array(-mx.inf, dtype=lp.dtype)
            f = lp
            if use_k or use_p:
                top = mx.sort(lp, axis=-1)[:, ::-1]
                drop = mx.zeros(lp.shape, dtype=mx.bool_)
                if use_k:
                    kth = mx.take_along_axis(top, par[:, _K_IDX].astype(mx.int32)[:, None], -1)
                    drop = (lp < kth) & (par[:, _K_ON] > 0)[:, None]
                if use_p:
                    probs = mx.exp(top)
                    above = mx.cumsum(probs, axis=-1) - probs
                    kept = (above < par[:, _TOP_P, None]).sum(-1, keepdims=True)
                    drop = drop | (lp < mx.take_along_axis(top, kept - 1, axis=-1))
                f = mx.where(drop, neg, lp)
            if use_min_p:
                f = mx.where(f < f.max(axis=-1, keepdims=True) + par[:, _MIN_P, None], neg, f)
            drawn = mx.argmax(f * par[:, _INV_T, None] + gumbel_rows(keys, f), axis=-1)
            tokens = drawn if tokens is None else mx.where(par[:, _RAND] > 0, drawn, tokens)
        tokens = tokens.astype(mx.int32)
        return (tokens, lp) if normalise else (tokens,)

    return mx.compile(run)


class CompiledSampler:
    """Compiled sampling graphs, one per feature set (see the module docstring); owned by
    the executor, used where decode forwards are compiled (``RunnerConfig.compile_decode``)."""

    def __init__(self) -> None:
        self._fns: dict[Features, Callable] = {}
        self.feature_sets = 0  # compiled functions (each traces once per batch bucket)

    def __call__(self, logits: mx.array, specs: Sequence[RowSpec],
                 normalise: bool) -> tuple[mx.array, mx.array]:
        """(tokens ``[B]`` int32, logits normalised when ``normalise`` else as given) for
        ``logits`` ``[B, vocab]`` float32, after processors and grammar masks; lazy."""
        b, vocab = logits.shape
        feat = features(specs, vocab, normalise)
        fn = self._fns.get(feat)
        if fn is None:
            fn = self._fns[feat] = _sampler(feat)
            self.feature_sets += 1
        rows = batch_bucket(b)
        par, keys = _params(specs, vocab, rows)
        padded = logits if rows == b else mx.pad(logits, ((0, rows - b), (0, 0)))
        out = fn(padded, mx.array(par), mx.array(keys))
        tokens = out[0] if rows == b else out[0][:b]
        if not normalise:
            return tokens, logits
        return tokens, (out[1] if rows == b else out[1][:b])
