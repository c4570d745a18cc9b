"""The sampler as compiled graphs: ``engine.sampling.draw``'s logits processors
(logit_bias, repetition, presence and frequency penalties), grammar mask, normalisation,
filters (top_k, top_p, min_p), Gumbel-max draw and greedy argmax for a whole batch in one
``mx.compile``d function, with each row's parameters and token history as data.

The eager sampler runs mlx-lm's processors row by row and builds its per-row parameters
as several small host arrays; here a step hands the device a few host arrays: ``[B, 6]``
float32 parameters, ``[B, 2]`` uint32 keys, the ``[B, vocab]`` grammar mask of a batch
with constrained rows, and per processor kind used one flattened list of entries
(``processor_entries``: ``[N]`` int32 element indices ``row * vocab + token`` into the
flattened logits and ``[N]`` float32 values, a bias or the row's penalty).  The graph is
traced once per *feature set* (which of greedy rows, random rows, top_k, top_p, min_p,
normalisation, mask and each processor kind the batch uses), batch bucket (rows padded to
``batch_bucket``, as step graphs pad theirs) and entry bucket (each kind's entries padded
to a power of two, ``entry_bucket``): a history that grows by a token a step retraces
only when a kind's entries cross a power of two.

Invariant: the tokens (and the normalised logprobs handed back for reported logprobs) are
bitwise those of the eager sampler on the same logits: the same operations in the same
order, element by element.  Processors, as mlx-lm's: bias adds ``b`` (a row's in-range
entries, the last of a duplicated token winning); repetition gathers the history's
logits, ``where(x < 0, x * p, x / p)``, and assigns them back (a repeated token assigns
the same value again); presence assigns ``x - p`` at the output's tokens (once per token
however often it occurs); frequency subtracts ``p`` once per occurrence (a scatter-add:
the same value subtracted n times, whatever the order).  Assignments are
``put_along_axis`` on the flattened logits.  Padding entries are no-ops: element 0 with a
bias of -0.0 or a frequency penalty of 0.0 (``x + -0.0`` and ``x - 0.0`` are ``x`` for
every float), and for the assigning kinds copies of the last real entry (they assign the
value it assigns).  Filters: rows that do not use a filter the batch uses get a neutral
parameter (top_k 0, top_p 2, min_p floor -inf), which the eager formulas leave
unfiltered.  The thresholds of top_p and top_k come from a full sort of each row (the
eager sampler's GPU form; on the CPU it reads them from the best ``CANDIDATES`` tokens,
the same values whenever those hold the nucleus, and falls back to the full sort
otherwise).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from slabserve.engine.sampling import (
    RowSpec,
    gumbel_rows,
    key_words,
    min_p_floor,
    top_p_bound,
    vocab_bias,
)
from slabserve.engine.step_graph import batch_bucket

# parameter columns
_INV_T, _K_IDX, _K_ON, _TOP_P, _MIN_P, _RAND = range(6)
# processor kinds, in the order they apply
KINDS = ("bias", "repetition", "presence", "frequency")
# [N] int32 element indices (row * vocab + token), [N] float32 values
Entries = tuple[np.ndarray, np.ndarray]
# pad entries' values: x + -0.0 and x - 0.0 are x for every float x; None: copy the last
# entry (an assignment of the value that entry assigns)
_PADS: Mapping[str, float | None] = MappingProxyType(
    {"bias": -0.0, "repetition": None, "presence": None, "frequency": 0.0})


class Features(NamedTuple):
    """What a batch needs of the sampler: the compiled function's key."""

    greedy: bool
    rand: bool
    top_k: bool
    top_p: bool
    min_p: bool
    normalise: bool
    mask: bool
    bias: bool
    repetition: bool
    presence: bool
    frequency: bool


def features(specs: Sequence[RowSpec], vocab: int, normalise: bool, mask: bool = False,
             procs: dict[str, Entries] | None = None) -> Features:
    """The batch's feature set; ``procs`` as ``processor_entries`` gives it."""
    rand = [s.params for s in specs if not s.params.greedy]
    procs = procs or {}
    return Features(
        len(rand) < len(specs), bool(rand),
        any(0 < p.top_k < vocab for p in rand), any(0 < p.top_p < 1 for p in rand),
        any(p.min_p > 0 for p in rand), normalise, mask, *(k in procs for k in KINDS))


def entry_bucket(n: int) -> int:
    """Entries a processor kind's arrays hold for ``n`` real ones: a power of two, >= 16."""
    return max(16, 1 << max(0, n - 1).bit_length())


class _Part(NamedTuple):
    """One row's entries of one kind: its token runs and the value of each entry (one
    value for them all, or one per token)."""

    row: int
    runs: tuple[Sequence[int], ...]
    value: float | list[float]


def _pack(parts: list[_Part], pad: float | None, vocab: int) -> Entries | None:
    """One kind's entries, padded to ``entry_bucket``: pads copy the last entry (``pad``
    None) or are element 0 with value ``pad`` (a no-op one for the kind's arithmetic)."""
    n = sum(len(run) for part in parts for run in part.runs)
    if n == 0:
        return None
    size = entry_bucket(n)
    flat = np.zeros(size, dtype=np.int32)
    val = np.zeros(size, dtype=np.float32)
    at = 0
    for part in parts:
        start = at
        for run in part.runs:
            flat[at : at + len(run)] = run
            at += len(run)
        flat[start:at] += part.row * vocab
        val[start:at] = part.value
    if pad is None:
        flat[n:], val[n:] = flat[n - 1], val[n - 1]
    else:
        val[n:] = pad
    return flat, val


def processor_entries(specs: Sequence[RowSpec], vocab: int) -> dict[str, Entries]:
    """The batch's processors as entries, per kind that has any (see the module
    docstring); a row takes part in a kind where the eager sampler's processor would
    change it: in-range bias tokens, a repetition penalty with a history, presence and
    frequency penalties with an output."""
    if len(specs) * vocab >= 1 << 31:
        raise ValueError("rows x vocab must fit int32 element indices")
    parts: dict[str, list[_Part]] = {k: [] for k in KINDS}
    for i, s in enumerate(specs):
        p = s.params
        bias = vocab_bias(p, vocab)
        if bias:
            parts["bias"].append(_Part(i, (list(bias),), list(bias.values())))
        if p.repetition_penalty != 1.0:
            parts["repetition"].append(_Part(i, (s.prompt, s.output), p.repetition_penalty))
        if p.presence_penalty != 0.0:
            parts["presence"].append(_Part(i, (s.output,), p.presence_penalty))
        if p.frequency_penalty != 0.0:
            parts["frequency"].append(_Part(i, (s.output,), p.frequency_penalty))
    packed = {k: _pack(parts[k], _PADS[k], vocab) for k in KINDS}
    return {k: e for k, e in packed.items() if e is not None}


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


def _process(x: mx.array, feat: Features, extra: Sequence[mx.array]) -> mx.array:
    """Processors then mask on ``x`` ``[rows, vocab]``; ``extra`` holds, in order, the
    mask (``feat.mask``) and each used kind's (element index, value) arrays.  The
    processors work on ``x`` flattened; assignments are ``put_along_axis`` (on the CPU
    a third of an indexed assignment's time at 64k entries)."""
    extra = list(extra)
    allowed = extra.pop(0) if feat.mask else None
    y = x.reshape(-1)
    if feat.bias:
        ix, v = extra.pop(0), extra.pop(0)
        y = y.at[ix].add(v)
    if feat.repetition:
        ix, p = extra.pop(0), extra.pop(0)
        sel = mx.take_along_axis(y, ix, axis=0)
        y = mx.put_along_axis(y, ix, mx.where(sel < 0, sel * p, sel / p), axis=0)
    if feat.presence:
        ix, p = extra.pop(0), extra.pop(0)
        y = mx.put_along_axis(y, ix, mx.take_along_axis(y, ix, axis=0) - p, axis=0)
    if feat.frequency:
        ix, p = extra.pop(0), extra.pop(0)
        y = y.at[ix].subtract(p)
    x = y.reshape(x.shape)
    if allowed is not None:
        x = mx.where(allowed, x, mx.array(-mx.inf, dtype=x.dtype))
    return x


def _filtered(lp: mx.array, par: mx.array, feat: Features) -> mx.array:
    """top_k, top_p and min_p with a parameter per row (neutral ones leave a row as is)."""
    neg = mx.array(-mx.inf, dtype=lp.dtype)
    f = lp
    if feat.top_k or feat.top_p:
        top = mx.sort(lp, axis=-1)[:, ::-1]
        drop = mx.zeros(lp.shape, dtype=mx.bool_)
        if feat.top_k:
            kth = mx.take_along_axis(top, par[:, _K_IDX].astype(mx.int32)[:, None], -1)
            drop = (lp < kth) & (par[:, _K_ON] > 0)[:, None]
        if feat.top_p:
            probs = mx.exp(top)
            above = mx.cumsum(probs, axis=-1) - probs
            kept = (above < par[:, _TOP_P, None]).sum(-1, keepdims=True)
            drop = drop | (lp < mx.take_along_axis(top, kept - 1, axis=-1))
        f = mx.where(drop, neg, lp)
    if feat.min_p:
        f = mx.where(f < f.max(axis=-1, keepdims=True) + par[:, _MIN_P, None], neg, f)
    return f


def _sampler(feat: Features, traced: Callable[[], None]) -> Callable:
    """The compiled function of one feature set; ``traced`` is called on each trace."""

    def run(logits: mx.array, par: mx.array, keys: mx.array, *extra: mx.array):
        traced()
        x = _process(logits, feat, extra)
        lp = x - mx.logsumexp(x, axis=-1, keepdims=True) if feat.normalise else x
        tokens = mx.argmax(lp, axis=-1) if feat.greedy else None
        if feat.rand:
            f = _filtered(lp, par, feat)
            drawn = mx.argmax(f * par[:, _INV_T, None] + gumbel_rows(keys, f), axis=-1)
            tokens = drawn if tokens is None else mx.where(par[:, _RAND] > 0, drawn, tokens)
        tokens = tokens.astype(mx.int32)
        return (tokens, lp) if feat.normalise else (tokens,)

    return mx.compile(run)


class CompiledSampler:
    """Compiled sampling graphs, one per feature set (see the module docstring); owned by
    the executor, used where decode forwards are compiled (``RunnerConfig.compile_decode``).
    ``feature_sets`` counts compiled functions, ``traces`` their traces (one per feature
    set, batch bucket and entry buckets seen), ``calls`` the batches sampled."""

    def __init__(self) -> None:
        self._fns: dict[Features, Callable] = {}
        self.feature_sets = 0
        self.traces = 0
        self.calls = 0

    def _traced(self) -> None:
        self.traces += 1

    def __call__(self, logits: mx.array, specs: Sequence[RowSpec], normalise: bool,
                 allowed: mx.array | None = None) -> tuple[mx.array, mx.array | None]:
        """(tokens ``[B]`` int32, the processed and masked logits normalised when
        ``normalise``, else None) for raw ``logits`` ``[B, vocab]`` float32 and the
        optional grammar mask ``allowed`` (bool, same shape); lazy."""
        self.calls += 1
        b, vocab = logits.shape
        procs = processor_entries(specs, vocab)
        feat = features(specs, vocab, normalise, allowed is not None, procs)
        fn = self._fns.get(feat)
        if fn is None:
            fn = self._fns[feat] = _sampler(feat, self._traced)
            self.feature_sets += 1
        rows = batch_bucket(b)
        par, keys = _params(specs, vocab, rows)
        extra = [] if allowed is None else [_pad_rows(allowed, rows, True)]
        for k in KINDS:
            extra += [mx.array(a) for a in procs.get(k, ())]
        out = fn(_pad_rows(logits, rows, 0.0), mx.array(par), mx.array(keys), *extra)
        tokens = out[0] if rows == b else out[0][:b]
        if not normalise:
            return tokens, None
        return tokens, (out[1] if rows == b else out[1][:b])


def _pad_rows(x: mx.array, rows: int, value: float | bool) -> mx.array:
    """``x`` with rows of ``value`` appended up to ``rows``."""
    b = x.shape[0]
    return x if rows == b else mx.pad(x, ((0, rows - b), (0, 0)), constant_values=value)
