"""Block tables kept on the device at a fixed shape, updated by the cells that changed.

A compiled decode step graph (engine/step_graph.py) takes the batch's block table as an
input whose shape is part of the graph's signature.  Built on the host each step, the
table's width follows the longest context (a new graph whenever it grows) and the whole
table crosses to the device every step.  Here the table is one device array of
``[rows, width]``: ``width`` is the most blocks a sequence can hold (its owner's choice:
the longest sequence served, at most the pool's blocks), and ``rows`` grows to the largest
batch seen.  Each step compares row ``i`` of the new tables
with what row ``i`` holds and writes only the difference (a sequence that grew by a block:
one cell; a row that now holds another sequence: its blocks), in one scatter.  Columns past
a row's blocks keep whatever they held: valid block ids, never read (the kernels read a
sequence's ``ceil(length / block_size)`` blocks).

Invariants: after ``update(tables)``, row ``i`` of ``array`` starts with ``tables[i]``
for every ``i``; ``array``'s shape changes only when a batch has more rows than any before
(or a row more blocks than ``width``: the table then widens to the next power of two).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from slabserve.kvcache.arrays import host_array


class DeviceBlockTable:
    """See the module docstring.  ``width``: the most blocks a row holds (the pool's)."""

    def __init__(self, width: int, rows: int = 1) -> None:
        if width <= 0 or rows <= 0:
            raise ValueError("width and rows must be positive")
        self.width, self.rows = width, rows
        self.array = mx.zeros((rows, width), dtype=mx.int32)
        self._held: list[list[int]] = []  # what each row starts with, as last written
        self.cells_written = 0  # cells scattered so far (what tests check)

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.width

    def update(self, tables: list[list[int]]) -> mx.array:
        """Make rows ``0..len(tables)-1`` start with ``tables``; return ``array``."""
        self._fit(len(tables), max((len(t) for t in tables), default=0))
        rows: list[int] = []
        cols: list[int] = []
        vals: list[int] = []
        held = self._held
        for i, new in enumerate(tables):
            old = held[i] if i < len(held) else None
            keep = _prefix_kept(old, new)
            if keep < len(new):
                rows += [i] * (len(new) - keep)
                cols += range(keep, len(new))
                vals += new[keep:]
            if old is not None and keep == len(old):
                old += new[keep:]  # the row grew (or not): extend what it holds, no copy
            elif old is not None:
                held[i] = list(new)
            else:
                held.append(list(new))
        if vals:  # one host array, one transfer, one scatter
            packed = host_array(np.array([rows, cols, vals], dtype=np.int32))
            self.array[packed[0], packed[1]] = packed[2]
            self.cells_written += len(vals)
        return self.array

    def reserve(self, rows: int) -> None:
        """Hold at least ``rows`` rows from now on (start-up capture sizes the table for
        the largest batch first, so later graphs see one shape)."""
        self._fit(rows, 0)

    def _fit(self, rows: int, blocks: int) -> None:
        """Grow to ``rows`` rows (kept) or ``blocks`` columns (rows then rewritten)."""
        if blocks > self.width:
            self.width = 1 << (blocks - 1).bit_length()
            self.array = mx.zeros((self.rows, self.width), dtype=mx.int32)
            self._held = []
        if rows > self.rows:
            extra = mx.zeros((rows - self.rows, self.width), dtype=mx.int32)
            self.array = mx.concatenate([self.array, extra])
            self.rows = rows


def _prefix_kept(old: list[int] | None, new: list[int]) -> int:
    """How many of ``new``'s blocks a row holding ``old`` keeps: all of ``old`` when
    ``new`` starts with it, else none (the row is rewritten)."""
    if old is None or len(old) > len(new):
        return 0
    if len(old) == len(new):  # most steps: no new block, compared without a slice
        return len(old) if old == new else 0
    return len(old) if new[:len(old)] == old else 0
