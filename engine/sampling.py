"""Per-request sampling inside one batch: every row of a ``[B, vocab]`` logits array is
sampled with its own request's parameters.

Per row, in mlx-lm's order: logits processors (logit_bias, then repetition, presence and
frequency penalties: mlx-lm's own ``make_*`` factories, applied only to rows that set
them), the grammar mask of constrained rows (``allowed``: -inf where a row's grammar
forbids the token; rows without a constraint pass through unchanged), log-softmax, then
for temperature > 0 mlx-lm's filters (top_p, min_p, top_k: the
formulas of ``apply_top_p``/``apply_min_p``/``apply_top_k``, vectorised over rows because
mlx-lm's take one scalar parameter for the whole batch) and a categorical draw at
``1 / temperature`` (Gumbel-max, as ``mx.random.categorical``); temperature 0 is argmax.
The whole batch is one graph and one ``mx.eval`` (``draw`` builds it lazily, so its
tokens can feed the next step before the host reads them).  Given a compiled sampler
(``engine.sampling_graph``, where decode forwards are compiled), ``draw`` hands it the raw
logits and the mask instead: processors, mask and the rest run there as one compiled
function, with the same results bit for bit, for every batch except an all-greedy one
without processors (an argmax, left eager).

Semantics: the repetition penalty looks at prompt + output, presence and frequency
penalties at the output only (as OpenAI defines them; a row without output has none to
penalise).  logit_bias entries whose token lies outside the vocabulary are dropped; of a
token given twice, the last bias counts.  Reported logprobs are those of
the processed distribution (after penalties, bias and grammar mask, before temperature
and filters).

Reproducibility: the draw for a request's ``t``-th token uses the key
``mix(seed, t)`` alone, so it does not depend on the batch, on the row, or on how often
the request was preempted and recomputed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.sample_utils import (
    make_frequency_penalty,
    make_logits_processors,
    make_presence_penalty,
    make_repetition_penalty,
)

from slabserve.engine.step import SamplingParams, TokenLogprob

_MASK64 = (1 << 64) - 1


def mix(seed: int, index: int) -> int:
    """splitmix64 of (seed, index): the per-token key seed, in [0, 2**63)."""
    z = (seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


class RowSpec:
    """What the sampler needs to know about one row: params, seed, token history
    (``prompt``: token ids as a sequence of ints or an int32 array)."""

    __slots__ = ("params", "seed", "index", "prompt", "output")

    def __init__(self, params: SamplingParams, seed: int, prompt: Sequence[int],
                 output: Sequence[int], index: int | None = None) -> None:
        self.params = params
        self.seed = seed
        self.index = len(output) if index is None else index
        self.prompt = prompt
        self.output = output


def _process(row: mx.array, spec: RowSpec, vocab: int) -> mx.array:
    """Logits processors for one ``[1, vocab]`` row (no-op when none is set)."""
    p = spec.params
    bias = vocab_bias(p, vocab)
    for proc in make_logits_processors(logit_bias=bias or None):
        row = proc(None, row)
    if p.repetition_penalty != 1.0:
        # the prompt is a tuple or the executor's cached int32 array (MLX takes no list
        # of numpy scalars): one int32 history either way
        hist = np.concatenate([np.asarray(spec.prompt, dtype=np.int32),
                               np.asarray(spec.output, dtype=np.int32)])
        row = make_repetition_penalty(p.repetition_penalty, len(hist))(mx.array(hist), row)
    if spec.output and p.presence_penalty != 0.0:
        out = list(spec.output)
        row = make_presence_penalty(p.presence_penalty, len(out))(mx.array(out), row)
    if spec.output and p.frequency_penalty != 0.0:
        out = list(spec.output)
        row = make_frequency_penalty(p.frequency_penalty, len(out))(mx.array(out), row)
    return row


def _needs_processing(p: SamplingParams) -> bool:
    return bool(p.logit_bias) or p.repetition_penalty != 1.0 or (
        p.presence_penalty != 0.0 or p.frequency_penalty != 0.0)


def vocab_bias(p: SamplingParams, vocab: int) -> dict[int, float]:
    """A row's logit_bias as applied: entries inside the vocabulary, the last of a
    duplicated token winning."""
    return {t: b for t, b in p.logit_bias if 0 <= t < vocab}


def key_words(seed: int, index: int) -> tuple[int, int]:
    """The draw's key for a request's ``index``-th token: ``mix(seed, index)`` as the two
    uint32 words of an MLX random key."""
    k = mix(seed, index)
    return k >> 32, k & 0xFFFFFFFF


def top_p_bound(p: SamplingParams) -> float:
    """A row's top_p as its filter compares it (2: keep all; a top_p that is 0 in float32
    would keep every token, so it is floored to keep the best)."""
    return max(p.top_p, 1e-30) if p.top_p < 1 else 2.0


def min_p_floor(p: SamplingParams) -> float:
    """A row's min_p as a log-probability offset from its best token (-inf: none)."""
    return math.log(p.min_p) if p.min_p > 0 else -math.inf


def _column(values: list[float]) -> mx.array:
    return mx.array(values, dtype=mx.float32)[:, None]


CANDIDATES = 1024  # top_p/top_k look at this many best tokens first (no full-vocab sort)


def _filter(lp: mx.array, params: list[SamplingParams]) -> mx.array:
    """mlx-lm's top_p, min_p and top_k (same formulas, same order) with a parameter per
    row.  All three keep a top set by value, so per-row thresholds computed on the
    unfiltered row give the same result as applying them one after another.

    On the CPU, top_p/top_k thresholds come from the best ``CANDIDATES`` tokens
    (``mx.topk``: a full-vocab sort of 8 x 152k rows took 940 ms against 29 ms); a top_p
    row whose candidates all fall inside its nucleus needs more, and then the batch's
    top_p comes from a full sort (exact either way).  On a GPU the full sort is used
    directly: it measured faster there than top-k plus the fallback check's sync
    (docs/benchmarks/step-overhead.md).
    """
    vocab = lp.shape[-1]
    neg = mx.array(-mx.inf, dtype=lp.dtype)
    use_p = any(0 < p.top_p < 1 for p in params)
    ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    if not use_p and not any(ks):
        return _min_p(lp, params, neg)
    on_cpu = mx.default_device().type == mx.cpu
    m = min(vocab, max([CANDIDATES if on_cpu else vocab, *ks]))
    best = mx.topk(lp, m, axis=-1) if m < vocab else lp
    top = mx.sort(best, axis=-1)[:, ::-1]  # best first
    drop = mx.zeros(lp.shape, dtype=mx.bool_)
    if any(ks):  # apply_top_k (ties at the k-th value are kept)
        kth = mx.take_along_axis(top, mx.array([max(k, 1) - 1 for k in ks])[:, None], -1)
        drop = (lp < kth) & mx.array([k > 0 for k in ks])[:, None]
    if use_p:  # apply_top_p
        top_p = _column([top_p_bound(p) for p in params])
        probs = mx.exp(top)
        above = mx.cumsum(probs, axis=-1) - probs  # mass strictly above each token
        kept = (above < top_p).sum(-1, keepdims=True)
        if m < vocab and (kept[:, 0] == m).any().item():
            drop = drop | (lp < _top_p_sorted(lp, top_p))
        else:
            drop = drop | (lp < mx.take_along_axis(top, kept - 1, axis=-1))
    return _min_p(mx.where(drop, neg, lp), params, neg)


def _top_p_sorted(lp: mx.array, top_p: mx.array) -> mx.array:
    """Per-row top_p threshold from a full sort (mlx-lm's ``apply_top_p``)."""
    srt = mx.sort(lp, axis=-1)
    probs = mx.exp(srt)
    above = mx.cumsum(probs, axis=-1, reverse=True, inclusive=False)
    drop = (above >= top_p * (above[:, :1] + probs[:, :1])).sum(-1, keepdims=True)
    return mx.take_along_axis(srt, drop, axis=-1)


def _min_p(lp: mx.array, params: list[SamplingParams], neg: mx.array) -> mx.array:
    if any(p.min_p > 0 for p in params):  # apply_min_p
        floor = _column([min_p_floor(p) for p in params])
        lp = mx.where(lp < lp.max(axis=-1, keepdims=True) + floor, neg, lp)
    return lp


gumbel_rows = mx.vmap(lambda key, like: mx.random.gumbel(like.shape, key=key), in_axes=(0, 0))


def _draw(lp: mx.array, specs: list[RowSpec]) -> mx.array:
    """Categorical draws, one per row, at each row's temperature, with Gumbel noise from
    the row's own key ``mix(seed, token index)``."""
    params = [s.params for s in specs]
    lp = _filter(lp, params)
    keys = mx.array(np.array([key_words(s.seed, s.index) for s in specs], dtype=np.uint32))
    noise = gumbel_rows(keys, lp)
    return mx.argmax(lp * _column([1.0 / p.temperature for p in params]) + noise, axis=-1)


class Drawn:
    """One batch's sampled tokens as lazy arrays: ``tokens`` (``[B]`` int32, row order of
    the specs) can feed the next step on the device before ``host`` waits for them; the
    logprobs asked for ride along (``chosen``/``top_ids``/``top_lp`` over the ``wanted``
    rows)."""

    def __init__(self, tokens: mx.array, specs: Sequence[RowSpec], wanted: list[int],
                 chosen: mx.array | None = None, top_ids: mx.array | None = None,
                 top_lp: mx.array | None = None) -> None:
        self.tokens = tokens
        self.specs = specs
        self.wanted = wanted
        self.chosen, self.top_ids, self.top_lp = chosen, top_ids, top_lp

    def arrays(self) -> list[mx.array]:
        return [a for a in (self.tokens, self.chosen, self.top_ids, self.top_lp)
                if a is not None]

    def host(self) -> list[tuple[int, TokenLogprob | None]]:
        """(token id, logprob or None) per row; waits for the device."""
        mx.eval(self.arrays())
        return _assemble(self.tokens.tolist(), self.specs, self.wanted, self.chosen,
                         self.top_ids, self.top_lp)


def sample(logits: mx.array, specs: Sequence[RowSpec],
           allowed: mx.array | None = None) -> list[tuple[int, TokenLogprob | None]]:
    """Sample one token per row; returns (token id, logprob or None) per row (``draw``,
    then waits for it)."""
    return draw(logits, specs, allowed).host()


# One row samples faster eagerly: on an H200 the compiled sampler took 1.02-1.29x the eager
# one's time at B = 1 and 0.30-0.99x at B = 8 and 32 (docs/benchmarks/sampler.md).
COMPILED_MIN_ROWS = 2


def draw(logits: mx.array, specs: Sequence[RowSpec],
         allowed: mx.array | None = None, compiled=None,
         min_rows: int = COMPILED_MIN_ROWS) -> Drawn:
    """One token per row, as lazy arrays (nothing evaluated, except a top_p batch on the
    CPU whose candidates may not cover its nucleus: ``_filter`` checks that on the host).
    ``logits`` is ``[len(specs), vocab]``; ``allowed`` (optional, bool, same shape) masks
    the tokens a row may take (all True on unconstrained rows).  The mask does not touch
    the random draw: a seeded request samples the same tokens under the same mask alone or
    batched.  ``compiled``: an ``engine.sampling_graph.CompiledSampler`` that runs
    processors, mask and the arithmetic after them as one compiled graph (the same tokens)
    for a batch of ``min_rows`` or more with random rows or processors (an all-greedy
    batch without them is an argmax: nothing to fuse)."""
    logits = logits.astype(mx.float32)
    processed = any(_needs_processing(s.params) for s in specs)
    wanted = [i for i, s in enumerate(specs) if s.params.logprobs is not None]
    # argmax, Gumbel-max, min_p and top_k are shift-invariant: normalise only for
    # top_p and reported logprobs
    normalise = bool(wanted) or any(0 < s.params.top_p < 1 and not s.params.greedy
                                    for s in specs)
    if (compiled is not None and len(specs) >= min_rows
            and (processed or not all(s.params.greedy for s in specs))):
        tokens, logprobs = compiled(logits, specs, normalise, allowed)
        return _with_logprobs(tokens, logprobs, specs, wanted)
    if processed:
        vocab = logits.shape[-1]
        logits = mx.concatenate([
            _process(logits[i : i + 1], s, vocab) if _needs_processing(s.params)
            else logits[i : i + 1] for i, s in enumerate(specs)])
    if allowed is not None:
        logits = mx.where(allowed, logits, mx.array(-mx.inf, dtype=logits.dtype))
    if normalise:
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    else:
        logprobs = logits
    rand = [i for i, s in enumerate(specs) if not s.params.greedy]
    if len(rand) == len(specs):
        tokens = _draw(logprobs, list(specs))
    else:
        tokens = mx.argmax(logprobs, axis=-1)
        if rand:
            idx = mx.array(rand)
            tokens[idx] = _draw(logprobs[idx], [specs[i] for i in rand])
    tokens = tokens.astype(mx.int32)  # the next step's input dtype
    return _with_logprobs(tokens, logprobs, specs, wanted)


def _with_logprobs(tokens: mx.array, logprobs: mx.array | None, specs: Sequence[RowSpec],
                   wanted: list[int]) -> Drawn:
    """``tokens`` with the reported logprobs of the ``wanted`` rows (lazy; ``logprobs`` is
    the normalised distribution whenever a row is wanted)."""
    if not wanted:
        return Drawn(tokens, specs, wanted)
    rows = mx.array(wanted)
    lp = logprobs[rows]
    chosen = mx.take_along_axis(lp, tokens[rows][:, None], axis=-1)[:, 0]
    k = max(specs[i].params.logprobs for i in wanted)
    if k == 0:
        return Drawn(tokens, specs, wanted, chosen)
    top_ids = mx.argpartition(-lp, kth=k - 1, axis=-1)[:, :k]
    return Drawn(tokens, specs, wanted, chosen, top_ids, mx.take_along_axis(lp, top_ids, -1))


def _assemble(tokens, specs, wanted, chosen, top_ids, top_lp):
    out: list[tuple[int, TokenLogprob | None]] = [(t, None) for t in tokens]
    if not wanted:
        return out
    chosen_l = chosen.tolist()
    ids_l = top_ids.tolist() if top_ids is not None else None
    lp_l = top_lp.tolist() if top_lp is not None else None
    for j, i in enumerate(wanted):
        k = specs[i].params.logprobs
        top: tuple[tuple[int, float], ...] = ()
        if k and ids_l is not None:
            pairs = sorted(zip(ids_l[j], lp_l[j], strict=True), key=lambda x: -x[1])
            top = tuple(pairs[:k])
        out[i] = (tokens[i], TokenLogprob(tokens[i], chosen_l[j], top))
    return out
