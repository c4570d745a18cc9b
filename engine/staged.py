"""Compiled decode layers: each decoder layer of a one-token-per-sequence (decode) forward
runs as two ``mx.compile``d stages around the paged cache, so a step replays compiled
graphs instead of re-running every layer's Python.

A GPU decode step is bound by the host building its graph: a Llama-3.2-1B-shaped step
builds ~500 MLX ops in Python (~4 ms) for ~1 ms of device work
(docs/benchmarks/decode-step.md).  The paged cache's K/V write and the decode attention
read host-planned block tables and run the selector per layer, so they stay outside the
compiled graphs; everything between two attentions is compiled:

- ``pre`` (x, positions) -> (queries, keys, values): the layer up to its cache write
  (norms, projections, RoPE at each row's position), keys and values as the pool's flat
  token-major rows ``[B * kv_heads, D]`` (the reshape is part of the compiled graph);
- ``post`` (x, positions, attention output) -> the layer's output: the rest of the layer
  (output projection, residuals, MLP).

Llama-family layers (llama, mistral, qwen2, qwen3) run hand-written stages with fused
projections on two-dimensional activations (engine/fused.py: about half the graph nodes).
Other layers' stages are traced from the layer's own ``__call__`` (any mlx-lm architecture whose
attention goes through the cache protocol and mlx-lm's SDPA name, the same contract as
engine/patch.py), with a ``StageCache`` that records what the layer hands the cache and
returns the attention output it is given; ``mx.compile`` drops the unused half of each
trace.  Every layer has its own compiled pair (its weights are constants of its graphs);
``mx.compile`` keeps one trace per input shape, i.e. per batch size.

Invariants: a staged layer computes exactly what the layer computes (the same ops, fused
elementwise where ``mx.compile`` fuses them); prefill forwards and any forward that is not
decode run the layer itself; the K/V write and attention (selector, counters) run once per
layer and step as in the eager forward.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from slabserve.engine.fused import FusedDecodeStages
from slabserve.engine.paged_cache import PagedLayerCache
from slabserve.engine.rows_matmul import RowsMatmul


class StageCache(PagedLayerCache):
    """The cache a layer sees while one of its stages is traced: ``offset`` is the traced
    positions; ``update_and_fetch`` records the new K/V; ``attend`` records the queries and
    scale and returns ``attention`` (zeros while tracing ``pre``)."""

    def __init__(self, layer: int, offset: mx.array, attention: mx.array | None = None):
        super().__init__(layer)
        self._offset = offset
        self.attention = attention
        self.keys = self.values = self.queries = None
        self.scale: float | None = None

    @property
    def offset(self):
        return self._offset

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        self.keys, self.values = keys, values
        return keys, values

    def attend(self, queries: mx.array, keys: mx.array, values: mx.array, scale: float):
        self.queries, self.scale = queries, scale
        return mx.zeros_like(queries) if self.attention is None else self.attention


class StagedLayer(nn.Module):
    """A decoder layer whose decode forwards run as compiled stages (module docstring).
    ``inner`` is the original layer (its parameters stay in the model's tree under it)."""

    def __init__(self, inner: nn.Module, index: int, rows: RowsMatmul | None = None) -> None:
        super().__init__()
        self.inner = inner
        self._index = index
        self.fused = FusedDecodeStages.match(inner, rows)
        if self.fused is not None:  # llama family: hand-written stages, fewer nodes
            self._scale: float | None = self.fused.scale
            self._pre = mx.compile(self.fused.pre)
            self._post = mx.compile(self._fused_post)
        else:
            self._scale = None
            self._pre = mx.compile(self._trace_pre)
            self._post = mx.compile(self._trace_post)

    def __getattr__(self, key: str):
        # the model's loop reads layer attributes (``use_sliding``, ...): the inner layer's
        try:
            return super().__getattr__(key)
        except AttributeError:
            if "inner" not in self:
                raise
            return getattr(self["inner"], key)

    def _trace_pre(self, x: mx.array, offset: mx.array):
        cache = StageCache(self._index, offset)
        self.inner(x, None, cache=cache)
        self._scale = cache.scale
        d = cache.keys.shape[-1]
        return cache.queries, cache.keys.reshape(-1, d), cache.values.reshape(-1, d)

    def _fused_post(self, x: mx.array, offset: mx.array, attention: mx.array):
        return self.fused.post(x, attention)  # [B, hidden] (engine/fused.py)

    def _trace_post(self, x: mx.array, offset: mx.array, attention: mx.array):
        return self.inner(x, None, cache=StageCache(self._index, offset, attention))

    def __call__(self, x: mx.array, mask=None, cache=None, **kwargs):
        ctx = getattr(cache, "ctx", None)
        if not isinstance(cache, PagedLayerCache) or ctx is None or not ctx.staged:
            return self.inner(x, mask, cache=cache, **kwargs)
        if self.fused is None:
            if x.ndim == 2:  # after a fused layer (two-dimensional)
                x = x.reshape(x.shape[0], 1, -1)
        elif x.ndim != 2:  # the first layer: once here, not in each stage
            x = x.reshape(x.shape[0], -1)
        if ctx.graph_paths is not None:  # traced into a whole-step graph: the stages' Python
            q, k, v = self.fused.pre(x, ctx.offset)
            cache.write_rows(k, v)
            return self.fused.post(x, cache.attend(q, k, v, self._scale))
        q, k, v = self._pre(x, ctx.offset)
        cache.write_rows(k, v)
        out = cache.attend(q, k, v, self._scale)
        return self._post(x, ctx.offset, out)


def stage_layers(model: nn.Module, rows: RowsMatmul | None = None) -> int:
    """Replace each decoder layer the model runs (``model.layers``) by a ``StagedLayer``
    in the list that holds it (the inner model's ``layers``: some architectures' ``layers``
    is a fresh slice of it per access), fused projections of few rows through ``rows``;
    returns how many are staged.  Idempotent (a staged layer keeps its ``rows``)."""
    inner = getattr(model, "model", None)
    holder = getattr(inner, "layers", None)
    if not isinstance(holder, list):
        holder = model.layers
    index = {id(layer): i for i, layer in enumerate(holder)}
    staged = 0
    for layer in model.layers:
        i = index.get(id(layer))
        if i is None:
            continue
        if not isinstance(layer, StagedLayer):
            holder[i] = StagedLayer(layer, i, rows)
        staged += 1
    return staged
