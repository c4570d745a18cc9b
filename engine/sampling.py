"""Per-request sampling inside one batch: every row of a ``[B, vocab]`` logits array is
sampled with its own request's parameters.

Per row, in mlx-lm's order: logits processors (logit_bias, then repetition, presence and
frequency penalties: mlx-lm's own ``make_*`` factories), log-softmax, then for
temperature > 0 mlx-lm's filters (``apply_top_p``, ``apply_min_p``, ``apply_top_k``) and a
categorical draw at ``1 / temperature``; temperature 0 is argmax.

Semantics: the repetition penalty looks at prompt + output, presence and frequency
penalties at the output only (as OpenAI defines them).  Reported logprobs are those of
the processed distribution (after penalties and bias, before temperature and filters).

Reproducibility: the draw for a request's ``t``-th token uses the key
``mix(seed, t)`` alone, so it does not depend on the batch, on the row, or on how often
the request was preempted and recomputed.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
from mlx_lm.sample_utils import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    make_frequency_penalty,
    make_logits_processors,
    make_presence_penalty,
    make_repetition_penalty,
)

from scheduler.api import SamplingParams, TokenLogprob

_MASK64 = (1 << 64) - 1


def mix(seed: int, index: int) -> int:
    """splitmix64 of (seed, index): the per-token key seed, in [0, 2**63)."""
    z = (seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


class RowSpec:
    """What the sampler needs to know about one row: params, seed, token history."""

    __slots__ = ("params", "seed", "index", "prompt", "output")

    def __init__(self, params: SamplingParams, seed: int, prompt: Sequence[int],
                 output: Sequence[int]) -> None:
        self.params = params
        self.seed = seed
        self.index = len(output)
        self.prompt = prompt
        self.output = output


def _process(row: mx.array, spec: RowSpec, vocab: int) -> mx.array:
    """Logits processors for one ``[1, vocab]`` row (no-op when none is set)."""
    p = spec.params
    bias = {t: b for t, b in p.logit_bias if 0 <= t < vocab}
    for proc in make_logits_processors(logit_bias=bias or None):
        row = proc(None, row)
    if p.repetition_penalty != 1.0:
        hist = list(spec.prompt) + list(spec.output)
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


def _draw(logprobs: mx.array, spec: RowSpec, vocab: int) -> mx.array:
    """One categorical draw for a ``[1, vocab]`` row of logprobs, with filters."""
    p = spec.params
    if 0 < p.top_p < 1.0:
        logprobs = apply_top_p(logprobs, p.top_p)
    if p.min_p > 0.0:
        logprobs = apply_min_p(logprobs, p.min_p)
    if 0 < p.top_k < vocab:
        logprobs = apply_top_k(logprobs, p.top_k)
    key = mx.random.key(mix(spec.seed, spec.index))
    return mx.random.categorical(logprobs * (1.0 / p.temperature), key=key)


def sample(logits: mx.array, specs: Sequence[RowSpec]) -> list[tuple[int, TokenLogprob | None]]:
    """Sample one token per row; returns (token id, logprob or None) per row.
    ``logits`` is ``[len(specs), vocab]``."""
    vocab = logits.shape[-1]
    logits = logits.astype(mx.float32)
    if any(_needs_processing(s.params) for s in specs):
        logits = mx.concatenate([
            _process(logits[i : i + 1], s, vocab) if _needs_processing(s.params)
            else logits[i : i + 1] for i, s in enumerate(specs)])
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    tokens = mx.argmax(logprobs, axis=-1)
    drawn = [(i, _draw(logprobs[i : i + 1], s, vocab)) for i, s in enumerate(specs)
             if not s.params.greedy]
    if drawn:
        idx = mx.array([i for i, _ in drawn])
        tokens[idx] = mx.concatenate([t for _, t in drawn])
    wanted = [i for i, s in enumerate(specs) if s.params.logprobs is not None]
    chosen = top_ids = None
    if wanted:
        lp = logprobs[mx.array(wanted)]
        chosen = mx.take_along_axis(lp, tokens[mx.array(wanted)][:, None], axis=-1)[:, 0]
        k = max(specs[i].params.logprobs for i in wanted)
        if k > 0:
            top_ids = mx.argpartition(-lp, kth=k - 1, axis=-1)[:, :k]
            top_lp = mx.take_along_axis(lp, top_ids, axis=-1)
    mx.eval(tokens, *([chosen] if wanted else []),
            *([top_ids, top_lp] if top_ids is not None else []))
    return _assemble(tokens.tolist(), specs, wanted, chosen, top_ids,
                     top_lp if top_ids is not None else None)


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
