"""A write plan whose shape depends only on which slabs a step writes: what compiled decode
step graphs (engine/step_graph.py) key on.

``WritePlan`` (kvcache/pool.py) groups the new tokens by slab, so its graph depends on how
many tokens go to each slab: in a continuous-batching run of 8 sequences over 2 slabs
that split changed every ~25 steps, and each new split is a new graph to trace.  Here each
slab touched gets a scatter of all ``T * heads`` rows: a row whose token goes to another
slab is sent to one of this slab's own new rows with that row's own value (a duplicate
index writing an equal value, so the order of duplicates does not matter).  One host array
carries every index, so a step costs one host-to-MLX transfer.

Invariants: every new row lands in its slab's row and nowhere else changes; ``layout`` (the
slabs touched, in order) and the number of rows fix the graph; ``rebind`` gives the same
plan over another array of ``packed``'s shape.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from slabserve.kvcache.arrays import host_array
from slabserve.kvcache.pool import PoolGeometry


class SpreadWritePlan:
    """Where each of ``T`` new tokens goes (``slots``: (global block id, row in block) per
    token), as one scatter of all ``T * heads`` rows per slab touched (module docstring).
    ``updates(new)`` is ``SlabPool.write``'s view of a plan, as for ``WritePlan``."""

    def __init__(self, geom: PoolGeometry, slots: list[tuple[int, int]]) -> None:
        # plain Python: a decode step has at most a few hundred rows, where numpy's
        # per-call cost (~0.3 ms for this plan on a slow host) exceeds the work
        h, bs, sb = geom.kv_heads, geom.block_size, geom.slab_blocks
        self.num_tokens = len(slots)
        rows: list[int] = []
        slab_of: list[int] = []
        for block, row in slots:
            s, local = divmod(block, sb)
            base = local * h * bs + row
            rows += range(base, base + h * bs, bs)
            slab_of += [s] * h
        self.layout = tuple(sorted(set(slab_of)))
        packed = rows
        if len(self.layout) > 1:
            packed = []
            for s in self.layout:
                first = slab_of.index(s)
                select = [i if t == s else first for i, t in enumerate(slab_of)]
                packed += [rows[i] for i in select] + select
        self.rebind_from(host_array(np.array(packed, dtype=np.int32)))

    def rebind_from(self, packed: mx.array) -> None:
        """Take ``packed`` as the plan's indices: per slab touched its rows, then (with
        several slabs) the rows of ``new`` that go there."""
        self.packed = packed
        if len(self.layout) == 1:
            self.groups = [(self.layout[0], packed, None)]
            return
        n = packed.size // (2 * len(self.layout))
        cut = [packed[i * n:(i + 1) * n] for i in range(2 * len(self.layout))]
        self.groups = [(s, cut[2 * i], cut[2 * i + 1]) for i, s in enumerate(self.layout)]

    def rebind(self, packed: mx.array) -> SpreadWritePlan:
        """The same plan over ``packed`` (an array of this plan's ``packed`` shape)."""
        plan = object.__new__(SpreadWritePlan)
        plan.num_tokens, plan.layout = self.num_tokens, self.layout
        plan.rebind_from(packed)
        return plan

    def updates(self, new: mx.array):
        """(slab, rows, update) per slab touched, ``new`` being ``[T * heads, D]``."""
        for s, rows, select in self.groups:
            yield s, rows, new if select is None else new[select]
