"""mlx-lm's per-layer cache protocol over the slab pool, so model files stay unaware
of paging.

The model calls, per attention layer: ``rope(x, offset=cache.offset)``, then
``cache.update_and_fetch(k, v)``, then ``scaled_dot_product_attention(q, k, v,
cache=cache, ...)``.  ``update_and_fetch`` writes the new K/V into the pool and hands
them back unchanged; the attention call is routed (engine/patch.py) to
``PagedLayerCache.attend``, which reads the pages.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from slabserve.attention import AttentionRuntime, DecodeBatch
from slabserve.kvcache.pool import SlabPool, WritePlan


@dataclass
class ForwardContext:
    """What every layer of one forward pass shares.

    ``offset`` is an int (one sequence, prefill) or an ``[B]`` int32 array of each
    sequence's first new position (batched decode, or prefill rows: per-sequence RoPE
    offsets).  ``decode`` is set for a decode forward; ``prefix`` for a prefill chunk that
    has cached tokens before it (None when the chunk starts at position 0).
    ``row_prefixes``: a prefill forward of several equally long chunks, one per batch
    row, each with its own prefix (or None); ``writes`` then lists row 0's tokens, then
    row 1's, ...  ``runtime``: the runner's attention runtime (selector, prefill bucket,
    host math) that every layer's attention goes through.  ``staged``: a decode forward
    whose layers run as compiled stages (engine/staged.py).  ``graph_paths``: the decode
    path object of each layer while a whole step is traced into one compiled graph
    (engine/step_graph.py): attention runs them directly (the selector decided and counts
    outside the trace) and the staged layers run their stages' Python.
    """

    pool: SlabPool
    writes: WritePlan
    offset: int | mx.array
    runtime: AttentionRuntime
    decode: DecodeBatch | None = None
    prefix: DecodeBatch | None = None
    row_prefixes: tuple[DecodeBatch | None, ...] | None = None
    staged: bool = False  # decode layers run as compiled stages (engine/staged.py)
    graph_paths: list | None = None  # per layer, inside a step graph's trace


class PagedLayerCache:
    """One layer's view of the pool for the current forward pass."""

    def __init__(self, layer: int) -> None:
        self.layer = layer
        self.ctx: ForwardContext | None = None
        # start evaluating the graph built so far once this layer's attention is built
        # (``ModelRunner.dispatch_every``), so the device works while the host builds on
        self.dispatch = False

    # --- mlx-lm cache protocol -------------------------------------------------
    @property
    def offset(self):
        return self.ctx.offset

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        b, h, n, d = keys.shape
        if n == 1:  # decode: [B, H, 1, D] is already token-major: the pool's flat rows
            k, v = keys.reshape(b * h, d), values.reshape(b * h, d)
        else:
            k = keys.transpose(0, 2, 1, 3).reshape(b * n, h, d)
            v = values.transpose(0, 2, 1, 3).reshape(b * n, h, d)
        self.ctx.pool.write(self.layer, self.ctx.writes, k, v)
        return keys, values

    def write_rows(self, keys: mx.array, values: mx.array) -> None:
        """Write the new tokens' K and V given as the pool's flat token-major rows
        ``[T * kv_heads, D]`` (what compiled decode stages hand over: no reshape here)."""
        ctx = self.ctx
        ctx.pool.write(self.layer, ctx.writes, keys, values)

    def make_mask(self, *args, **kwargs):
        return None  # masks are built from lengths inside the attention paths

    def is_trimmable(self) -> bool:
        return False

    @property
    def state(self):
        raise NotImplementedError("paged caches are not serialised")

    # --- routed attention ----------------------------------------------------------
    def attend(self, queries: mx.array, keys: mx.array, values: mx.array, scale: float):
        out = self._attend(queries, keys, values, scale)
        if self.dispatch:
            mx.async_eval(out)
        return out

    def _attend(self, queries: mx.array, keys: mx.array, values: mx.array, scale: float):
        ctx = self.ctx
        if ctx.graph_paths is not None:
            return ctx.graph_paths[self.layer](queries, ctx.pool, self.layer, ctx.decode, scale)
        if ctx.decode is not None:
            return ctx.runtime.decode(queries, ctx.pool, self.layer, ctx.decode, scale)
        if ctx.row_prefixes is not None:  # one chunk per row: attention row by row
            outs = [ctx.runtime.prefill(queries[i : i + 1], keys[i : i + 1],
                                        values[i : i + 1], ctx.pool, self.layer, pre, scale)
                    for i, pre in enumerate(ctx.row_prefixes)]
            return mx.concatenate(outs, axis=0)
        return ctx.runtime.prefill(queries, keys, values, ctx.pool, self.layer, ctx.prefix,
                                   scale)
