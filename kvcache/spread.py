"""A write plan whose shape depends only on which slabs a step writes: what compiled decode
step graphs (engine/step_graph.py) key on.

``WritePlan`` (kvcache/pool.py) groups the new tokens by slab, so its graph depends on how
many tokens go to each slab: in a continuous-batching run of 8 sequences over 2 slabs
that split changed every ~25 steps, and each new split is a new graph to trace.  Here each
slab touched gets one write of all ``T * heads`` rows: a row whose token goes to another
slab is sent to one of this slab's own new rows with that row's own value (a duplicate
index writing an equal value, so the order of duplicates does not matter).  The write is
``put_along_axis`` with an index broadcast to ``[rows, head_dim]`` once per step: one graph
node per layer and side (a scatter by row ids costs MLX a reshape node too).  One host
array carries every index, so a step costs one host-to-MLX transfer.

Invariants: every new row lands in its slab's row and nowhere else changes; ``layout`` (the
slabs touched, in order), the number of rows and ``head_dim`` fix the graph; ``rebind``
gives the same plan over another array of ``packed``'s shape.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from slabserve.kvcache.arrays import host_array
from slabserve.kvcache.pool import PoolGeometry


class SpreadWritePlan:
    """Where each of ``T`` new tokens goes (``slots``: (global block id, row in block) per
    token), as one write of all ``T * heads`` rows per slab touched (module docstring).
    ``write_into(side, new)`` is what ``SlabPool.write`` calls, as for ``WritePlan``."""

    def __init__(self, geom: PoolGeometry, slots: list[tuple[int, int]]) -> None:
        # plain Python for the plan: a decode step has at most a few hundred rows, where
        # numpy's per-call cost (~0.3 ms for this plan on a slow host) exceeds the work
        h, bs, sb = geom.kv_heads, geom.block_size, geom.slab_blocks
        self.num_tokens, self.width = len(slots), geom.head_dim
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
        """Take ``packed`` as the plan's indices: per slab touched its rows ``[n]``, then
        (with several slabs) which rows of the update go there ``[n]``.  Each slab's rows
        are broadcast to ``[n, width]`` once here, for every layer's write."""
        self.packed = packed
        k = len(self.layout)
        n = packed.size if k == 1 else packed.size // (2 * k)
        cuts = [packed] if k == 1 else [packed[i * n:(i + 1) * n] for i in range(2 * k)]
        self.groups = []
        for i, s in enumerate(self.layout):
            narrow = cuts[0 if k == 1 else 2 * i].reshape(n, 1)
            wide = mx.broadcast_to(narrow, (n, self.width))
            self.groups.append((s, narrow, wide, None if k == 1 else cuts[2 * i + 1]))

    def rebind(self, packed: mx.array) -> SpreadWritePlan:
        """The same plan over ``packed`` (an array of this plan's ``packed`` shape)."""
        plan = object.__new__(SpreadWritePlan)
        plan.num_tokens, plan.layout, plan.width = self.num_tokens, self.layout, self.width
        plan.rebind_from(packed)
        return plan

    def write_into(self, side: list[mx.array], new: mx.array):
        """Write ``new`` (``[T * heads, width]``, or ``[T * heads, 1]``: a quantized pool's
        scales) into the slabs of ``side``; yields each slab index written."""
        for s, narrow, wide, select in self.groups:
            update = new if select is None else new[select]
            index = wide if update.shape[1] == self.width else narrow
            side[s] = mx.put_along_axis(side[s], index, update, axis=0)
            yield s
