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

A padded batch's extra rows (step graphs pad the batch to a bucket) write token 0's slot
with token 0's own values, so whatever they computed never lands.

Invariants: every new row lands in its slab's row and nowhere else changes; ``key`` (the
slabs touched, in order, and whether rows are selected), the number of rows and
``head_dim`` fix the graph; ``rebind`` gives the same plan over another array of
``packed``'s shape.
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

    def __init__(self, geom: PoolGeometry, slots: list[tuple[int, int]], pad: int = 0) -> None:
        """``pad``: the last ``pad`` slots are a padded batch's extra rows, each a copy of
        slot 0, whose writes put token 0's own values (whatever the extra rows computed)."""
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
        real = (len(slots) - pad) * h
        source = list(range(real)) + [i % h for i in range(real, len(rows))]
        self.layout = tuple(sorted(set(slab_of)))
        self.selects = len(self.layout) > 1 or pad > 0
        packed = rows
        if self.selects:
            packed = []
            for s in self.layout:
                first = slab_of.index(s)
                select = [source[i] if t == s else first for i, t in enumerate(slab_of)]
                packed += [rows[i] for i in select] + select
        self.rebind_from(host_array(np.array(packed, dtype=np.int32)))

    @property
    def key(self) -> tuple:
        """What fixes this plan's graph besides the row count: the slabs touched and
        whether rows are selected (several slabs, or padded rows)."""
        return self.layout, self.selects

    def rebind_from(self, packed: mx.array) -> None:
        """Take ``packed`` as the plan's indices: per slab touched its rows ``[n]``, then
        (with several slabs) which rows of the update go there ``[n]``.  Each slab's rows
        are broadcast to ``[n, width]`` once here, for every layer's write."""
        self.packed = packed
        k = len(self.layout)
        if not self.selects:
            n, cuts = packed.size, [packed]
        else:
            n = packed.size // (2 * k)
            cuts = [packed[i * n:(i + 1) * n] for i in range(2 * k)]
        self.groups = []
        for i, s in enumerate(self.layout):
            narrow = cuts[2 * i if self.selects else 0].reshape(n, 1)
            wide = mx.broadcast_to(narrow, (n, self.width))
            self.groups.append((s, narrow, wide, cuts[2 * i + 1] if self.selects else None))

    def rebind(self, packed: mx.array) -> SpreadWritePlan:
        """The same plan over ``packed`` (an array of this plan's ``packed`` shape)."""
        plan = object.__new__(SpreadWritePlan)
        plan.num_tokens, plan.layout, plan.width = self.num_tokens, self.layout, self.width
        plan.selects = self.selects
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
